"""Chapter 04 reference solutions: attention written out, the multi-head reshape, classifier-free guidance,
the attention-mass-in-mask statistic, and a guidance-scale sweep.

    python 04_cross_attention/solutions.py     # checks each answer against PyTorch and prints the figures

Legend (as in common/attention.py): B batch, h heads, N_q query tokens (pixels), N_k key tokens (words),
d head width, D model width, D_c context width.
"""

from __future__ import annotations

import math

import torch


# ---------------------------------------------------------------------------- 1. scaled dot-product attention
def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + M) V (Vaswani et al. 2017, eq. 1). q (..., N_q, d), k
    (..., N_k, d), v (..., N_k, d_v).

    ``mask`` follows ``F.scaled_dot_product_attention``'s ``attn_mask``: a bool tensor (True = may attend) or
    a float tensor added to the scores; it broadcasts to (..., N_q, N_k). Returns (..., N_q, d_v).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., N_q, N_k)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))  # a masked key gets weight exp(-inf) = 0
        else:
            scores = scores + mask
    weights = scores.softmax(dim=-1)  # each query's weights over the keys sum to 1
    return weights @ v  # (..., N_q, d_v)


# ---------------------------------------------------------------------------- 2. the multi-head reshape
def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h*d) -> (B, h, N, d): the inner width is h blocks of d, one per head;
    heads move next to batch."""
    B, N, inner = x.shape
    if inner % heads:
        raise ValueError(f"width {inner} does not split into {heads} heads")
    return x.reshape(B, N, heads, inner // heads).transpose(1, 2)  # (B, N, h, d) -> (B, h, N, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h*d): the inverse of ``split_heads``, heads side by side again."""
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


def multi_head_attention(
    x: torch.Tensor,
    context: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_o: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """Cross-attention from x (B, N_q, D) to context (B, N_k, D_c) with bias-free projections.

    w_q (h*d, D), w_k and w_v (h*d, D_c), w_o (D, h*d), in ``nn.Linear``'s (out, in) layout: Q = x w_q^T, ...
    Returns (B, N_q, D).
    """
    q = split_heads(x @ w_q.T, heads)  # (B, N_q, h*d) -> (B, h, N_q, d)
    k = split_heads(context @ w_k.T, heads)  # (B, h, N_k, d)
    v = split_heads(context @ w_v.T, heads)  # (B, h, N_k, d)
    out = scaled_dot_product_attention(q, k, v)  # (B, h, N_q, d): every head attends on its own
    return merge_heads(out) @ w_o.T  # (B, N_q, h*d) -> (B, N_q, D)


# ---------------------------------------------------------------------------- 3. classifier-free guidance
def classifier_free_guidance(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """eps_hat = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022, eq. 6, with s = 1 + w).

    s = 0 is the unconditional model, s = 1 the conditional one, s > 1 extrapolates past it, away from "".
    """
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


# ---------------------------------------------------------------------------- 4. attention mass in a mask
def attention_mass_in_mask(attn_map: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The share of a token's attention mass inside a region, and the share a uniform map would put there.

    attn_map (..., H, W) non-negative (one token's attention over the pixels); mask (..., H, W) bool, same
    shape. share = sum_{x in M} A(x) / sum_x A(x); chance = |M| / (H W). Returns
    (share, chance), each of shape (...).
    """
    if attn_map.shape != mask.shape:
        raise ValueError(
            f"attn_map {tuple(attn_map.shape)} and mask {tuple(mask.shape)} must have the same shape; "
            "resize the map to the mask's resolution first"
        )
    a = attn_map.float().flatten(-2)  # (..., H*W)
    m = mask.bool().flatten(-2).float()
    share = (a * m).sum(-1) / a.sum(-1).clamp_min(1e-12)
    chance = m.mean(-1)
    return share, chance


# ---------------------------------------------------------------------------- 5. a guidance-scale sweep
@torch.no_grad()
def guidance_scale_sweep(
    pipe, prompt: str, scales: list[float], *, seed: int = 0, steps: int = 10, size: int | None = None
) -> torch.Tensor:
    """Generate ``prompt`` once per guidance scale from the same starting noise: (S, 3, H, W) in [0, 1].

    ``pipe`` is a ``common.pipeline.StableDiffusion``; ``size`` the image side (default: the model's own).
    The same seed for every scale, so the only difference between the images is the guidance.
    """
    images = []
    for s in scales:
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=float(s),
            generator=seed,
            height=size,
            width=size,
            output_type="pt",
            progress=False,
        )
        images.append(out.images[0])
    return torch.stack(images)  # (S, 3, H, W)


if __name__ == "__main__":
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    keep = torch.rand(6, 5) > 0.3
    keep[:, 0] = True
    ours = scaled_dot_product_attention(q, k, v, keep)
    print(
        "1. attention: max |ours - F.sdpa| "
        f"= {(ours - F.scaled_dot_product_attention(q, k, v, attn_mask=keep)).abs().max():.2e}"
    )

    D, D_c, h = 16, 12, 4
    x, c = torch.randn(2, 9, D), torch.randn(2, 5, D_c)
    ref = nn.MultiheadAttention(D, h, bias=False, kdim=D_c, vdim=D_c, batch_first=True).eval()
    ours = multi_head_attention(
        x, c, ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight, ref.out_proj.weight, h
    )
    print(
        "2. multi-head: max |ours - nn.MultiheadAttention| "
        f"= {(ours - ref(x, c, c, need_weights=False)[0]).abs().max():.2e}"
    )

    e_u, e_c = torch.zeros(3), torch.ones(3)
    print(
        "3. guidance at s = 0, 1, 7.5:",
        [classifier_free_guidance(e_u, e_c, s)[0].item() for s in (0, 1, 7.5)],
    )

    a = torch.zeros(8, 8)
    a[:4] = 1.0  # all the mass in the top half
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[:2] = True  # a mask over the top quarter
    share, chance = attention_mass_in_mask(a, m)
    print(f"4. mass in mask: share {share:.2f} against chance {chance:.2f}")

    from pathlib import Path

    from common.grade import load_module

    checks = load_module(Path(__file__).with_name("checks.py"))
    pipe = checks.tiny_pipeline()
    images = guidance_scale_sweep(
        pipe, "a small red circle above a large blue square", [1, 3, 9], steps=4, size=32
    )
    gaps = [(images[i] - images[0]).abs().mean().item() for i in range(len(images))]
    print(
        f"5. sweep on a tiny random pipeline: images {tuple(images.shape)}, mean |x_s - x_1| = "
        + ", ".join(f"{g:.3f}" for g in gaps)
    )
