# %% [markdown]
# # 01. Latent space learning
#
# Diffusion models are slow because they run a big network many times over every number of the image.
# Latent diffusion (Rombach et al. 2022) first trains an **autoencoder** that squeezes an image into a much
# smaller latent `z`, then runs diffusion on `z`. This chapter is stage one of that two-stage recipe, and it
# derives every equation the autoencoder's training relies on before the code that uses it:
#
# 1. what the move to a latent space saves, computed;
# 2. a trained autoencoder against plain downsampling that keeps as many numbers;
# 3. the VAE objective derived: the evidence lower bound (ELBO), its two terms, and why Stable Diffusion
#    weights the KL by about 1e-6;
# 4. the KL of a diagonal Gaussian against N(0, I) derived, then checked by Monte Carlo;
# 5. the reparameterisation trick, shown with autograd;
# 6. the loss terms, each shown by its effect: L1 only, L1 + KL, L1 + KL + PatchGAN;
# 7. how the KL weight shapes the latent statistics;
# 8. what each latent channel carries, one channel zeroed at a time;
# 9. the scaling factor, and the signal-to-noise ratio the noise schedule meets without it.
#
# Every heavy cell sizes itself with `budget(...)`: under `COURSE_FAST=1` the notebook runs in seconds; on a
# laptop CPU it runs the real (short) experiments. The course's VAEs, trained by `train_vae.py`, ship in
# `checkpoints/` so nothing here has to wait for a long run.

# %%
import json
import math
import time

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.distributions import Independent, Normal, kl_divergence

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.data import Photos, Shapes
from common.losses import VAELoss, VAELossWeights, kl_loss, lpips_backbone_available, lpips_backbone_path
from common.metrics import psnr, ssim
from common.runtime import budget, setup_notebook
from common.schedules import NoiseSchedule
from common.viz import show, show_latent_channels, side_by_side

ROOT = setup_notebook()  # seed 0, small inline figures; prints the device
CKPT = ROOT / "checkpoints"
T0 = time.perf_counter()

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
print(
    f"self-attention over positions: {tokens_pixel:,}^2 vs {tokens_latent:,}^2 entries "
    f"-> {(tokens_pixel / tokens_latent) ** 2:,.0f}x fewer"
)
shapes_pixel, shapes_latent = 64 * 64 * 3, 16 * 16 * 4
print(
    f"the course's Shapes: 64 x 64 x 3 = {shapes_pixel:,} -> 16 x 16 x 4 = {shapes_latent:,} "
    f"({shapes_pixel / shapes_latent:.0f}x)"
)

# %% [markdown]
# The 48x is the price of one UNet evaluation in numbers touched; the attention saving is far larger. The
# bet is that almost all of those numbers are *perceptually redundant*: a good autoencoder keeps what you
# see and drops the rest, so diffusion spends its capacity on content, not on imperceptible detail.
#
# ## 2. An autoencoder against plain downsampling
#
# Is a learned encoder better than simply shrinking the image? Give both the same budget: the Shapes VAE's
# latent has 4 x 16 x 16 = 1,024 numbers; bicubic resizing to 18 x 18 x 3 = 972 numbers keeps as many.
# Load the shipped VAE (its model card is `checkpoints/vae_shapes/README.md`) and reconstruct held-out
# images: the test split holds colour-shape pairs never seen in training.

# %%
vae = AutoencoderKL.load(CKPT / "vae_shapes").eval()
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
rows = {
    "input": x[:8],
    f"VAE ({z[0].numel()})": x_vae[:8],
    f"bicubic {side}px ({3 * side * side})": x_bic[:8],
    "bicubic 16px (768)": x_f4[:8],
}
for name, rec in list(rows.items())[1:]:
    print(f"{name:24s} PSNR {psnr(rec, x[:8]):5.2f} dB  SSIM {ssim(rec, x[:8]):.3f}")
print(f"over {n_show} held-out images: VAE {psnr(x_vae, x):.2f} dB, bicubic {side}px {psnr(x_bic, x):.2f} dB")
show(side_by_side(rows, size=1.0))

# %% [markdown]
# *Figure: held-out Shapes, the VAE's reconstructions through the posterior mean, and bicubic down/up with
# as many (972) or fewer (768) numbers.* Bicubic blurs every edge because it spends its numbers uniformly;
# the encoder spends them where the picture needs them (edges and colours) and the decoder re-draws sharp
# boundaries it has learned. The printed PSNRs put a number on it.
#
# ## 3. The objective, derived: the evidence lower bound
#
# **The question.** You want a decoder $p_\theta(x \mid z)$ and a prior $p(z) = \mathcal N(0, I)$ whose
# marginal $p_\theta(x) = \int p_\theta(x \mid z)\, p(z)\, dz$ gives your images high likelihood. The integral
# over every $z$ is intractable, so bring in an encoder $q_\phi(z \mid x)$ that proposes the $z$ likely to
# have made $x$, and write $\log p(x)$ through it (the KL identity; every expectation is
# over $z \sim q(z \mid x)$):
#
# $$
# \begin{aligned}
# \log p(x) &= \mathbb E_q\big[\log p(x)\big]
#   && \text{$\log p(x)$ does not depend on $z$, and $q$ integrates to 1} \\
# &= \mathbb E_q\Big[\log \frac{p(x, z)}{p(z \mid x)}\Big]
#   && \text{Bayes: } p(x) = p(x, z) / p(z \mid x) \\
# &= \mathbb E_q\Big[\log \frac{p(x, z)}{q(z \mid x)}\Big] +
#    \mathbb E_q\Big[\log \frac{q(z \mid x)}{p(z \mid x)}\Big]
#   && \text{multiply and divide by } q(z \mid x) \\
# &= \underbrace{\mathbb E_q\Big[\log \frac{p(x, z)}{q(z \mid x)}\Big]}_{\text{ELBO}}
#   + \mathrm{KL}\big(q(z \mid x)\,\|\,p(z \mid x)\big)
#   && \text{definition of the KL} \\
# &\ge \text{ELBO} && \text{a KL is never negative.}
# \end{aligned}
# $$
#
# The gap is exactly how far the encoder is from the true posterior. Split the ELBO with
# $p(x, z) = p(x \mid z)\, p(z)$:
#
# $$
# \text{ELBO} = \mathbb E_q\big[\log p(x \mid z)\big] + \mathbb E_q\Big[\log \frac{p(z)}{q(z \mid x)}\Big]
# = \underbrace{\mathbb E_q\big[\log p(x \mid z)\big]}_{\text{reconstruction}}
#   - \underbrace{\mathrm{KL}\big(q(z \mid x)\,\|\,\mathcal N(0, I)\big)}_{\text{regulariser}} .
# $$
#
# **Check it on a toy you can solve by hand.** One latent number and one pixel: $p(z) = \mathcal N(0, 1)$,
# $p(x \mid z) = \mathcal N(a z, s^2)$. Then $x$ is a sum of independent Gaussians, so
# $p(x) = \mathcal N(0, a^2 + s^2)$ exactly, and the true posterior is
# $\mathcal N\big(a x / (a^2 + s^2),\; s^2 / (a^2 + s^2)\big)$. Estimate the ELBO by Monte Carlo for encoders
# $q = \mathcal N(m, v)$ with different means $m$, and compare it with $\log p(x)$:

