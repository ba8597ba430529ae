"""Checks for chapter 06's exercises: ``python -m common.grade 06`` runs them on your exercises.py.

The references are the course pipeline itself (same seed, same sampler) and properties a right answer must
have (lengths, ranges, growth with strength, the same seeds for every variant). Every check uses a tiny random
pipeline (``common.pipeline.tiny_random_pipeline``), so it runs in seconds whether or not
the course model exists.
"""

from __future__ import annotations

import functools
import math

import torch

from common.pipeline import tiny_random_pipeline

_PIPE = None


def pipeline():
    global _PIPE
    if _PIPE is None:
        _PIPE = tiny_random_pipeline()
    return _PIPE


def check_img2img_timesteps(m):
    from common.samplers import DDIMSampler
    from common.schedules import NoiseSchedule

    for n, strength in ((10, 0.5), (10, 0.0), (10, 1.0), (7, 0.33), (25, 0.8), (3, 0.99)):
        timesteps = DDIMSampler(NoiseSchedule(), n).timesteps
        got = m.img2img_timesteps(timesteps, strength)
        k = min(int(n * strength), n)
        want = timesteps[n - k :]
        assert isinstance(got, torch.Tensor), (
            f"return a tensor (a suffix of timesteps), got {type(got).__name__}"
        )
        assert torch.equal(got, want), (
            f"with {n} steps at strength {strength} img2img runs the last {k} "
            f"timesteps {want.tolist()}, got {got.tolist()}"
        )


def check_sample_with_cfg(m):
    pipe = pipeline()
    for prompt, negative, s, seed in (
        ("a red circle", "", 5.0, 0),
        ("a small blue square at the top", "red", 2.5, 7),
    ):
        got = m.sample_with_cfg(
            pipe, prompt, negative, steps=2, guidance_scale=s, seed=seed, height=8, width=8
        )
        want = pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=2,
            guidance_scale=s,
            generator=seed,
            height=8,
            width=8,
            sampler="ddim",
            output_type="latent",
            progress=False,
        ).images
        assert tuple(got.shape) == tuple(want.shape), (
            f"expected latents of shape {tuple(want.shape)}, got {tuple(got.shape)}"
        )
        diff = (got - want).abs().max().item()
        assert diff < 1e-4, (
            f"your loop differs from the pipeline by {diff:.2e} (prompt {prompt!r}, s={s}, seed {seed}): "
            "check the order [uncond, cond], the initial noise and the guidance formula"
        )


def check_img2img_strength_sweep(m):
    pipe = pipeline()
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    strengths = [0.0, 0.5, 1.0]
    d = m.img2img_strength_sweep(pipe, image, "a red circle", strengths, steps=4, seed=0)
    assert len(d) == len(strengths), f"expected one distance per strength ({len(strengths)}), got {len(d)}"
    assert all(isinstance(x, float) and math.isfinite(x) and x >= 0 for x in d), (
        f"expected finite floats >= 0, got {d}"
    )
    assert d[0] < 1e-6, (
        f"at strength 0 img2img gives back the VAE's version of the image: distance 0, got {d[0]:.4f}"
    )
    assert d[0] < d[1] < d[2], f"the distance should grow with strength {strengths}; got {d}"


def check_prompt_study(m):
    pipe = pipeline()
    seen = []

    def score(images, prompt):
        assert images.ndim == 4 and images.shape[1:] == (3, 8, 8), (
            f"score_fn got images {tuple(images.shape)}"
        )
        seen.append((prompt, images.clone()))
        return images[:, 0].mean().item()

    variants = ["a red circle", "a circle", "red circle"]
    result = m.prompt_study(pipe, variants, score, seeds=(0, 1), steps=2, size=8)
    assert isinstance(result, dict) and list(result) == variants, (
        f"expected a dict keyed by the variants in order, got {result!r}"
    )
    assert all(0.0 <= v <= 1.0 for v in result.values()), f"these scores lie in [0, 1]; got {result}"
    assert len(seen) >= 2 * len(variants), "score every variant at every seed"
    again = m.prompt_study(pipe, variants[:1], score, seeds=(0, 1), steps=2, size=8)
    assert abs(again[variants[0]] - result[variants[0]]) < 1e-6, "the same seeds must give the same score"


