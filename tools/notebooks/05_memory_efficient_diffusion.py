# %% [markdown]
# # 05. Memory-efficient diffusion
#
# Stable Diffusion 1.5 has about 1.07 billion parameters (UNet 860 M, VAE 84 M, CLIP text encoder 123 M):
# 4.3 GB in fp32. Running it needs more memory than that, and where the extra goes is predictable. This
# chapter predicts it, measures it, and cuts it with the standard tricks, each one switched on in the
# course's own modules and measured against diffusers' version of the same trick on the same weights:
#
# 1. the memory arithmetic of attention, predicted and measured;
# 2. attention backends: the plain math path, PyTorch's fused SDPA, sliced attention;
# 3. chunked feed-forward and gradient checkpointing;
# 4. half precision (bf16 / fp16 autocast) and why the VAE stays in fp32;
# 5. VAE tiling and batch slicing;
# 6. model CPU offload, channels_last and `torch.compile`;
# 7. the whole table (`benchmark.py`).
#
# Every measurement uses `common.memory`: time, and **peak extra memory** (the most memory a call holds
# at once above what was held just before it). On Linux the CPU figure comes from the kernel's high-water
# mark of the resident set (VmHWM), reset right before the call; on a GPU from
# `torch.cuda.max_memory_allocated`.

# %%
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from common.memory import (FP16_MAX, MiB, RSS_METHOD, attention_case, attention_matrix_bytes, autocast,
                           decode_fp32, max_activations, measure)
from common.runtime import budget, describe, seed_everything

seed_everything(0)
print(describe())
print("CPU peak memory read with:", RSS_METHOD)
import common  # noqa: E402

ROOT = Path(common.__file__).resolve().parents[1]  # the repository, wherever the notebook runs from

# %% [markdown]
# ## 1. The memory arithmetic of attention
#
# A self-attention layer on a feature map of h x w pixels treats each pixel as a token: N = h w tokens.
# The plain ("math") path computes the scores S = Q K^T / sqrt(d) and their softmax, each a
# **B x heads x N x N** matrix. At SD 1.5's first UNet level for a 512 px image the latent is 64 x 64,
# so N = 4096; with classifier-free guidance B = 2, and there are 8 heads:
#
# 2 x 8 x 4096 x 4096 x 4 bytes = 1 GiB **per matrix**, and the math path holds two at once (the scores
# while their softmax is written). Everything else in that layer (Q, K, V: 2 x 4096 x 320 floats each) is a
# few MiB. Predict first:

