"""Which pixels does each word look at? The share of a word's cross-attention inside
its object, against chance.

    python 04_cross_attention/attention_maps.py                # the course model (checkpoints/course_t2i)
    python 04_cross_attention/attention_maps.py --model tiny   # a tiny random pipeline: the chance baseline
    COURSE_FAST=1 python 04_cross_attention/attention_maps.py --out /tmp/attention_maps  # seconds (the tests)

Cross-attention maps read as word-to-region associations, made measurable
(attention maps as in Hertz et al. 2022, "Prompt-to-Prompt", sec. 3.1):

1. prompts: two-object Shapes scenes from the held-out test split whose objects differ in colour, captioned
   "a {size} {colour} {shape} {relation} a {size} {colour} {shape}";
2. generate each with the pipeline capturing cross-attention: A_j(x), the weight pixel x gives token j,
   averaged over heads, layers (each upsampled to the image), the denoising steps and the
   conditional half of the batch;
3. for each object k and each of its two words w (its colour word and its shape word):
       share(w, M) = sum_{x in M} A_w(x) / sum_x A_w(x)      chance(M) = |M| / (H W)
   for M = M_k, the object's mask ("own"), and M = the other object's mask ("other");
4. report, per word kind, the mean share in its own object's mask, in the other object's, the mean chance, the
   lift (share / chance) and two rates: share > chance, and own > other (the word binds to ITS object).

Which masks. The model decides where the objects go (the relation fixes only their order along an axis), so
the canonical layout of the parsed prompt need not match the image. The main figure therefore uses masks of
the GENERATED image: ``common.judge.segment`` finds the objects against the plain background and each
component is named by its colour; object k's mask is the union of the components of its colour (a colour the
model did not draw leaves that object out, counted in "found"; so does a component over ``MAX_AREA`` of the
image, which is a noisy background rather than an object). The colours differ, so the two masks never mix up.
The masks of the parsed scene's canonical layout (``common.shapes.parse`` + ``render``) are reported beside
it, over every object: they measure attention and layout adherence together. A random pipeline
gives the chance baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import cli
from common.runtime import budget, describe, get_device, is_fast, seed_everything

ROOT = Path(__file__).resolve().parents[1]
COURSE_MODEL = ROOT / "checkpoints" / "course_t2i"
SOURCES = ("generated", "layout")
WORDS = ("colour", "shape")
N_EXAMPLES = 4  # prompts shown in the figure
MAX_AREA = 0.25  # the largest Shapes object (a large square) covers under 10% of the image


def tiny_pipeline(seed: int = 0, device=None):
    """A tiny random pipeline over the Shapes tokenizer (32 px images): every step runs, nothing is learnt."""
    from common.pipeline import tiny_random_pipeline

    return tiny_random_pipeline(seed).to(get_device(device))


def load_pipeline(model: str, device=None):
    """``"tiny"``, ``"auto"`` (the course model; the tiny pipeline under COURSE_FAST)
    or a diffusers folder."""
    from common.pipeline import StableDiffusion

    if model == "tiny" or (model == "auto" and is_fast()):
        return tiny_pipeline(device=device), "tiny random pipeline"
    path = COURSE_MODEL if model == "auto" else Path(model)
    if not (path / "model_index.json").is_file():
        raise SystemExit(
            f"no model at {path} (no model_index.json): train the course model with "
            "`python 04_cross_attention/train_text_to_image.py`, pass --model PATH, or --model tiny "
            "for the untrained baseline"
        )
    return StableDiffusion.from_pretrained(path, device=device), str(
        path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    )


def two_object_prompts(n: int, seed: int) -> list[str]:
    """n held-out two-object prompts whose objects differ in colour (paraphrase 0: "a A relation a B")."""
    from common.shapes import Shapes

    prompts = []
    for scene in Shapes.scenes("test", 4 * n + 8, seed, n_objects=(2,)):
        if scene.objects[0].color != scene.objects[1].color:
            prompts.append(scene.caption(0))
        if len(prompts) == n:
            return prompts
    raise ValueError(f"could not find {n} two-colour prompts; ask for fewer")


def word_positions(tokens: list[str], scene) -> list[dict[str, int]]:
    """Per object, the context positions of its colour word and of its shape word
    (the first after the colour)."""
    out = []
    for o in scene.objects:
        c = tokens.index(o.color)  # the colours differ, so each colour word occurs once
        s = next(i for i in range(c + 1, len(tokens)) if tokens[i] == o.shape)
        out.append({"colour": c, "shape": s})
    return out


def generated_masks(image: torch.Tensor, scene) -> list[np.ndarray | None]:
    """Object masks in a generated image (3, H, W) in [0, 1]: components of each object's colour, or None."""
    from common.judge import object_color, segment, to_uint8

    rgb = to_uint8(image)[0]  # (H, W, 3) in 0..255
    # a "component" over MAX_AREA of the image is not an object but a background that is not plain (noise)
    components = [(m, object_color(rgb, m)) for m in segment(rgb) if m.mean() <= MAX_AREA]
    masks = []
    for o in scene.objects:
        mine = [m for m, colour in components if colour == o.color]
        masks.append(np.logical_or.reduce(mine) if mine else None)
    return masks


