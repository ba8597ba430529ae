# %% [markdown]
# # 06b. After SD 1.5: v-prediction, flow matching and the diffusion transformer
#
# You have built Stable Diffusion 1.5 and loaded its weights into your own code. The models that followed
# changed three things, one at a time, and this notebook derives and builds each of them:
#
# 1. **v-prediction and zero terminal SNR** (SD 2.x): what the network predicts, and a schedule that really
#    ends in pure noise;
# 2. **flow matching** (SD 3): a straight path from data to noise, a velocity target, a timestep density and a
#    shift, sampled with Euler's method; then the course's text-to-image model trained with it, against the
#    $\epsilon$ objective at equal compute;
# 3. **the diffusion transformer** (SD 3): patches instead of a UNet, adaLN-Zero conditioning, and MMDiT's
#    joint attention, where text and image tokens attend in one sequence;
# 4. **SDXL in one table**: what changed between SD 1.5 and SDXL, counted from the configs.
#
# Each piece is checked against diffusers with the same inputs. Nothing here downloads weights: the large
# models are built on PyTorch's meta device, which has shapes but no storage. Under `COURSE_FAST=1` the one
# training cell shrinks to seconds.

# %%
import time

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from matplotlib.figure import Figure

from common.flow import (
    FlowEulerSampler,
    FlowSchedule,
    add_noise,
    logit_normal_density,
    sample_sigmas_logit_normal,
    shift_sigma,
    velocity_target,
)
from common.mmdit import MMDiT, MMDiTConfig, unpatchify
from common.runtime import budget, setup_notebook
from common.samplers import DDIMSampler, sample_loop, sampler_from_diffusers
from common.schedules import NoiseSchedule
from common.viz import show

torch.set_num_threads(1)  # every model here is tiny: one thread is fastest
setup_notebook()  # seed 0, small inline figures; prints the device

# %% [markdown]
# ## 1. v-prediction (SD 2.x)
#
# ### The target, derived
# The forward process of chapter 03 mixes signal and noise as $z_t = \alpha_t z_0 + \sigma_t \epsilon$ with
# $\alpha_t = \sqrt{\bar\alpha_t}$, $\sigma_t = \sqrt{1 - \bar\alpha_t}$, so $\alpha_t^2 + \sigma_t^2 = 1$:
# the pair $(\alpha_t, \sigma_t)$ lies on the unit circle. Write it as an angle, $\alpha_t = \cos\phi$,
# $\sigma_t = \sin\phi$. Then $z_t$ moves on a circle from $z_0$ ($\phi = 0$) to $\epsilon$ ($\phi = \pi/2$),
# and its velocity along that circle is
#
# $$\frac{dz_t}{d\phi} = -\sin\phi\, z_0 + \cos\phi\, \epsilon = \alpha_t \epsilon - \sigma_t z_0 =: v.$$
#
# SD 2.x (768 px) trains the UNet to predict $v$ (Salimans & Ho 2022). From $z_t$ and $v$ both $z_0$ and
# $\epsilon$ come back without a division:
#
# $$\alpha_t z_t - \sigma_t v = \alpha_t^2 z_0 + \alpha_t\sigma_t\epsilon - \sigma_t\alpha_t\epsilon
#   + \sigma_t^2 z_0
#   = z_0 \qquad\text{(the cross terms cancel, } \alpha_t^2 + \sigma_t^2 = 1\text{)}$$
#
# and in the same way $\sigma_t z_t + \alpha_t v = \epsilon$. Check both against `common.schedules` and
# diffusers' `get_velocity`:

# %%
schedule = NoiseSchedule.sd15()
reference = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
g = torch.Generator().manual_seed(0)
z0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
t = torch.tensor([0, 300, 700, 999])
alpha = schedule.alpha_bar[t].sqrt().view(-1, 1, 1, 1)  # alpha_t, (B, 1, 1, 1)
sigma = (1 - schedule.alpha_bar[t]).sqrt().view(-1, 1, 1, 1)  # sigma_t
v = alpha * eps - sigma * z0
z_t = alpha * z0 + sigma * eps
checks = {
    "v vs diffusers' get_velocity": v - reference.get_velocity(z0, eps, t),
    "v vs common.schedules.v_target": v - schedule.v_target(z0, eps, t),
    "alpha z_t - sigma v recovers z_0": alpha * z_t - sigma * v - z0,
    "sigma z_t + alpha v recovers eps": sigma * z_t + alpha * v - eps,
}
for name, diff in checks.items():
    print(f"{name:34s} max |diff| = {diff.abs().max():.1e}")

# %% [markdown]
# ### Why v behaves at both ends of the schedule
# The signal-to-noise ratio $\mathrm{SNR}(t) = \alpha_t^2 / \sigma_t^2$ runs from about 1,200 at $t = 0$ to
# about 0.005 at $t = 999$. Whatever the network predicts, the sampler converts it to $\hat z_0$ and
# $\hat\epsilon$. Say the prediction is off by an error $\delta$ of size 1. **Predict** how big the error in
# $\hat z_0$ becomes:
#
# * predict $\epsilon$: $\hat z_0 = (z_t - \sigma_t\hat\epsilon)/\alpha_t$, so the error is
#   $\sigma_t/\alpha_t\,\delta$, which explodes at high noise ($\alpha_t \to 0$);
# * predict $z_0$: $\hat\epsilon = (z_t - \alpha_t\hat z_0)/\sigma_t$, so the *noise* error is
#   $\alpha_t/\sigma_t\,\delta$, which explodes at low noise;
# * predict $v$: $\hat z_0 = \alpha_t z_t - \sigma_t\hat v$ and $\hat\epsilon = \sigma_t z_t + \alpha_t\hat
#   v$, errors $\sigma_t\delta$ and $\alpha_t\delta$: never more than $\delta$, at either end.
#
# Now **measure** it: add an error of norm 1 to the exact target, convert with `common.schedules`, and compare
# the error that comes out with the prediction.

