"""Checks for chapter 02's exercises: ``python -m common.grade 02`` runs them on your exercises.py."""

from __future__ import annotations

import torch
from torch import nn


def _close(ours, ref, what):
    diff = (ours - ref).abs().max().item()
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    assert diff <= tol, f"{what}: max |yours - diffusers| = {diff:.2e}, expected <= {tol:.1e}"


def check_upsample(m):
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    for channels, shape in ((16, (2, 16, 8, 8)), (8, (1, 8, 5, 7))):
        ref = Upsample2D(channels, use_conv=True).eval()
        ours = m.Upsample(channels=channels).eval()
        try:
            ours.load_state_dict(ref.state_dict(), strict=True)
        except RuntimeError as e:
            raise AssertionError(
                f"diffusers' Upsample2D({channels}) weights should load unchanged: one 3x3 "
                f"conv named conv ({channels} -> {channels}, padding 1). {e}"
            ) from None
        x = torch.randn(*shape)
        with torch.no_grad():
            out, expected = ours(x), ref(x)
        assert out.shape == expected.shape, (
            f"input {shape}: expected shape {tuple(expected.shape)}, got {tuple(out.shape)}"
        )
        _close(out, expected, f"Upsample of {shape}")


def _refuse(what):
    def forward(*args, **kwargs):
        raise AssertionError(f"decode called {what} whole; walk its blocks yourself (see the docstring)")

    return forward


def check_decode(m):
    import diffusers

    from common.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    for config, side in ((AutoencoderConfig.tiny(), (6, 5)), (AutoencoderConfig.course(), (8, 8))):
        ref = diffusers.AutoencoderKL(**config.to_diffusers()).eval()
        # random perturbations move the norms away from (1, 0), so a missing norm shows
        state = {k: v + 0.05 * torch.randn_like(v) for k, v in ref.state_dict().items()}
        ref.load_state_dict(state)
        vae = AutoencoderKL(config).eval()
        vae.load_state_dict(state)
        vae.decode = _refuse("vae.decode")  # the shortcuts raise: the exercise is the walk through the blocks
        vae.decoder.forward = _refuse("vae.decoder")
        vae.decoder.mid_block.forward = _refuse("vae.decoder.mid_block")
        for i, level in enumerate(vae.decoder.up_blocks):
            level.forward = _refuse(f"vae.decoder.up_blocks[{i}]")
        z = torch.randn(2, config.latent_channels, *side)
        with torch.no_grad():
            out = m.decode(vae, z)
            expected = ref.decode(z).sample
        assert out.shape == expected.shape, (
            f"config {config.block_out_channels}, z {tuple(z.shape)}: "
            f"expected shape {tuple(expected.shape)}, "
            f"got {tuple(out.shape)}"
        )
        _close(out, expected, f"decode at config {config.block_out_channels}")


def _measured_field(config, side):
    """The input extent the centre latent touches, by backpropagation (attention and GroupNorm off)."""
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

    configs = [
        (AutoencoderConfig.tiny(), 64),
        (AutoencoderConfig.course(), 128),
        (AutoencoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4), 256),
    ]
    for config, side in configs:
        rows, cols = _measured_field(config, side)
        got = m.receptive_field(config)
        assert got == rows == cols, (
            f"config {config.block_out_channels} x {config.layers_per_block} "
            f"ResNets: "
            f"one latent sees {rows} x {cols} input pixels (measured by "
            f"backpropagation), got {got}"
        )


def check_count_parameters(m):
    from common.autoencoder import AutoencoderConfig, AutoencoderKL

    for config in (AutoencoderConfig.tiny(), AutoencoderConfig.course()):
        vae = AutoencoderKL(config)
        want = {
            "encoder": sum(p.numel() for p in vae.encoder.parameters()),
            "decoder": sum(p.numel() for p in vae.decoder.parameters()),
        }
        got = m.count_parameters(config)
        assert got == want, f"config {config.block_out_channels}: expected {want}, got {got}"
    got = m.count_parameters(AutoencoderConfig.sd15())
    want = {"encoder": 34_163_592, "decoder": 49_490_179}  # diffusers' AutoencoderKL at SD 1.x's config
    assert got == want, f"SD 1.x VAE: expected {want}, got {got}"


CHECKS = [
    ("Upsample", check_upsample),
    ("decode", check_decode),
    ("receptive_field", check_receptive_field),
    ("count_parameters", check_count_parameters),
]
