"""What does the guidance scale s buy, and what does it cost? Prompt adherence and sample diversity against s.

    python 04_cross_attention/guidance_sweep.py                  # the course model (checkpoints/course_t2i)
    python 04_cross_attention/guidance_sweep.py --seeds 50        # more seeds per prompt, tighter intervals
    COURSE_FAST=1 python 04_cross_attention/guidance_sweep.py --out /tmp/gs   # seconds (the tests)

Classifier-free guidance (Ho & Salimans 2022, eq. 6), eps_u = eps(z_t, t, ""), eps_c = eps(z_t, t, c):

    eps_hat = eps_u + s (eps_c - eps_u)         s = 0: unconditional, s = 1: conditional, s > 1: guided

1. prompts: ``--prompts`` held-out Shapes prompts (colour/shape pairs never seen in training), half with one
   object and half with two, in a fixed order (``common.shapes.Shapes.scenes("test", ...)``);
2. for each prompt and each s, ``--seeds`` images from the same starting noises z_T (one batch drawn from one
   generator: image j of every prompt and every s starts from the same z_T), DDIM, eta = 0. s = 0 is run as
   the empty prompt without guidance: exactly eps_u at every step;
3. adherence: the Shapes judge (``common.judge``) grades every image against its prompt ("all": every
   attribute right, and for two objects the relation too); 95% Wilson interval over the images;
4. diversity: for each prompt, the mean pairwise RMS pixel distance (images in [0, 1]) between its seeds'
   images; the curve is the mean over prompts with a 95% bootstrap interval over prompts;
5. the figure: the grid shows, for the one-object and the two-object prompt whose adherence rises the most
   from s = 1 to s = 3 (ties: the larger pixel change), four seeds at every s, each image marked by the judge;
   beside it the two curves.

Writes ``guidance_sweep.json`` (every number, per prompt and per image) and ``guidance_sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.metrics import wilson_interval
from common.runtime import budget, describe, get_device, seed_everything

ROOT = Path(__file__).resolve().parents[1]
COURSE_MODEL = ROOT / "checkpoints" / "course_t2i"
SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 7.5, 12.0)
GRID_SEEDS = 4  # seeds per prompt shown in the figure


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean RMS pixel distance over all pairs of (N, 3, H, W) images in [0, 1]: 0 when all seeds agree."""
    x = images.flatten(1).double()  # (N, 3*H*W)
    d = torch.cdist(x, x) / math.sqrt(x.shape[1])  # (N, N) RMS distances
    N = x.shape[0]
    return float(d.sum() / (N * (N - 1))) if N > 1 else 0.0