def layout_masks(scene, resolution: int) -> list[np.ndarray]:
    """The parsed scene's canonical-layout masks at the image's resolution."""
    from common.shapes import render

    return list(render(scene, resolution)[1].numpy())


def mass_in_mask(attn_map: torch.Tensor, mask: np.ndarray) -> tuple[float, float]:
    """(share of the map's mass inside the mask, the mask's area fraction). attn_map
    (H, W), mask (H, W) bool."""
    a = attn_map.double()
    m = torch.from_numpy(np.asarray(mask, bool))
    return float(a[m].sum() / a.sum().clamp_min(1e-12)), float(m.double().mean())


def measure(
    pipe,
    prompts: list[str],
    *,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int,
    size: int | None,
) -> tuple[list[dict], list[dict]]:
    """Generate every prompt with attention capture; returns (one row per object word and
    mask source, examples)."""
    from common.shapes import parse

    rows, examples = [], []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        if start:
            print(f"  {start}/{len(prompts)} prompts, {time.perf_counter() - t0:.0f} s", flush=True)
        batch = prompts[start : start + batch_size]
        out = pipe(
            batch,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=seed + start,
            height=size,
            width=size,
            output_type="pt",
            capture_attention=True,
            progress=False,
        )
        for b, prompt in enumerate(batch):
            scene, image, maps = parse(prompt), out.images[b], out.attention_maps[b]  # maps (N_k, H, W)
            positions = word_positions(out.tokens[b], scene)
            masks = {
                "generated": generated_masks(image, scene),
                "layout": layout_masks(scene, image.shape[-1]),
            }
            for source, (m0, m1) in masks.items():
                for k, (own, other) in enumerate(((m0, m1), (m1, m0))):
                    if own is None:
                        continue
                    for word in WORDS:
                        share, chance = mass_in_mask(maps[positions[k][word]], own)
                        share_other = (
                            mass_in_mask(maps[positions[k][word]], other)[0] if other is not None else None
                        )
                        rows.append(
                            {
                                "prompt": prompt,
                                "object": k,
                                "word": word,
                                "token": out.tokens[b][positions[k][word]],
                                "source": source,
                                "share": share,
                                "chance": chance,
                                "share_other": share_other,
                            }
                        )
            if len(examples) < N_EXAMPLES:  # the figure's rows; the rest need not stay in memory
                examples.append(
                    {
                        "prompt": prompt,
                        "image": image,
                        "maps": maps,
                        "positions": positions,
                        "masks": masks["generated"],
                        "layout": masks["layout"],
                        "tokens": out.tokens[b],
                    }
                )
    return rows, examples


def summarise(rows: list[dict], n_objects: int) -> dict:
    """Per mask source and word kind: mean shares, chance, lift and the two rates
    (None where nothing was found); then the generated masks again, split by the object's place in the prompt
    (first- or second-named)."""
    summary = {}
    groups = [(source, source, None) for source in SOURCES]
    groups += [(f"{SOURCES[0]}, object {k}", SOURCES[0], k) for k in range(2)]
    for name, source, obj in groups:
        summary[name] = {}
        for word in WORDS:
            sel = [
                r for r in rows if r["source"] == source and r["word"] == word and obj in (None, r["object"])
            ]
            n_of = n_objects if obj is None else n_objects // 2
            paired = [r for r in sel if r["share_other"] is not None]
            if not sel:
                summary[name][word] = {"n": 0, "of": n_of}
                continue
            share = float(np.mean([r["share"] for r in sel]))
            chance = float(np.mean([r["chance"] for r in sel]))
            summary[name][word] = {
                "n": len(sel),
                "of": n_of,
                "share_own": share,
                "chance": chance,
                "lift": share / max(chance, 1e-12),
                "share_other": float(np.mean([r["share_other"] for r in paired])) if paired else None,
                "above_chance": float(np.mean([r["share"] > r["chance"] for r in sel])),
                "own_above_other": float(np.mean([r["share"] > r["share_other"] for r in paired]))
                if paired
                else None,
            }
    return summary


