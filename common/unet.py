"""The denoising UNet of latent diffusion (Ronneberger et al. 2015; Ho et al. 2020, appendix B; Rombach et al.
2022, sec. 3.3): eps_theta(z_t, t, tau(y)) predicts the noise (or v) in a noisy latent z_t at step t.

    t --sinusoid--> linear_1, SiLU, linear_2 --> temb (+ class_embedding[y] when class-conditional)
    z_t --conv_in--> down_blocks (ResNets [+ cross-attention to context], stride-2 convs) --skips--+
                     mid_block (ResNet [, attention, ResNet])                                     |
                     up_blocks (concat skip, ResNets [+ attention], x2 upsample)  <---------------+
        --conv_norm_out, SiLU, conv_out--> eps (B, out_channels, H, W)

Every parameter name and shape equals diffusers' ``UNet2DConditionModel`` built from
``common.convert.unet_config_to_diffusers(config)``, so Stable Diffusion 1.5's weights load with
``load_state_dict(strict=True)``.
The blocks live in ``common/unet_blocks.py``, attention in ``common/attention.py``.

Shapes use one legend: B batch, C channels, H and W the latent's sides, T the time-embedding width,
N_k context tokens, D_c the context width (cross_attention_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.attention import SpatialTransformer
from common.unet_blocks import DownBlock, MidBlock, TimestepEmbedding, UpBlock, _Block, timestep_embedding

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


class UNet(nn.Module):
    """eps_theta(z_t, t, context, class_labels): the conditional UNet, diffusers'
    UNet2DConditionModel layout."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        channels = cfg.block_out_channels
        levels = len(channels)
        temb_channels = channels[0] * 4  # T: the time embedding is 4x the base width, as in DDPM
        heads = cfg.heads_per_level
        depth = _per_block(cfg.transformer_layers_per_block, levels, "transformer_layers_per_block")
        common = dict(
            temb_channels=temb_channels,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            context_dim=cfg.cross_attention_dim,
            use_linear_projection=cfg.use_linear_projection,
        )

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(in_dim=channels[0], time_embed_dim=temb_channels)
        if cfg.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb_channels)
        else:
            self.class_embedding = None

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            attn = kind == "CrossAttnDownBlock2D"
            self.down_blocks.append(
                DownBlock(
                    in_channels=channels[max(i - 1, 0)],
                    out_channels=channels[i],
                    num_layers=cfg.layers_per_block,
                    add_downsample=i < levels - 1,
                    heads=heads[i] if attn else None,
                    transformer_depth=depth[i],
                    **common,
                )
            )

        if cfg.mid_block_type is None:
            self.mid_block = None
        else:
            attn = cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
            self.mid_block = MidBlock(
                channels=channels[-1],
                heads=heads[-1] if attn else None,
                transformer_depth=depth[-1],
                **common,
            )

        self.up_blocks = nn.ModuleList()
        rev_channels, rev_heads, rev_depth = channels[::-1], heads[::-1], depth[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            attn = kind == "CrossAttnUpBlock2D"
            self.up_blocks.append(
                UpBlock(
                    in_channels=rev_channels[min(i + 1, levels - 1)],
                    prev_output_channels=rev_channels[max(i - 1, 0)],
                    out_channels=rev_channels[i],
                    num_layers=cfg.layers_per_block + 1,
                    add_upsample=i < levels - 1,
                    heads=rev_heads[i] if attn else None,
                    transformer_depth=rev_depth[i],
                    **common,
                )
            )

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResNet / transformer block in backward instead of storing its activations."""
        for module in self.modules():
            if isinstance(module, (_Block, SpatialTransformer)):
                module.gradient_checkpointing = enabled

    def disable_gradient_checkpointing(self) -> None:
        self.enable_gradient_checkpointing(False)

    def _timesteps(self, t, batch: int, device: torch.device) -> torch.Tensor:
        """t as an int / float, a 0-d tensor, or a (B,) / (1,) tensor -> (B,)."""
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.float32 if isinstance(t, float) else torch.int64, device=device)
        if t.ndim == 0:
            t = t[None]
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(
                f"t must be a number, a 0-d tensor or a tensor of shape ({batch},); got shape "
                f"{tuple(t.shape)}"
            )
        return t.to(device).expand(batch)

    def _check_inputs(
        self, z_t: torch.Tensor, context: torch.Tensor | None, class_labels: torch.Tensor | None
    ):
        cfg = self.config
        if z_t.ndim != 4 or z_t.shape[1] != cfg.in_channels:
            raise ValueError(
                f"z_t must have shape (B, {cfg.in_channels}, H, W) (in_channels={cfg.in_channels}); "
                f"got {tuple(z_t.shape)}"
            )
        B, _, H, W = z_t.shape
        if H < 1 or W < 1:
            raise ValueError(f"the latent must have H, W >= 1; got {H}x{W}")
        # any H, W works: a side that does not halve evenly is upsampled back to its
        # skip's size (as diffusers)
        if cfg.has_cross_attention:
            if context is None or context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
                got = None if context is None else tuple(context.shape)
                raise ValueError(
                    f"context must have shape (B, N_k, {cfg.cross_attention_dim}) "
                    f"(cross_attention_dim={cfg.cross_attention_dim}); got {got}"
                )
            if context.shape[0] != B:
                raise ValueError(f"context batch {context.shape[0]} differs from the latent's batch {B}")
        elif context is not None:
            raise ValueError("this UNet has no cross-attention blocks; pass context=None")
        if cfg.num_class_embeds is not None:
            if class_labels is None or class_labels.shape != (B,):
                got = None if class_labels is None else tuple(class_labels.shape)
                raise ValueError(
                    f"class_labels must be an int tensor of shape ({B},) with values in "
                    f"[0, {cfg.num_class_embeds}) (num_class_embeds={cfg.num_class_embeds}); "
                    f"got {got}"
                )
        elif class_labels is not None:
            raise ValueError(
                "this UNet is not class-conditional (num_class_embeds=None); pass class_labels=None"
            )

    def forward(
        self,
        z_t: torch.Tensor,
        t,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z_t: (B, C_in, H, W); t: step(s); context: (B, N_k, D_c); class_labels:
        (B,) -> (B, C_out, H, W)."""
        self._check_inputs(z_t, context, class_labels)
        cfg = self.config
        t = self._timesteps(t, z_t.shape[0], z_t.device)  # (B,)
        t_code = timestep_embedding(
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )  # (B, C_0), always fp32
        temb = self.time_embedding(t_code.to(z_t.dtype))  # (B, T)
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(class_labels).to(temb.dtype)  # (B, T)

        x = self.conv_in(z_t)  # (B, C_0, H, W)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)  # halves H, W at every level but the last
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self.mid_block(x, temb, context)  # (B, C_last, H/f, W/f)
        for block in self.up_blocks:
            x = block(x, skips, temb, context)  # pops layers_per_block + 1 skips; doubles H, W but at the top
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, C_out, H, W)


