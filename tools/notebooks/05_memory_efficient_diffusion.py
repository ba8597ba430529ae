# %% [markdown]
# # 05. Memory-efficient diffusion
#
# Stable Diffusion 1.5 has about 1.07 billion parameters (UNet 860 M, VAE 84 M, CLIP text encoder 123 M):
# 4.3 GB in fp32. Running it needs more memory than that, and where the extra goes is predictable. The
# question of this chapter: **where do the bytes of a diffusion step go, and what does each trick that cuts
# them cost?** Every section predicts a number from the shapes first, then measures it with the course's
# meter, then switches the trick on in the course's own modules:
#
# 1. the memory arithmetic of attention, predicted and measured;
# 2. attention backends: the plain math path, sliced attention, and the blocked (online-softmax) attention
#    that PyTorch's fused SDPA uses, built inline;
# 3. chunked feed-forward and gradient checkpointing (what is kept, what is recomputed, what it costs);
# 4. half precision: fp16's overflow made to happen, in attention logits and in a VAE decode, and the fixes;
# 5. VAE tiling and batch slicing;
# 6. model CPU offload, channels_last and `torch.compile`;
# 7. the whole table (`benchmark.py`), every row explained;
# 8. one whole image, end to end: the course's pipeline against diffusers', and where its time goes.
#
# Every measurement uses `common.memory.measure`: time, and **peak extra memory** (the most memory a call
# holds at once above what was held just before it). On Linux the CPU figure comes from the kernel's
# high-water mark of the resident set (VmHWM), reset right before the call; on a GPU from
# `torch.cuda.max_memory_allocated`.
#
# The notebook runs PyTorch on **one thread**. The models here are small, and on small operations the
# threads spend more time waiting for each other than computing; one thread also makes the times of two
# calls comparable with each other, which is what the ratios below need.

# %%
import json
import math
import os
import subprocess
import sys
import time

import matplotlib.pyplot as plt
import torch

from common.memory import (
    FP16_MAX,
    RSS_METHOD,
    MiB,
    attention_case,
    attention_matrix_bytes,
    autocast,
    decode_fp32,
    max_activations,
    measure,
)
from common.runtime import budget, setup_notebook
from common.viz import show

torch.set_num_threads(1)  # small ops: one thread is faster than two that wait for each other
ROOT = setup_notebook()  # seed 0, small inline figures; prints the device
print("CPU peak memory read with:", RSS_METHOD)

# %% [markdown]
# ## 1. The memory arithmetic of attention
#
# A self-attention layer on a feature map of h x w pixels treats each pixel as a token: N = h w tokens.
# The plain ("math") path computes the scores S = Q K^T / sqrt(d) and their softmax P, each a
# **B x heads x N x N** matrix of 4-byte floats. At SD 1.5's first UNet level for a 512 px image the
# latent is 64 x 64 (the VAE divides each side by f = 8), so N = 4096; with classifier-free guidance the
# batch is B = 2 (one conditional, one unconditional copy), and there are 8 heads:
#
#     bytes of one matrix = B x heads x N^2 x 4
#                         = 2 x 8 x 4096^2 x 4 = 2^31 bytes = 1 GiB
#
# Everything else in that layer (Q, K, V, the output: 2 x 4096 x 320 floats each) is 10 MiB apiece.
# Predict first, for four image sides:

# %%
print(f"{'image side':>10} {'N = (side/8)^2':>15} {'one N x N matrix (B=2, 8 heads)':>33}")
for side_px in (256, 512, 768, 1024):
    n = (side_px // 8) ** 2
    print(f"{side_px:7d} px {n:15,d} {attention_matrix_bytes(2, 8, n, n) / 2**30:29.3f} GiB")

# %% [markdown]
# Read the rows top to bottom: each step of 256 px adds to the side, and N = (side / 8)^2 grows with the
# square of the side, so the matrix (N^2 entries) grows with its **fourth power**. Doubling the side
# (256 -> 512, 512 -> 1024) multiplies N by 4 and the matrix by 16: 64 MiB, 1 GiB, 16 GiB. 768 px is
# 3^4 = 81 times 256 px's 64 MiB: 5.06 GiB.
#
# Now measure one call on the math path (batch 1 to stay kind to a laptop; fast mode shrinks it). Look at
# the course's `attention_math`: `scores = (q * scale) @ k^T`, then `weights = scores.softmax(-1)`, then
# `weights @ v`. The variable `scores` is still alive when the softmax writes `weights` and when `weights @
# v` writes the output, so the prediction is **two N x N matrices plus the output** (B x heads x N x d):

# %%
heads, tokens, dim_head = budget(fast=2, cpu=8), budget(fast=1024, cpu=4096), 40
math_call = attention_case(backend="math", batch=1, heads=heads, tokens=tokens, dim_head=dim_head)
m, _ = measure(math_call, warmup=1)
predicted = 2 * attention_matrix_bytes(1, heads, tokens, tokens) + heads * tokens * dim_head * 4
print(
    f"math path, 1 x {heads} heads x {tokens} tokens: predicted {predicted / MiB:.1f} MiB "
    f"(2 x {attention_matrix_bytes(1, heads, tokens, tokens) / MiB:.0f} + output "
    f"{heads * tokens * dim_head * 4 / MiB:.1f}), measured +{m.peak_mib:.1f} MiB in {m.seconds:.2f} s"
)

# %% [markdown]
# The meter agrees with the shapes to within a MiB or so: at this size nothing but the two matrices matters.
#
# ## 2. Attention backends: sliced, blocked (SDPA), math
#
# **Sliced attention** (diffusers' `enable_attention_slicing`): the softmax of a query's row of scores needs
# only that row, so compute the output `slice_size` query rows at a time; the two matrices shrink to
# B x heads x slice_size x N. Written inline and checked against the course's version:


# %%
def sliced_attention(q, k, v, slice_size):
    out = torch.empty_like(q)  # (B, h, N, d)
    for start in range(0, q.shape[-2], slice_size):
        q_slice = q[..., start : start + slice_size, :] / math.sqrt(q.shape[-1])  # (B, h, slice, d)
        weights = (q_slice @ k.transpose(-1, -2)).softmax(-1)  # (B, h, slice, N)
        out[..., start : start + slice_size, :] = weights @ v  # (B, h, slice, d)
    return out


from common.attention import attention, attention_backend  # noqa: E402

q, k, v = (torch.randn(1, 2, 500, 40) for _ in range(3))
ref = attention(q, k, v, backend="math")
with attention_backend("sliced", slice_size=64):
    print("inline sliced vs common math:", float((sliced_attention(q, k, v, 64) - ref).abs().max()))
    print("common sliced vs common math:", float((attention(q, k, v) - ref).abs().max()))

# %% [markdown]
# Slicing over queries still holds a slice x N block of scores. **Blocked attention** slices the keys too,
# and then no row of the softmax is ever complete in memory: the softmax has to be computed as the blocks
# go by. This is what flash attention (Dao et al. 2022) and PyTorch's fused
# `scaled_dot_product_attention` (SDPA) do. The trick is the *online softmax*. For one query with scores
# s_1 ... s_N, keep three running quantities over the keys seen so far: the largest score m, the
# denominator l = sum_j exp(s_j - m), and the numerator o = sum_j exp(s_j - m) v_j. A new block of keys
# with scores s_B arrives:
#
#     m' = max(m, max_j s_B,j)                          # the new largest score
#     exp(s_j - m') = exp(s_j - m) exp(m - m')          # re-basing an old term on the new maximum
#     l' = l exp(m - m') + sum_{j in B} exp(s_j - m')   # so every old term is rescaled by the same factor
#     o' = o exp(m - m') + sum_{j in B} exp(s_j - m') v_j
#
# and after the last block, softmax(s) V = o / l, because both sums are now over all keys with the same
# m. Subtracting the maximum keeps exp() from overflowing; it changes nothing else since softmax is
# shift-invariant. Memory per query: m, l (two numbers) and o (d numbers), plus one block of scores:
# **O(N (d + block))** for all queries, not O(N^2). The code, with the same symbols:


# %%
def blocked_attention(q, k, v, block):
    B, h, N, d = q.shape
    m = torch.full((B, h, N, 1), -math.inf)  # running max of each query's scores
    l = torch.zeros(B, h, N, 1)  # running sum of exp(s - m)
    o = torch.zeros(B, h, N, d)  # running sum of exp(s - m) v
    for start in range(0, k.shape[-2], block):
        s = (q / math.sqrt(d)) @ k[..., start : start + block, :].transpose(-1, -2)  # (B, h, N, block)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = (s - m_new).exp()  # (B, h, N, block)
        rescale = (m - m_new).exp()  # exp(m - m'): re-bases the old sums
        l = l * rescale + p.sum(-1, keepdim=True)
        o = o * rescale + p @ v[..., start : start + block, :]  # (B, h, N, d)
        m = m_new
    return o / l


blocked_error = float((blocked_attention(q, k, v, 128) - ref).abs().max())
assert blocked_error < 1e-5, blocked_error
print("inline blocked vs common math:", blocked_error)
print("torch SDPA vs common math:    ", float((attention(q, k, v, backend="sdpa") - ref).abs().max()))

# %% [markdown]
# The three give the same output up to float rounding. Now the memory, predicted per backend for one call
# of `heads` heads at batch 1 (4-byte floats, d = 40, slice 256 query rows):
#
# | backend | what is alive at the peak | predicted bytes |
# |---|---|---|
# | math | scores and weights, both N x N, and the output | 2 x heads x N^2 x 4 + heads x N x d x 4 |
# | sliced | scores and weights of one slice, and the output | 2 x heads x 256 x N x 4 + heads x N x d x 4 |
# | SDPA | the output and the kernel's small per-block buffers | heads x N x d x 4 + a little |
#
# Measured against the number of tokens, with the prediction drawn beside each curve:

# %%
token_counts = budget(fast=[256, 512, 1024], cpu=[1024, 2048, 3072, 4096])
slice_size = 256
out_bytes = [heads * n * dim_head * 4 for n in token_counts]
predicted = {  # bytes alive at the peak, from the table above
    "math": [2 * attention_matrix_bytes(1, heads, n, n) + o for n, o in zip(token_counts, out_bytes)],
    "sliced": [
        2 * attention_matrix_bytes(1, heads, slice_size, n) + o for n, o in zip(token_counts, out_bytes)
    ],
    "sdpa": out_bytes,
}
measured = {b: [] for b in predicted}
seconds = {b: [] for b in predicted}
for n in token_counts:
    for b in measured:
        call = attention_case(
            backend=b, batch=1, heads=heads, tokens=n, dim_head=dim_head, slice_size=slice_size
        )
        m, _ = measure(call, warmup=1)
        measured[b].append(m.peak_mib)
        seconds[b].append(m.seconds)

fig, ax = plt.subplots(figsize=(5.5, 3.4))
for b, color in zip(measured, ("C0", "C1", "C2")):
    ax.plot(token_counts, measured[b], "o-", color=color, label=f"{b}, measured")
    ax.plot(token_counts, [p / MiB for p in predicted[b]], ":", color=color, label=f"{b}, predicted")
ax.set_yscale("log")
ax.set(
    xlabel="tokens N",
    ylabel="peak extra MiB (log)",
    title=f"one attention call, {heads} heads, d = {dim_head}",
)
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no curve hidden
show(fig)
plt.close(fig)
print(
    f"{'tokens':>7} | {'math MiB pred/meas':>19} | {'sliced MiB pred/meas':>21} | "
    f"{'SDPA MiB pred/meas':>19} | {'seconds math / sliced / SDPA':>29}"
)
for i, n in enumerate(token_counts):
    cols = [f"{predicted[b][i] / MiB:8.1f} / {measured[b][i]:6.1f}" for b in measured]
    print(
        f"{n:7d} | {cols[0]:>19} | {cols[1]:>21} | {cols[2]:>19} | "
        f"{seconds['math'][i]:8.2f} / {seconds['sliced'][i]:6.2f} / {seconds['sdpa'][i]:6.2f}"
    )

# %% [markdown]
# *Figure: peak extra memory of one attention call against the number of tokens (log scale), measured
# (solid) and predicted from the shapes (dotted). Math follows N^2, sliced and SDPA follow N.*
#
# What each row of the table says:
#
# - **math**: doubling N (1024 -> 2048 tokens) multiplies the peak by 4, as N^2 says; the measured column
#   sits on the prediction, because the two N x N matrices are all there is.
# - **sliced**: the two matrices are 256 x N per head, so the peak grows linearly, 16 KiB per token with
#   8 heads, plus the output. At N = 256 x k the saving over math is a factor of about N / 256 (16 at 4096
#   tokens). The slice size is a dial: 1 row would be smallest, and slowest, since each slice is one more
#   pair of small matrix products.
# - **SDPA**: only the output and a few blocks per thread: the peak is the output's size, O(N), the
#   derivation above. Nothing quadratic is ever written to memory.
# - **seconds**: all three do the same arithmetic (2 N^2 d multiply-adds per head: N^2 d for Q K^T, N^2 d
#   for P V). Math is slow because it writes an N x N matrix to memory, reads it back for the softmax,
#   writes the weights, and reads them again for `@ v`: at these sizes moving the bytes costs as much as the
#   arithmetic. Sliced moves the same bytes in slices that are still far larger than the CPU's caches
#   (8 heads x 256 x 4,096 floats = 32 MiB at 4,096 tokens), so it takes as long as math, or a little
#   longer for its loop: it saves memory, not time. SDPA writes none of them and is several times faster.
#
# ## 3. Chunked feed-forward and gradient checkpointing
#
# The transformer block's feed-forward widens each token from D to 4 D, twice over in SD's GEGLU (a value
# half and a gate half): at level 0 of SD (D = 320, N = 4096, B = 2) that is 2 x 4096 x 2560 floats =
# 80 MiB per block. Every token goes through the feed-forward alone, so running it over chunks of tokens
# (`set_chunk_feed_forward`) gives the same result with one chunk's hidden state alive instead of all:

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

# %% [markdown]
# **Gradient checkpointing** (Chen et al. 2016). Training keeps, for the backward pass, every tensor that
# some operation's gradient needs (the input of each convolution and linear layer, each norm's statistics,
# each attention's weights...). Checkpointing keeps only the *input* of each block, throws the rest away,
# and during backward runs the block's forward once more to get them back, just before its gradient is
# computed. For a UNet of blocks b1 ... b4:
#
# | | forward pass keeps | backward of block b_i | alive at once |
# |---|---|---|---|
# | plain | every intermediate of b1 ... b4 | uses b_i's stored intermediates | all four blocks' |
# | checkpointing | inputs x1 ... x4 only | reruns b_i from x_i, then its backward | x1..x4 + one block's |
#
#     plain:          forward b1 b2 b3 b4 | backward b4' b3' b2' b1'
#     checkpointing:  forward b1 b2 b3 b4 | b4 b4'  b3 b3'  b2 b2'  b1 b1'     (b_i: recomputed forward)
#
# **Predict the cost.** A backward pass costs about twice a forward (for each weight matrix, one product
# for the gradient of the input and one for the gradient of the weight, against one product forward), so
# a step is about F + 2F = 3F. Checkpointing adds one more forward of the checkpointed blocks: about
# 4F / 3F = **+33%** when arithmetic sets the pace (more where the recomputation is dearer than its
# arithmetic, e.g. a GPU bound by kernel launches; less where the layers outside the blocks, which are
# not recomputed, weigh more). **Predict the memory**: the bytes autograd
# saves, counted with a hook on every tensor it saves (`torch.autograd.graph.saved_tensors_hooks`).

# %%
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


def saved_mib():
    """MiB of the distinct tensors autograd saves for backward in one forward (outside checkpointed code)."""
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = (model(z, t, ctx) - z).square().mean()
    del loss
    return sum(storages.values()) / MiB


def forward_only():
    with torch.no_grad():
        return model(z, t, ctx)


train_step()  # allocates the gradients, so the peaks below are activations
plain_saved = saved_mib()
model.enable_gradient_checkpointing()
ckpt_saved = saved_mib()
# The three calls in turn, several rounds; each one's fastest round is its time (other programs on the CPU
# only ever add time), its largest peak its memory.
calls = {"forward": forward_only, "plain": train_step, "checkpointing": train_step}
rounds = {name: [] for name in calls}
for _ in range(budget(fast=2, cpu=5)):
    for name, fn in calls.items():
        model.enable_gradient_checkpointing(name == "checkpointing")
        m, _ = measure(fn, warmup=int(not rounds[name]))  # one warm-up call in the first round
        rounds[name].append(m)
model.disable_gradient_checkpointing()
seconds = {name: min(m.seconds for m in ms) for name, ms in rounds.items()}
peak = {name: max(m.peak_bytes for m in ms) / MiB for name, ms in rounds.items()}
F = seconds["forward"]
print(f"training step, batch {batch} (fastest of {len(rounds['plain'])} rounds):")
print(f"  forward alone              {F:6.2f} s")
for name, saved in (("plain", plain_saved), ("checkpointing", ckpt_saved)):
    print(
        f"  {name + ' step':<26} {seconds[name]:6.2f} s = {seconds[name] / F:.1f} forwards"
        f"   saved for backward {saved:6.1f} MiB, peak extra +{peak[name]:6.1f} MiB"
    )
print(
    f"  checkpointing: {seconds['checkpointing'] / seconds['plain'] - 1:+.0%} time, the extra is "
    f"{(seconds['checkpointing'] - seconds['plain']) / F:.1f} forwards (predicted: about 1); "
    f"{1 - peak['checkpointing'] / peak['plain']:.0%} less peak memory"
)

# %% [markdown]
# What the rows say. **Time**: the "forwards" column counts each step in units of one forward pass
# (measured without autograd). The plain step costs two to three: 1 + 2 counts only the matrix
# products, and a small model's step is not all matrix products (its norms, activations and additions
# do not follow the 2 x rule), while a forward that records the graph for autograd costs a little more
# than one without. The checkpointed step costs about one forward more, the recomputation: the last
# line gives the extra in forwards, to compare with 1 (or a little more: the recomputed forward records
# the graph that the block's backward then uses). As a ratio of the whole step that is +33% when the
# backward costs two forwards, and more when it costs less. Where the non-checkpointed layers (the first
# and last convolutions, the down- and upsamplers, the time embedding, each spatial transformer's norm and
# projections, the mid block's first ResNet: diffusers' choice of regions, which the course copies) weigh
# more, it is less. On a GPU
# bound by kernel launches the recomputation replays the launches too and can cost more than its
# arithmetic. The times are the fastest of several rounds, because a short step is a noisy clock when
# other programs share the CPU; read the extra to the nearest half forward.
# **Memory**: the "saved for backward" column is the hook's count. Plain, it is nearly the whole peak:
# the activations are the memory of training. With checkpointing the hook sees only what is saved outside
# the checkpointed blocks, a small fraction; the peak adds the block inputs the checkpoints keep, one
# block's intermediates rebuilt during its backward, and the gradients flowing back.
#
# ## 4. Half precision, and where it breaks
#
# Autocast runs matmuls and convolutions in 16 bits (half the bytes of weights read and activations
# written), keeping reductions and norms in fp32. The three formats, from `torch.finfo`:

# %%
print(
    f"{'format':>9} {'bits (exp, mantissa)':>21} {'largest finite':>15} {'spacing at 1':>13} "
    f"{'spacing at 10,000':>18}"
)
for dtype, bits in ((torch.float32, "8, 23"), (torch.bfloat16, "8, 7"), (torch.float16, "5, 10")):
    info = torch.finfo(dtype)
    x = torch.tensor(10000.0, dtype=dtype)
    at_1e4 = float(x.nextafter(torch.tensor(math.inf, dtype=dtype)) - x)  # the next value up, minus 10,000
    print(f"{str(dtype).split('.')[1]:>9} {bits:>21} {info.max:15.4g} {info.eps:13.3g} {at_1e4:18.4g}")

# %% [markdown]
# Row by row: **float32** has range and precision to spare. **bfloat16** keeps float32's 8 exponent bits,
# so its range is the same (3.4e38), but with 7 mantissa bits neighbouring values near 10,000 are 64
# apart. **float16** is finer (10 mantissa bits: 8 apart near 10,000) but with 5 exponent bits its
# largest value is 65,504: anything larger becomes `inf`, and `inf - inf` or `0 x inf` is `NaN`, which
# then spreads through every sum it enters.
#
# **Attention logits in fp16.** Trained networks often grow a few channels that are large in every token
# (a constant offset the next layer's norm removes). If q and k both carry a channel of 300, every logit
# gains 300 x 300 = 90,000 before the 1 / sqrt(d) scaling: above 65,504. Softmax does not care about an
# offset shared by a whole row (it cancels in the ratio), so the exact answer is unchanged. Three ways to
# compute the logits, in three formats, against the float32 answer:

# %%
torch.manual_seed(0)
d, n = 40, 64
q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))  # (B, h, N, d)
q[..., 0], k[..., 0] = 300.0, 300.0  # one large channel in every token: +90,000 on every logit


