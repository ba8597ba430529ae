"""DDPM, DDIM and DPM-Solver++(2M) at a few step counts on the shipped digits LDM: quality, with error bars.

    python 03_latent_ddpm/compare_samplers.py --n 1000 --out 03_latent_ddpm/results/samplers
    python 03_latent_ddpm/compare_samplers.py --n 500 --guidance 4 --out runs/samplers_w4        # guided
    COURSE_FAST=1 python 03_latent_ddpm/compare_samplers.py --out /tmp/samplers      # seconds (tests)

Every sampler starts from the same noise z_T (n latents, n / 10 per digit) and uses the same classifier-free
guidance scale. Two measures of quality, each with a 95% interval:

- accuracy: the fraction of samples the digits classifier (checkpoints/digits_classifier) reads as the digit
  asked for; Wilson score interval for a binomial proportion (Wilson 1927);
- FD: the Frechet distance (the formula behind FID, Heusel et al. 2017) between the classifier's pooled
  features (64-d) of the samples and of held-out real digits; interval FD +- 1.96 bootstrap standard errors
  (both sets resampled). Lower is better. Two reference rows show its floor: real digits against other real
  digits, and the VAE's reconstructions of real digits (no sampler can beat the decoder it samples through).

Writes ``--out``/samplers.json (the table), samplers.png (accuracy and FD against steps) and
samples_4_steps.png (the first samples of each sampler at 4 steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.grade import load_module
from common.metrics import wilson_interval
from common.runtime import budget, describe, get_device, seed_everything
from common.viz import side_by_side

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)"}


# ----------------------------------------------------------------------------------------------- statistics
def bootstrap_fd(feats: np.ndarray, real: np.ndarray, reps: int, seed: int) -> tuple[float, float, float]:
    """(FD, 95% interval) with the interval FD +- 1.96 bootstrap standard errors (both sets resampled).

    Not the bootstrap's percentiles: a resampled set repeats points, which inflates every resampled FD, so the
    percentile interval sits above the estimate; its spread (the standard error) is what carries over.
    """
    from common.metrics import frechet_distance

    rng = np.random.default_rng(seed)
    values = [
        frechet_distance(
            feats[rng.integers(0, len(feats), len(feats))], real[rng.integers(0, len(real), len(real))]
        )
        for _ in range(reps)
    ]
    fd, half = frechet_distance(feats, real), 1.96 * float(np.std(values, ddof=1)) if reps > 1 else 0.0
    return fd, max(0.0, fd - half), fd + half


# -------------------------------------------------------------------------------------------------- the run
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="samples per sampler and step count, a multiple of 10 (default: fast 20, cpu 1000)",
    )
    p.add_argument(
        "--steps", default=None, help="step counts, comma-separated (default: fast 2,4; cpu 2,4,8,16,50)"
    )
    p.add_argument("--samplers", default=",".join(SAMPLERS), help=f"any of {', '.join(SAMPLERS)}")
    p.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance scale w (1 = none: the plain class-conditional model)",
    )
    p.add_argument(
        "--real", type=int, default=None, help="held-out real digits for the FD (default: fast 40, cpu 2000)"
    )
    p.add_argument(
        "--bootstrap", type=int, default=None, help="bootstrap resamples (default: fast 20, cpu 200)"
    )
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "ldm_digits"))
    p.add_argument("--vae", default=str(ROOT / "checkpoints" / "vae_digits"))
    p.add_argument("--classifier", default=str(ROOT / "checkpoints" / "digits_classifier"))
    p.add_argument("--out", required=True, help="folder for samplers.json and the figures")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def check_args(args) -> None:
    """Bad input stops the run before any work, with one line that says what was expected."""
    if args.n % 10 or args.n < 10:
        raise ValueError(f"--n {args.n}: expected a positive multiple of 10 (n / 10 samples per digit)")
    if args.real < 10:
        raise ValueError(f"--real {args.real}: expected at least 10 real digits")
    if args.bootstrap < 1:
        raise ValueError(f"--bootstrap {args.bootstrap}: expected at least 1 resample")
    unknown = [s for s in args.samplers if s not in SAMPLERS]
    if unknown:
        raise ValueError(f"--samplers: unknown {unknown}; expected any of {', '.join(SAMPLERS)}")
    if not args.steps or any(s < 1 or s > 1000 for s in args.steps):
        raise ValueError(f"--steps {args.steps}: expected step counts between 1 and 1000")
    for what, path, name in (
        ("--model", args.model, "diffusion_pytorch_model.safetensors"),
        ("--vae", args.vae, "diffusion_pytorch_model.safetensors"),
        ("--classifier", args.classifier, "model.safetensors"),
    ):
        if not (Path(path) / name).is_file():
            raise ValueError(f"{what} {path}: expected a folder holding {name}")


def real_digits(n: int, seed: int) -> torch.Tensor:
    """n held-out digits (B, 1, 32, 32) in [-1, 1]: fonts the classifier and the VAE never saw."""
    from common.data import Digits

    ds = Digits(32, "test", length=n, seed=seed)
    return torch.stack([ds[i][0] for i in range(n)])


def run(args) -> dict:
    from common.autoencoder import AutoencoderKL
    from common.classifier import DigitClassifier
    from common.samplers import make_sampler

    ldm = load_module(Path(__file__).with_name("train_ldm.py"), "_ch03_train_ldm")
    device = get_device(args.device)
    seed_everything(args.seed)
    print(describe(device))
    unet, schedule, info = ldm.load_model(args.model, device)
    scale = float(info["scaling_factor"])
    vae = AutoencoderKL.load(args.vae, device=device).eval().requires_grad_(False)
    classifier = DigitClassifier.load(args.classifier, device=device)

    @torch.no_grad()
    def features(images: torch.Tensor) -> np.ndarray:  # (B, 1, 32, 32) -> (B, 64)
        return (
            torch.cat(
                [classifier.embed(images[i : i + 500].to(device)).cpu() for i in range(0, len(images), 500)]
            )
            .double()
            .numpy()
        )

    # the reference: held-out real digits, a second real set, and the VAE's reconstructions of the first
    real = real_digits(args.real, args.seed)
    real_feats = features(real)
    rows = []
    with torch.no_grad():
        rgb = real.repeat(1, 3, 1, 1)  # (real, 3, 32, 32): the VAE is RGB
        recon = (
            torch.cat(
                [
                    vae.decode(vae.encode(rgb[i : i + 250].to(device)).mean).clamp(-1, 1)
                    for i in range(0, len(real), 250)
                ]
            )
            .mean(1, keepdim=True)
            .cpu()
        )
    other = real_digits(args.n, args.seed + 1)
    floors = (("real digits (a second held-out set)", other), ("VAE reconstructions", recon[: args.n]))
    for name, images in floors:
        feats = features(images)
        fd, fd_lo, fd_hi = bootstrap_fd(feats, real_feats, args.bootstrap, args.seed)
        rows.append(
            {
                "sampler": name,
                "steps": None,
                "unet_evals": 0,
                "samples": len(images),
                "fd": round(fd, 3),
                "fd_lo": round(fd_lo, 3),
                "fd_hi": round(fd_hi, 3),
            }
        )
        print(f"{name:<36} FD {rows[-1]['fd']:.3f} [{fd_lo:.3f}, {fd_hi:.3f}]")

    y = torch.arange(10).repeat_interleave(args.n // 10).to(device)  # (n,) digits asked for
    g = torch.Generator().manual_seed(args.seed + 1)
    z_T = torch.randn(args.n, unet.config.in_channels, 8, 8, generator=g)  # (n, 4, 8, 8)
    grids = {}
    for name in args.samplers:
        for steps in args.steps:
            sampler = make_sampler(name, schedule, steps, timestep_spacing="trailing")
            t0 = time.perf_counter()
            z0 = ldm.generate(unet, sampler, z_T.to(device), y, args.seed, guidance=args.guidance)
            seconds = time.perf_counter() - t0
            images = ldm.decode(vae, z0, scale).mean(1, keepdim=True).cpu()  # (n, 1, 32, 32)
            hits = int((classifier.predict(images) == y.cpu()).sum())
            feats = features(images)
            acc_lo, acc_hi = wilson_interval(hits, args.n)
            fd, fd_lo, fd_hi = bootstrap_fd(feats, real_feats, args.bootstrap, args.seed)
            evals = steps * (2 if args.guidance != 1.0 else 1)  # a guided step runs the UNet on 2 batches
            rows.append(
                {
                    "sampler": name,
                    "steps": steps,
                    "unet_evals": evals,
                    "samples": args.n,
                    "seconds": round(seconds, 2),
                    "accuracy": round(hits / args.n, 4),
                    "acc_lo": round(acc_lo, 4),
                    "acc_hi": round(acc_hi, 4),
                    "fd": round(fd, 3),
                    "fd_lo": round(fd_lo, 3),
                    "fd_hi": round(fd_hi, 3),
                }
            )
            r = rows[-1]
            print(
                f"{name:<9} {steps:>3} steps  accuracy {r['accuracy']:.3f} [{acc_lo:.3f}, {acc_hi:.3f}]  "
                f"FD {r['fd']:.3f} [{fd_lo:.3f}, {fd_hi:.3f}]  {seconds:.1f} s",
                flush=True,
            )
            if steps == 4:
                grids[name] = images[torch.arange(10) * (args.n // 10)]  # the first sample of each digit

    result = {
        "command": "python 03_latent_ddpm/compare_samplers.py " + " ".join(sys.argv[1:]),
        "model": Path(args.model).name,
        "guidance": args.guidance,
        "samples": args.n,
        "real": args.real,
        "bootstrap": args.bootstrap,
        "features": "digits classifier, pooled (64-d)",
        "timestep_spacing": "trailing",
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_table(result).savefig(out / "samplers.png", dpi=80, bbox_inches="tight")
    if grids:
        plot_grids(grids).savefig(out / "samples_4_steps.png", dpi=80, bbox_inches="tight")
    print(table(result))
    print(f"wrote {out / 'samplers.json'}, samplers.png" + (", samples_4_steps.png" if grids else ""))
    return result


# ------------------------------------------------------------------------------------------- table, figures
def table(result: dict) -> str:
    """The rows as a markdown table, 95% intervals in brackets."""
    lines = ["| sampler | steps | UNet evals | accuracy [95% CI] | FD [95% CI] |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        label = LABELS.get(r["sampler"], r["sampler"])
        acc = f"{r['accuracy']:.3f} [{r['acc_lo']:.3f}, {r['acc_hi']:.3f}]" if "accuracy" in r else ""
        lines.append(
            f"| {label} | {r['steps'] or ''} | {r['unet_evals'] or ''} | {acc} | "
            f"{r['fd']:.2f} [{r['fd_lo']:.2f}, {r['fd_hi']:.2f}] |"
        )
    return "\n".join(lines)


def plot_table(result: dict):
    """Accuracy and FD against steps (log scale), one line per sampler, 95% intervals as error bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    ax_acc, ax_fd = fig.subplots(1, 2)
    sampled = [r for r in result["rows"] if r["steps"] is not None]
    for k, name in enumerate(dict.fromkeys(r["sampler"] for r in sampled)):
        rs = [r for r in sampled if r["sampler"] == name]
        x = np.array([r["steps"] for r in rs]) * (1 + 0.04 * (k - 1))  # nudged apart: bars do not overlap
        for ax, key in ((ax_acc, "accuracy"), (ax_fd, "fd")):
            lo_key, hi_key = ("acc_lo", "acc_hi") if key == "accuracy" else ("fd_lo", "fd_hi")
            v = np.array([r[key] for r in rs])
            err = np.array([v - [r[lo_key] for r in rs], [r[hi_key] for r in rs] - v])
            ax.errorbar(x, v, yerr=err, marker="o", ms=4, capsize=3, label=LABELS.get(name, name))
    floor = [r for r in result["rows"] if r["steps"] is None]
    for r, style in zip(floor, (":", "--")):
        ax_fd.axhline(r["fd"], color="grey", ls=style, lw=1, label=f"{r['sampler']} (floor)")
    steps = sorted({r["steps"] for r in sampled})
    for ax in (ax_acc, ax_fd):
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.grid(alpha=0.3)
    ax_acc.set_ylabel("classifier accuracy (higher is better)")
    ax_fd.set_ylabel("FD to real digits (lower is better)")
    ax_fd.set_ylim(bottom=0)
    handles, labels = ax_fd.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"{result['samples']} samples per point, guidance w = {result['guidance']}, 95% intervals")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_grids(grids: dict):
    """One row per sampler: its first sample of each digit 0-9."""
    rows = {LABELS.get(name, name): images for name, images in grids.items()}
    return side_by_side(rows, size=0.75, title="4 sampling steps, digits 0-9 asked for")


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.n = args.n or budget(fast=20, cpu=1000)
    args.real = args.real or budget(fast=40, cpu=2000)
    args.bootstrap = args.bootstrap or budget(fast=20, cpu=200)
    args.samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    try:
        args.steps = [int(s) for s in (args.steps or budget(fast="2,4", cpu="2,4,8,16,50")).split(",")]
    except ValueError:
        print(
            f"compare_samplers.py: error: --steps {args.steps!r}: expected integers like 2,4,8",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    try:
        check_args(args)
    except ValueError as err:
        print(f"compare_samplers.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return run(args)


if __name__ == "__main__":
    main()
