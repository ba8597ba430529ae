# %% [markdown]
# # 03. Latent DDPM
#
# Stage two of latent diffusion (Rombach et al. 2022): freeze the autoencoder of chapters 01-02 and train a
# denoising diffusion model (Ho et al. 2020) on its **latents**. This chapter derives every equation it
# computes and builds, in order:
#
# 1. the latents of the frozen VAE;
# 2. the forward process q(z_t | z_0) in closed form (derived by induction), and what it does to decoded
#    images;
# 3. the reverse posterior q(z_{t-1} | z_t, z_0) (derived by completing the square), the epsilon
#    parameterisation and the simplified loss;
# 4. the network: a UNet built here from its parts (timestep embedding, ResBlock, down and up paths with skip
#    connections), loaded with the shipped weights and checked against `common.unet.UNet`; then Stable
#    Diffusion 1.5's UNet counted from the same classes;
# 5. a short training run of the class-conditional UNet on 8x8x4 Digits latents, and the shipped model;
# 6. sampling: what the model predicts at each noise level, the DDPM step, DDIM with eta, DPM-Solver++ as an
#    exponential integrator in log-SNR (first order, then 2M), each checked against `common.samplers` and
#    diffusers;
# 7. a table of samplers (steps, seconds, quality graded by a digits classifier);
# 8. the claim that started it all, measured: the same UNet at pixel and at latent resolution.
#
# Heavy cells size themselves with `budget(...)`: seconds under `COURSE_FAST=1`, minutes on a laptop CPU.
# The model trained for real by `train_ldm.py` ships in `checkpoints/ldm_digits`, so we train a few steps to
# see the loop, then load it.

# %%
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from safetensors.torch import load_file
from torch import nn

from common.autoencoder import AutoencoderKL
from common.classifier import DigitClassifier, conditional_accuracy
from common.convert import unet_config_from_diffusers, unet_config_to_diffusers
from common.data import Digits
from common.grade import load_module
from common.runtime import budget, seed_everything, setup_notebook
from common.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler, make_sampler, sample_loop
from common.schedules import NoiseSchedule
from common.unet import UNet, UNetConfig
from common.viz import plot_trajectory, show, show_latent_channels

ROOT = setup_notebook()  # seed 0, small inline figures; prints the device
CKPT = ROOT / "checkpoints"
T0 = time.perf_counter()

# %% [markdown]
# ## 1. Latents of the frozen VAE
#
# The Digits VAE (`checkpoints/vae_digits`, trained by chapter 01's `train_vae.py --data digits --resolution
# 32 --factor 4`) maps a 32 x 32 digit to a 4 x 8 x 8 latent: 4x fewer numbers than the RGB image it was
# trained on. Its `scaling_factor` (1 / std of the latents, measured when it was trained) makes them roughly
# unit variance, which is what the noise schedule assumes. Offline, the digits are rendered from fonts (the
# cell prints which source it used).

# %%
vae = AutoencoderKL.load(CKPT / "vae_digits").eval().requires_grad_(False)
scale = vae.config.scaling_factor
digits = Digits(32, "train", length=budget(fast=64, cpu=1024), seed=0)
x = torch.stack([digits[i][0] for i in range(len(digits))]).repeat(
    1, 3, 1, 1
)  # grey -> RGB, as the VAE saw them
labels = torch.tensor([digits[i][1] for i in range(len(digits))])
with torch.no_grad():
    posterior = vae.encode(x)
    z0 = posterior.mean * scale  # (N, 4, 8, 8): the scaled latents diffusion works on
print(
    f"images {tuple(x.shape)} -> latents {tuple(z0.shape)}; scaling factor {scale:.4f}; "
    f"scaled latent std {float(z0.std()):.3f}, mean {float(z0.mean()):.3f}"
)
show(show_latent_channels(z0[:3], size=1.0, title="scaled latents of three digits, one heatmap per channel"))

# %% [markdown]
# ## 2. The forward process on latents, in closed form
#
# DDPM destroys data gradually. One step adds a little Gaussian noise and shrinks what was there, so the
# variance stays 1 for unit-variance data:
#
# $$q(z_t \mid z_{t-1}) = \mathcal N\big(\sqrt{1-\beta_t}\, z_{t-1},\ \beta_t I\big),
# \qquad \alpha_t = 1 - \beta_t, \qquad \bar\alpha_t = \prod_{s=1}^{t} \alpha_s .$$
#
# Training needs z_t for a random t in one draw, not t draws. **Claim:**
# $z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$ with
# $\varepsilon \sim \mathcal N(0, I)$. It holds at t = 1 (there $\bar\alpha_1 = \alpha_1$). Suppose it holds
# at t - 1, with noise $\varepsilon'$; draw the step's own noise $\varepsilon''$, independent of
# $\varepsilon'$. Then
#
# $$\begin{aligned}
# z_t &= \sqrt{\alpha_t}\, z_{t-1} + \sqrt{1-\alpha_t}\,\varepsilon''
#        && \text{one step, by the reparameterisation} \\
#     &= \sqrt{\alpha_t \bar\alpha_{t-1}}\, z_0 + \big[\sqrt{\alpha_t(1-\bar\alpha_{t-1})}\,\varepsilon'
#        + \sqrt{1-\alpha_t}\,\varepsilon''\big] && \text{the claim at } t-1 \\
#     &= \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon
#        && \text{a sum of independent Gaussians: variance } \alpha_t - \bar\alpha_t + 1 - \alpha_t
# \end{aligned}$$
#
# so by induction $q(z_t \mid z_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\, z_0, (1-\bar\alpha_t) I\big)$ for
# every t. The code is one line. Built with Stable Diffusion's "scaled linear" betas (the code counts t from
# 0, as diffusers does: `alpha_bar[0]` is $\bar\alpha_1$), then checked against `common.schedules`:

# %%
T = 1000
betas = torch.linspace(0.00085**0.5, 0.012**0.5, T) ** 2  # SD's scaled_linear schedule, (T,)
alpha_bar = torch.cumprod(1 - betas, dim=0)  # (T,)


def q_sample(z0, eps, t):
    a = alpha_bar[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * eps


schedule = NoiseSchedule.sd15()
eps = torch.randn(z0[:4].shape, generator=torch.Generator().manual_seed(0))
t = torch.tensor([0, 250, 500, 999])
diff = (q_sample(z0[:4], eps, t) - schedule.add_noise(z0[:4], eps, t)).abs().max()
print(f"max |ours - common.schedules| = {float(diff):.1e}")

# %% [markdown]
# The induction can also be run: take one latent value, walk the one-step chain t times for many noise draws,
# and compare the mean and standard deviation of what comes out with the closed form.

# %%
g = torch.Generator().manual_seed(0)
z_scalar = float(z0[0, 0, 4, 4])  # one latent number
chains = torch.full((budget(fast=20_000, cpu=200_000),), z_scalar)  # many copies of it
for step in range(500):  # steps 1 .. 500, i.e. up to alpha_bar[499]
    chains = (1 - betas[step]).sqrt() * chains + betas[step].sqrt() * torch.randn(chains.shape, generator=g)
mean_closed, std_closed = alpha_bar[499].sqrt() * z_scalar, (1 - alpha_bar[499]).sqrt()
print(f"after 500 one-step draws: mean {float(chains.mean()):.4f}, std {float(chains.std()):.4f}")
print(f"closed form:              mean {float(mean_closed):.4f}, std {float(std_closed):.4f}")

# %% [markdown]
# Now noise one latent to several timesteps and **decode** each z_t, beside noising the pixels directly with
# the same schedule. The decoder turns latent noise into structured blobs, not pixel snow: it only knows how
# to draw digit-like strokes.

# %%
ts = [0, 100, 250, 400, 600, 999]
z_row = torch.cat([schedule.add_noise(z0[:1], eps[:1], t) for t in ts])
with torch.no_grad():
    decoded = vae.decode(z_row / scale).clamp(-1, 1).mean(1, keepdim=True)
pixel_row = torch.cat([schedule.add_noise(x[:1, :1], torch.randn_like(x[:1, :1]), t) for t in ts]).clamp(
    -1, 1
)
show(
    plot_trajectory(
        [torch.stack([p, d]) for p, d in zip(pixel_row, decoded)],
        ts,
        size=1.1,
        title="top: pixels noised; bottom: latents noised, then decoded",
    )
)

# %% [markdown]
# *Figure: the same schedule applied in pixel space (top) and latent space (bottom), columns at t = 0 .. 999.*
#
# How fast the signal goes is summed up by the signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t)
# (for unit-variance data). Three schedules (the cosine one is exercise 1):

# %%
fig = Figure(figsize=(5, 2.6))
ax = fig.subplots()
for name, s in [
    ("linear (DDPM)", NoiseSchedule.ddpm()),
    ("scaled_linear (SD)", NoiseSchedule.sd15()),
    ("cosine", NoiseSchedule.cosine()),
]:
    ax.semilogy(s.snr(torch.arange(T)).numpy(), label=name)
ax.axhline(1.0, color="grey", lw=0.5)
ax.set_xlabel("t")
ax.set_ylabel("SNR(t)")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 3. The reverse process: the posterior, the noise parameterisation, the loss
#
# Sampling runs the chain backwards: from $z_T \sim \mathcal N(0, I)$, draw $z_{t-1}$ given $z_t$, down to
# $z_0$. The true reverse step $q(z_{t-1} \mid z_t)$ needs the whole data distribution, but **given $z_0$** it
# is a Gaussian we can write down. By Bayes, and because the forward chain is Markov,
#
# $$q(z_{t-1} \mid z_t, z_0) = \frac{q(z_t \mid z_{t-1})\, q(z_{t-1} \mid z_0)}{q(z_t \mid z_0)}
# \ \propto\ \exp\Big(-\frac{(z_t - \sqrt{\alpha_t}\, z_{t-1})^2}{2\beta_t}
# - \frac{(z_{t-1} - \sqrt{\bar\alpha_{t-1}}\, z_0)^2}{2(1-\bar\alpha_{t-1})}\Big)$$
#
# (per coordinate; the denominator does not depend on $z_{t-1}$). **Complete the square** in $x = z_{t-1}$:
# the exponent is $-\tfrac12 (a x^2 - 2 b x) + \text{const} = -\tfrac{a}{2}(x - b/a)^2 + \text{const}$, a
# Gaussian with variance $1/a$ and mean $b/a$, where
#
# $$\begin{aligned}
# a &= \frac{\alpha_t}{\beta_t} + \frac{1}{1-\bar\alpha_{t-1}}
#    = \frac{\alpha_t - \bar\alpha_t + \beta_t}{\beta_t (1-\bar\alpha_{t-1})}
#    = \frac{1-\bar\alpha_t}{\beta_t(1-\bar\alpha_{t-1})}
#    && \text{common denominator; } \alpha_t\bar\alpha_{t-1} = \bar\alpha_t,\ \alpha_t + \beta_t = 1 \\
# b &= \frac{\sqrt{\alpha_t}}{\beta_t}\, z_t + \frac{\sqrt{\bar\alpha_{t-1}}}{1-\bar\alpha_{t-1}}\, z_0
#    && \text{the terms linear in } x \\
# \tilde\beta_t &= \frac1a = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\,\beta_t,
# \qquad \tilde\mu_t = \frac ba = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t}\, z_0
#    + \frac{\sqrt{\alpha_t}\,(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}\, z_t
#    && \text{Ho et al. 2020, eq. 7}
# \end{aligned}$$
#
# The variance does not depend on the data at all; the mean is a weighted average of where we are and where we
# came from. In code, one coefficient per timestep (with $\bar\alpha$ before the first step equal to 1):

# %%
alpha_bar_prev = torch.cat([torch.ones(1), alpha_bar[:-1]])  # (T,): alpha_bar_{t-1}
coef_z0 = alpha_bar_prev.sqrt() * betas / (1 - alpha_bar)  # (T,): weight of z_0 in tilde-mu_t
coef_zt = (1 - betas).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)  # (T,): weight of z_t in tilde-mu_t
beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar) * betas  # (T,): the posterior variance

