"""Chapter 04 exercises: attention written out, the multi-head reshape, classifier-free guidance, how much of
a word's attention falls on its object, and a guidance-scale sweep.

Fill in each function, then grade your file:

    python -m common.grade 04

Legend (as in common/attention.py): B batch, h heads, N_q query tokens (the pixels), N_k key tokens
(the words), d head width, D model width, D_c context width. Do not call ``F.scaled_dot_product_attention`` or
``nn.MultiheadAttention`` here: the checks compare your code with them.
"""

from __future__ import annotations

import torch


# ---------------------------------------------------------------------------- 1. scaled dot-product attention
def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + M) V (Vaswani et al. 2017, eq. 1).

    q (..., N_q, d), k (..., N_k, d), v (..., N_k, d_v); any leading dims (batch, heads) broadcast.
    1. scores = q @ k^T / sqrt(d): (..., N_q, N_k), one row per query, one column per key.
    2. the mask, as ``F.scaled_dot_product_attention``'s ``attn_mask``: a bool tensor means True = may attend
       (set the others to -inf before the softmax); a float tensor is added to the scores.
    3. softmax over the keys (the last dim): each row becomes weights that sum to 1.
    4. weights @ v: (..., N_q, d_v), each query's weighted average of the values.
    Hint: ``torch.softmax`` subtracts the row maximum for you; ``exp`` by hand overflows on large scores.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 2. the multi-head reshape
def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h*d) -> (B, h, N, d). Head j owns features j*d .. (j+1)*d - 1 of the inner width.

    Hint: ``reshape`` to (B, N, h, d), then swap the N and h axes, so every head is a separate "batch" that
    the attention of exercise 1 handles at once.
    """
    raise NotImplementedError


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h*d), the inverse of ``split_heads``: heads side by side again."""
    raise NotImplementedError


def multi_head_attention(
    x: torch.Tensor,
    context: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_o: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """Cross-attention from pixels x (B, N_q, D) to words ``context`` (B, N_k, D_c), no biases.

    The weights are in ``nn.Linear``'s (out, in) layout: w_q (h*d, D), w_k and w_v (h*d, D_c), w_o (D, h*d).
    Q = x w_q^T, K = context w_k^T, V = context w_v^T; split each into heads, attend (your exercise 1),
    merge the heads, project with w_o. Returns (B, N_q, D).
    The check loads the same weights into ``nn.MultiheadAttention(D, h, bias=False, kdim=D_c, vdim=D_c)``
    (its ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``, ``out_proj.weight``) and compares.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 3. classifier-free guidance
def classifier_free_guidance(
    eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """Combine the unconditional and the conditional noise predictions (Ho & Salimans 2022, eq. 6).

    eps_hat = eps_u + s (eps_c - eps_u): s = 0 gives eps_u, s = 1 gives eps_c, s > 1 goes past eps_c, further
    away from what the model predicts for the empty prompt. Same shape as the inputs.
    The check also runs one guided DDIM step of the course pipeline and expects your combination to land on
    the same latents.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 4. attention mass in a mask
def attention_mass_in_mask(attn_map: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of one token's attention falls inside a region, against chance.

    attn_map (..., H, W): a token's attention over the pixels (non-negative, any total); mask (..., H, W)
    bool, the same shape (raise ValueError otherwise: resize the map first).
    share  = sum over the mask of the map / sum of the map (the map normalised to total 1, then summed in M);
    chance = the mask's area fraction |M| / (H W): the share a uniform map would have.
    Returns (share, chance), each of shape (...) (0-d tensors for a single map).
    ``attention_maps.py`` reports this for each object word of a generated image: share well above chance
    means the word's attention found its object.
    """
    raise NotImplementedError


# --------------------------------------------------------------------- 5. a guidance-scale sweep (open-ended)
def guidance_scale_sweep(
    pipe, prompt: str, scales: list[float], *, seed: int = 0, steps: int = 10, size: int | None = None
) -> torch.Tensor:
    """Generate ``prompt`` at each guidance scale from the same seed: a tensor (S, 3, H, W) in [0, 1].

    ``pipe`` is a ``common.pipeline.StableDiffusion``: call it with ``num_inference_steps=steps``,
    ``guidance_scale=s``, ``generator=seed``, ``height=size``, ``width=size``, ``output_type="pt"``.
    The check asks for shapes, the value range, the same image for the same seed, and images that move further
    from the s = 1 image as s grows. Then look: on the course model (``checkpoints/course_t2i``), at which
    scale do the colours and shapes match the prompt, and what goes wrong at s = 15?
    """
    raise NotImplementedError
