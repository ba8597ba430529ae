"""Chapter 02 exercises: the decoder's upsample, the decoder's forward pass walked block by block with loaded
weights, the encoder's receptive field, and the VAE's parameter count from its configuration alone.

Fill in each one, then grade your file:

    python -m common.grade 02

The notebook calls your ``Upsample``, ``decode`` and ``receptive_field`` once they are solved (until then it
uses the reference in ``solutions.py``).
"""

from __future__ import annotations

import torch
from torch import nn


# ---------------------------------------------------------------------------- 1. the decoder's upsample
class Upsample(nn.Module):
    """SD's decoder upsample: (B, C, H, W) -> (B, C, 2H, 2W).

    Nearest-neighbour upsampling by 2 (``F.interpolate(..., scale_factor=2.0, mode="nearest")``), then a 3x3
    convolution with padding 1 that keeps the C channels. Name the convolution ``conv`` (diffusers'
    ``Upsample2D`` name), so diffusers' weights load here with ``load_state_dict(strict=True)``.
    The check loads ``Upsample2D(C, use_conv=True)``'s weights and compares outputs (max abs diff <= 1e-4).
    """

    def __init__(self, *, channels: int):
        super().__init__()
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------- 2. the decoder's forward pass
def decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """z (B, latent_channels, h, w) -> image (B, out_channels, h * f, w * f), walking the blocks yourself.

    ``vae`` has diffusers' AutoencoderKL names (``common.autoencoder.AutoencoderKL``, or the notebook's VAE):
      vae.post_quant_conv                           1x1 conv, latent_channels -> latent_channels
      vae.decoder.conv_in                           3x3 conv, latent_channels -> widest
      vae.decoder.mid_block.resnets[0], .attentions[0], .resnets[1]     in that order
      vae.decoder.up_blocks[i].resnets[j]           every ResNet block of level i, in order
      vae.decoder.up_blocks[i].upsamplers[0]        after level i's ResNets, at every level that has one
      vae.decoder.conv_norm_out, SiLU, vae.decoder.conv_out
    Call these leaf blocks: the check makes ``vae.decode``, ``vae.decoder``, ``mid_block`` and each level
    raise when called whole. It loads random weights into the course's AutoencoderKL and compares your image
    with diffusers' ``AutoencoderKL.decode`` holding the same weights (max abs diff <= 1e-4).
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
