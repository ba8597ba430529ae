"""Checks for chapter 04's exercises: ``python -m common.grade 04`` runs them on your exercises.py.

References are PyTorch's own (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``), direct formulas,
the course pipeline's guidance, and synthetic maps and masks whose answers are known. Every check builds its
inputs from a fixed seed and runs in seconds (the pipeline checks use a tiny random pipeline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TOL = 1e-5


def tiny_pipeline(seed: int = 0):
    """A tiny random text-to-image pipeline over the Shapes tokenizer (32 px images, 16 x 16 latents).

    Random weights: its images are not pictures of anything, but every step of the real pipeline runs.
    """
    from common.pipeline import tiny_random_pipeline

    return tiny_random_pipeline(seed)


def _close(ours, ref, what: str, tol: float = TOL) -> None:
    assert torch.is_tensor(ours), f"{what}: expected a tensor, got {type(ours).__name__}"
    assert ours.shape == ref.shape, f"{what}: expected shape {tuple(ref.shape)}, got {tuple(ours.shape)}"
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= tol * max(1.0, ref.abs().max().item()), (
        f"{what}: max |ours - reference| = {diff:.3g} (> {tol:g})"
    )


def check_scaled_dot_product_attention(m):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (7, 5, 5))
    _close(m.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), "no mask")
    v6 = torch.randn(2, 3, 5, 6, generator=g)  # d_v may differ from d
    _close(m.scaled_dot_product_attention(q, k, v6), F.scaled_dot_product_attention(q, k, v6), "d_v != d")
    keep = torch.rand(7, 5, generator=g) > 0.4
    keep[:, 0] = True  # every query keeps at least one key
    _close(
        m.scaled_dot_product_attention(q, k, v, keep),
        F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
        "a bool mask (True = may attend)",
    )
    bias = torch.randn(2, 1, 7, 5, generator=g)
    _close(
        m.scaled_dot_product_attention(q, k, v, bias),
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        "a float mask added to the scores",
    )
    big = torch.randn(1, 1, 4, 64, generator=g) * 30  # large scores: the softmax must not overflow
    _close(
        m.scaled_dot_product_attention(big, big, big),
        F.scaled_dot_product_attention(big, big, big),
        "large scores (subtract the max before exp, or use .softmax)",
        tol=1e-4,
    )


def check_multi_head_attention(m):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 24, generator=g)
    heads = m.split_heads(x, 4)
    ref = x.view(2, 6, 4, 6).permute(0, 2, 1, 3)  # head j holds features j*d .. (j+1)*d - 1
    _close(heads, ref, "split_heads((2, 6, 24), 4) should be (2, 4, 6, 6), head j = features [6j, 6j+6)")
    _close(m.merge_heads(heads), x, "merge_heads(split_heads(x)) should give x back")
    D, D_c, h = 16, 12, 4
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(D, h, bias=False, kdim=D_c, vdim=D_c, batch_first=True).eval()
    x, c = torch.randn(2, 9, D, generator=g), torch.randn(2, 5, D_c, generator=g)
    with torch.no_grad():
        ref = mha(x, c, c, need_weights=False)[0]
        ours = m.multi_head_attention(
            x, c, mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.out_proj.weight, h
        )
    _close(ours, ref, "multi_head_attention against nn.MultiheadAttention with the same weights")
    from common.attention import MultiHeadAttention

    layer = MultiHeadAttention(query_dim=D, context_dim=D_c, heads=h, dim_head=D // h).eval()
    with torch.no_grad():
        layer.to_out[0].bias.zero_()
        ours = m.multi_head_attention(
            x, c, layer.to_q.weight, layer.to_k.weight, layer.to_v.weight, layer.to_out[0].weight, h
        )
        _close(ours, layer(x, c), "multi_head_attention against common.attention.MultiHeadAttention")


def check_classifier_free_guidance(m):
    g = torch.Generator().manual_seed(2)
    e_u, e_c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for s in (0.0, 1.0, 7.5):
        _close(m.classifier_free_guidance(e_u, e_c, s), e_u + s * (e_c - e_u), f"guidance scale {s}")
    # the pipeline's own guidance: one DDIM step from the same noise must land on the same latents
    from common.samplers import as_generator, randn

    pipe, s, prompt = tiny_pipeline(), 5.0, "a small red circle above a large blue square"
    ref = pipe(
        prompt,
        num_inference_steps=1,
        guidance_scale=s,
        generator=0,
        output_type="latent",
        height=32,
        width=32,
        progress=False,
    ).images
    gen = as_generator(0)
    sampler = pipe.make_sampler(None, 1)
    z = randn(ref.shape, gen, torch.empty(0)) * sampler.init_noise_sigma
    t = sampler.timesteps[0]
    with torch.no_grad():
        context = torch.cat([pipe.encode_prompt([""]), pipe.encode_prompt([prompt])])
        eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, context).chunk(2)
    sampler.reset()
    z_next = sampler.step(m.classifier_free_guidance(eps_u, eps_c, s), t, z, generator=gen)
    _close(z_next, ref, "one guided DDIM step against common.pipeline.StableDiffusion's", tol=1e-4)


def check_attention_mass_in_mask(m):
    H = W = 8
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[:2] = True  # the top quarter
    uniform = torch.full((H, W), 0.3)
    share, chance = m.attention_mass_in_mask(uniform, mask)
    assert abs(float(chance) - 0.25) < 1e-6, (
        f"chance should be the mask's area fraction 0.25, got {float(chance)}"
    )
    assert abs(float(share) - 0.25) < 1e-6, (
        f"a uniform map puts 0.25 of its mass in a 1/4 mask, got {float(share)}"
    )
    top_half = torch.zeros(H, W)
    top_half[:4] = 2.0  # unnormalised on purpose: the share must not depend on the map's total
    share, _ = m.attention_mass_in_mask(top_half, mask)
    assert abs(float(share) - 0.5) < 1e-6, (
        f"a map spread over the top half has 0.5 of its mass in the top quarter, got {float(share)}"
    )
    inside = torch.zeros(H, W)
    inside[0, 3] = 1.0
    share, _ = m.attention_mass_in_mask(inside, mask)
    assert abs(float(share) - 1.0) < 1e-6, f"a map inside the mask has share 1, got {float(share)}"
    # a batch: (B, H, W) maps and masks -> (B,) shares and chances
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 16, 16, generator=g)
    masks = torch.rand(5, 16, 16, generator=g) > 0.7
    share, chance = m.attention_mass_in_mask(maps, masks)
    ref_share = (maps * masks).sum((1, 2)) / maps.sum((1, 2))
    _close(torch.as_tensor(share), ref_share, "batched share (B, H, W) -> (B,)")
    _close(torch.as_tensor(chance), masks.float().mean((1, 2)), "batched chance (B, H, W) -> (B,)")
    try:
        m.attention_mass_in_mask(torch.rand(8, 8), torch.ones(16, 16, dtype=torch.bool))
    except ValueError:
        pass
    else:
        raise AssertionError(
            "a map and a mask of different shapes should raise ValueError (resize the map first)"
        )


def check_guidance_scale_sweep(m):
    pipe, scales = tiny_pipeline(), [1.0, 3.0, 9.0]
    images = m.guidance_scale_sweep(
        pipe, "a small red circle above a large blue square", scales, seed=0, steps=2, size=32
    )
    assert torch.is_tensor(images) and tuple(images.shape) == (3, 3, 32, 32), (
        f"expected a tensor (S, 3, H, W) = (3, 3, 32, 32), got {getattr(images, 'shape', type(images))}"
    )
    assert images.min() >= 0 and images.max() <= 1, "images should be in [0, 1] (output_type='pt')"
    again = m.guidance_scale_sweep(
        pipe, "a small red circle above a large blue square", scales[:1], seed=0, steps=2, size=32
    )
    assert torch.allclose(again[0], images[0], atol=1e-5), (
        "the same seed should give the same image at a scale"
    )
    gaps = [(images[i] - images[0]).abs().mean().item() for i in range(1, len(scales))]
    assert all(b > a for a, b in zip(gaps, gaps[1:])), (
        "images should move further from the s = 1 image as s grows (same seed at every scale); "
        f"mean |x_s - x_1| = {gaps}"
    )


CHECKS = [
    ("scaled_dot_product_attention", check_scaled_dot_product_attention),
    ("multi_head_attention", check_multi_head_attention),
    ("classifier_free_guidance", check_classifier_free_guidance),
    ("attention_mass_in_mask", check_attention_mass_in_mask),
    ("guidance_scale_sweep", check_guidance_scale_sweep),
]
