"""Chapter 03 reference solutions (same signatures as exercises.py). Run it to see them at work:

python 03_latent_ddpm/solutions.py
python -m common.grade 03 --file 03_latent_ddpm/solutions.py
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- 1. a cosine schedule
def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2);
    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), capped at max_beta. Returns float32 (T,)."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float32)


# ---------------------------------------------------------------------------- 2. the forward process
def add_noise(
    z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps, one t per batch item (Ho et al. 2020 eq. 4)."""
    alpha_bar_t = alphas_cumprod.to(z0.device, z0.dtype)[t].view(-1, *([1] * (z0.ndim - 1)))  # (B, 1, 1, 1)
    return alpha_bar_t.sqrt() * z0 + (1 - alpha_bar_t).sqrt() * eps


# ---------------------------------------------------------------------------- 3. one DDIM step
def ddim_step(
    eps_pred: torch.Tensor, z_t: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float
) -> torch.Tensor:
    """Song et al. 2021 eq. 12 with eta = 0: predict x0, then step to the previous noise level."""
    alpha_bar_t, alpha_bar_prev = torch.as_tensor(alpha_bar_t), torch.as_tensor(alpha_bar_prev)
    x0_pred = (z_t - (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()  # "predicted x_0"
    dir_z_t = (1 - alpha_bar_prev).sqrt() * eps_pred  # "direction pointing to x_t"
    return alpha_bar_prev.sqrt() * x0_pred + dir_z_t


# ---------------------------------------------------------------------------- 4. one DDPM step
def ddpm_step(
    eps_pred: torch.Tensor,
    t: int,
    z_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Sample q(z_{t-1} | z_t, x0_pred): Ho et al. 2020 eq. 7 (mean, variance), eq. 15 (x0_pred)."""
    t = int(t)
    alpha_bar_t = alphas_cumprod[t]
    alpha_bar_prev = alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0)
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    x0_pred = (z_t - (1 - alpha_bar_t).sqrt() * eps_pred) / alpha_bar_t.sqrt()
    # tilde-mu_t: a weighted average of the clean estimate and the current latent
    weight_x0 = alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t)
    weight_zt = alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    posterior_mean = weight_x0 * x0_pred + weight_zt * z_t
    if t == 0:
        return posterior_mean  # Algorithm 2: no noise on the last step
    posterior_std = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).sqrt()
    noise = torch.randn(z_t.shape, generator=generator, dtype=z_t.dtype)
    return posterior_mean + posterior_std * noise


# ---------------------------------------------------------------------------- 5. the timestep embedding
def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10_000.0,
) -> torch.Tensor:
    """Vaswani et al. 2017 sec. 3.5 on the timestep, with diffusers' get_timestep_embedding options."""
    half = dim // 2
    k = torch.arange(0, half, dtype=torch.float32)
    log_freqs = -math.log(max_period) * k / (half - downscale_freq_shift)  # (half,)
    phases = scale * (t.float().unsqueeze(1) * torch.exp(log_freqs).unsqueeze(0))  # (B, half)
    sines, cosines = torch.sin(phases), torch.cos(phases)
    emb = torch.cat([cosines, sines] if flip_sin_to_cos else [sines, cosines], dim=1)  # (B, 2 half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros(len(emb), 1)], dim=1)
    return emb


# ---------------------------------------------------------------------------- 6. one DPM-Solver++ step
def dpmpp_first_order_step(
    eps_pred: torch.Tensor, z_t: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float
) -> torch.Tensor:
    """DPM-Solver++1 (Lu et al. 2022 eq. 9): the exponential integrator in lambda, x_theta held constant."""

    def alpha_sigma_lambda(alpha_bar):
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return alpha, sigma, alpha.log() - sigma.log()  # lambda = +inf where sigma = 0

    alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(alpha_bar_t)
    alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(alpha_bar_prev)
    h = lambda_s - lambda_t
    data_pred = (z_t.double() - sigma_t * eps_pred.double()) / alpha_t
    z_s = (sigma_s / sigma_t) * z_t.double() - alpha_s * torch.expm1(-h) * data_pred
    return z_s.to(z_t.dtype)


# ---------------------------------------------------------------------------- 7. the latent diffusion loss
def ldm_loss(
    unet, z0: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Class-conditional simple loss: t ~ U{0..T-1} then eps ~ N(0, I) (in that order, from ``generator``);
    MSE between eps and unet(z_t, t, class_labels=labels)."""
    B = z0.shape[0]
    T = len(alphas_cumprod)
    t = torch.randint(0, T, (B,), generator=generator, device=generator.device).to(z0.device)
    eps = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0.device)
    z_t = add_noise(z0, eps, t, alphas_cumprod)
    return F.mse_loss(unet(z_t, t, class_labels=labels), eps)


# ---------------------------------------------------------------------------- 8. the latents' SNR
def latent_snr(z0: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR of z_t for these latents at every t: alpha_bar_t Var(z0) / (1 - alpha_bar_t), (T,) float."""
    return alphas_cumprod * z0.float().var() / (1 - alphas_cumprod)


# --------------------------------------------------------------------------- 9. the scaling-factor experiment
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
    """Train one fresh UNet per scaling factor on ``latents * factor``; compare losses and SNR."""
    results = {}
    for name, factor in factors.items():
        torch.manual_seed(seed)
        unet = make_unet()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        z = latents * factor
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(z), (batch_size,), generator=g)
            loss = ldm_loss(unet, z[idx], labels[idx], alphas_cumprod, g)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        snr = latent_snr(z, alphas_cumprod)
        T = len(alphas_cumprod)
        results[name] = {
            "factor": float(factor),
            "std": float(z.std()),
            "losses": losses,
            "snr": snr,
            "snr_mid": float(snr[T // 2]),
            "t_half": int((snr < 1).float().argmax()),
        }
    return results


if __name__ == "__main__":
    from common.schedules import NoiseSchedule
    from common.unet import UNet, UNetConfig

    T = 1000
    print("cosine betas, first and last:", cosine_betas(T)[:3].tolist(), cosine_betas(T)[-2:].tolist())
    schedule = NoiseSchedule.sd15()
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    print(
        "forward process agrees with common.schedules:",
        torch.allclose(add_noise(z0, eps, t, schedule.alpha_bar), schedule.add_noise(z0, eps, t), atol=1e-6),
    )
    a_t, a_prev = schedule.alpha_bar[500], schedule.alpha_bar[480]
    print("DDIM step from t=500 to 480, output std:", float(ddim_step(eps, z0, a_t, a_prev).std()))
    print(
        "DPM-Solver++1 step from t=500 to 480 equals DDIM's:",
        torch.allclose(
            dpmpp_first_order_step(eps, z0, a_t, a_prev), ddim_step(eps, z0, a_t, a_prev), atol=1e-5
        ),
    )
    print(
        "DDPM step at t=500, output std:",
        float(ddpm_step(eps, 500, z0, schedule.alpha_bar, torch.Generator()).std()),
    )
    print(
        "timestep embedding of t = 0 and 999, SD settings:",
        tuple(
            timestep_embedding(
                torch.tensor([0, 999]), 320, flip_sin_to_cos=True, downscale_freq_shift=0
            ).shape
        ),
    )
    small = UNetConfig(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        mid_block_type="UNetMidBlock2D",
        cross_attention_dim=None,
        num_class_embeds=10,
        norm_num_groups=8,
    )
    latents = torch.randn(256, 4, 8, 8) * 5.0  # a VAE's latents before scaling: std ~5
    labels = torch.randint(0, 10, (256,))
    out = scaling_factor_experiment(
        latents,
        labels,
        lambda: UNet(small),
        schedule.alpha_bar,
        {"1.0": 1.0, "computed": 1 / float(latents.std()), "0.18215": 0.18215},
        steps=20,
    )
    for name, r in out.items():
        print(
            f"factor {name:>9}: latent std {r['std']:.3f}, SNR at T/2 {r['snr_mid']:.3f}, "
            f"SNR < 1 from t = {r['t_half']}, loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
        )


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
    """AdamW on ldm_loss with labels dropped to the null class; LR warm-up, cosine decay; EMA.

    Returns (the EMA UNet, the list of losses)."""
    import copy

    from common.unet import UNet

    torch.manual_seed(seed)
    unet = UNet(config)
    unet_ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    warmup = min(100, steps // 10)
    null = config.num_class_embeds - 1  # the "no label" class embedding
    g = torch.Generator().manual_seed(seed)
    losses = []
    for k in range(steps):
        if k < warmup:
            lr_k = lr * (k + 1) / warmup
        else:
            lr_k = lr * 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr_k
        idx = torch.randint(0, len(z0), (batch_size,), generator=g)  # (B,)
        y = labels[idx]
        dropped = torch.rand(batch_size, generator=g) < p_uncond
        y = torch.where(dropped, torch.full_like(y, null), y)
        loss = ldm_loss(unet, z0[idx], y, alphas_cumprod, g)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + k) / (10 + k))
        with torch.no_grad():
            for p_ema, p in zip(unet_ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)  # p_ema = decay p_ema + (1 - decay) p
        losses.append(float(loss.detach()))
    return unet_ema.eval(), losses