# %%
a, s, x_toy = 2.0, 0.5, 1.3  # decoder slope, decoder noise, the one observed pixel
log_px = Normal(0.0, math.sqrt(a**2 + s**2)).log_prob(torch.tensor(x_toy))  # exact: p(x) = N(0, a^2 + s^2)
post_mean, post_var = a * x_toy / (a**2 + s**2), s**2 / (a**2 + s**2)  # the true posterior p(z | x)

g = torch.Generator().manual_seed(0)
n_mc = budget(fast=4_000, cpu=200_000)


def elbo_mc(m: float, v: float) -> float:
    """E_q[log p(x|z) + log p(z) - log q(z)] over n_mc samples z ~ q = N(m, v)."""
    z_toy = m + math.sqrt(v) * torch.randn(n_mc, generator=g)  # (n_mc,)
    log_lik = Normal(a * z_toy, s).log_prob(torch.tensor(x_toy))
    log_prior = Normal(0.0, 1.0).log_prob(z_toy)
    log_q = Normal(m, math.sqrt(v)).log_prob(z_toy)
    return float((log_lik + log_prior - log_q).mean())


means = torch.linspace(-0.5, 1.5, 21)
elbos = [elbo_mc(float(m), post_var) for m in means]
print(f"log p(x) = {float(log_px):.4f} (exact)")
print(f"ELBO at the true posterior (m = {post_mean:.3f}): {elbo_mc(post_mean, post_var):.4f}")
print(
    f"largest ELBO over the grid: {max(elbos):.4f}; "
    f"every ELBO <= log p(x): {max(elbos) <= float(log_px) + 1e-3}"
)

fig = Figure(figsize=(5.5, 2.8))
ax = fig.subplots()
ax.plot(means, elbos, "o-", ms=3, label="ELBO, q = N(m, v*) (Monte Carlo)")
ax.axhline(float(log_px), color="k", ls="--", label="log p(x), exact")
ax.axvline(post_mean, color="grey", ls=":", label="mean of the true posterior")
ax.set_xlabel("encoder mean m")
ax.set_ylabel("nats")
ax.legend(fontsize=8, loc="lower center")
fig.tight_layout()
show(fig)

# %% [markdown]
# *Figure: the ELBO of encoders with the posterior's variance and a range of means; it never rises above
# $\log p(x)$ and touches it where the encoder is the true posterior (there the gap, a KL, is 0).* Training a
# VAE pushes the ELBO up, which both fits the decoder and drags $q$ towards the true posterior.
#
# **From the ELBO to Stable Diffusion's loss.** The autoencoder of latent diffusion (Esser et al. 2021;
# Rombach et al. 2022, appendix G) takes the decoder to be a Laplace distribution around its output $D(z)$,
# independently per pixel, with scale $b$:
#
# $$
# \begin{aligned}
# \log p(x \mid z) &= \sum_{i} \log \Big(\tfrac{1}{2b} e^{-|x_i - D(z)_i| / b}\Big)
#   && \text{a Laplace density per pixel $i$; pixels independent, so logs add} \\
# &= -\tfrac{1}{b} \textstyle\sum_i |x_i - D(z)_i| - N \log 2b
#   && N \text{ pixels; the last term does not depend on the model} \\
# -\text{ELBO} &= \tfrac{1}{b}\, \mathbb E_q\, \|x - D(z)\|_1 +
#    \mathrm{KL}(q \,\|\, \mathcal N(0, I)) + \text{const}
#   && \text{the ELBO's two terms, negated} \\
# b \cdot (-\text{ELBO}) &= \mathbb E_q\, \|x - D(z)\|_1 +
#    b\, \mathrm{KL}(q \,\|\, \mathcal N(0, I)) + \text{const}
#   && \text{multiplying by $b > 0$ keeps the minimiser.}
# \end{aligned}
# $$
#
# So a summed L1 plus a KL weighted by $w_{\text{kl}} = b$ is the negative ELBO of a Laplace decoder. SD's
# `kl_weight` is $10^{-6}$: a decoder that claims to know each pixel to within about $10^{-6}$, where one
# 8-bit grey level is $2/255 \approx 0.008$ on the $[-1, 1]$ scale. Priced honestly ($b \approx 0.008$) the KL
# would weigh about 8,000 times more, the encoder would send far fewer bits and the images would blur
# (section 7 turns the weight up and shows it). SD chooses **a near-deterministic autoencoder**: the latents
# must carry nearly everything, and the KL only keeps their scale in check (the paper: to "avoid arbitrarily
# high-variance latent spaces").
#
# Why the scale needs any keeping: the decoder starts with a 1x1 convolution, so multiplying every latent by
# $c$ and that convolution's weight by $1/c$ decodes to the same image. The L1 term cannot tell those
# solutions apart; the KL can. Per latent dimension, with $z = c\mu + c\sigma\epsilon$:
#
# $$
# \begin{aligned}
# \mathrm{KL}(c) &= \tfrac12 \textstyle\sum_j \big(c^2 \mu_j^2 + c^2 \sigma_j^2 - 1 -
#    \log \sigma_j^2 - 2 \log c\big)
#   && \text{the closed form of section 4, with $\mu, \sigma$ scaled by $c$} \\
# \frac{d\,\mathrm{KL}}{dc} &= c \textstyle\sum_j (\mu_j^2 + \sigma_j^2) - \frac{d}{c} = 0
#   && d \text{ latent dimensions} \\
# c^2 &= d \,\big/ \textstyle\sum_j (\mu_j^2 + \sigma_j^2)
#   && \text{the scale where the mean of $z^2$ is 1.}
# \end{aligned}
# $$
#
# The KL pulls the latents towards unit second moment; at a weight of $10^{-6}$ the pull is gentle, which is
# why the trained latents still need the scaling factor of section 9 (SD's have a std of about 5.5).
#
# In the code, `VAELoss` *averages* the L1 over pixels instead of summing it, so SD's weight becomes
# $10^{-6} / (3 H W)$ there (`KL_SD` below; `train_vae.py` converts the same way). The loss written by hand
# on one batch, next to `common.losses.VAELoss`:

