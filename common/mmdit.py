"""The multimodal diffusion transformer (MMDiT) of Stable Diffusion 3.

Papers and equations:

* Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT): cut the latent into p x p patches,
  one token each; condition every block by adaptive layer norm with gates that start at 0 (adaLN-Zero, 3.2):
      (shift, scale, gate) = Linear(SiLU(c)),   x <- x + gate * F(LayerNorm(x) * (1 + scale) + shift)
  so a freshly initialised block is the identity.
* Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD 3, sec. 4,
  fig. 2): two token streams, text c and image x, each with its own weights (adaLN, Q/K/V/out projections,
  MLP), that meet in one attention over the concatenated sequence
      [Q_x; Q_c], [K_x; K_c], [V_x; V_c]  ->  softmax(Q K^T / sqrt(d)) V  ->  split back into x and c.
  The conditioning vector is c_vec = MLP(timestep code) + MLP(pooled text embedding). Optional RMS
  normalisation of Q and K (sec. 5.3.2, "qk_norm"; SD 3.5 Large) keeps the attention logits bounded.

Legend: B batch, C latent channels, H, W latent sides, p the patch size, h = H/p, w = W/p, N = h*w image
tokens, L text tokens, D the model width (= heads * head_dim), D_c the text encoders' width
(joint_attention_dim).

Every parameter has the name and shape of diffusers' ``SD3Transformer2DModel`` for the same configuration
(``MMDiTConfig.to_diffusers()``), so ``common.convert.from_diffusers`` moves a state dict across unchanged;
tests/test_mmdit.py checks the outputs agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.attention import attention, attention_weights
from common.unet_blocks import TimestepEmbedding, timestep_embedding


@dataclass
class MMDiTConfig:
    sample_size: int = 128  # latent side at training (SD 3: 1024 px / 8); sets the positions' scale
    patch_size: int = 2  # p: each p x p latent patch becomes one token
    in_channels: int = 16  # C: SD 3's VAE has 16 latent channels (SD 1.x: 4)
    num_layers: int = 24  # joint blocks; the last one updates only the image stream
    attention_head_dim: int = 64  # d per head
    num_attention_heads: int = 24  # heads; D = heads * d (SD 3 medium: 1536)
    joint_attention_dim: int = 4096  # D_c: width of the text tokens (CLIP-L + CLIP-G concatenated, T5-XXL)
    caption_projection_dim: int = 1536  # text tokens are projected to this width; must equal D
    pooled_projection_dim: int = 2048  # width of the pooled text vector (CLIP-L 768 + CLIP-G 1280)
    out_channels: int = 16  # the velocity has the latent's channels
    pos_embed_max_size: int = 192  # a max x max table of positions, centre-cropped to each latent's h x w
    qk_norm: str | None = None  # None (SD 3) or "rms_norm" (SD 3.5 Large)

    def __post_init__(self):
        if self.caption_projection_dim != self.num_attention_heads * self.attention_head_dim:
            raise ValueError(
                f"caption_projection_dim={self.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {self.width}"
            )
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"unknown qk_norm {self.qk_norm!r}; expected None or 'rms_norm'")

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def sd3_medium(cls) -> MMDiTConfig:
        """SD 3 medium's transformer/config.json, written out (stabilityai/stable-diffusion-3-medium)."""
        return cls()

    @classmethod
    def tiny(cls) -> MMDiTConfig:
        """A few-thousand-parameter model for tests and the notebook's toy."""
        return cls(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=24,
            caption_projection_dim=16,
            pooled_projection_dim=12,
            out_channels=4,
            pos_embed_max_size=16,
        )

    @classmethod
    def from_diffusers(cls, config: Mapping) -> MMDiTConfig:
        if tuple(config.get("dual_attention_layers") or ()):
            raise ValueError(
                "dual_attention_layers (SD 3.5 Medium's MMDiT-X) are not implemented; expected ()"
            )
        return cls(**{key: config[key] for key in asdict(cls()) if key in config})

    def to_diffusers(self) -> dict:
        return asdict(self)


