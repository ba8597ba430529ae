"""The UNet's building blocks: time embedding, ResNet blocks, down / mid / up blocks (Ho et al. 2020, appendix
B; Rombach et al. 2022, sec. 3.3 and appendix E.2).

* ``timestep_embedding``: the Transformer's sinusoidal position code (Vaswani et al. 2017, sec. 3.5) applied
  to the diffusion step t, exactly as diffusers' ``get_timestep_embedding`` computes it;
* ``TimestepEmbedding``: an MLP (linear_1, SiLU, linear_2) on top of it, 4x the base width;
* ``ResnetBlock2D``: two 3x3 convs with GroupNorm + SiLU, the time embedding added between them
  (a per-channel shift: "the network is told how noisy its input is");
* ``DownBlock`` / ``UpBlock`` / ``MidBlock``: ResNet blocks, optionally each followed by a
  ``SpatialTransformer`` (cross-attention to the text), and a stride-2 conv down / nearest-neighbour x2 + conv
  up between levels. With attention they are diffusers' ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D`` /
  ``UNetMidBlock2DCrossAttn``; without, ``DownBlock2D`` / ``UpBlock2D`` / ``UNetMidBlock2D``. Parameter names
  (``resnets.{i}``, ``attentions.{i}``, ``downsamplers.0.conv``, ``upsamplers.0.conv``) are diffusers'.

Shapes use one legend: B batch, C channels, H and W the feature map's sides, T the time-embedding width,
N_k context tokens, D_c the context width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.attention import SpatialTransformer


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10_000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of the timesteps t (B,) -> (B, dim), as diffusers' ``get_timestep_embedding``.

    freq_k = max_period ** (-k / (dim/2 - freq_shift)), k = 0 .. dim/2 - 1;  emb = [sin(t freq), cos(t freq)]
    (``flip_sin_to_cos`` puts the cosines first, as Stable Diffusion does; SD uses freq_shift = 0).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (dim/2,)
    angles = t[:, None].float() * freqs[None, :]  # (B, 1) * (1, dim/2) -> (B, dim/2)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, dim)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))  # an odd width gets one zero column
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2: from the sinusoidal code to the width T every ResNet block reads."""

    def __init__(self, *, in_dim: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """x + conv2(SiLU(GN(conv1(SiLU(GN(x))) + W_t SiLU(temb)))), a 1x1 conv on the skip
    when the width changes."""

    def __init__(
        self, *, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float = 1e-5
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W); temb: (B, T). Returns (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = (
            h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        )  # (B, C_out) -> (B, C_out, 1, 1), per channel
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (padding 1, symmetric: unlike the VAE's asymmetric pad)."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C, H, W) -> (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # `size`: the skip's (H, W) when an odd side was halved on the way down (ceil(H/2) * 2 != H)
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B, C, H_skip, W_skip)


class _Block(nn.Module):
    """Shared by the down, mid and up blocks: run a sub-module, through a checkpoint when asked.

    Gradient checkpointing (Chen et al. 2016) keeps only the inputs of each checkpointed region during the
    forward pass and recomputes its insides during backward: less activation memory for about one more
    forward. The regions are diffusers' (``enable_gradient_checkpointing`` on its UNet), so both keep the same
    tensors:

    * each ResNet but the mid block's first (diffusers runs that one plainly: at the lowest resolution its
      activations are among the smallest, so checkpointing it would save little memory for its recompute).
    * each transformer block inside a spatial transformer (``SpatialTransformer.run_block``), not the spatial
      transformer's GroupNorm and projections: their outputs are kept, and not recomputed.

    A ResNet goes through the non-reentrant form of ``torch.utils.checkpoint``, as in diffusers: backward
    recomputes it only up to the last operation that saves a tensor, so its second convolution, whose
    output nothing saves, is not rerun (half a ResNet's arithmetic). A transformer block goes through the
    reentrant form, which records no graph in the first forward and so spares a hook on each saved tensor,
    but reruns the block's last Linear (see ``SpatialTransformer.run_block``): a little more arithmetic than
    diffusers', less overhead.

    No random numbers are drawn inside either (no dropout), so the RNG state is not saved and restored.
    """

    gradient_checkpointing = False

    def run(self, module: nn.Module, *args):
        if (
            self.gradient_checkpointing
            and torch.is_grad_enabled()
            and not isinstance(module, SpatialTransformer)
        ):
            return checkpoint(module, *args, use_reentrant=False, preserve_rng_state=False)
        return module(*args)  # a spatial transformer checkpoints its own transformer blocks


def _attention(
    *,
    channels: int,
    heads: int | None,
    context_dim: int | None,
    depth: int,
    groups: int,
    use_linear_projection: bool,
) -> SpatialTransformer:
    # diffusers splits the channels evenly over the heads: dim_head = channels // heads
    return SpatialTransformer(
        channels=channels,
        heads=heads,
        dim_head=channels // heads,
        context_dim=context_dim,
        depth=depth,
        norm_num_groups=groups,
        use_linear_projection=use_linear_projection,
    )


class DownBlock(_Block):
    """``num_layers`` x (ResNet [+ SpatialTransformer]), then an optional Downsample2D.

    Returns the output and every intermediate state the up path will concatenate as a skip connection.
    ``heads=None`` gives diffusers' DownBlock2D (no attention); otherwise its CrossAttnDownBlock2D.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        groups: int,
        eps: float,
        add_downsample: bool,
        heads: int | None = None,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        use_linear_projection: bool = False,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels=in_channels if i == 0 else out_channels,
                    out_channels=out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                )
                for i in range(num_layers)
            ]
        )
        if heads is not None:
            self.attentions = nn.ModuleList(
                [
                    _attention(
                        channels=out_channels,
                        heads=heads,
                        context_dim=context_dim,
                        depth=transformer_depth,
                        groups=groups,
                        use_linear_projection=use_linear_projection,
                    )
                    for _ in range(num_layers)
                ]
            )
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample2D(channels=out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self.run(resnet, x, temb)  # (B, C_out, H, W)
            if self.attentions is not None:
                x = self.run(self.attentions[i], x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C_out, H/2, W/2)
            skips.append(x)
        return x, skips


class MidBlock(_Block):
    """ResNet, then (SpatialTransformer, ResNet) when ``heads`` is set: the bottleneck
    at the lowest resolution.

    ``heads=None`` gives diffusers' UNetMidBlock2D as UNet2DConditionModel builds it
    (one ResNet, no attention); otherwise UNetMidBlock2DCrossAttn.
    """

    def __init__(
        self,
        *,
        channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
        heads: int | None = None,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        use_linear_projection: bool = False,
    ):
        super().__init__()
        n_resnets = 1 if heads is None else 2
        self.resnets = nn.ModuleList(
            [
                ResnetBlock2D(
                    in_channels=channels,
                    out_channels=channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                )
                for _ in range(n_resnets)
            ]
        )
        if heads is not None:
            self.attentions = nn.ModuleList(
                [
                    _attention(
                        channels=channels,
                        heads=heads,
                        context_dim=context_dim,
                        depth=transformer_depth,
                        groups=groups,
                        use_linear_projection=use_linear_projection,
                    )
                ]
            )
        else:
            self.attentions = None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.resnets[0](x, temb)  # (B, C, H, W) throughout; not checkpointed, as in diffusers
        if self.attentions is not None:
            x = self.run(self.attentions[0], x, context)
            x = self.run(self.resnets[1], x, temb)
        return x


class UpBlock(_Block):
    """``num_layers`` x (concat a skip, ResNet [+ SpatialTransformer]), then an optional Upsample2D.

    The skips are popped last-in first-out, so each resolution meets the down path's states of the same size.
    ``heads=None`` gives diffusers' UpBlock2D; otherwise its CrossAttnUpBlock2D.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        groups: int,
        eps: float,
        add_upsample: bool,
        heads: int | None = None,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        use_linear_projection: bool = False,
    ):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            # the last skip of a level comes from the previous (wider or equal) down level's output
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channels if i == 0 else out_channels
            resnets.append(
                ResnetBlock2D(
                    in_channels=resnet_in + skip_channels,
                    out_channels=out_channels,
                    temb_channels=temb_channels,
                    groups=groups,
                    eps=eps,
                )
            )
        self.resnets = nn.ModuleList(resnets)
        if heads is not None:
            self.attentions = nn.ModuleList(
                [
                    _attention(
                        channels=out_channels,
                        heads=heads,
                        context_dim=context_dim,
                        depth=transformer_depth,
                        groups=groups,
                        use_linear_projection=use_linear_projection,
                    )
                    for _ in range(num_layers)
                ]
            )
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(channels=out_channels)]) if add_upsample else None

    def forward(
        self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        """skips: this level's down-path states, consumed from the end of the list."""
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()
            x = torch.cat([x, skip], dim=1)  # (B, C_x, H, W) + (B, C_skip, H, W) -> (B, C_x + C_skip, H, W)
            x = self.run(resnet, x, temb)  # (B, C_out, H, W)
            if self.attentions is not None:
                x = self.run(self.attentions[i], x, context)
        if self.upsamplers is not None:
            # upsample to the next skip's size, as diffusers does for sides that are
            # not multiples of 2**levels
            x = self.upsamplers[0](
                x, size=tuple(skips[-1].shape[-2:]) if skips else None
            )  # (B, C_out, ~2H, ~2W)
        return x