# %%
for side_px in (256, 512, 768, 1024):
    n = (side_px // 8) ** 2
    print(f"{side_px:5d} px: N = {n:6d} tokens, one matrix = {attention_matrix_bytes(2, 8, n, n) / 2**30:8.3f} GiB")

# %% [markdown]
# It grows with the **fourth power** of the image side: 1024 px needs 16 GiB per matrix. Now measure one
# layer's attention on the math path with the course's meter (batch 1 here to stay kind to a laptop;
# fast mode shrinks it further), and compare with 2 x the prediction:

# %%
heads, tokens = budget(fast=2, cpu=8), budget(fast=1024, cpu=4096)
m, _ = measure(attention_case(backend="math", batch=1, heads=heads, tokens=tokens, dim_head=40), warmup=1)
predicted = 2 * attention_matrix_bytes(1, heads, tokens, tokens)
print(f"math path, 1 x {heads} heads x {tokens} tokens: predicted {predicted / MiB:.1f} MiB, "
      f"measured +{m.peak_mib:.1f} MiB in {m.seconds:.2f} s")

# %% [markdown]
# ## 2. Attention backends: math, SDPA, sliced
#
# **Sliced attention** (diffusers' `enable_attention_slicing`): the softmax of a query's row of scores needs
# only that row, so compute the output `slice_size` query rows at a time; the matrices shrink to
# B x heads x slice_size x N. Written inline:

# %%
def sliced_attention(q, k, v, slice_size):
    out = torch.empty_like(q)
    for start in range(0, q.shape[-2], slice_size):
        weights = ((q[..., start:start + slice_size, :] / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)).softmax(-1)
        out[..., start:start + slice_size, :] = weights @ v  # (B, h, slice, d)
    return out


from common.attention import attention, attention_backend  # noqa: E402

q, k, v = (torch.randn(1, 2, 500, 40) for _ in range(3))
ref = attention(q, k, v, backend="math")
with attention_backend("sliced", slice_size=64):
    print("inline sliced vs common math:", float((sliced_attention(q, k, v, 64) - ref).abs().max()))
    print("common sliced vs common math:", float((attention(q, k, v) - ref).abs().max()))
print("SDPA vs math:               ", float((attention(q, k, v, backend="sdpa") - ref).abs().max()))

# %% [markdown]
# **SDPA** (`torch.nn.functional.scaled_dot_product_attention`) fuses the three steps into one kernel that
# works block by block (flash / memory-efficient attention on a GPU, a blocked kernel on the CPU): the
# N x N matrix never exists in full. Peak extra memory against the number of tokens, all three backends:

# %%
token_counts = budget(fast=[256, 512, 1024], cpu=[1024, 2048, 3072, 4096])
curves = {b: [] for b in ("math", "sliced", "sdpa")}
for n in token_counts:
    for b in curves:
        m, _ = measure(attention_case(backend=b, batch=1, heads=heads, tokens=n, dim_head=40, slice_size=256),
                       warmup=1)
        curves[b].append(m.peak_mib)
fig, ax = plt.subplots(figsize=(5, 3), dpi=75)
for b, ys in curves.items():
    ax.plot(token_counts, ys, "o-", label=b)
ax.plot(token_counts, [2 * attention_matrix_bytes(1, heads, n, n) / MiB for n in token_counts], "k:",
        label="2 x B h N^2 x 4 B")
ax.set(xlabel="tokens N", ylabel="peak extra MiB", title=f"one attention call, {heads} heads")
ax.legend()
plt.show()
print({b: [f"{y:.0f}" for y in ys] for b, ys in curves.items()})

# %% [markdown]
# *Figure: peak extra memory of one attention call against the number of tokens. The math path follows
# the N^2 prediction; sliced attention (256 query rows) grows linearly; SDPA stays near the size of its
# output.*
#
# ## 3. Chunked feed-forward and gradient checkpointing
#
# The transformer block's feed-forward widens each token to 4 x 2 x D (the GEGLU's two halves):
# at level 0 of SD that is 2 x 4096 x 2560 floats = 80 MiB per block. `set_chunk_feed_forward` runs it
# over chunks of tokens: every token is processed alone, so the result is the same.
#
# Training stores every activation for the backward pass. **Gradient checkpointing** (Chen et al. 2016)
# stores only each block's input and recomputes the block during backward: activation memory drops to
# about one block's, for roughly one extra forward pass of compute.

# %%
from common.attention import set_chunk_feed_forward  # noqa: E402
from common.unet import UNet, UNetConfig  # noqa: E402

torch.manual_seed(0)
unet = UNet(UNetConfig.tiny()).eval()
z, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32), torch.tensor([10, 10])
with torch.no_grad():
    ref = unet(z, t, ctx)
    set_chunk_feed_forward(unet, 64, dim=1)
    print("chunked FF vs plain:", float((unet(z, t, ctx) - ref).abs().max()))
    set_chunk_feed_forward(unet, None)

cfg = budget(fast=UNetConfig.tiny(), cpu=UNetConfig.shapes_text())
batch = budget(fast=8, cpu=32)
torch.manual_seed(0)
model = UNet(cfg).train()
z = torch.randn(batch, 4, 16, 16)
ctx = torch.randn(batch, 16, cfg.cross_attention_dim)
t = torch.randint(0, 1000, (batch,))


def train_step():
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    loss = (model(z, t, ctx) - z).square().mean()
    loss.backward()
    return loss.detach()


train_step()  # allocates the gradients, so the peaks below are activations
plain, _ = measure(train_step, warmup=1)
model.enable_gradient_checkpointing()
ckpt, _ = measure(train_step, warmup=1)
model.disable_gradient_checkpointing()
print(f"training step, batch {batch}: plain +{plain.peak_mib:.1f} MiB in {plain.seconds:.2f} s; "
      f"checkpointing +{ckpt.peak_mib:.1f} MiB in {ckpt.seconds:.2f} s "
      f"({1 - ckpt.peak_bytes / plain.peak_bytes:.0%} less memory, {ckpt.seconds / plain.seconds - 1:+.0%} time)")

