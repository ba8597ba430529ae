"""Reference solutions for chapter 06's exercises (same signatures as exercises.py).

Run it to see each one on a tiny random pipeline (seconds):  python 06_stable_diffusion_architecture/solutions.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def img2img_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    n = len(timesteps)
    n_run = min(int(n * strength), n)
    return timesteps[n - n_run:]


@torch.no_grad()
def sample_with_cfg(pipe, prompt: str, negative_prompt: str = "", *, steps: int = 4, guidance_scale: float = 5.0,
                    seed: int = 0, height: int = 16, width: int = 16) -> torch.Tensor:
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
def img2img_strength_sweep(pipe, image: torch.Tensor, prompt: str, strengths: list[float], *, steps: int = 4,
                           seed: int = 0) -> list[float]:
    def run(s):
        return pipe(prompt, image=image, strength=s, num_inference_steps=steps, generator=seed, output_type="pt",
                    progress=False).images

    kept = run(0.0)  # the image through the VAE: what strength 0 gives back
    return [(run(s) - kept).abs().mean().item() for s in strengths]


@torch.no_grad()
def prompt_study(pipe, variants: list[str], score_fn, *, seeds: tuple[int, ...] = (0, 1), steps: int = 4,
                 size: int = 16, guidance_scale: float = 5.0) -> dict[str, float]:
    scores = {}
    for prompt in variants:
        per_seed = []
        for seed in seeds:
            images = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=seed,
                          height=size, width=size, output_type="pt", progress=False).images
            per_seed.append(float(score_fn(images, prompt)))
        scores[prompt] = sum(per_seed) / len(per_seed)
    return scores


@torch.no_grad()
def sampler_swap(pipe, prompt: str, *, steps: int = 4, reference_steps: int = 20, seed: int = 0,
                 size: int = 16) -> dict[str, float]:
    from common.samplers import SAMPLERS

    def image(sampler, n):
        return pipe(prompt, sampler=sampler, num_inference_steps=n, generator=seed, height=size, width=size,
                    output_type="pt", progress=False).images

    reference = image("ddim", reference_steps)
    return {name: (image(name, steps) - reference).abs().mean().item() for name in SAMPLERS}


if __name__ == "__main__":
    from common.pipeline import tiny_random_pipeline

    torch.set_num_threads(1)  # tiny models: one thread is fastest
    pipe = tiny_random_pipeline()
    print("1. img2img at strength 0.5 of 10 DDIM steps visits:",
          img2img_timesteps(pipe.make_sampler("ddim", 10).timesteps, 0.5).tolist())
    z = sample_with_cfg(pipe, "a red circle", steps=4)
    ref = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, generator=0, height=16, width=16,
               output_type="latent", progress=False).images
    print(f"2. hand-written loop vs the pipeline: max |diff| = {(z - ref).abs().max():.2e}")
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sweep = img2img_strength_sweep(pipe, image, "a red circle", [0.0, 0.25, 0.5, 1.0])
    print("3. img2img distance at strength 0, 0.25, 0.5, 1:", [f"{d:.3f}" for d in sweep])
    redness = lambda images, prompt: (images[:, 0] - images[:, 1:].mean(1)).mean().item()  # noqa: E731
    print("4. prompt study (redness of a random model):", prompt_study(pipe, ["a red circle", "red circle"],
                                                                       redness))
    print("5. distance to a 20-step DDIM reference at 4 steps:", sampler_swap(pipe, "a red circle"))