# %%
ts = torch.linspace(0, 999, 100).long()  # 100 timesteps from 0 to 999
z0, eps = torch.randn(len(ts), 4, 8, 8, generator=g), torch.randn(len(ts), 4, 8, 8, generator=g)
delta = torch.randn(len(ts), 4, 8, 8, generator=g)
delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # an error of norm exactly 1 per item
z_t = schedule.add_noise(z0, eps, ts)
targets = {"epsilon": eps, "sample": z0, "v_prediction": schedule.v_target(z0, eps, ts)}
a_t, s_t = schedule.alpha_bar[ts].sqrt(), (1 - schedule.alpha_bar[ts]).sqrt()
predicted = {
    "epsilon": (s_t / a_t, torch.ones_like(a_t)),
    "sample": (torch.ones_like(a_t), a_t / s_t),
    "v_prediction": (s_t, a_t),
}
fig = Figure(figsize=(9, 3.2))
axes = fig.subplots(1, 2)
worst = 0.0
for kind, target in targets.items():
    x0_err = (schedule.predict_x0(target + delta, z_t, ts, kind) - z0).flatten(1).norm(dim=1)
    eps_err = (schedule.predict_eps(target + delta, z_t, ts, kind) - eps).flatten(1).norm(dim=1)
    for measured, factor in zip((x0_err, eps_err), predicted[kind]):
        worst = max(worst, ((measured - factor).abs() / factor).max().item())
    axes[0].semilogy(ts, x0_err, label=kind)
    axes[1].semilogy(ts, eps_err, label=kind)
axes[0].set(title="error in x0 per unit error of the output", xlabel="timestep t")
axes[1].set(title="error in eps per unit error of the output", xlabel="timestep t")
axes[1].legend(fontsize=8)
fig.tight_layout()
show(fig)
print(f"SNR(0) = {schedule.snr(0):.0f}, SNR(999) = {schedule.snr(999):.4f}")
print(f"measured errors vs the predicted factors: worst relative difference {worst:.1e}")
print(
    f"predicted at t = 999: eps model's x0 error x{s_t[-1] / a_t[-1]:.1f}; at t = 0: x0 model's eps error "
    f"x{a_t[0] / s_t[0]:.1f}; v model: at most x1"
)

# %% [markdown]
# The left panel shows the $\epsilon$ model's $\hat z_0$ error climbing to the factor printed above (about 15)
# at the last timesteps, where the image's layout is decided, and the right panel the $z_0$ model's
# $\hat\epsilon$ error climbing to about 34 at the first. The $v$ curves stay at or below 1 in both panels:
# $v$ is the one target that is well conditioned everywhere.
#
# ### The schedule should end in pure noise
# SD 1.x and 2.x were trained with $\bar\alpha_{999} = 0.0047$: at the "pure noise" timestep $z_{999}$ still
# holds $\sqrt{0.0047} = 6.8\%$ of the image. The network learns to read the image's mean brightness from that
# residue; at sampling time $z_T$ is pure noise, whose mean is 0, so the model keeps every image's brightness
# near the average (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are Flawed"). Their
# fix rescales $\sqrt{\bar\alpha_t}$ linearly so that it keeps its first value and ends at exactly 0:
#
# $$\sqrt{\bar\alpha_t}' = \left(\sqrt{\bar\alpha_t} - \sqrt{\bar\alpha_{T-1}}\right)
#   \frac{\sqrt{\bar\alpha_0}}{\sqrt{\bar\alpha_0} - \sqrt{\bar\alpha_{T-1}}}.$$
#
# At $\bar\alpha = 0$ an $\epsilon$ prediction says nothing about $z_0$ (the first bullet above divides by
# zero), so zero terminal SNR needs $v$. And the sampler must visit $t = 999$: "leading" spacing (SD 1.x)
# starts at 901 for 10 steps, "trailing" starts at 999. `NoiseSchedule.from_diffusers` reads
# `rescale_betas_zero_snr=True`:

# %%
sd2_zero_snr = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
rescaled = NoiseSchedule.from_diffusers(sd2_zero_snr)
reference = DDIMScheduler.from_config(sd2_zero_snr)
gap = (rescaled.alpha_bar - reference.alphas_cumprod).abs().max()
print(f"alpha_bar vs diffusers: max |diff| = {gap:.0e}")
print(
    f"largest gap between the two sqrt(alpha_bar) curves: "
    f"{(schedule.alpha_bar.sqrt() - rescaled.alpha_bar.sqrt()).abs().max():.3f}"
)
for name, s in (("SD 1.x / 2.x", schedule), ("zero terminal SNR", rescaled)):
    print(
        f"{name:18s} alpha_bar_0 = {s.alpha_bar[0]:.5f}   alpha_bar_999 = {s.alpha_bar[-1]:.5f}   "
        f"signal left at t = 999: {s.alpha_bar[-1].sqrt():.1%}"
    )
leading = DDIMSampler(schedule, 10, timestep_spacing="leading", steps_offset=1).timesteps
trailing = DDIMSampler(rescaled, 10, timestep_spacing="trailing", steps_offset=0).timesteps
print("leading  10 steps:", leading.tolist())
print("trailing 10 steps:", trailing.tolist())

fig = Figure(figsize=(9, 3.2))
axes = fig.subplots(1, 2)
for name, s in (("SD 1.x / 2.x", schedule), ("zero terminal SNR", rescaled)):
    axes[0].plot(s.alpha_bar.sqrt(), label=name)
    axes[1].plot(torch.log(s.snr(torch.arange(999))), label=name)
axes[0].set(title="signal kept, sqrt(alpha_bar_t)", xlabel="timestep t")
axes[0].set_ylim(-0.02, 1.02)
axes[1].set(title="log SNR(t) (t = 999 is -inf when rescaled)", xlabel="timestep t")
axes[0].legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# The two curves agree at $t = 0$, stay within 0.07 of each other, and the rescaled one reaches exactly 0
# (left); the log SNR (right) falls steeply towards $-\infty$ instead of flattening at $\log 0.0047 = -5.4$.
#
# The course's DDIM, DDPM and DPM-Solver++ samplers read this config and follow diffusers step for step: the
# first step, at $\bar\alpha = 0$, uses the $v$ conversions above, which never divide by $\alpha_t$.
# (DPM-Solver works in $\log(\alpha_t/\sigma_t)$, which is $-\infty$ there; like diffusers, it replaces
# $\bar\alpha_{999} = 0$ by $2^{-24}$.) A fixed linear "network" stands in for the UNet, so the check needs no
# weights:

# %%
w_mix = 0.9 * torch.eye(4) + 0.1 * torch.randn(4, 4, generator=g) / 2


def stand_in_unet(z, t):
    """A fixed, weight-free stand-in for a v-predicting UNet: a channel mix of z plus a wave in t."""
    return torch.einsum("dc,bchw->bdhw", w_mix, z) + 0.2 * torch.sin(float(t) / 97.0 + torch.zeros_like(z))


def diffusers_loop(scheduler, z_T, model):
    """The reference: diffusers' own sampling loop (its timesteps, its step), with the same model."""
    z = z_T.clone()
    for t in scheduler.timesteps:
        z = scheduler.step(model(z, t), t, z).prev_sample
    return z


z_T = torch.randn(1, 4, 8, 8, generator=g)
for name, ref_class in (("ddim", DDIMScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)):
    ours = sampler_from_diffusers(name, sd2_zero_snr, 25)
    ref = ref_class.from_config(sd2_zero_snr)
    ref.set_timesteps(25)
    z_ref = diffusers_loop(ref, z_T, stand_in_unet)
    z_ours = sample_loop(stand_in_unet, z_T, ours)
    print(
        f"{name:9s} 25 zero-SNR steps from t = {int(ours.timesteps[0])}: max |ours - diffusers| = "
        f"{(z_ours - z_ref).abs().max():.1e}"
    )

# %% [markdown]
# Exercises 6 and 7 ask you to write $v$ and the $v \to \epsilon$ conversion; the checks run them at
# $\bar\alpha = 0$.
#
# ## 2. Flow matching (SD 3)
#
# ### A straight path
# Diffusion's path from data to noise is a quarter circle. Flow matching (Lipman et al. 2022; Liu et al.
# 2022's rectified flow) takes the straight line instead, with $t \in [0, 1]$:
#
# $$z_t = (1 - t)\, z_0 + t\, \epsilon, \qquad \frac{dz_t}{dt} = \epsilon - z_0 .$$
#
# The velocity is the same at every $t$ along one line, and the network $v_\theta(z_t, t)$ is trained to
# predict it: $\mathcal{L} = \mathbb{E}_{t, z_0, \epsilon}\,\lVert v_\theta(z_t, t) - (\epsilon -
# z_0)\rVert^2$ (Esser et al. 2024, the SD 3 paper, eq. 3 with $a_t = 1 - t$, $b_t = t$). One network
# evaluation then sets the direction, and sampling integrates $dz/dt = v_\theta$ from $t = 1$ (noise) down to
# $t = 0$. If the paths were exactly straight for every pair, one Euler step would suffice; they are not,
# because the network can only predict the *average* direction over all $(z_0, \epsilon)$ pairs whose lines
# pass through $z_t$. The toy below shows what that means.
#
# diffusers calls $t$ "sigma" and feeds the network `timestep` $= 1000\,t$. Check the path against its
# `scale_noise`, and the target as the path's derivative by a finite difference:

# %%
reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
reference.set_timesteps(10)
z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
i = torch.tensor([2, 7])
ours_z_t = add_noise(z0, eps, reference.sigmas[i])
print(
    f"z_t vs diffusers' scale_noise: max |diff| = "
    f"{(ours_z_t - reference.scale_noise(z0, reference.timesteps[i], eps)).abs().max():.1e}"
)
h = 1e-3
slope = (add_noise(z0, eps, 0.5 + h) - add_noise(z0, eps, 0.5 - h)) / (2 * h)
print(
    f"finite-difference slope vs eps - z0: max |diff| = {(slope - velocity_target(z0, eps)).abs().max():.1e}"
)

# %% [markdown]
# ### Which t to train on: the logit-normal density
# Near $t = 0$ and $t = 1$ the target is easy (the network sees almost $z_0$ or almost $\epsilon$); the hard,
# informative part is the middle. SD 3 draws $u \sim \mathcal{N}(m, s^2)$ and trains at $t =
# \mathrm{sigmoid}(u)$. Changing variables with $u = \mathrm{logit}(t)$, $du/dt = 1/(t(1-t))$, gives the
# density (eq. 19)
#
# $$\pi_{\ln}(t; m, s) = \frac{1}{s\sqrt{2\pi}}\,\frac{1}{t(1-t)}\,
#   \exp\!\left(-\frac{(\mathrm{logit}(t) - m)^2}{2 s^2}\right).$$
#
# ### Which t to sample at: the shift
# At a higher resolution neighbouring pixels are more alike, so the same noise level destroys less of the
# image: averaging $n$ equal pixels divides the noise's standard deviation by $\sqrt{n}$. SD 3 moves every
# timestep towards more noise with $t' = \dfrac{\text{shift}\; t}{1 + (\text{shift} - 1)\, t}$ (eq. 23), shift
# 3.0 at 1024 px. It keeps $0$ and $1$ in place and maps $t = 0.5$ to $0.75$.

# %%
t_samples = sample_sigmas_logit_normal(20_000, 0.0, 1.0, torch.Generator().manual_seed(0))
grid = torch.linspace(0.001, 0.999, 500, dtype=torch.float64)
fig = Figure(figsize=(9, 3.2))
axes = fig.subplots(1, 2)
axes[0].hist(t_samples, bins=50, density=True, alpha=0.5, label="samples t = sigmoid(u)")
axes[0].plot(grid, logit_normal_density(grid), label="density, eq. 19")
axes[0].axhline(1.0, color="grey", ls=":", label="uniform")
axes[0].set(title="logit-normal timesteps (m = 0, s = 1)", xlabel="t")
axes[0].legend(fontsize=8)
for shift in (1.0, 3.0, 6.0):
    axes[1].plot(grid, shift_sigma(grid, shift), label=f"shift {shift:g}")
axes[1].set(title="timestep shift t' = shift t / (1 + (shift - 1) t)", xlabel="t", ylabel="t'")
axes[1].legend(fontsize=8)
fig.tight_layout()
show(fig)
middle = ((t_samples > 0.25) & (t_samples < 0.75)).float().mean()
print(f"share of training timesteps in [0.25, 0.75]: logit-normal {middle:.1%}, uniform 50.0%")

