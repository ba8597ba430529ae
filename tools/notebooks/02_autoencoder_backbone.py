# %% [markdown]
# # 02. The autoencoder backbone
#
# Chapter 01 trained the VAE and used it as a black box. Here you open it. You build Stable Diffusion's
# AutoencoderKL (the CompVis encoder and decoder that diffusers re-implements) from its blocks: the ResNet
# block, GroupNorm, the down- and upsampling, the attention in the middle, and the Gaussian head. Each block
# comes with the question it answers, a short derivation, and a check. Then you assemble the encoder and the
# decoder, load the weights of the course's Photos VAE (`checkpoints/vae_photos`) into them, compare them
# number for number with `common.autoencoder` and diffusers, and reconstruct photographs the VAE never saw. At
# the end you count SD 1.5's VAE, 83.65 million parameters, from your own classes without allocating them.
#
# Shape legend: B batch, C channels, H x W the image or feature map, N = H*W positions (tokens), f the
# downsampling factor.

# %%
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from safetensors.torch import load_file
from torch import nn

import common.autoencoder as course_ae
from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.data import Photos
from common.grade import load_module, yours_or_reference
from common.metrics import max_abs_diff, psnr
from common.runtime import budget, setup_notebook
from common.viz import show, side_by_side

ROOT = setup_notebook()  # seed 0, small inline figures; prints the device
CHAPTER = ROOT / "02_autoencoder_backbone"
PHOTOS_VAE = ROOT / "checkpoints" / "vae_photos"
exercises = load_module(CHAPTER / "exercises.py", "_ch02_exercises")
solutions = load_module(CHAPTER / "solutions.py", "_ch02_solutions")
T0 = time.perf_counter()

# %% [markdown]
# ## 1. The ResNet block
#
# **Question.** SD's encoder stacks ten ResNet blocks, 25 3x3 convolutions between the image and the latent,
# and the decoder more. Why does a deep stack like that train at all?
#
# **Intuition.** Each block computes a *correction* F(x) that it adds to its input, `y = x + F(x)`. A block
# that has learned nothing yet passes its input through unchanged, and so does its gradient.
#
# **Derivation.** Write the l-th block as `x_{l+1} = x_l + F_l(x_l)`. By the chain rule, for L blocks
#
#     dx_L / dx_0 = prod_l (I + J_l),        J_l = dF_l / dx_l
#                 = I + sum_l J_l + (products of two or more J's)
#
# so the identity term carries the gradient from the loss to the first layers whatever the J_l are. Without
# the skip, `x_{l+1} = F_l(x_l)` gives `dx_L / dx_0 = prod_l J_l`: a product of L matrices, which shrinks (or
# grows) geometrically with L when their typical gain is below (or above) 1.
#
# SD's block is *pre-activation*: normalise, then SiLU, then convolve, twice: `F(x) =
# conv2(SiLU(GN(conv1(SiLU(GN(x))))))`. When the widths differ, a 1x1 convolution maps x to the new width on
# the skip path. No time embedding (the UNet's blocks in chapter 03 add one). The attribute names are
# diffusers' (`norm1`, `conv1`, `norm2`, `conv2`, `conv_shortcut`), so SD's weights load unchanged.