def check_sampler_swap(m):
    from common.samplers import SAMPLERS

    pipe = pipeline()
    result = m.sampler_swap(pipe, "a red circle", steps=2, reference_steps=4, seed=0, size=8)
    assert isinstance(result, dict) and set(result) == set(SAMPLERS), (
        f"expected one entry per sampler {sorted(SAMPLERS)}, got {result!r}"
    )
    assert all(isinstance(v, float) and math.isfinite(v) and 0 <= v <= 1 for v in result.values()), (
        f"distances of images in [0, 1] lie in [0, 1]; got {result}"
    )
    assert len(set(round(v, 6) for v in result.values())) > 1, (
        f"different samplers should give different images; got {result}"
    )


def one_thread(check):
    """Run a check on one CPU thread: tiny models gain nothing from more, and a shared machine loses a lot."""

    @functools.wraps(check)
    def run(m):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(m)
        finally:
            torch.set_num_threads(n)

    return run


CHECKS = [
    ("img2img_timesteps", one_thread(check_img2img_timesteps)),
    ("sample_with_cfg", one_thread(check_sample_with_cfg)),
    ("img2img_strength_sweep", one_thread(check_img2img_strength_sweep)),
    ("prompt_study", one_thread(check_prompt_study)),
    ("sampler_swap", one_thread(check_sampler_swap)),
]


