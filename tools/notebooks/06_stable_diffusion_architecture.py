# %% [markdown]
# # 06. The Stable Diffusion architecture
#
# Chapters 01 to 05 built every part of Stable Diffusion: the autoencoder (01, 02), the noise schedule, the
# samplers and the UNet (03), cross-attention and the text encoder (04), and the memory switches (05). This
# chapter puts them together into one **pipeline** (`common/pipeline.py`), called the way diffusers' pipelines
# are called, and shows that it *is* Stable Diffusion:
#
# 1. the size of SD 1.5, part by part, computed from its configs (no weights needed);
# 2. the pipeline one stage at a time: tokenize, encode, draw the initial noise, one denoising step,
#    classifier-free guidance, the loop, decode; then the same with one call to `StableDiffusion`;
# 3. what the knobs do: a guidance-scale grid, per-word attention maps, img2img and inpainting;
# 4. the course's own text-to-image model, trained from scratch on Shapes, and its measured prompt adherence;
# 5. the model a laptop trains: both stages of its training, and why it predicts v;
# 6. real Stable Diffusion 1.5 weights in the course's code, when you have them on disk.
#
# Everything runs on a laptop CPU: the course model makes a 64 px image in about two seconds. Under
# `COURSE_FAST=1` (the tests) every heavy cell shrinks to seconds.

# %%
import json
import os
import time
from pathlib import Path

import torch
from IPython.display import Image, display

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.pipeline import COURSE_MODEL, StableDiffusion, tiny_random_pipeline
from common.runtime import budget, is_fast, setup_notebook
from common.text_encoder import CLIPTextConfig, CLIPTextModel
from common.unet import UNet, UNetConfig
from common.viz import image_grid, overlay_attention, plot_loss_curves, show
from common.weights import sd15_path

threads = torch.get_num_threads()
torch.set_num_threads(1)  # small models run fastest on one thread; section 5 (SD 1.5) gives them back
setup_notebook()  # seed 0, small inline figures; prints the device

# %% [markdown]
# ## 1. How big is Stable Diffusion 1.5?
#
# The course's modules take SD 1.5's configs as presets (`UNetConfig.sd15()`, `AutoencoderConfig.sd15()`,
# `CLIPTextConfig.vit_l14()`). Built on PyTorch's **meta device**, a module has every parameter's shape but no
# storage, so we can count SD 1.5's 1.07 billion parameters without allocating 4 GB.

# %%
with torch.device("meta"):
    sd_unet, sd_vae, sd_text = (
        UNet(UNetConfig.sd15()),
        AutoencoderKL(AutoencoderConfig.sd15()),
        CLIPTextModel(CLIPTextConfig.vit_l14()),
    )


def count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


rows = {
    "VAE encoder (+ quant_conv)": count(sd_vae.encoder, sd_vae.quant_conv),
    "VAE decoder (+ post_quant_conv)": count(sd_vae.decoder, sd_vae.post_quant_conv),
    "UNet": count(sd_unet),
    "CLIP text encoder (ViT-L/14)": count(sd_text),
}
total = sum(rows.values())
print(f"{'part':34s} {'parameters':>14s} {'share':>7s} {'fp32 MB':>8s}")
for name, n in rows.items():
    print(f"{name:34s} {n:14,d} {n / total:7.1%} {4 * n / 2**20:8.0f}")
print(f"{'total':34s} {total:14,d} {1:7.1%} {4 * total / 2**20:8.0f}")
del sd_unet, sd_vae, sd_text

# %% [markdown]
# The UNet holds four fifths of the model, and it runs once (twice, with guidance) per denoising step; the
# text encoder runs once per prompt and the decoder once per image. That is why chapter 05's memory and speed
# work targets the UNet's attention.
#
# ## 2. The pipeline one stage at a time
#
# We use the course's own text-to-image model when it is there (`checkpoints/course_t2i`, written by
# `train_text_to_image.py`); otherwise a tiny *random* pipeline stands in, so every cell still runs (its
# images are noise, not pictures: the cell says which one you have).

# %%
if (COURSE_MODEL / "model_index.json").is_file():
    pipe = StableDiffusion.from_pretrained(COURSE_MODEL, device="cpu")
    which = "the course model (checkpoints/course_t2i)"
else:
    pipe = tiny_random_pipeline()
    which = "a tiny RANDOM pipeline (the course model is not trained yet: its images are noise)"
size = pipe.unet.config.sample_size * pipe.vae_scale_factor
steps = budget(fast=3, cpu=25)
print("using", which)
print(pipe)
print(
    f"images {size} px, latents {pipe.vae.config.latent_channels} x {size // pipe.vae_scale_factor} x "
    f"{size // pipe.vae_scale_factor}, {steps} steps"
)

