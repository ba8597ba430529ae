"""Chapter 03 exercises: a cosine schedule, the forward process, one DDIM step, one DDPM step, the timestep
embedding, one DPM-Solver++ step, the latent diffusion loss for class-conditional digits (8x8 latents), the
latents' SNR and the latent scaling-factor experiment.

Fill in each function, then grade your file:

    python -m common.grade 03

The first six are graded against diffusers (its schedulers and its timestep embedding). Notation (as in
common/schedules.py): T training timesteps 0 .. T-1; ``alphas_cumprod[t]`` is alpha_bar_t (diffusers' name for
it); latents z are float tensors (B, C, h, w), here (B, 4, 8, 8) as the Digits VAE makes them.
"""

from __future__ import annotations

import torch


# ---------------------------------------------------------------------------- 1. a cosine schedule (easy)
def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Nichol & Dhariwal 2021 (eq. 17), diffusers' "squaredcos_cap_v2".

    alpha_bar is defined as a smooth function of u = t / T in [0, 1]:
        f(u) = cos^2( (u + s) / (1 + s) * pi / 2 ),
    and beta_t = 1 - f((t + 1) / T) / f(t / T) for t = 0 .. T-1, each capped at ``max_beta``
    (the last betas would otherwise reach 1 and destroy the signal in a single step).
    Returns a float32 tensor of shape (T,).
    Hint: compute in Python floats (or float64) and cast at the end, as diffusers does; the offset s keeps
    beta_0 from being vanishingly small.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 2. the forward process
def add_noise(
    z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Sample q(z_t | z_0) in closed form (Ho et al. 2020, eq. 4):

        z_t = sqrt(alpha_bar_t) * z0 + sqrt(1 - alpha_bar_t) * eps

    z0, eps: (B, C, h, w); t: (B,) LongTensor, one timestep per batch item; alphas_cumprod: (T,).
    Returns z_t, shape (B, C, h, w).
    Hint: ``alphas_cumprod[t]`` is (B,); reshape it to (B, 1, 1, 1) so it broadcasts over C, h, w.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 3. one DDIM step
def ddim_step(
    eps_pred: torch.Tensor, z_t: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float
) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with eta = 0) from z_t to z_{t_prev}.

    1. "predicted x0":   x0_pred = (z_t - sqrt(1 - alpha_bar_t) eps_pred) / sqrt(alpha_bar_t)
    2. "direction pointing to x_t":   sqrt(1 - alpha_bar_prev) eps_pred
    3. z_prev = sqrt(alpha_bar_prev) x0_pred + direction

    eps_pred, z_t: (B, C, h, w); alpha_bar_t, alpha_bar_prev: floats (alpha_bar_prev = 1 after the last step).
    Returns z_prev (B, C, h, w). The check compares it with diffusers' ``DDIMScheduler.step``.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 4. one DDPM step (posterior)