# %%
torch.manual_seed(0)
with torch.no_grad():
    posterior = vae.encode(x[:4])
    x_hat = vae.decode(posterior.sample(torch.Generator().manual_seed(0)))
rec_by_hand = (x[:4] - x_hat).abs().mean()  # L1, averaged over pixels and batch
kl_by_hand = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).sum(dim=(1, 2, 3)).mean()
weights = VAELossWeights(lpips=0.0, gan=0.0, kl=1e-6)
total, terms = VAELoss(weights).generator_loss(x[:4], x_hat, posterior, step=0)
print(f"L1 : by hand {rec_by_hand:.6f}  VAELoss {terms['rec']:.6f}")
print(f"KL : by hand {kl_by_hand:.3f}  VAELoss {terms['kl']:.3f}  (nats per image, summed over 4x16x16 dims)")
print(f"total = L1 + 1e-6 KL: by hand {rec_by_hand + 1e-6 * kl_by_hand:.6f}  VAELoss {total:.6f}")

# %% [markdown]
# The KL line uses a closed form. The next section derives it.
#
# ## 4. The KL of a diagonal Gaussian against N(0, I)
#
# The encoder outputs, for each latent dimension $j$, a mean $\mu_j$ and a log-variance $\log \sigma_j^2$:
# $q(z \mid x) = \prod_j \mathcal N(z_j; \mu_j, \sigma_j^2)$. One dimension first, dropping $j$; every
# expectation is over $z \sim \mathcal N(\mu, \sigma^2)$:
#
# $$
# \begin{aligned}
# \mathrm{KL}(q \,\|\, p) &= \mathbb E_q\big[\log q(z) - \log p(z)\big]
#   && \text{definition} \\
# &= \mathbb E_q\Big[-\tfrac12 \log 2\pi\sigma^2 - \tfrac{(z - \mu)^2}{2\sigma^2}
#    + \tfrac12 \log 2\pi + \tfrac{z^2}{2}\Big]
#   && \text{the two Gaussian log-densities} \\
# &= -\tfrac12 \log \sigma^2 - \tfrac{\sigma^2}{2\sigma^2} + \tfrac12\, \mathbb E_q[z^2]
#   && \mathbb E_q[(z - \mu)^2] = \sigma^2; \text{ the } \log 2\pi \text{ cancel} \\
# &= -\tfrac12 \log \sigma^2 - \tfrac12 + \tfrac12 (\mu^2 + \sigma^2)
#   && \mathbb E_q[z^2] = \mathrm{Var}(z) + (\mathbb E_q z)^2 \\
# &= \tfrac12 \big(\mu^2 + \sigma^2 - 1 - \log \sigma^2\big).
# \end{aligned}
# $$
#
# The dimensions are independent under both $q$ and $p$, so the log-densities add and the KL is the sum of
# this over all $C \cdot h \cdot w$ latent dimensions. It is zero exactly when $\mu = 0$ and $\sigma = 1$. In
# code, with the encoder's own log-variance:

# %%
with torch.no_grad():
    posterior = vae.encode(x[:1])  # one held-out image: q(z|x) over (1, 4, 16, 16)
mu, logvar = posterior.mean, posterior.logvar  # (1, 4, 16, 16) each
sigma = torch.exp(0.5 * logvar)
kl_closed = 0.5 * (mu**2 + sigma**2 - 1 - logvar).sum()  # the last line above, summed over 1,024 dims
kl_torch = kl_divergence(Independent(Normal(mu, sigma), 3), Independent(Normal(0.0, torch.ones_like(mu)), 3))
print(
    f"closed form {float(kl_closed):.3f}   torch.distributions {float(kl_torch):.3f}   "
    f"common (posterior.kl()) {float(posterior.kl()):.3f}  nats"
)

# %% [markdown]
# The closed form agrees with `torch.distributions` and with the course's `DiagonalGaussian.kl()`. It is also
# the expectation you started from, so a Monte-Carlo average of $\log q(z) - \log p(z)$ over samples
# $z \sim q$ must converge to it:

