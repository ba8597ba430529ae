# %% [markdown]
# # 03. Latent DDPM
#
# Stage two of latent diffusion (Rombach et al. 2022): freeze the autoencoder of chapters 01-02 and train a
# denoising diffusion model (Ho et al. 2020) on its **latents**. This chapter builds, in order:
#
# 1. the forward process on latents, and what it does to the decoded images;
# 2. the training objective, and a short training run of a class-conditional UNet on 8x8x4 Digits latents;
# 3. the reverse process: a DDIM step by hand, then the course's DDPM, DDIM and DPM-Solver++ samplers,
#    with the trajectory decoded step by step;
# 4. a table of samplers (steps, seconds, quality graded by a digits classifier);
# 5. the claim that started it all, measured: the same UNet at pixel and at latent resolution.
#
# Heavy cells size themselves with `budget(...)`: seconds under `COURSE_FAST=1`, minutes on a laptop CPU.
# The model trained for real by `train_ldm.py` ships in `checkpoints/ldm_digits`, so we train a few steps to
# see the loop, then load it.

# %%
import json
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from safetensors.torch import load_file

from common.autoencoder import AutoencoderKL
from common.classifier import DigitClassifier, conditional_accuracy
from common.data import Digits
from common.grade import load_module
from common.runtime import budget, describe, is_fast, seed_everything
from common.samplers import DDIMSampler, make_sampler, sample_loop
from common.schedules import NoiseSchedule
from common.unet import UNet, UNetConfig
from common.viz import image_grid, plot_trajectory, show_latent_channels

matplotlib.rcParams["figure.dpi"] = 72
seed_everything(0)
if is_fast():  # the tests share a few busy cores: one thread avoids OpenMP threads spinning against each other
    torch.set_num_threads(1)
print(describe())
ROOT = Path.cwd().parent if Path.cwd().name.startswith("03_") else Path.cwd()
CKPT = ROOT / "checkpoints"
T0 = time.perf_counter()


def show(fig, dpi: int = 72) -> None:
    """Display a matplotlib Figure (common.viz builds them without pyplot) as a PNG in the notebook."""
    import io

    from IPython.display import Image, display

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    display(Image(buffer.getvalue()))

# %% [markdown]
# ## 1. Latents of the frozen VAE
#
# The Digits VAE (`checkpoints/vae_digits`, trained by chapter 01's `train_vae.py --data digits --resolution 32
# --factor 4`) maps a 32 x 32 digit to a 4 x 8 x 8 latent: 4x fewer numbers than the RGB image it was trained
# on. Its `scaling_factor` (1 / std of the latents, measured when it was trained) makes them roughly unit
# variance, which is what the noise schedule assumes. Offline, the digits are rendered from fonts (the cell
# prints which source it used).

# %%
vae = AutoencoderKL.load(CKPT / "vae_digits").eval().requires_grad_(False)
scale = vae.config.scaling_factor
digits = Digits(32, "train", length=budget(fast=64, cpu=1024), seed=0)
x = torch.stack([digits[i][0] for i in range(len(digits))]).repeat(1, 3, 1, 1)  # grey -> RGB, as the VAE saw them
labels = torch.tensor([digits[i][1] for i in range(len(digits))])
with torch.no_grad():
    posterior = vae.encode(x)
    z0 = posterior.mean * scale  # (N, 4, 8, 8): the scaled latents diffusion works on
print(f"images {tuple(x.shape)} -> latents {tuple(z0.shape)}; scaling factor {scale:.4f}; "
      f"scaled latent std {float(z0.std()):.3f}, mean {float(z0.mean()):.3f}")
show(show_latent_channels(z0[:3], size=1.0, title="scaled latents of three digits, one heatmap per channel"))

