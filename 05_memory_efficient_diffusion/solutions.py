"""Chapter 05 reference solutions (same signatures as exercises.py). Run it to see them at work:

python 05_memory_efficient_diffusion/solutions.py
"""

from __future__ import annotations

import math

import torch


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V, ``slice_size`` query rows at a time. q:
    (B, h, N_q, d) -> (B, h, N_q, d)."""
    if slice_size < 1:
        raise ValueError(f"slice_size must be >= 1, got {slice_size}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for start in range(0, q.shape[-2], slice_size):
        q_slice = q[..., start : start + slice_size, :]  # (B, h, s, d)
        weights = ((q_slice * scale) @ k.transpose(-1, -2)).softmax(
            dim=-1
        )  # (B, h, s, N_k): the only big one
        out[..., start : start + slice_size, :] = weights @ v  # (B, h, s, d)
    return out


def attention_memory_bytes(
    *, image_side: int, batch: int, heads: int, f: int = 8, level: int = 0, bytes_per_element: int = 4
) -> int:
    """batch x heads x N x N x bytes, N = (image_side / f / 2**level)**2 tokens."""
    side = image_side // f // 2**level  # the feature map's side at that level
    n_tokens = side * side
    return batch * heads * n_tokens * n_tokens * bytes_per_element


def blend_tiles(
    rows: list[list[torch.Tensor]], y_spans: list[tuple[int, int]], x_spans: list[tuple[int, int]]
) -> torch.Tensor:
    """Weighted sum of tiles / sum of weights, with linear ramps across each overlap."""

    def ramps(spans):
        out = []
        for k, (start, stop) in enumerate(spans):
            w = torch.ones(stop - start)
            before = spans[k - 1][1] - start if k > 0 else 0  # overlap with the previous span
            after = stop - spans[k + 1][0] if k + 1 < len(spans) else 0  # ... and with the next
            if before > 0:
                w[:before] = (torch.arange(before) + 0.5) / before
            if after > 0:
                w[-after:] = torch.minimum(w[-after:], (after - torch.arange(after) - 0.5) / after)
            out.append(w)
        return out

    B, C = rows[0][0].shape[:2]
    H, W = y_spans[-1][1], x_spans[-1][1]
    acc = torch.zeros(B, C, H, W)
    total = torch.zeros(1, 1, H, W)
    for (y0, y1), ry, row in zip(y_spans, ramps(y_spans), rows):
        for (x0, x1), rx, tile in zip(x_spans, ramps(x_spans), row):
            w = ry[:, None] * rx[None, :]  # (h, w)
            acc[:, :, y0:y1, x0:x1] += tile.float() * w
            total[:, :, y0:y1, x0:x1] += w
    return acc / total


def largest_side(
    budget_bytes: int, *, batch: int, heads: int, f: int = 8, step: int = 64, bytes_per_element: int = 4
) -> int:
    """Grow the side by ``step`` while two (batch, heads, N, N) matrices still fit the budget."""
    side = 0
    while (
        2
        * attention_memory_bytes(
            image_side=side + step, batch=batch, heads=heads, f=f, bytes_per_element=bytes_per_element
        )
        <= budget_bytes
    ):
        side += step
    return side


if __name__ == "__main__":
    from common.attention import attention_math

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 1000, 40, generator=g) for _ in range(3))
    err = (sliced_attention(q, k, v, 128) - attention_math(q, k, v)).abs().max()
    print(f"1. sliced attention (slices of 128 queries) vs full: max abs diff {float(err):.2e}")
    for side in (256, 512, 768, 1024):
        b = attention_memory_bytes(image_side=side, batch=2, heads=8)
        print(
            f"2. SD 1.5, {side:4d} px, CFG batch 2, 8 heads: "
            f"one attention matrix at level 0 = {b / 2**30:7.3f} GiB"
        )
    spans = [(0, 16), (12, 28), (24, 40)]
    img = torch.randn(1, 3, 40, 40)
    tiles = [[img[:, :, y0:y1, x0:x1] for x0, x1 in spans] for y0, y1 in spans]
    print(
        f"3. blending consistent tiles gives the image back: max abs diff "
        f"{float((blend_tiles(tiles, spans, spans) - img).abs().max()):.2e}"
    )
    for gib in (1, 4, 16):
        side = largest_side(gib * 2**30, batch=2, heads=8)
        print(
            f"4. a {gib:2d} GiB budget for SD's first attention layer (math path, "
            f"CFG batch 2): up to {side} px"
        )
