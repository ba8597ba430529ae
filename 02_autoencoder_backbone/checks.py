"""Checks for chapter 02's exercises: ``python -m common.grade 02`` runs them on your exercises.py."""

from __future__ import annotations

import torch
from torch import nn


def _close(ours, ref, what):
    diff = (ours - ref).abs().max().item()
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    assert diff <= tol, f"{what}: max |yours - diffusers| = {diff:.2e}, expected <= {tol:.1e}"


def check_resnet_block(m):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    for c_in, c_out in ((32, 64), (64, 64)):
        ref = ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=None, groups=16, eps=1e-6).eval()
        for p in ref.parameters():  # GroupNorm starts at (1, 0): randomise it so a missing norm shows
            nn.init.normal_(p, 0.0, 0.1) if p.ndim == 1 else None
        ours = m.ResnetBlock(in_channels=c_in, out_channels=c_out, groups=16).eval()
        try:
            ours.load_state_dict(ref.state_dict(), strict=True)
        except RuntimeError as e:
            raise AssertionError(f"the state dict should load from diffusers' ResnetBlock2D ({c_in}->{c_out}) "
                                 f"unchanged: names norm1, conv1, norm2, conv2, conv_shortcut. {e}") from None
        x = torch.randn(2, c_in, 8, 12)
        with torch.no_grad():
            _close(ours(x), ref(x, None), f"ResnetBlock {c_in}->{c_out}")


def check_downsample(m):
    from diffusers.models.downsampling import Downsample2D

    torch.manual_seed(0)
    ref = Downsample2D(16, use_conv=True, padding=0, name="op").eval()
    for shape in ((2, 16, 8, 8), (1, 16, 6, 10)):
        x = torch.randn(*shape)
        with torch.no_grad():
            out = m.downsample(x, ref.conv)
            expected = ref(x)
        assert out.shape == expected.shape, f"input {shape}: expected shape {tuple(expected.shape)}, got {tuple(out.shape)}"
        _close(out, expected, f"downsample of {shape}")


def _measured_field(config, side):
    """Backpropagate from the centre latent through the encoder (attention and GroupNorm off): the input extent it touches."""
    from common.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(config)
    vae.encoder.mid_block.attentions[0] = nn.Identity()  # attention sees everything: measure the convolutions
    for name, module in list(vae.encoder.named_modules()):  # so do GroupNorm's statistics (over all of H x W)
        if isinstance(module, nn.GroupNorm):
            parent = vae.encoder.get_submodule(name.rsplit(".", 1)[0]) if "." in name else vae.encoder
            setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    x = torch.randn(1, config.in_channels, side, side, requires_grad=True)
    moments = vae.encoder(x)
    h, w = moments.shape[-2:]
    moments[0, :, h // 2, w // 2].sum().backward()
    touched = x.grad[0].abs().sum(0) > 0
    rows, cols = touched.any(1).nonzero(), touched.any(0).nonzero()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def check_receptive_field(m):
    from common.autoencoder import AutoencoderConfig

    configs = [(AutoencoderConfig.tiny(), 64), (AutoencoderConfig.course(), 128),
               (AutoencoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4), 256)]
    for config, side in configs:
        rows, cols = _measured_field(config, side)
        got = m.receptive_field(config)
        assert got == rows == cols, (f"config {config.block_out_channels} x {config.layers_per_block} ResNets: "
                                     f"one latent sees {rows} x {cols} input pixels (measured by backpropagation), got {got}")


def check_count_parameters(m):
    from common.autoencoder import AutoencoderConfig, AutoencoderKL

    for config in (AutoencoderConfig.tiny(), AutoencoderConfig.course()):
        vae = AutoencoderKL(config)
        want = {"encoder": sum(p.numel() for p in vae.encoder.parameters()),
                "decoder": sum(p.numel() for p in vae.decoder.parameters())}
        got = m.count_parameters(config)
        assert got == want, f"config {config.block_out_channels}: expected {want}, got {got}"
    got = m.count_parameters(AutoencoderConfig.sd15())
    want = {"encoder": 34_163_592, "decoder": 49_490_179}  # diffusers' AutoencoderKL at SD 1.x's config
    assert got == want, f"SD 1.x VAE: expected {want}, got {got}"


CHECKS = [
    ("downsample", check_downsample),
    ("ResnetBlock", check_resnet_block),
    ("receptive_field", check_receptive_field),
    ("count_parameters", check_count_parameters),
]