def report(summary: dict) -> str:
    lines = [
        f"{'masks':<21} {'word':<7} {'found':>7} {'own':>6} {'other':>6} {'chance':>7} {'lift':>5} "
        f"{'>chance':>8} {'own>other':>9}"
    ]
    for source, words in summary.items():
        for word, s in words.items():
            if s["n"] == 0:
                lines.append(
                    f"{source:<21} {word:<7} {s['n']:>3}/{s['of']:<3}   (no object of this colour found)"
                )
                continue
            other = "-" if s["share_other"] is None else f"{s['share_other']:.3f}"
            binding = "-" if s["own_above_other"] is None else f"{s['own_above_other']:.2f}"
            lines.append(
                f"{source:<21} {word:<7} {s['n']:>3}/{s['of']:<3} {s['share_own']:>6.3f} {other:>6} "
                f"{s['chance']:>7.3f} {s['lift']:>5.2f} {s['above_chance']:>8.2f} {binding:>9}"
            )
    return "\n".join(lines)


def figure(examples: list[dict], path: Path, n: int = N_EXAMPLES) -> None:
    """Per example: the image, then the colour and shape words' maps of both objects, each with its object's
    mask outlined (solid: found in the generated image; dashed: the canonical layout, when the
    colour was not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = examples[:n]
    fig, axes = plt.subplots(len(examples), 5, figsize=(7.5, 1.8 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples):
        row[0].imshow(ex["image"].permute(1, 2, 0).numpy())
        row[0].set_title(ex["prompt"].replace(" a ", "\na ", 1), fontsize=5)
        for k in range(2):
            for j, word in enumerate(WORDS):
                ax = row[1 + 2 * k + j]
                pos = ex["positions"][k][word]
                ax.imshow(ex["maps"][pos].numpy(), cmap="magma")
                if ex["masks"][k] is not None:  # the object as generated: solid outline
                    ax.contour(ex["masks"][k], levels=[0.5], colors="cyan", linewidths=0.8)
                else:  # its colour is not in the image: the canonical layout's mask, dashed
                    ax.contour(ex["layout"][k], levels=[0.5], colors="white", linewidths=0.8, linestyles="--")
                ax.set_title(f"'{ex['tokens'][pos]}' (object {k})", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="auto",
        help="'auto' (checkpoints/course_t2i; the tiny pipeline under COURSE_FAST), 'tiny', or a folder",
    )
    p.add_argument(
        "--prompts",
        type=cli.positive_int,
        default=None,
        help="two-object prompts (default: 2 fast, 48 cpu, 256 gpu)",
    )
    p.add_argument(
        "--steps", type=cli.positive_int, default=None, help="DDIM steps (default: 2 fast, 30 otherwise)"
    )
    p.add_argument(
        "--guidance",
        type=cli.nonnegative_float,
        default=3.0,
        help="classifier-free guidance scale (3.0: train_text_to_image.py evaluates at it)",
    )
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    p.add_argument("--prompt-seed", type=cli.nonnegative_int, default=1234, help="picks the held-out prompts")
    p.add_argument(
        "--seed",
        type=cli.nonnegative_int,
        default=0,
        help="the starting noise (batch i uses seed + i * batch size)",
    )
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: what common.runtime picks)")
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "04_attention_maps"), help="folder for the JSON and figure"
    )
    args = p.parse_args(argv)
    out = cli.writable_dir(args.out, "--out")  # checked before the measurement

    seed_everything(args.seed)
    device = get_device(args.device)
    print(describe(device))
    n = args.prompts if args.prompts is not None else budget(fast=2, cpu=48, gpu=256, device=device)
    steps = args.steps if args.steps is not None else budget(fast=2, cpu=30, gpu=30, device=device)
    pipe, model_name = load_pipeline(args.model, device)
    size = 32 if model_name == "tiny random pipeline" else None  # the course model's own 64 px otherwise
    prompts = two_object_prompts(n, args.prompt_seed)

    t0 = time.perf_counter()
    rows, examples = measure(
        pipe,
        prompts,
        steps=steps,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        size=size,
    )
    seconds = time.perf_counter() - t0
    summary = summarise(rows, 2 * len(prompts))
    print(
        f"model: {model_name}; {len(prompts)} two-object prompts, {steps} DDIM steps, "
        f"guidance {args.guidance}, {seconds:.1f} s"
    )
    print(report(summary))

    result = {
        "model": model_name,
        "prompts": prompts,
        "steps": steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "seconds": seconds,
        "device": str(device),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "summary": summary,
        "rows": rows,
    }
    tmp = out / "attention_maps.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "attention_maps.json")
    figure(examples, out / "attention_maps.png")
    print(f"wrote {out / 'attention_maps.json'} and {out / 'attention_maps.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
