"""Reference solutions for chapter 06's exercises (same signatures as exercises.py).

Run it to see each one on a tiny random pipeline (seconds):  python
06_stable_diffusion_architecture/solutions.py
"""

from __future__ import annotations

import torch


def img2img_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    n = len(timesteps)
    n_run = min(int(n * strength), n)
    return timesteps[n - n_run :]


@torch.no_grad()
def sample_with_cfg(
    pipe,
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int = 4,
    guidance_scale: float = 5.0,
    seed: int = 0,
    height: int = 16,
    width: int = 16,
) -> torch.Tensor:
    context = pipe.encode_prompt([negative_prompt, prompt])  # (2, N_k, D_c): [uncond, cond]
    sampler = pipe.make_sampler("ddim", steps)
    f = pipe.vae_scale_factor
    shape = (1, pipe.vae.config.latent_channels, height // f, width // f)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=pipe.dtype).to(pipe.device) * sampler.init_noise_sigma
    for t in sampler.timesteps:
        eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, context).chunk(2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        z = sampler.step(eps, t, z)
    return z


@torch.no_grad()
def img2img_strength_sweep(
    pipe, image: torch.Tensor, prompt: str, strengths: list[float], *, steps: int = 4, seed: int = 0
) -> list[float]:
    def run(s):
        return pipe(
            prompt,
            image=image,
            strength=s,
            num_inference_steps=steps,
            generator=seed,
            output_type="pt",
            progress=False,
        ).images

    kept = run(0.0)  # the image through the VAE: what strength 0 gives back
    return [(run(s) - kept).abs().mean().item() for s in strengths]


@torch.no_grad()
def prompt_study(
    pipe,
    variants: list[str],
    score_fn,
    *,
    seeds: tuple[int, ...] = (0, 1),
    steps: int = 4,
    size: int = 16,
    guidance_scale: float = 5.0,
) -> dict[str, float]:
    scores = {}
    for prompt in variants:
        per_seed = []
        for seed in seeds:
            images = pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=seed,
                height=size,
                width=size,
                output_type="pt",
                progress=False,
            ).images
            per_seed.append(float(score_fn(images, prompt)))
        scores[prompt] = sum(per_seed) / len(per_seed)
    return scores


@torch.no_grad()
def sampler_swap(
    pipe, prompt: str, *, steps: int = 4, reference_steps: int = 20, seed: int = 0, size: int = 16
) -> dict[str, float]:
    from common.samplers import SAMPLERS

    def image(sampler, n):
        return pipe(
            prompt,
            sampler=sampler,
            num_inference_steps=n,
            generator=seed,
            height=size,
            width=size,
            output_type="pt",
            progress=False,
        ).images

    reference = image("ddim", reference_steps)
    return {name: (image(name, steps) - reference).abs().mean().item() for name in SAMPLERS}


