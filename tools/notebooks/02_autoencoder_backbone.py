# %% [markdown]
# # 02. The autoencoder backbone
#
# Chapter 01 trained and used the VAE as a black box. Here we open it: Stable Diffusion's AutoencoderKL
# (the CompVis encoder/decoder that diffusers re-implements) built block by block, with the shapes checked at
# every step. Then the receptive field, why GroupNorm and why one attention block in the middle, and finally
# the course's `common.autoencoder.AutoencoderKL` loaded with the **same weights** as diffusers'
# `AutoencoderKL` at SD's configuration, compared number for number.
#
# Shape legend: B batch, C channels, H x W the image or feature map, N = H*W positions.

# %%
import math
import os
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from torch import nn

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.runtime import budget, describe, seed_everything

matplotlib.rcParams["figure.dpi"] = 72
seed_everything(0)
print(describe())
T0 = time.perf_counter()


def show(fig, dpi: int = 72) -> None:
    """Display a matplotlib Figure (common.viz builds them without pyplot) as a PNG in the notebook."""
    import io

    from IPython.display import Image, display

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    display(Image(buffer.getvalue()))

# %% [markdown]
# ## 1. The ResNet block
#
# Every level of the encoder and decoder is a stack of pre-activation ResNet blocks:
# `x + conv(SiLU(GN(conv(SiLU(GN(x))))))`, with a 1x1 convolution on the skip path when the width changes.
# No time embedding here (that comes with the UNet in chapter 03). We write it small, with diffusers'
# parameter names, so weights can move across later.

# %%
class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


x = torch.randn(2, 32, 64, 64)
block = ResnetBlock(in_channels=32, out_channels=64, groups=16)
out = block(x)
assert out.shape == (2, 64, 64, 64)
print("ResnetBlock:", tuple(x.shape), "->", tuple(out.shape), f"({sum(p.numel() for p in block.parameters()):,} parameters)")

# %% [markdown]
# ## 2. Down- and upsampling
#
# The encoder halves the resolution with a stride-2 3x3 convolution. SD pads **one pixel on the right and
# bottom only** and then convolves with padding 0: a 3x3 stride-2 convolution over H + 1 rows gives exactly
# H / 2 outputs. (A symmetric pad of 1 also gives H / 2, but every output then sits half a pixel elsewhere, and
# SD's weights were trained with the asymmetric one.) The decoder doubles the resolution with nearest-neighbour
# upsampling followed by a 3x3 convolution, which avoids the checkerboard artefacts of transposed convolutions.

# %%
class Downsample(nn.Module):
    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H+1, W+1) -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, *, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


down, up = Downsample(channels=64), Upsample(channels=64)
assert down(out).shape == (2, 64, 32, 32) and up(down(out)).shape == (2, 64, 64, 64)
sym = nn.Conv2d(64, 64, 3, stride=2, padding=1)
sym.load_state_dict(down.conv.state_dict())
with torch.no_grad():
    gap = (sym(out) - down(out)).abs().max()
print(f"Downsample {tuple(out.shape)} -> {tuple(down(out).shape)}; Upsample back -> {tuple(up(down(out)).shape)}")
print(f"same weights, symmetric pad instead: max difference {gap:.3f} (not a detail you can skip)")

# %% [markdown]
# ## 3. Attention in the middle
#
# At the lowest resolution the encoder and decoder each have a *mid block*: ResNet, single-head self-attention
# over all N = h*w positions, ResNet. It is the one operation that lets any position see every other one.
# The attention itself is `common.attention.attention` (chapter 04 builds it from scratch); here it is one call.

# %%
from common.attention import attention  # noqa: E402


