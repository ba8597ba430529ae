"""Both training stages of a course model, looked back at from what its runs kept: loss curves and samples.

    python 01_latent_space_learning/train_vae.py --factor 8 --keep-checkpoints 20 --out runs/vae_f8 ...
    python 06_stable_diffusion_architecture/train_text_to_image.py --snapshot-every 1000 --out runs/t2i_cpu
    python 06_stable_diffusion_architecture/training_stages.py --vae-run runs/vae_f8 --t2i-run runs/t2i_cpu \\
        --out 06_stable_diffusion_architecture/results/training
    COURSE_FAST=1 python 06_stable_diffusion_architecture/training_stages.py ...   # 2 rows a stage, seconds

Stage 1, the autoencoder: ``train_vae.py`` logs its loss every 25 steps and, with ``--keep-checkpoints N``,
keeps N checkpoints (one every 200 steps). Each kept checkpoint encodes and decodes the same held-out images
(posterior mean), and its held-out PSNR is measured on them.

Stage 2, the diffusion model: ``train_text_to_image.py`` logs its loss every 10 steps and, with
``--snapshot-every N``, keeps the EMA weights every N steps with the minutes since the command started. Each
kept snapshot draws the same prompts from the same starting noise (DDIM 25, guidance 3), so the rows of the
grid differ only by training.

Writes into ``--out``: ``stages.json`` (both loss curves, thinned to at most 400 points, and each kept row's
step, minutes and PSNR), ``vae_stage.png`` and ``t2i_stage.png`` (one row per kept step, at most ``--rows``,
spread evenly over the run). Chapter 06's notebook reads them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from common import cli
from common.autoencoder import AutoencoderKL
from common.metrics import psnr
from common.runtime import budget, describe, get_device, seed_everything
from common.shapes import Shapes
from common.text_to_image import (
    build_model,
    build_pipeline,
    load_snapshots,
    load_vae,
    snapshot_config,
    vae_path,
)
from common.tokenizer import ShapesTokenizer
from common.training import list_checkpoints

PROMPTS = (  # held-out colour/shape pairs (never seen in training), one and two objects
    "a small red star at the top left",
    "a large green triangle at the bottom right",
    "a large blue cross in the center",
    "a small yellow circle on the right",
    "a large purple square above a small orange circle",
    "a small orange diamond to the left of a large blue cross",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--vae-run", required=True, help="a train_vae.py --out folder (log.csv, checkpoints/, final/)"
    )
    p.add_argument("--t2i-run", required=True, help="a train_text_to_image.py --out folder with snapshots/")
    p.add_argument("--vae", default=None, help="the VAE the diffusion run trained on (default: its config's)")
    p.add_argument("--out", required=True, help="folder for stages.json, vae_stage.png, t2i_stage.png")
    p.add_argument(
        "--rows", type=cli.positive_int, default=None, help="kept steps shown per stage (default 6)"
    )
    p.add_argument("--images", type=cli.positive_int, default=8, help="held-out images per VAE row")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="write into a folder the course did not write")
    return p.parse_args(argv)


def read_log(path: Path, column: str, max_points: int = 400) -> list[list[float]]:
    """[[step, value], ...] from a training log.csv, every k-th row so at most ``max_points`` remain."""
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(column) not in (None, "")]
    k = max(1, math.ceil(len(rows) / max_points))
    return [[int(r["step"]), float(r[column])] for r in rows[::k]]


def spread(items: list, n: int) -> list:
    """At most n items, evenly spread, first and last kept."""
    if len(items) <= n:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def check_runs(args) -> tuple[Path, Path]:
    vae_run, t2i_run = Path(args.vae_run), Path(args.t2i_run)
    if not (vae_run / "log.csv").is_file() or not (vae_run / "final" / "config.json").is_file():
        raise cli.UsageError(
            f"--vae-run {vae_run}: not a finished train_vae.py run (expected log.csv and final/config.json)"
        )
    if len(list_checkpoints(vae_run)) < 2:
        raise cli.UsageError(
            f"--vae-run {vae_run}: fewer than 2 kept checkpoints; train with --keep-checkpoints N (N >= 2)"
        )
    if not (t2i_run / "log.csv").is_file() or len(load_snapshots(t2i_run)) < 2:
        raise cli.UsageError(
            f"--t2i-run {t2i_run}: needs log.csv and at least 2 snapshots; train it with --snapshot-every N"
        )
    return vae_run, t2i_run


@torch.no_grad()
def vae_stage(run: Path, rows: int, n_images: int, device) -> tuple[list[dict], torch.Tensor]:
    """Reconstructions of the same held-out images by each kept checkpoint; returns (rows, images)."""
    final = AutoencoderKL.load(run / "final", device=device)
    f = final.config.downsample_factor
    test = Shapes(final.config.sample_size, "test", n_images, seed=1, multiple_of=f)
    x = torch.stack([test[i]["image"] for i in range(n_images)]).to(device)  # (n, 3, H, W) in [-1, 1]
    out, grid = [], [(x + 1) / 2]
    for ckpt in spread(list_checkpoints(run), rows):
        weights = load_file(str(ckpt / "model.safetensors"))
        weights = {k.removeprefix("vae."): v for k, v in weights.items() if not k.startswith("disc")}
        final.load_state_dict(weights)
        rec = final.decode(final.encode(x).mean).clamp(-1, 1)
        step = int(ckpt.name.split("_")[1])
        out.append({"step": step, "psnr": round(float(psnr(rec.cpu(), x.cpu())), 2)})
        grid.append((rec + 1) / 2)
        print(f"VAE step {step}: held-out PSNR {out[-1]['psnr']:.2f} dB", flush=True)
    return out, torch.cat(grid).cpu()


@torch.no_grad()
def t2i_stage(run: Path, rows: int, seed: int, device, vae_folder=None) -> tuple[list[dict], torch.Tensor]:
    """The same prompts from the same noise through each kept snapshot; returns (rows, images)."""
    snaps = spread(load_snapshots(run), rows)
    config = snapshot_config(snaps[0])
    vae = load_vae(vae_folder or vae_path(config), device)
    out, grid = [], []
    for snap in snaps:
        model = build_model(snapshot_config(snap))
        model.load_state_dict(load_file(str(snap["path"])))
        tokenizer = ShapesTokenizer.for_shapes(config.context_length, echo=config.echo_prompt)
        pipe = build_pipeline(model, tokenizer, vae, config, device=device)
        images = pipe(
            list(PROMPTS),
            num_inference_steps=25,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            progress=False,
        ).images
        out.append({"step": snap["step"], "minutes": round(snap["seconds"] / 60, 2)})
        grid.append(images.float().cpu())
        print(f"diffusion step {snap['step']} ({out[-1]['minutes']:.1f} min): sampled", flush=True)
    return out, torch.cat(grid)


def main(argv=None) -> dict:
    args = parse_args(argv)
    vae_run, t2i_run = check_runs(args)
    cli.check_ship(args.out, "training stages", overwrite=args.overwrite, what="--out")
    rows = args.rows or budget(fast=2, cpu=6)
    seed_everything(args.seed)
    device = get_device(args.device)
    print(describe(device))
    vae_rows, vae_images = vae_stage(vae_run, rows, args.images, device)
    t2i_rows, t2i_images = t2i_stage(t2i_run, rows, args.seed, device, args.vae)
    result = {
        "vae": {
            "run": str(vae_run),
            "loss": read_log(vae_run / "log.csv", "rec"),
            "rows": vae_rows,
            "images": args.images,
        },
        "t2i": {"run": str(t2i_run), "loss": read_log(t2i_run / "log.csv", "loss"), "rows": t2i_rows},
        "prompts": list(PROMPTS),
        "sampling": "ddim 25 steps, guidance 3, the same noise for every row",
    }

    def write(tmp: Path) -> None:
        (tmp / "stages.json").write_text(json.dumps(result, indent=1) + "\n")
        to_pil_image(make_grid(vae_images, nrow=args.images, padding=2, pad_value=1.0)).save(
            tmp / "vae_stage.png"
        )
        to_pil_image(make_grid(t2i_images, nrow=len(PROMPTS), padding=2, pad_value=1.0)).save(
            tmp / "t2i_stage.png"
        )

    cli.ship(args.out, "training stages", write, overwrite=args.overwrite, what="--out")
    print(f"wrote {args.out}/stages.json, vae_stage.png, t2i_stage.png")
    return result


if __name__ == "__main__":
    sys.exit(cli.run(main))