# %% [markdown]
# A toy first, with numbers you could check by hand: one coordinate, $z_0 = 1.2$, $z_t = 0.3$ at t = 500.
# Multiply the two Gaussian densities on a fine grid of $z_{t-1}$, normalise, and measure the mean and
# variance of the product, against the completed square:

# %%
t_toy, z0_toy, zt_toy = 500, 1.2, 0.3
x_grid = torch.linspace(-3, 3, 600_001, dtype=torch.float64)  # values of z_{t-1}
a_t, a_bar_prev = 1 - betas[t_toy].double(), alpha_bar_prev[t_toy].double()
log_density = (
    -((zt_toy - a_t.sqrt() * x_grid) ** 2) / (2 * (1 - a_t))  # log q(z_t | z_{t-1})
    - (x_grid - a_bar_prev.sqrt() * z0_toy) ** 2 / (2 * (1 - a_bar_prev))  # log q(z_{t-1} | z_0)
)
weights = torch.exp(log_density - log_density.max())
weights = weights / weights.sum()
grid_mean = float((weights * x_grid).sum())
grid_var = float((weights * (x_grid - grid_mean) ** 2).sum())
formula_mean = float(coef_z0[t_toy] * z0_toy + coef_zt[t_toy] * zt_toy)
print(f"grid:    mean {grid_mean:.6f}, variance {grid_var:.6e}")
print(f"formula: mean {formula_mean:.6f}, variance {float(beta_tilde[t_toy]):.6e}")

# %% [markdown]
# **Where the network comes in.** At sampling time $z_0$ is unknown: a network guesses it. Ho et al. let it
# guess the noise instead. Substitute $z_0 = (z_t - \sqrt{1-\bar\alpha_t}\,\varepsilon)/\sqrt{\bar\alpha_t}$
# (the forward closed form, solved for $z_0$) into $\tilde\mu_t$:
#
# $$\begin{aligned}
# \tilde\mu_t &= \frac{\beta_t}{\sqrt{\alpha_t}(1-\bar\alpha_t)}
#   \big(z_t - \sqrt{1-\bar\alpha_t}\,\varepsilon\big)
#   + \frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}\, z_t
#   && \sqrt{\bar\alpha_{t-1}}/\sqrt{\bar\alpha_t} = 1/\sqrt{\alpha_t} \\
# &= \frac{\beta_t + \alpha_t - \bar\alpha_t}{\sqrt{\alpha_t}(1-\bar\alpha_t)}\, z_t
#   - \frac{\beta_t}{\sqrt{\alpha_t}\sqrt{1-\bar\alpha_t}}\,\varepsilon
#   && \text{collect } z_t \\
# &= \frac{1}{\sqrt{\alpha_t}}\Big(z_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,\varepsilon\Big)
#   && \beta_t + \alpha_t = 1 \quad\text{(Ho et al. eq. 11)}
# \end{aligned}$$
#
# So a network $\varepsilon_\theta(z_t, t)$ gives the reverse mean $\mu_\theta$ by the same formula. Both
# forms, numerically, for every t:

# %%
g = torch.Generator().manual_seed(0)
z0_probe, eps_probe = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
worst = 0.0
for t in range(1, T):
    z_t = q_sample(z0_probe, eps_probe, torch.tensor([t]))
    mean_from_z0 = coef_z0[t] * z0_probe + coef_zt[t] * z_t
    mean_from_eps = (z_t - betas[t] / (1 - alpha_bar[t]).sqrt() * eps_probe) / (1 - betas[t]).sqrt()
    worst = max(worst, float((mean_from_z0 - mean_from_eps).abs().max()))
print(f"max |tilde-mu from z0 - tilde-mu from eps| over t = 1..{T - 1}: {worst:.1e}")

# %% [markdown]
# Now the check against the references: one ancestral step
# $z_{t-1} = \tilde\mu_t + \sqrt{\tilde\beta_t}\,\xi$, with $z_0$ estimated from a noise prediction and $\xi$
# drawn from a fixed generator, beside the course's `DDPMSampler.step` and diffusers' `DDPMScheduler.step`
# (with `clip_sample=False`: latents are not in [-1, 1]), given the same prediction and the same generator
# seed.

# %%
from diffusers import DDPMScheduler

reference = DDPMScheduler(**schedule.to_diffusers(), clip_sample=False)
ddpm = DDPMSampler(schedule, T)  # every training timestep, 999 .. 0
z_t, eps_hat = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
for t in (999, 500, 20):
    z0_hat = (z_t - (1 - alpha_bar[t]).sqrt() * eps_hat) / alpha_bar[t].sqrt()
    xi = torch.randn(z_t.shape, generator=torch.Generator().manual_seed(t))
    ours = coef_z0[t] * z0_hat + coef_zt[t] * z_t + beta_tilde[t].sqrt() * xi
    course = ddpm.step(eps_hat, t, z_t, generator=torch.Generator().manual_seed(t))
    theirs = reference.step(eps_hat, t, z_t, generator=torch.Generator().manual_seed(t)).prev_sample
    print(
        f"t = {t:3d}: max |ours - common.samplers| = {float((ours - course).abs().max()):.1e}, "
        f"max |ours - diffusers| = {float((ours - theirs).abs().max()):.1e}"
    )

# %% [markdown]
# You write this step yourself in exercise 4 (`ddpm_step`), graded against `DDPMScheduler.step`.
#
# **The loss.** The model's reverse step is
# $p_\theta(z_{t-1} \mid z_t) = \mathcal N(\mu_\theta, \sigma_t^2 I)$ with $\sigma_t^2 = \tilde\beta_t$ fixed.
# Its term of the variational bound is a KL divergence between two Gaussians of the same variance, which is a
# squared distance between their means:
#
# $$\begin{aligned}
# D_{KL}\big(q(z_{t-1} \mid z_t, z_0)\,\|\,p_\theta(z_{t-1} \mid z_t)\big)
# &= \frac{1}{2\sigma_t^2}\, \| \tilde\mu_t - \mu_\theta \|^2
#   && \text{equal covariances: only the means differ} \\
# &= \frac{\beta_t^2}{2\sigma_t^2\, \alpha_t (1-\bar\alpha_t)}\,
#   \| \varepsilon - \varepsilon_\theta(z_t, t) \|^2
#   && \text{both means in the } \varepsilon \text{ form above}
# \end{aligned}$$
#
# Ho et al. (sec. 3.4) drop the weight in front and sample t uniformly: the **simplified loss**
# $L_\text{simple} = \mathbb E_{z_0, \varepsilon, t}\, \|\varepsilon - \varepsilon_\theta(z_t, t)\|^2$, which
# gave better samples than the bound itself (their table 2). The weight they dropped, at a few t:

# %%
# (T,): the bound's weight on ||eps - eps_theta||^2 (inf at t = 0, where tilde-beta is 0)
weight = betas**2 / (2 * beta_tilde * (1 - betas) * (1 - alpha_bar))
for t in (1, 10, 100, 500, 999):
    print(f"t = {t:3d}: weight {float(weight[t]):.4f}")

# %% [markdown]
# The bound puts about 150 times more weight on t = 1 than on the middle of the chain: it spends its effort on
# nearly clean steps, where only invisible detail is left, and little on the noisy ones, where the image's
# content is decided. $L_\text{simple}$ weights them all alike. Rombach et al. (eq. 2) use the same loss on
# latents, with the conditioning y (here the digit's class) as an extra input:
#
# $$L = \mathbb E_{z_0, y, \varepsilon, t}\ \big\| \varepsilon - \varepsilon_\theta(z_t, t, y) \big\|^2 .$$

# %% [markdown]
# ## 4. The network: a UNet, built from its parts
#
# $\varepsilon_\theta(z_t, t, y)$ maps a noisy latent to a noise estimate of the same shape, so it is an
# image-to-image network: a UNet (Ronneberger et al. 2015) as DDPM uses it (Ho et al., appendix B), with
# Stable Diffusion's block layout so the same classes scale up to SD 1.5. Four pieces, each built here: the
# timestep embedding, a ResBlock that reads it, the down and up paths joined by skip connections, and the
# places where attention sits. (The attention block itself, `SpatialTransformer`, is chapter 04's subject;
# here it is imported.)
#
# ### The timestep embedding
#
# The network must know how noisy its input is. The integer t becomes a vector by the Transformer's sinusoidal
# code (Vaswani et al. 2017, sec. 3.5): for d channels, half of them cosines and half sines of t at
# geometrically spaced frequencies
#
# $$\omega_k = 10000^{-k/(d/2)},\quad k = 0, \dots, d/2 - 1, \qquad
# \text{emb}(t) = \big[\cos(\omega_0 t), \dots, \cos(\omega_{d/2-1} t),\ \sin(\omega_0 t), \dots,
# \sin(\omega_{d/2-1} t)\big].$$
#
# The fast frequencies tell neighbouring steps apart; the slow ones say roughly where in [0, T) t lies. Stable
# Diffusion puts the cosines first (diffusers: `flip_sin_to_cos=True`) and divides by d/2 exactly
# (`downscale_freq_shift=0`; DDPM's own UNet used d/2 - 1).

# %%
from diffusers.models.embeddings import get_timestep_embedding


