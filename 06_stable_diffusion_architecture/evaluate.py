"""Evaluate a text-to-image model on Shapes: prompt adherence by the judge, a small FID,
per sampler and step count.

    python 06_stable_diffusion_architecture/evaluate.py                 # the shipped course model
    python 06_stable_diffusion_architecture/evaluate.py --model runs/ship --samplers ddim --steps 25
    python 06_stable_diffusion_architecture/evaluate.py --update-card   # write the metrics into its card
    python 06_stable_diffusion_architecture/evaluate.py --train-judge   # train a judge into runs/06_eval
    # train a judge and replace the shipped one:
    python 06_stable_diffusion_architecture/evaluate.py --train-judge --judge checkpoints/shapes_judge
    COURSE_FAST=1 python 06_stable_diffusion_architecture/evaluate.py --out /tmp/eval   # seconds

Prompt sets (fixed seeds, so every run grades the same prompts):
* held-out, 1 and 2 objects: ``Shapes.prompts("test")``, every prompt holds a (colour, shape) pair never seen
  in training (compositional generalisation);
* paraphrased, 1 and 2 objects: scenes of training combinations (other seeds than training's) written in
  paraphrases other than the default one: robustness to the wording.

For each set: the judge's scores on the generated images and, beside them, on real renders of the same
prompts (the judge's own accuracy), and a Frechet distance between the judge's CNN features of the generated
objects and of the real renders' objects (``common/judge.py``). Writes ``results.md``, ``results.csv`` and
``samples.png`` (a grid: prompts above their images) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

from common import cli
from common.judge import JUDGE_DIR, Judge, real_renders, train_judge
from common.metrics import frechet_distance
from common.pipeline import SAMPLER_NAMES
from common.runtime import budget, describe, get_device, is_fast, seed_everything
from common.shapes import N_PARAPHRASES, Shapes
from common.viz import save_grid
from common.weights import write_model_card

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLERS = ("ddim", "dpmpp_2m", "ddpm")
SETS = ("held-out 1 object", "held-out 2 objects", "paraphrased 1 object", "paraphrased 2 objects")


def prompt_sets(n: int, seed: int = 1234) -> dict[str, list[str]]:
    """The four fixed prompt sets, ``n`` prompts each."""
    para1 = [
        s.caption(1 + i % (N_PARAPHRASES - 1))
        for i, s in enumerate(Shapes.scenes("train", n, seed + 1, (1,)))
    ]
    para2 = [s.caption(1 + i % 5) for i, s in enumerate(Shapes.scenes("train", n, seed + 2, (2,)))]
    return {
        SETS[0]: Shapes.prompts("test", n, seed, (1,)),
        SETS[1]: Shapes.prompts("test", n, seed, (2,)),
        SETS[2]: para1,
        SETS[3]: para2,
    }


def headline(scores: dict) -> dict[str, float]:
    """The numbers a row reports: one-object all/colour/shape/size/position, two-object objects/all."""
    s, p = scores["single"], scores["pair"]
    if s["n"]:
        return {
            "all": s["all"],
            "color": s["color"],
            "shape": s["shape"],
            "size": s["size"],
            "position": s["position"],
        }
    return {"all": p["all"], "objects": p["objects"], "count": p["count"]}


def train_and_ship_judge(dest: Path, args) -> Judge:
    """Train the judge and ship it to ``dest`` (with its card) through ``common.cli.ship``."""
    n_images, steps = budget(fast=200, cpu=3000), budget(fast=60, cpu=600)
    t0 = time.perf_counter()
    judge = train_judge(n_images, steps, seed=args.seed)
    seconds = time.perf_counter() - t0

    def write(path: Path) -> None:
        judge.save(path)
        write_judge_card(judge, path, args, n_images, steps, seconds)

    cli.ship(dest, "judge", write, overwrite=args.overwrite, what="--judge")
    print(f"judge shipped to {dest}")
    return judge


def write_judge_card(judge: Judge, path: Path, args, n_images: int, steps: int, seconds: float) -> None:
    lines = []
    for name, prompts in prompt_sets(budget(fast=8, cpu=200)).items():
        sc = judge.score(real_renders(prompts, seed=args.seed), prompts)
        lines.append(f"| {name} | {len(prompts)} | {fmt(headline(sc))} |")
    card = (
        f"# shapes_judge: the Shapes prompt-adherence judge\n\nThe shape classifier of `common/judge.py` "
        f"(`ShapeNet`, {sum(p.numel() for p in judge.net.parameters()):,} parameters): it reads an object's "
        f"mask crop ({CROP_TXT}) and names its shape; segmentation, colour, size, position and relation are "
        f"read without learning (see the module docstring).\n\n## Training\n\n- command: `python "
        f"06_stable_diffusion_architecture/evaluate.py --train-judge --judge {args.judge_shown}`\n"
        f'- data: crops of {n_images:,} Shapes training renders (split="train"), '
        f"blurred and noised at random\n- steps: {steps} x batch 128, AdamW "
        f"3e-3 cosine\n- wall time: {seconds:.0f} s on {describe()}\n\n## Accuracy on real renders\n\n"
        "Real renders of the evaluation prompts (held-out colour/shape pairs and "
        "paraphrases), random layouts:\n\n"
        f"| set | n | scores |\n|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    write_model_card(path, card)
    print(card)


CROP_TXT = "24 x 24"


def fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in d.items())


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default=str(ROOT / "checkpoints" / "course_t2i"), help="a diffusers-format folder"
    )
    p.add_argument(
        "--judge",
        default=None,
        help="the judge's folder (default: checkpoints/shapes_judge); with --train-judge, where to ship the "
        "new judge (default: --out/shapes_judge, so the shipped judge changes only when named here)",
    )
    p.add_argument(
        "--train-judge", action="store_true", help="train the judge, ship it (see --judge), and stop"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="let --train-judge write over same-named files in a folder the course did not write",
    )
    p.add_argument(
        "--samplers",
        nargs="+",
        default=None,
        help=f"of {', '.join(SAMPLER_NAMES)} (default: ddim dpmpp_2m ddpm; a flow model: flow_euler)",
    )
    p.add_argument(
        "--steps",
        nargs="+",
        type=cli.positive_int,
        default=None,
        help="step counts (default: 10 25; fast: 4)",
    )
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="SAMPLER:STEPS",
        help="explicit (sampler, steps) pairs, e.g. ddim:25 dpmpp_2m:10; replaces --samplers x --steps",
    )
    p.add_argument("--n", type=cli.positive_int, default=None, help="prompts per set (default 32; fast 2)")
    p.add_argument(
        "--guidance", type=cli.nonnegative_float, default=3.0, help="classifier-free guidance scale"
    )
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="images per pipeline call")
    p.add_argument("--out", default=str(ROOT / "runs" / "06_eval"))
    p.add_argument("--update-card", action="store_true", help="write the results into the model's README.md")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    return p.parse_args(argv)


def generate(
    pipe, prompts: list[str], sampler: str, steps: int, guidance: float, seed: int, batch: int
) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        out.append(
            pipe(
                prompts[i : i + batch],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=g,
                output_type="pt",
                sampler=sampler,
                progress=False,
                height=64,
                width=64,
            ).images
        )
    return torch.cat(out)  # (B, 3, 64, 64) in [0, 1]


@torch.no_grad()
def reconstruct(pipe, images: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W) in [0, 1] -> D(E(x)) through the pipeline's VAE (posterior mean), in [0, 1]."""
    x = (2 * images - 1).to(pipe.device, pipe.dtype)
    return ((pipe.vae.decode(pipe.vae.encode(x).mean) + 1) / 2).clamp(0, 1).float().cpu()


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.runs:
        try:
            runs = [(r.split(":")[0], cli.positive_int(r.split(":")[1])) for r in args.runs]
        except (IndexError, ValueError, argparse.ArgumentTypeError):
            raise ValueError(
                f"--runs takes SAMPLER:STEPS pairs such as ddim:25 (steps >= 1), got {args.runs}"
            ) from None
    else:
        runs = [
            (s, k)
            for s in args.samplers or DEFAULT_SAMPLERS
            for k in (args.steps or budget(fast=[4], cpu=[10, 25]))
        ]
    for s, _ in runs:
        if s not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {s!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    device = get_device(args.device)
    # every output place is checked before the work
    out = cli.writable_dir(args.out, "--out")
    if args.train_judge:
        dest = Path(args.judge) if args.judge is not None else out / "shapes_judge"
        args.judge_shown = os.path.relpath(dest, ROOT) if dest.resolve().is_relative_to(ROOT) else str(dest)
        cli.check_ship(dest, "judge", overwrite=args.overwrite, what="--judge")
    elif args.update_card:
        if is_fast() and cli.in_checkpoints(Path(args.model)):
            raise cli.UsageError(
                f"--update-card would write COURSE_FAST=1 numbers (a few prompts) into the card of "
                f"{args.model}; unset COURSE_FAST to measure the shipped model"
            )
        if not (Path(args.model) / "model_index.json").is_file():
            raise cli.UsageError(f"--model {args.model}: no diffusers pipeline there (no model_index.json)")
    seed_everything(args.seed)
    print(describe(device))
    if args.train_judge:
        train_and_ship_judge(dest, args)
        return []
    from common.pipeline import StableDiffusion

    judge = Judge.load(args.judge or JUDGE_DIR)
    pipe = StableDiffusion.from_pretrained(args.model, device=device)
    if pipe.is_flow and not args.runs and not args.samplers:  # the diffusion samplers do not apply to it
        runs = [("flow_euler", k) for k in (args.steps or budget(fast=[4], cpu=[10, 25]))]
    for s, _ in runs:
        pipe.make_sampler(s, 1)  # a sampler that does not fit the model fails here, before any work
    n = args.n if args.n is not None else budget(fast=2, cpu=32)
    sets = prompt_sets(n)
    rows, real_feats, grid = [], {}, []
    for name, prompts in sets.items():  # the judge on real renders: its own accuracy, and the FID's reference
        real = real_renders(prompts, seed=args.seed)
        real_feats[name] = judge.features(real)
        rows.append(
            {
                "sampler": "real renders",
                "steps": "",
                "set": name,
                "n": len(prompts),
                **headline(judge.score(real, prompts)),
                "fid": 0.0,
                "seconds": 0.0,
            }
        )
        recon = reconstruct(pipe, real)  # what the model's VAE can show at best: its ceiling
        rows.append(
            {
                "sampler": "VAE reconstructions",
                "steps": "",
                "set": name,
                "n": len(prompts),
                **headline(judge.score(recon, prompts)),
                "fid": frechet_distance(judge.features(recon), real_feats[name]),
                "seconds": 0.0,
            }
        )
    for sampler, steps in runs:
        for name, prompts in sets.items():
            t0 = time.perf_counter()
            images = generate(pipe, prompts, sampler, steps, args.guidance, args.seed, args.batch_size)
            seconds = time.perf_counter() - t0
            scores = judge.score(images, prompts)
            feats = judge.features(images)
            fid = frechet_distance(feats, real_feats[name]) if len(feats) >= 2 else float("nan")
            row = {
                "sampler": sampler,
                "steps": steps,
                "set": name,
                "n": len(prompts),
                **headline(scores),
                "fid": fid,
                "seconds": seconds,
            }
            rows.append(row)
            print(
                f"{sampler:8s} {steps:3d} steps  {name:22s} {fmt(headline(scores))}  FID {fid:.1f}  "
                f"({seconds:.0f} s)",
                flush=True,
            )
            if (sampler, steps) == runs[0] and name in SETS[:2]:  # the grid: 8 held-out prompts of each kind
                grid.append((images[:8], prompts[:8]))
    keys = [
        "sampler",
        "steps",
        "set",
        "n",
        "all",
        "color",
        "shape",
        "size",
        "position",
        "objects",
        "count",
        "fid",
        "seconds",
    ]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in keys} for r in rows)
    md = results_markdown(rows, args, n)
    (out / "results.md").write_text(md)
    if grid:
        captions = [p for g in grid for p in g[1]]
        images = torch.cat([g[0] for g in grid])
        save_grid(images, out / "samples.png", captions=captions, value_range=(0, 1), dpi=110)
    print(md)
    if args.update_card:
        from common.text_to_image import write_model_card

        write_model_card(args.model, None, md)
        print(f"metrics written into {Path(args.model) / 'README.md'}")
    return rows


