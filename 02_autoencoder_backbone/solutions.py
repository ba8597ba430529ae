"""Chapter 02 reference solutions: SD's ResNet block and asymmetric-pad downsample, the encoder's receptive
field, and the parameter count of the VAE from its configuration alone.

    python 02_autoencoder_backbone/solutions.py        # prints each answer at the SD 1.x config
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------- 1. the ResNet block
class ResnetBlock(nn.Module):
    """x + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), a 1x1 ``conv_shortcut`` on the skip when the width changes.

    Parameter names are diffusers' ResnetBlock2D's (norm1, conv1, norm2, conv2, conv_shortcut), so its
    state dict loads here unchanged. GroupNorm eps is 1e-6, as in SD.
    """

    def __init__(self, *, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


# ---------------------------------------------------------------------------- 2. the downsample
def downsample(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """SD's Downsample: pad one pixel on the right and bottom only, then the stride-2 3x3 ``conv`` (padding 0).

    (B, C, H, W) -> (B, C, H/2, W/2). The pad is asymmetric because a stride-2 3x3 conv over H + 1 rows gives H/2.
    """
    return conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H+1, W+1) -> (B, C, H/2, W/2)


# ---------------------------------------------------------------------------- 3. the receptive field
def receptive_field(config) -> int:
    """The side, in input pixels, that one latent sees through the encoder's convolutions.

    Ignores the mid-block attention and GroupNorm's statistics (both see every position): the convolutions' field. Walk the layers with r (field) and j (jump,
    the input-pixel distance between neighbouring positions): a k x k conv adds (k - 1) * j to r; a stride-2
    conv then doubles j. conv_in; per level, layers_per_block ResNets of two 3x3 convs, then a Downsample
    (but at the last level); the mid block's two ResNets; conv_out (quant_conv is 1x1 and adds nothing).
    """
    r, j = 1, 1
    r += 2 * j  # conv_in
    levels = len(config.block_out_channels)
    for level in range(levels):
        r += config.layers_per_block * 2 * 2 * j  # two 3x3 convs per ResNet
        if level < levels - 1:
            r += 2 * j  # the stride-2 3x3 conv
            j *= 2
    r += 2 * 2 * 2 * j  # the mid block's two ResNets
    r += 2 * j  # conv_out
    return r


# ---------------------------------------------------------------------------- 4. parameters from the config
def count_parameters(config) -> dict:
    """The parameters of AutoencoderKL's encoder and decoder (``vae.encoder``, ``vae.decoder``), from the config.

    conv k x k from a to b: a*b*k*k + b; GroupNorm(c): 2c; Linear(c, c): c*c + c.
    """
    def conv(a, b, k=3):
        return a * b * k * k + b

    def norm(c):
        return 2 * c

    def resnet(a, b):
        return norm(a) + conv(a, b) + norm(b) + conv(b, b) + (conv(a, b, 1) if a != b else 0)

    def mid(c):
        return 2 * resnet(c, c) + norm(c) + 4 * (c * c + c)  # group_norm, to_q, to_k, to_v, to_out

    widths, n, lat = config.block_out_channels, config.layers_per_block, config.latent_channels
    enc = conv(config.in_channels, widths[0])
    for i, w in enumerate(widths):
        prev = widths[max(i - 1, 0)]
        enc += sum(resnet(prev if k == 0 else w, w) for k in range(n))
        if i < len(widths) - 1:
            enc += conv(w, w)
    enc += mid(widths[-1]) + norm(widths[-1]) + conv(widths[-1], 2 * lat)

    rev = tuple(reversed(widths))
    dec = conv(lat, rev[0]) + mid(rev[0])
    for i, w in enumerate(rev):
        prev = rev[max(i - 1, 0)]
        dec += sum(resnet(prev if k == 0 else w, w) for k in range(n + 1))
        if i < len(rev) - 1:
            dec += conv(w, w)
    dec += norm(rev[-1]) + conv(rev[-1], config.out_channels)
    return {"encoder": enc, "decoder": dec}


if __name__ == "__main__":
    from common.autoencoder import AutoencoderConfig

    sd = AutoencoderConfig.sd15()
    for name, cfg in (("SD 1.x", sd), ("course", AutoencoderConfig.course())):
        print(f"{name}: receptive field {receptive_field(cfg)} px, parameters {count_parameters(cfg)}")
    block = ResnetBlock(in_channels=64, out_channels=128, groups=32)
    x = torch.randn(1, 64, 16, 16)
    print("ResnetBlock", tuple(x.shape), "->", tuple(block(x).shape))
    print("downsample", tuple(x.shape), "->", tuple(downsample(x, nn.Conv2d(64, 64, 3, stride=2)).shape))