def bootstrap_mean(values: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values``."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_resamples, len(values)), replace=True).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def sweep_prompts(n: int, seed: int = 1234) -> list[str]:
    """n held-out prompts: the first n // 2 one-object and n - n // 2 two-object prompts of the test split."""
    from common.shapes import Shapes

    one = Shapes.prompts("test", n // 2, seed, n_objects=(1,))
    return one + Shapes.prompts("test", n - n // 2, seed, n_objects=(2,))


def generate(
    pipe, prompt: str, s: float, *, seeds: int, steps: int, seed: int, size: int | None
) -> torch.Tensor:
    """(seeds, 3, H, W) images in [0, 1] for one prompt at guidance scale s; the same z_T batch at every s."""
    if s == 0.0:  # eps_hat = eps_u: the empty prompt, one pass (the pipeline guides only for s > 1)
        prompts, s = [""] * seeds, 1.0
    else:
        prompts = [prompt] * seeds
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=s,
        generator=seed,
        height=size,
        width=size,
        output_type="pt",
        progress=False,
    ).images


def run(
    pipe,
    judge,
    prompts: list[str],
    scales,
    *,
    seeds: int,
    steps: int,
    seed: int,
    size: int | None,
) -> tuple[dict, dict]:
    """Generate and grade everything; returns (results for the JSON, {prompt: (S, seeds, 3, H, W) images})."""
    from common.shapes import parse

    per_prompt, images = {}, {}
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        x = torch.stack(
            [generate(pipe, prompt, s, seeds=seeds, steps=steps, seed=seed, size=size) for s in scales]
        )  # (S, seeds, 3, H, W)
        images[prompt] = x
        per_prompt[prompt] = {
            "objects": len(parse(prompt).objects),
            "all": [
                [bool(r["all"]) for r in judge.score(x[k], [prompt] * seeds)["records"]]
                for k in range(len(scales))
            ],  # (S, seeds)
            "diversity": [mean_pairwise_distance(x[k]) for k in range(len(scales))],  # (S,)
            "change_from_s1": [
                float((x[k] - x[list(scales).index(1.0)]).abs().mean()) for k in range(len(scales))
            ],  # mean |x_s - x_1| per s
        }
        print(
            f"  {i + 1}/{len(prompts)} prompts, {time.perf_counter() - t0:.0f} s: {prompt!r} right per s: "
            + " ".join(f"{np.mean(a):.2f}" for a in per_prompt[prompt]["all"]),
            flush=True,
        )
    return per_prompt, images


def curves(per_prompt: dict, scales) -> dict:
    """Per s: adherence (all, one-object, two-object prompts) with Wilson intervals; diversity, bootstrap."""
    out = {"scales": list(scales)}
    for group, sel in (("all prompts", None), ("one object", 1), ("two objects", 2)):
        rows = [r for r in per_prompt.values() if sel in (None, r["objects"])]
        if not rows:
            continue
        adherence = []
        for k in range(len(scales)):
            hits = [a for r in rows for a in r["all"][k]]
            lo, hi = wilson_interval(sum(hits), len(hits))
            adherence.append({"mean": float(np.mean(hits)), "lo": lo, "hi": hi, "n": len(hits)})
        diversity = []
        for k in range(len(scales)):
            values = np.array([r["diversity"][k] for r in rows])
            lo, hi = bootstrap_mean(values)
            diversity.append({"mean": float(values.mean()), "lo": lo, "hi": hi, "n_prompts": len(values)})
        out[group] = {"adherence": adherence, "diversity": diversity}
    return out


def pick_for_grid(per_prompt: dict, scales) -> list[str]:
    """The one-object and the two-object prompt whose adherence rises the most from s = 1 to s = 3."""
    k1, k3 = list(scales).index(1.0), list(scales).index(3.0)
    picked = []
    for n_obj in (1, 2):
        cands = [
            (float(np.mean(r["all"][k3]) - np.mean(r["all"][k1])), r["change_from_s1"][k3], p)
            for p, r in per_prompt.items()
            if r["objects"] == n_obj
        ]
        if cands:
            picked.append(max(cands)[2])
    return picked


def seeds_for_grid(per_prompt: dict, scales, n: int = GRID_SEEDS) -> list[int]:
    """The seeds a grid row shows: up to n // 2 whose verdict goes from wrong at s = 1 to right at s = 3
    (where guidance changes the outcome), then the lowest-numbered others, in seed order."""
    k1, k3 = list(scales).index(1.0), list(scales).index(3.0)
    verdicts = per_prompt["all"]
    flipped = [j for j in range(len(verdicts[k1])) if not verdicts[k1][j] and verdicts[k3][j]][: n // 2]
    rest = [j for j in range(len(verdicts[k1])) if j not in flipped][: n - len(flipped)]
    return sorted(flipped + rest)


def figure(result: dict, images: dict, path: Path) -> None:
    """Left: the grid (rows: prompt x seed, columns: s), framed green/red by the judge. Right: the curves."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    scales, picked = result["scales"], result["grid_prompts"]
    n_seeds = len(next(iter(result["grid_seeds"].values())))
    # rows: per picked prompt, a thin header row holding the prompt, then one row per seed
    ratios = [r for i in range(len(picked)) for r in [0.5 if i == 0 else 0.3] + [1.0] * n_seeds]
    fig = Figure(figsize=(13.0, 0.95 * sum(ratios) + 1.2))
    grid_spec = fig.add_gridspec(len(ratios), len(scales) + 4, height_ratios=ratios, wspace=0.08, hspace=0.12)
    row = 0
    for prompt in picked:
        header = fig.add_subplot(grid_spec[row, : len(scales)])
        header.axis("off")
        header.text(0.0, 1.0, f'"{prompt}"', fontsize=9, ha="left", va="top", transform=header.transAxes)
        row += 1
        for j in result["grid_seeds"][prompt]:
            for k, s in enumerate(scales):
                ax = fig.add_subplot(grid_spec[row, k])
                ax.imshow(images[prompt][k, j].permute(1, 2, 0).numpy())
                right = result["per_prompt"][prompt]["all"][k][j]
                for side in ax.spines.values():
                    side.set_edgecolor("tab:green" if right else "tab:red")
                    side.set_linewidth(2.5)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 1:
                    ax.set_title("s = 0 (uncond.)" if s == 0 else f"s = {s:g}", fontsize=8, pad=2)
                if k == 0:
                    ax.set_ylabel(f"seed {j}", fontsize=7)
            row += 1
    right_col = grid_spec[:, len(scales) + 1 :].subgridspec(2, 1, hspace=0.45)
    ax_a, ax_d = fig.add_subplot(right_col[0]), fig.add_subplot(right_col[1])
    x = np.arange(len(scales))
    colours = {"one object": "tab:blue", "two objects": "tab:orange", "all prompts": "black"}
    for group in ("one object", "two objects"):
        if group not in result["curves"]:
            continue
        c = result["curves"][group]
        for ax, key in ((ax_a, "adherence"), (ax_d, "diversity")):
            mean = np.array([v["mean"] for v in c[key]])
            lo, hi = np.array([v["lo"] for v in c[key]]), np.array([v["hi"] for v in c[key]])
            ax.plot(x, mean, "o-", color=colours[group], label=group, markersize=3)
            ax.fill_between(x, lo, hi, color=colours[group], alpha=0.2)
    for ax, ylabel, title in (
        (ax_a, "judged all right", "prompt adherence (95% Wilson)"),
        (ax_d, "mean pairwise RMS distance", "diversity across seeds (95% bootstrap)"),
    ):
        ax.set_xticks(x, [f"{s:g}" for s in scales], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("guidance scale s (0 = unconditional)", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
    ax_a.set_ylim(-0.02, 1.02)
    ax_a.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"{result['model']}: {len(result['per_prompt'])} held-out prompts x {result['seeds']} "
        f"seeds, DDIM {result['steps']} steps; frame: green = the judge finds the prompt right, "
        "red = wrong",
        fontsize=9,
    )
    margin = 0.7 / fig.get_figheight()  # 0.7 inch above and below
    fig.subplots_adjust(left=0.03, right=0.99, top=1 - margin, bottom=margin)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)


def report(result: dict) -> str:
    lines = [
        f"{'s':>5} "
        + " ".join(f"{g + ' adherence':>28}" for g in ("one object", "two objects"))
        + f" {'diversity (all prompts)':>26}"
    ]
    c = result["curves"]
    for k, s in enumerate(result["scales"]):
        cells = []
        for g in ("one object", "two objects"):
            if g in c:
                a = c[g]["adherence"][k]
                cells.append(f"{a['mean']:>12.2f} [{a['lo']:.2f}, {a['hi']:.2f}] n={a['n']:<4}")
            else:
                cells.append(f"{'-':>28}")
        d = c["all prompts"]["diversity"][k]
        lines.append(
            f"{s:>5g} "
            + " ".join(f"{x:>28}" for x in cells)
            + f" {d['mean']:>12.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="auto",
        help="'auto' (checkpoints/course_t2i; the tiny random pipeline under COURSE_FAST), "
        "'tiny', or a diffusers folder",
    )
    p.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="held-out prompts, half with one object (default 2 fast, 8 otherwise)",
    )
    p.add_argument(
        "--seeds", type=int, default=None, help="images per prompt and scale (default 2 fast, 24 cpu, 50 gpu)"
    )
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 2 fast, 20 otherwise)")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=list(SCALES),
        help="guidance scales; must include 1 and 3 (the grid's choice); 0 means unconditional",
    )
    p.add_argument("--seed", type=int, default=0, help="the generator seed of the starting noises")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: what common.runtime picks)")
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "04_guidance_sweep"), help="folder for the JSON and the figure"
    )
    args = p.parse_args(argv)
    for name in ("prompts", "seeds", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if 1.0 not in args.scales or 3.0 not in args.scales or min(args.scales) < 0:
        p.error(f"--scales must be >= 0 and include 1 and 3, got {args.scales}")

    seed_everything(args.seed)
    device = get_device(args.device)
    print(describe(device))
    n_prompts = args.prompts or budget(fast=2, cpu=8, gpu=8, device=device)
    seeds = args.seeds or budget(fast=2, cpu=24, gpu=50, device=device)
    steps = args.steps or budget(fast=2, cpu=20, gpu=20, device=device)
    if n_prompts < 2:
        p.error("--prompts must be >= 2 (one one-object and one two-object prompt)")
    try:
        pipe, model_name = load_pipeline(args.model, device)
    except ValueError as e:
        p.error(str(e))
    size = 32 if model_name == "tiny random pipeline" else None
    from common.judge import Judge

    judge = Judge.load(device=device)
    prompts = sweep_prompts(n_prompts)

    t0 = time.perf_counter()
    per_prompt, images = run(
        pipe, judge, prompts, args.scales, seeds=seeds, steps=steps, seed=args.seed, size=size
    )
    seconds = time.perf_counter() - t0
    grid_prompts = pick_for_grid(per_prompt, args.scales)
    result = {
        "model": model_name,
        "steps": steps,
        "seeds": seeds,
        "seed": args.seed,
        "scales": args.scales,
        "seconds": seconds,
        "device": str(device),
        "command": " ".join(["python 04_cross_attention/guidance_sweep.py", *(argv or sys.argv[1:])]),
        "curves": curves(per_prompt, args.scales),
        "grid_prompts": grid_prompts,
        "grid_seeds": {
            p: seeds_for_grid(per_prompt[p], args.scales, min(GRID_SEEDS, seeds)) for p in grid_prompts
        },
        "per_prompt": per_prompt,
    }
    print(
        f"model: {model_name}; {len(prompts)} prompts x {seeds} seeds x {len(args.scales)} scales, "
        f"DDIM {steps} steps, {seconds:.1f} s"
    )
    print(report(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "guidance_sweep.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "guidance_sweep.json")
    torch.save(
        {p: images[p][:, result["grid_seeds"][p]].clone() for p in result["grid_prompts"]},
        out / "grid_images.pt",
    )  # (S, seeds shown, 3, H, W) per grid prompt
    figure(result, images, out / "guidance_sweep.png")
    print(f"wrote {out / 'guidance_sweep.json'} and {out / 'guidance_sweep.png'}")
    return 0


def load_pipeline(model: str, device=None):
    """``"tiny"``, ``"auto"`` (the course model; the tiny pipeline under COURSE_FAST) or a folder."""
    from common.pipeline import StableDiffusion, tiny_random_pipeline
    from common.runtime import is_fast

    if model == "tiny" or (model == "auto" and is_fast()):
        return tiny_random_pipeline(0).to(get_device(device)), "tiny random pipeline"
    path = COURSE_MODEL if model == "auto" else Path(model)
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"--model: no model at {path} (no model_index.json): pass --model PATH to a "
            "diffusers folder, or --model tiny for the untrained baseline"
        )
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return StableDiffusion.from_pretrained(path, device=device), str(name)


if __name__ == "__main__":
    sys.exit(main())
