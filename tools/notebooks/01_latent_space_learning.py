# %% [markdown]
# # 01. Latent space learning
#
# Diffusion models are slow because they run a big network many times over every number of the image.
# Latent diffusion (Rombach et al. 2022) first trains an **autoencoder** that squeezes an image into a much
# smaller latent `z`, then runs diffusion on `z`. This chapter is stage one of that two-stage recipe:
#
# 1. what the move to a latent space saves, computed;
# 2. a trained autoencoder against plain downsampling that keeps as many numbers;
# 3. the autoencoder objective, term by term (L1, KL, LPIPS, GAN), each switched on in turn;
# 4. how the KL weight shapes the latent statistics;
# 5. the latent scaling factor.
#
# Every heavy cell sizes itself with `budget(...)`: under `COURSE_FAST=1` the notebook runs in seconds; on a
# laptop CPU it runs the real (short) experiments. The course's Shapes VAE, trained by `train_vae.py`, ships
# in `checkpoints/vae_shapes` so nothing here has to wait for a long run.

# %%
import math
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.data import Shapes
from common.losses import VAELoss, VAELossWeights, kl_loss, lpips_backbone_available, reconstruction_loss
from common.metrics import psnr, ssim
from common.runtime import budget, describe, seed_everything
from common.viz import image_grid, side_by_side

matplotlib.rcParams["figure.dpi"] = 72
seed_everything(0)
print(describe())
ROOT = Path.cwd().parent if Path.cwd().name.startswith("01_") else Path.cwd()
SHAPES_VAE = ROOT / "checkpoints" / "vae_shapes"
T0 = time.perf_counter()


def show(fig, dpi: int = 72) -> None:
    """Display a matplotlib Figure (common.viz builds them without pyplot) as a PNG in the notebook."""
    import io

    from IPython.display import Image, display

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    display(Image(buffer.getvalue()))

# %% [markdown]
# ## 1. What the latent space saves
#
# SD 1.x generates 512 x 512 RGB images. Its VAE downsamples by f = 8 into 4 channels, so the diffusion UNet
# works on 64 x 64 x 4 latents. Every denoising step touches every number, and self-attention cost grows with
# the square of the number of positions:

# %%
pixel = 512 * 512 * 3
latent = (512 // 8) * (512 // 8) * 4
print(f"pixels : 512 x 512 x 3 = {pixel:,} numbers")
print(f"latents:  64 x  64 x 4 = {latent:,} numbers  -> {pixel / latent:.0f}x fewer")
tokens_pixel, tokens_latent = 512 * 512, 64 * 64
print(f"self-attention over positions: {tokens_pixel:,}^2 vs {tokens_latent:,}^2 entries "
      f"-> {(tokens_pixel / tokens_latent) ** 2:,.0f}x fewer")
shapes_pixel, shapes_latent = 64 * 64 * 3, 16 * 16 * 4
print(f"the course's Shapes: 64 x 64 x 3 = {shapes_pixel:,} -> 16 x 16 x 4 = {shapes_latent:,} ({shapes_pixel / shapes_latent:.0f}x)")

# %% [markdown]
# The 48x is the price of one UNet evaluation in numbers touched; the attention saving is far larger. The
# bet is that almost all of those numbers are *perceptually redundant*: a good autoencoder keeps what we
# see and drops the rest, so diffusion spends its capacity on content, not on imperceptible detail.
#
# ## 2. An autoencoder against plain downsampling
#
# Is a learned encoder better than simply shrinking the image? Give both the same budget: the Shapes VAE's
# latent has 4 x 16 x 16 = 1,024 numbers; bicubic resizing to 18 x 18 x 3 = 972 numbers keeps as many.
# We load the shipped VAE (its model card is `checkpoints/vae_shapes/README.md`) and reconstruct held-out
# images: the test split holds colour-shape pairs never seen in training.

# %%
vae = AutoencoderKL.load(SHAPES_VAE).eval()
print(vae.config)
n_show = budget(fast=8, cpu=64)
test = Shapes(64, "test", n_show, seed=1, multiple_of=4)
x = torch.stack([test[i]["image"] for i in range(n_show)])  # (B, 3, 64, 64) in [-1, 1]


def bicubic_down_up(x: torch.Tensor, side: int) -> torch.Tensor:
    small = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


with torch.no_grad():
    z = vae.encode(x).mode()  # (B, 4, 16, 16): the posterior mean
    x_vae = vae.decode(z).clamp(-1, 1)
side = int(math.sqrt(z[0].numel() / 3))
x_bic = bicubic_down_up(x, side)
x_f4 = bicubic_down_up(x, 16)  # the same factor 4, but 3 channels: 768 numbers
rows = {"input": x[:8], f"VAE ({z[0].numel()})": x_vae[:8], f"bicubic {side}px ({3 * side * side})": x_bic[:8],
        "bicubic 16px (768)": x_f4[:8]}
for name, rec in list(rows.items())[1:]:
    print(f"{name:24s} PSNR {psnr(rec, x[:8]):5.2f} dB  SSIM {ssim(rec, x[:8]):.3f}")
print(f"over {n_show} held-out images: VAE {psnr(x_vae, x):.2f} dB, bicubic {side}px {psnr(x_bic, x):.2f} dB")
show(side_by_side(rows, size=1.0))

# %% [markdown]
# *Figure: held-out Shapes, the VAE's reconstructions through the posterior mean, and bicubic down/up with
# as many (972) or fewer (768) numbers.* Bicubic blurs every edge because it spends its numbers uniformly;
# the encoder spends them where the picture needs them (edges and colours) and the decoder re-draws sharp
# boundaries it has learned.
#
# ## 3. The objective, term by term
#
# Stage one trains the VAE with (Rombach et al. 2022, appendix G; Esser et al. 2021, eq. 5-7)
#
# $$L_G = \underbrace{|x - D(z)|_1}_{\text{reconstruction}} + w_{\text{lpips}}\,\text{LPIPS}(x, D(z))
#   + w_{\text{kl}}\,\text{KL}\big(q(z|x)\,\|\,\mathcal N(0, I)\big) + \lambda\, w_{\text{gan}}\,L_{\text{adv}}(D(z)),$$
#
# with $z = \mu + \sigma \epsilon$ sampled from the encoder's diagonal Gaussian. First, the terms written by
# hand on one batch, next to `common.losses.VAELoss` (which the training script uses):

# %%
torch.manual_seed(0)
with torch.no_grad():
    posterior = vae.encode(x[:4])
    x_hat = vae.decode(posterior.sample(torch.Generator().manual_seed(0)))
rec_by_hand = (x[:4] - x_hat).abs().mean()
kl_by_hand = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum(dim=(1, 2, 3)).mean()
weights = VAELossWeights(lpips=0.0, gan=0.0, kl=1e-6)
total, terms = VAELoss(weights).generator_loss(x[:4], x_hat, posterior, step=0)
print(f"L1 : by hand {rec_by_hand:.6f}  VAELoss {terms['rec']:.6f}")
print(f"KL : by hand {kl_by_hand:.3f}  VAELoss {terms['kl']:.3f}  (nats per image, summed over 4x16x16 dims)")
print(f"total = L1 + 1e-6 KL: by hand {rec_by_hand + 1e-6 * kl_by_hand:.6f}  VAELoss {total:.6f}")

# %% [markdown]
# A word on units: SD (and taming) *sum* the L1 over the pixels and weight the KL by 1e-6; `VAELoss` *averages*
# the L1 over pixels, so SD's weight is 1e-6 / (3 H W) here (`KL_SD` below; `train_vae.py` converts the same way).
#
# Now switch the terms on one at a time. Each run trains a small f = 4 autoencoder (widths 16-32-32) on
# 32 px Shapes from the same seed for the same number of steps, so the differences come from the loss alone.
# LPIPS needs ImageNet AlexNet weights that torchvision downloads on first use; the cell says whether they
# are on disk and skips the term when they are not. The GAN run trains a small PatchGAN discriminator with
# its own optimiser (the generator's adversarial term is weighted by the adaptive lambda, from step 0 here).

# %%
from common.losses import LPIPS, PatchDiscriminator  # noqa: E402

STEPS = budget(fast=3, cpu=150)
small_config = AutoencoderConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                 sample_size=32, scaling_factor=1.0)
train32 = Shapes(32, "train", STEPS * 8, seed=0, multiple_of=4)
test32 = torch.stack([Shapes(32, "test", 32, seed=1, multiple_of=4)[i]["image"] for i in range(32)])


_cache = {}


def train_small(kl: float, lpips: float = 0.0, gan: float = 0.0, steps: int = STEPS, seed: int = 0):
    """A few hundred Adam steps of VAELoss on 32 px Shapes; returns the VAE and held-out figures (cached)."""
    key = (kl, lpips, gan, steps, seed)
    if key not in _cache:
        _cache[key] = _train_small(kl, lpips, gan, steps, seed)
    return _cache[key]