# %% [markdown]
# ## 4. Half precision, and why the VAE decodes in fp32
#
# Autocast runs matmuls and convolutions in 16 bits (half the bytes of weights read and activations
# written), keeping reductions and norms in fp32. **bf16** keeps fp32's exponent (max ~3.4e38) with an
# 8-bit mantissa; **fp16** has an 11-bit mantissa but overflows above 65,504. The UNet is fine in either;
# the VAE decoder's up blocks produce large activations in SD's weights, beyond fp16's range in places, so
# pipelines decode in fp32 (diffusers' SD VAE config says `force_upcast: true`): `decode_fp32(vae, z)`.
# Measure the largest activation of each decoder stage with forward hooks:

# %%
from common.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402

torch.manual_seed(0)
vae_cfg = budget(fast=AutoencoderConfig.tiny(), cpu=AutoencoderConfig.course())
vae = AutoencoderKL(vae_cfg).eval()
sd_vae = os.environ.get("SD15_VAE")  # a local diffusers vae/ folder with SD 1.5's weights, if you have one
if sd_vae and Path(sd_vae).is_dir():
    vae = AutoencoderKL.load(sd_vae).eval()
    print("using SD 1.5's VAE from", sd_vae)
z = torch.randn(1, 4, 16, 16)
peaks = max_activations(vae.decoder, lambda: vae.decode(z), kinds=(type(vae.decoder.up_blocks[0]),))
for name, value in peaks.items():
    print(f"decoder.{name:<12} max |activation| = {value:10.1f}  ({value / FP16_MAX:.2%} of fp16's max)")
with torch.no_grad(), autocast("cpu", "bf16"):
    img_bf16 = vae.decode(z)
    img_fp32 = decode_fp32(vae, z)
print(f"bf16 decode vs fp32 decode: max abs diff {float((img_bf16.float() - img_fp32).abs().max()):.3f}")

# %% [markdown]
# With the random weights used here (no SD weights ship with the course) the activations stay far below
# 65,504, so this cell cannot show the overflow itself; set `SD15_VAE` to a local copy of SD 1.5's `vae/`
# folder to measure the real decoder. The cell shows how to look, and `decode_fp32` is the fix either way.
#
# ## 5. VAE tiling and batch slicing
#
# The decoder's last level holds 128 channels at full resolution: 128 x 1024 x 1024 floats = 512 MiB per
# feature map at 1024 px. **Tiled decoding** decodes overlapping tiles of the latent one at a time and
# cross-fades them with linear ramps across the overlaps. A ramp rises as its neighbour's falls, so the
# weights sum to 1 everywhere:

# %%
from common.tiling import ramp, sliced_decode, tile_spans, tiled_decode  # noqa: E402

print("spans of a 128-latent side, tile 64, overlap 16:", tile_spans(128, 64, 16))
print("ramp of a middle tile (length 12, overlaps 4 and 4):", [round(x, 3) for x in ramp(12, 4, 4).tolist()])

# %% [markdown]
# Tiling is not exact: GroupNorm statistics and the mid-block's attention see one tile, not the whole
# latent. Peak extra memory and the difference from the untiled decode, against the image size:

# %%
f = vae.downsample_factor
tile = budget(fast=8, cpu=16)
sides = budget(fast=[8, 16, 32], cpu=[16, 32, 64, 96])
untiled_mib, tiled_mib, diffs = [], [], []


@torch.no_grad()
def decode(z, tiled):
    return tiled_decode(vae, z, tile=tile, overlap=tile // 4) if tiled else vae.decode(z)


for side in sides:
    z = torch.randn(1, 4, side, side)
    a, x_full = measure(lambda: decode(z, tiled=False), warmup=1)
    b, x_tiled = measure(lambda: decode(z, tiled=True), warmup=1)
    untiled_mib.append(a.peak_mib)
    tiled_mib.append(b.peak_mib)
    diffs.append(float((x_full - x_tiled).abs().max()))
fig, ax = plt.subplots(figsize=(5, 3), dpi=75)
ax.plot([s * f for s in sides], untiled_mib, "o-", label="untiled")
ax.plot([s * f for s in sides], tiled_mib, "o-", label=f"tiled ({tile} latents, overlap {tile // 4})")
ax.set(xlabel="image side (px)", ylabel="peak extra MiB", title="VAE decode")
ax.legend()
plt.show()
print("max abs diff tiled vs untiled:", [f"{d:.3f}" for d in diffs], "(images in [-1, 1])")
z = torch.randn(4, 4, tile, tile)
with torch.no_grad():
    print("batch slicing (one image at a time) vs whole batch:", float((sliced_decode(vae, z) - vae.decode(z)).abs().max()))

# %% [markdown]
# *Figure: the untiled decode grows with the image area; the tiled one stays at about one tile's.*
#
# diffusers' `enable_tiling()` tiles only latents larger than `sample_size / f` (64 for SD), so at 512 px
# (64 x 64 latents) it does nothing; compare tiled decoding at 1024 px. Batch slicing is exact.
#
# ## 6. Model CPU offload, channels_last, torch.compile
#
# **Offload** keeps the weights in CPU memory and moves each block to the GPU only while it runs (a hook
# before and after each block). On a CPU-only machine there is nothing to offload to; the hooks themselves
# can still be watched:

# %%
from common.memory import to_channels_last  # noqa: E402
from common.offload import enable_model_cpu_offload, offload_for_test  # noqa: E402

print(enable_model_cpu_offload(unet, "cpu"))
hooks = offload_for_test(unet)
z, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32), torch.tensor([10, 10])
with torch.no_grad():
    out = unet(z, t, ctx)