# ------------------------------------------------------------------------- after SD 1.5 (06b_from_sd2_to_sd3)
def v_target(z0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    return alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * z0


def v_to_eps(v: torch.Tensor, z_t: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    # alpha v + sigma z_t = (alpha^2 + sigma^2) eps + (sigma alpha - alpha sigma) z0 = eps: no division
    return alpha_bar_t.sqrt() * v + (1 - alpha_bar_t).sqrt() * z_t


def flow_matching_loss(velocity_fn, z0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    t = sigma.view(-1, *([1] * (z0.ndim - 1)))  # (B, 1, 1, 1)
    z_t = (1 - t) * z0 + t * eps
    return torch.nn.functional.mse_loss(velocity_fn(z_t, 1000 * sigma), eps - z0)


def flow_euler_step(
    v: torch.Tensor, z: torch.Tensor, sigma: float, sigma_next: float, shift: float
) -> torch.Tensor:
    def shifted(t):
        return shift * t / (1 + (shift - 1) * t)

    return z + (shifted(sigma_next) - shifted(sigma)) * v


def adaln_zero(x: torch.Tensor, c_vec: torch.Tensor, linear: torch.nn.Linear):
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = linear(torch.nn.functional.silu(c_vec)).chunk(
        6, dim=1
    )
    x_norm = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)
    return x_norm * (1 + scale[:, None]) + shift[:, None], gate, shift_mlp, scale_mlp, gate_mlp


def joint_attention(x: torch.Tensor, c: torch.Tensor, attn) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, D = x.shape

    def heads(tokens):  # (B, n, D) -> (B, heads, n, d)
        return tokens.view(B, -1, attn.heads, D // attn.heads).transpose(1, 2)

    q = torch.cat([heads(attn.to_q(x)), heads(attn.add_q_proj(c))], dim=2)
    k = torch.cat([heads(attn.to_k(x)), heads(attn.add_k_proj(c))], dim=2)
    v = torch.cat([heads(attn.to_v(x)), heads(attn.add_v_proj(c))], dim=2)
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)  # (B, heads, N + L, N + L)
    out = (weights @ v).transpose(1, 2).reshape(B, -1, D)
    return attn.to_out[0](out[:, :N]), attn.to_add_out(out[:, N:])


if __name__ == "__main__":
    from common.pipeline import tiny_random_pipeline

    torch.set_num_threads(1)  # tiny models: one thread is fastest
    pipe = tiny_random_pipeline()
    print(
        "1. img2img at strength 0.5 of 10 DDIM steps visits:",
        img2img_timesteps(pipe.make_sampler("ddim", 10).timesteps, 0.5).tolist(),
    )
    z = sample_with_cfg(pipe, "a red circle", steps=4)
    ref = pipe(
        "a red circle",
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=0,
        height=16,
        width=16,
        output_type="latent",
        progress=False,
    ).images
    print(f"2. hand-written loop vs the pipeline: max |diff| = {(z - ref).abs().max():.2e}")
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sweep = img2img_strength_sweep(pipe, image, "a red circle", [0.0, 0.25, 0.5, 1.0])
    print("3. img2img distance at strength 0, 0.25, 0.5, 1:", [f"{d:.3f}" for d in sweep])
    redness = lambda images, prompt: (images[:, 0] - images[:, 1:].mean(1)).mean().item()  # noqa: E731
    print(
        "4. prompt study (redness of a random model):",
        prompt_study(pipe, ["a red circle", "red circle"], redness),
    )
    print("5. distance to a 20-step DDIM reference at 4 steps:", sampler_swap(pipe, "a red circle"))
    from common.schedules import NoiseSchedule

    schedule = NoiseSchedule(prediction_type="v_prediction", rescale_zero_snr=True)
    alpha_bar = schedule.alpha_bar[[0, 500, 999]].view(-1, 1, 1, 1)
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    z_t = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * eps
    print(
        f"6-7. v at t = 0, 500, 999 of a zero-SNR schedule; eps recovered to "
        f"{(v_to_eps(v_target(z0, eps, alpha_bar), z_t, alpha_bar) - eps).abs().max():.1e}"
    )
    loss = flow_matching_loss(lambda z, t: torch.zeros_like(z), z0, eps, torch.tensor([0.2, 0.5, 0.9]))
    print(f"8. flow-matching loss of a zero velocity (E|eps - z0|^2 = 2): {loss:.3f}")
    z_next = flow_euler_step(eps, eps, 1.0, 0.5, 3.0)  # from pure noise with the exact velocity of z0 = 0
    print(
        "9. one Euler step t = 1 -> 0.5 with shift 3 lands at t' = 0.75: "
        f"z / eps = {(z_next / eps).mean():.3f}"
    )
    from common.mmdit import MMDiT, MMDiTConfig

    block = MMDiT(MMDiTConfig.tiny()).transformer_blocks[0]
    x, c, c_vec = torch.randn(1, 16, 16), torch.randn(1, 5, 16), torch.randn(1, 16)
    x_mod = adaln_zero(x, c_vec, block.norm1.linear)[0]
    print(f"10. adaLN-Zero vs common.mmdit: {(x_mod - block.norm1(x, c_vec)[0]).abs().max():.1e}")
    x_out, c_out = joint_attention(x, c, block.attn)
    print(f"11. joint attention vs common.mmdit: {(x_out - block.attn(x, c)[0]).abs().max():.1e}")