# %%
class ResnetBlock(nn.Module):
    """out = skip(x) + F(x), F(x) = conv2(SiLU(GN(conv1(SiLU(GN(x)))))); diffusers' ResnetBlock2D names."""

    def __init__(self, *, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)  # the skip must match the new width
        else:
            self.conv_shortcut = None

    def residual(self, x):
        """F(x), the correction the block adds."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        return self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)

    def forward(self, x):
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + self.residual(x)


torch.manual_seed(0)
reference_block = course_ae.ResnetBlock(in_channels=32, out_channels=64, groups=16).eval()
for p in reference_block.parameters():  # GroupNorm starts at (1, 0): move it so a missing norm would show
    nn.init.normal_(p, 0.0, 0.1)
block = ResnetBlock(in_channels=32, out_channels=64, groups=16)
block.load_state_dict(reference_block.state_dict(), strict=True)
x = torch.randn(2, 32, 16, 16)
with torch.no_grad():
    gap = max_abs_diff(block(x), reference_block(x))
print(
    f"ResnetBlock {tuple(x.shape)} -> {tuple(block(x).shape)}, "
    f"{sum(p.numel() for p in block.parameters()):,} parameters"
)
print(f"same weights as common.autoencoder.ResnetBlock: max |diff| = {gap:.1e}")
assert gap < 1e-5

# %% [markdown]
# **Experiment.** Take 32 blocks at their default initialisation and send a gradient back through the first d
# of them, once as ResNet blocks (`x + F(x)`) and once with the skip removed (`F(x)` only, the *same*
# weights). The size of the gradient that reaches the input is what the first layers learn from.

# %%
torch.manual_seed(0)
stack = [ResnetBlock(in_channels=32, out_channels=32, groups=8) for _ in range(32)]
x0 = torch.randn(4, 32, 16, 16)
cotangent = torch.randn(4, 32, 16, 16)  # a fixed random "dL/dx_L"
depths = [1, 2, 4, 8, 16, 32]
grad_norm = {"with the skip: x + F(x)": [], "without it: F(x)": []}
for d in depths:
    for label, use_skip in (("with the skip: x + F(x)", True), ("without it: F(x)", False)):
        x_in = x0.clone().requires_grad_(True)
        h = x_in
        for b in stack[:d]:
            h = b(h) if use_skip else b.residual(h)
        (h * cotangent).sum().backward()
        grad_norm[label].append(x_in.grad.norm().item() / cotangent.norm().item())

fig = Figure(figsize=(5.2, 3.0))
ax = fig.subplots()
for label, values in grad_norm.items():
    ax.plot(depths, values, marker="o", label=label)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("blocks the gradient passes through (d)")
ax.set_ylabel("|dL/dx_0| / |dL/dx_d|")
ax.set_title("gradient reaching the input, default init", fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()
show(fig)
for label, values in grad_norm.items():
    print(f"{label:24s} " + "  ".join(f"d={d}: {v:.2g}" for d, v in zip(depths, values)))
with torch.no_grad():
    output_std = [b.residual(x0).std().item() for b in stack]
print(f"std of one block's F(x) for unit-variance x: {min(output_std):.2f} to {max(output_std):.2f}")

# %% [markdown]
# *Figure: the gradient that reaches the input after d blocks, relative to the gradient at the output.*
# Without the skip its size is at the mercy of the product of the J_l's. The first block sees unit-variance
# input and passes on about a third of the gradient. Every later block sees the previous F's output, whose std
# is about 0.33 (printed), and its GroupNorm divides by that std: its gain is about three times larger, a
# little above 1, and 31 such gains multiply to the growth in the figure. With the skip the gradient stays of
# order one at every depth, because the identity term of `prod (I + J_l)` carries it. That is why SD can stack
# this block dozens of times in the VAE (and again in the UNet).

# %% [markdown]
# ## 2. GroupNorm, and why not BatchNorm
#
# **Question.** Every block starts by normalising. Which statistics should it use?
#
# **Derivation.** Both layers compute `y = gamma * (x - mu) / sqrt(sigma^2 + eps) + beta` with a learned
# `gamma`, `beta` per channel; they differ in what they average over.
#
#     BatchNorm:  mu_c       = mean of x[b, c, h, w] over the batch b and the positions (h, w), per channel c
#     GroupNorm:  mu_{b, g}  = mean of x[b, c, h, w] over the C/G channels c of group g and the positions,
#                              per sample b (and the same for sigma^2)
#
# BatchNorm's statistics mix the images of a batch, so an image's output depends on what it is batched with,
# and at inference (one image, maybe 1024 px) it has to fall back on running averages collected during
# training. GroupNorm's statistics belong to one sample: the output is the same alone or in any batch, in
# training and in inference, at any batch size. Autoencoders for large images are trained with small batches
# of large crops (memory goes to the pixels), exactly where BatchNorm's batch statistics are noisiest. SD uses
# G = 32 groups; the course's small VAE uses 16.
#
# GroupNorm in four lines, checked against `nn.GroupNorm`:


# %%
def group_norm(x, groups, gamma, beta, eps=1e-6):
    B, C, H, W = x.shape
    x_grouped = x.view(B, groups, C // groups * H * W)  # (B, G, C/G * H * W): one row per (sample, group)
    mu = x_grouped.mean(dim=-1, keepdim=True)  # (B, G, 1)
    sigma2 = x_grouped.var(dim=-1, unbiased=False, keepdim=True)  # (B, G, 1)
    x_hat = ((x_grouped - mu) / torch.sqrt(sigma2 + eps)).view(B, C, H, W)
    return gamma.view(1, C, 1, 1) * x_hat + beta.view(1, C, 1, 1)


torch.manual_seed(0)
gn = nn.GroupNorm(16, 64, eps=1e-6)
nn.init.normal_(gn.weight), nn.init.normal_(gn.bias)
x = torch.randn(2, 64, 8, 8)
with torch.no_grad():
    gap = max_abs_diff(group_norm(x, 16, gn.weight, gn.bias), gn(x))
print(f"group_norm vs nn.GroupNorm: max |diff| = {gap:.1e}")
assert gap < 1e-5

a, others = torch.randn(1, 64, 8, 8), torch.randn(3, 64, 8, 8)  # one image; three it could be batched with
bn = nn.BatchNorm2d(64).train()
with torch.no_grad():
    bn_gap = max_abs_diff(bn(a), bn(torch.cat([a, others]))[:1])
    gn_gap = max_abs_diff(gn(a), gn(torch.cat([a, others]))[:1])
print(f"BatchNorm: the same image alone vs in a batch of 4: max |diff| = {bn_gap:.3f}")
print(f"GroupNorm: the same image alone vs in a batch of 4: max |diff| = {gn_gap:.1e}")
assert gn_gap < 1e-5 < bn_gap

# %% [markdown]
# BatchNorm changes the image's features by a visible amount because of its neighbours in the batch; GroupNorm
# gives the same numbers to the last bit. Note for later: GroupNorm's mean runs over *all positions*, so every
# output depends a little on every input pixel. The receptive field of section 6 counts the convolutions only.

# %% [markdown]
# ## 3. Down- and upsampling
#
# **Downsample.** The encoder halves H and W with a stride-2 3x3 convolution. A 3x3 convolution with stride 2
# over n rows, unpadded, gives `floor((n - 3) / 2) + 1` rows. SD pads **one row at the bottom and one column
# on the right** (n = H + 1): `floor((H - 2) / 2) + 1 = H/2` for even H. Output row i then reads input rows
# 2i, 2i+1, 2i+2. A symmetric pad of 1 (n = H + 2) also gives H/2 rows, but output row i reads rows 2i-1, 2i,
# 2i+1: the sampling grid moves by one input pixel, and SD's weights were trained on the first grid.


# %%
class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2): pad right and bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H+1, W+1) -> (B, C, H/2, W/2)


torch.manual_seed(0)
down = Downsample(channels=16)
reference_down = course_ae.Downsample(channels=16)
reference_down.load_state_dict(down.state_dict())
symmetric = nn.Conv2d(16, 16, 3, stride=2, padding=1)
symmetric.load_state_dict(down.conv.state_dict())
x = torch.randn(1, 16, 16, 16)
with torch.no_grad():
    print(
        f"Downsample {tuple(x.shape)} -> {tuple(down(x).shape)}; "
        f"vs common.autoencoder.Downsample: max |diff| = {max_abs_diff(down(x), reference_down(x)):.1e}"
    )
    print(
        f"same weights, symmetric pad instead: max |diff| = {max_abs_diff(symmetric(x), down(x)):.2f} "
        "(a different function)"
    )

# %% [markdown]
# **Upsample.** The decoder doubles H and W. The obvious layer, a stride-2 transposed convolution, prints a
# checkerboard. With kernel 3 and stride 2, input pixel i writes to output pixels 2i - 1, 2i, 2i + 1 (padding
# 1), so along one axis an even output pixel receives 1 kernel tap and an odd one receives 2. In 2D the counts
# per 2 x 2 cell are 1, 2, 2, 4: on a constant input with a constant kernel the output alternates between four
# values before any learning happens. SD instead copies each pixel into a 2 x 2 block (nearest-neighbour) and
# then applies an ordinary 3x3 convolution: every output pixel reads 9 input values, and a constant input
# stays constant (away from the zero-padded border).

# %%
flat = torch.ones(1, 1, 8, 8)
transposed = nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1, output_padding=1, bias=False)
conv3 = nn.Conv2d(1, 1, 3, padding=1, bias=False)
nn.init.ones_(transposed.weight), nn.init.ones_(conv3.weight)
with torch.no_grad():
    checkerboard = transposed(flat)[0, 0]  # (16, 16)
    nearest_conv = conv3(F.interpolate(flat, scale_factor=2.0, mode="nearest"))[0, 0]  # (16, 16)
fig = Figure(figsize=(6.4, 3.2))
axes = fig.subplots(1, 2)
for ax, image, title in (
    (axes[0], checkerboard, "stride-2 transposed conv"),
    (axes[1], nearest_conv, "nearest x2, then 3x3 conv"),
):
    im = ax.imshow(image.numpy(), cmap="viridis", vmin=0, vmax=9)
    ax.set_title(f"{title}\ninterior values {sorted(set(image[2:-2, 2:-2].flatten().tolist()))}", fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
fig.colorbar(im, ax=list(axes), shrink=0.8)
show(fig)

# %% [markdown]
# *Figure: an all-ones 8 x 8 input upsampled to 16 x 16 with an all-ones 3x3 kernel.* The transposed
# convolution's interior takes the values 1, 2 and 4 in a checkerboard; nearest + conv gives 9 everywhere but
# the border row and column, where the zero padding removes taps.
#
# Writing `Upsample` is **exercise 1** (`exercises.py`): nearest x2, then the 3x3 conv named `conv`, graded
# against diffusers' `Upsample2D`. The notebook uses yours once it runs, else the reference:

# %%
Upsample = yours_or_reference(
    exercises, solutions, "Upsample", lambda cls: cls(channels=4)(torch.zeros(1, 4, 2, 2))
)
torch.manual_seed(0)
up = Upsample(channels=16)
reference_up = course_ae.Upsample(channels=16)
reference_up.load_state_dict(up.state_dict(), strict=True)
with torch.no_grad():
    gap = max_abs_diff(up(x), reference_up(x))
print(
    f"Upsample {tuple(x.shape)} -> {tuple(up(x).shape)}; "
    f"vs common.autoencoder.Upsample: max |diff| = {gap:.1e}"
)
assert gap < 1e-5

# %% [markdown]
# ## 4. Attention in the middle
#
# **Question.** Every layer so far is local: a 3x3 window. Section 6 shows that one SD latent sees a 217 x 217
# px window of a 512 px image through the convolutions. How does the VAE see the whole image?
#
# **Answer.** One self-attention layer at the lowest resolution, between two ResNet blocks (the *mid block*,
# in the encoder and again in the decoder). Its tokens are the positions: the feature map (B, C, H, W) is read
# as N = H*W tokens of C features each, and every token takes a weighted average over all N:
#
#     Q = GN(x) W_q,   K = GN(x) W_k,   V = GN(x) W_v                          (B, N, C) each
#     A = softmax(Q K^T / sqrt(C))                                             (B, N, N), rows sum to 1
#     out = x + (A V) W_o                                                      (B, N, C), back to (B, C, H, W)
#
# The 1/sqrt(C) keeps the scores at unit scale: for a query q and key k with independent unit-variance
# entries, q.k is a sum of C independent products of variance 1, so its variance is C.
#
# **Why at the bottleneck.** A is N x N. At SD's bottleneck (64 x 64 latents for 512 px) N = 4,096 and A takes
# 4,096^2 x 4 bytes = 64 MiB per image; at full resolution N = 262,144 and A would take 256 GiB.
#
# **Why one head.** Multi-head attention splits C into h groups of C/h channels, each with its own N x N
# matrix: the same multiply-adds for Q K^T (N^2 C), h times the memory for the scores. The UNet wants several
# heads (different words, different relations); the VAE needs one global mixing step, and the CompVis design
# it comes from used one head of d = C. SD's weights were trained that way, so diffusers builds the VAE's
# attention with `heads = 1` too (checked below on SD's configuration).


# %%
class SelfAttention(nn.Module):
    """x + W_o softmax(Q K^T / sqrt(C)) V over the N = H*W positions, one head; diffusers' Attention names."""

    def __init__(self, *, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])  # diffusers' layout

    def tokens(self, x):
        B, C, H, W = x.shape
        return self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, N, C): one token per position

    def weights(self, x):
        """A = softmax(Q K^T / sqrt(C)), (B, N, N): row n: how much position n reads from each."""
        tokens = self.tokens(x)
        q, k = self.to_q(tokens), self.to_k(tokens)  # (B, N, C) each
        scores = q @ k.transpose(1, 2) / math.sqrt(x.shape[1])  # (B, N, N): one head of dimension C
        return scores.softmax(dim=-1)  # each row sums to 1

    def forward(self, x):
        B, C, H, W = x.shape
        v = self.to_v(self.tokens(x))  # (B, N, C)
        h = self.to_out[0](self.weights(x) @ v)  # (B, N, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # back to (B, C, H, W), plus the skip