# %% [markdown]
# *Figure: each row is one digit's 4 x 8 x 8 latent. The channels still look like blurred digits: an f = 4 VAE
# keeps the layout and spreads the detail over channels.*
#
# ## 2. The forward process on latents
#
# DDPM destroys data gradually: with betas beta_1..beta_T and alpha_bar_t = prod_s (1 - beta_s),
#
# $$q(z_t \mid z_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\, z_0,\ (1 - \bar\alpha_t) I\big)
# \quad\Longrightarrow\quad z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon .$$
#
# Built small first, with Stable Diffusion's "scaled linear" betas, then checked against `common.schedules`.

# %%
T = 1000
betas = torch.linspace(0.00085**0.5, 0.012**0.5, T) ** 2  # SD's scaled_linear schedule
alpha_bar = torch.cumprod(1 - betas, dim=0)


def q_sample(z0, eps, t):
    a = alpha_bar[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * eps


schedule = NoiseSchedule.sd15()
eps = torch.randn(z0[:4].shape, generator=torch.Generator().manual_seed(0))
t = torch.tensor([0, 250, 500, 999])
diff = (q_sample(z0[:4], eps, t) - schedule.add_noise(z0[:4], eps, t)).abs().max()
print(f"max |ours - common.schedules| = {float(diff):.1e}")

# %% [markdown]
# Now noise one latent to several timesteps and **decode** each z_t, beside noising the pixels directly with the
# same schedule. The decoder turns latent noise into structured blobs, not pixel snow: it only knows how to draw
# digit-like strokes.

# %%
ts = [0, 100, 250, 400, 600, 999]
z_row = torch.cat([schedule.add_noise(z0[:1], eps[:1], t) for t in ts])
with torch.no_grad():
    decoded = vae.decode(z_row / scale).clamp(-1, 1).mean(1, keepdim=True)
pixel_row = torch.cat([schedule.add_noise(x[:1, :1], torch.randn_like(x[:1, :1]), t) for t in ts]).clamp(-1, 1)
show(plot_trajectory([torch.stack([p, d]) for p, d in zip(pixel_row, decoded)], ts, size=1.1,
                     title="top: pixels noised; bottom: latents noised, then decoded"))

# %% [markdown]
# *Figure: the same schedule applied in pixel space (top) and latent space (bottom), columns at t = 0 .. 999.*
#
# How fast the signal goes is summed up by the signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t)
# (for unit-variance data). Three schedules (the cosine one is exercise 1):

# %%
fig = Figure(figsize=(5, 2.6))
ax = fig.subplots()
for name, s in [("linear (DDPM)", NoiseSchedule.ddpm()), ("scaled_linear (SD)", NoiseSchedule.sd15()),
                ("cosine", NoiseSchedule.cosine())]:
    ax.semilogy(s.snr(torch.arange(T)).numpy(), label=name)
ax.axhline(1.0, color="grey", lw=0.5)
ax.set_xlabel("t")
ax.set_ylabel("SNR(t)")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# *Figure: log SNR against t for three schedules. Where SNR ~ 1 the model learns the most; a schedule that
# spends many steps far above or below it wastes them.*
#
# ## 3. The objective, and a short training run
#
# The network eps_theta(z_t, t, y) learns to predict the noise from the noisy latent, the timestep and the class
# label y (Ho et al. 2020 eq. 14, Rombach et al. 2022 eq. 2):
#
# $$L = \mathbb E_{z_0, y, \varepsilon, t}\ \big\| \varepsilon - \varepsilon_\theta(z_t, t, y) \big\|^2 .$$
#
# The UNet is chapter 03's class-conditional preset (`UNetConfig.digits()`: two levels, 8x8 -> 4x4, ResNet
# blocks, a class embedding added to the time embedding), here at base width 32 as `train_ldm.py` uses on a CPU.
# A few steps with the course's `Trainer` show the loop; `train_ldm.py` runs the same loss for real.

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
trainer = Trainer(UNet(config), torch.utils.data.TensorDataset(z0, labels), loss_fn,
                  TrainConfig(steps=steps, batch_size=64, lr=1e-3, ema_decay=None, log_every=1, progress=False),
                  out_dir=Path("/tmp") / "ch03_notebook_run", device="cpu", resume=False)
t0 = time.perf_counter()
trainer.fit()
import csv

log = list(csv.DictReader(open(trainer.log_path)))
print(f"{steps} steps in {time.perf_counter() - t0:.1f} s; loss {float(log[0]['loss']):.3f} -> {float(log[-1]['loss']):.3f}")

# %% [markdown]
# The loss of an eps-predictor starts near 1 (the variance of eps) and falls as the model learns to see the
# digit through the noise. The real run (`train_ldm.py`, a few thousand steps) is shipped; load its EMA weights,
# saved in diffusers' `UNet2DConditionModel` layout, with the schedule it was trained under.

# %%
LDM = CKPT / "ldm_digits"
unet = UNet(UNetConfig.from_diffusers(json.loads((LDM / "config.json").read_text())))
unet.load_state_dict(load_file(str(LDM / "diffusion_pytorch_model.safetensors")))
unet.eval()
schedule = NoiseSchedule.from_diffusers(json.loads((LDM / "scheduler_config.json").read_text()))
scale = json.loads((LDM / "ldm.json").read_text())["scaling_factor"]
classifier = DigitClassifier.load(CKPT / "digits_classifier")
print(f"UNet {sum(p.numel() for p in unet.parameters()):,} parameters, widths {unet.config.block_out_channels}; "
      f"schedule {schedule.beta_schedule}, {schedule.prediction_type}; scaling factor {scale:.4f}")
if (LDM / "README.md").exists():  # the model card train_ldm.py wrote: how it was trained
    card = (LDM / "README.md").read_text()
    print(*(line for line in card.splitlines() if line.startswith(("- Training", "- Wall time"))), sep="\n")

# %% [markdown]
# The model was trained with 10% of its labels replaced by an 11th "null" class, so it also knows the
# unconditional distribution. **Classifier-free guidance** (Ho & Salimans 2022) extrapolates from the unconditional
# prediction towards the conditional one, eps_u + w (eps_c - eps_u); w = 1 is the plain class-conditional model.
# The shipped run is short and still blurs its classes at w = 1; guidance sharpens them (the table below shows both).

# %%
W = 4.0  # the guidance scale train_ldm.py --guidance 4 graded the shipped model with
null = unet.config.num_class_embeds - 1


def guided(y, w=W):
    """denoise_fn(z, t) with classifier-free guidance for the labels y (one batch of 2B through the UNet)."""

    def denoise(z, t):
        eps_c, eps_u = unet(torch.cat([z, z]), t, class_labels=torch.cat([y, torch.full_like(y, null)])).chunk(2)
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
snapshots = {int(path.stem.split("_")[1]): load_file(str(path))  # {step: EMA weights}
             for path in sorted(PROGRESS.glob("step_*.safetensors"))}
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
ax_grid.set_yticks([32 * k + 16 for k in range(len(rows_p))],
                   [f"step {s:,}\nacc {accuracy_p[s]:.2f}" for s in snapshots], fontsize=8)
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
# ## 4. The reverse process: one DDIM step by hand
#
# DDIM (Song et al. 2021, eq. 12, eta = 0) turns the noise prediction into an estimate of the clean latent, then
# steps to the previous noise level along the same direction:
#
# $$\hat z_0 = \frac{z_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}}, \qquad
# z_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat z_0 + \sqrt{1-\bar\alpha_{t'}}\,\hat\varepsilon .$$
#
# A 20-step loop written out, against the course's `DDIMSampler` from the same noise:

# %%
n_steps = 20
sampler = DDIMSampler(schedule, n_steps, timestep_spacing="trailing")
y = torch.arange(10)
z_T = torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(1))
z = z_T.clone()
with torch.no_grad():
    for i, t in enumerate(sampler.timesteps):
        eps_hat = unet(z, t, class_labels=y)
        a_t = schedule.alpha_bar[t]
        t_prev = int(t) - T // n_steps
        a_prev = schedule.alpha_bar[t_prev] if t_prev >= 0 else schedule.alpha_bar[0]  # SD's set_alpha_to_one=False
        z0_hat = (z - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        z = a_prev.sqrt() * z0_hat + (1 - a_prev).sqrt() * eps_hat
ours = z
theirs = sample_loop(lambda z, t: unet(z, t, class_labels=y), z_T, sampler)
print(f"max |hand-written DDIM - common.samplers| = {float((ours - theirs).abs().max()):.1e}")

# %% [markdown]
# Decode the prediction of the clean latent at each step: the trajectory of a DDIM run, one row per digit
# asked for. `sample_loop`'s callback hands over z_t and the x0 predicted at t.

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
show(plot_trajectory(decoded_frames, frame_t, size=1.0, title=f"decoded x0 prediction along a 20-step DDIM run (w = {W})"))

# %% [markdown]
# *Figure: columns are steps (t from T-1 down), rows the digits 0-4 asked for. The class is fixed within the first
# few steps; later steps refine the strokes.*
#
# ## 5. Samplers side by side
#
# The same model and the same starting noise, three samplers: DDPM (ancestral: it adds fresh noise at every
# step, Ho et al. 2020), DDIM (deterministic, eta = 0, the step of section 4) and DPM-Solver++(2M) (a
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
# ## 6. Pixel against latent: the claim, measured
#
# The same UNet architecture, trained one step at pixel resolution and at latent resolution (f = 4): the
# `pixel_vs_latent.py` script's own code, loaded here. Memory is what autograd saves for backward (the part that
# grows with resolution; weights, gradients and AdamW state are the same for both).

# %%
pvl = load_module(ROOT / "03_latent_ddpm" / "pixel_vs_latent.py", "_ch03_pixel_vs_latent")
table_rows = []
for case in ("digits", "shapes"):
    table_rows += pvl.compare(case, batch_size=budget(fast=4, cpu=16), repeats=budget(fast=1, cpu=1),
                              device=torch.device("cpu"), width=budget(fast=16, cpu=None))
print(pvl.table(table_rows))

# %% [markdown]
# The latent model is several times cheaper per step and holds an order of magnitude less activation memory,
# at the same parameter count: at SD's scale (512 px, f = 8, 64x fewer positions) that is the difference between
# a model that trains on one GPU and one that does not.
#
# ## Summary
#
# - The forward process z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps runs on the VAE's scaled latents;
#   decoded, noisy latents look like smudged digits, not pixel noise.
# - The objective is plain noise regression; the class label enters through an embedding added to the time
#   embedding.
# - DDPM, DDIM and DPM-Solver++ sample the same trained model; DPM-Solver++ needs ~20 steps for what DDPM does in 1000.
# - Classifier-free guidance (a null class seen 10% of the time in training) trades diversity for class fidelity.
# - Diffusing in latent space cuts time and activation memory per step by the factors in the last table.
#
# ## Exercises (`python -m common.grade 03`)
#
# 1. `cosine_betas`: the cosine schedule, graded against diffusers' `squaredcos_cap_v2`.
# 2. `add_noise`: the forward process, graded against `DDPMScheduler.add_noise`.
# 3. `ddim_step`: one DDIM step, graded against `DDIMScheduler.step`.
# 4. `ldm_loss`: the class-conditional latent diffusion loss for 8x8 Digits latents (checked against a reference
#    computation with a fixed generator, then by training on it).
# 5. `latent_snr`: the SNR of latents of a given scale.
# 6. `scaling_factor_experiment` (open-ended): train with factor 1.0, the computed 1/std and SD's 0.18215; compare
#    loss curves, samples and SNR. For a longer version: `train_ldm.py --scaling-factor 1.0` (and `computed`, `0.18215`).

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")
