# %% [markdown]
# # 04. Cross-attention and text
#
# Chapter 03's UNet denoised latents of a *class*. Stable Diffusion denoises latents of a *sentence*: every
# pixel of the UNet's feature maps looks at every word of the prompt and takes what it needs. That look is
# **cross-attention** (Rombach et al. 2022, sec. 3.3). This chapter builds it and looks inside it:
#
# 1. attention by hand, on tensors small enough to follow every number: softmax(Q K^T / sqrt(d)) V;
# 2. Q from pixels, K and V from words: the shapes at each step and the multi-head reshape, then the course's
#    `common.attention` (the same numbers, three backends);
# 3. the text side: tokens, the CLIP text transformer, and the UNet with cross-attention, each checked
#    against diffusers / transformers with the same random weights;
# 4. classifier-free guidance: why dropping captions in training lets one network steer itself, and a
#    guidance-scale sweep with the course's text-to-image model;
# 5. per-token attention maps for a two-object prompt, and how much of each word's attention lands on its
#    object.
#
# Heavy cells size themselves with `budget(...)`: seconds under `COURSE_FAST=1`, a minute or two on a laptop
# CPU. The text-to-image model is trained by `train_text_to_image.py` and ships in `checkpoints/course_t2i`;
# this notebook only loads it.

# %%
import io
import math
import time
import warnings
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from IPython.display import Image, display

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook without ipywidgets
from common.attention import (MultiHeadAttention, attention, attention_backend, attention_math,
                              capture_attention_maps, cross_attention_layers)
from common.pipeline import COURSE_MODEL, StableDiffusion
from common.runtime import budget, describe, seed_everything
from common.text_encoder import CLIPTextConfig, CLIPTextModel
from common.tokenizer import ShapesTokenizer
from common.unet import UNet, UNetConfig
from common.viz import image_grid, overlay_attention

matplotlib.rcParams["figure.dpi"] = 72
seed_everything(0)
print(describe())
torch.set_printoptions(precision=3, sci_mode=False)
T0 = time.perf_counter()