class MidBlock(nn.Module):
    """ResNet -> self-attention -> ResNet, at the lowest resolution."""

    def __init__(self, *, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList()
        for _ in range(2):
            self.resnets.append(ResnetBlock(in_channels=channels, out_channels=channels, groups=groups))
        self.attentions = nn.ModuleList([SelfAttention(channels=channels, groups=groups)])

    def forward(self, x):
        h = self.resnets[0](x)
        h = self.attentions[0](h)
        return self.resnets[1](h)


torch.manual_seed(0)
reference_mid = course_ae.MidBlock(channels=64, groups=16).eval()
for p in reference_mid.parameters():
    nn.init.normal_(p, 0.0, 0.1)
mid = MidBlock(channels=64, groups=16)
mid.load_state_dict(reference_mid.state_dict(), strict=True)
x = torch.randn(2, 64, 16, 16)
with torch.no_grad():
    gap = max_abs_diff(mid(x), reference_mid(x))
print(f"MidBlock {tuple(x.shape)}: vs common.autoencoder.MidBlock max |diff| = {gap:.1e}")
assert gap < 1e-5

import diffusers  # noqa: E402

sd = AutoencoderConfig.sd15()
with torch.device("meta"):  # shapes only, no memory: SD's configuration costs nothing to build here
    sd_diffusers = diffusers.AutoencoderKL(**sd.to_diffusers())
sd_attention = sd_diffusers.encoder.mid_block.attentions[0]
print(
    f"diffusers' SD VAE mid-block attention: heads = {sd_attention.heads}, "
    f"query width = {sd_attention.to_q.out_features} = C"
)
for side in (512, 64):
    N = side * side
    print(
        f"attention over a {side} x {side} map: N = {N:,} tokens, A takes {N * N * 4 / 2**20:,.0f} MiB (fp32)"
    )

# %% [markdown]
# ## 5. The encoder and decoder, assembled
#
# The encoder is `conv_in`, then one *level* per entry of `block_out_channels` (its ResNet blocks, then a
# Downsample at every level but the last), the mid block, and a head: GroupNorm, SiLU, and a 3x3 conv to 2 x
# latent_channels maps (the mean and log-variance of section 7). Each Downsample halves the sides, so with L
# levels the downsampling factor is
#
#     f = 2^(L - 1)          course VAE: L = 3, f = 4 (64 px -> 16 x 16 latents);  SD: L = 4, f = 8
#
# The decoder mirrors it, widest level first, with one extra ResNet block per level and Upsample instead of
# Downsample. The modules keep diffusers' names (`down_blocks.0.resnets.0.conv1.weight` ...), so the course's
# checkpoints, and SD's, load into these classes unchanged.


# %%
class Encoder(nn.Module):
    """x (B, 3, H, W) -> moments (B, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            level = nn.Module()  # a container with diffusers' names: resnets, downsamplers
            level.resnets = nn.ModuleList()
            for j in range(config.layers_per_block):
                in_channels = widths[max(i - 1, 0)] if j == 0 else width
                level.resnets.append(ResnetBlock(in_channels=in_channels, out_channels=width, groups=groups))
            if i < len(widths) - 1:  # every level but the last halves H and W
                level.downsamplers = nn.ModuleList([Downsample(channels=width)])
            self.down_blocks.append(level)
        self.mid_block = MidBlock(channels=widths[-1], groups=groups)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x, trace=None):
        """``trace``: a list to append (stage, shape) to, for printing the shapes."""
        h = self.conv_in(x)  # (B, C_0, H, W)
        stages = [("conv_in", h.shape)]
        for i, level in enumerate(self.down_blocks):
            for resnet in level.resnets:
                h = resnet(h)  # (B, C_i, H / 2^i, W / 2^i)
            stages.append((f"level {i}: {len(level.resnets)} ResNet", h.shape))
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)  # (B, C_i, H / 2^(i+1), W / 2^(i+1))
                stages.append((f"level {i}: Downsample", h.shape))
        h = self.mid_block(h)  # (B, C_last, H/f, W/f)
        stages.append(("mid block", h.shape))
        moments = self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2 * latent_channels, H/f, W/f)
        stages.append(("norm, SiLU, conv_out", moments.shape))
        if trace is not None:
            trace.extend(stages)
        return moments


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> x (B, 3, h*f, w*f). Its forward pass is exercise 2, ``decode``."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups  # widest first
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(channels=widths[0], groups=groups)
        self.up_blocks = nn.ModuleList()
        for i, width in enumerate(widths):
            level = nn.Module()  # resnets, upsamplers
            level.resnets = nn.ModuleList()
            for j in range(config.layers_per_block + 1):  # one ResNet more per level than the encoder
                in_channels = widths[max(i - 1, 0)] if j == 0 else width
                level.resnets.append(ResnetBlock(in_channels=in_channels, out_channels=width, groups=groups))
            if i < len(widths) - 1:  # every level but the last doubles H and W
                level.upsamplers = nn.ModuleList([Upsample(channels=width)])
            self.up_blocks.append(level)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)


class VAE(nn.Module):
    """The parts with diffusers' AutoencoderKL names; quant_conv and post_quant_conv are section 7's."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)


course_config = AutoencoderConfig.course()
vae = VAE(course_config).eval()
trace = []
with torch.no_grad():
    vae.encoder(torch.randn(1, 3, 64, 64), trace=trace)
for stage, shape in trace:
    print(f"{stage:24s} {tuple(shape)}")
levels = len(course_config.block_out_channels)
f_measured = 64 // trace[-1][1][-1]
print(
    f"f = 2^(levels - 1) = 2^{levels - 1} = {2 ** (levels - 1)}; measured: 64 px / "
    f"{trace[-1][1][-1]} latents = {f_measured}"
)
assert f_measured == 2 ** (levels - 1) == course_config.downsample_factor

# %% [markdown]
# The decoder's forward pass (post_quant_conv, conv_in, the mid block, the levels, the head) is **exercise
# 2**, `decode(vae, z)`: the mirror of the encoder's forward above. The notebook calls yours once it runs
# (else the reference) and records the shape after each stage with forward hooks, which see the blocks whoever
# calls them. Both traces, drawn:

# %%
decode = yours_or_reference(exercises, solutions, "decode", lambda fn: fn(vae, torch.zeros(1, 4, 2, 2)))
decoder_trace = []
watched = {"conv_in": vae.decoder.conv_in, "mid block": vae.decoder.mid_block.resnets[1]}
for i, level in enumerate(vae.decoder.up_blocks):
    watched[f"level {i}: {len(level.resnets)} ResNet"] = level.resnets[-1]
    if hasattr(level, "upsamplers"):
        watched[f"level {i}: Upsample"] = level.upsamplers[0]
watched["norm, SiLU, conv_out"] = vae.decoder.conv_out
hooks = []
for name, module in watched.items():

    def record(module, args, out, name=name):  # a forward hook: note the output's shape under this name
        decoder_trace.append((name, out.shape))

    hooks.append(module.register_forward_hook(record))
with torch.no_grad():
    decode(vae, torch.randn(1, 4, 16, 16))
for hook in hooks:
    hook.remove()


def draw_column(ax, stages, x, title, top_down):
    """One box per stage, its shape (C, H, W) under the name; arrows in the direction the data flows."""
    ys = [len(stages) - k for k in range(len(stages))] if top_down else list(range(1, len(stages) + 1))
    for (name, shape), y in zip(stages, ys):
        C, H, W = tuple(shape)[1:]
        box = FancyBboxPatch(
            (x - 1.3, y - 0.32), 2.6, 0.64, boxstyle="round,pad=0.02", fc="#e8eef7", ec="#4a6fa5"
        )
        ax.add_patch(box)
        ax.text(x, y + 0.1, name, ha="center", va="center", fontsize=8)
        ax.text(x, y - 0.17, f"{C} x {H} x {W}", ha="center", va="center", fontsize=8, color="#333333")
    gap = 0.34 if top_down else -0.34  # arrows run between the boxes' edges
    for y0, y1 in zip(ys[:-1], ys[1:]):
        ax.annotate(
            "", xy=(x, y1 + gap), xytext=(x, y0 - gap), arrowprops=dict(arrowstyle="->", color="#4a6fa5")
        )
    ax.text(x, len(stages) + 0.75, title, ha="center", fontsize=10, weight="bold")


fig = Figure(figsize=(8.0, 5.6))
ax = fig.subplots()
draw_column(ax, [("image", (1, 3, 64, 64))] + trace, 0.0, "encoder", top_down=True)
draw_column(ax, [("latent z", (1, 4, 16, 16))] + decoder_trace, 4.0, "decoder", top_down=False)
ax.annotate("", xy=(2.7, 1.0), xytext=(1.3, 1.0), arrowprops=dict(arrowstyle="->", color="#a54a4a"))
ax.text(2.0, 1.35, "mu, log sigma^2\n-> sample z", ha="center", fontsize=8, color="#a54a4a")
ax.set_xlim(-1.6, 5.6)
ax.set_ylim(0.4, max(len(trace), len(decoder_trace)) + 2.2)
ax.axis("off")
show(fig)

# %% [markdown]
# *Figure: the course VAE's encoder (left, top to bottom) and decoder (right, bottom to top) with the shape (C
# x H x W) after each stage, traced from the modules above.* The image loses a factor 2 of side at each
# Downsample and gains channels; the decoder retraces the path with one more ResNet per level.
#
# Now load the Photos VAE's weights (trained in chapter 01 on crops of photographs) into these classes and
# compare with `common.autoencoder.AutoencoderKL` and diffusers' `AutoencoderKL`, both loading the same
# folder:

# %%
state = load_file(str(PHOTOS_VAE / "diffusion_pytorch_model.safetensors"))
vae.load_state_dict(state, strict=True)  # every name and shape matches: nothing missing, nothing left over
course_vae = AutoencoderKL.load(PHOTOS_VAE).eval()
diffusers_vae = diffusers.AutoencoderKL.from_pretrained(PHOTOS_VAE).eval()
n_loaded = sum(v.numel() for v in state.values())
print(f"loaded {len(state)} tensors ({n_loaded:,} parameters) from {PHOTOS_VAE.name}")

n_crops = budget(fast=4, cpu=8)
held_out = Photos(resolution=64, split="test", length=n_crops, seed=0)
x = torch.stack([held_out[i]["image"] for i in range(n_crops)])  # (B, 3, 64, 64) in [-1, 1]
with torch.no_grad():
    moments = vae.quant_conv(vae.encoder(x))  # (B, 8, 16, 16)
    mean, logvar = moments.chunk(2, dim=1)  # (B, 4, 16, 16) each
    x_hat = decode(vae, mean)  # (B, 3, 64, 64)
    course_posterior = course_vae.encode(x)
    diffusers_posterior = diffusers_vae.encode(x).latent_dist
    checks = {
        "posterior mean vs common": max_abs_diff(mean, course_posterior.mean),
        "posterior mean vs diffusers": max_abs_diff(mean, diffusers_posterior.mean),
        "decoded image vs common": max_abs_diff(x_hat, course_vae.decode(mean)),
        "decoded image vs diffusers": max_abs_diff(x_hat, diffusers_vae.decode(mean).sample),
    }
for what, gap in checks.items():
    print(f"{what:30s} max |diff| = {gap:.1e}")
assert max(checks.values()) < 1e-4
psnrs = psnr(x_hat.clamp(-1, 1), x, per_image=True)
print(
    f"held-out crops of the test photo, through your encoder and decoder: PSNR {np.mean(psnrs):.2f} dB "
    f"(per crop {min(psnrs):.1f} to {max(psnrs):.1f})"
)
show(side_by_side({"held-out crop": x, "reconstruction": x_hat.clamp(-1, 1)}, size=1.3))

# %% [markdown]
# *Figure: crops of the held-out photograph (the cat, never seen in training), top, and their reconstructions
# through the notebook's encoder and decoder, bottom.* Each 64 x 64 x 3 crop passes through a 4 x 16 x 16
# latent, 12 times fewer numbers. The reconstructions keep the shapes, the edges and the fur's colours; they
# smooth the finest fur texture, and the green of the eyes comes back brownish: this is a small VAE trained on
# 14 photographs. Your classes, the course module and diffusers agree to float rounding (the max |diff|
# lines), because all three run the same arithmetic on the same weights.
#
# **What the attention does, on real features.** Capture the features that enter the encoder's mid-block
# attention for the first crop and look at its weights A: for a query position, the row of A is a 16 x 16 map
# of where it reads from. How much the attention matters is a second question: compare the size of what it
# adds, `(A V) W_o`, with the size of its input x.

# %%
captured = {}
attention_layers = {
    "encoder": vae.encoder.mid_block.attentions[0],
    "decoder": vae.decoder.mid_block.attentions[0],
}
hooks = [
    layer.register_forward_pre_hook(lambda module, args, name=name: captured.update({name: args[0]}))
    for name, layer in attention_layers.items()
]
with torch.no_grad():
    decode(vae, vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0])
