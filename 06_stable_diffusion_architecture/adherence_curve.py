"""Held-out prompt adherence against training time: evaluate every EMA snapshot a training run kept.

    python 06_stable_diffusion_architecture/train_text_to_image.py --snapshot-every 600 --out runs/t2i_cpu
    python 06_stable_diffusion_architecture/adherence_curve.py --run runs/t2i_cpu
    python 06_stable_diffusion_architecture/adherence_curve.py --run runs/t2i_cpu --card runs/t2i_cpu_ship
    COURSE_FAST=1 python 06_stable_diffusion_architecture/adherence_curve.py --run /tmp/t2i   # seconds

``train_text_to_image.py`` writes the EMA weights every ``--snapshot-every`` steps to ``RUN/snapshots/`` with
the minutes since the command started (latent caching included). For each snapshot this script samples the
fixed held-out prompt sets of ``evaluate.py`` (one and two objects, every prompt with a colour/shape pair
never seen in training), ``--n`` prompts each, and grades them with the judge:

* one object "all": exactly one object, colour, shape, size and position right;
* two objects "all": exactly two objects, both right, and the relation right;
* relation error: of the two-object images whose two objects are right, the share whose relation is wrong
  (the objects drawn in the wrong order or place).

Writes ``RUN/curve.json`` and ``RUN/curve.png``; a snapshot already in ``curve.json`` with the same settings
is not evaluated again. ``--card DIR`` also writes the table into the model card of a shipped folder (its
"Adherence during training" section) and copies the plot there as ``curve.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from evaluate import generate, prompt_sets
from safetensors.torch import load_file

from common import cli
from common.judge import JUDGE_DIR, Judge
from common.runtime import budget, describe, get_device, seed_everything
from common.samplers import SAMPLERS
from common.text_to_image import (
    TextToImageConfig,
    build_model,
    build_pipeline,
    load_snapshots,
    load_vae,
    snapshot_config,
    vae_path,
)
from common.tokenizer import ShapesTokenizer

ROOT = Path(__file__).resolve().parents[1]
SETS = ("held-out 1 object", "held-out 2 objects")


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, help="a train_text_to_image.py --out folder with snapshots/")
    p.add_argument(
        "--vae", default=None, help="the VAE the run trained on (default: its config's, under checkpoints/)"
    )
    p.add_argument("--judge", default=None, help="the judge's folder (default: checkpoints/shapes_judge)")
    p.add_argument("--n", type=cli.positive_int, default=None, help="prompts per set (default 100; fast 4)")
    p.add_argument(
        "--sampler",
        default=None,
        help=f"one of {', '.join(SAMPLERS)} (default: ddim; flow_euler for a flow-matching run)",
    )
    p.add_argument("--steps", type=cli.positive_int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=cli.nonnegative_float, default=3.0)
    p.add_argument("--card", default=None, help="a shipped model folder whose card gets the curve")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    return p.parse_args(argv)


def relation_error(records: list[dict]) -> float:
    """Of the two-object images with both objects right, the share with the relation wrong."""
    right = [r for r in records if r["objects"] == 2 and r["pair_objects"]]
    return sum(not r["all"] for r in right) / len(right) if right else float("nan")


@torch.no_grad()
def evaluate_snapshot(path: Path, config: TextToImageConfig, vae, judge: Judge, sets: dict, args) -> dict:
    model = build_model(config)
    model.load_state_dict(load_file(str(path)))
    pipe = build_pipeline(
        model,
        ShapesTokenizer.for_shapes(config.context_length, echo=config.echo_prompt),
        vae,
        config,
        device=get_device(args.device),
    )
    row = {}
    for name in SETS:
        images = generate(pipe, sets[name], args.sampler, args.steps, args.guidance, args.seed, 100)
        scores = judge.score(images, sets[name])
        if "1 object" in name:
            row.update(
                {
                    "one_object": scores["single"]["all"],
                    **{k: scores["single"][k] for k in ("color", "shape", "size", "position")},
                }
            )
        else:
            row.update(
                {
                    "two_objects": scores["pair"]["all"],
                    "two_objects_right": scores["pair"]["objects"],
                    "relation_error": relation_error(scores["records"]),
                }
            )
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["minutes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(minutes, [r["one_object"] for r in rows], "o-", label="one object, all right")
    ax.plot(minutes, [r["two_objects"] for r in rows], "s-", label="two objects, all right")
    ax.plot(
        minutes,
        [r["relation_error"] for r in rows],
        "x--",
        color="grey",
        label="relation error (two objects right)",
    )
    for target, style in ((0.9, "C0"), (0.5, "C1")):
        ax.axhline(target, color=style, lw=0.8, ls=":")
    ax.set(
        xlabel="minutes since the training command started",
        ylabel="held-out prompts",
        ylim=(-0.02, 1.02),
        title=title,
    )
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def card_section(rows: list[dict], settings: str) -> str:
    lines = ["| step | minutes | one object | two objects | relation error |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['step']:,} | {r['minutes']:.1f} | {r['one_object']:.2f} | {r['two_objects']:.2f} | "
        f"{r['relation_error']:.2f} |"
        for r in rows
    ]
    return (
        f"Held-out prompts fully right for the EMA snapshots the run kept ({settings}); minutes since the "
        f"training command started, latent caching included. `curve.png` plots it.\n\n" + "\n".join(lines)
    )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise cli.UsageError(f"--sampler {args.sampler}: expected one of {', '.join(SAMPLERS)}")
    run = Path(args.run)
    snapshots = load_snapshots(run)
    if not snapshots:
        raise cli.UsageError(
            f"--run {run}: no snapshots there (expected snapshots/index.json); train with "
            "train_text_to_image.py --snapshot-every N --out " + str(run)
        )
    if args.card is not None:
        if not (Path(args.card) / "model_index.json").is_file():
            raise cli.UsageError(f"--card {args.card}: no shipped pipeline there (no model_index.json)")
        cli.check_ship(args.card, "pipeline", overwrite=True)
    seed_everything(args.seed)
    print(describe(get_device(args.device)))
    n = args.n if args.n is not None else budget(fast=4, cpu=100)
    config = snapshot_config(snapshots[0])
    args.sampler = args.sampler or ("flow_euler" if config.objective == "flow" else "ddim")
    settings = (
        f"{args.sampler} {args.steps} steps, guidance {args.guidance}, n = {n} per set, seed {args.seed}"
    )
    vae, judge, sets = (
        load_vae(args.vae or vae_path(config), get_device(args.device)),
        Judge.load(args.judge or JUDGE_DIR),
        prompt_sets(n),
    )
    curve_path = run / "curve.json"
    old = json.loads(curve_path.read_text()) if curve_path.is_file() else {}
    done = {r["step"]: r for r in old.get("rows", [])} if old.get("settings") == settings else {}
    rows = []
    for snap in snapshots:
        if snap["step"] in done:
            rows.append(done[snap["step"]])
            continue
        t0 = time.perf_counter()
        row = {
            "step": snap["step"],
            "minutes": snap["seconds"] / 60,
            **evaluate_snapshot(snap["path"], config, vae, judge, sets, args),
        }
        rows.append(row)
        print(
            f"step {row['step']:6d} ({row['minutes']:5.1f} min): one object {row['one_object']:.2f}, "
            f"two objects {row['two_objects']:.2f}, relation error {row['relation_error']:.2f} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        cli.atomic_write(curve_path, json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    cli.atomic_write(curve_path, json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    plot(rows, run / "curve.png", f"{config.name} config: held-out adherence during training")
    print(f"-> {curve_path}, {run / 'curve.png'}")
    if args.card is not None:
        from common.text_to_image import write_model_card

        command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
        section = card_section(rows, settings) + f"\n\nMeasured with `{command}`."
        plot(rows, Path(args.card) / "curve.png", f"{config.name} config: held-out adherence during training")
        cli.add_to_manifest(args.card, "curve.png")  # the card's plot is the course's file, like the card
        write_model_card(args.card, None, None, curve=section)
        print(f"curve written into {Path(args.card) / 'README.md'}")
    return rows


if __name__ == "__main__":
    sys.exit(cli.run(main))