def sincos_2d(D: int, side: int, base_size: float) -> torch.Tensor:
    """Fixed 2D sine-cosine positions (side*side, D): the first D/2 channels code the column, the rest the
    row.

    Positions step by base_size / side per cell (the table spans [0, base_size) patches, as in diffusers);
    each coordinate gets D/4 frequencies omega_k = 10000^(-k / (D/4)) and [sin(pos omega), cos(pos omega)]."""
    pos = torch.arange(side, dtype=torch.float32) / (side / base_size)  # float32 grid, as diffusers
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))  # (D/4,)

    def code(p):  # (side*side,) -> (side*side, D/2)
        angles = p.double()[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    row, col = torch.meshgrid(pos, pos, indexing="ij")  # (side, side) each
    return torch.cat([code(col.flatten()), code(row.flatten())], dim=1).float()  # (side*side, D)


class PatchEmbed(nn.Module):
    """Patchify: a p x p stride-p convolution (one linear map per patch), plus the positions' centre crop."""

    def __init__(
        self, *, patch_size: int, in_channels: int, width: int, pos_embed_max_size: int, base_size: int
    ):
        super().__init__()
        self.patch_size, self.max_size = patch_size, pos_embed_max_size
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        table = sincos_2d(width, pos_embed_max_size, base_size)[None]  # (1, max*max, D); saved, as diffusers
        self.register_buffer("pos_embed", table, persistent=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, C, H, W = z.shape
        h, w = H // self.patch_size, W // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"latent {H}x{W} has {h}x{w} patches; at most {self.max_size} per side fit")
        x = self.proj(z).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D), row by row
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.view(self.max_size, self.max_size, -1)
        return x + table[top : top + h, left : left + w].reshape(1, h * w, -1)  # (B, N, D)


def unpatchify(x: torch.Tensor, h: int, w: int, p: int, C: int) -> torch.Tensor:
    """(B, N, p*p*C) tokens back to a (B, C, h*p, w*p) latent; each token's vector is its patch, (p, p, C)."""
    B = x.shape[0]
    x = x.reshape(B, h, w, p, p, C)  # token (i, j): rows i*p.., columns j*p.., in (row, col, channel) order
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: six vectors from c_vec, (shift, scale, gate) for the attention and for the MLP."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 6 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, c_vec: torch.Tensor):
        modulation = self.linear(F.silu(c_vec))  # (B, 6 D)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # (B, D) each
        x = self.norm(x) * (1 + scale[:, None]) + shift[:, None]  # (B, N, D)
        return x, gate, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(nn.Module):
    """adaLN without gates, (scale, shift) in that order: the final norm, and the last block's text stream."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, c_vec: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(c_vec)).chunk(2, dim=1)  # (B, D) each
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class GELUProjection(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """D -> 4D -> GELU(tanh) -> D; ``net`` is indexed 0 and 2 as in diffusers (1 was a dropout)."""

    def __init__(self, width: int):
        super().__init__()
        layers = [GELUProjection(width, 4 * width), nn.Identity(), nn.Linear(4 * width, width)]
        self.net = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class JointAttention(nn.Module):
    """One attention over [image tokens; text tokens], each stream with its own projections (Esser fig. 2)."""

    def __init__(self, *, width: int, heads: int, qk_norm: str | None, context_pre_only: bool):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(width, width) for _ in range(3))  # image stream
        # the text stream's own projections
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(width, width) for _ in range(3))
        if qk_norm == "rms_norm":  # per head, over d: bounds the logits (Esser et al. sec. 5.3.2)
            d = width // heads
            self.norm_q, self.norm_k = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.qk_norm = qk_norm
        self.to_out = nn.ModuleList([nn.Linear(width, width)])
        # the last block's text output would feed nothing, so it has no text output projection
        self.to_add_out = None if context_pre_only else nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        return x.view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, N, d)

    def joint_qkv(self, x: torch.Tensor, c: torch.Tensor):
        """Queries, keys and values of both streams, image tokens first: three (B, heads, N+L, d)."""
        q, k, v = (self.split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        text_projections = (self.add_q_proj, self.add_k_proj, self.add_v_proj)
        q_c, k_c, v_c = (self.split_heads(proj(c)) for proj in text_projections)
        if self.qk_norm:
            q, k, q_c, k_c = self.norm_q(q), self.norm_k(k), self.norm_added_q(q_c), self.norm_added_k(k_c)
        # one sequence: every image token attends to every text token and the other way round
        return torch.cat([q, q_c], dim=2), torch.cat([k, k_c], dim=2), torch.cat([v, v_c], dim=2)

    def attention_weights(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) over the joint sequence, (B, heads, N+L, N+L): for drawing, not speed."""
        q, k, _ = self.joint_qkv(x, c)
        return attention_weights(q, k)

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        B, N, D = x.shape
        q, k, v = self.joint_qkv(x, c)  # (B, heads, N+L, d) each
        out = attention(q, k, v).transpose(1, 2).reshape(B, -1, D)  # (B, N+L, D)
        x_out, c_out = out[:, :N], out[:, N:]  # (B, N, D), (B, L, D)
        return self.to_out[0](x_out), (None if self.to_add_out is None else self.to_add_out(c_out))


class JointTransformerBlock(nn.Module):
    """adaLN-Zero on both streams -> joint attention -> gated residual -> adaLN MLP -> gated residual."""

    def __init__(self, *, width: int, heads: int, qk_norm: str | None, context_pre_only: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(width)
        self.norm1_context = AdaLayerNormContinuous(width) if context_pre_only else AdaLayerNormZero(width)
        self.attn = JointAttention(
            width=width, heads=heads, qk_norm=qk_norm, context_pre_only=context_pre_only
        )
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(width)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(width)

    def forward(self, x: torch.Tensor, c: torch.Tensor, c_vec: torch.Tensor):
        x_norm, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, c_vec)
        if self.context_pre_only:
            c_norm = self.norm1_context(c, c_vec)
        else:
            c_norm, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, c_vec)
        x_attn, c_attn = self.attn(x_norm, c_norm)

        # image stream: x <- x + gate * attn;  x <- x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)
        x = x + gate[:, None] * x_attn
        x_mlp = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * self.ff(x_mlp)
        if self.context_pre_only:
            return x, None

        # text stream: the same with its own weights
        c = c + c_gate[:, None] * c_attn
        c_mlp = self.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        c = c + c_gate_mlp[:, None] * self.ff_context(c_mlp)
        return x, c


