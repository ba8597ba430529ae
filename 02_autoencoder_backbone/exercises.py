"""Chapter 02 exercises: SD's ResNet block and downsample, checked against diffusers with the same weights;
the encoder's receptive field; the VAE's parameter count from its configuration alone.

Fill in each one, then grade your file:

    python -m common.grade 02
"""

from __future__ import annotations

import torch
from torch import nn


# ---------------------------------------------------------------------------- 1. the ResNet block
class ResnetBlock(nn.Module):
    """SD's VAE ResNet block: out = skip(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))).

    Build, with exactly these attribute names (diffusers' ResnetBlock2D's, so its state dict loads here):
      norm1: GroupNorm(groups, in_channels, eps=1e-6)     conv1: 3x3 conv in_channels -> out_channels, padding 1
      norm2: GroupNorm(groups, out_channels, eps=1e-6)    conv2: 3x3 conv out_channels -> out_channels, padding 1
      conv_shortcut: a 1x1 conv in_channels -> out_channels when they differ, else None (skip = x)
    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W). The check loads diffusers' weights with
    ``load_state_dict(strict=True)`` and compares outputs (max abs diff <= 1e-4).
    """

    def __init__(self, *, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------- 2. the downsample
def downsample(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """SD's Downsample: (B, C, H, W) -> (B, C, H/2, W/2) with a stride-2 3x3 ``conv`` that has padding 0.

    Pad first, but only one pixel on the right and one at the bottom (``F.pad`` takes
    (left, right, top, bottom)), so the conv over H + 1 rows gives exactly H/2. This asymmetric pad is one of
    the details a re-implementation must copy to load SD's weights and get SD's numbers.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 3. the receptive field
def receptive_field(config) -> int:
    """How many input pixels (per side) one latent position sees through the encoder's convolutions.

    ``config`` is a ``common.autoencoder.AutoencoderConfig``. Ignore the mid-block attention and the
    GroupNorm statistics: both see every position. Track r (the field) and j (the jump: the input-pixel
    distance between neighbouring feature positions), starting from r = 1, j = 1: a k x k conv adds
    (k - 1) * j to r; a stride-2 conv afterwards doubles j. The encoder is: conv_in (3x3); for each level,
    ``layers_per_block`` ResNet blocks (two 3x3 convs each) and, at every level but the last, a Downsample
    (a stride-2 3x3 conv); the mid block's two ResNet blocks; conv_out (3x3). 1x1 convs add nothing.
    The check measures the field by backpropagation through real encoders and compares.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 4. parameters from the config
def count_parameters(config) -> dict:
    """The parameter counts of ``AutoencoderKL(config).encoder`` and ``.decoder``, without building them.

    Returns {"encoder": int, "decoder": int}. Building blocks: a k x k conv from a to b channels has
    a*b*k*k + b parameters; GroupNorm(c) has 2c; Linear(c, c) has c*c + c. A ResNet block a -> b is
    norm1(a), conv1 (a -> b), norm2(b), conv2 (b -> b) and, if a != b, a 1x1 shortcut. The mid block is two
    ResNet blocks (c -> c) and an attention (a GroupNorm and four Linear(c, c): q, k, v, out).
    Encoder: conv_in (in_channels -> widths[0]); per level i, layers_per_block ResNets (the first from
    widths[i-1], widths[0] at level 0) and a Downsample conv (w -> w, 3x3) but at the last level; the mid
    block; norm_out; conv_out (widths[-1] -> 2 * latent_channels). Decoder: the mirror image, with
    conv_in (latent_channels -> widths[-1]), the mid block first, ``layers_per_block + 1`` ResNets per level,
    Upsample convs (w -> w, 3x3) instead, then norm_out and conv_out (-> out_channels).
    At SD 1.x's config the answer is 34,163,592 and 49,490,179.
    """
    raise NotImplementedError