def results_markdown(rows: list[dict], args, n: int) -> str:
    def cell(r, k):
        v = r.get(k)
        return "" if v is None or v == "" else f"{v:.3f}" if isinstance(v, float) else str(v)

    one = [r for r in rows if "1 object" in r["set"]]
    two = [r for r in rows if "2 objects" in r["set"]]
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    md = (
        f"Measured with `{command}` ({describe()}); {n} prompts per set, "
        f"guidance {args.guidance}, seed {args.seed}.\n"
        '"all": every attribute right (one object: exactly one object with the right colour, shape, '
        "size and "
        "position; two objects: exactly two, both right, and the relation right). FID: "
        "Frechet distance of the judge's CNN features of the objects, "
        "generated vs real renders of the same prompts (small-scale: compare "
        'only within this table). "VAE reconstructions": the judge on D(E(x)) '
        "of the real renders through the model's own VAE, "
        f"the best the diffusion model could score.\n\n### One-object prompts\n\n"
        "| sampler | steps | set | n | all | colour | shape | size | position | FID | seconds |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    md += "\n".join(
        "| "
        + " | ".join(
            cell(r, k)
            for k in (
                "sampler",
                "steps",
                "set",
                "n",
                "all",
                "color",
                "shape",
                "size",
                "position",
                "fid",
                "seconds",
            )
        )
        + " |"
        for r in one
    )
    md += (
        "\n\n### Two-object prompts\n\n| sampler | steps | set | n | all (objects + relation) | objects | "
        "count | FID | seconds |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    md += "\n".join(
        "| "
        + " | ".join(
            cell(r, k) for k in ("sampler", "steps", "set", "n", "all", "objects", "count", "fid", "seconds")
        )
        + " |"
        for r in two
    )
    return md + "\n"


if __name__ == "__main__":
    sys.exit(cli.run(main))