def logits(q, k, how):
    if how == "product, then scale":
        return (q @ k.transpose(-1, -2)) / math.sqrt(d)
    if how == "scale, then product":
        return (q / math.sqrt(d)) @ k.transpose(-1, -2)
    return (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d)  # "in float32": upcast


ref = logits(q, k, "in float32").softmax(-1) @ v
print(f"{'format':>9} {'logits computed':>20} {'inf logits':>11} {'NaN outputs':>12} {'max |error|':>12}")
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for how in ("product, then scale", "scale, then product", "in float32"):
        s = logits(q.to(dtype), k.to(dtype), how)  # (1, 1, N, N)
        out = s.softmax(-1).to(dtype) @ v.to(dtype)  # (1, 1, N, d)
        error = (out.float() - ref).abs().max()
        print(
            f"{str(dtype).split('.')[1]:>9} {how:>20} {int(s.isinf().sum()):11d} "
            f"{int(out.isnan().sum()):12d} {float(error):12.4f}"
        )

# %% [markdown]
# Row by row:
#
# - **float32**: all three agree (the error is rounding).
# - **float16, product then scale**: every q . k is about 90,000: all 4,096 logits are `inf`. Softmax
#   subtracts the row's maximum, inf - inf = NaN, and every output is NaN. This is the overflow.
# - **float16, scale then product**: dividing q by sqrt(40) first keeps the logits near 14,200, inside
#   the range, so there is no NaN, but near 14,000 fp16 values are 8 apart, while the part of the logits
#   that differs between keys is a few units: rounding wipes it out, and the attention weights, hence the
#   output, are wrong by a large margin (error of order 1 on outputs of order 1).
# - **bfloat16**: never overflows, but is 64 apart near 14,000: the same loss of the small differences,
#   whichever order.
# - **in float32** (q and k upcast for the product and the softmax, the output cast back): correct in every
#   format, up to the rounding of the inputs and the output. This is SD's fix: diffusers'
#   `Attention(upcast_attention=True, upcast_softmax=True)` computes the logits and softmax in float32
#   (SD 2.1's UNet config sets `upcast_attention` for this reason); the products around it stay in 16 bits.
#
# Without the upcast, diffusers computes the logits with one fp16 `baddbmm(..., alpha=1/sqrt(d))`, which
# scales before it rounds: like "scale, then product", no inf at these sizes but the same loss of
# precision, and NaN once the *scaled* logits pass 65,504 (`tests/test_half_precision.py` checks both
# against diffusers' `Attention`).
#
# **The VAE decoder in fp16.** The decoder's residual stream can carry large values while its GroupNorms
# keep every block's *input* normalised. SDXL's VAE is the well-known case: its decoder's activations
# exceed fp16's range, and an fp16 decode comes out NaN (a black image). This is why diffusers'
# `AutoencoderKL` has a `force_upcast` option, on by default, that decodes in fp32. The course ships no
# SD weights, and a randomly initialised decoder's activations are small (single digits). So we make the
# stream large on purpose: multiply the decoder's first convolution (weights and bias) by a factor s. Every
# block of the decoder adds its output to the stream it receives (x + f(norm(x))), and the GroupNorm in
# front of each block divides the scale out of its *input*, so the blocks still work; but the stream itself
# is s times larger. (The image changes too, since each block's addition is now small against the stream:
# each decode below is compared with the float32 decode of the same scaled VAE.) The largest activation of
# each decoder stage, measured with forward hooks, at s = 1 and at s = 50,000:

