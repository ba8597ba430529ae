"""How much layout the noisiest training latent still shows: SD 1.x's schedule against zero terminal SNR.

    python 06_stable_diffusion_architecture/signal_leak.py                       # both Shapes VAEs, ~1 min
    python 06_stable_diffusion_architecture/signal_leak.py --vae checkpoints/vae_shapes_f8 --n 2000
    COURSE_FAST=1 python 06_stable_diffusion_architecture/signal_leak.py          # seconds

SD 1.x's scaled-linear schedule ends at alpha_bar_999 = 0.0047, not 0: the last training latent is
z_999 = 0.068 z_0 + 0.998 eps, so a little of the image survives (Lin et al. 2023 call it a signal leak).
Sampling starts from pure noise. Whatever the training latent still shows, the model learns to read from it
instead of from the caption, and at sampling time it reads it from noise, where it is random.

This script measures the leak for the thing Shapes captions say that a model can least repair later, the
object's grid cell: one-object scenes are encoded by the VAE, noised to timestep t, and a matched filter (the
mean latent of each of the nine cells, learnt on half the scenes) names the cell of each scene of the other
half. Its accuracy at t = 999 (and at the first timesteps the samplers visit) against chance (1/9) says how
much layout the noise leaks; on the zero-terminal-SNR schedule (``rescale_betas_zero_snr``) z_999 is pure
noise and the filter is at chance by construction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common import cli
from common.runtime import budget, describe, seed_everything
from common.schedules import NoiseSchedule
from common.shapes import POSITIONS, Shapes
from common.text_to_image import load_vae

ROOT = Path(__file__).resolve().parents[1]
TIMESTEPS = (999, 961, 900, 800)  # the last training timestep; DDIM 25's first with SD 1.x's leading spacing


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--vae",
        nargs="+",
        default=None,
        help="VAE folders (default: checkpoints/vae_shapes and checkpoints/vae_shapes_f8)",
    )
    p.add_argument(
        "--n", type=cli.positive_int, default=None, help="one-object scenes (default 4000; fast 180)"
    )
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    return p.parse_args(argv)


@torch.no_grad()
def encode_scenes(vae, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n one-object training scenes -> (z_0 = s mu(x) (n, C, h, w), cell index (n,))."""
    ds = Shapes(64, "train", n, seed=seed, n_objects=(1,))
    cells = list(POSITIONS)
    zs, labels = [], []
    for start in range(0, n, 128):
        items = [ds[i] for i in range(start, min(n, start + 128))]
        x = torch.stack([it["image"] for it in items])
        zs.append(vae.encode(x).mean * vae.config.scaling_factor)
        labels += [cells.index(it["objects"][0]["position"]) for it in items]
    return torch.cat(zs), torch.tensor(labels)


def leak(z0: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule, t: int, seed: int) -> float:
    """Accuracy of the matched filter naming each held-out scene's cell from z_t."""
    half = len(z0) // 2
    train, test = slice(0, half), slice(half, None)
    mean = z0[train].mean(0)
    templates = torch.stack([(z0[train][labels[train] == k] - mean).mean(0) for k in range(len(POSITIONS))])
    a = float(schedule.alpha_bar[t]) ** 0.5
    g = torch.Generator().manual_seed(seed)
    z_t = a * z0[test] + (1 - a * a) ** 0.5 * torch.randn(z0[test].shape, generator=g)
    scores = torch.einsum("bchw,kchw->bk", z_t - a * mean, templates)  # (n_test, 9)
    return float((scores.argmax(1) == labels[test]).float().mean())


def main(argv=None) -> dict:
    args = parse_args(argv)
    folders = args.vae or [
        str(ROOT / "checkpoints" / "vae_shapes"),
        str(ROOT / "checkpoints" / "vae_shapes_f8"),
    ]
    n = args.n or budget(fast=180, cpu=4000)
    seed_everything(args.seed)
    print(describe("cpu"))
    schedules = {
        "SD 1.x": NoiseSchedule.sd15(),
        "zero terminal SNR": NoiseSchedule(prediction_type="v_prediction", rescale_zero_snr=True),
    }
    rows = []
    for folder in folders:
        vae = load_vae(folder)
        z0, labels = encode_scenes(vae, n, args.seed)
        shape = "x".join(str(d) for d in z0.shape[1:])
        for name, schedule in schedules.items():
            for t in TIMESTEPS:
                acc = leak(z0, labels, schedule, t, args.seed)
                a = float(schedule.alpha_bar[t]) ** 0.5
                rows.append(
                    {
                        "vae": Path(folder).name,
                        "latent": shape,
                        "schedule": name,
                        "t": t,
                        "signal": a,
                        "accuracy": acc,
                    }
                )
                print(
                    f"{Path(folder).name:14s} {shape:7s} {name:18s} t={t}: sqrt(alpha_bar) {a:.4f}, "
                    "cell named "
                    f"from z_t {acc:.1%} of the time (chance {1 / len(POSITIONS):.1%})"
                )
    result = {"n": n, "test_scenes": n - n // 2, "chance": 1 / len(POSITIONS), "rows": rows}
    if args.out:
        cli.atomic_write(cli.output_file(args.out, suffixes=(".json",)), json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(cli.run(main))
