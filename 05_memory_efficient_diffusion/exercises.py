"""Chapter 05 exercises: memory-efficient diffusion. Grade them with ``python -m common.grade 05``.

From easy to open-ended:

1. ``sliced_attention``: attention over chunks of queries, equal to full attention for
   a fraction of the memory.
2. ``attention_memory_bytes``: predict the bytes of one layer's attention weights at a given resolution.
3. ``blend_tiles``: the overlap blending of tiled VAE decoding, graded by its seam error against untiled.
4. ``largest_side``: the largest image that fits a memory budget (open-ended; checked against the formula
   and a measurement).

Each function raises NotImplementedError until you write it; ``solutions.py`` holds one answer.
"""

from __future__ import annotations

import torch


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V, computed ``slice_size`` query rows at a time.

    q: (B, h, N_q, d); k, v: (B, h, N_k, d). Returns (B, h, N_q, d), equal to full attention (up to rounding).

    Full attention holds the (B, h, N_q, N_k) weight matrix at once; each query row's softmax needs only its
    own row of scores, so the rows can be computed in slices and the peak drops to (B, h, slice_size, N_k).

    Hints: allocate the output with ``torch.empty_like(q)``; loop ``start`` over
    ``range(0, N_q, slice_size)``; the last slice may be shorter; scale by 1 / sqrt(d) with d = q.shape[-1].
    """
    raise NotImplementedError("exercise 1: compute attention slice_size query rows at a time")


def attention_memory_bytes(
    *, image_side: int, batch: int, heads: int, f: int = 8, level: int = 0, bytes_per_element: int = 4
) -> int:
    """Bytes of ONE self-attention layer's weight matrix in the UNet, for square images of ``image_side`` px.

    The VAE shrinks the image by f (SD: 8), and each UNet level but the first halves it again, so at ``level``
    the feature map is (image_side / f / 2**level) pixels on a side, and each of its pixels is a token:
    N = side**2 tokens attend to N tokens, in every one of ``heads`` heads, for every image of the batch.

    Example: SD 1.5 at 512 px with classifier-free guidance (batch 2), 8 heads, level 0: 64 x 64 = 4096
    tokens, 2 * 8 * 4096 * 4096 * 4 bytes = 1 GiB, for one matrix (the math path holds two at its peak: the
    scores and their softmax).
    """
    raise NotImplementedError("exercise 2: batch x heads x N x N x bytes, with N the tokens at that level")


def blend_tiles(
    rows: list[list[torch.Tensor]], y_spans: list[tuple[int, int]], x_spans: list[tuple[int, int]]
) -> torch.Tensor:
    """Assemble overlapping decoded tiles into one image, cross-fading linearly across every overlap.

    rows[i][j] (B, C, y1 - y0, x1 - x0) covers output rows y_spans[i] = (y0, y1) and columns
    x_spans[j] = (x0, x1); neighbouring spans overlap (span k+1 starts before span k stops). Returns
    (B, C, y_spans[-1][1], x_spans[-1][1]).

    Recipe: give each tile a weight map w = ramp_y (outer) ramp_x, where the ramp along a side is 1 inside and
    rises linearly from ~0 to 1 across the overlap with the previous span (falls across the next), e.g.
    (i + 0.5) / overlap for i in range(overlap); accumulate sum(w * tile) and sum(w), return their ratio.
    Seams show where neighbouring tiles disagree: the cross-fade spreads the disagreement over the overlap.
    """
    raise NotImplementedError("exercise 3: accumulate weighted tiles and divide by the summed weights")


def largest_side(
    budget_bytes: int, *, batch: int, heads: int, f: int = 8, step: int = 64, bytes_per_element: int = 4
) -> int:
    """The largest square image side (px, a multiple of ``step``) whose first-level math-path attention fits.

    Count the peak of one self-attention layer on the math path at level 0: the scores AND their softmax,
    two (batch, heads, N, N) matrices, N = (side / f)**2. Return the largest side, a positive multiple of
    ``step``, with that peak <= ``budget_bytes`` (0 if not even ``step`` fits).

    Open-ended: the formula is enough to pass; the checker also measures the math path at your answer. Try
    the reverse question in the notebook: what does sliced attention or SDPA change in this budget?
    """
    raise NotImplementedError("exercise 4: search the largest side whose two attention matrices fit")