def ddpm_step(
    eps_pred: torch.Tensor,
    t: int,
    z_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """One ancestral DDPM step from z_t to z_{t-1} on the full chain (Ho et al. 2020, eqs. 6-7, Algorithm 2).

    The notebook derives the posterior q(z_{t-1} | z_t, z_0) by completing the square; here you sample it with
    the network's estimate of z_0 in place of z_0:

    1. alpha_bar_t = alphas_cumprod[t]; alpha_bar_prev = alphas_cumprod[t - 1], or 1.0 when t = 0;
       alpha_t = alpha_bar_t / alpha_bar_prev; beta_t = 1 - alpha_t
    2. "predicted x0":  x0_pred = (z_t - sqrt(1 - alpha_bar_t) eps_pred) / sqrt(alpha_bar_t)   (no clipping)
    3. posterior mean:  sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) * x0_pred
                        + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) * z_t
    4. posterior variance:  tilde_beta_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    5. for t > 0: z_prev = mean + sqrt(tilde_beta_t) * torch.randn(z_t.shape, generator=generator);
       for t = 0: z_prev = mean (draw no noise: the last step returns the mean)

    eps_pred, z_t: (B, C, h, w); t: an int in [0, T); alphas_cumprod: (T,). Returns z_{t-1}, (B, C, h, w).
    The check compares it with diffusers' ``DDPMScheduler.step`` given generators with the same seed, so draw
    the noise exactly once, with ``torch.randn(z_t.shape, generator=generator)``.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 5. the timestep embedding
def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10_000.0,
) -> torch.Tensor:
    """The sinusoidal timestep embedding with all of diffusers' options (``get_timestep_embedding``).

    With half = dim // 2 and k = 0 .. half - 1:
        freq_k = exp(-log(max_period) * k / (half - downscale_freq_shift))      (compute this in float32)
        angle  = scale * t[:, None] * freq_k[None, :]                           (B, half)
        emb    = [sin(angle), cos(angle)]   concatenated on the last dimension  (B, 2 * half)
    ``flip_sin_to_cos=True`` puts the cosines first (Stable Diffusion: flip_sin_to_cos=True,
    downscale_freq_shift=0; the DDPM UNet: False and 1). An odd ``dim`` gets one column of zeros at the end.

    t: (B,) timesteps, ints or floats. Returns a float32 tensor (B, dim).
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 6. one DPM-Solver++ step
def dpmpp_first_order_step(
    eps_pred: torch.Tensor, z_t: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float
) -> torch.Tensor:
    """One first-order DPM-Solver++ step from z_t to z_s, the noise level alpha_bar_prev (Lu et al. 2022,
    eq. 9).

    In the notation of the notebook: alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), and the half
    log-SNR lambda = log(alpha / sigma).

    1. alpha_t, sigma_t, lambda_t at alpha_bar_t; alpha_s, sigma_s, lambda_s at alpha_bar_prev
    2. h = lambda_s - lambda_t (> 0: sampling goes towards less noise)
    3. the data prediction x0_pred = (z_t - sigma_t eps_pred) / alpha_t
    4. z_s = (sigma_s / sigma_t) z_t - alpha_s (exp(-h) - 1) x0_pred

    alpha_bar_prev may be 1.0 (the final step to clean data): then sigma_s = 0, lambda_s = +inf, exp(-h) = 0
    and z_s = x0_pred. Work with torch tensors (``torch.as_tensor``) so that log(0) = -inf, or treat that case
    apart.
    The check compares the step with DDIM's (they are the same step) and with diffusers'
    ``DPMSolverMultistepScheduler`` at ``solver_order=1``.
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 7. the latent diffusion loss
def ldm_loss(
    unet, z0: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The training loss of a class-conditional latent diffusion model on 8x8 Digits latents (Rombach et al.
    2022 eq. 2, Ho et al. 2020 eq. 14):

        L = || eps - eps_theta(z_t, t, y) ||^2,   t ~ U{0, ..., T-1},  eps ~ N(0, I)

    1. t = torch.randint(0, T, (B,), generator=generator)          (draw t FIRST ...)
    2. eps = torch.randn(z0.shape, generator=generator)            (... then eps, from the same generator)
    3. z_t from your ``add_noise``
    4. the mean squared error between ``unet(z_t, t, class_labels=labels)`` and eps (``F.mse_loss``)

    z0: scaled latents (B, 4, 8, 8); labels: (B,) LongTensor of digits. Returns a 0-d tensor with a graph
    (the check calls ``.backward()`` on it and trains on it for a few steps).
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------- 8. the latents' SNR
def latent_snr(z0: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The signal-to-noise ratio of z_t for THESE latents, at every timestep:

        SNR(t) = alpha_bar_t * Var(z0) / (1 - alpha_bar_t)

    (the schedule's SNR alpha_bar / (1 - alpha_bar) assumes Var(z0) = 1; latents of another scale shift it).
    Var(z0) is the variance over every element of z0. Returns a float tensor of shape (T,).
    """
    raise NotImplementedError


# ------------------------------------------------------------------------- 9. the scaling factor (open-ended)
def scaling_factor_experiment(
    latents: torch.Tensor,
    labels: torch.Tensor,
    make_unet,
    alphas_cumprod: torch.Tensor,
    factors: dict[str, float],
    *,
    steps: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Experiment with the latent scaling factor (Rombach et al. 2022, sec. 4.3.2 and appendix G).

    For each (name, factor) in ``factors`` (e.g. {"1.0": 1.0, "computed": 1 / latents.std(), "0.18215":
    0.18215}): train a fresh ``make_unet()`` for ``steps`` AdamW steps on batches of ``latents * factor``
    (random batches of ``batch_size`` with their ``labels``) with your ``ldm_loss``, and record

        {"factor": float, "std": std of latents * factor, "losses": [one float per step],
         "snr": latent_snr(latents * factor, alphas_cumprod) (T,), "snr_mid": its value at t = T // 2,
         "t_half": the first t where the SNR drops below 1}

    Returns {name: that dict}. Then look: plot the loss curves and the SNR curves (log scale) of the three;
    sample from each (``common.samplers``) and decode with the Digits VAE. Which factor leaves most of the
    schedule with nothing to learn (SNR far above or far below 1)? Why does the loss of a model trained on
    latents of std 5 look smaller or larger than another's, and is that comparison fair?
    The check tests the shapes, the SNR values and the ordering of t_half, not the samples.
    """
    raise NotImplementedError


# ------------------------------------------------------------------------- 7. train the digits LDM yourself
def train_digits_ldm(
    z0: torch.Tensor,
    labels: torch.Tensor,
    config,
    alphas_cumprod: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    p_uncond: float = 0.1,
    ema_decay: float = 0.995,
    seed: int = 0,
):
    """Train the class-conditional digits UNet on frozen VAE latents: the loop `train_ldm.py` runs, by hand.

    z0: (N, 4, 8, 8) scaled latents of N training digits (the frozen Digits VAE's posterior means times its
    scaling factor); labels: (N,) digits 0-9; config: a ``common.unet.UNetConfig`` whose last class embedding,
    index ``config.num_class_embeds - 1``, is the "no label" class; alphas_cumprod: (T,) alpha_bar_t.

    Build ``UNet(config)`` (after ``torch.manual_seed(seed)``), an AdamW optimizer, and for each of the
    ``steps`` steps:
    1. draw a random batch of ``batch_size`` latents and their labels (``torch.randint`` with your generator);
    2. replace each label by the null class with probability ``p_uncond`` (classifier-free guidance, Ho &
       Salimans 2022: the same network also learns the unconditional prediction);
    3. the loss: your ``ldm_loss`` above (t ~ U{0..T-1}, eps ~ N(0, I), MSE between eps and the prediction);
    4. backward, clip the gradient norm to 1.0, step the optimizer; record ``float(loss)``.
    Recommended, as train_ldm.py does: a linear LR warm-up over the first min(100, steps // 10) steps and a
    cosine decay to 0 after it; an exponential moving average (EMA) of the weights, with a decay that starts
    small, ``min(ema_decay, (1 + k) / (10 + k))`` at step k, so a short run still moves its average.

    Returns (the model to sample from, e.g. the EMA copy, in eval mode; the list of ``steps`` losses).
    The check encodes real digits, trains your loop, samples it with guidance (DDIM, 20 steps, w = 4) and
    grades the samples with the digits classifier. Under COURSE_FAST=1 it trains a narrow UNet for 60 steps
    and checks only that the loss went down (on batches your loop never saw).
    """
    raise NotImplementedError