# %% [markdown]
# **Tokenize.** The tokenizer turns the prompt into a fixed-length row of ids: `<bos>`, the words, `<eos>`,
# then padding up to the context length. The course model reads Shapes captions with a word-level tokenizer;
# SD 1.5 uses CLIP's byte-pair tokenizer with 77 positions. The same call works for both.

# %%
prompt = "a small red circle at the top left"
ids = pipe.tokenizer([prompt, ""])
print("ids:", ids[0].tolist())
print("tokens:", pipe.token_strings(prompt)[:10], "...")
print("the empty prompt (guidance's unconditional input):", ids[1].tolist()[:6], "...")

# %% [markdown]
# **Encode.** The text encoder turns ids into one vector per position, the context c (B, N_k, D_c) that every
# cross-attention layer of the UNet reads. Guidance needs two: the prompt's and the empty prompt's (or a
# negative prompt's), stacked in diffusers' order [uncond, cond].

# %%
context = pipe.encode_prompt(["", prompt])  # (2, N_k, D_c)
print("context:", tuple(context.shape), f"mean {context.mean():.3f} std {context.std():.3f}")

# %% [markdown]
# **Initial noise.** z_T ~ N(0, I) of shape (B, 4, H/f, W/f), drawn from a seeded generator exactly as
# diffusers draws it (`torch.randn(shape, generator=g)`, times the sampler's `init_noise_sigma`, 1 for DDIM):
# the same seed gives the same image in both libraries.