# %% [markdown]
# The histogram follows the density of eq. 19, which is 1.6 times the uniform density at $t = 0.5$ and puts
# about three quarters of the training timesteps in the middle half, $[0.25, 0.75]$. With shift 3 (right), the
# evenly spaced sampling steps above $t = 0.5$, half of them, all land above $t' = 0.75$.
#
# ### The Euler sampler, against diffusers
# `sampler_from_diffusers("flow_euler", config, steps)` reads a `FlowMatchEulerDiscreteScheduler` config. Its
# timesteps are $n$ points evenly spaced in $t$ from 1 to the (shifted) smallest training $t$, then shifted,
# then a final $0$; each step is $z_{t_{i+1}} = z_{t_i} + (t_{i+1} - t_i)\, v_\theta(z_{t_i}, t_i)$. With the
# same stand-in network:

# %%
for shift in (1.0, 3.0):
    config = FlowMatchEulerDiscreteScheduler(shift=shift).config
    ours = sampler_from_diffusers("flow_euler", config, 28)
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(28)
    z_ref = diffusers_loop(ref, z_T, stand_in_unet)
    z_ours = sample_loop(stand_in_unet, z_T, ours)
    print(
        f"shift {shift}: first timesteps {[round(float(t), 1) for t in ours.timesteps[:4]]}, "
        f"max |timesteps - diffusers'| = {(ours.timesteps - ref.timesteps).abs().max():.1e}, "
        f"28-step loop max |diff| = {(z_ours - z_ref).abs().max():.1e}"
    )

# %% [markdown]
# ### A toy you can watch: flow matching against eps-prediction on 2D points
# Eight Gaussian blobs on a circle are the "data" (2D points, so every sample can be drawn). Two copies of the
# same small MLP train for the same number of steps on the same points and noise: one on the flow-matching
# loss with logit-normal timesteps, one on chapter 03's $\epsilon$ loss with SD's schedule and uniform
# timesteps. Then both sample with 1, 2, 4 and 16 steps (Euler for the flow model, DDIM with trailing
# timesteps for the $\epsilon$ model), from the same noise. The score is the mean distance from a sample to
# the nearest blob centre; points drawn from the blobs themselves score about 0.1 ("data itself" below).

# %%
centres = torch.stack([torch.cos(torch.arange(8) * np.pi / 4), torch.sin(torch.arange(8) * np.pi / 4)], 1) * 2


def sample_blobs(n, generator):
    pick = torch.randint(0, 8, (n,), generator=generator)
    return centres[pick] + 0.08 * torch.randn(n, 2, generator=generator)


class ToyNet(torch.nn.Module):
    """(point (B, 2), t in [0, 1] (B,)) -> (B, 2): an MLP with a sinusoidal code of t."""

    def __init__(self, width=128):
        super().__init__()
        self.freqs = torch.arange(1, 9).float() * np.pi
        layers = [torch.nn.Linear(2 + 16, width), torch.nn.SiLU()]  # the point and the code of t in
        for _ in range(2):
            layers += [torch.nn.Linear(width, width), torch.nn.SiLU()]
        layers += [torch.nn.Linear(width, 2)]  # a velocity (or a noise) out
        self.mlp = torch.nn.Sequential(*layers)

    def forward(self, x, t):
        code = torch.cat([torch.sin(t[:, None] * self.freqs), torch.cos(t[:, None] * self.freqs)], dim=1)
        return self.mlp(torch.cat([x, code], dim=1))


toy_steps = budget(fast=150, cpu=4000)
flow_net, eps_net = ToyNet(), ToyNet()
eps_net.load_state_dict(flow_net.state_dict())  # the same start
opts = [torch.optim.Adam(net.parameters(), lr=2e-3) for net in (flow_net, eps_net)]
toy_schedule = NoiseSchedule.sd15()
data_gen = torch.Generator().manual_seed(1)
start = time.perf_counter()
for _step in range(toy_steps):
    x0 = sample_blobs(512, data_gen)
    noise = torch.randn(512, 2, generator=data_gen)
    t_flow = sample_sigmas_logit_normal(512, generator=data_gen)
    t_int = toy_schedule.sample_timesteps(512, data_gen)
    flow_loss = ((flow_net(add_noise(x0, noise, t_flow), t_flow) - velocity_target(x0, noise)) ** 2).mean()
    eps_loss = ((eps_net(toy_schedule.add_noise(x0, noise, t_int), t_int / 1000) - noise) ** 2).mean()
    for opt, loss in zip(opts, (flow_loss, eps_loss)):
        opt.zero_grad()
        loss.backward()
        opt.step()
print(
    f"{toy_steps} steps each in {time.perf_counter() - start:.0f} s; last losses: flow {flow_loss:.3f}, "
    f"eps {eps_loss:.3f}"
)

# %%
z_noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
step_counts = (1, 2, 4, 16)
samples, scores = {}, {}
with torch.no_grad():
    for n in step_counts:
        flow_sampler = FlowEulerSampler(FlowSchedule(shift=1.0), n)
        ddim = DDIMSampler(toy_schedule, n, timestep_spacing="trailing", steps_offset=0)
        samples["flow", n] = sample_loop(
            lambda z, t: flow_net(z, t.float().expand(len(z)) / 1000), z_noise, flow_sampler
        )
        samples["eps", n] = sample_loop(
            lambda z, t: eps_net(z, t.float().expand(len(z)) / 1000), z_noise, ddim
        )
for key, x in samples.items():
    scores[key] = torch.cdist(x, centres).min(dim=1).values.mean().item()
print(f"{'steps':>5s} {'flow (Euler)':>13s} {'eps (DDIM)':>11s}   mean distance to the nearest blob centre")
for n in step_counts:
    print(f"{n:5d} {scores['flow', n]:13.3f} {scores['eps', n]:11.3f}")
print(f"data itself: {torch.cdist(sample_blobs(2000, data_gen), centres).min(dim=1).values.mean():.3f}")
print(
    "closer to the blobs:",
    ", ".join(
        f"{n} step{'s' if n > 1 else ''}: {'flow' if scores['flow', n] < scores['eps', n] else 'eps'}"
        for n in step_counts
    ),
)
two_steps = FlowEulerSampler(FlowSchedule(), 2)
print("the flow sampler with 2 steps visits t =", [round(float(t) / 1000, 3) for t in two_steps.timesteps])

