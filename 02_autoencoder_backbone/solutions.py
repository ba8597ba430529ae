"""Chapter 02 reference solutions: the decoder's upsample, the decoder's forward pass walked block by block,
the encoder's receptive field, and the parameter count of the VAE from its configuration alone.

    python 02_autoencoder_backbone/solutions.py        # prints each answer at the SD 1.x config
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------- 1. the decoder's upsample
class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W). ``conv`` is diffusers' name.

    Nearest-neighbour copies give every output pixel the same number of contributions, so a constant input
    stays constant (a stride-2 transposed conv would print a checkerboard on it).
    """

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W), each pixel copied 2 x 2
        return self.conv(x)


# ---------------------------------------------------------------------------- 2. the decoder's forward pass
def decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The decoder walked block by block: post_quant_conv, conv_in, mid block, levels, head."""
    decoder = vae.decoder
    z = vae.post_quant_conv(z)  # (B, 4, h, w): a per-position linear map of the latent
    h = decoder.conv_in(z)  # (B, C_widest, h, w)
    mid = decoder.mid_block
    h = mid.resnets[0](h)
    h = mid.attentions[0](h)  # every position looks at every other one
    h = mid.resnets[1](h)
    for level in decoder.up_blocks:
        for resnet in level.resnets:
            h = resnet(h)  # (B, C_level, H_level, W_level)
        upsamplers = getattr(level, "upsamplers", None)
        if upsamplers is not None:
            h = upsamplers[0](h)  # doubles H and W
    h = F.silu(decoder.conv_norm_out(h))
    return decoder.conv_out(h)  # (B, 3, h * f, w * f)


# ---------------------------------------------------------------------------- 3. the receptive field
def receptive_field(config) -> int:
    """The side, in input pixels, that one latent sees through the encoder's convolutions.

    Ignores the mid-block attention and GroupNorm's statistics (both see every position): the convolutions'
    field. Walk the layers with r (field) and j (jump, the input-pixel distance between neighbouring
    positions): a k x k conv adds (k - 1) * j to r; a stride-2 conv then doubles j. conv_in; per level,
    layers_per_block ResNets of two 3x3 convs, then a Downsample (but at the last level); the mid block's two
    ResNets; conv_out (quant_conv is 1x1 and adds nothing).
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
    """The parameter counts of ``vae.encoder`` and ``vae.decoder``, from the config alone.

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
    from common.autoencoder import AutoencoderConfig, AutoencoderKL

    sd = AutoencoderConfig.sd15()
    for name, cfg in (("SD 1.x", sd), ("course", AutoencoderConfig.course())):
        print(f"{name}: receptive field {receptive_field(cfg)} px, parameters {count_parameters(cfg)}")
    up = Upsample(channels=64)
    x = torch.randn(1, 64, 16, 16)
    print("Upsample", tuple(x.shape), "->", tuple(up(x).shape))
    vae = AutoencoderKL(AutoencoderConfig.course()).eval()
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        image = decode(vae, z)
        gap = (image - vae.decode(z)).abs().max().item()
    print(f"decode {tuple(z.shape)} -> {tuple(image.shape)}; max |decode - AutoencoderKL.decode| = {gap:.1e}")
