"""Chapter 01 exercises: the reparameterised sample, the KL between two diagonal Gaussians, the autoencoder
against plain downsampling, what each latent channel encodes, the latent scaling
factor, and a KL-weight sweep.

Fill in each function, then grade your file:

    python -m common.grade 01

Images are float tensors (B, 3, H, W) in [-1, 1]; ``vae`` is a ``common.autoencoder.AutoencoderKL``
(the checks use the shipped Shapes VAE, ``AutoencoderKL.load("checkpoints/vae_shapes")``).
"""

from __future__ import annotations

import torch


# ---------------------------------------------------------------------------- 0a. the reparameterised sample
def reparameterised_sample(moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw z ~ q(z|x) = N(mu, diag sigma^2) so that gradients reach mu and sigma (section 4 of the notebook).

    ``moments`` (B, 2C, h, w) is what the encoder outputs: the first C channels are mu, the last C are
    log sigma^2. Clamp the log-variance to [-30, 20] (as SD does), draw eps ~ N(0, I) of mu's shape with
    ``torch.randn(..., generator=generator)``, and return z (B, C, h, w).
    The check compares z with ``common.autoencoder.DiagonalGaussian(moments).sample(generator)`` for the same
    generator, and runs autograd through it: d z / d mu must be 1, d z / d log sigma^2
    must be sigma * eps / 2.
    """
    raise NotImplementedError


# -------------------------------------------------------------------------- 0b. KL between diagonal Gaussians
def gaussian_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(q || p) for q = N(mu_q, diag exp(logvar_q)) and p = N(mu_p, diag exp(logvar_p)); shape (B,).

    The notebook derives the case p = N(0, I). Derive the general one the same way, one dimension at a time
    (E_q[log q(z) - log p(z)], with E_q[(z - mu_p)^2] = var_q + (mu_q - mu_p)^2), then sum over every dim but
    the batch dim. The check compares it with ``torch.distributions.kl_divergence`` and, at p = N(0, I), with
    the VAE's own ``posterior.kl()``.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 1. VAE against down/upsampling
def compare_with_downsampling(vae, x: torch.Tensor) -> dict:
    """Is a learned autoencoder better than plain resizing that keeps the same number of numbers?

    1. Encode x and take the posterior mean ``z = vae.encode(x).mode()`` (B, c, h, w); decode it and clamp
       to [-1, 1]. ``latent_numbers`` = c * h * w (the numbers one image is squeezed into).
    2. Pick the largest ``side`` with 3 * side**2 <= latent_numbers, shrink x to side x side with
       ``F.interpolate(x, size=(side, side), mode="bicubic", antialias=True)``, grow it back to H x W with
       bicubic interpolation, and clamp.
    3. PSNR of each against x, in dB, for the [-1, 1] range: 10 * log10(2**2 / MSE), MSE per image, then
       averaged over the batch.

    Returns {"vae_psnr": float, "bicubic_psnr": float, "latent_numbers": int, "bicubic_side": int,
             "bicubic_numbers": int (3 * side**2)}.
    Hint: wrap it in ``torch.no_grad()``. On Shapes the VAE should win by several dB; where does bicubic lose?
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 2. what each channel encodes
def channel_ablation(vae, x: torch.Tensor) -> torch.Tensor:
    """Zero one latent channel at a time and measure how much the reconstruction suffers.

    Encode x to the posterior mean z (B, C, h, w). For each channel c: copy z, set channel c to zero,
    decode, clamp to [-1, 1] and take the mean squared error against x (over everything).
    Returns a tensor of shape (C,): the MSE with channel c zeroed.
    Hint: show the decoded images too (``common.viz.side_by_side``): a channel that carries colour looks
    different when removed from one that carries edges or position.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 3. the scaling factor
def scaling_factor(latents: torch.Tensor) -> float:
    """The latent scaling factor of the LDM paper: 1 / std of the latents (B, C, h, w), over every element.

    Multiplying the latents by it gives them unit variance, which the diffusion model's noise schedule
    assumes (SD 1.x's VAE gives 0.18215). Returns a Python float.
    """
    raise NotImplementedError


# -------------------------------------------------------------------------- 4. a KL-weight sweep (open-ended)
def kl_weight_sweep(
    kl_weights: list[float], *, steps: int = 30, batch_size: int = 8, resolution: int = 32, seed: int = 0
) -> list[dict]:
    """How does the KL weight shape the latent space? Train one tiny VAE per weight and measure.

    For each weight w: seed torch with ``seed``; build ``AutoencoderKL(AutoencoderConfig.tiny())``
    (f = 2); train it for ``steps`` Adam steps (lr 2e-3) on ``batch_size`` images of
    ``common.data.Shapes(resolution, "train", ...)`` per step with the loss
    ``reconstruction_loss(x, x_hat) + w * kl_loss(posterior)`` (both in common.losses; ``vae(x)`` returns
    (x_hat, posterior) through a sampled latent). Then encode a few held-out images
    (``Shapes(resolution, "test", ...)``) and report the posterior's statistics.

    Returns one dict per weight: {"kl_weight", "rec" (the last training L1), "kl" (kl_loss on the held-out
    batch), "latent_mean", "latent_std" (mean and std of the posterior means)}.
    The check trains two weights (0 and 1.0) for a few steps and expects the larger weight to give a smaller
    KL. Open question: with more steps, what happens to ``rec`` as w grows, and why does SD use w = 1e-6?
    """
    raise NotImplementedError
