"""Checks for chapter 03's exercises: ``python -m common.grade 03`` runs them on your exercises.py.

The schedule, forward process, DDIM, DDPM and DPM-Solver++ steps and the timestep embedding are graded against
diffusers (the reference implementation), never against numbers from this course's code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _small_unet():
    from common.unet import UNet, UNetConfig

    config = UNetConfig(
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
    return UNet(config)


def _sd_alphas_cumprod():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return scheduler, scheduler.alphas_cumprod.clone()


def check_cosine_betas(m):
    from diffusers import DDPMScheduler

    for T in (1000, 50):
        ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
        ours = torch.as_tensor(m.cosine_betas(T))
        assert ours.shape == (T,), f"cosine_betas({T}) should have shape ({T},), got {tuple(ours.shape)}"
        err = float((ours.double() - ref.double()).abs().max())
        assert err <= 1e-6, (
            f"cosine_betas({T}) differs from diffusers' squaredcos_cap_v2 betas by up to {err:.2e} "
            f"(first betas: yours {ours[:3].tolist()}, diffusers {ref[:3].tolist()}); "
            "remember the offset s = 0.008 and the cap at 0.999"
        )


def check_add_noise(m):
    scheduler, alphas_cumprod = _sd_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 777, 999])
    ours = m.add_noise(z0, eps, t, alphas_cumprod)
    ref = scheduler.add_noise(z0, eps, t)
    assert ours.shape == ref.shape, f"expected shape {tuple(ref.shape)}, got {tuple(ours.shape)}"
    err = float((ours - ref).abs().max())
    assert err <= 1e-5, (
        f"add_noise differs from diffusers' DDPMScheduler.add_noise by {err:.2e}; each batch item "
        "needs its own alpha_bar_t, shaped (B, 1, 1, 1) to broadcast"
    )


def check_ddim_step(m):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    z_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (int(scheduler.timesteps[0]), int(scheduler.timesteps[25]), int(scheduler.timesteps[-1])):
        t_prev = t - 1000 // 50
        alpha_bar_t = float(scheduler.alphas_cumprod[t])
        alpha_bar_prev = float(scheduler.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        ref = scheduler.step(eps, t, z_t, eta=0.0).prev_sample
        ours = m.ddim_step(eps, z_t, alpha_bar_t, alpha_bar_prev)
        err = float((ours - ref).abs().max())
        assert err <= 1e-4 * max(1.0, float(ref.abs().max())), (
            f"ddim_step from t={t} to {t_prev} differs from diffusers' DDIMScheduler.step by {err:.2e}"
        )


def check_ddpm_step(m):
    scheduler, alphas_cumprod = _sd_alphas_cumprod()
    scheduler.config.clip_sample = False  # latents are not in [-1, 1]: no clipping of x0_pred
    g = torch.Generator().manual_seed(4)
    z_t, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for t in (999, 500, 37, 1, 0):
        ref = scheduler.step(eps, t, z_t, generator=torch.Generator().manual_seed(t)).prev_sample
        ours = m.ddpm_step(eps, t, z_t, alphas_cumprod, torch.Generator().manual_seed(t))
        got = getattr(ours, "shape", type(ours))
        assert torch.is_tensor(ours) and ours.shape == ref.shape, (
            f"ddpm_step should return a tensor of shape {tuple(ref.shape)}, got {got}"
        )
        err = float((ours - ref).abs().max())
        hint = (
            "at t = 0 return the posterior mean without noise"
            if t == 0
            else "mean tilde-mu_t from x0_pred and z_t, then + sqrt(tilde-beta_t) * torch.randn(z_t.shape, "
            "generator=generator), drawn once"
        )
        assert err <= 1e-5 * max(1.0, float(ref.abs().max())), (
            f"ddpm_step at t = {t} differs from diffusers' DDPMScheduler.step by {err:.2e}: {hint}"
        )
    other = m.ddpm_step(eps, 500, z_t, alphas_cumprod, torch.Generator().manual_seed(12345))
    first = m.ddpm_step(eps, 500, z_t, alphas_cumprod, torch.Generator().manual_seed(500))
    assert float((other - first).abs().max()) > 1e-3, (
        "ddpm_step must draw its noise from the generator it is given"
    )


def check_timestep_embedding(m):
    from diffusers.models.embeddings import get_timestep_embedding

    steps = torch.tensor([0, 1, 17, 250, 999])
    cases = [  # (timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale, what it is)
        (steps, 320, True, 0.0, 1.0, "Stable Diffusion's setting"),
        (steps, 64, False, 1.0, 1.0, "the DDPM UNet's setting"),
        (steps, 7, True, 0.0, 1.0, "an odd width"),
        (torch.tensor([0.0, 0.25, 0.5, 0.999]), 32, True, 0.0, 1000.0, "float t in [0, 1), scale 1000"),
    ]
    for t, dim, flip, shift, scale, what in cases:
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale)
        ours = m.timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale)
        assert torch.is_tensor(ours) and ours.shape == ref.shape, (
            f"{what}: expected shape {tuple(ref.shape)}, got {getattr(ours, 'shape', type(ours))}"
        )
        err = float((ours.float() - ref).abs().max())
        assert err <= 1e-3, (
            f"{what} (dim={dim}, flip_sin_to_cos={flip}, downscale_freq_shift={shift}, scale={scale}): "
            f"differs from diffusers' get_timestep_embedding by {err:.2e}; "
            f"first row yours {ours[1, :4].tolist()}, diffusers {ref[1, :4].tolist()}"
        )


def check_dpmpp_first_order_step(m):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    options = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
    )
    dpm = DPMSolverMultistepScheduler(**options, solver_order=1)
    ddim = DDIMScheduler(**options, clip_sample=False, set_alpha_to_one=True)
    n = 10
    dpm.set_timesteps(n)
    ddim.set_timesteps(n)
    alphas_cumprod = dpm.alphas_cumprod
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(dpm.timesteps):
        t = int(t)
        alpha_bar_prev = float(alphas_cumprod[int(dpm.timesteps[i + 1])]) if i + 1 < n else 1.0
        eps = torch.randn(z.shape, generator=g)
        ours = m.dpmpp_first_order_step(eps, z, float(alphas_cumprod[t]), alpha_bar_prev)
        ref_dpm = dpm.step(eps, t, z).prev_sample
        ref_ddim = ddim.step(eps, t, z, eta=0.0).prev_sample
        assert torch.is_tensor(ours) and ours.shape == z.shape, f"expected a tensor of shape {tuple(z.shape)}"
        assert torch.isfinite(ours).all(), (
            f"step {i} (t = {t}, alpha_bar_prev = {alpha_bar_prev}) gave non-finite values: "
            "at alpha_bar_prev = 1, sigma_s = 0, lambda_s = +inf and exp(-h) = 0, so z_s = x0_pred"
        )
        bound = 1e-4 * max(1.0, float(ref_dpm.abs().max()))
        err_dpm = float((ours - ref_dpm).abs().max())
        err_ddim = float((ours - ref_ddim).abs().max())
        assert err_dpm <= bound, (
            f"step {i} from t = {t}: differs from diffusers' DPMSolverMultistepScheduler "
            f"(solver_order=1) by {err_dpm:.2e}"
        )
        assert err_ddim <= bound, (
            f"step {i} from t = {t}: differs from DDIMScheduler.step (eta = 0) by {err_ddim:.2e}"
        )
        z = ref_dpm


def check_ldm_loss(m):
    torch.manual_seed(0)
    unet = _small_unet()
    _, alphas_cumprod = _sd_alphas_cumprod()
    z0 = torch.randn(8, 4, 8, 8)
    labels = torch.arange(8) % 10
    loss = m.ldm_loss(unet, z0, labels, alphas_cumprod, torch.Generator().manual_seed(3))
    assert torch.is_tensor(loss) and loss.ndim == 0, "ldm_loss should return a 0-d tensor"
    # the reference computation, drawing t then eps from the same generator
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    ref = F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, class_labels=labels), eps)
    assert abs(loss.item() - ref.item()) <= 1e-5, (
        f"ldm_loss = {loss.item():.6f}, expected {ref.item():.6f}: draw t with torch.randint(0, T, (B,), "
        "generator=g) first, then eps with torch.randn(z0.shape, generator=g), and pass class_labels=labels"
    )
    loss.backward()
    assert unet.class_embedding.weight.grad is not None, (
        "no gradient reached the class embedding: pass the labels"
    )
    # and a few steps of training on it lower the loss
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        value = m.ldm_loss(unet, z0, labels, alphas_cumprod, g)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"30 training steps on ldm_loss should lower it; went from {first:.4f} to {last:.4f}"


def check_latent_snr(m):
    _, alphas_cumprod = _sd_alphas_cumprod()
    z0 = torch.randn(64, 4, 8, 8) * 3.0
    snr = torch.as_tensor(m.latent_snr(z0, alphas_cumprod))
    assert snr.shape == (1000,), (
        f"latent_snr should give one value per timestep, (1000,); got {tuple(snr.shape)}"
    )
    ref = alphas_cumprod * z0.var() / (1 - alphas_cumprod)
    rel = float(((snr - ref).abs() / ref).max())
    assert rel < 1e-3, (
        f"latent_snr differs from alpha_bar_t Var(z0) / (1 - alpha_bar_t) by {rel:.1e} (relative); "
        f"at t=500 you give {float(snr[500]):.4f}, expected {float(ref[500]):.4f}"
    )


def check_scaling_factor_experiment(m):
    _, alphas_cumprod = _sd_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(128, 4, 8, 8, generator=g) * 5.0
    labels = torch.randint(0, 10, (128,), generator=g)
    factors = {"1.0": 1.0, "computed": 1 / float(latents.std()), "0.18215": 0.18215}
    out = m.scaling_factor_experiment(
        latents, labels, _small_unet, alphas_cumprod, factors, steps=6, batch_size=16
    )
    assert set(out) == set(factors), f"expected one result per factor {sorted(factors)}, got {sorted(out)}"
    for name, r in out.items():
        for key in ("factor", "std", "losses", "snr", "snr_mid", "t_half"):
            assert key in r, f"result {name!r} should hold {key!r}; got {sorted(r)}"
        assert len(r["losses"]) == 6 and all(math.isfinite(v) for v in r["losses"]), (
            f"{name}: expected 6 finite losses (one per step), got {r['losses']}"
        )
        z = latents * factors[name]
        assert abs(r["std"] - float(z.std())) < 1e-3 * float(z.std()), (
            f"{name}: std should be that of latents * factor"
        )
        ref = alphas_cumprod * z.var() / (1 - alphas_cumprod)
        assert abs(r["snr_mid"] - float(ref[500])) < 1e-3 * float(ref[500]), (
            f"{name}: snr_mid should be the SNR at t = T/2 = 500: "
            f"{float(ref[500]):.4f}, got {r['snr_mid']:.4f}"
        )
        expected_t = int((ref < 1).float().argmax())
        assert abs(r["t_half"] - expected_t) <= 1, (
            f"{name}: SNR first drops below 1 at t = {expected_t}, got {r['t_half']}"
        )
    assert abs(out["computed"]["std"] - 1.0) < 0.01, "the computed factor should give latents of std 1"
    assert out["1.0"]["t_half"] > out["computed"]["t_half"] > out["0.18215"]["t_half"], (
        "larger latents keep their signal longer: t_half should fall from factor 1.0 to computed to 0.18215"
    )


def _digit_latents(n: int, seed: int = 0):
    """n training digits through the frozen Digits VAE: (scaled posterior means (n, 4, 8, 8), labels (n,))."""
    from pathlib import Path

    from common.autoencoder import AutoencoderKL
    from common.data import Digits

    vae = AutoencoderKL.load(Path(__file__).resolve().parents[1] / "checkpoints" / "vae_digits").eval()
    ds = Digits(32, "train", length=n, seed=seed)
    items = [ds[i] for i in range(n)]
    images = torch.stack([x for x, _ in items]).repeat(1, 3, 1, 1)  # (n, 3, 32, 32): the VAE is RGB
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i : i + 500]).mean for i in range(0, n, 500)])
    return means * vae.config.scaling_factor, torch.tensor([y for _, y in items]), vae


def check_train_digits_ldm(m):
    import dataclasses
    from pathlib import Path

    from common.classifier import DigitClassifier, conditional_accuracy
    from common.runtime import is_fast
    from common.samplers import DDIMSampler, sample_loop
    from common.schedules import NoiseSchedule
    from common.unet import UNet, UNetConfig

    fast = is_fast()
    n, steps, batch_size, width = (512, 60, 32, 16) if fast else (5000, 1500, 64, 32)
    z0, labels, vae = _digit_latents(n)
    config = dataclasses.replace(
        UNetConfig.digits(),
        num_class_embeds=11,  # 10 digits + the null class
        block_out_channels=(width, 2 * width),
    )
    schedule = NoiseSchedule.sd15()  # scaled-linear betas, T = 1000, as the shipped digits LDM
    unet, losses = m.train_digits_ldm(
        z0, labels, config, schedule.alpha_bar, steps=steps, batch_size=batch_size
    )
    assert isinstance(unet, torch.nn.Module), "return (the UNet to sample from, the list of losses)"
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), (
        f"expected {steps} finite losses (one per step); got {len(losses)}"
    )
    # the loss on held-out digits, fixed t and eps: the trained model against a fresh one
    z_val, y_val, _ = _digit_latents(256, seed=1)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (len(z_val),), generator=g)
    eps = torch.randn(z_val.shape, generator=g)
    z_t = schedule.add_noise(z_val, eps, t)
    torch.manual_seed(0)
    with torch.no_grad():
        trained = float(F.mse_loss(unet.eval()(z_t, t, class_labels=y_val), eps))
        fresh = float(F.mse_loss(UNet(config).eval()(z_t, t, class_labels=y_val), eps))
    assert trained < 0.7 * fresh, (
        f"held-out loss {trained:.3f} against {fresh:.3f} for an untrained UNet: "
        "the loop should lower it (step the optimizer; return the trained or EMA "
        "model)"
    )
    if fast:
        return
    # the real grade: 20 samples per digit, DDIM 20 steps with guidance w = 4, read by the digits classifier
    y = torch.arange(10).repeat_interleave(20)
    null = torch.full_like(y, config.num_class_embeds - 1)

    def guided(z, t_step, w=4.0):
        eps_c, eps_u = unet(torch.cat([z, z]), t_step, class_labels=torch.cat([y, null])).chunk(2)
        return eps_u + w * (eps_c - eps_u)

    with torch.no_grad():
        z_T = torch.randn(len(y), 4, 8, 8, generator=torch.Generator().manual_seed(1))
        z_gen = sample_loop(guided, z_T, DDIMSampler(schedule, 20, timestep_spacing="trailing"))
        images = vae.decode(z_gen / vae.config.scaling_factor).clamp(-1, 1).mean(1, keepdim=True)
    root = Path(__file__).resolve().parents[1]
    classifier = DigitClassifier.load(root / "checkpoints" / "digits_classifier")
    acc = conditional_accuracy(classifier, images, y)
    print(f"train_digits_ldm: {steps} steps, held-out loss {trained:.3f}, accuracy {acc:.3f} on 200 samples")
    assert acc >= ACCURACY_BAR, (
        f"the classifier reads {acc:.1%} of your samples as the digit asked for; "
        f"expected at least {ACCURACY_BAR:.0%}"
    )


ACCURACY_BAR = 0.7  # of 200 guided samples (chance: 0.1); the reference solution scores 1.00

CHECKS = [
    ("cosine_betas", check_cosine_betas),
    ("add_noise", check_add_noise),
    ("ddim_step", check_ddim_step),
    ("ddpm_step", check_ddpm_step),
    ("timestep_embedding", check_timestep_embedding),
    ("dpmpp_first_order_step", check_dpmpp_first_order_step),
    ("ldm_loss", check_ldm_loss),
    ("latent_snr", check_latent_snr),
    ("scaling_factor_experiment", check_scaling_factor_experiment),
    ("train_digits_ldm", check_train_digits_ldm),
]