for hook in hooks:
    hook.remove()
h = captured["encoder"]  # (B, 64, 16, 16): the input of the encoder's attention
with torch.no_grad():
    A = attention_layers["encoder"].weights(h)  # (B, 256, 256)
queries = {"query at the top left": (1, 1), "query at the centre": (8, 8)}
fig = Figure(figsize=(9.0, 3.2))
axes = fig.subplots(1, 3)
axes[0].imshow(((x[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
axes[0].set_title("the crop (64 px)", fontsize=9)
axes[0].set_xticks([]), axes[0].set_yticks([])
for ax, (title, (row, col)) in zip(axes[1:], queries.items()):
    im = ax.imshow(A[0, row * 16 + col].view(16, 16).numpy(), cmap="magma")
    ax.plot(col, row, marker="x", color="cyan", markersize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.75)
show(fig)
rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
positions = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()  # (256, 2)
far = torch.cdist(positions, positions) > 4  # (256, 256): pairs more than 4 positions apart
print(
    f"share of the attention weight on positions more than 4 away: {(A * far).sum(-1).mean():.0%} "
    f"(uniform weights would put {far.float().mean():.0%} there)"
)
for name, layer in attention_layers.items():
    with torch.no_grad():
        added = layer(captured[name]) - captured[name]  # (A V) W_o, reshaped to (B, C, h, w)
    print(f"{name} attention: |what it adds| / |its input| = {added.norm() / captured[name].norm():.2f}")

# %% [markdown]
# *Figure: the first crop, and the attention weights of two query positions (the cross) over its 16 x 16
# latent map.* Neither query reads from its own neighbourhood. Both read mostly from the same few positions,
# far from the centre query: where the attention looks is decided by content, not by distance, and most of the
# weight lies more than 4 positions away (printed), beyond what the mid block's 3x3 convolutions reach. But
# what the attention adds is small next to its input (the printed ratios): this VAE leans on it little. That
# fits section 6: at 64 px the course VAE's convolutions already see 77 px, more than the whole crop, so
# little is left for the attention to bring in. In SD's VAE at 512 px (a 217 px field) the attention is the
# strong path across the image.

# %% [markdown]
# ## 6. The receptive field
#
# **Question.** Without the attention and the GroupNorm statistics, how many input pixels does one latent see?
#
# **Derivation.** Walk the layers from the image up, keeping the field r (in input pixels) and the jump j (the
# input-pixel distance between two neighbouring positions of the current feature map). Start at r = 1, j = 1.
# A k x k convolution at jump j widens the field by (k - 1) neighbouring positions, each j input pixels apart:
# r += (k - 1) j. A stride-2 convolution makes its output neighbours 2 j apart: afterwards j *= 2. So for the
# course VAE (one ResNet per level, three levels):
#
#     conv_in                               r = 1 + 2          = 3,   j = 1
#     level 0: ResNet (two 3x3), Downsample  r = 3 + 4 + 2      = 9,   j = 2
#     level 1: ResNet, Downsample            r = 9 + 8 + 4      = 21,  j = 4
#     level 2: ResNet                        r = 21 + 16        = 37
#     mid block: two ResNets                 r = 37 + 32        = 69
#     conv_out                               r = 69 + 8         = 77
#
# Writing this walk for any configuration is **exercise 3**, `receptive_field(config)`. We measure the field
# too: switch off the attention and the GroupNorms in the notebook's encoder, backpropagate from the centre
# latent, and see which input pixels get a nonzero gradient.

# %%
receptive_field = yours_or_reference(exercises, solutions, "receptive_field", lambda fn: fn(course_config))


def convolutions_only(encoder):
    """The encoder with its attention and GroupNorms replaced by identities: only the convolutions left."""
    encoder.mid_block.attentions[0] = nn.Identity()
    for name, module in list(encoder.named_modules()):
        if isinstance(module, nn.GroupNorm):
            parent_name, _, attribute = name.rpartition(".")
            setattr(encoder.get_submodule(parent_name), attribute, nn.Identity())
    return encoder


side = 128
torch.manual_seed(0)
encoder = convolutions_only(Encoder(course_config))
image = torch.randn(1, 3, side, side, requires_grad=True)
moments = encoder(image)  # (1, 8, 32, 32)
moments[0, :, moments.shape[-2] // 2, moments.shape[-1] // 2].sum().backward()
touched = image.grad[0].abs().sum(dim=0) > 0  # (128, 128): the pixels the centre latent depends on
rows = touched.any(dim=1).nonzero()
field_measured = int(rows.max() - rows.min() + 1)
print(
    f"course VAE (f = 4): computed {receptive_field(course_config)} px, measured by backpropagation "
    f"{field_measured} px"
)
print(f"SD 1.x VAE (f = 8): computed {receptive_field(sd)} px of a 512 px image")
assert receptive_field(course_config) == field_measured

fig = Figure(figsize=(3.2, 3.2))
ax = fig.subplots()
ax.imshow(touched.numpy(), cmap="gray")
ax.set_title(
    f"input pixels the centre latent sees\n(course VAE, {side} px input): "
    f"{field_measured} x {field_measured}",
    fontsize=9,
)
ax.set_xticks([]), ax.set_yticks([])
show(fig)

# %% [markdown]
# *Figure: in white, the input pixels that reach the centre latent of a 128 px image through the course
# encoder's convolutions.* It is a 77 x 77 square, as computed. SD's latents see 217 px through convolutions,
# less than half of a 512 px image; the mid-block attention (section 5) and, weakly, the GroupNorm statistics
# make each latent depend on the whole image.

# %% [markdown]
# ## 7. The Gaussian head, and the 1x1 convolutions around the latent
#
# **The head.** The encoder does not output a latent; it outputs the parameters of the posterior `q(z | x) =
# N(mu, diag(sigma^2))`. Its last conv gives 2 x latent_channels maps, and `quant_conv` (below) maps them to
# `(mu, log sigma^2)`. Why the log-variance: a conv can output any real number, a variance must be positive,
# and `sigma^2 = exp(log sigma^2)` is positive for every output with a smooth gradient. SD clamps the
# log-variance to [-30, 20] so that `exp` stays finite. A latent is drawn by the reparameterisation `z = mu +
# sigma * eps, eps ~ N(0, I)`, which keeps z differentiable in mu and sigma.
#
# The training loss (chapter 01) adds `KL(q || N(0, I))`. Per dimension, with q = N(mu, sigma^2), p = N(0, 1):
#
#     KL = E_q[log q(z) - log p(z)]
#        = E_q[-1/2 log sigma^2 - (z - mu)^2 / (2 sigma^2) + z^2 / 2]     the log(2 pi) terms cancel
#        = -1/2 log sigma^2 - 1/2 + (mu^2 + sigma^2) / 2     as E(z - mu)^2 = sigma^2, E z^2 = mu^2 + sigma^2
#        = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2)
#
# summed over the latent's C x h x w dimensions:

# %%
with torch.no_grad():
    moments = vae.quant_conv(vae.encoder(x))  # (B, 8, 16, 16)
mu, log_sigma2 = moments.chunk(2, dim=1)  # (B, 4, 16, 16) each
log_sigma2 = log_sigma2.clamp(-30.0, 20.0)
sigma = torch.exp(0.5 * log_sigma2)
kl = 0.5 * (mu**2 + sigma**2 - 1 - log_sigma2).sum(dim=(1, 2, 3))  # (B,)
kl_torch = torch.distributions.kl_divergence(
    torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
).sum(dim=(1, 2, 3))
print(
    f"KL per crop: {kl[0]:,.0f} ... ; vs torch.distributions: max rel. diff "
    f"{((kl - kl_torch).abs() / kl_torch).max():.1e}; vs common's DiagonalGaussian.kl(): "
    f"{((kl - course_posterior.kl()).abs() / kl).max():.1e}"
)
assert torch.allclose(kl, kl_torch, rtol=1e-4) and torch.allclose(kl, course_posterior.kl(), rtol=1e-4)

generator = torch.Generator().manual_seed(0)
z = mu + sigma * torch.randn(mu.shape, generator=generator)  # the reparameterisation
with torch.no_grad():
    x_sampled = decode(vae, z)
print(
    f"posterior std sigma: median {sigma.median():.4f}, max {sigma.max():.4f}; "
    f"spread of the means mu across positions: std {mu.std():.2f}"
)
print(
    f"decoding a sample z instead of the mean: PSNR {psnr(x_sampled.clamp(-1, 1), x):.2f} dB "
    f"(mean: {np.mean(psnrs):.2f} dB)"
)

# %% [markdown]
# The Photos VAE was trained with a tiny KL weight (chapter 01), so its posterior is almost a point: sigma is
# small next to the spread of the means, and decoding a sample instead of the mean leaves the PSNR the same at
# the printed precision. With so small a weight the KL term barely pulls q(z | x) towards N(0, I): the spread
# of the means (printed) is not 1, and that is why chapter 01 measures a `scaling_factor` before diffusion.
# (SD's VAE was trained the same way, with KL weight 1e-6.)
#
# **quant_conv and post_quant_conv.** They are 1x1 convolutions on the moments (8 -> 8 channels) and on the
# latent (4 -> 4): a linear map applied at each position. They come from VQGAN, the same codebase's
# vector-quantised autoencoder, where `quant_conv` maps the encoder's features into the codebook's space
# before quantisation and `post_quant_conv` maps back. In the KL autoencoder nothing is quantised, and a 1x1
# conv right after a 3x3 conv adds no expressive power: with `conv_out(h) = W * h + b` and `quant_conv(m) = Q
# m + q`,
#
#     Q (W * h + b) + q = (Q W) * h + (Q b + q),     (Q W)[o] = sum_k Q[o, k] W[k]
#
# one 3x3 conv with folded weights. (post_quant_conv folds into the decoder's conv_in the same way, except at
# the border, where conv_in's zero padding meets post_quant_conv's bias.) They stay because SD's checkpoint
# has them (72 + 20 parameters). Check the fold on the loaded encoder:

# %%
Q = vae.quant_conv.weight[:, :, 0, 0]  # (8, 8)
W_folded = torch.einsum("ok,kiyx->oiyx", Q, vae.encoder.conv_out.weight)  # (8, 64, 3, 3)
b_folded = Q @ vae.encoder.conv_out.bias + vae.quant_conv.bias  # (8,)
captured = {}
hook = vae.encoder.conv_out.register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))
with torch.no_grad():
    moments = vae.quant_conv(vae.encoder(x))
    moments_folded = F.conv2d(captured["h"], W_folded, b_folded, padding=1)
hook.remove()
gap = max_abs_diff(moments_folded, moments)
print(f"quant_conv(conv_out(h)) vs one folded 3x3 conv: max |diff| = {gap:.1e}")
assert gap < 1e-4

# %% [markdown]
# ## 8. SD 1.5's VAE, counted without allocating it
#
# PyTorch's `meta` device builds modules with shapes and no storage: SD's whole VAE costs nothing to build,
# and a forward pass computes output shapes only. Build SD's configuration from the notebook's own classes,
# count its parameters, and measure f on a 512 px image. Then check against diffusers' `AutoencoderKL` built
# from the same configuration, also on the meta device (no weights downloaded). Counting from the
# configuration alone, without building anything, is **exercise 4**, `count_parameters`.

# %%
with torch.device("meta"):
    sd_vae = VAE(sd)
    sd_moments = sd_vae.encoder(torch.empty(1, 3, 512, 512))  # shapes only
n_encoder = sum(p.numel() for p in sd_vae.encoder.parameters())
n_decoder = sum(p.numel() for p in sd_vae.decoder.parameters())
n_quant = sum(p.numel() for p in sd_vae.quant_conv.parameters())
n_post_quant = sum(p.numel() for p in sd_vae.post_quant_conv.parameters())
print(
    f"SD 1.5 VAE from the notebook's classes: encoder {n_encoder:,}, decoder {n_decoder:,}, "
    f"quant_conv {n_quant}, post_quant_conv {n_post_quant}"
)
total = n_encoder + n_decoder + n_quant + n_post_quant
print(f"in all {total:,} parameters = {total * 4 / 1e6:.0f} MB in fp32")
print(
    f"512 px image -> moments {tuple(sd_moments.shape)}: f = {512 // sd_moments.shape[-1]} "
    f"= 2^({len(sd.block_out_channels)} - 1)"
)
assert (n_encoder, n_decoder) == (34_163_592, 49_490_179)
assert 512 // sd_moments.shape[-1] == 2 ** (len(sd.block_out_channels) - 1)

n_encoder_diffusers = sum(p.numel() for p in sd_diffusers.encoder.parameters())
n_decoder_diffusers = sum(p.numel() for p in sd_diffusers.decoder.parameters())
shapes_ours = {k: tuple(v.shape) for k, v in sd_vae.state_dict().items()}
shapes_diffusers = {k: tuple(v.shape) for k, v in sd_diffusers.state_dict().items()}
print(
    f"diffusers' AutoencoderKL at the same config: encoder {n_encoder_diffusers:,}, "
    f"decoder {n_decoder_diffusers:,}; same {len(shapes_ours)} names and shapes: "
    f"{shapes_ours == shapes_diffusers}"
)
assert (n_encoder_diffusers, n_decoder_diffusers) == (n_encoder, n_decoder)
assert shapes_ours == shapes_diffusers

# %% [markdown]
# ## 9. The real SD VAE, if you have it
#
# With SD 1.5's VAE on disk (a diffusers folder holding `config.json` and
# `diffusion_pytorch_model.safetensors`), your classes load it as they loaded the Photos VAE and reconstruct
# the held-out photograph. Nothing is downloaded here; the cell looks where
# `python -m common.weights fetch sd15` puts SD 1.5 (`$SD15_PATH`, a pipeline folder or its `vae/`, else
# the Hugging Face cache).

# %%
import json  # noqa: E402

from common.data import load_photo  # noqa: E402
from common.weights import sd15_path  # noqa: E402

sd_path = sd15_path()
vae_dir = None
for folder in (sd_path / "vae", sd_path) if sd_path is not None else ():
    if (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file():
        vae_dir = vae_dir or folder
if vae_dir is None:
    print(
        "SD 1.5's VAE is not on disk; skipping. To run this cell, fetch SD 1.5 once (about 4.3 GB) with\n"
        "    python -m common.weights fetch sd15\n"
        "or point $SD15_PATH at a diffusers SD 1.x folder."
    )
else:
    real_config = AutoencoderConfig.from_diffusers(json.loads((vae_dir / "config.json").read_text()))
    real_vae = VAE(real_config).eval()
    real_state = load_file(str(vae_dir / "diffusion_pytorch_model.safetensors"))
    old_names = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    for old, new in old_names.items():  # files written by older diffusers use these names for the attention
        real_state = {name.replace(old, new): tensor for name, tensor in real_state.items()}
    real_vae.load_state_dict(real_state, strict=True)
    size = budget(fast=128, cpu=256)
    photo = np.asarray(load_photo("chelsea").resize((size, size)), dtype=np.float32)  # (H, W, 3) in [0, 255]
    x_photo = torch.from_numpy(photo).permute(2, 0, 1)[None] / 127.5 - 1  # (1, 3, H, W) in [-1, 1]
    with torch.no_grad():
        z_photo = real_vae.quant_conv(real_vae.encoder(x_photo)).chunk(2, dim=1)[0]  # the posterior mean
        x_photo_hat = decode(real_vae, z_photo).clamp(-1, 1)
    print(
        f"SD VAE from {vae_dir}: {tuple(x_photo.shape)} -> latents {tuple(z_photo.shape)} -> "
        f"PSNR {psnr(x_photo_hat, x_photo):.2f} dB"
    )
    show(side_by_side({"photo": x_photo, "SD VAE": x_photo_hat}, size=2.5))
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# ## Summary
#
# * The ResNet block `x + F(x)` keeps an identity path in the gradient, `prod (I + J_l)`: through 32 blocks at
#   initialisation the gradient stays of order one with the skip and drifts by two orders of magnitude without
#   it.
# * GroupNorm normalises each sample over groups of channels and all positions, so a sample's output does not
#   depend on its batch: what a VAE trained on small batches of large images and run one image at a time
#   needs.
# * Downsampling pads right and bottom, then a stride-2 3x3 conv; upsampling is nearest x2 then a 3x3 conv,
#   which cannot print the checkerboard of a stride-2 transposed conv.
# * The convolutions give one SD latent a 217 px field; a single-head attention over the N = h*w positions at
#   the bottleneck, where N is smallest, lets every latent read the whole image.
# * The encoder outputs the mean and log-variance of a diagonal Gaussian, and per dimension `KL = 1/2 (mu^2 +
#   sigma^2 - 1 - log sigma^2)`; quant_conv and post_quant_conv are 1x1 convs inherited from VQGAN that add no
#   expressive power (quant_conv folds exactly into the conv before it).
# * f = 2^(levels - 1): 4 for the course's VAE, 8 for SD's. Your classes load the course's and SD's
#   checkpoints unchanged and count SD's 34,163,592 + 49,490,179 parameters.
#
# ## Exercises (`02_autoencoder_backbone/exercises.py`, graded by `python -m common.grade 02`)
#
# 1. `Upsample`: nearest x2, then a 3x3 conv; graded against diffusers' `Upsample2D` with the same weights.
# 2. `decode(vae, z)`: the decoder's forward pass, block by block, with loaded weights; graded against
#    diffusers' `AutoencoderKL.decode` with the same (random) weights, with the whole-module shortcuts
#    switched off.
# 3. `receptive_field(config)`: the walk of section 6 for any configuration; graded by backpropagation through
#    real encoders of three configurations (f = 2, 4 and 8).
# 4. `count_parameters(config)`: the encoder's and decoder's parameter counts from the configuration alone;
#    graded against the built modules and SD's 34,163,592 and 49,490,179.