# %%
n_max = budget(fast=1_024, cpu=65_536)
g = torch.Generator().manual_seed(0)
q_dist = Independent(Normal(mu[0], sigma[0]), 3)  # over (4, 16, 16)
p_dist = Independent(Normal(torch.zeros_like(mu[0]), torch.ones_like(mu[0])), 3)
log_ratios = []
for _chunk in range(0, n_max, 1024):  # one batch of 1024 draws each
    z_mc = mu[0] + sigma[0] * torch.randn(1024, *mu.shape[1:], generator=g)  # (1024, 4, 16, 16)
    log_ratios.append(q_dist.log_prob(z_mc) - p_dist.log_prob(z_mc))  # (1024,)
log_ratios = torch.cat(log_ratios)
counts = [n for n in (16, 64, 256, 1024, 4096, 16_384, 65_536) if n <= n_max]
estimates = [float(log_ratios[:n].mean()) for n in counts]
errors = [float(log_ratios[:n].std() / math.sqrt(n)) for n in counts]
for n, est, err in zip(counts, estimates, errors):
    print(f"{n:6d} samples: Monte Carlo {est:9.3f} +- {err:6.3f}   closed form {float(kl_closed):9.3f}")

fig = Figure(figsize=(5.5, 2.6))
ax = fig.subplots()
ax.errorbar(counts, estimates, yerr=errors, fmt="o-", ms=4, capsize=3, label="Monte Carlo mean +- 1 s.e.")
ax.axhline(float(kl_closed), color="k", ls="--", label="closed form")
ax.set_xscale("log")
ax.set_xlabel("samples z ~ q(z|x)")
ax.set_ylabel("KL (nats)")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# *Figure: Monte-Carlo estimates of the KL of one held-out image's posterior, with one standard error, against
# the closed form.* The estimates close in on the closed form at the $1/\sqrt n$ rate. The closed form gives
# the same number with no sampling noise at all, which is why every VAE uses it. (Exercise `gaussian_kl`
# asks you to derive the general case, $\mathrm{KL}$ between two diagonal Gaussians.)
#
# ## 5. The reparameterisation trick, with autograd
#
# The reconstruction term is an expectation over $z \sim q_\phi(z \mid x)$, and you need its gradient with
# respect to the encoder's $\mu$ and $\sigma$. Sampling is not a differentiable operation, but you can move
# the randomness out of the parameters: draw $\epsilon \sim \mathcal N(0, I)$, then set
#
# $$
# z = \mu + \sigma \odot \epsilon \quad\Rightarrow\quad z \sim \mathcal N(\mu, \sigma^2)
# \quad\text{and}\quad \frac{\partial z}{\partial \mu} = 1,\quad
# \frac{\partial z}{\partial \sigma} = \epsilon ,
# $$
#
# since adding $\mu$ shifts the mean and multiplying by $\sigma$ scales the standard deviation. Then
# $\nabla_{\mu,\sigma}\, \mathbb E_q[f(z)] = \mathbb E_\epsilon[\nabla_{\mu,\sigma} f(\mu + \sigma\epsilon)]$:
# the expectation no longer depends on the parameters, so the gradient moves inside. A toy with three
# numbers and $f(z) = \sum z^2$, where $\mathbb E_q[f] = \sum(\mu^2 + \sigma^2)$, so the true gradients are
# $2\mu$ and $2\sigma$. First `torch.distributions`' two ways to sample:

# %%
mu_toy = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
sigma_toy = torch.tensor([1.0, 0.5, 0.1], requires_grad=True)
q_toy = Normal(mu_toy, sigma_toy)

z_plain = q_toy.sample()  # drawn outside autograd
print(f".sample():  requires_grad={z_plain.requires_grad}, grad_fn={z_plain.grad_fn}")
try:
    z_plain.pow(2).sum().backward()
except RuntimeError as error:
    print("   backward() fails:", str(error).split("\n")[0])

z_rep = q_toy.rsample()  # z = mu + sigma * eps inside autograd
z_rep.pow(2).sum().backward()
print(f".rsample(): requires_grad={z_rep.requires_grad}, grad_fn={type(z_rep.grad_fn).__name__}")
eps_used = (z_rep - mu_toy) / sigma_toy  # the eps this draw used


def rounded(values: torch.Tensor) -> list:
    return [round(v, 4) for v in values.tolist()]


print(f"   d f / d mu    = {rounded(mu_toy.grad)}   2 z     = {rounded(2 * z_rep)}")
print(f"   d f / d sigma = {rounded(sigma_toy.grad)}   2 z eps = {rounded(2 * z_rep * eps_used)}")

# %% [markdown]
# `.sample()` returns a number with no history: the loss cannot reach $\mu$ or $\sigma$ through it.
# `.rsample()` builds $z = \mu + \sigma\epsilon$ in the graph, and autograd's gradients are the chain rule of
# the equation above: $\partial f / \partial \mu = 2z$ and $\partial f / \partial \sigma = 2z\epsilon$. One
# draw is a noisy estimate of the true gradient; averaged over many draws it is unbiased:

# %%
n_draws = budget(fast=2_000, cpu=100_000)
mu_toy.grad, sigma_toy.grad = None, None
eps = torch.randn(n_draws, 3, generator=torch.Generator().manual_seed(0))  # (n_draws, 3)
z_many = mu_toy + sigma_toy * eps  # (n_draws, 3): z = mu + sigma * eps, written out
z_many.pow(2).sum(dim=1).mean().backward()  # the Monte-Carlo estimate of E_q[f]
print(f"average reparameterised gradient over {n_draws:,} draws:")
print(f"   d/d mu    {[round(v, 3) for v in mu_toy.grad.tolist()]}   exact 2 mu    {(2 * mu_toy).tolist()}")
print(
    f"   d/d sigma {[round(v, 3) for v in sigma_toy.grad.tolist()]}   exact 2 sigma "
    f"{[round(v, 3) for v in (2 * sigma_toy).tolist()]}"
)

# %% [markdown]
# The same holds in the real encoder: `DiagonalGaussian.sample` (in `common/autoencoder.py`) computes
# `mean + std * eps`, so a loss on the decoded sample reaches every encoder weight. Draw the same $z$ outside
# the graph, as `.sample()` does, and the encoder gets nothing:


