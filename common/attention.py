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

Below the core sit the modules built on it, with diffusers' parameter names (so SD weights load unchanged):
``MultiHeadAttention`` (self- or cross-attention: Q from the pixels, K and V from the words), ``GEGLU`` and
``FeedForward``, ``TransformerBlock`` (pre-LN self-attention, cross-attention, feed-forward) and
``SpatialTransformer`` (a feature map in and out, Rombach et al. 2022, sec. 3.3); then attention-map capture
(``capture_attention_maps``, ``attention_maps_to_image``) and the chunked feed-forward switch of chapter 05.

Shapes use one legend throughout: B batch, h heads, N_q query tokens, N_k key tokens, d head width.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------------------
# Modules: multi-head attention, the transformer block and the spatial transformer of the UNet
# (Rombach et al. 2022, sec. 3.3: "we augment the underlying UNet backbone with the cross-attention
# mechanism", Attention(Q, K, V) with Q = W_Q phi(z_t), K = W_K tau(y), V = W_V tau(y)).
# Names and shapes of every parameter are diffusers' (BasicTransformerBlock, Transformer2DModel), so a
# Stable Diffusion state dict loads unchanged. Extra legend: D the model width (query_dim), D_c the
# context width, C channels and H, W the sides of a feature map.
# ------------------------------------------------------------------------------------------------------


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask): (B, h, N_q, N_k), each row sums to 1. What
    attention-map capture keeps."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)  # (B, h, N_q, N_k)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1)


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention (Vaswani et al. 2017, sec. 3.2.2), diffusers' ``Attention`` layout.

    Q comes from ``x`` (B, N_q, D); K and V from ``context`` (B, N_k, D_c), or from ``x`` itself when
    ``context_dim`` is None (self-attention). The h heads of width d = ``dim_head`` each attend on their own,
    then ``to_out.0`` mixes them back to D. No bias on Q, K, V, as in Stable Diffusion.
    """

    def __init__(
        self,
        *,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.is_cross_attention = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(dropout)])
        self.captured: list[torch.Tensor] | None = None  # a list while capture_attention_maps records here

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, N_q, D); context: (B, N_k, D_c) or None; mask: additive,
        broadcastable to (B, h, N_q, N_k)."""
        if context is None:
            if self.is_cross_attention:
                raise ValueError(
                    f"this is a cross-attention layer: pass context of shape (B, N_k, "
                    f"{self.to_k.in_features}), got None"
                )
            context = x
        if context.shape[-1] != self.to_k.in_features:
            raise ValueError(
                f"context has width {context.shape[-1]}, expected {self.to_k.in_features} "
                f"(context shape (B, N_k, {self.to_k.in_features}))"
            )
        B, N_q, _ = x.shape
        N_k = context.shape[1]
        h = self.heads
        # split the inner width h*d into h heads of width d and move heads next to batch
        q = self.to_q(x).view(B, N_q, h, -1).transpose(1, 2)  # (B, N_q, h*d) -> (B, h, N_q, d)
        k = self.to_k(context).view(B, N_k, h, -1).transpose(1, 2)  # (B, N_k, h*d) -> (B, h, N_k, d)
        v = self.to_v(context).view(B, N_k, h, -1).transpose(1, 2)  # (B, N_k, h*d) -> (B, h, N_k, d)
        if self.captured is not None:
            # capture needs the weights themselves, whatever the backend: compute them explicitly here
            weights = attention_weights(q, k, mask)  # (B, h, N_q, N_k)
            self.captured.append(weights.detach())
            out = weights @ v  # (B, h, N_q, d)
        else:
            out = attention(q, k, v, mask)  # (B, h, N_q, d)
        out = out.transpose(1, 2).reshape(B, N_q, -1)  # (B, h, N_q, d) -> (B, N_q, h*d): heads side by side
        return self.to_out[1](self.to_out[0](out))  # (B, N_q, D)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, eq. 6): (x W) * GELU(x V), W and V stacked in one ``proj``."""

    def __init__(self, *, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (..., 2*dim_out) -> two (..., dim_out)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """The position-wise MLP with a GEGLU: D -> mult*D (gated) -> D; names ``net.0.proj``, ``net.2``."""

    def __init__(self, *, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.ModuleList(
            [GEGLU(dim_in=dim, dim_out=inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-LN block: x + SelfAttn(LN(x)), then + CrossAttn(LN(x), context), then + FF(LN(x)).

    diffusers' ``BasicTransformerBlock`` (norm1/attn1, norm2/attn2, norm3/ff). ``chunk_size`` (set with
    ``set_chunk_feed_forward``) runs the feed-forward over chunks of tokens: the same result, a smaller peak
    of the (B, N, 8*D) GEGLU activation.
    """

    def __init__(self, *, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = MultiHeadAttention(query_dim=dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = MultiHeadAttention(
            query_dim=dim, context_dim=context_dim, heads=heads, dim_head=dim_head, dropout=dropout
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim=dim, dropout=dropout)
        self.chunk_size: int | None = None
        self.chunk_dim = 1

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk_size is None:
            return self.ff(x)
        # the FF acts on each token alone, so splitting the tokens (or the batch) changes nothing but memory
        chunks = x.split(self.chunk_size, dim=self.chunk_dim)
        return torch.cat([self.ff(chunk) for chunk in chunks], dim=self.chunk_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) pixel tokens; context: (B, N_k, D_c) text tokens. Returns (B, N, D)."""
        x = x + self.attn1(self.norm1(x))  # pixels look at pixels
        x = x + self.attn2(self.norm2(x), context)  # pixels look at words
        return x + self.feed_forward(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over a feature map, with a residual around them (diffusers' ``Transformer2DModel``).

    GroupNorm -> proj_in (1x1 conv, or a Linear after flattening when ``use_linear_projection``, as SD 2)
    -> the H*W pixels as tokens through ``depth`` TransformerBlocks -> proj_out -> + input.
    """

    def __init__(
        self,
        *,
        channels: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        depth: int = 1,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                TransformerBlock(dim=inner_dim, heads=heads, dim_head=dim_head, context_dim=context_dim)
                for _ in range(depth)
            ]
        )
        if use_linear_projection:
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)
        self.gradient_checkpointing = False  # set by UNet.enable_gradient_checkpointing

    def run_block(self, block: TransformerBlock, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One transformer block, through a checkpoint when gradient checkpointing is on and gradients are
        needed: its activations are dropped in the forward and recomputed in backward (diffusers' region).

        The reentrant form of ``torch.utils.checkpoint``: its first forward records no autograd graph at all,
        and backward reruns the whole block with one. The non-reentrant form, diffusers' choice, records the
        graph and drops each saved tensor through a Python hook, and its backward reruns the block only up to
        the last operation that saves a tensor: the feed-forward's output Linear needs its input, not its
        output, so that Linear is not rerun. A block saves a few dozen tensors, so the hooks cost more than
        that Linear wherever a step is short (overhead sets the pace, as on a GPU); where arithmetic sets it
        the two come out even (chapter 05's ``benchmark.py --checkpointing`` measures both regimes).

        The reentrant form gives the gradients of the block's weights only if one of its inputs requires
        grad. x does whenever anything before it trains, context when the text encoder trains; when neither
        does (the blocks alone train), the non-reentrant form, which has no such condition. (The reentrant
        form supports ``loss.backward()``, as every training loop here calls it, not
        ``torch.autograd.grad``.)
        """
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return block(x, context)
        reentrant = x.requires_grad or context.requires_grad
        return checkpoint(block, x, context, use_reentrant=reentrant, preserve_rng_state=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, N_k, D_c). Returns (B, C, H, W)."""
        B, C, H, W = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, C, H, W) -> (B, H*W, C)
            x = self.proj_in(x)  # (B, H*W, D)
        else:
            x = self.proj_in(x)  # (B, D, H, W)
            # (B, D, H, W) -> (B, H*W, D). The permute and reshape alone are a view that keeps the
            # channels-first memory order; copying the tokens into row order once, here, spares every
            # LayerNorm below a copy of its own, and the residual adds a strided walk (x + f(x) keeps
            # x's order)
            x = x.permute(0, 2, 3, 1).reshape(B, H * W, -1).contiguous()
        for block in self.transformer_blocks:
            x = self.run_block(block, x, context)  # (B, H*W, D)
        if self.use_linear_projection:
            x = self.proj_out(x)  # (B, H*W, C)
            x = x.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, H*W, C) -> (B, C, H, W)
        else:
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # (B, H*W, D) -> (B, D, H, W)
            x = self.proj_out(x.contiguous())  # (B, C, H, W)
        return x + residual


def set_chunk_feed_forward(model: nn.Module, chunk_size: int | None, dim: int = 1) -> int:
    """Run every TransformerBlock's feed-forward over chunks of ``chunk_size`` along ``dim``.

    dim 1 chunks the tokens (B, N, D), dim 0 the batch; ``chunk_size=None`` switches chunking off.
    Returns the number of blocks changed. Results are unchanged up to rounding;
    chapter 05 measures the memory.
    """
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (batch) or 1 (tokens), got {dim!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    for block in blocks:
        block.chunk_size, block.chunk_dim = chunk_size, dim
    return len(blocks)


# ------------------------------------------------------------------------------------------------------
# Attention maps: which words each pixel looks at (Hertz et al. 2022, "Prompt-to-Prompt", sec. 3.1).
# ------------------------------------------------------------------------------------------------------


def cross_attention_layers(model: nn.Module) -> dict[str, MultiHeadAttention]:
    """The model's cross-attention layers by name, in forward order (``...transformer_blocks.0.attn2``)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, MultiHeadAttention) and m.is_cross_attention
    }


@contextmanager
def capture_attention_maps(model: nn.Module, layers: list[str] | None = None):
    """Record the softmax weights of the model's cross-attention layers while the block runs.

    ``with capture_attention_maps(unet) as maps: unet(z_t, t, context)`` fills ``maps``, a dict from layer
    name to a list with one (B, heads, N_q, N_k) tensor per forward call (detached; N_q = h*w pixels of that
    layer's feature map, N_k the text tokens). ``layers`` picks names from ``cross_attention_layers(model)``
    (default: all). The captured layers compute their weights explicitly, so this works with every backend,
    and the model's output is unchanged.
    """
    available = cross_attention_layers(model)
    if not available:
        raise ValueError("the model has no cross-attention layers (MultiHeadAttention with a context_dim)")
    names = list(available) if layers is None else list(layers)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown cross-attention layers {unknown}; expected names among {list(available)}")
    maps: dict[str, list[torch.Tensor]] = {}
    for name in names:
        maps[name] = available[name].captured = []
    try:
        yield maps
    finally:
        for name in names:
            available[name].captured = None


def attention_maps_to_image(maps: dict[str, list[torch.Tensor]], size: tuple[int, int]) -> torch.Tensor:
    """Average captured maps over calls, heads and layers into one (B, N_k, H, W) map per token.

    Each layer's (B, heads, N_q, N_k) weights are averaged over heads, laid out on that layer's (h, w) grid
    (same aspect ratio as ``size`` = (H, W)) and upsampled bilinearly to (H, W) before layers are averaged.
    Every step is a convex combination, so at each pixel the maps still sum to 1 over the tokens.
    """
    H, W = size
    total, count = None, 0
    for name, calls in maps.items():
        for weights in calls:
            B, _, N_q, N_k = weights.shape
            h = round(math.sqrt(N_q * H / W))
            w = N_q // max(h, 1)
            if h * w != N_q:
                raise ValueError(f"layer {name}: {N_q} query tokens do not form a grid with aspect {H}:{W}")
            per_token = weights.float().mean(dim=1).transpose(1, 2)  # (B, heads, N_q, N_k) -> (B, N_k, N_q)
            per_token = per_token.reshape(B, N_k, h, w)  # (B, N_k, h*w) -> (B, N_k, h, w)
            per_token = F.interpolate(per_token, size=(H, W), mode="bilinear", align_corners=False)
            total = per_token if total is None else total + per_token  # (B, N_k, H, W)
            count += 1
    if total is None:
        raise ValueError("no attention maps were captured: run the model inside capture_attention_maps(...)")
    return total / count
