"""Checks for chapter 06's exercises: ``python -m common.grade 06`` runs them on your exercises.py.

The references are the course pipeline itself (same seed, same sampler) and properties a right answer must
have (lengths, ranges, growth with strength, the same seeds for every variant). Every check uses a tiny random
pipeline (``common.pipeline.tiny_random_pipeline``), so it runs in seconds whether or not the course model exists.
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
        want = timesteps[n - k:]
        assert isinstance(got, torch.Tensor), f"return a tensor (a suffix of timesteps), got {type(got).__name__}"
        assert torch.equal(got, want), (f"with {n} steps at strength {strength} img2img runs the last {k} "
                                        f"timesteps {want.tolist()}, got {got.tolist()}")


def check_sample_with_cfg(m):
    pipe = pipeline()
    for prompt, negative, s, seed in (("a red circle", "", 5.0, 0), ("a small blue square at the top", "red", 2.5, 7)):
        got = m.sample_with_cfg(pipe, prompt, negative, steps=2, guidance_scale=s, seed=seed, height=8, width=8)
        want = pipe(prompt, negative_prompt=negative, num_inference_steps=2, guidance_scale=s, generator=seed,
                    height=8, width=8, sampler="ddim", output_type="latent", progress=False).images
        assert tuple(got.shape) == tuple(want.shape), f"expected latents of shape {tuple(want.shape)}, got {tuple(got.shape)}"
        diff = (got - want).abs().max().item()
        assert diff < 1e-4, (f"your loop differs from the pipeline by {diff:.2e} (prompt {prompt!r}, s={s}, seed {seed}): "
                             "check the order [uncond, cond], the initial noise and the guidance formula")


def check_img2img_strength_sweep(m):
    pipe = pipeline()
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    strengths = [0.0, 0.5, 1.0]
    d = m.img2img_strength_sweep(pipe, image, "a red circle", strengths, steps=4, seed=0)
    assert len(d) == len(strengths), f"expected one distance per strength ({len(strengths)}), got {len(d)}"
    assert all(isinstance(x, float) and math.isfinite(x) and x >= 0 for x in d), f"expected finite floats >= 0, got {d}"
    assert d[0] < 1e-6, f"at strength 0 img2img gives back the VAE's version of the image: distance 0, got {d[0]:.4f}"
    assert d[0] < d[1] < d[2], f"the distance should grow with strength {strengths}; got {d}"


def check_prompt_study(m):
    pipe = pipeline()
    seen = []

    def score(images, prompt):
        assert images.ndim == 4 and images.shape[1:] == (3, 8, 8), f"score_fn got images {tuple(images.shape)}"
        seen.append((prompt, images.clone()))
        return images[:, 0].mean().item()

    variants = ["a red circle", "a circle", "red circle"]
    result = m.prompt_study(pipe, variants, score, seeds=(0, 1), steps=2, size=8)
    assert isinstance(result, dict) and list(result) == variants, f"expected a dict keyed by the variants in order, got {result!r}"
    assert all(0.0 <= v <= 1.0 for v in result.values()), f"these scores lie in [0, 1]; got {result}"
    assert len(seen) >= 2 * len(variants), "score every variant at every seed"
    again = m.prompt_study(pipe, variants[:1], score, seeds=(0, 1), steps=2, size=8)
    assert abs(again[variants[0]] - result[variants[0]]) < 1e-6, "the same seeds must give the same score"


def check_sampler_swap(m):
    from common.samplers import SAMPLERS

    pipe = pipeline()
    result = m.sampler_swap(pipe, "a red circle", steps=2, reference_steps=4, seed=0, size=8)
    assert isinstance(result, dict) and set(result) == set(SAMPLERS), f"expected one entry per sampler {sorted(SAMPLERS)}, got {result!r}"
    assert all(isinstance(v, float) and math.isfinite(v) and 0 <= v <= 1 for v in result.values()), \
        f"distances of images in [0, 1] lie in [0, 1]; got {result}"
    assert len(set(round(v, 6) for v in result.values())) > 1, f"different samplers should give different images; got {result}"


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
