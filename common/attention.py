"""Attention, from softmax(Q K^T / sqrt(d)) V up (Vaswani et al. 2017, eq. 1).

The core function ``attention(q, k, v)`` is the one place in the course where attention weights are
computed: the VAE's mid-block, the UNet's self- and cross-attention and the CLIP text model all call it.
It has three interchangeable backends, chosen globally with ``set_attention_backend`` or locally with
the ``attention_backend(...)`` context manager (chapter 05 measures them):

=========  ==========================================================================================
``math``   the readable path: the (N_q x N_k) weight matrix is materialised, softmaxed and applied
``sdpa``   ``torch.nn.functional.scaled_dot_product_attention``: fused kernels (flash / memory-efficient
           on a GPU, a blocked kernel on the CPU) that never hold the whole weight matrix at once
``sliced`` the math path over chunks of ``slice_size`` query rows: peak memory of the weights drops from
           N_q x N_k to slice_size x N_k per head, for the same result
=========  ==========================================================================================

Shapes use one legend throughout: B batch, h heads, N_q query tokens, N_k key tokens, d head width.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

BACKENDS = ("math", "sdpa", "sliced")

_state = {"backend": "sdpa", "slice_size": 1024}


def set_attention_backend(backend: str, slice_size: int | None = None) -> None:
    """Choose the attention backend for every module in the course: one of ``BACKENDS``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
        raise ValueError(f"slice_size must be a positive int, got {slice_size!r}")
    _state["backend"] = backend
    if slice_size is not None:
        _state["slice_size"] = slice_size


def get_attention_backend() -> tuple[str, int]:
    """The current ``(backend, slice_size)``."""
    return _state["backend"], _state["slice_size"]


@contextmanager
def attention_backend(backend: str, slice_size: int | None = None):
    """``with attention_backend("sliced", slice_size=256): ...`` restores the previous choice on exit."""
    saved = dict(_state)
    set_attention_backend(backend, slice_size)
    try:
        yield
    finally:
        _state.update(saved)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V, written out. q: (B, h, N_q, d), k and v: (B, h, N_k, d).

    ``mask`` is additive (0 to keep, -inf to drop) and broadcasts to (B, h, N_q, N_k).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q * scale) @ k.transpose(-1, -2)  # (B, h, N_q, N_k)
    if mask is not None:
        scores = scores + mask
    weights = scores.softmax(dim=-1)  # each query's weights over the keys sum to 1
    return weights @ v  # (B, h, N_q, d)


def attention_sliced(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The math path over chunks of ``slice_size`` query rows; equal to ``attention_math`` up to rounding.

    Slicing over queries (not over batch x heads, as diffusers does) also helps the VAE, whose single
    head at batch 1 leaves nothing else to slice.
    """
    out = torch.empty_like(q)
    n_q = q.shape[-2]
    for start in range(0, n_q, slice_size):
        stop = min(start + slice_size, n_q)
        chunk_mask = None
        if mask is not None:
            chunk_mask = mask[..., start:stop, :] if mask.shape[-2] == n_q else mask
        out[..., start:stop, :] = attention_math(q[..., start:stop, :], k, v, chunk_mask)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-head attention weights applied to values with the current (or the given) backend.

    q: (B, h, N_q, d); k, v: (B, h, N_k, d); mask: additive, broadcastable to (B, h, N_q, N_k).
    Returns (B, h, N_q, d).
    """
    backend = backend or _state["backend"]
    if backend == "sdpa":
        # SDPA picks a flash / memory-efficient kernel when one fits the device, dtype and shapes
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        return attention_math(q, k, v, mask)
    if backend == "sliced":
        return attention_sliced(q, k, v, _state["slice_size"], mask)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