# %%
sampler = pipe.make_sampler("ddim", steps)
f = pipe.vae_scale_factor
g = torch.Generator().manual_seed(0)
z = (
    torch.randn((1, pipe.vae.config.latent_channels, size // f, size // f), generator=g)
    * sampler.init_noise_sigma
)
print("z_T:", tuple(z.shape), f"std {z.std():.3f}; timesteps {sampler.timesteps.tolist()}")

# %% [markdown]
# **One denoising step, with classifier-free guidance.** The UNet runs once on the batch [z_t, z_t] with
# [c_uncond, c]; the two predictions are combined as eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022):
# s = 1 is the conditional model alone, larger s pushes further along the direction the prompt adds. The
# sampler then takes the step z_t -> z_{t_prev}; from eps we can also read the model's current guess of the
# clean latent, x0_pred = (z_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t).

# %%
s = 7.5
t = sampler.timesteps[0]
with torch.no_grad():
    eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, context).chunk(2)
eps = eps_u + s * (eps_c - eps_u)
x0_pred = pipe.schedule.predict_x0(eps, z, t)
z_next = sampler.step(eps, t, z)
print(
    f"t = {int(t)}: |eps_c - eps_u| = {(eps_c - eps_u).abs().mean():.4f} (what the prompt changes), "
    f"|eps| = {eps.abs().mean():.3f}"
)
print(f"z_t std {z.std():.3f} -> z_(t_prev) std {z_next.std():.3f}; x0_pred std {x0_pred.std():.3f}")

# %% [markdown]
# **The loop, then decode.** Repeating the step over all timesteps gives z_0; the VAE's decoder turns
# z_0 / scaling_factor into pixels in [-1, 1], shown as (x / 2 + 0.5) clamped to [0, 1]. We keep x0_pred at
# every step to watch the image appear.

# %%
trajectory = []
zt = z
with torch.no_grad():
    for t in sampler.timesteps:
        eps_u, eps_c = pipe.unet(torch.cat([zt, zt]), t, context).chunk(2)
        eps = eps_u + s * (eps_c - eps_u)
        trajectory.append(pipe.schedule.predict_x0(eps, zt, t))
        zt = sampler.step(eps, t, zt)
    by_hand = (pipe.vae.decode(zt / pipe.vae.config.scaling_factor) / 2 + 0.5).clamp(0, 1)
    shown = [trajectory[i] for i in sorted({0, len(trajectory) // 3, 2 * len(trajectory) // 3})] + [zt]
    frames = [(pipe.vae.decode(x / pipe.vae.config.scaling_factor) / 2 + 0.5).clamp(0, 1) for x in shown]
show(
    image_grid(
        torch.cat(frames),
        captions=["x0_pred, step 1", "x0_pred, 1/3", "x0_pred, 2/3", "z_0"][-len(frames) :],
        value_range=(0, 1),
        size=1.4,
    )
)
print("Figure: the decoded clean-image guess early, a third and two thirds in, and the final image.")

# %% [markdown]
# **The same with one call.** `StableDiffusion.__call__` does exactly these stages (plus a progress bar,
# batching and checks); with the same seed it gives the same image. The tests check the same against
# diffusers' `StableDiffusionPipeline` with the same weights (DDIM and DPM-Solver++, within 1/255).

# %%
t0 = time.perf_counter()
out = pipe(
    prompt,
    num_inference_steps=steps,
    guidance_scale=s,
    generator=0,
    sampler="ddim",
    output_type="pt",
    progress=False,
)
print(
    f"one call: {time.perf_counter() - t0:.2f} s; max |pipeline - by hand| "
    f"= {(out.images - by_hand).abs().max():.2e}"
)

# %% [markdown]
# ## 3. The knobs
#
# **Guidance scale.** Rows are seeds, columns scales. The first column is the unconditional model: the empty
# prompt alone, which is what s = 0 means in the guidance formula. (The pipeline, like diffusers, skips the
# unconditional pass for any s <= 1 and returns the conditional prediction, so `guidance_scale=0` would not
# show it: we ask for the empty prompt instead.) s = 1 is the conditional model without guidance.

# %%
scales = [1.0, 7.5] if is_fast() else [1.0, 2.0, 4.0, 7.5, 12.0]
seeds = [0, 1]
with torch.no_grad():
    grid = []
    for sd in seeds:
        grid.append(
            pipe(
                "",
                num_inference_steps=steps,
                guidance_scale=1.0,
                generator=sd,
                output_type="pt",
                progress=False,
            ).images
        )  # s = 0: the unconditional model
        grid += [
            pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=sc,
                generator=sd,
                output_type="pt",
                progress=False,
            ).images
            for sc in scales
        ]
captions = [
    f"seed {sd}, {'s = 0 (uncond.)' if sc is None else f's = {sc:g}'}"
    for sd in seeds
    for sc in [None, *scales]
]
show(image_grid(torch.cat(grid), captions=captions, ncols=len(scales) + 1, value_range=(0, 1), size=1.3))
print(
    f"Figure: '{prompt}' unconditionally and at guidance scales {scales} (columns) for seeds {seeds} (rows)."
)

# %% [markdown]
# What the grid shows: at s = 0 the model draws whatever it likes; from s = 1 on it draws the prompt, and on a
# one-object prompt that this model already gets right, more guidance changes the picture very little. One
# grid says little about a scale, so chapter 04 measured it on this same model: 8 held-out prompts x 24 seeds
# at each scale, graded by the judge, with the spread of the images across seeds as a measure of diversity
# (`python 04_cross_attention/guidance_sweep.py`; the committed results are read here, not recomputed).

# %%
ROOT = COURSE_MODEL.parents[1]  # the repository
SWEEP = json.loads((ROOT / "04_cross_attention" / "guidance_sweep_course.json").read_text())
curves = SWEEP["curves"]
print(
    f"{SWEEP['model']}, DDIM {SWEEP['steps']} steps, {SWEEP['seeds']} seeds per prompt; command: "
    f"{SWEEP['command']}"
)
print("   s   one object right   two objects right   diversity (one / two objects)")
for k, scale in enumerate(curves["scales"]):
    one, two = curves["one object"], curves["two objects"]
    print(
        f"{scale:>4g}   {one['adherence'][k]['mean']:>16.2f}   {two['adherence'][k]['mean']:>17.2f}   "
        f"{one['diversity'][k]['mean']:.3f} / {two['diversity'][k]['mean']:.3f}"
    )
display(Image(filename=str(ROOT / "04_cross_attention" / "guidance_sweep_course.png"), width=900))

# %% [markdown]
# Read the curves, not the grid: guidance buys prompt following where the model is unsure. One-object prompts
# are already 93% right at s = 1 and saturate by s = 2; two-object prompts climb from 51% at s = 1 to about
# 70% at s = 5-7.5 and fall back a little at 12. Diversity across seeds is what it costs: for one-object
# prompts it drops from 0.061 at s = 1 to 0.036 at s = 12 (the same object, drawn ever more alike); two-object
# scenes keep most of theirs, because the seeds still disagree on where the objects go.

# %% [markdown]
# **Attention maps.** With `capture_attention=True` the pipeline records the cross-attention weights of every
# layer at every step (`common.attention.capture_attention_maps`) and averages them into one map per token:
# where in the image each word was looked at (Hertz et al. 2022).

# %%
two = "a small red circle on the left of a large blue square"
res = pipe(
    two,
    num_inference_steps=steps,
    guidance_scale=s,
    generator=0,
    output_type="pt",
    capture_attention=True,
    progress=False,
)
tokens = res.tokens[0]
words = [
    i for i, w in enumerate(tokens) if w in ("small", "red", "circle", "left", "large", "blue", "square")
]
show(
    overlay_attention(
        res.images[0], res.attention_maps[0, words], [tokens[i] for i in words], value_range=(0, 1), size=1.4
    )
)
print(f"Figure: '{two}' and the cross-attention of each word, averaged over steps, layers and heads.")

# %% [markdown]
# **img2img** (SDEdit, Meng et al. 2022): encode an image, noise it to the timestep that `strength` picks, and
# denoise from there. Strength 0 gives the image back (through the VAE), strength 1 ignores it. **Inpainting**
# with the same model: after every step the known part of the latent is replaced by the original, noised to
# the current level, so only the white part of the mask is generated (latent blending).
#
# To see both halves of that promise, the cell picks the first test image with one object in each half, keeps
# the right half (its object must survive untouched) and asks for a different object on the left: a red circle
# where there was something else.

# %%
from common.shapes import Shapes  # noqa: E402

test_set = Shapes(resolution=max(size, 32), split="test", length=200, seed=0)
W_img = test_set.resolution


def one_object_per_half(item) -> bool:
    xs = sorted(obj["center"][0] for obj in item["objects"])
    return len(xs) == 2 and xs[0] < 0.4 * W_img and xs[1] > 0.6 * W_img


item = next(test_set[i] for i in range(len(test_set)) if one_object_per_half(test_set[i]))
right = max(item["objects"], key=lambda obj: obj["center"][0])  # the object the inpainting must keep
base = (item["image"][None] + 1) / 2  # (1, 3, H, W) in [0, 1]
base = (
    torch.nn.functional.interpolate(base, size=(size, size), mode="area") if base.shape[-1] != size else base
)
strengths = [0.0, 0.3, 0.6, 0.9]
edit_prompt = "a large blue circle at the center"
edits = [
    pipe(
        edit_prompt,
        image=base,
        strength=st,
        num_inference_steps=steps,
        guidance_scale=s,
        generator=0,
        output_type="pt",
        progress=False,
    ).images
    for st in strengths
]
mask = torch.zeros(1, 1, size, size)
mask[..., :, : size // 2] = 1.0  # repaint the left half
inpaint_prompt = f"a large red circle to the left of a {right['size']} {right['color']} {right['shape']}"
inpainted = pipe(
    inpaint_prompt,
    image=base,
    mask_image=mask,
    strength=1.0,
    num_inference_steps=steps,
    guidance_scale=s,
    generator=0,
    output_type="pt",
    progress=False,
).images
show(
    image_grid(
        torch.cat([base, *edits, mask.expand(1, 3, size, size), inpainted]),
        captions=[item["caption"]]
        + [f"img2img {st:g}" for st in strengths]
        + ["mask: white = repaint", "inpainted"],
        ncols=7,
        value_range=(0, 1),
        size=1.3,
    )
)
kept = (inpainted - edits[0])[..., size // 2 + f :].abs().mean().item()  # edits[0]: the image through the VAE
repainted = (inpainted - edits[0])[..., : size // 2].abs().mean().item()
vae_error = (edits[0] - base).abs().mean().item()
print(
    f"Figure: a Shapes test image, img2img towards '{edit_prompt}' at strengths {strengths}, and inpainting "
    f"of its left half with '{inpaint_prompt}'.\n"
    f"Mean change against the VAE's own version of the image: right half (kept) {kept:.3f}, left half "
    f"(repainted) {repainted:.3f}; the VAE's reconstruction error: {vae_error:.3f}"
)

# %% [markdown]
# ## 4. The course model: results and metrics
#
# `train_text_to_image.py` trains the course's model from scratch on Shapes (frozen course VAE,
# CLIP-architecture text encoder and cross-attention UNet trained jointly, caption dropout for guidance) and
# `evaluate.py` measures how well it follows prompts with a judge trained on Shapes' ground truth. Both
# write into the model card.

# %%
card = COURSE_MODEL / "README.md"
if card.is_file() and "## Metrics" in card.read_text():
    print(card.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0].strip())
else:
    print(
        "SKIPPED: no course model card with metrics yet (checkpoints/course_t2i/README.md); run "
        "06_stable_diffusion_architecture/train_text_to_image.py --ship "
        "checkpoints/course_t2i, then evaluate.py"
    )

# %%
held_out = [
    "a small red circle at the top left",
    "a large blue square at the bottom right",
    "a small green triangle in the center",
    "a small yellow circle above a large purple square",
]
with torch.no_grad():
    samples = pipe(
        held_out, num_inference_steps=steps, guidance_scale=s, generator=0, output_type="pt", progress=False
    ).images
show(image_grid(samples, captions=held_out, ncols=4, value_range=(0, 1), size=1.5))
print(f"Figure: {which}, one seed per prompt, {steps} DDIM steps, guidance {s}.")

# %% [markdown]
# ## 5. The model a laptop trains, both stages of it
#
# The model above took a GPU. `train_text_to_image.py --config cpu` trains one from scratch on two CPU cores
# in under half an hour (`checkpoints/course_t2i_cpu`), and it is Stable Diffusion's recipe in both stages.
# Two choices make it fit:
#
# * **Stage 1 at f = 8.** The autoencoder (`checkpoints/vae_shapes_f8`, trained by chapter 01's `train_vae.py
#   --factor 8`) turns a 64 px image into 4 x 8 x 8 latents, SD's own factor: a quarter of the pixels of the
#   f = 4 VAE's 4 x 16 x 16, so the UNet (2.8 M parameters) sees twice as many captions a second. The price is
#   paid in stage 1: a small object is one or two latent pixels, and the first grid below shows the
#   autoencoder learning to keep its shape. Its reconstructions keep the shape of all 100 held-out one-object
#   scenes of the evaluation (the chapter README follows that through training: a VAE stopped at half the
#   steps turns small blue crosses, a colour-shape pair it never saw, into diamonds). Whatever the VAE
#   loses, no diffusion model on its latents can draw.
# * **Stage 2 predicts v on a zero-terminal-SNR schedule** and samples from the last timestep (SD 2.x's fix,
#   Lin et al. 2023; chapter 06b derives it). Section 5.1 shows why that matters for *where* things go.
#
# Both stages kept their weights as they trained (`train_vae.py --keep-checkpoints`, `train_text_to_image.py
# --snapshot-every`), and `training_stages.py` looked back at them: the loss curves, the same held-out images
# through each kept autoencoder, and the same prompts from the same noise through each kept diffusion model.
# The notebook reads what that command wrote (`results/training/`), so this cell is instant.

# %%
STAGES = ROOT / "06_stable_diffusion_architecture" / "results" / "training"
if (STAGES / "stages.json").is_file():
    import matplotlib.pyplot as plt
    from PIL import Image as PILImage

    stages = json.loads((STAGES / "stages.json").read_text())
    for key, title in (
        ("vae", "stage 1: autoencoder, L1 reconstruction loss"),
        ("t2i", "stage 2: diffusion model, v loss (Min-SNR weighted)"),
    ):
        steps_, losses = zip(*stages[key]["loss"])
        fig = plot_loss_curves({"step": steps_, "loss": losses}, smoothing=0.9, logy=True, title=title)
        for row in stages[key]["rows"]:
            fig.axes[0].axvline(row["step"], color="C3", lw=0.6, ls=":")
        show(fig)
    print(
        "Figures: each stage's training loss (faint: as logged; solid: smoothed); "
        "dotted lines: the kept steps shown below."
    )
    for key, png, label in (
        ("vae", "vae_stage.png", lambda r: f"step {r['step']}: {r['psnr']:.1f} dB"),
        ("t2i", "t2i_stage.png", lambda r: f"step {r['step']} ({r['minutes']:.0f} min)"),
    ):
        grid = PILImage.open(STAGES / png)
        rows = stages[key]["rows"]
        labels = (["held-out input"] if key == "vae" else []) + [label(r) for r in rows]
        fig, ax = plt.subplots(figsize=(grid.width / 60, grid.height / 60))
        ax.imshow(grid)
        ax.set_yticks([2 + 66 * i + 32 for i in range(len(labels))], labels)
        ax.set_xticks(
            [2 + 66 * i + 32 for i in range(grid.width // 66)],
            [] if key == "vae" else [str(i + 1) for i in range(len(stages["prompts"]))],
        )
        ax.tick_params(length=0)
        ax.set_title(
            "stage 1: the same held-out images through each kept autoencoder"
            if key == "vae"
            else "stage 2: the same prompts and noise through each kept model"
        )
        plt.show()
    print(f"Stage 2 sampling: {stages['sampling']}. Columns:")
    for i, prompt in enumerate(stages["prompts"]):
        print(f"  {i + 1}. {prompt}")
else:
    print(
        "SKIPPED: no results/training/stages.json; make it with "
        "06_stable_diffusion_architecture/training_stages.py (see the chapter README)"
    )

# %% [markdown]
# ### 5.1 Where the noise leaks the layout
#
# SD 1.x's schedule ends at $\bar\alpha_{999} = 0.0047$, not 0: the noisiest latent a model trains on is
# $z_{999} = 0.068\,z_0 + 0.998\,\varepsilon$, so a trace of the picture survives. A model trained on it
# learns to read the *layout* off that trace rather than off the caption; at sampling time there is no
# trace, only noise, and it reads a random layout from it. `signal_leak.py` measures how much a simple
# matched filter (the mean latent of each of the nine grid cells) can tell about where a one-object scene's
# object is from $z_t$:

# %%
LEAK = ROOT / "06_stable_diffusion_architecture" / "results" / "signal_leak.json"
if LEAK.is_file():
    leak = json.loads(LEAK.read_text())
    print(f"{'VAE':14s} {'latent':8s} {'schedule':18s}" + "".join(f"   t={t}" for t in (999, 961, 900, 800)))
    for vae_name in dict.fromkeys(r["vae"] for r in leak["rows"]):
        for sched in ("SD 1.x", "zero terminal SNR"):
            rs = [r for r in leak["rows"] if r["vae"] == vae_name and r["schedule"] == sched]
            print(
                f"{vae_name:14s} {rs[0]['latent']:8s} {sched:18s}"
                + "".join(f"  {r['accuracy']:6.1%}" for r in rs)
            )
    print(
        f"chance: {leak['chance']:.1%} ({leak['test_scenes']} held-out scenes; "
        "python 06_stable_diffusion_architecture/signal_leak.py --out ...)"
    )
else:
    print("SKIPPED: no results/signal_leak.json (06_stable_diffusion_architecture/signal_leak.py --out it)")

# %% [markdown]
# On SD 1.x's schedule every latent the model trains on shows where the object is, more so with more latent
# pixels per object (f = 4), so predicting the noise never requires deciding the layout from the caption. At
# sampling time the starting latent is pure noise, the model reads a layout from it all the same, and the
# object lands wherever the noise suggests: a laptop's eps runs drew colour, size and shape from the caption
# but put the object in the right cell only by chance (the chapter README has the runs). With zero terminal
# SNR the filter is at chance at t = 999, and the model has to lay the picture out from the words: the laptop
# model puts every one-object scene's object in the right cell. Fixing the schedule was not enough on its own,
# though; the loss's weighting decides what the model learns first, which is the next section.

# %% [markdown]
# ### 5.2 Where the loss spends its gradient
#
# Every objective in this chapter is a weighted error on $z_0$ in disguise. Write $z_t = \alpha_t z_0 +
# \sigma_t \varepsilon$ with $\alpha_t = \sqrt{\bar\alpha_t}$, $\sigma_t = \sqrt{1 - \bar\alpha_t}$ and
# $\mathrm{SNR}_t = \alpha_t^2 / \sigma_t^2$. A prediction of the noise, $\hat\varepsilon$, implies
# $\hat z_0 = (z_t - \sigma_t \hat\varepsilon) / \alpha_t$, so $\hat\varepsilon - \varepsilon =
# -(\alpha_t / \sigma_t)(\hat z_0 - z_0)$; a prediction of $v = \alpha_t \varepsilon - \sigma_t z_0$ implies
# $\hat z_0 = \alpha_t z_t - \sigma_t \hat v$, so $\hat v - v = -(\hat z_0 - z_0) / \sigma_t$. Squared:
#
# $$\|\hat\varepsilon - \varepsilon\|^2 = \mathrm{SNR}_t\,\|\hat z_0 - z_0\|^2, \qquad
#   \|\hat v - v\|^2 = (\mathrm{SNR}_t + 1)\,\|\hat z_0 - z_0\|^2 .$$
#
# Min-SNR-$\gamma$ caps that factor at $\gamma = 5$. So the eps model of the GPU recipe weights the $z_0$
# error by $\min(\mathrm{SNR}_t, 5)$: almost nothing at high noise. The plain v loss, capped, weights it by
# $\min(\mathrm{SNR}_t + 1, 5)$: at least 1 everywhere, and on the zero-terminal-SNR schedule half the
# timesteps have $\mathrm{SNR}_t < 0.32$. The weight is half the story; the other half is the error itself,
# which grows with the noise (at $t = 999$ the model can only guess the caption's average picture). Their
# product is where the loss goes. The cell measures the laptop model's $z_0$ error at each noise level on
# training scenes and multiplies it by each weighting:

# %%
from matplotlib.figure import Figure  # noqa: E402

from common.judge import real_renders  # noqa: E402

LAPTOP = ROOT / "checkpoints" / "course_t2i_cpu"
if (LAPTOP / "model_index.json").is_file():
    laptop = StableDiffusion.from_pretrained(LAPTOP, device="cpu")
    sched = laptop.schedule  # v prediction on the zero-terminal-SNR schedule
    scenes = Shapes.prompts("train", budget(fast=16, cpu=128), 7, (1, 2))
    ts = torch.tensor([*range(0, 1000, 50), 999])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z0 = laptop.vae.encode(2 * real_renders(scenes) - 1).mean * laptop.vae.config.scaling_factor
        context = laptop.encode_prompt(scenes)
        err = []  # E || z0_hat - z0 ||^2 at each t
        for t in ts.tolist():
            tt = torch.full((len(z0),), t)
            z_t = sched.add_noise(z0, torch.randn(z0.shape, generator=g), tt)
            z0_hat = sched.v_to_x0(laptop.unet(z_t, tt, context), z_t, tt)
            err.append((z0_hat - z0).pow(2).mean())
    err, snr = torch.stack(err).double(), sched.snr(ts).double()
    weightings = {
        "eps, Min-SNR: min(SNR, 5)": snr.clamp(max=5),
        "v, Min-SNR on SNR + 1: min(SNR + 1, 5)": (snr + 1).clamp(max=5),
        "v, the laptop's: min(SNR + 0.1, 5)": (snr + 0.1).clamp(max=5),
    }
    fig = Figure(figsize=(7, 3.2))  # a Figure of its own: show() draws it once
    ax = fig.subplots()
    for label, w in weightings.items():
        mass = w * err / (w * err).sum()
        share = mass[ts >= 500].sum()
        ax.plot(ts, mass, marker=".", label=f"{label}: {share:.0%} at t >= 500")
    ax.set(
        xlabel="timestep t (999 = pure noise)",
        ylabel="share of the loss",
        title="where each loss puts its weight",
    )
    ax.legend(fontsize=8)
    show(fig)
    print(
        "Figure: weight(t) x the laptop model's measured z0 error at t, normalised per weighting "
        f"({len(scenes)} training scenes, one noise draw each)."
    )
else:
    print("SKIPPED: no checkpoints/course_t2i_cpu (train it: see the chapter README)")

# %% [markdown]
# The plain v loss, capped, puts about four fifths of its weight on the noisier half of the timesteps, where
# the picture is still a guess and only the layout is being decided; eps with Min-SNR puts about three
# quarters on the cleaner half, where shapes are drawn. Trained at equal compute on these latents (the
# chapter README has the runs), the eps model drew shapes and not positions, and the $\mathrm{SNR} + 1$ v
# model positions and not shapes. The laptop's loss, $\min(\mathrm{SNR}_t + 0.1, 5)$ on the $z_0$ error,
# spreads its weight about evenly over the noise levels: enough on pure noise to learn the layout from the
# caption, and as much again on the cleaner half, where shapes are drawn. With everything else the same, it
# nearly doubled the two-object score (0.27 to 0.50). It also has a price, visible in the relation error of
# its training curve: where the *two* objects of a pair go is decided at high noise, the weight it gave up,
# and some pairs it draws right come out in the wrong order.

# %% [markdown]
# ### 5.3 The laptop model beside the GPU model
#
# Both models' held-out scores, read from their model cards (each card names the `evaluate.py` command that
# measured it), then the same held-out prompts drawn by both from the same seed, and the judge's verdict on
# every image: which attribute, if any, it got wrong.

# %%


def held_out_rows(card: Path) -> dict:
    """{(sampler, steps, set): all} from a model card's metrics tables."""
    rows = {}
    if not card.is_file() or "## Metrics" not in card.read_text():
        return rows
    for line in card.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 5 and cells[2].startswith("held-out") and cells[1].isdigit():
            rows[(cells[0], int(cells[1]), cells[2])] = float(cells[4])
    return rows


gpu_rows, cpu_rows = held_out_rows(COURSE_MODEL / "README.md"), held_out_rows(LAPTOP / "README.md")
print(
    f"{'sampler':10s} {'steps':>5s}   {'GPU model: 1 / 2 objects':>26s}   "
    f"{'laptop model: 1 / 2 objects':>28s}"
)
for sampler, k in (("ddim", 25), ("dpmpp_2m", 20), ("ddpm", 50)):
    cells = []
    for rows in (gpu_rows, cpu_rows):
        one, two = rows.get((sampler, k, "held-out 1 object")), rows.get((sampler, k, "held-out 2 objects"))
        cells.append("n/a" if one is None else f"{one:.0%} / {two:.0%}")
    print(f"{sampler:10s} {k:5d}   {cells[0]:>26s}   {cells[1]:>28s}")
if (LAPTOP / "model_index.json").is_file():
    laptop = StableDiffusion.from_pretrained(LAPTOP, device="cpu")
    with torch.no_grad():
        both = [
            p(
                held_out,
                num_inference_steps=steps,
                guidance_scale=3.0,
                generator=0,
                output_type="pt",
                progress=False,
            ).images
            for p in (pipe, laptop)
        ]
    show(
        image_grid(
            torch.cat(both),
            captions=[f"GPU: {h}" for h in held_out] + [f"laptop: {h}" for h in held_out],
            ncols=4,
            value_range=(0, 1),
            size=1.5,
        )
    )
    print(
        f"Figure: the same held-out prompts and seed, top row {which}, bottom row the laptop's model; "
        f"{steps} steps, guidance 3."
    )
    from common.judge import JUDGE_DIR, Judge

    judge = Judge.load(JUDGE_DIR)
    for name, images in zip(("GPU", "laptop"), both):
        for rec in judge.score(images, held_out)["records"]:
            wrong = [
                k
                for k in ("count", "color", "shape", "size", "position", "pair_objects", "relation")
                if k in rec and not rec[k] and not (k == "relation" and not rec.get("pair_objects"))
            ]
            print(
                f"{name:6s} {rec['prompt']!r}: " + ("right" if rec["all"] else "wrong: " + ", ".join(wrong))
            )
    del laptop
else:
    print("SKIPPED: no checkpoints/course_t2i_cpu (train it: see the chapter README)")

# %% [markdown]
# ## 6. Real Stable Diffusion 1.5 in the course's code
#
# `StableDiffusion.from_pretrained` reads SD 1.5's diffusers folder or its single-file checkpoint
# (`v1-5-pruned-emaonly.safetensors`, with the original CompVis key names, mapped in `common/single_file.py`;
# give SD's CLIP tokenizer folder as `tokenizer_path`). `python -m common.weights fetch sd15` fetches the
# diffusers folder where this cell looks for it; or point `$SD15_PATH` at either.
# It needs about 5 GB of RAM and a minute per 512 px image on a laptop CPU (25 steps), so it never runs under
# `COURSE_FAST=1`.

# %%
sd_path = sd15_path()
if is_fast() or sd_path is None or not sd_path.exists():
    print(
        f"SKIPPED: {'fast mode' if is_fast() else 'SD 1.5 is not on disk'}; fetch it once (about 4.3 GB) "
        "with `python -m common.weights fetch sd15`, or set $SD15_PATH to a diffusers "
        "folder or a .safetensors file"
    )
else:
    del pipe  # at most one big model in memory
    torch.set_num_threads(threads)
    sd = StableDiffusion.from_pretrained(sd_path, tokenizer_path=os.environ.get("SD15_TOKENIZER"))
    print(sd)
    t0 = time.perf_counter()
    img = sd(
        "a watercolor painting of a red fox in the snow",
        num_inference_steps=25,
        guidance_scale=7.5,
        generator=0,
        height=512,
        width=512,
        sampler="dpmpp_2m",
    ).images[0]
    print(f"512 px in {time.perf_counter() - t0:.0f} s")
    display(img.resize((256, 256)))

# %% [markdown]
# ## Summary
#
# * Stable Diffusion is four parts around a loop: tokenizer -> text encoder (123 M parameters) -> UNet (860 M,
#   run once per step on [uncond, cond]) -> VAE decoder (49 M). The VAE encoder (34 M) is only needed for
#   img2img and inpainting.
# * Classifier-free guidance costs a second UNet pass per step and buys prompt following; its scale trades
#   diversity for fidelity.
# * Drawing the initial noise exactly as diffusers does makes the course pipeline a drop-in: same weights,
#   same seed, same image (tested within 1/255 for DDIM and DPM-Solver++, both ways, and from a
#   single-file checkpoint).
# * img2img and inpainting need no new model: they change where the loop starts and what it may change.
#
# ## Exercises
#
# In `exercises.py` (grade with `python -m common.grade 06`):
#
# 1. `img2img_timesteps`: which of the sampler's timesteps img2img visits at a given strength.
# 2. `sample_with_cfg`: write the sampling loop with classifier-free guidance yourself; graded against the
#    pipeline with the same seed.
# 3. `img2img_strength_sweep`: how far img2img moves from the input as the strength grows.
# 4. `prompt_study` (open-ended): which wording of a prompt does the course model follow best? Score with the
#    chapter's judge.
# 5. `sampler_swap` (open-ended): DDIM, DDPM and DPM-Solver++ at equal steps against a many-step reference.