def sinusoidal_embedding(t, dim, max_period=10_000.0):
    """t: (B,) timesteps -> (B, dim), Stable Diffusion's settings (cosines first, frequencies over dim/2)."""
    k = torch.arange(dim // 2, dtype=torch.float32)
    omega = torch.exp(-math.log(max_period) * k / (dim // 2))  # (dim/2,): 1 down to ~1/max_period
    angles = t.float()[:, None] * omega[None, :]  # (B, 1) * (1, dim/2) -> (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


t_all = torch.arange(T)
ours = sinusoidal_embedding(t_all, 320)
theirs = get_timestep_embedding(t_all, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
print(
    f"max |ours - diffusers' get_timestep_embedding| over t = 0..{T - 1}, d = 320: "
    f"{float((ours - theirs).abs().max()):.1e}"
)

fig = Figure(figsize=(7, 2.4))
ax = fig.subplots()
codes = sinusoidal_embedding(t_all, 64).T  # (64, T): one column per timestep
image = ax.imshow(codes.numpy(), aspect="auto", cmap="RdBu_r", interpolation="nearest")
ax.set_xlabel("timestep t")
ax.set_ylabel("channel (cos 0-31, sin 32-63)")
ax.set_title("sinusoidal embedding, d = 64", fontsize=10)
fig.colorbar(image, ax=ax, fraction=0.03)
fig.tight_layout()
show(fig)

# %% [markdown]
# *Figure: each column is one timestep's 64 numbers. The first channels of each half oscillate fast (they
# change between t and t + 1); the last ones change slowly across the whole range: together they pin t down.*
#
# Exercise 5 (`timestep_embedding`) writes it with all of diffusers' options.
#
# An MLP (`linear_1`, SiLU, `linear_2`) widens the code to 4x the base width, the vector every ResBlock reads.
# A class-conditional model adds a learned embedding of the label y to it.
#
# ### A ResBlock with time injection
#
# Two 3x3 convolutions, each after GroupNorm and SiLU, with a residual connection (a 1x1 conv on it when the
# width changes). Between the convolutions the time embedding, projected to one number per channel, is **added
# to every position**: a per-channel shift that tells each feature map the noise level.


# %%
class TimeMLP(nn.Module):
    """emb(t) (B, C_0) -> linear_1, SiLU, linear_2 -> temb (B, 4 C_0)."""

    def __init__(self, *, dim, time_dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, t_code):
        return self.linear_2(F.silu(self.linear_1(t_code)))


class ResBlock(nn.Module):
    """x (B, C_in, H, W), temb (B, T_dim) -> (B, C_out, H, W)."""

    def __init__(self, *, c_in, c_out, time_dim, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.conv_shortcut = nn.Conv2d(c_in, c_out, 1)
        else:
            self.conv_shortcut = None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        shift = self.time_emb_proj(F.silu(temb))  # (B, C_out): one number per channel
        h = h + shift[:, :, None, None]  # broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Resample(nn.Module):
    """Halve H, W with a stride-2 conv, or double them: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, *, channels, down):
        super().__init__()
        self.down = down
        stride = 2 if down else 1
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1)

    def forward(self, x):
        if not self.down:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


# %% [markdown]
# ### The down and up paths, with skip connections
#
# The down path is a few **levels**: at each, `n` ResBlocks at one resolution, then a stride-2 conv halves it
# (not after the last level). Every intermediate output is kept as a **skip**. A bottleneck (mid block) works
# at the lowest resolution. The up path mirrors the down path with one more ResBlock per level, each first
# concatenating a skip of the same resolution (last in, first out) to its input: the decoder gets back the
# fine detail that the bottleneck squeezed out.
#
# **Where attention sits.** At the levels marked for attention, each ResBlock is followed by a transformer
# block on the feature map's positions: self-attention (every position looks at every other: global layout),
# then cross-attention (every position looks at the text tokens: that is how a prompt steers the image), then
# an MLP. The mid block is ResBlock, transformer, ResBlock. The Digits model here has no attention (8x8
# latents and a class label added to the time embedding); Stable Diffusion has it at its three highest
# resolutions and in the middle.

# %%
from common.attention import SpatialTransformer  # chapter 04 builds it: self-attn, cross-attn, MLP


def attention_layer(channels, heads, context_dim, groups):
    return SpatialTransformer(
        channels=channels,
        heads=heads,
        dim_head=channels // heads,
        context_dim=context_dim,
        depth=1,
        norm_num_groups=groups,
    )


class DownLevel(nn.Module):
    """n x (ResBlock [+ transformer]), then an optional halving; pushes every output onto ``skips``."""

    def __init__(self, *, c_in, c_out, n_layers, time_dim, groups, downsample, heads=None, context_dim=None):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(n_layers):
            width_in = c_in if i == 0 else c_out
            self.resnets.append(ResBlock(c_in=width_in, c_out=c_out, time_dim=time_dim, groups=groups))
        self.attentions = None
        if heads is not None:
            self.attentions = nn.ModuleList()
            for _ in range(n_layers):
                self.attentions.append(attention_layer(c_out, heads, context_dim, groups))
        self.downsamplers = None
        if downsample:
            self.downsamplers = nn.ModuleList([Resample(channels=c_out, down=True)])

    def forward(self, x, temb, context, skips):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)  # (B, C_out, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C_out, H/2, W/2)
            skips.append(x)
        return x


class MidLevel(nn.Module):
    """ResBlock, then (transformer, ResBlock) when the UNet has attention: the bottleneck."""

    def __init__(self, *, channels, time_dim, groups, heads=None, context_dim=None):
        super().__init__()
        first = ResBlock(c_in=channels, c_out=channels, time_dim=time_dim, groups=groups)
        self.resnets = nn.ModuleList([first])
        self.attentions = None
        if heads is not None:
            self.attentions = nn.ModuleList([attention_layer(channels, heads, context_dim, groups)])
            self.resnets.append(ResBlock(c_in=channels, c_out=channels, time_dim=time_dim, groups=groups))

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x, context)
            x = self.resnets[1](x, temb)
        return x


class UpLevel(nn.Module):
    """n x (concatenate a skip, ResBlock [+ transformer]), then an optional doubling."""

    def __init__(self, *, skip_widths, c_in, c_out, time_dim, groups, upsample, heads=None, context_dim=None):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i, skip_width in enumerate(skip_widths):
            width_in = c_in if i == 0 else c_out
            resnet = ResBlock(c_in=width_in + skip_width, c_out=c_out, time_dim=time_dim, groups=groups)
            self.resnets.append(resnet)
        self.attentions = None
        if heads is not None:
            self.attentions = nn.ModuleList()
            for _ in skip_widths:
                self.attentions.append(attention_layer(c_out, heads, context_dim, groups))
        self.upsamplers = None
        if upsample:
            self.upsamplers = nn.ModuleList([Resample(channels=c_out, down=False)])

    def forward(self, x, temb, context, skips):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C_x + C_skip, H, W)
            x = resnet(x, temb)  # (B, C_out, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C_out, 2H, 2W)
        return x


# %% [markdown]
# Assembled: `conv_in`, the time MLP (and the class embedding), the levels down, the mid block, the levels up,
# then GroupNorm, SiLU and `conv_out` back to the latent's 4 channels. The module names are diffusers'
# (`down_blocks.0.resnets.1.conv1`, ...), so a `UNet2DConditionModel` state dict loads into it unchanged.


# %%
class ScratchUNet(nn.Module):
    """eps_theta(z_t, t, context, class_labels): z_t (B, 4, H, W) -> (B, 4, H, W)."""

    def __init__(
        self,
        *,
        widths,
        layers_per_block,
        attention,
        heads=None,
        context_dim=None,
        groups=32,
        num_classes=None,
        latent_channels=4,
    ):
        super().__init__()
        time_dim = 4 * widths[0]
        self.widths = widths
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.time_embedding = TimeMLP(dim=widths[0], time_dim=time_dim)
        self.class_embedding = None
        if num_classes is not None:
            self.class_embedding = nn.Embedding(num_classes, time_dim)

        self.down_blocks = nn.ModuleList()
        skip_widths = [widths[0]]  # the widths of the skips, in the order the down path pushes them
        for i, width in enumerate(widths):
            is_last = i == len(widths) - 1
            level = DownLevel(
                c_in=widths[max(i - 1, 0)],
                c_out=width,
                n_layers=layers_per_block,
                time_dim=time_dim,
                groups=groups,
                downsample=not is_last,
                heads=heads if attention[i] else None,
                context_dim=context_dim,
            )
            self.down_blocks.append(level)
            skip_widths += [width] * layers_per_block
            if not is_last:
                skip_widths.append(width)

        mid_heads = heads if context_dim is not None else None
        self.mid_block = MidLevel(
            channels=widths[-1], time_dim=time_dim, groups=groups, heads=mid_heads, context_dim=context_dim
        )

        self.up_blocks = nn.ModuleList()
        width_in = widths[-1]
        for i in reversed(range(len(widths))):
            level_skips = [skip_widths.pop() for _ in range(layers_per_block + 1)]
            level = UpLevel(
                skip_widths=level_skips,
                c_in=width_in,
                c_out=widths[i],
                time_dim=time_dim,
                groups=groups,
                upsample=i > 0,
                heads=heads if attention[i] else None,
                context_dim=context_dim,
            )
            self.up_blocks.append(level)
            width_in = widths[i]

        self.conv_norm_out = nn.GroupNorm(groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], latent_channels, 3, padding=1)

    def forward(self, z_t, t, context=None, class_labels=None):
        B = z_t.shape[0]
        t = torch.as_tensor(t).reshape(-1).expand(B)  # (B,)
        temb = self.time_embedding(sinusoidal_embedding(t, self.widths[0]))  # (B, 4 C_0)
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(class_labels)
        x = self.conv_in(z_t)  # (B, C_0, H, W)
        skips = [x]
        for level in self.down_blocks:
            x = level(x, temb, context, skips)
        x = self.mid_block(x, temb, context)
        for level in self.up_blocks:
            x = level(x, temb, context, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 4, H, W)


# %% [markdown]
# The shipped Digits model (`checkpoints/ldm_digits`, trained by `train_ldm.py`) is this UNet at widths (32,
# 64), two ResBlocks per level, no attention, and 11 class embeddings (the digits and a "null" class, used
# below for guidance). Load its weights into the scratch UNet and into `common.unet.UNet`, and feed both the
# same inputs:

# %%
LDM = CKPT / "ldm_digits"
ldm_weights = load_file(str(LDM / "diffusion_pytorch_model.safetensors"))
scratch = ScratchUNet(
    widths=(32, 64), layers_per_block=2, attention=(False, False), groups=32, num_classes=11
)
print(scratch.load_state_dict(ldm_weights))  # strict: every name and shape must match
library_unet = UNet(unet_config_from_diffusers(json.loads((LDM / "config.json").read_text())))
library_unet.load_state_dict(ldm_weights)
g = torch.Generator().manual_seed(0)
z_probe = torch.randn(4, 4, 8, 8, generator=g)
t_probe = torch.tensor([999, 600, 250, 3])
y_probe = torch.tensor([0, 3, 7, 10])
with torch.no_grad():
    out_scratch = scratch(z_probe, t_probe, class_labels=y_probe)
    out_library = library_unet(z_probe, t_probe, class_labels=y_probe)
print(
    f"{sum(p.numel() for p in scratch.parameters()):,} parameters; output {tuple(out_scratch.shape)}; "
    f"max |scratch - common.unet.UNet| = {float((out_scratch - out_library).abs().max()):.1e}"
)

# %% [markdown]
# ### Scaled up: Stable Diffusion 1.5's UNet
#
# The same classes at SD 1.5's settings: widths (320, 640, 1280, 1280), two ResBlocks per level, attention at
# the first three levels and in the middle, 8 heads, a 768-wide text context (CLIP ViT-L/14's), 64 x 64 x 4
# latents for 512 px images. The drawing shows where everything sits, with the tensor shapes on the arrows (B
# the batch).


# %%
def draw_sd15_unet():
    """conv_in, the four down levels, the mid block, the four up levels and conv_out; shapes on the arrows."""
    fig = Figure(figsize=(10, 7))
    ax = fig.subplots()
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.4, 7.6)
    ax.axis("off")
    plain = dict(boxstyle="round,pad=0.3", fc="#eef3fb", ec="#4a6fa5")
    with_attention = dict(boxstyle="round,pad=0.3", fc="#fdf1e2", ec="#c07a2c")
    arrow = dict(arrowstyle="-|>", color="#333333", lw=1.0)
    skip_arrow = dict(arrowstyle="-|>", color="#888888", lw=0.8, ls="--")
    levels = [(320, 64, True), (640, 32, True), (1280, 16, True), (1280, 8, False)]  # width, side, attention
    row_y = [5.3, 4.0, 2.7, 1.4]  # one row per resolution
    x_down, x_up = 1.8, 8.2
    # the input and output convolutions
    ax.text(x_down, 6.6, "conv_in", ha="center", va="center", fontsize=9, bbox=plain)
    ax.text(x_down, 7.3, "z_t  (B, 4, 64, 64)", ha="center", va="center", fontsize=9)
    ax.annotate("", xy=(x_down, 5.8), xytext=(x_down, 6.35), arrowprops=arrow)
    ax.text(x_down + 0.1, 6.08, "(B, 320, 64, 64)", fontsize=8, va="center")
    ax.text(x_up, 6.6, "GroupNorm, SiLU, conv_out", ha="center", va="center", fontsize=9, bbox=plain)
    ax.text(x_up, 7.3, "eps_theta  (B, 4, 64, 64)", ha="center", va="center", fontsize=9)
    ax.annotate("", xy=(x_up, 6.35), xytext=(x_up, 5.8), arrowprops=arrow)
    ax.text(x_up + 0.1, 6.08, "(B, 320, 64, 64)", fontsize=8, va="center")
    # what every block reads besides the feature map
    time_text = "t -> sinusoid (B, 320) -> MLP -> temb (B, 1280):\nadded inside every ResBlock"
    context_text = "text context (B, 77, 768): keys and values\nof the cross-attention in every Transformer"
    ax.text(
        5.0,
        7.1,
        time_text,
        ha="center",
        va="center",
        fontsize=8.5,
        bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="#999999"),
    )
    ax.text(
        5.0,
        6.2,
        context_text,
        ha="center",
        va="center",
        fontsize=8.5,
        bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="#c07a2c"),
    )
    for i, (width, side, attention) in enumerate(levels):
        style = with_attention if attention else plain
        down_blocks = "2 x (ResBlock + Transformer)" if attention else "2 x ResBlock"
        down_then = "\nthen a stride-2 conv" if i < 3 else ""
        ax.text(
            x_down,
            row_y[i],
            f"down {i}: {down_blocks}{down_then}\n{width} ch at {side} x {side}",
            ha="center",
            va="center",
            fontsize=8.5,
            bbox=style,
        )
        up_blocks = "3 x (ResBlock + Transformer)" if attention else "3 x ResBlock"
        up_then = "\nthen x2 upsample" if i > 0 else ""
        ax.text(
            x_up,
            row_y[i],
            f"up {3 - i}: {up_blocks}{up_then}\n{width} ch at {side} x {side}",
            ha="center",
            va="center",
            fontsize=8.5,
            bbox=style,
        )
        ax.annotate("", xy=(x_up - 1.75, row_y[i]), xytext=(x_down + 1.75, row_y[i]), arrowprops=skip_arrow)
        ax.text(5.0, row_y[i] + 0.12, f"3 skips at {side} x {side}", ha="center", fontsize=8, color="#555555")
        if i < 3:
            half = side // 2
            below, above = row_y[i + 1] + 0.5, row_y[i] - 0.5
            ax.annotate("", xy=(x_down, below), xytext=(x_down, above), arrowprops=arrow)
            ax.text(
                x_down + 0.1,
                (row_y[i] + row_y[i + 1]) / 2,
                f"(B, {width}, {half}, {half})",
                fontsize=8,
                va="center",
            )
            ax.annotate("", xy=(x_up, above), xytext=(x_up, below), arrowprops=arrow)
            next_width = levels[i + 1][0]
            ax.text(
                x_up + 0.1,
                (row_y[i] + row_y[i + 1]) / 2,
                f"(B, {next_width}, {side}, {side})",
                fontsize=8,
                va="center",
            )
    ax.text(
        5.0,
        0.1,
        "mid: ResBlock, Transformer, ResBlock\n1280 ch at 8 x 8",
        ha="center",
        va="center",
        fontsize=8.5,
        bbox=with_attention,
    )
    ax.annotate("", xy=(3.3, 0.1), xytext=(x_down, 1.0), arrowprops=arrow)
    ax.text(0.3, 0.45, "(B, 1280, 8, 8)", fontsize=8)
    ax.annotate("", xy=(x_up, 1.0), xytext=(6.7, 0.1), arrowprops=arrow)
    ax.text(8.5, 0.45, "(B, 1280, 8, 8)", fontsize=8)
    ax.set_title(
        "Stable Diffusion 1.5's UNet at 512 px (orange: self- and cross-attention after each ResBlock)",
        fontsize=10,
    )
    return fig


show(draw_sd15_unet(), dpi=90)

# %% [markdown]
# *Figure: the down path (left) halves the resolution three times, the up path (right) doubles it back, and
# each level of the up path concatenates the three skips of its resolution. Attention sits at 64, 32 and 16
# and in the 8 x 8 middle; the 8 x 8 outer level is ResBlocks only.*
#
# Count its parameters without allocating them: modules built under `torch.device("meta")` have shapes but no
# storage, so the 3.4 GB of fp32 weights never exist. The same count from `UNetConfig.sd15()` and from
# diffusers' `UNet2DConditionModel` built from the same configuration:

# %%
from diffusers import UNet2DConditionModel


def count(module):
    return sum(p.numel() for p in module.parameters())


with torch.device("meta"):
    sd15_scratch = ScratchUNet(
        widths=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention=(True, True, True, False),
        heads=8,
        context_dim=768,
        groups=32,
    )
    sd15_course = UNet(UNetConfig.sd15())
    sd15_diffusers = UNet2DConditionModel(**unet_config_to_diffusers(UNetConfig.sd15()))
print(f"scratch UNet:          {count(sd15_scratch):,} parameters")
print(f"common.unet.UNet:      {count(sd15_course):,}")
print(f"UNet2DConditionModel:  {count(sd15_diffusers):,}")
same_names = sorted(sd15_scratch.state_dict()) == sorted(sd15_diffusers.state_dict())
print(f"same parameter names as diffusers: {same_names}\n")
rows = []  # (part, side, width, attention, module)
for i, level in enumerate(sd15_scratch.down_blocks):
    rows.append((f"down {i}", 64 // 2**i, sd15_scratch.widths[i], level.attentions is not None, level))
rows.append(("mid", 8, 1280, True, sd15_scratch.mid_block))
for j, level in enumerate(sd15_scratch.up_blocks):
    i = 3 - j  # up level j works at the resolution of down level 3 - j
    rows.append((f"up {j}", 64 // 2**i, sd15_scratch.widths[i], level.attentions is not None, level))
print(f"{'part':<14}{'resolution':>11}{'width':>7}{'attention':>10}{'parameters':>14}")
for part, side, width, has_attention, module in rows:
    print(f"{part:<14}{side:>8} px{width:>7}{str(has_attention):>10}{count(module):>14,}")
rest = count(sd15_scratch) - sum(count(row[-1]) for row in rows)
print(f"{'in, out, time':<14}{'':>11}{'':>7}{'':>10}{rest:>14,}")
wide = sum(count(row[-1]) for row in rows if row[2] == 1280)
finest = sum(count(row[-1]) for row in rows if row[1] == 64)
print(
    f"\nat width 1280: {wide / count(sd15_scratch):.0%} of the parameters; at 64 x 64: "
    f"{finest / count(sd15_scratch):.1%}"
)

# %% [markdown]
# Most of the 860 M parameters sit in the 1280-wide levels at 16 x 16 and 8 x 8, where positions are few and
# channels many; the two 64 x 64 levels hold a few percent, though they see 16 times as many positions as the
# 16 x 16 ones (their self-attention over 4,096 positions is what chapter 05 makes fit in memory). The Digits
# model is the same design a thousand times smaller.

# %% [markdown]
# ## 5. A short training run
#
# The loss of section 3 on the Digits latents, with chapter 03's class-conditional preset
# (`UNetConfig.digits()`: two levels, 8x8 -> 4x4, ResBlocks, a class embedding added to the time embedding),
# here at base width 32 as `train_ldm.py` uses on a CPU. A few steps with the course's `Trainer` show the
# loop; `train_ldm.py` runs the same loss for real.

# %%
import dataclasses

from common.training import TrainConfig, Trainer

config = dataclasses.replace(UNetConfig.digits(), block_out_channels=(32, 64), norm_num_groups=32)


def loss_fn(unet, batch, generator):
    z0_b, y_b = batch
    t_b = schedule.sample_timesteps(len(z0_b), generator)
    eps_b = torch.randn(z0_b.shape, generator=generator)
    return F.mse_loss(unet(schedule.add_noise(z0_b, eps_b, t_b), t_b, class_labels=y_b), eps_b)


steps = budget(fast=3, cpu=100)
seed_everything(0)
trainer = Trainer(
    UNet(config),
    torch.utils.data.TensorDataset(z0, labels),
    loss_fn,
    TrainConfig(steps=steps, batch_size=64, lr=1e-3, ema_decay=None, log_every=1, progress=False),
    out_dir=Path("/tmp") / "ch03_notebook_run",
    device="cpu",
    resume=False,
)
t0 = time.perf_counter()
trainer.fit()
import csv

log = list(csv.DictReader(open(trainer.log_path)))
print(
    f"{steps} steps in {time.perf_counter() - t0:.1f} s; loss {float(log[0]['loss']):.3f} -> "
    f"{float(log[-1]['loss']):.3f}"
)

# %% [markdown]
# The loss of an eps-predictor starts near 1 (the variance of eps) and falls as the model learns to see the
# digit through the noise. The real run (`train_ldm.py`, a few thousand steps) is shipped; load its EMA
# weights, saved in diffusers' `UNet2DConditionModel` layout, with the schedule it was trained under.

# %%
LDM = CKPT / "ldm_digits"
unet = UNet(unet_config_from_diffusers(json.loads((LDM / "config.json").read_text())))
unet.load_state_dict(load_file(str(LDM / "diffusion_pytorch_model.safetensors")))
unet.eval()
schedule = NoiseSchedule.from_diffusers(json.loads((LDM / "scheduler_config.json").read_text()))
scale = json.loads((LDM / "ldm.json").read_text())["scaling_factor"]
classifier = DigitClassifier.load(CKPT / "digits_classifier")
print(
    f"UNet {sum(p.numel() for p in unet.parameters()):,} parameters, "
    f"widths {unet.config.block_out_channels}; schedule {schedule.beta_schedule}, "
    f"{schedule.prediction_type}; scaling factor {scale:.4f}"
)
if (LDM / "README.md").exists():  # the model card train_ldm.py wrote: how it was trained
    card = (LDM / "README.md").read_text()
    print(*(line for line in card.splitlines() if line.startswith(("- Training", "- Wall time"))), sep="\n")

# %% [markdown]
# The model was trained with 10% of its labels replaced by an 11th "null" class, so it also knows the
# unconditional distribution. **Classifier-free guidance** (Ho & Salimans 2022) extrapolates from the
# unconditional prediction towards the conditional one, eps_u + w (eps_c - eps_u); w = 1 is the plain
# class-conditional model. The shipped run is short and still blurs its classes at w = 1; guidance sharpens
# them: at w = 4 every sampler scores 97.5-100% (the model card), at w = 1 the deterministic
# ones 86-88% (section 7).

# %%
W = 4.0  # the guidance scale train_ldm.py --guidance 4 graded the shipped model with
null = unet.config.num_class_embeds - 1


def guided(y, w=W):
    """denoise_fn(z, t) with classifier-free guidance for the labels y (one batch of 2B through the UNet)."""

    def denoise(z, t):
        eps_c, eps_u = unet(
            torch.cat([z, z]), t, class_labels=torch.cat([y, torch.full_like(y, null)])
        ).chunk(2)
        return eps_u + w * (eps_c - eps_u)

    return denoise


# %% [markdown]
# ### Samples over training
#
# What does the model know after 250 steps, or 1,000? `train_ldm.py` kept the EMA weights of the UNet at steps
# 0, 250 and 1,000 of a run with the shipped model's recipe (`checkpoints/ldm_digits_progress`; its card gives
# the command and how it relates to the shipped run), with the loss it logged. Each snapshot below, and the
# shipped 6,000-step model, samples from the same noise with the same sampler (DDIM, 20 steps, w = 4) for the
# digits 0-9; the classifier grades each snapshot on the samples it drew.

# %%
PROGRESS = CKPT / "ldm_digits_progress"
snapshots = {
    int(path.stem.split("_")[1]): load_file(str(path))  # {step: EMA weights}
    for path in sorted(PROGRESS.glob("step_*.safetensors"))
}
snapshots[6000] = {k: v.clone() for k, v in unet.state_dict().items()}  # the shipped model
per_digit = budget(fast=2, cpu=20)
y_p = torch.arange(10).repeat_interleave(per_digit)  # (10 * per_digit,) digits asked for
z_T_p = torch.randn(len(y_p), 4, 8, 8, generator=torch.Generator().manual_seed(3))
sampler_p = DDIMSampler(schedule, budget(fast=5, cpu=20), timestep_spacing="trailing")
snapshot_unet = UNet(unet.config).eval()


def guided_by(model, y, w=W):
    """Classifier-free guidance as in `guided`, for any UNet with a null class."""

    def denoise(z, t):
        y_both = torch.cat([y, torch.full_like(y, null)])  # (2B,): the labels, then the null class
        eps_c, eps_u = model(torch.cat([z, z]), t, class_labels=y_both).chunk(2)
        return eps_u + w * (eps_c - eps_u)

    return denoise


rows_p, accuracy_p = [], {}
for step, weights in snapshots.items():
    snapshot_unet.load_state_dict(weights)
    with torch.no_grad():
        z_gen = sample_loop(guided_by(snapshot_unet, y_p), z_T_p, sampler_p)
        images = vae.decode(z_gen / scale).clamp(-1, 1).mean(1, keepdim=True)  # (10 * per_digit, 1, 32, 32)
    accuracy_p[step] = conditional_accuracy(classifier, images, y_p)
    rows_p.append(torch.cat(list(images[::per_digit, 0]), dim=1))  # digits 0-9 side by side: (32, 320)
    print(f"step {step:>5}: classifier accuracy {accuracy_p[step]:.3f} on {len(y_p)} samples")

# %%
import csv

log_p = list(csv.DictReader(open(PROGRESS / "log.csv")))
fig = Figure(figsize=(11, 3.4))
ax_loss, ax_grid = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
ax_loss.plot([int(r["step"]) for r in log_p], [float(r["loss"]) for r in log_p], lw=1)
for step in snapshots:
    if step <= int(log_p[-1]["step"]):
        ax_loss.axvline(step, color="grey", ls=":", lw=1)
ax_loss.set_xlabel("training step")
ax_loss.set_ylabel("loss (one batch of 64, every 25 steps)")
ax_loss.set_title("loss of the run that kept the snapshots", fontsize=10)
ax_grid.imshow(torch.cat(rows_p, dim=0).numpy(), cmap="gray", vmin=-1, vmax=1)  # (rows * 32, 320)
ax_grid.set_xticks([32 * k + 16 for k in range(10)], [str(k) for k in range(10)])
ax_grid.set_yticks(
    [32 * k + 16 for k in range(len(rows_p))],
    [f"step {s:,}\nacc {accuracy_p[s]:.2f}" for s in snapshots],
    fontsize=8,
)
ax_grid.set_title(f"samples (DDIM {sampler_p.num_inference_steps}, w = {W}) from the same noise", fontsize=10)
fig.tight_layout()
show(fig)

# %% [markdown]
# *Figure: left, the loss of every 25th step of the run that kept the snapshots (dotted: steps 250 and 1,000);
# right, the first sample of each digit from each snapshot, same noise in every row.* On 200 samples per
# snapshot the classifier reads 0.105, 0.085, 0.800 and 0.995 of them as the digit asked for: chance (0.1) at
# steps 0 and 250, most digits at 1,000, nearly all at 6,000.
#
# Note the mismatch between the two panels. By step 250 the loss has already fallen from 0.77 to about 0.2,
# most of the way to where it ends, yet the samples are still blobs. A likely reason: the loss averages over
# all noise levels, and the easy part, denoising slightly noisy latents, is learned first; the part that makes
# a digit appear from pure noise, the high-t predictions the sampler relies on in its first steps, comes later
# and moves the average little. From step 1,000 to 6,000 the loss falls only from about 0.15 (single batches
# read 0.12-0.20) to 0.11 (the shipped model's card), while the samples go from 80% legible, with broken
# strokes, to clean. A loss curve alone does not tell you when a diffusion model is done: sample it.

# %% [markdown]
# ## 6. Sampling: from the noise prediction back to a digit
#
# ### What the model sees at each noise level
#
# The naive sampler: the network's noise estimate gives an estimate of the clean latent in one jump,
# $\hat z_0 = (z_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$ (the forward closed form
# solved for $z_0$). Why not stop there? Noise real latents to each t, ask the shipped model, and measure both
# errors, beside the error of the best guess that ignores $z_t$ and knows only the class (the class's mean
# latent).

# %%
n_probe = budget(fast=64, cpu=512)
z0_eval, y_eval = z0[:n_probe], labels[:n_probe]
print(
    f"latents scaled by {vae.config.scaling_factor:.5f} (the VAE's factor); the model was trained with "
    f"{scale:.5f}"
)
class_means = torch.stack([z0_eval[y_eval == c].mean(0) for c in range(10)])  # (10, 4, 8, 8)
within_class = float(((z0_eval - class_means[y_eval]) ** 2).mean())  # MSE of guessing the class mean
t_grid = torch.linspace(0, T - 1, budget(fast=6, cpu=25)).round().long()
g = torch.Generator().manual_seed(0)
mse_eps, mse_z0, snr_grid = [], [], []
with torch.no_grad():
    for t in t_grid:
        eps = torch.randn(z0_eval.shape, generator=g)
        z_t = schedule.add_noise(z0_eval, eps, t)
        eps_hat = unet(z_t, t, class_labels=y_eval)
        z0_hat = (z_t - (1 - schedule.alpha_bar[t]).sqrt() * eps_hat) / schedule.alpha_bar[t].sqrt()
        mse_eps.append(float(F.mse_loss(eps_hat, eps)))
        mse_z0.append(float(F.mse_loss(z0_hat, z0_eval)))
        snr_grid.append(float(schedule.snr(t)))
ratio_error = max(abs(e / (x * s) - 1) for e, x, s in zip(mse_eps, mse_z0, snr_grid))
print(f"MSE(eps) / (SNR(t) MSE(z0)) - 1: at most {ratio_error:.1e} over the grid (the identity below)")
print(f"guessing the class's mean latent: MSE {within_class:.3f}")
for k in (0, len(t_grid) // 2, len(t_grid) - 1):
    print(
        f"t = {int(t_grid[k]):3d}: MSE of the one-jump z0 {mse_z0[k]:.4f}, of eps {mse_eps[k]:.4f}, "
        f"SNR {snr_grid[k]:.4f}"
    )
crossing = next((int(t) for t, e in zip(t_grid, mse_z0) if e > within_class), None)
print(f"the one-jump z0 is worse than the class mean from t = {crossing} of the grid on")

fig = Figure(figsize=(6.5, 3.0))
ax = fig.subplots()
ax.semilogy(t_grid.numpy(), mse_z0, "o-", ms=3, label="error of the one-jump $\\hat z_0$")
ax.semilogy(t_grid.numpy(), mse_eps, "s-", ms=3, label="error of $\\hat\\varepsilon$ (the training loss)")
ax.axhline(within_class, color="grey", ls="--", lw=1, label="guessing the class's mean latent")
ax.set_xlabel("t")
ax.set_ylabel("mean squared error")
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
show(fig)

# %% [markdown]
# *Figure: at small t the one-jump estimate of the clean latent is nearly exact while the noise estimate is
# poor (at t = 0 the noise is a ripple of a few percent on the latent, hard to make out); at large t it is the
# other way round. At the noisiest steps the one-jump latent is even worse than guessing the class's mean
# latent (the dashed line; the printout gives the numbers and where the curves cross), yet the training loss
# there is tiny.* The two errors are tied exactly: from the forward closed form,
# $z_0 - \hat z_0 = -\sqrt{(1-\bar\alpha_t)/\bar\alpha_t}\,(\varepsilon - \hat\varepsilon)$, so
#
# $$\|\varepsilon - \hat\varepsilon\|^2 = \mathrm{SNR}(t)\ \|z_0 - \hat z_0\|^2 ,\qquad
# \mathrm{SNR}(t) = \frac{\bar\alpha_t}{1-\bar\alpha_t} .$$
#
# Training on the noise is training on the clean latent with each t weighted by its SNR: heavily where $z_0$
# is recoverable, hardly at all at the noisiest steps (at t = 999 the SNR is about 0.005, so a clean-latent
# error of 1.7 costs under 0.01 of loss). A network trained to predict $z_0$ directly with an unweighted loss
# spends its capacity the other way, on the noisiest steps, where even the best possible answer is a blur.
# Decoded, the one-jump estimates look like this:

# %%
ts_jump = [999, 800, 600, 400, 200, 50]
y_show = torch.tensor([0, 3, 5, 8])
z0_show = torch.stack([z0_eval[y_eval == int(c)][0] for c in y_show])  # one real latent per class
eps_show = torch.randn(z0_show.shape, generator=torch.Generator().manual_seed(3))
jumps = []
with torch.no_grad():
    for t in ts_jump:
        z_t = schedule.add_noise(z0_show, eps_show, t)
        z0_hat = schedule.eps_to_x0(unet(z_t, t, class_labels=y_show), z_t, t)
        jumps.append(vae.decode(z0_hat / scale).clamp(-1, 1).mean(1, keepdim=True))
show(plot_trajectory(jumps, ts_jump, size=1.0, title="one jump from z_t to the predicted clean latent"))

# %% [markdown]
# *Figure: rows are four real digits (0, 3, 5, 8), noised to the t of each column and sent back in one jump.
# At t = 999 the jump lands on a smudge, at t = 800 on a rough digit of the right class; from t = 600 down the
# digit is sharp and hardly changes with t.* This is why samplers take many small steps: each step moves only
# part of the way towards $\hat z_0$, re-noises, and asks again with a sharper $z_t$. The posterior step of
# section 3 does exactly that (DDPM, 1000 steps). The next two samplers take larger steps.
#
# ### DDIM: a non-Markovian process with the same marginals
#
# $L_\text{simple}$ only ever sees the marginals $q(z_t \mid z_0)$, never the chain that links them. Song et
# al. (2021) exploit that: any process with those marginals is trained by the same loss. Their family, for a
# free $\sigma_t \ge 0$,
#
# $$q_\sigma(z_{t-1} \mid z_t, z_0) = \mathcal N\Big(\sqrt{\bar\alpha_{t-1}}\, z_0 + \sqrt{1-\bar\alpha_{t-1}
# - \sigma_t^2}\ \frac{z_t - \sqrt{\bar\alpha_t}\, z_0}{\sqrt{1-\bar\alpha_t}},\ \sigma_t^2 I\Big).$$
#
# **It keeps the marginals.** If $z_t \sim q(z_t \mid z_0)$, the fraction is
# $\varepsilon \sim \mathcal N(0, I)$, so
# $z_{t-1} = \sqrt{\bar\alpha_{t-1}}\, z_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,\varepsilon + \sigma_t\xi$:
# a Gaussian with mean $\sqrt{\bar\alpha_{t-1}}\, z_0$ and variance
# $(1-\bar\alpha_{t-1}-\sigma_t^2) + \sigma_t^2 = 1-\bar\alpha_{t-1}$, which is $q(z_{t-1} \mid z_0)$; by
# induction downwards from T, every marginal is right. The forward process this defines is not Markov ($z_t$
# depends on $z_0$ as well as $z_{t-1}$). Sampling puts the model's estimates in place of $z_0$ and
# $\varepsilon$ (Song et al., eq. 12):
#
# $$z_{t-1} = \sqrt{\bar\alpha_{t-1}}\,\hat z_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\ \hat\varepsilon
# + \sigma_t\,\xi, \qquad
# \sigma_t(\eta) = \eta\,\sqrt{\frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}}\
# \sqrt{1-\frac{\bar\alpha_t}{\bar\alpha_{t-1}}}
# \quad\text{(eq. 16)} .$$
#
# - **eta = 0:** no noise is ever added: $z_T$ fixes $z_0$, a deterministic map (and an ODE solver, below).
# - **eta = 1:** $\sigma_t^2 = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}(1-\alpha_t) = \tilde\beta_t$, DDPM's
#   posterior variance. The mean is DDPM's too: with
#   $1-\bar\alpha_{t-1}-\tilde\beta_t = \alpha_t(1-\bar\alpha_{t-1})^2/(1-\bar\alpha_t)$ (because
#   $1-\bar\alpha_t-\beta_t = \alpha_t(1-\bar\alpha_{t-1})$) the $\hat\varepsilon$ term becomes
#   $\frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}(z_t - \sqrt{\bar\alpha_t}\hat z_0)$, and
#   collecting $\hat z_0$ gives $\sqrt{\bar\alpha_{t-1}}\,\beta_t/(1-\bar\alpha_t)$: $\tilde\mu_t$ exactly.
#   DDIM at eta = 1 *is* DDPM.
#
# On a chain that skips timesteps (t' = t - 50 for 20 steps), the same formulas hold with $\bar\alpha_{t-1}$
# read as $\bar\alpha_{t'}$ and $\alpha_t = \bar\alpha_t/\bar\alpha_{t'}$. All three claims, measured:

# %%
t_range = torch.arange(1, T)
a_t, a_prev = alpha_bar[t_range], alpha_bar[t_range - 1]  # (T - 1,) each
sigma_eta1_sq = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # eq. 16 squared, eta = 1
rel = float(((sigma_eta1_sq - beta_tilde[t_range]) / beta_tilde[t_range]).abs().max())
print(f"sigma_t(eta = 1)^2 against tilde-beta_t, t = 1..{T - 1}: max relative difference {rel:.1e}")

y10 = torch.arange(10)
z_T = torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(1))
denoise = lambda z, t: unet(z, t, class_labels=y10)  # noqa: E731  (the plain class-conditional model)
n_chain = budget(fast=5, cpu=20)
ddim_eta1 = DDIMSampler(schedule, n_chain, eta=1.0, timestep_spacing="trailing", set_alpha_to_one=True)
ddpm_chain = DDPMSampler(schedule, n_chain, timestep_spacing="trailing")
run_ddim_eta1 = sample_loop(denoise, z_T, ddim_eta1, generator=5)
run_ddpm = sample_loop(denoise, z_T, ddpm_chain, generator=5)
print(
    f"DDIM eta = 1 against DDPM, {n_chain} steps, same generator: max |diff| = "
    f"{float((run_ddim_eta1 - run_ddpm).abs().max()):.1e}"
)
ddim_eta0 = DDIMSampler(schedule, n_chain, eta=0.0, timestep_spacing="trailing", set_alpha_to_one=True)
run_a = sample_loop(denoise, z_T, ddim_eta0, generator=5)
run_b = sample_loop(denoise, z_T, ddim_eta0, generator=6)
run_c = sample_loop(denoise, z_T, ddim_eta1, generator=6)
print(f"eta = 0, generators 5 and 6: max |diff| = {float((run_a - run_b).abs().max()):.1e} (deterministic)")
print(
    f"eta = 1, generators 5 and 6: max |diff| = {float((run_ddim_eta1 - run_c).abs().max()):.2f} (stochastic)"
)

# %% [markdown]
# The eta = 0 step by hand (eq. 12 with $\sigma_t = 0$): turn the noise prediction into $\hat z_0$, then step
# to the previous noise level along the same direction. A 20-step loop written out, against the course's
# `DDIMSampler` from the same noise:

# %%
n_steps = 20
sampler = DDIMSampler(schedule, n_steps, timestep_spacing="trailing")
y = torch.arange(10)
z = z_T.clone()
with torch.no_grad():
    for t in sampler.timesteps:
        eps_hat = unet(z, t, class_labels=y)
        a_t = schedule.alpha_bar[t]
        t_prev = int(t) - T // n_steps
        a_prev = (
            schedule.alpha_bar[t_prev] if t_prev >= 0 else schedule.alpha_bar[0]
        )  # SD's set_alpha_to_one=False
        z0_hat = (z - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        z = a_prev.sqrt() * z0_hat + (1 - a_prev).sqrt() * eps_hat
ours = z
theirs = sample_loop(lambda z, t: unet(z, t, class_labels=y), z_T, sampler)
print(f"max |hand-written DDIM - common.samplers| = {float((ours - theirs).abs().max()):.1e}")

# %% [markdown]
# ### DPM-Solver++: an exponential integrator in log-SNR
#
# With eta = 0 the sampler follows an ODE, the probability-flow ODE of the diffusion (Song et al. 2021b). Lu
# et al. (2022) solve it in better coordinates. Write $\alpha_t = \sqrt{\bar\alpha_t}$ and
# $\sigma_t = \sqrt{1-\bar\alpha_t}$ (so $z_t = \alpha_t z_0 + \sigma_t\varepsilon$) and the half log-SNR
# $\lambda_t = \log(\alpha_t/\sigma_t)$, which grows as the noise shrinks. In terms of the data prediction
# $x_\theta(z_t, t) = \hat z_0$ the ODE is (DPM-Solver++, eq. 8, after simplifying its drift and diffusion
# coefficients $f = \tfrac{d\log\alpha}{dt}$,
# $g^2 = \tfrac{d\sigma^2}{dt} - 2\tfrac{d\log\alpha}{dt}\sigma^2$)
#
# $$\frac{dz}{dt} = \frac{d\log\sigma_t}{dt}\, z + \alpha_t \frac{d\lambda_t}{dt}\, x_\theta(z_t, t).$$
#
# **Remove the linear part exactly.** Divide by $\sigma_t$ (the product rule, then the ODE):
#
# $$\frac{d}{dt}\frac{z}{\sigma_t} = \frac{1}{\sigma_t} \frac{dz}{dt}
# - \frac{z}{\sigma_t}\frac{d\log\sigma_t}{dt}
# = \frac{\alpha_t}{\sigma_t}\frac{d\lambda_t}{dt}\, x_\theta ,$$
#
# and change the variable from t to $\lambda$ ($\alpha/\sigma = e^\lambda$):
#
# $$\frac{d}{d\lambda}\Big(\frac{z}{\sigma}\Big) = e^{\lambda}\, x_\theta(z_\lambda, \lambda)
# \quad\Longrightarrow\quad
# z_s = \frac{\sigma_s}{\sigma_t}\, z_t + \sigma_s \int_{\lambda_t}^{\lambda_s} e^{\lambda}\,
# x_\theta(z_\lambda, \lambda)\, d\lambda .$$
#
# Only the network's output is approximated; the rest is integrated exactly (an *exponential integrator*).
#
# **First order:** hold $x_\theta$ at its value $\hat z_0$ at t. With $h = \lambda_s - \lambda_t$ and
# $\sigma_s e^{\lambda_s} = \alpha_s$, the integral is
# $\sigma_s(e^{\lambda_s} - e^{\lambda_t})\,\hat z_0 = \alpha_s(1 - e^{-h})\,\hat z_0$:
#
# $$z_s = \frac{\sigma_s}{\sigma_t}\, z_t - \alpha_s\,(e^{-h} - 1)\,\hat z_0 \qquad \text{(DPM-Solver++1)}.$$
#
# This is DDIM: put $\hat\varepsilon = (z_t - \alpha_t\hat z_0)/\sigma_t$ into DDIM's
# $z_s = \alpha_s\hat z_0 + \sigma_s\hat\varepsilon$ and you get
# $\frac{\sigma_s}{\sigma_t}z_t + (\alpha_s - \sigma_s\frac{\alpha_t}{\sigma_t}) \hat z_0$, and
# $\sigma_s\alpha_t/\sigma_t = \alpha_s e^{\lambda_t - \lambda_s} = \alpha_s e^{-h}$. The first step of the
# course's DPM-Solver++ sampler is first order (it has no history yet); against a DDIM step on the same
# timesteps:

# %%
n_dpm = budget(fast=5, cpu=20)  # T / n_dpm a whole number, so DDIM's t - T // n is the next visited t
dpm = DPMSolverPP2MSampler(schedule, n_dpm, timestep_spacing="trailing")
ddim = DDIMSampler(schedule, n_dpm, timestep_spacing="trailing", set_alpha_to_one=True)
t_first = dpm.timesteps[0]
with torch.no_grad():
    eps_first = unet(z_T, t_first, class_labels=y10)
dpm.reset()
step_dpm = dpm.step(eps_first, t_first, z_T)
step_ddim = ddim.step(eps_first, t_first, z_T)
print(
    f"t = {int(t_first)} -> {int(dpm.timesteps[1])}: max |DPM-Solver++ first-order step - DDIM step| = "
    f"{float((step_dpm - step_ddim).abs().max()):.1e}"
)

# %% [markdown]
# Exercise 6 (`dpmpp_first_order_step`) writes this step in its lambda form, graded against DDIM and
# diffusers.
#
# **Second order, multistep (2M).** Use the previous step's prediction too: let $x_\theta$ be linear in
# $\lambda$ through the last two estimates,
#
# $$x_\theta(\lambda) \approx \hat z_0 +
#   (\lambda - \lambda_t)\,\frac{\hat z_0 - \hat z_0^{\text{last}}}{h_\text{last}},
# \qquad h_\text{last} = \lambda_t - \lambda_\text{last} .$$
#
# The extra integral is
# $\sigma_s\int_{\lambda_t}^{\lambda_s} e^\lambda(\lambda - \lambda_t)\,d\lambda = \alpha_s(h - 1 + e^{-h})$;
# DPM-Solver++ replaces $h - 1 + e^{-h}$ by $(1 - e^{-h})\,h/2$ (both are $h^2/2 + O(h^3)$), which folds the
# correction into the first-order formula with
#
# $$D = \hat z_0 + \frac{1}{2r}\big(\hat z_0 - \hat z_0^{\text{last}}\big), \quad r = \frac{h_\text{last}}{h},
# \qquad z_s = \frac{\sigma_s}{\sigma_t}\, z_t - \alpha_s\,(e^{-h} - 1)\, D \qquad \text{(Lu et al. 2022,
# Alg. 2)}.$$
#
# The first step has no history and uses first order; the last lands on $\sigma = 0$ ($h = \infty$), where the
# formula reduces to $z = \hat z_0$. Written out, with the order as a switch:

# %%
alpha_t_all = schedule.alpha_bar.sqrt()  # (T,)
sigma_t_all = (1 - schedule.alpha_bar).sqrt()  # (T,)
lambda_t_all = alpha_t_all.log() - sigma_t_all.log()  # (T,), half log-SNR


def dpm_solver_pp(denoise, z_T, timesteps, order):
    """DPM-Solver++ of order 1 or 2 (multistep) over the descending ``timesteps``, ending at sigma = 0."""
    z = z_T
    z0_last, lambda_last = None, None
    for i, t in enumerate(timesteps):
        z0_hat = schedule.eps_to_x0(denoise(z, t), z, t)
        if i == len(timesteps) - 1:
            return z0_hat  # the step to sigma = 0 lands on the data prediction
        s = timesteps[i + 1]
        h = lambda_t_all[s] - lambda_t_all[t]
        D = z0_hat
        if order == 2 and z0_last is not None:
            r = (lambda_t_all[t] - lambda_last) / h
            D = z0_hat + (z0_hat - z0_last) / (2 * r)
        z = (sigma_t_all[s] / sigma_t_all[t]) * z - alpha_t_all[s] * (torch.exp(-h) - 1) * D
        z0_last, lambda_last = z0_hat, lambda_t_all[t]


from diffusers import DPMSolverMultistepScheduler

with torch.no_grad():
    ours_1 = dpm_solver_pp(denoise, z_T, dpm.timesteps, order=1)
    ours_2 = dpm_solver_pp(denoise, z_T, dpm.timesteps, order=2)
    course_ddim = sample_loop(denoise, z_T, ddim)
    course_2m = sample_loop(denoise, z_T, dpm)
    reference = DPMSolverMultistepScheduler(
        **schedule.to_diffusers(), solver_order=2, timestep_spacing="trailing"
    )
    reference.set_timesteps(n_dpm)
    z = z_T.clone()
    for t in reference.timesteps:
        z = reference.step(denoise(z, t), t, z).prev_sample
for name, ours, theirs in [
    ("order 1 against DDIM (common.samplers)", ours_1, course_ddim),
    ("order 2 against DPMSolverPP2MSampler (common)", ours_2, course_2m),
    ("order 2 against diffusers' DPMSolverMultistepScheduler", ours_2, z),
]:
    print(f"{name:<56} max |diff| = {float((ours - theirs).abs().max()):.1e}")

# %% [markdown]
# What the second order buys: run both orders with n steps from t = 999 down to t = 0 (then the same final
# jump to sigma = 0) and measure how far each ends from the ODE solved with all 1000 timesteps. Two spacings
# of the n steps: uniform in t, and uniform in lambda, the variable the solver integrates in. A first-order
# method's error should fall like 1/n, a second-order one's like 1/n^2.


# %%
def t_uniform(n):
    """n + 1 timesteps from T - 1 down to 0, evenly spaced in t."""
    return torch.linspace(T - 1, 0, n + 1).round().long()


def lambda_uniform(n):
    """n + 1 timesteps from T - 1 down to 0, evenly spaced in lambda (nearest trained t; repeats dropped)."""
    targets = torch.linspace(float(lambda_t_all[T - 1]), float(lambda_t_all[0]), n + 1)  # (n + 1,)
    nearest = (lambda_t_all[None, :] - targets[:, None]).abs().argmin(dim=1)  # (n + 1,) timesteps
    return torch.unique_consecutive(nearest)


every_t = t_uniform(budget(fast=40, cpu=T - 1))  # on a CPU: all T timesteps, 999 .. 0
with torch.no_grad():
    z_ref = dpm_solver_pp(denoise, z_T, every_t, order=2)
    z_ref_1 = dpm_solver_pp(denoise, z_T, every_t, order=1)
reference_spread = float((z_ref - z_ref_1).pow(2).mean().sqrt())
print(
    f"{len(every_t)} timesteps, order 1 against order 2: RMS diff {reference_spread:.1e} "
    "(how well the reference itself is pinned down)"
)

step_counts = budget(fast=[3, 6], cpu=[4, 8, 16, 32])
errors = {}  # (spacing, order) -> [RMS distance to the reference, one per step count]
with torch.no_grad():
    for spacing, make_timesteps in [("t", t_uniform), ("lambda", lambda_uniform)]:
        for order in (1, 2):
            errors[spacing, order] = []
            for n in step_counts:
                z_n = dpm_solver_pp(denoise, z_T, make_timesteps(n), order=order)
                errors[spacing, order].append(float((z_n - z_ref).pow(2).mean().sqrt()))
print(f"{'steps':>6}{'uniform in t: 1':>18}{'2M':>9}{'uniform in lambda: 1':>23}{'2M':>9}")
for k, n in enumerate(step_counts):
    row = [errors[key][k] for key in [("t", 1), ("t", 2), ("lambda", 1), ("lambda", 2)]]
    print(f"{n:>6}{row[0]:>18.4f}{row[1]:>9.4f}{row[2]:>23.4f}{row[3]:>9.4f}")

fig = Figure(figsize=(5.2, 3.4))
ax = fig.subplots()
styles = {("t", 1): "o--", ("t", 2): "s--", ("lambda", 1): "o-", ("lambda", 2): "s-"}
for (spacing, order), values in errors.items():
    name = "DPM-Solver++1 (= DDIM)" if order == 1 else "DPM-Solver++(2M)"
    ax.loglog(step_counts, values, styles[spacing, order], label=f"{name}, uniform in {spacing}")
ax.set_xticks(step_counts, [str(n) for n in step_counts])
ax.set_xticks([], minor=True)
ax.set_xlabel("steps n")
ax.set_ylabel(f"RMS distance to the {len(every_t)}-step solution")
ax.legend(fontsize=7.5)
fig.tight_layout()
show(fig)

# %% [markdown]
# *Figure: the distance of each run's final latent from the finely solved ODE, against the number of steps
# (the printed table has the numbers). With steps uniform in lambda (solid lines) the 2M error falls about
# four times per doubling of the steps, the second order the derivation promises, and at 32 steps it is about
# ten times below the first-order error. With steps uniform in t (dashed) both orders fall about two times per
# doubling: lambda changes slowly at high noise and fast at low noise, so the last of 32 t-uniform steps (t =
# 31 to 0) alone spans 29% of the whole lambda range; with steps this uneven the 2M correction gains a
# constant factor, not an order.* The samplers' spacings ("leading", "trailing", "linspace") are all uniform
# in t; spacing the steps by noise level instead is what Karras et al. (2022) and later samplers do.
#
# ### The trajectory of a sampler
#
# Decode the prediction of the clean latent at each step of a guided DDIM run, one row per digit asked for.
# `sample_loop`'s callback hands over z_t and the x0 predicted at t.

# %%
frames, frame_t = [], []
keep = set(range(0, n_steps, 4)) | {n_steps - 1}


def record(i, t, z, x0_pred):
    if i in keep:
        frames.append(x0_pred[:5].clone())
        frame_t.append(int(t))


sample_loop(guided(y), z_T, sampler, callback=record)
with torch.no_grad():
    decoded_frames = [vae.decode(f / scale).clamp(-1, 1).mean(1, keepdim=True) for f in frames]
show(
    plot_trajectory(
        decoded_frames, frame_t, size=1.0, title=f"decoded x0 prediction along a 20-step DDIM run (w = {W})"
    )
)

# %% [markdown]
# *Figure: columns are steps (t from T-1 down), rows the digits 0-4 asked for. The class is fixed within the
# first few steps; later steps refine the strokes.*
#
# ## 7. Samplers side by side
#
# The same model and the same starting noise, three samplers: DDPM (ancestral: it adds fresh noise at every
# step, Ho et al. 2020), DDIM (deterministic, eta = 0, the step of section 6) and DPM-Solver++(2M) (a
# second-order multistep solver of the same deterministic process, Lu et al. 2022). All three match diffusers'
# schedulers step for step (`tests/test_samplers.py`). The question is how quality falls as the steps shrink,
# so each sampler runs at 2, 4, 8, 16 and 50 steps, graded two ways, each with a 95% interval:
#
# - **accuracy**: the fraction of samples the digits classifier reads as the digit asked for (Wilson
#   interval);
# - **FD**: the Frechet distance (FID's formula) between Gaussians fitted to the classifier's 64-d pooled
#   features of the samples and of 2,000 held-out real digits (interval: FD +- 1.96 bootstrap standard
#   errors). Two reference rows give its floor: a second set of real digits, and the VAE's reconstructions of
#   real digits.
#
# The samples are plain class-conditional (w = 1): guidance pushes every sampler towards the classifier's idea
# of each digit and hides their differences. 1,000 samples per point keep the accuracy intervals about +-2
# points wide. Drawing 15,000 samples takes longer than this notebook may, so the table is loaded from the
# file made by `python 03_latent_ddpm/compare_samplers.py --n 1000 --out 03_latent_ddpm/results/samplers`.

# %%
compare = load_module(ROOT / "03_latent_ddpm" / "compare_samplers.py", "_ch03_compare_samplers")
result = json.loads((ROOT / "03_latent_ddpm" / "results" / "samplers" / "samplers.json").read_text())
print(f"{result['command']}\n{result['samples']} samples per row, guidance w = {result['guidance']}\n")
print(compare.table(result))
show(compare.plot_table(result))

# %% [markdown]
# *Figure: accuracy (left) and FD (right) against the number of steps, 1,000 samples per point, 95%
# intervals.* What to read in it:
#
# - **Two steps are too few.** From 4 steps to 2, DDPM's accuracy falls from 0.979 to 0.931 and its FD rises
#   from 0.94 to 2.56, both beyond the intervals; DDIM's and DPM-Solver++'s FD rise from about 2 to about 3.
# - **From 4 steps on, the curves are flat** within their intervals: for this small model on 8x8 latents, 4
#   steps already give what 50 give. DPM-Solver++ is ahead of DDIM at 4 steps (0.878 against 0.857), but the
#   intervals overlap: on this model the second-order solver's advantage is not measurable with 1,000 samples.
# - **The stochastic sampler wins here.** At every step count from 4 on, DDPM's accuracy interval lies above
#   both deterministic samplers' (0.95-0.99 against 0.83-0.90) and its FD is under half theirs. DDIM and
#   DPM-Solver++ integrate the same deterministic path from z_T, so they land on nearly the same samples and
#   keep whatever the model's noise prediction gets wrong early on; DDPM draws fresh noise at each step, which
#   lets later steps correct earlier errors (Karras et al. 2022, sec. 4, discuss why stochastic sampling helps
#   imperfect models). With guidance the difference disappears: at w = 4 the shipped model's card reads
#   97.5-100% for DDIM, DPM-Solver++ and DDPM alike.
# - **No sampler reaches the floor**: real digits against real digits give FD 0.29 and the VAE's
#   reconstructions 0.17, below the best sampler's 0.73. The rest of the gap is the diffusion model's own
#   error, not the sampler's.
#
# Now a small version in this notebook: 4 steps of each sampler from the same noise, graded the same way.

# %%
per_digit = budget(fast=2, cpu=20)
y = torch.arange(10).repeat_interleave(per_digit)  # (10 * per_digit,) digits asked for
z_T = torch.randn(len(y), 4, 8, 8, generator=torch.Generator().manual_seed(2))
grids = {}
for name in ("ddpm", "ddim", "dpmpp_2m"):
    sampler = make_sampler(name, schedule, 4, timestep_spacing="trailing")
    with torch.no_grad():
        z_gen = sample_loop(lambda z, t: unet(z, t, class_labels=y), z_T, sampler, generator=0)
        images = vae.decode(z_gen / scale).clamp(-1, 1).mean(1, keepdim=True)  # (10 * per_digit, 1, 32, 32)
    hits = int((classifier.predict(images) == y).sum())
    lo, hi = compare.wilson_interval(hits, len(y))
    print(f"{name:<9} 4 steps: accuracy {hits / len(y):.3f} [{lo:.3f}, {hi:.3f}] on {len(y)} samples")
    grids[name] = images[::per_digit]
show(compare.plot_grids(grids))

# %% [markdown]
# *Figure: the first sample of each digit from the same noise, 4 steps each.* DDIM and DPM-Solver++ give
# almost the same images, as two integrators of the same deterministic path should; their 0 looks like an 8
# and their 5 is a squiggle. DDPM, which adds fresh noise at each step, gives different and cleaner digits.
# The accuracies printed above rank the samplers as the table does; with 200 samples their intervals are about
# twice as wide.
#
# ## 8. Pixel against latent: the claim, measured
#
# The same UNet architecture, trained one step at pixel resolution and at latent resolution (f = 4): the
# `pixel_vs_latent.py` script's own code, loaded here. Memory is what autograd saves for backward (the part
# that grows with resolution; weights, gradients and AdamW state are the same for both).

# %%
pvl = load_module(ROOT / "03_latent_ddpm" / "pixel_vs_latent.py", "_ch03_pixel_vs_latent")
table_rows = []
for case in ("digits", "shapes"):
    table_rows += pvl.compare(
        case,
        batch_size=budget(fast=4, cpu=16),
        repeats=budget(fast=1, cpu=1),
        device=torch.device("cpu"),
        width=budget(fast=16, cpu=None),
    )
print(pvl.table(table_rows))

# %% [markdown]
# The latent model is several times cheaper per step and holds an order of magnitude less activation memory,
# at the same parameter count: at SD's scale (512 px, f = 8, 64x fewer positions) that is the difference
# between a model that trains on one GPU and one that does not.
#
# ## Summary
#
# - The forward process has a closed form,
#   $z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$ (by induction: independent Gaussian
#   noises add their variances); it runs on the VAE's scaled latents, and decoded, noisy latents look like
#   smudged digits, not pixel noise.
# - Given $z_0$, the reverse step is a Gaussian, found by completing the square: variance $\tilde\beta_t$,
#   mean $\tilde\mu_t$. Written with the noise instead of $z_0$, the bound's KL terms become a weighted noise
#   regression; dropping the weights gives the simplified loss, which weights the clean-latent error by
#   SNR(t).
# - The network is a UNet: a sinusoidal timestep embedding read by every ResBlock as a per-channel shift, a
#   down path whose outputs return as skips to the up path, attention at the lower-resolution levels. The
#   classes built here load the shipped Digits weights and match `common.unet.UNet`; at SD 1.5's widths they
#   count its 859,520,964 parameters.
# - DDIM keeps DDPM's marginals with a free noise level: eta = 0 is deterministic, eta = 1 is DDPM.
#   DPM-Solver++ integrates the same ODE exactly in its linear part, in log-SNR: first order is DDIM, the
#   multistep second order reaches a given accuracy in fewer steps.
# - A falling loss is not a finished model: by step 250 the loss had done most of its falling while the
#   samples were still blobs; the digits appeared between steps 250 and 1,000 and came out clean by 6,000.
# - Measured with enough samples to tell them apart, the stochastic DDPM sampler beats the deterministic DDIM
#   and DPM-Solver++ on this model without guidance, at every step count from 4 on; those two cannot be told
#   apart, and every curve is flat from 4 steps.
# - Classifier-free guidance (a null class seen 10% of the time in training) trades diversity for class
#   fidelity.
# - Diffusing in latent space cuts time and activation memory per step by the factors in the last table.
#
# ## Exercises (`python -m common.grade 03`)
#
# 1. `cosine_betas`: the cosine schedule, graded against diffusers' `squaredcos_cap_v2`.
# 2. `add_noise`: the forward process, graded against `DDPMScheduler.add_noise`.
# 3. `ddim_step`: one DDIM step, graded against `DDIMScheduler.step`.
# 4. `ddpm_step`: one ancestral DDPM step from the posterior of section 3, graded against `DDPMScheduler.step`
#    with a fixed generator.
# 5. `timestep_embedding`: the sinusoidal embedding with all of diffusers' options (sine or cosine first, the
#    frequency shift, a scale), graded against `get_timestep_embedding`.
# 6. `dpmpp_first_order_step`: one DPM-Solver++1 step in log-SNR, graded against DDIM's step and diffusers'
#    `DPMSolverMultistepScheduler` with `solver_order=1`.
# 7. `ldm_loss`: the class-conditional latent diffusion loss for 8x8 Digits latents (checked against a
#    reference computation with a fixed generator, then by training on it).
# 8. `latent_snr`: the SNR of latents of a given scale.
# 9. `scaling_factor_experiment` (open-ended): train with factor 1.0, the computed 1/std and SD's 0.18215;
#    compare loss curves, samples and SNR. For a longer version: `train_ldm.py --scaling-factor 1.0` (and
#    `computed`, `0.18215`).
# 10. `train_digits_ldm`: the whole training loop of this chapter's model on frozen VAE latents (label
#     dropout, the loss, AdamW, clipping, EMA), graded by the digits classifier on samples of the model you
#     trained (`python -m common.grade 03 --only train_digits_ldm`: about 5 minutes of one CPU core).

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")