fig = Figure(figsize=(2.3 * len(step_counts), 4.8))
axes = fig.subplots(2, len(step_counts), sharex=True, sharey=True)
for row, kind in enumerate(("flow", "eps")):
    for col, n in enumerate(step_counts):
        ax = axes[row, col]
        ax.scatter(*samples[kind, n].T, s=1, alpha=0.4)
        ax.scatter(*centres.T, s=12, c="red", marker="x")
        ax.set_title(f"{kind}, {n} step{'s' if n > 1 else ''}: {scores[kind, n]:.2f}", fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
fig.tight_layout()
show(fig)

# %% [markdown]
# Read the one-step column first. One Euler step from $t = 1$ lands on $z - v_\theta(z, 1)$, the network's
# estimate of the *average* clean point given pure noise: a cloud in the middle of the ring, because it must
# predict the mean direction over all eight blobs. Two steps look the same, and the timesteps say why: the
# spacing (diffusers', which the course follows) ends at $t = 1/1000$, not at 0, so with two steps the first
# one already runs from $t = 1$ to $0.001$ and the second has nothing left to do. The $\epsilon$ model's one
# DDIM step fails differently: at $t = 999$ it computes $\hat z_0 = (z - \sigma\hat\epsilon)/\alpha$ with
# $\alpha = 0.068$, so every error in $\hat\epsilon$ is multiplied by about 15 (section 1) and the points
# scatter. From four steps on, both models put their samples on the ring and then on the blobs; the line
# "closer to the blobs" says which model is closer at each step count in this run. The comparison that matters
# for images is the SD 3 paper's: on large latent models, rectified flow with logit-normal timesteps kept its
# quality at fewer sampling steps than the $\epsilon$ and $v$ objectives (Esser et al. 2024, section 5.1).
# The next section asks the same question of the course's own text-to-image model.
#
# ### Flow against eps, trained
# Does the toy's answer hold for images with text? `compare_objectives.py` trains chapter 06's text-to-image
# model with the same config, seed, data, batch and number of steps: on chapter 06's $\epsilon$ loss (with the
# config's loss weights, printed below), on $v$ with the zero-terminal-SNR schedule of section 1 (what the
# laptop model ships with, loss weights included), and on the flow-matching loss above (logit-normal $t$,
# target $\epsilon - z_0$, plain MSE, the UNet's timestep input $1000\,t$). The networks are the same,
# so every training step costs the same compute; only the objective differs. Each model is then graded by
# chapter 06's `evaluate.py` on prompts it never saw: the share of images where the judge finds every
# attribute right, at 4, 8 and 25 sampling steps (DDIM and DPM-Solver++(2M) for $\epsilon$, Euler with
# shift 1.0 for flow: at 64 px the laptop config's latent is 8 x 8, with no resolution to shift for),
# guidance 3.
# The cell reads the committed table, `06_stable_diffusion_architecture/results/objectives.json`, and prints
# the command that makes it when it is missing.

# %%
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import common  # noqa: E402

ROOT = Path(common.__file__).resolve().parents[1]  # the repository
OBJECTIVES_JSON = ROOT / "06_stable_diffusion_architecture" / "results" / "objectives.json"
HELD_OUT = ("held-out 1 object", "held-out 2 objects")
objectives = json.loads(OBJECTIVES_JSON.read_text()) if OBJECTIVES_JSON.is_file() else None
if objectives is None:
    print(
        f"{OBJECTIVES_JSON.relative_to(ROOT)} is not there yet. Make it with\n"
        "    python 06_stable_diffusion_architecture/compare_objectives.py --config cpu "
        "--out runs/objectives --results 06_stable_diffusion_architecture/results\n"
        "(eps, v and flow trainings of the laptop config, then the grading), and run this notebook again."
    )
else:
    print(f"config {objectives['config']}; eps loss weights: {objectives['eps_weighting']}")
    for name, t in objectives["trainings"].items():
        loop = "?" if t["loop_seconds"] is None else f"{t['loop_seconds'] / 60:.1f}"
        print(f"{name}: {t['steps']} steps, a training loop of {loop} min ({t['folder']})")
    print(
        f"{objectives['n']} prompts per set, guidance {objectives['guidance']}; "
        "share with every attribute right [95% interval]"
    )
    print(f"{'objective':9s} {'sampler':10s} {'steps':>5s} " + " ".join(f"{s:>22s}" for s in HELD_OUT))
    for r in objectives["rows"]:
        print(
            f"{r['objective']:9s} {r['sampler']:10s} {r['steps']:5d} "
            + " ".join(f"{r[s]['all']:>8.2f} [{r[s]['low']:.2f}, {r[s]['high']:.2f}]" for s in HELD_OUT)
        )

    fig = Figure(figsize=(10, 3.9))
    axes = fig.subplots(1, 2, sharey=True)
    curves = sorted({(r["objective"], r["sampler"]) for r in objectives["rows"]})
    for ax, name in zip(axes, HELD_OUT):
        for k, (objective, sampler) in enumerate(curves):
            rows = [r for r in objectives["rows"] if (r["objective"], r["sampler"]) == (objective, sampler)]
            rows = sorted(rows, key=lambda r: r["steps"])
            steps = np.array([r["steps"] for r in rows]) * (1 + 0.03 * (k - 1))  # side by side, not on top
            p = np.array([r[name]["all"] for r in rows])
            err = np.array(
                [[r[name]["all"] - r[name]["low"], r[name]["high"] - r[name]["all"]] for r in rows]
            ).T  # (2, steps): below and above
            ax.errorbar(steps, p, yerr=err, marker="o", capsize=3, label=f"{objective} ({sampler})")
        vae_row = next(r for r in objectives["references"] if r["sampler"] == "VAE reconstructions")
        ceiling = vae_row[name]["all"]
        ax.axhline(ceiling, color="grey", ls=":", label="VAE reconstructions (ceiling)")
        ax.set(title=f"{name}: every attribute right", xlabel="sampling steps", xscale="log")
        ax.set_xticks(objectives["sampling_steps"], [str(k) for k in objectives["sampling_steps"]])
        ax.minorticks_off()
    axes[0].set_ylabel(f"share of {objectives['n']} prompts (95% interval)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # room for the legend below the panels
    show(fig)

# %% [markdown]
# The lines below are written from the table, not ahead of it: at each step count they give the $v$ and the
# flow models' scores minus the $\epsilon$ model's (DDIM), and whether their 95% intervals are apart (a
# difference this run resolves) or overlap (a difference that this many prompts per set does not settle either
# way).

# %%
if objectives is not None:
    score_of = {(r["objective"], r["sampler"], r["steps"]): r for r in objectives["rows"]}
    fewest, most = min(objectives["sampling_steps"]), max(objectives["sampling_steps"])

    others = [(o, s) for o, s in (("v", "ddim"), ("flow", "flow_euler")) if (o, s, fewest) in score_of]
    for name in HELD_OUT:
        for steps in objectives["sampling_steps"]:
            e = score_of["eps", "ddim", steps][name]
            for objective, sampler in others:
                f = score_of[objective, sampler, steps][name]
                apart = f["low"] > e["high"] or e["low"] > f["high"]
                print(
                    f"{name}, {steps:2d} steps: {objective} {f['all']:.2f}, eps {e['all']:.2f}, difference "
                    f"{f['all'] - e['all']:+.2f}: the intervals {'are apart' if apart else 'overlap'}"
                )
    for objective, sampler in (("eps", "ddim"), *others):
        few = score_of[objective, sampler, fewest][HELD_OUT[0]]["all"]
        many = score_of[objective, sampler, most][HELD_OUT[0]]["all"]
        kept = f"; {fewest} steps keep {few / many:.0%} of the {most}-step score" if many > 0 else ""
        print(f"{objective} on one-object prompts: {few:.2f} at {fewest} steps, {many:.2f} at {most}{kept}")

# %% [markdown]
# The same held-out prompts drawn by both models, at the fewest and the most steps, when the trained models
# are still where the comparison shipped them (they are not committed, so on a fresh clone this cell says
# so): the first four prompts have one object, the last four two.

# %%
folders = {} if objectives is None else {o: ROOT / t["folder"] for o, t in objectives["trainings"].items()}
if objectives is None:
    print("nothing to draw yet: run the command printed above")
elif not all((f / "model_index.json").is_file() for f in folders.values()):
    missing = ", ".join(t["folder"] for t in objectives["trainings"].values())
    print(
        f"the trained models are not at {missing}: the table above is all there is "
        "(compare_objectives.py ships them into its --out folder)"
    )
else:
    import textwrap  # noqa: E402

    from common.pipeline import StableDiffusion  # noqa: E402
    from common.shapes import Shapes  # noqa: E402

    grid_prompts = Shapes.prompts("test", 4, 1234, (1,)) + Shapes.prompts("test", 4, 1234, (2,))
    panels = []
    for objective, sampler in (("eps", "ddim"), ("flow", "flow_euler")):
        trained = StableDiffusion.from_pretrained(folders[objective])
        for steps in (fewest, most):
            images = trained(
                grid_prompts,
                num_inference_steps=steps,
                guidance_scale=objectives["guidance"],
                generator=torch.Generator().manual_seed(0),
                sampler=sampler,
                output_type="pt",
                progress=False,
            ).images  # (8, 3, 64, 64)
            panels.append((f"{objective}, {sampler}\n{steps} steps", images))
    fig = Figure(figsize=(1.25 * len(grid_prompts) + 1.2, 1.35 * len(panels) + 0.9))
    axes = fig.subplots(len(panels), len(grid_prompts))
    for i, (label, images) in enumerate(panels):
        for j, image in enumerate(images):
            axes[i, j].imshow(image.permute(1, 2, 0).numpy())
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title("\n".join(textwrap.wrap(grid_prompts[j], 18)), fontsize=6.5)
        axes[i, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    show(fig)

# %% [markdown]
# Exercises 8 and 9 ask you to write the flow-matching loss and one shifted Euler step.
#
# ## 3. The diffusion transformer
#
# ### Patchify and unpatchify
# A transformer reads a sequence. DiT (Peebles & Xie 2023) cuts the latent $(C, H, W)$ into $p \times p$
# patches and maps each to a token of width $D$ with one linear layer, which is a convolution with kernel and
# stride $p$. A $2 \times 3$ grid of patches becomes 6 tokens, numbered row by row. Fixed 2D sine-cosine
# positions (half the channels code the column, half the row) are added, taken from the centre of a larger
# table, so one model serves several aspect ratios. At the end a linear layer gives each token $p \cdot p
# \cdot C$ numbers, which `unpatchify` puts back in place:

# %%
toy = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)  # (B, C, H, W) = (1, 2, 4, 6), p = 2
p = 2
tokens = toy.unfold(2, p, p).unfold(3, p, p)  # (B, C, h, w, p, p) = (1, 2, 2, 3, 2, 2)
tokens = tokens.permute(0, 2, 3, 4, 5, 1).reshape(1, 6, p * p * 2)  # (B, N, p*p*C); token i*w+j: patch i, j
print("token 0 (top-left patch, both channels):", tokens[0, 0].tolist())
print("latent rows 0-1, columns 0-1, channel 0:", toy[0, 0, :2, :2].flatten().tolist())
print("unpatchify(tokens) == latent:", torch.equal(unpatchify(tokens, h=2, w=3, p=p, C=2), toy))

# %% [markdown]
# ### adaLN-Zero: conditioning every block on t and the text
# A UNet adds the timestep embedding to its feature maps. DiT instead *modulates* each block: a vector
# $c$ (the timestep embedding plus, in SD 3, an MLP of the pooled text embedding) gives six vectors per block,
#
# $$(\beta_1, \gamma_1, \alpha_1, \beta_2, \gamma_2, \alpha_2) = W\,\mathrm{SiLU}(c) + b,$$
# $$x \leftarrow x + \alpha_1 \odot \mathrm{Attn}\big(\mathrm{LN}(x)(1 + \gamma_1) + \beta_1\big), \qquad
#   x \leftarrow x + \alpha_2 \odot \mathrm{MLP}\big(\mathrm{LN}(x)(1 + \gamma_2) + \beta_2\big).$$
#
# The "Zero" is the initialisation: $W = 0$, $b = 0$, so every gate $\alpha$ starts at 0 and each block starts
# as the identity; training opens the gates. Check it on a block of the course's MMDiT:

# %%
tiny = MMDiT(MMDiTConfig.tiny())
block = tiny.transformer_blocks[0]
x = torch.randn(2, 6, 16, generator=g)  # (B, N, D) image tokens
c = torch.randn(2, 5, 16, generator=g)  # (B, L, D) text tokens
c_vec = torch.randn(2, 16, generator=g)  # (B, D) conditioning vector
with torch.no_grad():
    x_out, c_out = block(x, c, c_vec)
    print(f"random adaLN weights: the block moves the image tokens by {(x_out - x).abs().max():.2f}")
    for norm in (block.norm1, block.norm1_context):
        norm.linear.weight.zero_()
        norm.linear.bias.zero_()
    x_out, c_out = block(x, c, c_vec)
    print(
        f"adaLN-Zero init:      image tokens move by {(x_out - x).abs().max():.1e}, "
        f"text tokens by {(c_out - c).abs().max():.1e}"
    )

# %% [markdown]
# ### MMDiT: two streams, one attention
# In SD 1.5 the text is a fixed context: image queries read text keys and values (cross-attention), and the
# text never changes. SD 3's MMDiT block (Esser et al. 2024, fig. 2) keeps **two streams** of tokens, image
# $x$ ($N$ tokens) and text $c$ ($L$ tokens), each with its own adaLN, its own $Q, K, V$ and output
# projections and its own MLP, and lets them meet in **one** attention over the concatenated sequence:
#
# $$Q = [Q_x; Q_c],\; K = [K_x; K_c],\; V = [V_x; V_c], \qquad
#   [x'; c'] = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt d}\right) V .$$
#
# So every image token attends to text and to image tokens in the same softmax, and the text tokens are
# updated by the image in turn. The $(N + L) \times (N + L)$ weights of one head fall into four blocks:

# %%
tiny = MMDiT(MMDiTConfig.tiny())
N, L = 12, 5
x, c = torch.randn(1, N, 16, generator=g), torch.randn(1, L, 16, generator=g)
with torch.no_grad():
    weights = tiny.transformer_blocks[0].attn.attention_weights(x, c)[0, 0]  # (N + L, N + L), head 0
fig = Figure(figsize=(4.2, 4.2))
ax = fig.subplots()
ax.imshow(weights, cmap="viridis")
ax.axhline(N - 0.5, color="white")
ax.axvline(N - 0.5, color="white")
ax.set_xticks([N / 2 - 0.5, N + L / 2 - 0.5], ["image keys", "text keys"])
ax.set_yticks([N / 2 - 0.5, N + L / 2 - 0.5], ["image queries", "text queries"], rotation=90, va="center")
ax.set_title("joint attention, one head (each row sums to 1)", fontsize=9)
show(fig)
print(f"row sums: min {weights.sum(1).min():.6f}, max {weights.sum(1).max():.6f}")
print(
    f"share of the image queries' weight on text keys: {weights[:N, N:].sum(1).mean():.1%} "
    f"(random weights; {L / (N + L):.0%} if uniform)"
)

# %% [markdown]
# SD 1.5's cross-attention is the top-right block alone (image queries, text keys), renormalised; MMDiT
# computes all four in one softmax, and a text query row (bottom) is what lets the text representation change
# with the image. The last block updates only the image stream: its text output would feed nothing.
#
# ### Build, then check against diffusers
# `common/mmdit.py` assembles these pieces: patch embedding, the conditioning vector, the joint blocks, a
# final adaLN and `unpatchify`. Its parameters have the names and shapes of diffusers'
# `SD3Transformer2DModel`, so `common.convert.from_diffusers` copies a state dict across. A small diffusers
# model with random weights, a non-square latent, and the same inputs to both:

# %%
from diffusers import SD3Transformer2DModel  # noqa: E402

from common.convert import from_diffusers  # noqa: E402

torch.manual_seed(0)
ref = SD3Transformer2DModel(**MMDiTConfig.tiny().to_diffusers()).eval()
with torch.no_grad():
    for param in ref.parameters():
        param.normal_(0, 0.2)  # diffusers' adaLN-Zero init would make every block the identity
ours = from_diffusers(ref)
z = torch.randn(2, 4, 8, 12, generator=g)  # (B, C, H, W): 4 x 6 patches
context, pooled = torch.randn(2, 7, 24, generator=g), torch.randn(2, 12, generator=g)
t = torch.tensor([999.0, 250.0])
with torch.no_grad():
    expected = ref(
        hidden_states=z, encoder_hidden_states=context, pooled_projections=pooled, timestep=t
    ).sample
    got = ours(z, t, context, pooled)
print(
    f"output {tuple(got.shape)}, max |ours - diffusers| = {(got - expected).abs().max():.1e} "
    f"(outputs up to {expected.abs().max():.1f})"
)

# %% [markdown]
# ### How big is SD 3 medium?
# `MMDiTConfig.sd3_medium()` writes out SD 3 medium's transformer config (24 blocks of width 1536, 16 latent
# channels, 2 x 2 patches). On the meta device it costs no memory to count:

# %%
with torch.device("meta"):
    sd3 = MMDiT(MMDiTConfig.sd3_medium())


def count(*modules) -> int:
    return sum(param.numel() for m in modules for param in m.parameters())


blocks = sd3.transformer_blocks
image_stream = sum(count(b.norm1, b.attn.to_q, b.attn.to_k, b.attn.to_v, b.attn.to_out, b.ff) for b in blocks)
text_stream = count(blocks) - image_stream
rows = {
    "patch embedding (2x2x16 -> 1536)": count(sd3.pos_embed),
    "conditioning: timestep + pooled text MLPs": count(sd3.time_text_embed),
    "text token projection (4096 -> 1536)": count(sd3.context_embedder),
    "24 joint blocks, image stream": image_stream,
    "24 joint blocks, text stream": text_stream,
    "final adaLN + projection to patches": count(sd3.norm_out, sd3.proj_out),
}
total = count(sd3)
print(f"{'part':44s} {'parameters':>14s} {'share':>7s}")
for name, n in rows.items():
    print(f"{name:44s} {n:14,d} {n / total:7.1%}")
print(f"{'total':44s} {total:14,d}")
tokens_1024 = (1024 // 8 // 2) ** 2
print(
    f"a 1024 px image: 128 x 128 latent -> {tokens_1024:,d} image tokens, "
    "plus 333 text tokens (77 CLIP + 256 T5)"
)
del sd3

# %% [markdown]
# The two streams are about the same size: the text gets as many weights as the image, the "multimodal" in
# MMDiT (the last block's missing text projection and MLP make the text stream slightly smaller). At 1024 px a
# block attends over 4,096 image tokens plus 333 text tokens; chapter 05's attention-memory arithmetic applies
# as is.
#
# Exercises 10 and 11 ask you to write the adaLN-Zero modulation and the joint attention.
#
# ## 4. SDXL in one table
# Between SD 1.5 and SD 3 came SDXL (Podell et al. 2023), still a UNet with $\epsilon$ prediction. What
# changed: a UNet three times larger with its attention moved to the low resolutions (no attention at the
# highest level, 10 transformer layers per block at the lowest), **two text encoders** (CLIP ViT-L and
# OpenCLIP ViT-bigG, their penultimate hidden states concatenated: 768 + 1280 = 2048 wide), the **pooled**
# bigG embedding added to the timestep embedding, **micro-conditioning** on the original image size, the
# crop's top-left corner and the target size (six numbers, each with a 256-wide sinusoidal code), and a
# **refiner** UNet that takes over for the last low-noise steps (conditioned on an aesthetic score instead of
# the target size). The configs, written out below, are built on the meta device with diffusers and
# transformers:

# %%
from diffusers import UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

UNETS = {
    "SD 1.5": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8),
    "SDXL base": dict(
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        # pooled bigG + six codes: original size, crop corner, target size
        projection_class_embeddings_input_dim=1280 + 6 * 256,
    ),
    "SDXL refiner": dict(
        block_out_channels=(384, 768, 1536, 1536),
        transformer_layers_per_block=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(6, 12, 24, 24),
        cross_attention_dim=1280,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        # pooled bigG + five codes: original size, crop corner, aesthetic score
        projection_class_embeddings_input_dim=1280 + 5 * 256,
    ),
}
CLIP_L = CLIPTextConfig(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    projection_dim=768,
    hidden_act="quick_gelu",
)
CLIP_BIGG = CLIPTextConfig(
    hidden_size=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    intermediate_size=5120,
    projection_dim=1280,
    hidden_act="gelu",
)
with torch.device("meta"):
    unet_params = {name: count(UNet2DConditionModel(**cfg)) for name, cfg in UNETS.items()}
    clip_l, clip_bigg = count(CLIPTextModel(CLIP_L)), count(CLIPTextModelWithProjection(CLIP_BIGG))
table = [
    (
        "UNet parameters",
        f"{unet_params['SD 1.5'] / 1e9:.2f} B",
        f"{unet_params['SDXL base'] / 1e9:.2f} B",
        f"{unet_params['SDXL refiner'] / 1e9:.2f} B",
    ),
    (
        "text encoders",
        f"CLIP-L {clip_l / 1e6:.0f} M",
        f"CLIP-L + bigG {(clip_l + clip_bigg) / 1e6:.0f} M",
        f"bigG {clip_bigg / 1e6:.0f} M",
    ),
    ("cross-attention width", "768", "768 + 1280 = 2048", "1280"),
    ("pooled text in the time embedding", "no", "bigG, 1280", "bigG, 1280"),
    ("micro-conditioning (256-wide codes)", "none", "size, crop, target size: 6", "size, crop, aesthetic: 5"),
    ("transformer layers per level", "1, 1, 1, -", "-, 2, 10", "-, 4, 4, -"),
    ("native resolution", "512 px", "1024 px", "1024 px (last steps)"),
]
print(f"{'':38s} {'SD 1.5':>20s} {'SDXL base':>28s} {'SDXL refiner':>26s}")
for row in table:
    print(f"{row[0]:38s} {row[1]:>20s} {row[2]:>28s} {row[3]:>26s}")

# %% [markdown]
# Two lessons carry over to SD 3: text conditioning grew (two CLIPs in SDXL; two CLIPs plus T5-XXL in SD 3,
# whose pooled CLIP vectors feed adaLN exactly as SDXL's pooled bigG feeds the time embedding), and the
# compute moved to where the tokens are few (SDXL's attention at the low resolutions; SD 3's 2 x 2 patches).
#
# ## Summary
# * **v-prediction** $v = \alpha_t\epsilon - \sigma_t z_0$ is the velocity along the circle of $(\alpha_t,
#   \sigma_t)$; converting it to $z_0$ or $\epsilon$ never amplifies an error, which is why it pairs with
#   **zero terminal SNR** (Lin et al. 2023) and trailing timesteps. The course's DDIM, DDPM and DPM-Solver++
#   follow diffusers on that schedule.
# * **Flow matching** trains $v_\theta$ on the straight path $z_t = (1 - t) z_0 + t\epsilon$ with target
#   $\epsilon - z_0$, timesteps from a logit-normal density, sampling with Euler steps on a shifted schedule
#   (`common.flow`, equal to diffusers' `FlowMatchEulerDiscreteScheduler`). `compare_objectives.py` trains
#   the course's text-to-image model with it and with $\epsilon$ at equal compute; section 2's table and
#   the lines under it say what that run measured at 4, 8 and 25 steps, with intervals.
# * **MMDiT** patchifies the latent, conditions every block with adaLN-Zero, and runs text and image tokens
#   through one attention with separate weights per stream (`common.mmdit`, equal to diffusers'
#   `SD3Transformer2DModel`).
# * **SDXL** scaled the UNet and the text encoders and conditioned on image size and crop.
#
# ## Exercises (`06_stable_diffusion_architecture/exercises.py`, graded by `python -m common.grade 06`)
# 6. `v_target`: the velocity, checked against diffusers' `get_velocity` on a zero-SNR schedule.
# 7. `v_to_eps`: the noise from a $v$ prediction, finite at $\bar\alpha = 0$.
# 8. `flow_matching_loss`: the straight path, the timestep $1000\,t$ and the velocity target.
# 9. `flow_euler_step`: one Euler step on SD 3's shifted schedule, against `FlowMatchEulerDiscreteScheduler`.
# 10. `adaln_zero`: the six modulation vectors and the modulated tokens, against diffusers'
#     `AdaLayerNormZero`.
# 11. `joint_attention`: two token streams in one softmax, against diffusers' joint attention processor.