# %%
import copy  # noqa: E402

from common.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402

torch.manual_seed(0)
vae = AutoencoderKL(budget(fast=AutoencoderConfig.tiny(), cpu=AutoencoderConfig.course())).eval()
z = torch.randn(1, 4, 16, 16)
stages = (type(vae.decoder.mid_block), type(vae.decoder.up_blocks[0]))


def scaled_vae(s):
    """A copy of the VAE whose decoder stream is s times larger (conv_in's weight and bias times s)."""
    big = copy.deepcopy(vae)
    with torch.no_grad():
        big.decoder.conv_in.weight.mul_(s)
        big.decoder.conv_in.bias.mul_(s)
    return big


peaks = {}
for s in (1, 50_000):
    big = scaled_vae(s)
    # {stage: max |output|}; max_activations calls the lambda at once, on this s's model
    peaks[s] = max_activations(big.decoder, lambda: big.decode(z), kinds=stages)  # noqa: B023
names = list(peaks[1])
fig, ax = plt.subplots(figsize=(5.5, 3.2))
width = 0.38
for i, (s, color) in enumerate(zip(peaks, ("C0", "C3"))):
    ax.bar(
        [j + (i - 0.5) * width for j in range(len(names))],
        [peaks[s][nm] for nm in names],
        width,
        color=color,
        label=f"conv_in x {s:,}",
    )
ax.axhline(FP16_MAX, color="k", ls="--", lw=1)
ax.text(2.5, FP16_MAX * 1.6, "fp16 max 65,504", ha="center", fontsize=8)
ax.set_yscale("log")
ax.set_ylim(1, 1e6)
ax.set_xticks(range(len(names)), names, fontsize=8)
ax.set(ylabel="max |activation| (log)", title="largest activation per decoder stage (fp32 run)")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
show(fig)
plt.close(fig)
for s in peaks:
    print(f"conv_in x {s:>6,}: " + ", ".join(f"{nm} {peaks[s][nm]:,.3g}" for nm in names))

# %% [markdown]
# *Figure: the largest |activation| out of each decoder stage, at s = 1 (blue) and s = 50,000 (red),
# against fp16's largest value (dashed). At s = 50,000 the mid block's output crosses the line.*
#
# Now decode each scaled VAE three ways: the whole VAE cast to float16, the whole VAE cast to bfloat16, and
# the pipeline's way, `decode_fp32` (the VAE kept in float32 while the rest runs under autocast), which is
# the reference. A middle scale, s = 10,000, keeps every activation below 65,504:

# %%
print(
    f"{'conv_in x':>10} | {'fp16: non-finite pixels':>23} | {'fp16: max |error|':>17} | "
    f"{'bf16: max |error|':>17}"
)
for s in (1, 10_000, 50_000):
    big = scaled_vae(s)
    with torch.no_grad():
        with autocast("cpu", "bf16"):  # the UNet would run under this; the VAE step opts out
            x_ref = decode_fp32(big, z)  # (1, 3, H, W), images in [-1, 1]
        x_fp16 = copy.deepcopy(big).half().decode(z.half())
        x_bf16 = copy.deepcopy(big).bfloat16().decode(z.bfloat16())
    finite = x_fp16.isfinite()
    fp16_error = (x_fp16.float() - x_ref)[finite].abs().max() if finite.any() else torch.tensor(math.nan)
    print(
        f"{s:>10,} | {float((~finite).float().mean()):23.1%} | {float(fp16_error):17.3f} | "
        f"{float((x_bf16.float() - x_ref).abs().max()):17.3f}"
    )