# ========================================================================= after SD 1.5 (06b_from_sd2_to_sd3)
def _zero_snr_scheduler():
    """SD 2.x's schedule rescaled to zero terminal SNR (Lin et al. 2023), as diffusers builds it."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    )


def _noised_batch(scheduler, timesteps):
    g = torch.Generator().manual_seed(0)
    z0, eps = (
        torch.randn(len(timesteps), 4, 6, 5, generator=g),
        torch.randn(len(timesteps), 4, 6, 5, generator=g),
    )
    alpha_bar_t = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return z0, eps, alpha_bar_t


def check_v_target(m):
    scheduler = _zero_snr_scheduler()
    timesteps = torch.tensor([0, 250, 600, 999])
    z0, eps, alpha_bar_t = _noised_batch(scheduler, timesteps)
    got = m.v_target(z0, eps, alpha_bar_t)
    want = scheduler.get_velocity(z0, eps, timesteps)
    assert tuple(got.shape) == tuple(want.shape), (
        f"expected v of shape {tuple(want.shape)}, got {tuple(got.shape)}"
    )
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, (
        f"v differs from diffusers' get_velocity by {diff:.2e}: v = sqrt(alpha_bar) eps - "
        "sqrt(1 - alpha_bar) z0 (which term carries the minus sign?)"
    )


def check_v_to_eps(m):
    scheduler = _zero_snr_scheduler()
    timesteps = torch.tensor([0, 250, 600, 999])  # 999: alpha_bar = 0 exactly
    z0, eps, alpha_bar_t = _noised_batch(scheduler, timesteps)
    z_t = scheduler.add_noise(z0, eps, timesteps)
    v = scheduler.get_velocity(z0, eps, timesteps)
    got = m.v_to_eps(v, z_t, alpha_bar_t)
    assert torch.isfinite(got).all(), (
        "v_to_eps is not finite at alpha_bar = 0 (the last timestep of a zero-SNR "
        "schedule): write it without a division"
    )
    diff = (got - eps).abs().max().item()
    assert diff < 1e-4, f"v_to_eps should give back the noise diffusers added; it is off by {diff:.2e}"


def check_flow_matching_loss(m):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    index = torch.tensor([1, 4, 8])
    timesteps, sigma = scheduler.timesteps[index], scheduler.sigmas[index]
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 6, 5, generator=g), torch.randn(3, 4, 6, 5, generator=g)
    W = torch.randn(4, 4, generator=g) / 2
    seen = {}

    def velocity_fn(z_t, t):
        seen.update(z_t=z_t.detach().clone(), t=torch.as_tensor(t).detach().clone())
        return torch.einsum("dc,bchw->bdhw", W, z_t)

    got = m.flow_matching_loss(velocity_fn, z0, eps, sigma)
    assert "z_t" in seen, "call velocity_fn(z_t, 1000 * sigma)"
    want_z_t = scheduler.scale_noise(z0, timesteps, eps)  # diffusers' forward process for SD 3
    assert (seen["z_t"] - want_z_t).abs().max() < 1e-5, (
        "z_t should be (1 - sigma) z0 + sigma eps, per batch item"
    )
    assert torch.allclose(seen["t"].float().flatten(), timesteps, atol=1e-3), (
        f"the network's timestep is 1000 * sigma = {timesteps.tolist()}, got {seen['t'].tolist()}"
    )
    want = torch.nn.functional.mse_loss(torch.einsum("dc,bchw->bdhw", W, want_z_t), eps - z0)
    assert torch.as_tensor(got).ndim == 0, "return the mean loss, a 0-d tensor"
    assert abs(float(got) - want.item()) < 1e-5 * max(1.0, want.item()), (
        f"loss {float(got):.6f}, expected {want.item():.6f}: the target velocity is eps - z0"
    )


def check_flow_euler_step(m):
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(2)
    for shift, sigma, sigma_next in ((1.0, 1.0, 0.75), (3.0, 0.8, 0.5), (3.0, 0.3, 0.0), (2.0, 0.6, 0.55)):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        sigmas = [sigma, sigma_next] if sigma_next > 0 else [sigma]  # diffusers appends the final 0 itself
        scheduler.set_timesteps(sigmas=sigmas)
        v, z = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g)
        want = scheduler.step(v, scheduler.timesteps[0], z).prev_sample
        got = m.flow_euler_step(v, z, sigma, sigma_next, shift)
        diff = (got - want).abs().max().item()
        assert diff < 1e-5, (
            f"shift {shift}, sigma {sigma} -> {sigma_next}: off from diffusers by {diff:.2e}; "
            "shift both levels first, then z + (t'_next - t') v"
        )


def check_adaln_zero(m):
    from diffusers.models.normalization import AdaLayerNormZero

    torch.manual_seed(3)
    D = 12
    ref = AdaLayerNormZero(D)
    torch.nn.init.normal_(ref.linear.weight, std=0.3)  # diffusers' zero init would hide a wrong order
    torch.nn.init.normal_(ref.linear.bias, std=0.3)
    x, c_vec = torch.randn(2, 7, D), torch.randn(2, D)
    with torch.no_grad():
        want = ref(x, emb=c_vec)
        got = m.adaln_zero(x, c_vec, ref.linear)
    names = ("x_mod", "gate", "shift_mlp", "scale_mlp", "gate_mlp")
    assert isinstance(got, tuple) and len(got) == 5, f"return the five tensors {names}"
    for name, a, b in zip(names, got, want):
        assert tuple(a.shape) == tuple(b.shape), (
            f"{name}: expected shape {tuple(b.shape)}, got {tuple(a.shape)}"
        )
        diff = (a - b).abs().max().item()
        assert diff < 1e-5, f"{name} differs from diffusers' AdaLayerNormZero by {diff:.2e}"


def check_joint_attention(m):
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    torch.manual_seed(4)
    D, heads = 16, 2
    attn = Attention(
        query_dim=D,
        added_kv_proj_dim=D,
        dim_head=D // heads,
        heads=heads,
        out_dim=D,
        context_pre_only=False,
        bias=True,
        processor=JointAttnProcessor2_0(),
    ).eval()
    x, c = torch.randn(2, 9, D), torch.randn(2, 4, D)
    with torch.no_grad():
        want_x, want_c = attn(hidden_states=x, encoder_hidden_states=c)
        got = m.joint_attention(x, c, attn)
    assert isinstance(got, tuple) and len(got) == 2, "return (x_out, c_out)"
    for name, a, b in (("x_out", got[0], want_x), ("c_out", got[1], want_c)):
        assert tuple(a.shape) == tuple(b.shape), (
            f"{name}: expected shape {tuple(b.shape)}, got {tuple(a.shape)}"
        )
        diff = (a - b).abs().max().item()
        assert diff < 1e-5, (
            f"{name} differs from diffusers' joint attention by {diff:.2e}: one softmax over "
            "image and text keys together, image tokens first"
        )


CHECKS += [
    ("v_target", one_thread(check_v_target)),
    ("v_to_eps", one_thread(check_v_to_eps)),
    ("flow_matching_loss", one_thread(check_flow_matching_loss)),
    ("flow_euler_step", one_thread(check_flow_euler_step)),
    ("adaln_zero", one_thread(check_adaln_zero)),
    ("joint_attention", one_thread(check_joint_attention)),
]
