"""Checks for chapter 01's exercises: ``python -m common.grade 01`` runs them on your exercises.py."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "vae_shapes"


def _vae_and_images(n: int = 8):
    """The shipped Shapes VAE (a random tiny one if it is missing) and n held-out Shapes images."""
    from common.autoencoder import AutoencoderConfig, AutoencoderKL
    from common.data import Shapes

    torch.manual_seed(0)
    if (SHIPPED / "config.json").exists():
        vae, res = AutoencoderKL.load(SHIPPED).eval(), 64
    else:
        vae, res = AutoencoderKL(AutoencoderConfig.tiny()).eval(), 32
    ds = Shapes(res, "test", n, seed=1, multiple_of=4)
    return vae, torch.stack([ds[i]["image"] for i in range(n)])


def _psnr(a, b):
    return float((10 * torch.log10(4.0 / (a - b).pow(2).flatten(1).mean(1))).mean())


def check_reparameterised_sample(m):
    from common.autoencoder import DiagonalGaussian

    g = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 8, 3, 3, generator=g)  # (B, 2C, h, w): mu, then log sigma^2
    moments[:, 4:] -= 1.0
    z = m.reparameterised_sample(moments, torch.Generator().manual_seed(1))
    ref = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(1))
    assert torch.is_tensor(z) and z.shape == ref.shape, (
        f"expected z of shape {tuple(ref.shape)}, got {getattr(z, 'shape', z)}"
    )
    assert torch.allclose(z, ref, atol=1e-5), (
        "z should be mu + sigma * eps with eps = torch.randn(mu.shape, generator=generator) "
        "(as DiagonalGaussian.sample)"
    )
    leaf = moments.clone().requires_grad_(True)
    z = m.reparameterised_sample(leaf, torch.Generator().manual_seed(1))
    assert z.requires_grad, (
        "no gradient reaches the moments: build z from mu and sigma, not with a .sample() "
        "that draws outside autograd"
    )
    z.sum().backward()
    mu, logvar = moments.chunk(2, dim=1)
    eps = (ref - mu) / torch.exp(0.5 * logvar)
    assert torch.allclose(leaf.grad[:, :4], torch.ones_like(mu)), "d z / d mu should be 1 everywhere"
    expected = 0.5 * torch.exp(0.5 * logvar) * eps  # d z / d logvar = sigma * eps / 2
    assert torch.allclose(leaf.grad[:, 4:], expected, atol=1e-5), (
        "d z / d log sigma^2 should be sigma * eps / 2: sigma = exp(logvar / 2), z = mu + sigma * eps"
    )


def check_gaussian_kl(m):
    from torch.distributions import Independent, Normal, kl_divergence

    from common.autoencoder import DiagonalGaussian

    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    logvar_q, logvar_p = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    kl = m.gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)
    q = Independent(Normal(mu_q, torch.exp(0.5 * logvar_q)), 3)
    p = Independent(Normal(mu_p, torch.exp(0.5 * logvar_p)), 3)
    ref = kl_divergence(q, p)  # (B,)
    assert torch.is_tensor(kl) and kl.shape == (3,), (
        f"expected one KL per sample, shape (3,), got {getattr(kl, 'shape', kl)}"
    )
    assert torch.allclose(kl, ref, rtol=1e-4, atol=1e-4), (
        f"expected {ref.tolist()} (torch.distributions), got {kl.tolist()}"
    )
    zeros = torch.zeros_like(mu_q)
    kl0 = m.gaussian_kl(mu_q, logvar_q, zeros, zeros)
    ref0 = DiagonalGaussian(torch.cat([mu_q, logvar_q], dim=1)).kl()
    assert torch.allclose(kl0, ref0, rtol=1e-4, atol=1e-4), (
        f"against N(0, I) the KL should match posterior.kl() = {ref0.tolist()}, got {kl0.tolist()}"
    )
    same = m.gaussian_kl(mu_q, logvar_q, mu_q, logvar_q)
    assert torch.allclose(same, torch.zeros(3), atol=1e-5), "KL(q || q) should be 0"


def check_compare_with_downsampling(m):
    vae, x = _vae_and_images()
    out = m.compare_with_downsampling(vae, x)
    for key in ("vae_psnr", "bicubic_psnr", "latent_numbers", "bicubic_side", "bicubic_numbers"):
        assert key in out, f"the result should hold {key!r}; got keys {sorted(out)}"
    with torch.no_grad():
        z = vae.encode(x).mode()
        ref_vae = _psnr(vae.decode(z).clamp(-1, 1), x)
    n = z[0].numel()
    assert out["latent_numbers"] == n, f"latent_numbers should be c*h*w = {n}, got {out['latent_numbers']}"
    side = out["bicubic_side"]
    assert 3 * side**2 <= n < 3 * (side + 1) ** 2, (
        f"bicubic_side should be the largest s with 3 s^2 <= {n} (got {side}, "
        f"expected {int(math.sqrt(n / 3))})"
    )
    assert out["bicubic_numbers"] == 3 * side**2, "bicubic_numbers should be 3 * side^2"
    assert abs(out["vae_psnr"] - ref_vae) < 0.05, (
        f"vae_psnr should be {ref_vae:.2f} dB, got {out['vae_psnr']:.2f}"
    )
    small = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    ref_bic = _psnr(
        F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1), x
    )
    assert abs(out["bicubic_psnr"] - ref_bic) < 0.5, (
        f"bicubic_psnr should be about {ref_bic:.2f} dB (antialiased bicubic down, bicubic up), "
        f"got {out['bicubic_psnr']:.2f}"
    )


def check_channel_ablation(m):
    vae, x = _vae_and_images(4)
    errors = m.channel_ablation(vae, x)
    C = vae.config.latent_channels
    assert torch.is_tensor(errors) and errors.shape == (C,), (
        f"expected a tensor of shape ({C},), got {getattr(errors, 'shape', errors)}"
    )
    with torch.no_grad():
        z = vae.encode(x).mode()
        full = (vae.decode(z).clamp(-1, 1) - x).pow(2).mean()
        for c in (0, C - 1):
            z_c = z.clone()
            z_c[:, c] = 0
            ref = (vae.decode(z_c).clamp(-1, 1) - x).pow(2).mean()
            assert torch.allclose(errors[c].float(), ref, rtol=1e-3, atol=1e-5), (
                f"channel {c}: expected MSE {ref:.5f} (posterior mean, channel zeroed, decoded, "
                f"clamped), got {errors[c]:.5f}"
            )
    assert (errors >= 0).all() and float(full) >= 0


def check_scaling_factor(m):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, 16, 16, generator=g) * 5.0 + 1.0
    value = m.scaling_factor(z)
    assert abs(float(value) - 1 / float(z.std())) < 1e-4, (
        f"expected 1 / std = {1 / float(z.std()):.5f}, got {value}"
    )
    assert abs(float(z.std() * value) - 1.0) < 1e-4, "z * scaling_factor should have unit std"


def check_kl_weight_sweep(m):
    results = m.kl_weight_sweep([0.0, 1.0], steps=6, batch_size=4)
    assert isinstance(results, list) and len(results) == 2, "expected one dict per KL weight"
    for r in results:
        for key in ("kl_weight", "rec", "kl", "latent_mean", "latent_std"):
            assert key in r, f"each result should hold {key!r}"
            assert math.isfinite(float(r[key])), f"{key} is not finite: {r[key]}"
        assert 0 <= r["rec"] < 2, f"rec (mean L1 in [-1, 1]) should be in [0, 2), got {r['rec']}"
        assert r["kl"] >= 0 and r["latent_std"] >= 0, "KL and std are non-negative"
    assert results[1]["kl"] < results[0]["kl"], (
        f"a larger KL weight should give a smaller KL: got {results[0]['kl']:.1f} at 0 and "
        f"{results[1]['kl']:.1f} at 1.0"
    )


CHECKS = [
    ("reparameterised_sample", check_reparameterised_sample),
    ("gaussian_kl", check_gaussian_kl),
    ("scaling_factor", check_scaling_factor),
    ("compare_with_downsampling", check_compare_with_downsampling),
    ("channel_ablation", check_channel_ablation),
    ("kl_weight_sweep", check_kl_weight_sweep),
]