print("moves:", hooks.log[:6], "...", f"({len(hooks.log)} in all)")
hooks.remove()
with torch.no_grad():
    to_channels_last(unet)
    print("channels_last vs default:", float((unet(z.to(memory_format=torch.channels_last), t, ctx) - out).abs().max()))

# %% [markdown]
# `channels_last` stores activations as (B, H, W, C), which many convolution kernels prefer; the values do
# not change. `torch.compile` fuses operations into generated kernels: faster calls after a first call
# that compiles (minutes on a CPU), so the benchmark keeps it behind `--compile`.
#
# ## 7. The table
#
# `benchmark.py` measures every trick at SD 1.5's sizes, each side in a fresh process, against diffusers
# with the same weights. The `--quick` version runs the same rows at toy sizes in seconds (the main rows
# here, three of them in fast mode):

# %%
out_dir = ROOT / "runs" / "bench05_notebook"
rows = budget(fast=["unet_math", "unet_sdpa", "unet_sliced"],
              cpu=["unet_math", "unet_sdpa", "unet_sliced", "unet_chunked_ff", "vae_decode_large",
                   "vae_decode_large_tiled", "vae_decode_batch", "vae_decode_batch_sliced", "train",
                   "train_checkpointing"])
cmd = [sys.executable, str(ROOT / "05_memory_efficient_diffusion" / "benchmark.py"), "--quick", "--out", str(out_dir),
       "--repeats", "1", "--rows", *rows]
t0 = time.perf_counter()
subprocess.run(cmd, check=True, capture_output=True, text=True)
print(f"benchmark --quick: {time.perf_counter() - t0:.0f} s")
print((out_dir / "table.md").read_text())

# %% [markdown]
# The full CPU table, measured once with `nice -n 5 python 05_memory_efficient_diffusion/benchmark.py
# --out 05_memory_efficient_diffusion/results_cpu` (SD 1.5 sizes, random weights; it takes about an hour),
# is in the chapter README with the targets it meets and misses. Read from its file:

# %%
full = ROOT / "05_memory_efficient_diffusion" / "results_cpu" / "table.md"
print(full.read_text() if full.exists() else "not measured yet: run the command above")

# %% [markdown]
# ## Summary
#
# - Attention on the math path holds two B x heads x N x N matrices: N = (side / 8)^2 tokens, so its memory
#   grows with the fourth power of the image side. Sliced attention caps it at slice_size x N per head pair;
#   SDPA never builds it.
# - Chunked feed-forward trims a smaller peak; gradient checkpointing trades one extra forward for most of
#   the activation memory of training.
# - bf16 autocast halves activation bytes with fp32's range; fp16 needs the VAE decode kept in fp32.
# - Tiled VAE decoding bounds the decoder's memory by one tile's, at the price of a small, stated
#   difference; batch slicing is exact.
# - Offload trades PCIe copies for GPU memory; channels_last and compile trade nothing but a first call.
#
# ## Exercises
#
# `05_memory_efficient_diffusion/exercises.py`, graded with `python -m common.grade 05`:
#
# 1. `sliced_attention`: attention a slice of queries at a time, equal to full attention.
# 2. `attention_memory_bytes`: predict one layer's attention memory at a resolution (graded against the
#    formula and a measurement).
# 3. `blend_tiles`: the overlap blending of tiled decoding, graded by its seam error against untiled.
# 4. `largest_side`: the largest image whose attention fits a memory budget (open-ended).