# %% [markdown]
# Row by row (images in [-1, 1]):
#
# - **s = 1**: every format works; fp16's error is its rounding (10 mantissa bits), bf16's is about 8 x
#   larger (7 bits).
# - **s = 10,000**: no overflow (the largest value is about 16,000), and the errors are no larger than at
#   s = 1. A float's precision is *relative*: fp16 keeps 10 bits of mantissa at 10,000 as at 1, so a
#   stream scaled by s is rounded by s times more in absolute terms, which is the same relative
#   error, and the GroupNorms work in relative terms. Scale alone costs nothing until the range ends.
#   (Softmax, above, was different: it depends on the *absolute* differences between logits.)
# - **s = 50,000**: the **fp16 decode is entirely NaN**. One value above 65,504 becomes inf; the next
#   GroupNorm's mean over a group that holds an inf is inf; x - mean is inf - inf = NaN; and the NaN reaches
#   every pixel through the convolutions that follow. bf16 does not overflow (its range is float32's): its
#   error is the same as at s = 1.
#
# Hence what pipelines do: run the UNet in fp16 or bf16 and decode in fp32 (the decoder runs once per
# image, the UNet once or twice per step), which is what `decode_fp32` does whatever autocast is active
# around it.
#
# ## 5. VAE tiling and batch slicing
#
# The decoder's last level holds its widest feature maps at full resolution: for SD, 128 channels x
# 1024 x 1024 floats = 512 MiB per feature map at 1024 px. **Tiled decoding** decodes overlapping tiles of
# the latent one at a time and cross-fades them with linear ramps across the overlaps. A ramp rises as its
# neighbour's falls, so the weights sum to 1 everywhere:

# %%
from common.tiling import ramp, sliced_decode, tile_spans, tiled_decode  # noqa: E402

print("spans of a 128-latent side, tile 64, overlap 16:", tile_spans(128, 64, 16))
print("ramp of a middle tile (length 12, overlaps 4 and 4):", [round(x, 3) for x in ramp(12, 4, 4).tolist()])

# %% [markdown]
# **Predict**: a tiled decode holds one tile's decode at a time, so its peak should be about the untiled
# peak at the tile's size (plus the full-size output being assembled), whatever the image size; the
# untiled peak grows with the image's area. The compute grows by the overlaps: each side is covered by
# spans whose lengths add up to more than the side. Tiling is not exact: GroupNorm statistics and the
# mid-block's attention see one tile, not the whole latent. Measured against the image size:

# %%
f = vae.downsample_factor
tile = budget(fast=8, cpu=16)
sides = budget(fast=[8, 16, 32], cpu=[16, 32, 48, 64])
rows = []