# %%
def encoder_grad_norm(detach_sample: bool) -> float:
    vae.zero_grad()
    posterior = vae.encode(x[:4])
    z = posterior.sample(torch.Generator().manual_seed(0))  # (4, 4, 16, 16)
    z = z.detach() if detach_sample else z
    (x[:4] - vae.decode(z)).abs().mean().backward()
    norms = [p.grad.norm() for p in vae.encoder.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


print(f"encoder gradient norm, z = mu + sigma * eps in the graph: {encoder_grad_norm(False):.4f}")
print(f"encoder gradient norm, the same z drawn outside autograd: {encoder_grad_norm(True):.4f}")
vae.zero_grad()

# %% [markdown]
# Exercise `reparameterised_sample` asks you to write this sample from the encoder's raw moments; its check
# runs autograd through your function.
#
# ## 6. The loss terms, each shown by its effect
#
# Stage one's full objective adds two terms to the ELBO's pair (Esser et al. 2021, eq. 5-7):
#
# $$L_G = \|x - D(z)\|_1 + w_{\text{lpips}}\,\text{LPIPS}(x, D(z))
#   + w_{\text{kl}}\,\text{KL}\big(q(z|x)\,\|\,\mathcal N(0, I)\big) +
#   \lambda\, w_{\text{gan}}\,L_{\text{adv}}(D(z)),$$
#
# with $\lambda = \|\nabla_\text{last} L_\text{rec}\| / (\|\nabla_\text{last} L_\text{adv}\| + 10^{-4})$,
# the adaptive weight that makes the adversarial gradient at the decoder's last layer as large as the
# reconstruction one. The PatchGAN discriminator scores overlapping patches as real or reconstructed, with the
# hinge loss $L_D = \tfrac12\big(\mathbb E[\max(0, 1 - D(x))] + \mathbb E[\max(0, 1 + D(\hat x))]\big)$,
# and the generator's term is $L_{\text{adv}} = -\mathbb E[D(\hat x)]$.
#
# **LPIPS** compares deep features of an ImageNet network; that backbone is not shipped with the course, so
# the cell below says whether it is on disk and prints the one command that fetches it when it is not.

# %%
lpips_on = lpips_backbone_available()
if not lpips_on:
    print(f"LPIPS is not measured: its AlexNet backbone is not at {lpips_backbone_path()}. Fetch it with:")
    print("    python -m common.weights fetch lpips")
else:
    from common.metrics import lpips_distance

    print(f"LPIPS backbone found at {lpips_backbone_path()}: the comparison below includes LPIPS")

# %% [markdown]
# **The experiment.** SD trains with the adversarial term only late (from step 50,001), once the autoencoder
# reconstructs well. Do the same at course scale: start three runs from the shipped Photos VAE
# (`checkpoints/vae_photos`, trained with L1 + KL) and continue each for the same 300 steps, same seed, same
# data, with one objective each: **L1 only**, **L1 + KL** at SD's weight, and **L1 + KL + PatchGAN** (GAN
# weight 0.5, discriminator from step 0). `train_vae.py` trained them (the commands are in each model card,
# `checkpoints/vae_ablation_*/README.md`). Compare them on the same held-out crops of a photograph none of
# them saw in training. Besides PSNR and SSIM, one number for sharpness: the *edge energy*, the mean absolute
# difference between neighbouring pixels of the reconstruction divided by that of the input (1 = as much fine
# detail as the input; a blurred image scores less).

# %%
ABLATIONS = {
    "start (vae_photos)": "vae_photos",
    "L1 only": "vae_ablation_l1",
    "L1 + KL": "vae_ablation_l1_kl",
    "L1 + KL + GAN": "vae_ablation_l1_kl_gan",
}
n_eval = budget(fast=16, cpu=256)
photos_test = Photos(64, "test", n_eval, seed=1)  # crops of the held-out photograph, as in train_vae.py
x_photo = torch.stack([photos_test[i]["image"] for i in range(n_eval)])  # (n_eval, 3, 64, 64)


def edge_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean |difference| between horizontal and vertical neighbours: how much fine detail an image holds."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return (dx + dy) / 2


recons, stats = {}, {}
for name, folder in ABLATIONS.items():
    model = AutoencoderKL.load(CKPT / folder).eval()
    with torch.no_grad():
        post = model.encode(x_photo)
        rec = model.decode(post.mode()).clamp(-1, 1)
    recons[name] = rec
    stats[name] = {
        "psnr": psnr(rec, x_photo),
        "ssim": ssim(rec, x_photo),
        "edge": float(edge_energy(rec) / edge_energy(x_photo)),
        "kl": float(post.kl().mean()),
        "std_mu": float(post.mean.std()),
        "sigma": float(post.std.mean()),
    }
    if lpips_on:
        stats[name]["lpips"] = lpips_distance(rec, x_photo)
print(f"{n_eval} held-out crops; reconstructions through the posterior mean")
print(
    f"{'':20s} {'PSNR':>8s} {'SSIM':>6s} {'edges':>6s} {'KL (nats)':>10s} {'std(mu)':>8s} {'sigma':>7s}"
    + ("  LPIPS" if lpips_on else "")
)
for name, r in stats.items():
    print(
        f"{name:20s} {r['psnr']:5.2f} dB {r['ssim']:6.3f} {r['edge']:6.3f} {r['kl']:10.1f} "
        f"{r['std_mu']:8.3f} {r['sigma']:7.4f}" + (f"  {r['lpips']:.4f}" if lpips_on else "")
    )
picks = [0, 3, 5, 9, 12, 14]  # six of the first 16 crops, chosen to show fur, eyes and background
show(side_by_side({"held-out": x_photo[picks], **{k: v[picks] for k, v in recons.items()}}, size=1.2))

# %% [markdown]
# *Figure: six held-out crops and their reconstructions by the starting VAE and by the three continuations.*
# The table above carries the claims; the figure lets you check them by eye (zoom in on the fur):
#
# * **L1 only and L1 + KL are indistinguishable.** Both reach 28.46 dB and SSIM 0.860
#   (0.03 dB above the start), the same edge energy (0.784), and latent statistics within 0.3% of each other
#   (KL 8,540 against 8,536 nats, std(mu) 1.594 against 1.596). That is section 3 made measurable: at SD's
#   weight the KL is a negligible part of the loss over 300 steps. Its job is the slow one of pinning the
#   latent scale, which nothing else pins.
# * **The PatchGAN term changes the pictures.** Edge energy rises from 0.78 to 0.90 of the input's: darker,
#   crisper fur strokes and more contrast around the eyes (bottom row). It costs 1.05 dB of PSNR and 0.018 of
#   SSIM, because the discriminator rewards texture that looks real, not texture in exactly the right place,
#   and some of the new strokes are too dark. Whether the added detail looks closer to the photograph is what
#   LPIPS measures, and it is not measured here (its backbone is not on disk); at this budget the honest
#   summary is "sharper, less faithful pixel for pixel". SD runs this phase for far longer, from a decoder
#   trained 50,000 steps.
# * In all of them the posterior stays narrow (sigma about 0.001): a near-deterministic autoencoder, as
#   section 3 predicted for a KL weight of 1e-6.
#
# ## 7. How the KL weight shapes the latent statistics
#
# Section 3 priced the KL weight as the decoder's noise scale $b$. Sweep it and see the rate-distortion
# trade: each run trains a small f = 4 autoencoder (widths 16-32-32) on 32 px Shapes from the same seed for
# the same number of steps, so the differences come from the weight alone. For each, the held-out PSNR, the
# spread of the posterior means across images (how much the latents say about the image) and the posterior's
# own sigma, per channel.

# %%
STEPS = budget(fast=3, cpu=150)
small_config = AutoencoderConfig(
    block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=1.0
)
train32 = Shapes(32, "train", STEPS * 8, seed=0, multiple_of=4)
test32 = torch.stack([Shapes(32, "test", 32, seed=1, multiple_of=4)[i]["image"] for i in range(32)])


def train_small(kl: float, steps: int = STEPS, seed: int = 0) -> tuple[AutoencoderKL, dict]:
    """``steps`` Adam steps of L1 + kl * KL (VAELoss) on 32 px Shapes; returns the VAE and held-out stats."""
    torch.manual_seed(seed)
    model = AutoencoderKL(small_config)
    criterion = VAELoss(VAELossWeights(lpips=0.0, kl=kl, gan=0.0))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        xb = torch.stack([train32[step * 8 + i]["image"] for i in range(8)])  # (8, 3, 32, 32)
        x_hat, post = model(xb, generator=g)  # through a reparameterised sample
        loss, _ = criterion.generator_loss(xb, x_hat, post, step=step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        post = model.encode(test32)
        rec = model.decode(post.mode()).clamp(-1, 1)
    return model, {"psnr": psnr(rec, test32), "kl": float(kl_loss(post)), "post": post}


KL_SD = 1e-6 / (3 * 32 * 32)  # SD's kl_weight (on summed pixels) in VAELoss's per-pixel-mean units
kl_weights = budget(fast=[0.0, 1e-2], cpu=[0.0, KL_SD, 1e-6, 1e-5, 1e-4])
sweep = {}
t = time.perf_counter()
for w in kl_weights:
    _, r = train_small(kl=w)
    post = r["post"]
    sweep[w] = {
        "psnr": r["psnr"],
        "kl": r["kl"],
        "std_c": post.mean.std(dim=(0, 2, 3)),
        "sigma_c": post.std.mean(dim=(0, 2, 3)),
    }
    std_c = [round(v, 2) for v in sweep[w]["std_c"].tolist()]
    sigma_c = [round(v, 3) for v in sweep[w]["sigma_c"].tolist()]
    print(
        f"kl weight {w:<8.2g} PSNR {r['psnr']:5.2f} dB  KL {r['kl']:8.1f}  std(mu) per channel {std_c}  "
        f"sigma {sigma_c}"
    )
print(f"{len(kl_weights)} runs of {STEPS} steps in {time.perf_counter() - t:.0f} s")

fig = Figure(figsize=(9, 2.6))
axes = fig.subplots(1, 3)
xs = [max(w, 1e-11) for w in kl_weights]
for c in range(small_config.latent_channels):
    axes[0].plot(xs, [sweep[w]["std_c"][c] for w in kl_weights], "o-", label=f"channel {c}")
    axes[1].plot(xs, [sweep[w]["sigma_c"][c] for w in kl_weights], "o-")
axes[2].plot(xs, [sweep[w]["psnr"] for w in kl_weights], "ko-")
for ax, title in zip(axes, ["std of posterior means", "posterior sigma", "held-out PSNR (dB)"]):
    ax.set_xscale("log")
    ax.set_xlabel("KL weight (0 drawn at 1e-11)")
    ax.set_title(title, fontsize=9)
axes[0].legend(fontsize=7)
fig.tight_layout()
show(fig)

# %% [markdown]
# *Figure: per-channel latent statistics and held-out PSNR against the KL weight (per-pixel units).*
#
# At SD's weight (3.3e-10 in these per-pixel units) and at 1e-6 the latents stay informative: the posterior
# means spread across images (std 0.6 to 1.7 per channel), sigma stays small (0.17 to 0.61), and PSNR stays
# within 0.4 dB of the run without a KL (20.82 and 20.44 against 20.77 dB). At 1e-5 sigma climbs towards 1
# (0.53 to 0.95) and the means shrink (KL 91 nats). At 1e-4 the posterior has **collapsed**: sigma is 1 and
# the means barely vary (std at most 0.05), so q(z|x) is N(0, I) whatever x is; the latent carries almost
# nothing (KL 0.3 nats) and PSNR falls to 16.7 dB, a blurry average image. This is section 3's price b at
# work: a larger weight says the decoder is noisier, so each bit in z costs more than the detail it buys.
# These small models, trained for 150 steps, reach only about 20 dB: long enough to show the collapse, not
# for a converged comparison.
#
# ## 8. What each latent channel carries
#
# The shipped Shapes VAE has four latent channels. Zero one at a time (in the posterior mean), decode, and
# look: a channel that carries colour looks different when removed from one that carries edges or position.

# %%
x_few = x[:4]
with torch.no_grad():
    z = vae.encode(x_few).mode()  # (4, C, 16, 16)
    C = z.shape[1]
    keep = 1.0 - torch.eye(C)  # row c is 1 everywhere but channel c
    decoded = {"input": x_few, "all channels": vae.decode(z).clamp(-1, 1)}
    for c in range(C):
        decoded[f"channel {c} = 0"] = vae.decode(z * keep[c].view(1, C, 1, 1)).clamp(-1, 1)
for name, images in list(decoded.items())[1:]:
    print(f"{name:14s} MSE {float((images - x_few).pow(2).mean()):.4f}")
print("std of each channel over these images:", [round(v, 2) for v in z.std(dim=(0, 2, 3)).tolist()])
images_by_column = torch.stack(list(decoded.values()), dim=1)  # (4, 2 + C, 3, 64, 64)
show(side_by_side({f"image {i}": images_by_column[i] for i in range(len(x_few))}, size=1.0))
show(show_latent_channels(z[:2], size=1.2))

# %% [markdown]
# *Figures: four held-out images (one per row) decoded with all channels and with each channel zeroed in turn
# (columns: input, all channels, then channels 0 to 3 zeroed); below, the four channels of the first two
# images' latents as heat maps.*
#
# Channel 3 carries most of the picture: zeroing it raises the MSE from 0.0012 to 0.0599, and the shapes lose
# their colour and much of their outline (last column). It is also the channel with the largest spread
# (std 1.43). Zeroing channel 0 or 1 shifts the colours (the red star turns magenta; MSE 0.0047 and 0.0053)
# and leaves the shapes in place; zeroing channel 2 changes almost nothing (0.0013). The autoencoder has
# spread the information unevenly, and the channels have different scales (std 0.35 to 1.43) that the decoder
# relies on: the scaling factor of the next section multiplies all of them by one number.
#
# ## 9. The scaling factor, and what goes wrong without it
#
# The noise schedule was designed for data of unit variance. Diffusion trains on
# $z_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon$ with
# $\epsilon \sim \mathcal N(0, I)$, so the signal-to-noise ratio the network meets at step $t$ is
#
# $$
# \begin{aligned}
# \mathrm{SNR}(t) &= \frac{\mathrm{Var}(\sqrt{\bar\alpha_t}\, z_0)}
#    {\mathrm{Var}(\sqrt{1 - \bar\alpha_t}\, \epsilon)}
#   && \text{signal power over noise power} \\
# &= \frac{\bar\alpha_t\, \mathrm{Var}(z_0)}{1 - \bar\alpha_t}
#   && \mathrm{Var}(c\,X) = c^2\, \mathrm{Var}(X),\ \mathrm{Var}(\epsilon) = 1 .
# \end{aligned}
# $$
#
# `common.schedules.NoiseSchedule.snr` is the $\mathrm{Var}(z_0) = 1$ case. If the latents have a variance
# of 6 rather than 1, every step is 6 times less noisy than the schedule intends, and at the last step
# $z_T$ is not pure noise. The LDM recipe measures the std of the latents on training data once and multiplies
# by `scaling_factor` = 1 / std, so that $\mathrm{Var}(z_0) \approx 1$. SD's VAE has 0.18215 (its latents
# have a std of about 5.5); `train_vae.py` measures the course's and stores it in `config.json`.

# %%
vae_photos = AutoencoderKL.load(CKPT / "vae_photos").eval()
photos_train = Photos(64, "train", 128, seed=0)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    zs = {}
    for name, model, ds in [
        ("Shapes VAE", vae, Shapes(64, "train", 128, seed=0, multiple_of=4)),
        ("Photos VAE", vae_photos, photos_train),
    ]:
        batches = range(0, budget(fast=32, cpu=128), 32)
        zs[name] = torch.cat(
            [model.encode(torch.stack([ds[i]["image"] for i in range(b, b + 32)])).sample(g) for b in batches]
        )  # (N, 4, 16, 16)
for name, model in [("Shapes VAE", vae), ("Photos VAE", vae_photos)]:
    z0 = zs[name]
    std = float(z0.std())
    print(
        f"{name}: std of {len(z0)} latent samples {std:.4f} -> 1 / std = {1 / std:.4f}; "
        f"stored scaling_factor {model.config.scaling_factor}; after scaling std "
        f"{float((z0 * model.config.scaling_factor).std()):.3f}"
    )
print(f"SD 1.x: scaling_factor 0.18215 -> unscaled std {1 / 0.18215:.2f}, variance {1 / 0.18215**2:.1f}")

# %% [markdown]
# Predict, then measure. Take SD's schedule and the Photos VAE, whose latents have a variance of about 6
# unscaled. At the last step, $t = 999$, the formula predicts the SNR, the std of $z_T$
# ($\sqrt{\bar\alpha_T \mathrm{Var}(z_0) + 1 - \bar\alpha_T}$, which sampling assumes is 1) and the
# correlation between $z_T$ and $z_0$ ($\sqrt{\mathrm{SNR} / (1 + \mathrm{SNR})}$, which should be about 0).
# Then noise the real latents and measure both:

# %%
schedule = NoiseSchedule.sd15()
t_all = torch.arange(schedule.num_train_timesteps)
alpha_bar = schedule.alpha_bar  # (1000,)
z0_unscaled = zs["Photos VAE"]
variances = {
    "scaled (Var 1)": 1.0,
    "Photos VAE unscaled": float(z0_unscaled.var()),
    "SD VAE unscaled": 1 / 0.18215**2,
}
snr_curves = {name: alpha_bar * var / (1 - alpha_bar) for name, var in variances.items()}
assert torch.allclose(snr_curves["scaled (Var 1)"], schedule.snr(t_all))  # the schedule's own SNR

T = schedule.num_train_timesteps - 1
eps = torch.randn(z0_unscaled.shape, generator=torch.Generator().manual_seed(1))
for name, z0 in [("scaled", z0_unscaled * vae_photos.config.scaling_factor), ("unscaled", z0_unscaled)]:
    var = float(z0.var())
    alpha_bar_T = float(alpha_bar[T])
    snr_T = alpha_bar_T * var / (1 - alpha_bar_T)
    z_T = schedule.add_noise(z0, eps, T)  # (N, 4, 16, 16)
    corr = float(torch.corrcoef(torch.stack([z_T.flatten(), z0.flatten()]))[0, 1])
    print(
        f"{name:9s} Var(z0) {var:5.2f}  SNR(T) {snr_T:.4f}  std(z_T): predicted "
        f"{math.sqrt(alpha_bar_T * var + 1 - alpha_bar_T):.3f} measured {float(z_T.std()):.3f}  "
        f"corr(z_T, z0): predicted {math.sqrt(snr_T / (1 + snr_T)):.3f} measured {corr:.3f}"
    )
snr_T_sd = float(snr_curves["SD VAE unscaled"][T])
corr_sd = math.sqrt(snr_T_sd / (1 + snr_T_sd))
print(f"SD VAE unscaled: SNR(T) {snr_T_sd:.4f}, predicted corr(z_T, z0) {corr_sd:.3f}")
for name, snr in snr_curves.items():
    print(f"{name:22s} SNR falls below 1 at t = {int((snr < 1).nonzero()[0])}")

fig = Figure(figsize=(6, 3))
ax = fig.subplots()
for name, snr in snr_curves.items():
    ax.plot(t_all, snr.log10(), label=name)
ax.axhline(0.0, color="grey", ls=":", lw=1)
ax.text(20, 0.15, "signal = noise", fontsize=8, color="grey")
ax.set_xlabel("timestep t")
ax.set_ylabel("log10 SNR(t)")
ax.set_title("SD's noise schedule against latents of different variance", fontsize=9)
ax.legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# *Figure: $\log_{10}$ of the SNR the schedule produces at each step, for scaled latents and for the Photos
# VAE's and SD's latents left unscaled.* Unscaled, the whole curve shifts up by $\log_{10} \mathrm{Var}(z_0)$:
# each step carries more signal than the schedule intends, the point where signal and noise are equal moves to
# a later step, and at $t = 999$ the "pure noise" still correlates with the image (the measured correlations
# above match the predicted ones). Sampling starts from $\mathcal N(0, I)$, which is not what the network saw
# at $t = 999$ in training, and the high-noise steps, where the layout of an image is decided, are spent on
# latents that are already mostly decided. One global number fixes it; the channels keep their relative scales
# (the decoder expects them), only the overall scale is matched to the noise. SD 2 kept the recipe; SDXL's VAE
# has 0.13025.
#
# ## 10. Training it yourself
#
# `train_vae.py` runs stage one with `common.training.Trainer` (checkpoints, exact resume), evaluates on the
# held-out split (PSNR, SSIM, LPIPS when available, against bicubic), measures the scaling factor and writes
# a diffusers-format folder with a model card. The shipped Shapes VAE came from its default run:

# %%
card = json.loads((CKPT / "vae_shapes" / "metrics.json").read_text())
print("command:", card["command"])
print(f"steps {card['steps']} x batch {card['batch_size']}, {card['train_minutes']:.1f} min of training")
m = card["metrics"]
print(
    f"held-out ({m['n_images']} images): PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}; "
    f"bicubic with {m['bicubic_numbers']} numbers: {m['bicubic_psnr']:.2f} dB"
)
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# Run it yourself (seconds with `COURSE_FAST=1`; see the chapter README for the full runs' budgets):
#
# ```
# python 01_latent_space_learning/train_vae.py --out runs/vae_shapes
# python 01_latent_space_learning/train_vae.py --data photos --out runs/vae_photos
# ```
#
# ## Summary
#
# * Latent diffusion moves the expensive part to a space 48x smaller than SD's pixels (12x for the course's
#   Shapes), and attention gets far cheaper still; a learned autoencoder beats plain downsampling with the
#   same number of numbers.
# * The VAE maximises the ELBO, $\log p(x) - \mathrm{KL}(q(z|x) \| p(z|x))$: a reconstruction term and a KL to
#   the prior. With a Laplace decoder it is a summed L1 plus $b$ times the KL; SD's $b = 10^{-6}$ makes a
#   near-deterministic autoencoder whose KL only keeps the latent scale in check.
# * The KL of a diagonal Gaussian against N(0, I) is $\tfrac12 \sum (\mu^2 + \sigma^2 - 1 - \log\sigma^2)$;
#   the reparameterisation $z = \mu + \sigma\epsilon$ lets gradients through the sample.
# * Diffusion needs latents of unit variance: the scaling factor, 1 / std, keeps the noise schedule's SNR what
#   it was designed to be.
#
# ## Exercises (`01_latent_space_learning/exercises.py`, graded by `python -m common.grade 01`)
#
# 1. `reparameterised_sample`: $z = \mu + \sigma\epsilon$ from the encoder's raw
#    moments; graded with autograd.
# 2. `gaussian_kl`: the KL between two diagonal Gaussians, derived like section 4; graded against
#    `torch.distributions.kl_divergence`.
# 3. `scaling_factor`: 1 / std of a batch of latents.
# 4. `compare_with_downsampling`: VAE against bicubic down/up at the same number of numbers.
# 5. `channel_ablation`: the reconstruction error with each latent channel zeroed in turn.
# 6. `kl_weight_sweep` (open-ended): train tiny VAEs at several KL weights and explain the trend.
