"""Chapter 01 reference solutions: the reparameterised sample, the KL between diagonal Gaussians, the
autoencoder against plain downsampling, what each latent channel encodes, the latent scaling factor, and how
the KL weight shapes the latents.

    python 01_latent_space_learning/solutions.py        # prints each answer on the shipped Shapes VAE
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- 0a. the reparameterised sample
def reparameterised_sample(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ q(z|x) = N(mu, diag sigma^2) from the encoder's moments (B, 2C, h, w), differentiably.

    The first C channels are mu, the last C are log sigma^2 (clamped to [-30, 20] as SD does). Draw
    eps ~ N(0, I) with ``generator`` and return z = mu + sigma * eps (B, C, h, w): eps carries the randomness,
    so dz/dmu = 1 and dz/dsigma = eps are ordinary derivatives and gradients reach the encoder.
    """
    mu, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
    sigma = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # sigma = sqrt(exp(log sigma^2))
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + sigma * eps


# -------------------------------------------------------------------------- 0b. KL between diagonal Gaussians
def gaussian_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, diag var_q) || N(mu_p, diag var_p)), summed over every dim but the first: shape (B,).

    Per dimension, E_q[log q - log p] = 0.5 * (log var_p - log var_q + (var_q + (mu_q - mu_p)^2) / var_p - 1);
    the dimensions are independent, so the log-densities, and the KL, add up.
    """
    var_q, var_p = logvar_q.exp(), logvar_p.exp()
    per_dim = 0.5 * (logvar_p - logvar_q + (var_q + (mu_q - mu_p).pow(2)) / var_p - 1.0)
    return per_dim.flatten(1).sum(dim=1)


# ---------------------------------------------------------------------------- 1. VAE against down/upsampling
def bicubic_down_up(x: torch.Tensor, side: int) -> torch.Tensor:
    """Shrink images (B, C, H, W) to (B, C, side, side) with antialiased bicubic, then
    grow them back to H x W."""
    H, W = x.shape[-2:]
    small = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(H, W), mode="bicubic", align_corners=False).clamp(-1, 1)


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2): 10 log10(2^2 / MSE), averaged over the batch."""
    mse = (x_hat - x).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse)).mean())


@torch.no_grad()
def compare_with_downsampling(vae, x: torch.Tensor) -> dict:
    """Reconstruct x through the VAE (posterior mean) and through bicubic down/up with
    at most as many numbers.

    Returns {"vae_psnr", "bicubic_psnr", "latent_numbers", "bicubic_side", "bicubic_numbers"}.
    """
    z = vae.encode(x).mode()  # (B, c, H/f, W/f)
    x_vae = vae.decode(z).clamp(-1, 1)
    numbers = z[0].numel()
    side = int(math.floor(math.sqrt(numbers / x.shape[1])))  # 3 * side^2 <= c * h * w
    x_bic = bicubic_down_up(x, side)
    return {
        "vae_psnr": psnr(x_vae, x),
        "bicubic_psnr": psnr(x_bic, x),
        "latent_numbers": numbers,
        "bicubic_side": side,
        "bicubic_numbers": x.shape[1] * side * side,
    }


# ---------------------------------------------------------------------------- 2. what each channel encodes
@torch.no_grad()
def channel_ablation(vae, x: torch.Tensor) -> torch.Tensor:
    """Zero one latent channel at a time (of the posterior mean) and decode: returns the MSE per channel (C,).

    A large error means the channel carries much of the picture; compare with the full reconstruction's error.
    """
    z = vae.encode(x).mode()  # (B, C, h, w)
    errors = []
    for c in range(z.shape[1]):
        z_c = z.clone()
        z_c[:, c] = 0.0
        errors.append((vae.decode(z_c).clamp(-1, 1) - x).pow(2).mean())
    return torch.stack(errors)  # (C,)


# ---------------------------------------------------------------------------- 3. the scaling factor
def scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of a batch of latents (B, C, h, w), over every element: the LDM paper's recipe."""
    return 1.0 / float(latents.float().std())


# ---------------------------------------------------------------------------- 4. a KL-weight sweep
def kl_weight_sweep(
    kl_weights: list[float], *, steps: int = 30, batch_size: int = 8, resolution: int = 32, seed: int = 0
) -> list[dict]:
    """Train a tiny VAE (f = 2) on Shapes for ``steps`` at each KL weight; report the latents' statistics.

    Returns one dict per weight: {"kl_weight", "rec" (final L1), "kl" (per-sample KL of a held-out batch),
    "latent_mean", "latent_std" (of the posterior means over the batch and all dims)}.
    """
    from common.autoencoder import AutoencoderConfig, AutoencoderKL
    from common.data import Shapes
    from common.losses import kl_loss, reconstruction_loss

    train = Shapes(resolution, "train", steps * batch_size, seed=seed)
    test = torch.stack([Shapes(resolution, "test", 8, seed=seed + 1)[i]["image"] for i in range(8)])
    results = []
    for w in kl_weights:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        vae = AutoencoderKL(AutoencoderConfig.tiny())
        opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
        for step in range(steps):
            x = torch.stack(
                [train[step * batch_size + i]["image"] for i in range(batch_size)]
            )  # (B, 3, H, W)
            x_hat, posterior = vae(x, generator=g)
            rec = reconstruction_loss(x, x_hat)
            loss = rec + w * kl_loss(posterior)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            posterior = vae.encode(test)
            results.append(
                {
                    "kl_weight": w,
                    "rec": float(rec),
                    "kl": float(kl_loss(posterior)),
                    "latent_mean": float(posterior.mean.mean()),
                    "latent_std": float(posterior.mean.std()),
                }
            )
    return results


if __name__ == "__main__":
    from pathlib import Path

    from common.autoencoder import AutoencoderKL
    from common.data import Shapes
    from common.runtime import budget

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "vae_shapes"
    vae = AutoencoderKL.load(ckpt).eval()
    ds = Shapes(64, "test", 16, seed=1, multiple_of=4)
    x = torch.stack([ds[i]["image"] for i in range(16)])
    with torch.no_grad():
        moments = torch.cat([vae.encode(x).mean, vae.encode(x).logvar], dim=1)  # (B, 2C, h, w)
    moments.requires_grad_(True)
    reparameterised_sample(moments, torch.Generator().manual_seed(0)).sum().backward()
    print(
        f"0a. d(sum z)/d mu = {float(moments.grad[:, :4].mean()):.3f} (1 everywhere), "
        f"d/d logvar nonzero: {bool(moments.grad[:, 4:].abs().sum() > 0)}"
    )
    posterior = vae.encode(x)
    zeros = torch.zeros_like(posterior.mean)
    print(
        "0b. KL(q(z|x) || N(0, I)) per image: "
        f"{gaussian_kl(posterior.mean, posterior.logvar, zeros, zeros)[:4]}"
    )
    print("1. VAE vs bicubic:", compare_with_downsampling(vae, x))
    print("2. MSE with one latent channel zeroed:", [round(v, 4) for v in channel_ablation(vae, x).tolist()])
    with torch.no_grad():
        z = vae.encode(x).sample(torch.Generator().manual_seed(0))
    print(
        f"3. scaling factor measured on 16 images: {scaling_factor(z):.4f} (shipped: "
        f"{vae.config.scaling_factor})"
    )
    for r in kl_weight_sweep([0.0, 1e-3, 1e-1], steps=budget(fast=10, cpu=60)):
        print("4.", {k: round(v, 5) for k, v in r.items()})