@torch.no_grad()
def decode(z, tiled):
    return tiled_decode(vae, z, tile=tile, overlap=tile // 4) if tiled else vae.decode(z)


for side in sides:
    z = torch.randn(1, 4, side, side)
    # measure calls each lambda at once, on this side's z
    a, x_full = measure(lambda: decode(z, tiled=False), warmup=1)  # noqa: B023
    b, x_tiled = measure(lambda: decode(z, tiled=True), warmup=1)  # noqa: B023
    covered = sum(stop - start for start, stop in tile_spans(side, tile, tile // 4))
    rows.append(
        dict(
            side=side,
            untiled=a,
            tiled=b,
            diff=float((x_full - x_tiled).abs().max()),
            area=(covered / side) ** 2,
        )
    )
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([r["side"] * f for r in rows], [r["untiled"].peak_mib for r in rows], "o-", label="untiled")
ax.plot(
    [r["side"] * f for r in rows],
    [r["tiled"].peak_mib for r in rows],
    "o-",
    label=f"tiled ({tile} latents, overlap {tile // 4})",
)
ax.set(xlabel="image side (px)", ylabel="peak extra MiB", title="VAE decode")
ax.legend()
show(fig)
plt.close(fig)
print(
    f"{'image px':>8} | {'peak MiB untiled / tiled':>24} | {'time s untiled / tiled':>22} | "
    f"{'tiled area / image':>18} | {'max |tiled - untiled|':>21}"
)
for r in rows:
    print(
        f"{r['side'] * f:8d} | {r['untiled'].peak_mib:11.1f} / {r['tiled'].peak_mib:10.1f} | "
        f"{r['untiled'].seconds:10.3f} / {r['tiled'].seconds:9.3f} | {r['area']:18.2f} | {r['diff']:21.3f}"
    )

# %% [markdown]
# *Figure: the untiled decode's peak grows with the image area; the tiled one stays near one tile's.*
#
# Row by row. The first row's image fits in one tile, so "tiled" decodes it whole: the same peak, a
# difference of 0. From the second row on, the untiled peak grows about 4 x for each doubling of the
# side (the area), while the tiled peak stays near the first row's (one tile's decode) plus the output it
# assembles. The tiled time grows faster than the untiled one by at least the "tiled area / image"
# column (the overlaps are decoded twice; more at the corners, four times), and in practice by more:
# each small tile is its own call through the whole decoder, so per-call costs repeat. The differences
# are large because these weights are random, and a random decoder amplifies the difference between a
# tile's GroupNorm statistics and the whole image's.
#
# **Batch slicing** decodes a batch one image at a time: every image is computed alone anyway, so the
# result is the same (exact, up to rounding) for a peak of one image's decode:

# %%
z = torch.randn(4, 4, tile, tile)
whole, x_whole = measure(lambda: decode(z, tiled=False), warmup=1)
one_by_one, x_sliced = measure(torch.no_grad()(lambda: sliced_decode(vae, z)), warmup=1)
print(
    f"batch of 4: whole +{whole.peak_mib:.1f} MiB, one at a time +{one_by_one.peak_mib:.1f} MiB "
    f"({one_by_one.peak_bytes / whole.peak_bytes:.2f}x), "
    f"max diff {float((x_sliced - x_whole).abs().max()):.2g}"
)

# %% [markdown]
# diffusers' `enable_tiling()` tiles only latents larger than `sample_size / f` (64 for SD), so at 512 px
# (64 x 64 latents) it does nothing; compare tiled decoding at 1024 px.
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
    out_cl = unet(z.to(memory_format=torch.channels_last), t, ctx)
    print("channels_last vs default:", float((out_cl - out).abs().max()))

# %% [markdown]
# `channels_last` stores activations as (B, H, W, C), which many convolution kernels prefer; the values do
# not change. `torch.compile` fuses operations into generated kernels: faster calls after a first call
# that compiles (minutes on a CPU), so the benchmark keeps it behind `--compile`.
#
# ## 7. The table
#
# `benchmark.py` measures each trick on the course's modules and on diffusers' `UNet2DConditionModel` /
# `AutoencoderKL` holding the very same weight tensors. The `--quick` version runs at toy sizes in one
# process: a UNet with 32 and 64 channels and 4 heads (8 dimensions each) on 32 x 32 latents, so N = 1,024
# tokens at level 0 and B = 2; a VAE with 32 and 64 channels (f = 2). Five of its rows (two in fast mode),
# one call each after a warm-up; its training rows are section 3's experiment, and the table at SD's sizes
# below has them:

# %%
out_dir = ROOT / "runs" / "bench05_notebook"
quick_rows = budget(
    fast=["unet_math", "unet_sdpa"],
    cpu=["unet_math", "unet_sdpa", "unet_sliced", "vae_decode_large", "vae_decode_large_tiled"],
)
cmd = [
    sys.executable,
    str(ROOT / "05_memory_efficient_diffusion" / "benchmark.py"),
    "--quick",
    "--out",
    str(out_dir),
    "--repeats",
    "1",
    "--warmup",
    "1",
    "--rows",
    *quick_rows,
]
t0 = time.perf_counter()
subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
print(f"benchmark --quick: {time.perf_counter() - t0:.0f} s")


def read_table(path):
    """Rows of a benchmark table.md as dicts of strings."""
    lines = [ln.strip().strip("|").split("|") for ln in path.read_text().splitlines() if ln.startswith("|")]
    header = [h.strip() for h in lines[0]]
    return [dict(zip(header, (c.strip() for c in cells))) for cells in lines[2:]]


columns = [
    "row",
    "ours_s",
    "diffusers_s",
    "time_ratio",
    "ours_peak_MiB",
    "diffusers_peak_MiB",
    "mem_ratio",
    "ours_maxdiff",
]
widths = [18] + [12] * (len(columns) - 1)
print(" | ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
for r in read_table(out_dir / "table.md"):
    print(" | ".join(f"{r.get(c, ''):>{w}}" for c, w in zip(columns, widths)))

# %% [markdown]
# Every row, what it measured and why its numbers are what they are (predictions from the sizes above):
#
# - **unet_math**: one UNet forward on the math path. Predicted peak: the level-0 attention's two matrices,
#   2 x (2 x 4 x 1,024^2 x 4 bytes) = 64 MiB, plus a few MiB of the rest. Ours and diffusers hold the same
#   two matrices (diffusers folds heads into the batch and scales inside one `baddbmm`; ours scales q and
#   then multiplies): memory ratio 1.0.
# - **unet_sdpa**: the same forward with SDPA. Predicted peak: the rest of the network only, a few MiB,
#   about 10 x less than math. It is also faster than math: most of the math path's time is the level-0
#   attention writing and reading its N x N matrices (section 2).
# - **unet_sliced**: ours slices 128 query rows across all 8 (batch x head) pairs; diffusers'
#   `slice_size=1` takes all 1,024 rows of one pair at a time. Both hold 128 x 1,024 x 8 = 1,024 x 1,024 x 1
#   entries: 2 x 4 MiB plus the rest. Sliced two different ways to the same size: memory ratio 1.0. It is
#   slower than SDPA (many small products instead of one fused kernel).
# - **vae_decode_large**: a decode of 64 x 64 latents to 128 px. Predicted: a few 32-channel 128 x 128 maps,
#   2 MiB each, alive at once in the last up block. The same convolutions in the same order: ratios 1.0.
# - **vae_decode_large_tiled**: the same in 32-latent tiles, overlap 8. One tile is a quarter of the image,
#   so about 1/4 of the untiled peak. Ours and diffusers tile alike (same tile, overlap and ramps): memory
#   ratio 1.0. Slower than untiled by at least the overlaps (spans 32 + 32 + 16 = 80 per side of 64: 1.56 x
#   the area), and by the nine calls instead of one (section 5).
# Two things hold for every row. **Memory ratios** (ours / diffusers) sit within a few percent of 1: the
# two libraries hold the same tensors. **Time ratios** at these sizes are sub-second single calls, and two
# runs of the very same call differ by tens of percent; read any time ratio between about 0.7 and 1.4 as
# "the same". The time differences that are real are the ones between rows: math against SDPA, tiled
# against untiled.
#
# At SD 1.5's real sizes (512 px: N = 4,096 tokens, 8 heads, B = 2), the full benchmark takes about an
# hour on a 2-core CPU (`python 05_memory_efficient_diffusion/benchmark.py --out DIR`, each side of each
# row in a fresh process). Its memory columns, read from the files it wrote:

# %%
results = ROOT / "05_memory_efficient_diffusion"
full = {}
rerun = results / "results_cpu_rerun"
# the training rows, rerun on their own with the checkpoint regions of common/, come first
for path in (rerun / "train_rows.md", results / "results_cpu" / "table.md", rerun / "sd_rows.md"):
    if path.exists():
        full.update({r["row"]: r for r in read_table(path) if r["row"] not in full})
print(f"{'row':>24} | {'ours peak MiB':>13} | {'diffusers peak MiB':>18} | {'ours / diffusers':>16}")
for name in (
    "unet_math",
    "unet_sdpa",
    "unet_sliced",
    "vae_decode_small",
    "vae_decode_large",
    "vae_decode_large_tiled",
    "train",
    "train_checkpointing",
):
    if name in full:
        r = full[name]
        print(f"{name:>24} | {r['ours_peak_MiB']:>13} | {r['diffusers_peak_MiB']:>18} | {r['mem_ratio']:>16}")
print(f"predicted, math attention at 512 px: 2 x {attention_matrix_bytes(2, 8, 4096, 4096) / MiB:,.0f} MiB")

# %% [markdown]
# Row by row:
#
# - **unet_math**: the prediction of section 1, two matrices of 1 GiB, plus about 170 MiB of whatever else
#   the level holds at that moment (its feature maps are 2 x 320 x 64 x 64 floats = 10 MiB each).
# - **unet_sdpa**: ~290 MiB, 7.5 x less. The peak is no longer in attention at all: it is the rest of the
#   network at level 0, where the feed-forward's wide hidden state alone is 80 MiB (section 3).
# - **unet_sliced**: 256 query rows x 16 (batch x head) pairs: 2 x 64 MiB of attention, less than the
#   rest of the network's peak, so the peak is the same as SDPA's: once attention is cut below the rest,
#   cutting it further buys nothing. (diffusers' `slice_size=1`, one whole head at a time, holds the same
#   4,096 x 4,096 entries.)
# - **vae_decode_small** (512 px): ~980 MiB: a handful of full-resolution feature maps of 128-256
#   channels (128-256 MiB each) alive at once in the last up block.
# - **vae_decode_large** (1024 px): 4 x the area, 3.9 x the peak.
# - **vae_decode_large_tiled**: 64-latent tiles, i.e. one 512 px decode at a time: the peak is
#   vae_decode_small's, about 1/4 of the untiled one.
# - **train / train_checkpointing** (section 3's UNet at batch 32): the plain step's peak is the same in
#   both; checkpointed, ours keeps 44.0 MiB (-71%), diffusers 43.5 MiB (-71%). The regions are the same:
#   each ResNet but the mid block's first, and each transformer block inside a spatial transformer, not
#   its GroupNorm and projections (whose outputs stay in memory). The form differs for the transformer
#   blocks. diffusers uses PyTorch's non-reentrant checkpoint: the forward records the autograd graph and
#   drops each saved tensor through a Python hook, and backward reruns the block only up to its last
#   operation that saves a tensor, so the feed-forward's output Linear (it needs its input, not its
#   output) is not rerun. Ours uses the reentrant form: the first forward records no graph at all (no
#   hooks), and backward reruns the whole block, that Linear included. The trade: a checkpointed step's
#   FLOPs grow by 25.3% instead of 23.5%, and the rerun Linear's output is alive during the block's
#   backward (the extra half MiB here), against a few dozen hooks fewer per block. Where arithmetic sets
#   the pace (this row, batch 32) the two come out even; where overhead does (batch 1 on 8 x 8 latents
#   here, and a small UNet on a GPU, which waits on kernel launches) ours pays about 65% more time for
#   checkpointing against diffusers' 85-90% on this CPU (`benchmark.py --checkpointing` measures both).
#   Wrapping each whole spatial transformer instead, which the course tried, keeps less (its norm's and
#   projections' tensors go too) but reruns them, more arithmetic, and its peak is no lower: the peak of
#   a checkpointed step sits in a backward, not in what the forward keeps (`BENCHMARKS.md` records the
#   variants measured). Every variant gives the same gradients (`tests/test_end_to_end.py`).
#
# Ours and diffusers' columns agree to a few percent in every row: the same tensors, the same peaks. The
# chapter README gives the times of the same rows and the GPU's table.
#
# ## 8. One whole image, end to end
#
# Every row so far times one module. What you wait for is the whole call: encode the prompt and the empty
# prompt, run the UNet once per step on the batch [uncond, cond] (classifier-free guidance), step the
# sampler, decode the latents. `benchmark.py --end-to-end` times that call for the course's
# `StableDiffusion` and for diffusers' `StableDiffusionPipeline`, built from the same random weights (SD
# 1.5's configurations), the same DPM-Solver++ scheduler and the same seed, and checks first that both
# give the same image within 1/255. Here it is on tiny configurations, a few seconds:

# %%
sys.path.insert(0, str(ROOT / "05_memory_efficient_diffusion"))
import end_to_end  # noqa: E402  (05_memory_efficient_diffusion/end_to_end.py)

ours_pipe, ref_pipe = end_to_end.build_pipelines(quick=True)
row = end_to_end.run_setting(
    ours_pipe, ref_pipe, "fp32", device=torch.device("cpu"), steps=4, image_side=32, repeats=2
)
print(
    f"prompt {end_to_end.PROMPT!r}, 4 steps, 32 px: max |ours - diffusers| = {row['max_abs_diff']:.1e} "
    f"(same image within 1/255: {row['same_image']})"
)
print(
    "ours, one image, stage by stage:",
    ", ".join(f"{s['stage']} {s['s'] * 1e3:.1f} ms" for s in row["ours_breakdown"]["stages"]),
)
del ours_pipe, ref_pipe

# %% [markdown]
# The prompt and the empty prompt through the text encoder (the course's pipeline in one batch of two, a
# single call; diffusers' in two calls), one UNet call per step, one decode: the stages of the pipeline
# diagram, in order. At tiny sizes every stage takes milliseconds and the rest
# (tokenizing, the sampler's arithmetic, Python) is not small beside them. At SD 1.5's sizes the
# arithmetic decides, so predict the shares before timing anything: count the FLOPs of each stage at
# 512 px (on the `meta` device for the UNet and the VAE: shapes only, no numbers, no memory).

# %%
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from common.text_encoder import CLIPTextConfig, CLIPTextModel  # noqa: E402


def tflop(fn):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def text_encoder_tflop():
    """One prompt through SD 1.5's text encoder, built on the CPU (it checks its token ids: needs values)."""
    model = CLIPTextModel(CLIPTextConfig.vit_l14())
    return tflop(lambda: model(torch.zeros(1, 77, dtype=torch.long)))


text_tf = text_encoder_tflop()
with torch.device("meta"):
    sd_unet, sd_vae = UNet(UNetConfig.sd15()), AutoencoderKL(AutoencoderConfig.sd15())
    z_in, c_in, z_0 = torch.zeros(2, 4, 64, 64), torch.zeros(2, 77, 768), torch.zeros(1, 4, 64, 64)
    unet_tf = tflop(lambda: sd_unet(z_in, torch.tensor([500, 500]), c_in))
    decode_tf = tflop(lambda: sd_vae.decode(z_0))
print(
    f"512 px: text encoder {text_tf:.3f} TFLOP per prompt, UNet {unet_tf:.3f} TFLOP per call "
    f"(guidance batch of 2), VAE decode {decode_tf:.3f} TFLOP"
)
for n in (2, 50):
    total = 2 * text_tf + n * unet_tf + decode_tf
    print(
        f"{n:>2} steps: {total:6.2f} TFLOP; UNet {n * unet_tf / total:.1%}, "
        f"decode {decode_tf / total:.1%}, text encoder {2 * text_tf / total:.1%}"
    )

# %% [markdown]
# Encoding the two prompts is negligible (2 x 0.013 TFLOP: 77 tokens through 85 M weights of matrix
# products). Each step is one UNet call of 1.6 TFLOP (0.8 per image of the guidance batch), and the decode
# is 2.5 TFLOP, about one and a half UNet calls: the decoder's last levels run 128 and 256 channels on all
# 512 x 512 pixels, 64 x the latent's positions. With 50 steps the UNet is 97% of the arithmetic; with the
# 2 steps a CPU run can afford, the decode is 44%.
#
# **Then measure.** `benchmark.py --end-to-end` writes `end_to_end.json`: the row (median time of each
# side, the ratio, the images' difference) and the time of every stage of one call. The cell reads the
# chapter's committed SD-size runs (`results_cpu/`, `results_cuda/`, commands in the chapter README) where
# they exist, and otherwise shows the tiny run above:

# %%
CHAPTER = ROOT / "05_memory_efficient_diffusion"
runs = {}  # name -> the run's JSON: its rows, and the allocator its times were taken with
for name, path in (
    ("CPU", CHAPTER / "results_cpu" / "end_to_end.json"),
    ("CPU, reuse", CHAPTER / "results_cpu" / "reuse_freed_memory" / "end_to_end.json"),
    ("GPU", CHAPTER / "results_cuda" / "end_to_end.json"),
):
    if path.exists():
        runs[name] = json.loads(path.read_text())
if not runs:
    print("no committed end-to-end run in results_cpu/ or results_cuda/: showing the tiny run above")
    runs["tiny run"] = {"rows": [row], "allocator": "default"}
print(
    f"{'run':<11} {'setting':<8} {'px':>4} {'steps':>5} {'ours s':>7} {'diffusers s':>11} "
    f"{'ours/diffusers':>14} {'max |diff|':>10} {'page faults per call, ours/diffusers':>37}"
)
for name, run in runs.items():
    for r in run["rows"]:
        faults = f"{r.get('ours_page_faults', 0):,.0f} / {r.get('diffusers_page_faults', 0):,.0f}"
        print(
            f"{name:<11} {r['setting']:<8} {r['side_px']:>4} {r['steps']:>5} {r['ours_s']:>7.2f} "
            f"{r['diffusers_s']:>11.2f} {r['time_ratio']:>14.3f} {r['max_abs_diff']:>10.1e} {faults:>37}"
        )

# one bar per run and side: the fp32 row of each run, split into its stages
bars = [
    (f"{side}, {name}", run["rows"][0], side) for name, run in runs.items() for side in ("ours", "diffusers")
]
fig, ax = plt.subplots(figsize=(9, 1.2 + 0.55 * len(bars)))
colors = {"text encoder": "tab:orange", "VAE decode": "tab:brown", "other": "tab:gray"}
for k, (label_, r, side) in enumerate(bars):
    bk = end_to_end.summarize_breakdown(r[f"{side}_breakdown"])
    parts = [("text encoder", bk["text_encoder_s"])]
    parts += [(f"UNet call {i + 1}", sec) for i, sec in enumerate(bk["unet_calls"])]
    parts += [("VAE decode", bk["decode_s"]), ("other", bk["other_s"])]
    left = 0.0
    for j, (label, sec) in enumerate(parts):
        # the UNet calls in alternating blues, so that each call's edge shows
        color = colors.get(label, "tab:blue" if j % 2 else "lightsteelblue")
        entry = None  # the legend names each stage once, and the UNet calls once
        if k == 0 and label == "UNet call 1":
            entry = "UNet calls, one per step"
        elif k == 0 and not label.startswith("UNet call"):
            entry = label
        ax.barh(k, sec, left=left, color=color, edgecolor="white", label=entry)
        if sec > 0.08 * bk["total_s"]:
            ax.text(left + sec / 2, k, f"{sec:.2g} s", ha="center", va="center", fontsize=8)
        left += sec
    print(
        f"{label_:<22} one call {bk['total_s']:6.2f} s: text encoder {bk['text_encoder_s']:.2f} s, UNet "
        f"{bk['unet_s']:.2f} s ({len(bk['unet_calls'])} calls), decode {bk['decode_s']:.2f} s, "
        f"other {bk['other_s']:.3f} s"
    )
ax.set_yticks(range(len(bars)), [b[0] for b in bars])
ax.invert_yaxis()
first = bars[0][1]
ax.set_xlabel(
    f"seconds for one {first['side_px']} px image, {first['steps']} DPM-Solver++ steps, guidance 7.5"
)
ax.set_title("Where one image's time goes, stage by stage (same weights, same seed, same image)")
ax.legend(ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.45 / len(bars) * 4), fontsize=8, frameon=False)
fig.tight_layout()
show(fig)
plt.close(fig)

# %% [markdown]
# **The time no kernel shows: fresh pages.** The last column of the table, page faults per call, and the
# two allocator rows point at a cost that belongs to neither pipeline (each call's CPU time spent in the
# operating system, `system_s` in the JSON, falls from 12.8 s to 0.01 s with them).
# On a CPU every activation is a `malloc`. glibc, Linux's C library, serves a large block with
# `mmap` and hands it back to the kernel with `munmap` as soon as the tensor is freed; the next activation
# of that size gets fresh pages, and the kernel zero-fills each 4 KiB page the first time it is touched (a
# *minor page fault*). `common.runtime.reuse_freed_memory()` tells glibc to keep freed blocks and reuse
# them (no `mmap` for large blocks, no trimming of the heap). It changes the whole process for good (and
# its memory stays at its peak until it exits), so the cell measures each way in a fresh interpreter: SD
# 1.5's VAE decoder, random weights, one thread, three decodes after a warm-up.

# %%
PAGE_FAULTS = """
import json, resource, sys, time
import torch
from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.runtime import reuse_freed_memory

reused = sys.argv[1] == "reuse" and reuse_freed_memory()  # False where glibc is not the C library
torch.set_num_threads(1)
torch.manual_seed(0)
vae = AutoencoderKL(AutoencoderConfig.sd15()).eval()
side = int(sys.argv[2])
z = torch.randn(1, 4, side // 8, side // 8)
with torch.no_grad():
    vae.decode(z)  # warm-up: the first call takes fresh pages either way
    u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(3):
        vae.decode(z)
    u1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
print(json.dumps({"reused": reused, "s": (t1 - t0) / 3, "faults": (u1.ru_minflt - u0.ru_minflt) / 3,
                  "user_s": (u1.ru_utime - u0.ru_utime) / 3, "system_s": (u1.ru_stime - u0.ru_stime) / 3}))
"""
side = budget(fast=64, cpu=256)
if sys.platform.startswith("linux"):
    print(f"SD 1.5 VAE decode at {side} px, per call:")
    for how in ("default", "reuse"):
        done = subprocess.run(
            [sys.executable, "-c", PAGE_FAULTS, how, str(side)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        m = json.loads(done.stdout.splitlines()[-1])
        label = "glibc's defaults" if how == "default" else f"reuse_freed_memory() (applied: {m['reused']})"
        print(
            f"  {label:<42} {m['s']:5.2f} s wall, {m['user_s']:5.2f} s user + {m['system_s']:4.2f} s system "
            f"CPU, {m['faults']:>9,.0f} page faults ({m['faults'] * 4 / 1024:,.0f} MiB of fresh pages)"
        )
else:
    print("page faults are counted this way on Linux only (resource.getrusage); skipped here")

# %% [markdown]
# How to read the table and the chart. **ours/diffusers** is the ratio of the medians of calls interleaved
# in one run, so whatever else the computer was doing fell on both sides alike. The two pipelines run the
# same kernels on the same tensors (the tests count them: the course's UNet and decoder run no operator
# more often than diffusers' and copy no more memory), and **max |diff|** says the images agree far inside
# 1/255. The committed CPU runs (512 px, 2 steps, two threads, five calls a side, commands in the chapter
# README) put the course's pipeline at 0.97x diffusers' time with either allocator: at most 1.0x, as it
# should be with the same kernels, but within the spread of single calls (ours 30.9-34.9 s, diffusers'
# 31.7-34.1 s with glibc's defaults), so read it as "the same speed". In the chart each bar is one call:
# two UNet calls of the guidance batch, the decode (at 512 px more than a UNet call, as the FLOP count
# predicted: 2.5 against 1.6 TFLOP), the text encoder a sliver, and "other" (tokenizing, the sampler's
# arithmetic, converting the image) too small to see.
#
# The allocator rows are the surprise: the same kernels, a third less time (32.6 s an image with glibc's
# defaults, 21.7 s with freed memory reused), the decode almost halved (11.7 to 6.6 s). With the defaults
# each call took 4.3 million page faults (16 GiB of freshly zeroed pages) and 12.8 s of system CPU time,
# and reuse brings both to zero. The decoder pays most because its activations are the largest: 128
# channels at 512 x 512 are 128 MiB a tensor, far above the 32 MiB up to which glibc will keep a freed block.
# The cell above shows it on one decode with one thread: the faults and their system time vanish, a
# smaller saving than in the runs. There two threads share each operation, and the 512 px image got 10.9 s
# faster, more than its 12.8 CPU seconds of system time spread over two threads (6.4 s) explain: while
# one thread waits for the kernel to fill its pages, the other waits for it at the end of the operation.
# `generate.py` (chapter 06) turns reuse on for itself; in your own scripts on Linux, call
# `common.runtime.reuse_freed_memory()` first.
#
# Beyond that, speeding up an image means fewer or cheaper UNet calls: with 50 steps they are 97% of the
# arithmetic. That is what fp16, `torch.compile` and channels_last do on a GPU (the GPU rows, where
# measured), and what fewer sampler steps do everywhere (chapter 03).

# ## Summary
#
# - Attention on the math path holds two B x heads x N x N matrices: N = (side / 8)^2 tokens, so its memory
#   grows with the fourth power of the image side. Sliced attention caps them at slice_size x N per
#   (batch, head) pair; blocked attention with an online softmax (SDPA) never builds them: O(N).
# - Chunked feed-forward is exact and trims a smaller peak; gradient checkpointing keeps each block's
#   input and recomputes the rest: most of the activation memory for about one extra forward (+33% of a
#   step when a backward costs two forwards, more when it costs less).
# - fp16 overflows above 65,504: attention logits turn to inf and the softmax to NaN (fix: logits and
#   softmax in fp32), and one large decoder activation makes a whole image NaN (fix: decode in fp32, or
#   bf16, whose range is fp32's but whose precision is coarser).
# - Tiled VAE decoding bounds the decoder's memory by one tile's, at the price of the overlaps' compute and
#   a small, stated difference; batch slicing is exact.
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
