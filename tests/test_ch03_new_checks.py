"""Chapter 03's checks for the DDPM step, the timestep embedding and the DPM-Solver++ step reject near misses:
each wrong variant below (one plausible mistake) fails its check, while the reference solution passes."""

import types
from pathlib import Path

import pytest
import torch

from common.grade import load_module

CHAPTER = Path(__file__).resolve().parents[1] / "03_latent_ddpm"
checks = load_module(CHAPTER / "checks.py", "_ch03_checks")
solutions = load_module(CHAPTER / "solutions.py", "_ch03_solutions")


def _posterior(eps_pred, t, z_t, alphas_cumprod):
    """(mean, beta_t, tilde-beta_t) of the DDPM posterior at t >= 1, with x0 estimated from eps_pred."""
    alpha_bar_t, alpha_bar_prev = alphas_cumprod[t], alphas_cumprod[t - 1]
    beta_t = 1 - alpha_bar_t / alpha_bar_prev
    x0 = (z_t - (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()
    weighted = alpha_bar_prev.sqrt() * beta_t * x0 + (1 - beta_t).sqrt() * (1 - alpha_bar_prev) * z_t
    mean = weighted / (1 - alpha_bar_t)
    return mean, beta_t, (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t


def ddpm_large_variance(eps_pred, t, z_t, alphas_cumprod, generator):
    """beta_t as the variance instead of tilde-beta_t."""
    if t == 0:
        return solutions.ddpm_step(eps_pred, t, z_t, alphas_cumprod, generator)
    mean, beta_t, _ = _posterior(eps_pred, t, z_t, alphas_cumprod)
    return mean + beta_t.sqrt() * torch.randn(z_t.shape, generator=generator)


def ddpm_mean_only(eps_pred, t, z_t, alphas_cumprod, generator):
    """Forgets the noise: returns the posterior mean at every t."""
    if t == 0:
        return solutions.ddpm_step(eps_pred, t, z_t, alphas_cumprod, generator)
    return _posterior(eps_pred, t, z_t, alphas_cumprod)[0]


def ddpm_global_noise(eps_pred, t, z_t, alphas_cumprod, generator):
    """Draws the noise from the global generator, not the one it is given."""
    if t == 0:
        return solutions.ddpm_step(eps_pred, t, z_t, alphas_cumprod, generator)
    mean, _, variance = _posterior(eps_pred, t, z_t, alphas_cumprod)
    return mean + variance.sqrt() * torch.randn(z_t.shape)


def embedding_sin_first(
    t, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0, max_period=10_000.0
):
    """Ignores flip_sin_to_cos."""
    return solutions.timestep_embedding(t, dim, False, downscale_freq_shift, scale, max_period)


def embedding_no_shift(
    t, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0, max_period=10_000.0
):
    """Ignores downscale_freq_shift (always divides by dim / 2)."""
    return solutions.timestep_embedding(t, dim, flip_sin_to_cos, 0.0, scale, max_period)


def dpm_inverted_ratio(eps_pred, z_t, alpha_bar_t, alpha_bar_prev):
    """sigma_t / sigma_s instead of sigma_s / sigma_t in front of z_t (finite only before the last step)."""
    sigma_t, sigma_s = (1 - alpha_bar_t) ** 0.5, (1 - alpha_bar_prev) ** 0.5
    ours = solutions.dpmpp_first_order_step(eps_pred, z_t, alpha_bar_t, alpha_bar_prev)
    return ours - (sigma_s / sigma_t) * z_t + (sigma_t / max(sigma_s, 1e-3)) * z_t


def dpm_alpha_t_in_front(eps_pred, z_t, alpha_bar_t, alpha_bar_prev):
    """alpha_t instead of alpha_s in front of the data prediction."""
    alpha_t, alpha_s = alpha_bar_t**0.5, alpha_bar_prev**0.5
    sigma_t = (1 - alpha_bar_t) ** 0.5
    x0 = (z_t - sigma_t * eps_pred) / alpha_t
    ours = solutions.dpmpp_first_order_step(eps_pred, z_t, alpha_bar_t, alpha_bar_prev)
    h_factor = (ours - ((1 - alpha_bar_prev) ** 0.5 / sigma_t) * z_t) / (alpha_s * x0)  # = 1 - exp(-h)
    return ((1 - alpha_bar_prev) ** 0.5 / sigma_t) * z_t + alpha_t * h_factor * x0


WRONG = [
    ("ddpm_step", checks.check_ddpm_step, ddpm_large_variance),
    ("ddpm_step", checks.check_ddpm_step, ddpm_mean_only),
    ("ddpm_step", checks.check_ddpm_step, ddpm_global_noise),
    ("timestep_embedding", checks.check_timestep_embedding, embedding_sin_first),
    ("timestep_embedding", checks.check_timestep_embedding, embedding_no_shift),
    ("dpmpp_first_order_step", checks.check_dpmpp_first_order_step, dpm_inverted_ratio),
    ("dpmpp_first_order_step", checks.check_dpmpp_first_order_step, dpm_alpha_t_in_front),
]


@pytest.mark.parametrize("name, check, wrong", WRONG, ids=[w[2].__name__ for w in WRONG])
def test_a_near_miss_fails(name, check, wrong):
    with pytest.raises(AssertionError):
        check(types.SimpleNamespace(**{name: wrong}))


@pytest.mark.parametrize("name, check", [(w[0], w[1]) for w in WRONG[::3]], ids=[w[0] for w in WRONG[::3]])
def test_the_solution_passes(name, check):
    check(types.SimpleNamespace(**{name: getattr(solutions, name)}))