def show(fig, dpi: int = 72) -> None:
    """Display a matplotlib Figure (common.viz builds them without pyplot) as a PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    display(Image(buffer.getvalue()))

# %% [markdown]
# ## 1. Attention by hand
#
# Two queries ask, three keys answer. Each query q_i scores every key k_j with a dot product, scaled by
# 1/sqrt(d) so the scores do not grow with the width d; a softmax over the keys turns each row of scores into
# weights that sum to 1; the output for query i is the weighted average of the values v_j:
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d}}\right) V
# \qquad \text{(Vaswani et al. 2017, eq. 1)}$$
#
# Think of the queries as two pixels and the keys as the words "red", "circle", "square". Pixel 0's query
# points the way of "red" and "circle"; pixel 1's the way of "square". Each value is a one-hot vector, so
# the output shows directly how much of each word a pixel took.

# %%
Q = torch.tensor([[2.0, 1.0, 0.0],    # pixel 0
                  [0.0, 0.0, 2.0]])   # pixel 1                                 (N_q, d) = (2, 3)
K = torch.tensor([[2.0, 0.0, 0.0],    # "red"
                  [0.0, 2.0, 0.0],    # "circle"
                  [0.0, 0.0, 2.0]])   # "square"                                (N_k, d) = (3, 3)
V = torch.eye(3)                      # value of word j = one-hot j             (N_k, d_v) = (3, 3)
d = Q.shape[-1]
scores = Q @ K.T / math.sqrt(d)       # (N_q, N_k): how well each pixel's question matches each word
weights = scores.softmax(dim=-1)      # each row sums to 1
out = weights @ V                     # (N_q, d_v)
print("scores Q K^T / sqrt(3):\n", scores)
print("weights, each row sums to 1:\n", weights)
print("output = weights @ V:\n", out)

# %% [markdown]
# Pixel 0 takes mostly "red", some "circle" and little "square"; pixel 1 takes mostly "square". Note how
# soft it is: even a key with score 0 keeps some weight, and one large score dominates through the exponential. The course's single attention function, `common.attention.attention`, computes the
# same thing on (B, heads, N, d) tensors with three interchangeable backends: the readable `math` path above,
# PyTorch's fused `sdpa`, and `sliced` (query chunks, chapter 05). All three agree:

# %%
q4, k4, v4 = Q[None, None], K[None, None], V[None, None]  # (B, h, N, d) = (1, 1, ., 3)
for backend in ("math", "sdpa", "sliced"):
    with attention_backend(backend, slice_size=1):
        print(f"{backend:>6}: max |out - by hand| = {(attention(q4, k4, v4)[0, 0] - out).abs().max():.1e}")

# %% [markdown]
# ## 2. Q from pixels, K and V from words
#
# In the UNet, the queries come from the image and the keys and values from the text (Rombach et al. 2022,
# sec. 3.3): Q = W_Q phi(z_t), K = W_K tau(y), V = W_V tau(y). A feature map (B, C, H, W) becomes H*W pixel
# tokens of width C; the text encoder gives N_k word tokens of width D_c; three linear maps bring both to the
# same inner width h*d. With h heads, the inner width is cut into h slices of d features; each head attends on
# its own (its own notion of "which word matters here"), and the heads are put side by side again.
# The shapes at each step, for a 4 x 4 feature map and a 5-token prompt:

# %%
B, C, H, W = 1, 8, 4, 4       # a feature map
N_k, D_c = 5, 6               # 5 tokens of a 6-wide text encoder
h, d_head = 2, 4              # 2 heads of width 4: inner width h*d = 8
g = torch.Generator().manual_seed(0)
feature_map = torch.randn(B, C, H, W, generator=g)
context = torch.randn(B, N_k, D_c, generator=g)
W_Q, W_K, W_V = (torch.randn(h * d_head, n, generator=g) / math.sqrt(n) for n in (C, D_c, D_c))

x = feature_map.flatten(2).transpose(1, 2)                  # (B, C, H, W) -> (B, H*W, C): pixels as tokens
q = x @ W_Q.T                                                 # (B, N_q, h*d)
k, v = context @ W_K.T, context @ W_V.T                       # (B, N_k, h*d)
q_heads = q.view(B, H * W, h, d_head).transpose(1, 2)         # (B, N_q, h, d) -> (B, h, N_q, d)
k_heads = k.view(B, N_k, h, d_head).transpose(1, 2)           # (B, h, N_k, d)
v_heads = v.view(B, N_k, h, d_head).transpose(1, 2)
weights = (q_heads @ k_heads.transpose(-1, -2) / math.sqrt(d_head)).softmax(-1)  # (B, h, N_q, N_k)
out_heads = weights @ v_heads                                 # (B, h, N_q, d)
out = out_heads.transpose(1, 2).reshape(B, H * W, h * d_head)  # (B, N_q, h*d): heads side by side
for name, t in [("x (pixels)", x), ("context (words)", context), ("Q", q), ("K", k), ("Q split into heads", q_heads),
                ("K split into heads", k_heads), ("attention weights", weights), ("weights @ V", out_heads),
                ("heads merged", out)]:
    print(f"{name:>20}: {tuple(t.shape)}")
print("head 1 uses features", list(range(d_head, 2 * d_head)), "of Q:",
      torch.equal(q_heads[0, 1], q[0, :, d_head:2 * d_head]))
print("every pixel's weights over the 5 words sum to 1:", torch.allclose(weights.sum(-1), torch.ones(1)))

# %% [markdown]
# The course's `MultiHeadAttention` (diffusers' `Attention` layout: `to_q`, `to_k`, `to_v`, `to_out.0`) does
# exactly these steps plus an output projection. Load our three matrices into it, make the output projection
# the identity, and it must give the same numbers, with every backend:

# %%
layer = MultiHeadAttention(query_dim=C, context_dim=D_c, heads=h, dim_head=d_head).eval()
with torch.no_grad():
    layer.to_q.weight.copy_(W_Q)
    layer.to_k.weight.copy_(W_K)
    layer.to_v.weight.copy_(W_V)
    layer.to_out[0].weight.copy_(torch.eye(C))
    layer.to_out[0].bias.zero_()
    for backend in ("math", "sdpa", "sliced"):
        with attention_backend(backend, slice_size=3):
            print(f"MultiHeadAttention ({backend:>6}): max |diff| to the steps above = {(layer(x, context) - out).abs().max():.1e}")

# %% [markdown]
# ## 3. The text side, and the UNet with cross-attention
#
# **Tokens.** The course's Shapes model reads a word-level tokenizer built with the `tokenizers` library over the
# caption grammar's 38 words (plus `<pad>`, `[UNK]`, `<bos>`, `<eos>`): every prompt becomes
# `<bos> w_1 ... w_n <eos> <pad> ...`, 24 ids long. Stable Diffusion's CLIP BPE tokenizer does the same with 77
# ids and sub-words (`common.tokenizer.ClipTokenizer`, loaded from a local `tokenizer/` folder). The empty
# prompt `""` is what classifier-free guidance uses as "no text".

# %%
tok = ShapesTokenizer.for_shapes()
prompt = "a small red circle above a large blue square"
ids = tok([prompt, ""])
print(tok)
print("ids:", ids[0].tolist())
print("tokens:", [tok.vocabulary[i] for i in ids[0, :12]])
print('"" ->', ids[1, :4].tolist(), "...")

# %% [markdown]
# **The text encoder** is CLIP's text transformer (Radford et al. 2021): token + position embeddings, pre-LN
# blocks whose self-attention is *causal* (token i sees tokens 0..i), a quick-GELU MLP, a final LayerNorm. Its
# last hidden state (B, N_k, D_c) is the `context` every cross-attention layer reads. `common.text_encoder`
# writes it out with transformers' parameter names, so the same weights give the same numbers. Here a tiny
# random config against `transformers.CLIPTextModel`; `tests/test_text_encoder.py` does the same at SD's
# ViT-L/14 size (123,060,480 parameters, counted below without allocating them).

# %%
from diffusers.utils import logging as diffusers_logging

from common.convert import to_diffusers, to_transformers

diffusers_logging.set_verbosity_error()  # no notes about dtypes from diffusers' model loading

torch.manual_seed(0)
clip = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24,
                                    bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)).eval()
clip_ref = to_transformers(clip)  # transformers.CLIPTextModel holding the same weights
with torch.no_grad():
    ours, ref = clip(ids), clip_ref(input_ids=ids)
print("context:", tuple(ours.last_hidden_state.shape), " pooled:", tuple(ours.pooler_output.shape))
print(f"CLIP text model vs transformers: max |diff| last_hidden_state "
      f"{(ours.last_hidden_state - ref.last_hidden_state).abs().max():.1e}, pooled "
      f"{(ours.pooler_output - ref.pooler_output).abs().max():.1e}")
with torch.device("meta"):  # shapes only: counts the parameters without allocating them
    print(f"ViT-L/14 text config: {sum(p.numel() for p in CLIPTextModel(CLIPTextConfig.vit_l14()).parameters()):,} parameters")

# %% [markdown]
# **The UNet with cross-attention.** Chapter 03's UNet gains a `SpatialTransformer` after ResNet blocks at
# chosen levels: GroupNorm, a 1x1 conv in, transformer blocks (self-attention over pixels, *cross-attention to
# the words*, a GEGLU feed-forward, each pre-normed and residual), a 1x1 conv out, plus the input. The
# parameter names are diffusers' `UNet2DConditionModel`'s, so `to_diffusers` moves the weights across and the
# outputs must match. A tiny config here (SD 1.5's, 859,520,964 parameters, is compared in
# `tests/test_unet.py` at latents 1x4x32x32, context 1x77x768):

# %%
torch.manual_seed(0)
unet = UNet(UNetConfig.tiny()).eval()
unet_ref = to_diffusers(unet)  # diffusers.UNet2DConditionModel holding the same weights
z_t, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, unet.config.cross_attention_dim)
with torch.no_grad():
    eps_ours = unet(z_t, 500, ctx)
    eps_ref = unet_ref(z_t, torch.tensor([500]), encoder_hidden_states=ctx).sample
print("cross-attention layers:", list(cross_attention_layers(unet))[:3], "...")
print(f"UNet (tiny) vs diffusers: max |diff| {(eps_ours - eps_ref).abs().max():.1e} (max |eps| {eps_ref.abs().max():.2f})")
with torch.device("meta"):
    print(f"SD 1.5 UNet config: {sum(p.numel() for p in UNet(UNetConfig.sd15()).parameters()):,} parameters")

# %% [markdown]
# ## 4. Classifier-free guidance
#
# A conditional model eps(z_t, t, c) follows its prompt only loosely. Ho & Salimans (2022) train ONE network
# for both the conditional and the unconditional prediction, by replacing the caption with the empty prompt
# `""` for a fraction of the training examples (the course model: 10%). At sampling time, two predictions per
# step, with and without the prompt, and a step further along their difference:
#
# $$\hat\varepsilon = \varepsilon(z_t, t, \varnothing) + s\,\big(\varepsilon(z_t, t, c) - \varepsilon(z_t, t, \varnothing)\big)$$
#
# s = 0 ignores the prompt, s = 1 is the plain conditional model, s > 1 pushes the sample away from "any
# image" towards "this prompt" (the difference approximates s-1 times the gradient of log p(c | z_t): an
# implicit classifier). Without caption dropout the network never learnt eps(z_t, t, ""), and the formula
# would subtract nonsense. Here is the dropout the trainer applies (`common.text_to_image.drop_captions`):

# %%
from common.text_to_image import drop_captions

batch_ids = tok(["a red circle at the top", "a blue square on the left", "a green star in the center",
                 "a small yellow cross at the bottom"] * 4)  # (16, 24)
dropped_ids, dropped = drop_captions(batch_ids, tok([""])[0], p=0.1, generator=torch.Generator().manual_seed(3))
print(f"dropped {int(dropped.sum())} of {len(dropped)} captions (p = 0.1): rows {dropped.nonzero().flatten().tolist()}")
print('every dropped row now holds the ids of "":', bool((dropped_ids[dropped] == tok([""])[0]).all()))

# %% [markdown]
# **A guidance-scale sweep.** The same prompt and the same starting noise at several scales. What to look
# for (Ho & Salimans 2022 show it on ImageNet): at s = 1 the samples follow the prompt loosely; as s grows
# they follow it more closely and become less diverse; at very large s colours saturate and shapes degrade,
# because each step overshoots. Guidance trades diversity and fidelity for adherence. The next cell loads the
# course model when `checkpoints/course_t2i` exists.

# %%
HAVE_MODEL = (COURSE_MODEL / "model_index.json").is_file()
if HAVE_MODEL:
    pipe = StableDiffusion.from_pretrained(COURSE_MODEL)
    size, model_name = None, "the course model (checkpoints/course_t2i)"
else:
    # THE TRAINED MODEL IS NOT THERE YET: the same code runs on a tiny RANDOM pipeline (its images are noise)
    from common.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    pipe = StableDiffusion(tokenizer=tok, text_encoder=clip, unet=unet,
                           vae=AutoencoderKL(AutoencoderConfig.tiny()), device="cpu")
    size, model_name = 32, "a tiny RANDOM pipeline (checkpoints/course_t2i is missing: run train_text_to_image.py)"
print("model:", model_name)
print(pipe)

# %%
scales = budget(fast=[1.0, 3.0, 7.5], cpu=[1.0, 2.0, 4.0, 8.0, 15.0])
prompts = budget(fast=["a small red circle above a large blue square"],
                 cpu=["a small red circle above a large blue square", "a large purple square in the center"])
steps = budget(fast=2, cpu=20)
t0 = time.perf_counter()
sweep = {}
for p in prompts:
    sweep[p] = torch.cat([pipe(p, num_inference_steps=steps, guidance_scale=s, generator=0, height=size, width=size,
                               output_type="pt", progress=False).images for s in scales])  # (S, 3, H, W)
print(f"{len(prompts) * len(scales)} images, {steps} DDIM steps each, {time.perf_counter() - t0:.1f} s")
for p, images in sweep.items():
    print(f"{p!r}: mean |x_s - x_1| =", ", ".join(f"s={s:g}: {(im - images[0]).abs().mean():.3f}"
                                                  for s, im in zip(scales, images)))
show(image_grid(torch.cat(list(sweep.values())), captions=[f"s = {s:g}" for _ in prompts for s in scales],
           ncols=len(scales), value_range=(0.0, 1.0), size=1.3,
           title="guidance-scale sweep: one prompt per row, one seed"))

# %% [markdown]
# *The guidance sweep: each row one prompt, each column one guidance scale s, the same starting noise
# throughout (with the random pipeline the images are noise; only their growing difference means anything).*
#
# ## 5. Which words does each pixel look at?
#
# `capture_attention=True` records the softmax weights of every cross-attention layer at every step
# (`common.attention.capture_attention_maps`), averages them over heads, upsamples each layer's map to the
# image and averages over layers and steps: one map per token, (N_k, H, W), where at each pixel the weights
# over the tokens still sum to 1 (Hertz et al. 2022, "Prompt-to-Prompt"). For a two-object prompt, each
# object's colour word and shape word should light up over that object.

# %%
prompt = "a small red circle above a large blue square"
result = pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, generator=1, height=size, width=size,
              output_type="pt", capture_attention=True, progress=False)
maps, tokens = result.attention_maps[0], result.tokens[0]  # (N_k, H, W), N_k token strings
print("tokens:", tokens[:11])
print("maps:", tuple(maps.shape), " sum over tokens at each pixel:", f"{maps.sum(0).mean():.3f}")
words = ["red", "circle", "blue", "square"]
picked = [tokens.index(w) for w in words]
show(overlay_attention(result.images[0], maps[picked], words, value_range=(0.0, 1.0), size=1.5,
                  title=f"cross-attention per word ({'course model' if HAVE_MODEL else 'random pipeline'})"))

# %% [markdown]
# *Per-word attention maps, each scaled to its own range, over a grey copy of the generated image.*
#
# **Measured, not eyeballed.** For each object word w and the object's mask M, the share of the word's
# attention inside the mask, against the share a uniform map would put there (the mask's area):
#
# $$\mathrm{share}(w, M) = \frac{\sum_{x \in M} A_w(x)}{\sum_x A_w(x)} \qquad \mathrm{chance}(M) = \frac{|M|}{HW}$$
#
# The masks come from the generated image itself (the objects segmented against the plain background and named
# by colour, `common.judge`), since the model picks its own layout; the canonical layout of the parsed prompt
# is the fallback when an object's colour is missing. `attention_maps.py` runs this over 48 held-out prompts
# (the figure is in the README); here, this one image:

# %%
from common.judge import object_color, segment, to_uint8
from common.shapes import parse, render

scene = parse(prompt)
rgb = to_uint8(result.images[0])[0]
found = [(m, object_color(rgb, m)) for m in segment(rgb) if m.mean() <= 0.25]  # larger: noise, not an object
layout = render(scene, rgb.shape[0])[1].numpy()
for k, obj in enumerate(scene.objects):
    mine = [m for m, colour in found if colour == obj.color]
    mask, source = (mine[0], "generated") if mine else (layout[k], "canonical layout")
    mask_t = torch.from_numpy(mask)
    for w in (obj.color, obj.shape):
        a = maps[tokens.index(w)]
        share = float(a[mask_t].sum() / a.sum())
        print(f"object {k} ({source} mask, {mask.mean():.1%} of the image): '{w}' puts {share:.1%} of its "
              f"attention there (chance {mask.mean():.1%}, lift {share / mask.mean():.2f})")

# %% [markdown]
# *Reading the numbers:* a lift above 1 means the word looks at its object more than a uniform map would. One image
# is noisy; over 48 held-out prompts (`python 04_cross_attention/attention_maps.py`, table in the README) the
# shipped model's clearest word is the noun of the first-named object (2.1x chance), while the words of the
# second-named object fall below chance: the model seems to place that object in what is left, and the relation
# between the two is what it gets wrong most often (chapter 06).

# %% [markdown]
# ## Summary
#
# * Attention is a soft lookup: softmax(Q K^T / sqrt(d)) weights over the keys, applied to the values. In
#   cross-attention the queries are pixels and the keys and values are words, so each pixel takes a mixture of
#   the prompt's token vectors, different in each head.
# * The shapes: pixels (B, H*W, C) and words (B, N_k, D_c) are projected to h heads of width d, (B, h, N, d);
#   the weights are (B, h, N_q, N_k); the heads are merged back to (B, N_q, h*d).
# * The course's attention, CLIP text model and UNet give diffusers' and transformers' numbers with the same
#   weights (tiny configs here; SD 1.5 sizes in the tests), so Stable Diffusion's weights load unchanged.
# * Classifier-free guidance needs one network that knows both eps(z_t, t, c) and eps(z_t, t, ""): caption
#   dropout in training provides it; the scale s trades diversity for adherence.
# * Cross-attention maps show where each word acts; the share of a word's attention inside its object's mask,
#   against the mask's area, turns that picture into a number.
#
# ## Exercises
#
# In `exercises.py`; grade them with `python -m common.grade 04`:
#
# 1. `scaled_dot_product_attention`: attention with an optional bool or additive mask, graded against
#    `torch.nn.functional.scaled_dot_product_attention`.
# 2. `split_heads`, `merge_heads`, `multi_head_attention`: the multi-head reshape and a whole cross-attention
#    layer, graded against `nn.MultiheadAttention` with the same weights.
# 3. `classifier_free_guidance`: the combination, graded against the formula and one step of the course pipeline.
# 4. `attention_mass_in_mask`: the statistic above, on synthetic maps and masks with known answers.
# 5. `guidance_scale_sweep` (open-ended): images per scale; then look at the course model's sweep and say at
#    which scale the prompt is followed, and what breaks at s = 15.

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")