class CombinedTimestepTextEmbedding(nn.Module):
    """c_vec = MLP(sinusoidal code of t) + MLP(pooled text): the vector every adaLN reads."""

    def __init__(self, *, width: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(in_dim=256, time_embed_dim=width)
        self.text_embedder = nn.ModuleDict(
            {"linear_1": nn.Linear(pooled_dim, width), "linear_2": nn.Linear(width, width)}
        )

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t_code = timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=0)  # (B, 256), [cos, sin]
        t_emb = self.timestep_embedder(t_code.to(pooled.dtype))  # (B, D)
        text = self.text_embedder["linear_2"](F.silu(self.text_embedder["linear_1"](pooled)))  # (B, D)
        return t_emb + text


class MMDiT(nn.Module):
    """SD 3's transformer: v_theta(z_t, t, context, pooled), the velocity of flow matching (common.flow)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.width
        self.pos_embed = PatchEmbed(
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels,
            width=D,
            pos_embed_max_size=cfg.pos_embed_max_size,
            base_size=cfg.sample_size // cfg.patch_size,
        )
        self.time_text_embed = CombinedTimestepTextEmbedding(width=D, pooled_dim=cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(
                    width=D,
                    heads=cfg.num_attention_heads,
                    qk_norm=cfg.qk_norm,
                    context_pre_only=(i == cfg.num_layers - 1),
                )
                for i in range(cfg.num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(D)
        self.proj_out = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)

    def forward(
        self, z: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """z: (B, C, H, W) noisy latent; t: (B,) or scalar timestep 1000 * sigma; context: (B, L, D_c) text
        tokens; pooled: (B, pooled_projection_dim). Returns the velocity (B, out_channels, H, W)."""
        B, C, H, W = z.shape
        p = self.config.patch_size
        t = torch.as_tensor(t, device=z.device)
        if t.ndim == 0:  # one timestep for the whole batch
            t = t.expand(B)
        x = self.pos_embed(z)  # (B, N, D)
        c_vec = self.time_text_embed(t, pooled)  # (B, D)
        c = self.context_embedder(context)  # (B, L, D)
        for block in self.transformer_blocks:
            x, c = block(x, c, c_vec)
        x = self.proj_out(self.norm_out(x, c_vec))  # (B, N, p*p*C_out)
        return unpatchify(x, H // p, W // p, p, self.config.out_channels)  # (B, C_out, H, W)