def _train_small(kl, lpips, gan, steps, seed):
    torch.manual_seed(seed)
    model = AutoencoderKL(small_config)
    disc = PatchDiscriminator(base_channels=16, n_layers=2) if gan else None
    crit = VAELoss(VAELossWeights(lpips=lpips, kl=kl, gan=gan, disc_start=0),
                   lpips=LPIPS() if lpips else None, discriminator=disc)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9)) if gan else None
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        xb = torch.stack([train32[step * 8 + i]["image"] for i in range(8)])
        x_hat, post = model(xb, generator=g)
        loss, _ = crit.generator_loss(xb, x_hat, post, step=step, last_layer=model.last_layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if gan:  # the discriminator's own step, on the detached reconstructions
            d_loss, _ = crit.discriminator_loss(xb, x_hat, step=step)
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
    model.eval()
    with torch.no_grad():
        post = model.encode(test32)
        rec = model.decode(post.mode()).clamp(-1, 1)
    return model, {"psnr": psnr(rec, test32), "ssim": ssim(rec, test32), "kl": float(kl_loss(post)),
                   "z_std": float(post.mean.std()), "sigma": float(post.std.mean()), "rec": rec}


KL_SD = 1e-6 / (3 * 32 * 32)  # SD's kl_weight (on summed pixels) in VAELoss's per-pixel-mean units
runs = {"L1 only": dict(kl=0.0), "L1 + KL (SD's weight)": dict(kl=KL_SD)}
if lpips_backbone_available():
    runs["L1 + KL + LPIPS"] = dict(kl=KL_SD, lpips=1.0)
else:
    print("LPIPS skipped: its AlexNet backbone is not on disk (see common.losses.LPIPS for the one-line download)")
runs["L1 + KL + GAN (0.5)"] = dict(kl=KL_SD, gan=0.5)
results = {}
t = time.perf_counter()
for name, kw in runs.items():
    results[name] = train_small(**kw)[1]
    r = results[name]
    print(f"{name:22s} PSNR {r['psnr']:5.2f} dB  SSIM {r['ssim']:.3f}  KL {r['kl']:9.1f}  "
          f"std(mu) {r['z_std']:.3f}  mean sigma {r['sigma']:.4f}")
print(f"{len(runs)} runs of {STEPS} steps in {time.perf_counter() - t:.0f} s")
show(side_by_side({"held-out": test32[:8], **{k: v["rec"][:8] for k, v in results.items()}}, size=0.9))

# %% [markdown]
# *Figure: held-out 32 px Shapes and the reconstructions of each run.* What each term changes:
#
# * **L1 alone** is a plain autoencoder with noise: nothing holds the latents' scale or the posterior's width,
#   which drift wherever reconstruction takes them (compare the KL, std(mu) and sigma columns across runs).
# * **+ KL** at SD's weight is a very gentle pull towards N(0, I): in a short run it changes almost nothing,
#   which is the point - it keeps the posterior a real distribution (the decoder must tolerate noise of width
#   sigma in z, so nearby latents decode to similar images) without costing reconstruction. Section 4 turns it up.
# * **+ LPIPS** (when available) trades a little PSNR for perceptual sharpness: it penalises missing texture
#   and edges as a deep network sees them, not per-pixel.
# * **+ GAN** pushes the decoder to produce patches a discriminator cannot tell from real ones. Switched on
#   from step 0, as here, it hurts: the adaptive weight makes the adversarial gradient as large as the
#   reconstruction one before the decoder can reconstruct anything. That is why SD starts it late
#   (`disc_start`, after 50k steps) and the course's Shapes VAE keeps it off.
#
# ## 4. How the KL weight shapes the latent statistics
#
# The KL term pulls every posterior towards N(0, I). Sweep its weight and look at the latents' statistics
# per channel: the mean and spread of the posterior means across held-out images, and the posterior's own
# sigma.

# %%
kl_weights = budget(fast=[0.0, 1e-2], cpu=[0.0, KL_SD, 1e-6, 1e-4, 1.0])
sweep = {}
for w in kl_weights:
    model, r = train_small(kl=w)
    with torch.no_grad():
        post = model.encode(test32)
    sweep[w] = {"psnr": r["psnr"], "kl": r["kl"], "mean_c": post.mean.mean(dim=(0, 2, 3)),
                "std_c": post.mean.std(dim=(0, 2, 3)), "sigma_c": post.std.mean(dim=(0, 2, 3))}
    print(f"kl weight {w:<8.2g} PSNR {r['psnr']:5.2f} dB  KL {r['kl']:9.1f}  per-channel mean "
          f"{[round(v, 2) for v in sweep[w]['mean_c'].tolist()]}  std {[round(v, 2) for v in sweep[w]['std_c'].tolist()]}"
          f"  sigma {[round(v, 3) for v in sweep[w]['sigma_c'].tolist()]}")

from matplotlib.figure import Figure  # noqa: E402

fig = Figure(figsize=(9, 2.6))
axes = fig.subplots(1, 3)
xs = [max(w, 1e-8) for w in kl_weights]
for c in range(small_config.latent_channels):
    axes[0].plot(xs, [sweep[w]["std_c"][c] for w in kl_weights], "o-", label=f"channel {c}")
    axes[1].plot(xs, [sweep[w]["sigma_c"][c] for w in kl_weights], "o-")
axes[2].plot(xs, [sweep[w]["psnr"] for w in kl_weights], "ko-")
for ax, title in zip(axes, ["std of posterior means", "posterior sigma", "held-out PSNR (dB)"]):
    ax.set_xscale("log")
    ax.set_xlabel("KL weight (0 drawn at 1e-8)")
    ax.set_title(title, fontsize=9)
axes[0].legend(fontsize=7)
fig.tight_layout()
show(fig)

# %% [markdown]
# *Figure: per-channel latent statistics and held-out PSNR against the KL weight.* A small weight leaves the
# latents free: uneven per-channel scales, a narrow posterior (small sigma). As the weight grows, sigma rises
# towards 1 and the spread of the posterior means across images shrinks; past a point (here somewhere between
# 1e-6 and 1e-4 on the per-pixel scale) the posterior *collapses*: q(z|x) becomes N(0, I) whatever x is, the
# means stop varying, the latent carries nothing and PSNR falls to that of a blurry average image. SD sits at
# the small end: the latents stay informative, and their overall scale is fixed afterwards by one number, next.
#
# ## 5. The scaling factor
#
# Diffusion's noise schedule assumes data of roughly unit variance. The LDM paper measures the std of the
# latents on the training data once and divides by it: `z_scaled = z * scaling_factor`,
# `scaling_factor = 1 / std(z)`. SD's VAE has 0.18215 (its latents have std about 5.5); `train_vae.py`
# measures the course's and stores it in `config.json`.

# %%
train64 = Shapes(64, "train", 128, seed=0, multiple_of=4)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    zs = torch.cat([vae.encode(torch.stack([train64[i]["image"] for i in range(b, b + 32)])).sample(g)
                    for b in range(0, budget(fast=32, cpu=128), 32)])
measured = 1.0 / float(zs.std())
print(f"std of {len(zs)} latent samples: {zs.std():.4f} -> scaling factor {measured:.4f}")
print(f"stored in the shipped config: {vae.config.scaling_factor}; SD 1.x: 0.18215 (1 / 0.18215 = {1 / 0.18215:.2f})")
print(f"after scaling: std {float((zs * vae.config.scaling_factor).std()):.3f}, "
      f"per channel {[round(v, 2) for v in (zs * vae.config.scaling_factor).std(dim=(0, 2, 3)).tolist()]}")

# %% [markdown]
# One global number, not one per channel: the channels keep their relative scales (the decoder expects
# them), only the overall scale is matched to the noise. SD 2 and SDXL kept the recipe (SDXL: 0.13025).
#
# ## 6. Training it yourself
#
# `train_vae.py` runs stage one with `common.training.Trainer` (checkpoints, exact resume), evaluates on the
# held-out split (PSNR, SSIM, LPIPS when available, against bicubic), measures the scaling factor and writes
# a diffusers-format folder with a model card. The shipped checkpoint came from its default run:

# %%
import json  # noqa: E402

card = json.loads((SHAPES_VAE / "metrics.json").read_text())
print("command:", card["command"])
print(f"steps {card['steps']} x batch {card['batch_size']}, {card['train_minutes']:.1f} min training on {card['hardware']}")
m = card["metrics"]
print(f"held-out ({m['n_images']} images): PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}; "
      f"bicubic with {m['bicubic_numbers']} numbers: {m['bicubic_psnr']:.2f} dB")
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# Run it yourself (seconds with `COURSE_FAST=1`; the default run took 26 minutes on the course's shared 2-core
# machine and passed 30 dB after about 8):
#
# ```
# python 01_latent_space_learning/train_vae.py --out runs/vae_shapes
# python 01_latent_space_learning/train_vae.py --data photos --out runs/vae_photos
# ```
#
# ## Summary
#
# * Latent diffusion moves the expensive part to a space 48x smaller than SD's pixels (12x for our Shapes),
#   and attention gets far cheaper still.
# * A learned autoencoder beats plain downsampling with the same number of numbers by spending them where
#   the picture needs them.
# * L1 reconstructs; a tiny KL keeps the posterior a smooth distribution; LPIPS and the GAN buy perceptual
#   sharpness at some cost in PSNR.
# * The KL weight sets how Gaussian the latents are; SD keeps it tiny and fixes the scale with one measured
#   number, the scaling factor.
#
# ## Exercises (`01_latent_space_learning/exercises.py`, graded by `python -m common.grade 01`)
#
# 1. `scaling_factor`: 1 / std of a batch of latents.
# 2. `compare_with_downsampling`: VAE against bicubic down/up at the same number of numbers.
# 3. `channel_ablation`: zero each latent channel in turn; which one carries most of the picture?
# 4. `kl_weight_sweep` (open-ended): train tiny VAEs at several KL weights and explain the trend.