class SelfAttention(nn.Module):
    def __init__(self, *, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, N, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, N, C)
        h = self.to_out[0](attention(q, k, v).squeeze(1))  # (B, N, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, *, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(channels=channels, groups=groups)])
        self.resnets = nn.ModuleList([ResnetBlock(in_channels=channels, out_channels=channels, groups=groups)
                                      for _ in range(2)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


# %% [markdown]
# ## 4. The encoder and decoder, level by level
#
# With these pieces, the whole encoder for the course's configuration (widths 32-64-64, one ResNet per level,
# f = 4) is a short loop. We run a 64 x 64 image through it and check the shape after every stage.
# The encoder outputs 2 x latent_channels maps: the mean and log-variance of the diagonal Gaussian q(z|x).

# %%
cfg = AutoencoderConfig.course()
widths, groups, n_res = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
torch.manual_seed(0)
enc = nn.ModuleDict({
    "conv_in": nn.Conv2d(3, widths[0], 3, padding=1),
    "down_blocks": nn.ModuleList(),
    "mid_block": MidBlock(channels=widths[-1], groups=groups),
    "conv_norm_out": nn.GroupNorm(groups, widths[-1], eps=1e-6),
    "conv_out": nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1),
})
for i, w in enumerate(widths):
    level = nn.Module()
    level.resnets = nn.ModuleList([ResnetBlock(in_channels=widths[max(i - 1, 0)] if j == 0 else w, out_channels=w,
                                               groups=groups) for j in range(n_res)])
    if i < len(widths) - 1:
        level.downsamplers = nn.ModuleList([Downsample(channels=w)])
    enc["down_blocks"].append(level)

image = torch.randn(1, 3, 64, 64)
h = enc["conv_in"](image)
print(f"{'conv_in':28s} {tuple(h.shape)}")
assert h.shape == (1, 32, 64, 64)
for i, level in enumerate(enc["down_blocks"]):
    for j, resnet in enumerate(level.resnets):
        h = resnet(h)
        print(f"{f'level {i} resnet {j}':28s} {tuple(h.shape)}")
    if hasattr(level, "downsamplers"):
        h = level.downsamplers[0](h)
        print(f"{f'level {i} downsample':28s} {tuple(h.shape)}")
    assert h.shape[-1] == 64 // 2 ** min(i + 1, len(widths) - 1)
h = enc["mid_block"](h)
print(f"{'mid block (attention)':28s} {tuple(h.shape)}")
moments = enc["conv_out"](F.silu(enc["conv_norm_out"](h)))
print(f"{'conv_out: mean, logvar':28s} {tuple(moments.shape)}")
assert moments.shape == (1, 2 * cfg.latent_channels, 16, 16)

# %% [markdown]
# The hand-built encoder uses diffusers' names, so the course module's encoder weights load into it unchanged,
# and the two must agree exactly (`common.autoencoder` has the same blocks, plus `quant_conv`, the decoder and
# the Gaussian):

# %%
course = AutoencoderKL(cfg).eval()
missing = enc.load_state_dict(course.encoder.state_dict(), strict=True)
with torch.no_grad():
    ours_inline = enc["conv_out"](F.silu(enc["conv_norm_out"](enc["mid_block"](
        torch.nn.Sequential(*[m for lvl in enc["down_blocks"] for m in [*lvl.resnets, *getattr(lvl, "downsamplers", [])]])(
            enc["conv_in"](image))))))
    ours_common = course.encoder(image)
print(f"inline encoder vs common.autoencoder Encoder: max |diff| = {(ours_inline - ours_common).abs().max():.2e}")
posterior = course.encode(image)
print("posterior mean", tuple(posterior.mean.shape), "logvar", tuple(posterior.logvar.shape),
      "-> decode", tuple(course.decode(posterior.sample()).shape))

# %% [markdown]
# ## 5. The receptive field
#
# How much of the image does one latent see through the convolutions? Walk the layers keeping the field r and
# the jump j (input pixels between neighbouring positions): a k x k convolution adds (k - 1) j to r, and a
# stride-2 convolution then doubles j.

# %%
def receptive_field(config) -> int:
    r, j = 1, 1
    r += 2 * j  # conv_in
    for level in range(len(config.block_out_channels)):
        r += config.layers_per_block * 2 * 2 * j  # two 3x3 convs per ResNet
        if level < len(config.block_out_channels) - 1:
            r += 2 * j  # Downsample's stride-2 3x3 conv
            j *= 2
    r += 2 * 2 * 2 * j + 2 * j  # the mid block's two ResNets, conv_out
    return r


def measured_field(config, side):
    """Backpropagate from the centre latent with attention and GroupNorm switched off (both see everything)."""
    torch.manual_seed(0)
    m = AutoencoderKL(config).encoder
    m.mid_block.attentions[0] = nn.Identity()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.GroupNorm):
            parent = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
            setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    xin = torch.randn(1, 3, side, side, requires_grad=True)
    out = m(xin)
    out[0, :, out.shape[-2] // 2, out.shape[-1] // 2].sum().backward()
    touched = xin.grad[0].abs().sum(0) > 0
    rows = touched.any(1).nonzero()
    return int(rows.max() - rows.min() + 1), touched


sd = AutoencoderConfig.sd15()
rf_course, touched = measured_field(cfg, 128)
print(f"course VAE (f=4): computed {receptive_field(cfg)} px, measured by backprop {rf_course} px")
print(f"SD 1.x VAE (f=8): computed {receptive_field(sd)} px of a 512 px image")

from matplotlib.figure import Figure  # noqa: E402

fig = Figure(figsize=(3, 3))
ax = fig.subplots()
ax.imshow(touched.numpy(), cmap="gray")
ax.set_title(f"input pixels one latent sees\n(course VAE, 128 px input)", fontsize=9)
ax.set_xticks([]), ax.set_yticks([])
show(fig)

# %% [markdown]
# *Figure: the input pixels (white) that reach the centre latent of a 128 px image through the course encoder's
# convolutions.* SD's latents see 217 px through convolutions: less than half of a 512 px image. Two things
# widen that to the whole image, and they are the answers to "why":
#
# * **Mid-block attention.** One self-attention at the lowest resolution gives every latent the whole image,
#   at the cheapest place to do it: N = 64 x 64 = 4,096 positions for SD (a 4,096^2 attention matrix), where at
#   full resolution it would be 262,144^2, 4,096 times more.
# * **GroupNorm** normalises each sample over groups of channels *and all positions*, so its statistics are
#   global too; unlike BatchNorm it does not depend on the other images in the batch, which matters for a
#   model trained with small batches of large images and used one image at a time. Check it:

# %%
torch.manual_seed(0)
a, others = torch.randn(1, 64, 8, 8), torch.randn(3, 64, 8, 8)
bn, gn = nn.BatchNorm2d(64).train(), nn.GroupNorm(32, 64)
bn_alone, bn_batch = bn(a), bn(torch.cat([a, others]))[:1]
gn_alone, gn_batch = gn(a), gn(torch.cat([a, others]))[:1]
print(f"BatchNorm: same image, alone vs in a batch: max diff {(bn_alone - bn_batch).abs().max():.3f}")
print(f"GroupNorm: same image, alone vs in a batch: max diff {(gn_alone - gn_batch).abs().max():.2e}")
x_demo = torch.randn(1, 64, 8, 8)
m_demo = MidBlock(channels=64, groups=32)
for p in m_demo.parameters():  # the skips dominate at init; make the attention matter for the demo
    nn.init.normal_(p, 0, 0.2)
with torch.no_grad():
    y0 = m_demo(x_demo)
    x_demo[0, :, 0, 0] += 1.0
    y1 = m_demo(x_demo)
changed = ((y1 - y0).abs().sum(1)[0] > 1e-6).float().mean()
print(f"mid block: changing one corner position changes {changed:.0%} of the output positions")

# %% [markdown]
# ## 6. The course module against diffusers, with the same weights
#
# The contract of the course: for a given configuration, `common.autoencoder.AutoencoderKL` has exactly the
# parameter names and shapes of `diffusers.AutoencoderKL`, so a state dict moves across unchanged. We build
# diffusers' model at SD 1.x's configuration with random weights, convert it with `common.convert`, and compare
# the posterior and the decoded image on a small non-square input.

# %%
import diffusers  # noqa: E402

from common.convert import from_diffusers  # noqa: E402

torch.manual_seed(0)
ref = diffusers.AutoencoderKL(**sd.to_diffusers()).eval()
ours = from_diffusers(ref).eval()
n_enc = sum(p.numel() for p in ours.encoder.parameters())
n_dec = sum(p.numel() for p in ours.decoder.parameters())
print(f"SD 1.x VAE: encoder {n_enc:,} + decoder {n_dec:,} parameters; same names and shapes as diffusers: "
      f"{ {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()} }")
side = budget(fast=(32, 48), cpu=(64, 96))
x_in = torch.rand(1, 3, *side) * 2 - 1
with torch.no_grad():
    ref_post = ref.encode(x_in).latent_dist
    our_post = ours.encode(x_in)
    z = ref_post.mean
    ref_img, our_img = ref.decode(z).sample, ours.decode(z)
for name, a, b in [("posterior mean", our_post.mean, ref_post.mean), ("posterior logvar", our_post.logvar, ref_post.logvar),
                   ("decoded image", our_img, ref_img)]:
    diff = (a - b).abs().max().item()
    print(f"{name:17s} {tuple(a.shape)}: max |ours - diffusers| = {diff:.2e} (tolerance {1e-4 * max(1, b.abs().max().item()):.1e})")
    assert diff <= 1e-4 * max(1.0, b.abs().max().item())
del ref, ours

# %% [markdown]
# ## 7. The real SD VAE, if you have it
#
# With SD 1.5's VAE on disk (a diffusers folder holding `config.json` and `diffusion_pytorch_model.safetensors`),
# the course module loads it directly and reconstructs a photograph. Nothing is downloaded here; the cell looks
# in `$SD15_PATH` (a pipeline folder or its `vae/`) and `~/models/stable-diffusion-v1-5/vae`.

# %%
from common.data import load_photo  # noqa: E402
from common.metrics import psnr  # noqa: E402

candidates = [Path(p).expanduser() for p in (os.environ.get("SD15_PATH", ""), "~/models/stable-diffusion-v1-5")
              if p]
vae_dir = next((c / sub for c in candidates for sub in ("vae", "") if (c / sub / "config.json").is_file()
                and (c / sub / "diffusion_pytorch_model.safetensors").is_file()), None)
if vae_dir is None:
    print("SD 1.5's VAE is not on disk; skipping. To run this cell, download it once (about 335 MB):\n"
          "    huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --include 'vae/*' "
          "--local-dir ~/models/stable-diffusion-v1-5\n"
          "or point $SD15_PATH at a diffusers SD 1.x folder.")
else:
    from common.viz import side_by_side

    sd_vae = AutoencoderKL.load(vae_dir).eval()
    size = budget(fast=128, cpu=256)
    photo = load_photo("chelsea").resize((size, size))
    xp = torch.from_numpy(__import__("numpy").asarray(photo, dtype="float32")).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        zp = sd_vae.encode(xp).mode()
        xr = sd_vae.decode(zp).clamp(-1, 1)
    print(f"SD VAE from {vae_dir}: {tuple(xp.shape)} -> latents {tuple(zp.shape)} -> PSNR {psnr(xr, xp):.2f} dB; "
          f"latent std {zp.std():.2f} (x scaling_factor {sd_vae.config.scaling_factor} -> {zp.std() * sd_vae.config.scaling_factor:.2f})")
    show(side_by_side({"photo": xp, "SD VAE": xr}, size=2.5))
    del sd_vae
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# ## Summary
#
# * SD's VAE is a stack of pre-activation ResNet blocks (GroupNorm, SiLU, 3x3 convs), asymmetric-pad stride-2
#   downsampling, nearest-neighbour + conv upsampling, and one self-attention block at the lowest resolution in
#   both the encoder and the decoder.
# * Its convolutions see 217 px of a 512 px image; the mid-block attention (and GroupNorm's statistics) make
#   every latent depend on the whole image.
# * GroupNorm keeps each sample independent of its batch, which suits large images and tiny batches.
# * The course module has diffusers' names and shapes, so SD's weights load unchanged and give SD's numbers
#   (max |diff| printed above).
#
# ## Exercises (`02_autoencoder_backbone/exercises.py`, graded by `python -m common.grade 02`)
#
# 1. `downsample`: the asymmetric-pad downsample, checked against diffusers' `Downsample2D`.
# 2. `ResnetBlock`: a block that loads diffusers' `ResnetBlock2D` weights and matches its output.
# 3. `receptive_field`: computed from the config, checked by backpropagation.
# 4. `count_parameters`: the encoder's and decoder's parameter counts from the config alone (SD: 34,163,592 and
#    49,490,179).