# --- the configuration: what the UNet is built from, and the course's presets ---
def _per_block(value, n: int, name: str) -> tuple:
    """An int (same for every level) or a tuple with one entry per level -> a tuple of n entries."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or have one entry per level ({n}), got {value!r}")
    return value


@dataclass(frozen=True)
class UNetConfig:
    sample_size: int | None = 64  # latent side trained at (512 px / 8); informative, any multiple works
    in_channels: int = 4  # channels of z_t: the VAE's latent channels
    out_channels: int = 4  # channels of the prediction (eps or v), same as z_t
    block_out_channels: tuple[int, ...] = (
        320,
        640,
        1280,
        1280,
    )  # width per level; all but the last halve H, W
    layers_per_block: int = 2  # ResNets per down level (up levels get one more, for the extra skip)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # attention or not
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3  # lowest resolution first
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # bottleneck: with attention, ResNet only, or none
    cross_attention_dim: int | None = 768  # D_c, the context width (CLIP ViT-L/14: 768); None = no text
    # diffusers' naming quirk: in UNet2DConditionModel configs `attention_head_dim` is the NUMBER OF HEADS
    # (SD 1.5: 8 heads, so head width 320/8 = 40 at level 0, 160 at level 3). Kept under diffusers' name so
    # configs round-trip; `num_attention_heads`, when set, says the same thing under the right name and wins.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None  # heads per level; None = use attention_head_dim
    use_linear_projection: bool = (
        False  # Linear instead of 1x1 conv around the transformer (SD 2 uses Linear)
    )
    norm_num_groups: int = 32  # GroupNorm groups in every ResNet and transformer; divides every width
    norm_eps: float = (
        1e-5  # the ResNets' GroupNorm epsilon (the transformers' is fixed at 1e-6, as diffusers)
    )
    num_class_embeds: int | None = None  # class-conditional: an nn.Embedding added to the time embedding
    flip_sin_to_cos: bool = True  # timestep code as [cos, sin] (SD) rather than [sin, cos]
    freq_shift: int = 0  # frequencies max_period ** (-k / (dim/2 - freq_shift)); SD 0, DDPM's UNet 1
    transformer_layers_per_block: int | tuple[int, ...] = (
        1  # TransformerBlocks per SpatialTransformer, per level
    )

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, int):
                object.__setattr__(self, name, tuple(value))
        if levels == 0 or len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(
                f"block_out_channels {self.block_out_channels}, down_block_types and up_block_types "
                f"must have one entry per level (the same length, at least 1)"
            )
        for name, types, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            if any(kind not in allowed for kind in types):
                raise ValueError(f"{name}={types!r}: every entry must be one of {allowed}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"mid_block_type={self.mid_block_type!r}; expected one of {MID_BLOCK_TYPES}")
        if self.cross_attention_dim is not None and not isinstance(self.cross_attention_dim, int):
            raise ValueError(
                f"cross_attention_dim must be one int (the context width) or None, "
                f"got {self.cross_attention_dim!r}"
            )
        if self.has_cross_attention and self.cross_attention_dim is None:
            raise ValueError("cross-attention blocks need cross_attention_dim (the context width, e.g. 768)")
        heads = self.heads_per_level
        _per_block(self.transformer_layers_per_block, levels, "transformer_layers_per_block")
        for channels, h in zip(self.block_out_channels, heads):
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"every width in block_out_channels {self.block_out_channels} must be a "
                    f"multiple of norm_num_groups={self.norm_num_groups}"
                )
            if self.has_cross_attention and channels % h:
                raise ValueError(
                    f"width {channels} does not split into {h} heads; choose heads that divide "
                    f"every entry of block_out_channels {self.block_out_channels}"
                )
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")

    @property
    def has_cross_attention(self) -> bool:
        """True when any block attends to a context (the UNet then needs ``context`` in forward)."""
        return (
            "CrossAttnDownBlock2D" in self.down_block_types
            or "CrossAttnUpBlock2D" in self.up_block_types
            or self.mid_block_type == "UNetMidBlock2DCrossAttn"
        )

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads per level, resolving diffusers' ``attention_head_dim`` quirk (see the field)."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(heads, len(self.block_out_channels), "num_attention_heads / attention_head_dim")

    @property
    def downsample_factor(self) -> int:
        """H and W of the input must be multiples of this: one stride-2 conv per level but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    # --- presets -------------------------------------------------------------------------------------
    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.5's UNet (stable-diffusion-v1-5 unet/config.json): 859,520,964 parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> UNetConfig:
        """Two levels, both block kinds, cross-attention mid block: builds and runs in
        milliseconds (tests)."""
        return cls(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )

    @classmethod
    def digits(cls) -> UNetConfig:
        """Class-conditional Digits at 8x8x4 latents (chapter 03): 0.82 M parameters, 40 MFLOP per forward.

        Two levels (8x8 -> 4x4) of ResNets, no attention: at 8x8 two 3x3 convs already see most of the latent.
        Sized for about ten CPU minutes of training (a few thousand steps at batch 128).
        """
        return cls(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2D",
            cross_attention_dim=None,
            norm_num_groups=8,
            num_class_embeds=10,
        )

    @classmethod
    def shapes_uncond(cls) -> UNetConfig:
        """Unconditional Shapes at 16x16x4 latents (chapter 03): three levels (16 -> 8 -> 4), no attention,
        0.97 M parameters, 120 MFLOP per forward."""
        return cls(
            sample_size=16,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D",) * 3,
            up_block_types=("UpBlock2D",) * 3,
            mid_block_type="UNetMidBlock2D",
            cross_attention_dim=None,
            norm_num_groups=8,
        )

    @classmethod
    def shapes_text(
        cls,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        *,
        heads: int = 4,
        cross_attention_dim: int = 128,
        norm_num_groups: int = 16,
        sample_size: int = 16,
        latent_channels: int = 4,
    ) -> UNetConfig:
        """The course's text-to-image UNet, at 16x16x4 latents (the f = 4 Shapes VAE) as chapter 04 and the
        shipped GPU model train it: 4.2 M parameters at the default widths.

        ResNets only at full resolution; cross-attention at the two lower levels (8x8 and 4x4 for 16x16
        latents) and in the middle, where a token sees the whole 64 px image through a few latent pixels
        (positions and relations are decided there); full-resolution attention would cost the most and add the
        least. ``cross_attention_dim`` must equal the text encoder's width (``TextToImageConfig``'s: 128).
        ``sample_size`` and ``latent_channels`` fit it to another VAE's latents (the laptop model's f = 8
        VAE).
        """
        return cls(
            sample_size=sample_size,
            in_channels=latent_channels,
            out_channels=latent_channels,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=heads,
            norm_num_groups=norm_num_groups,
        )

    @classmethod
    def shapes_text_gpu(cls) -> UNetConfig:
        """``shapes_text`` wider at every level (64, 96, 128): the shipped course model's UNet
        (``TextToImageConfig.gpu()``, ``checkpoints/course_t2i``), 5.6 M parameters."""
        return cls.shapes_text((64, 96, 128))
