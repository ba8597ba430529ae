"""Train the digits classifier that grades class-conditional samples (common/classifier.py).

    python 03_latent_ddpm/train_classifier.py                    # CPU default: a few minutes
    python 03_latent_ddpm/train_classifier.py --ship checkpoints/digits_classifier
    COURSE_FAST=1 python 03_latent_ddpm/train_classifier.py --out /tmp/clf   # seconds (tests)

Trains on ``Digits(split="train")`` (MNIST if on disk, else digits rendered from matplotlib's fonts: the
script prints which) and reports accuracy on ``Digits(split="test")``, whose fonts are held out of training.
The rendered images are drawn once and cached in ``--out``. Training runs through ``common.training.Trainer``
(checkpoints, exact resume: run the same command again after a kill).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import cli
from common.classifier import ClassifierConfig, DigitClassifier, accuracy
from common.data import Digits
from common.runtime import budget, describe, get_device, seed_everything
from common.training import TrainConfig, Trainer
from common.weights import write_model_card


def cached_digits(
    split: str, n: int, resolution: int, seed: int, cache_dir: Path
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images (n, 1, R, R), labels (n,), source) of Digits, drawn once and kept in ``cache_dir``."""
    ds = Digits(resolution, split, length=n, seed=seed)
    path = cache_dir / f"digits_{ds.source}_{split}_{n}_{resolution}_{seed}.pt"
    if path.exists():
        data = torch.load(path, weights_only=True)
        return data["images"], data["labels"], ds.source
    t0 = time.perf_counter()
    images = torch.stack([ds[i][0] for i in range(n)])
    labels = torch.tensor([ds[i][1] for i in range(n)])
    cache_dir.mkdir(parents=True, exist_ok=True)
    cli.atomic_write(path, lambda tmp: torch.save({"images": images, "labels": labels}, tmp))
    print(f"drew {n} {split} digits in {time.perf_counter() - t0:.1f} s -> {path}")
    return images, labels, ds.source


def main(argv: list[str] | None = None) -> dict:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--out", default="runs/digits_classifier", help="run folder: cache, checkpoints, log.csv")
    p.add_argument("--ship", default=None, help="also write config.json + model.safetensors + README.md here")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="ship into a non-course folder: replace same-named files, keep the others",
    )
    p.add_argument(
        "--steps",
        type=cli.positive_int,
        default=None,
        help="optimizer steps (default: budget fast 5 / cpu 1200)",
    )
    p.add_argument(
        "--train-size",
        type=cli.positive_int,
        default=None,
        help="training digits (default: fast 256 / cpu 20000)",
    )
    p.add_argument(
        "--test-size",
        type=cli.positive_int,
        default=None,
        help="held-out digits (default: fast 256 / cpu 2000)",
    )
    p.add_argument("--batch-size", type=cli.positive_int, default=64)
    p.add_argument("--lr", type=cli.positive_float, default=2e-3)
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in --out and start over")
    args = p.parse_args(argv)

    device = get_device(args.device)
    seed_everything(args.seed)
    steps = args.steps if args.steps is not None else budget(fast=5, cpu=1200, gpu=3000, device=device)
    n_train = (
        args.train_size
        if args.train_size is not None
        else budget(fast=256, cpu=20_000, gpu=60_000, device=device)
    )
    n_test = args.test_size if args.test_size is not None else budget(fast=256, cpu=2000, device=device)
    out = cli.writable_dir(args.out, "--out")  # where the outputs go is checked before the work
    if args.ship:
        cli.check_ship(args.ship, "classifier", overwrite=args.overwrite)
    print(describe(device))
    print(f"steps={steps} train={n_train} test={n_test} batch={args.batch_size}")

    x_train, y_train, source = cached_digits("train", n_train, 32, args.seed, out / "cache")
    x_test, y_test, _ = cached_digits("test", n_test, 32, args.seed, out / "cache")
    dataset = torch.utils.data.TensorDataset(x_train, y_train)

    def loss_fn(model, batch, generator):
        x, y = batch
        # a little pixel noise: the samples it will grade are slightly noisy decodes, not clean renders
        x = x + 0.1 * torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
        logits = model(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

    model = DigitClassifier(
        budget(fast=ClassifierConfig.tiny(), cpu=ClassifierConfig.digits(), device=device)
    )
    cfg = TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=1e-4,
        warmup_steps=min(50, steps // 10),
        lr_schedule="cosine",
        ema_decay=None,
        checkpoint_every=max(100, steps // 5),
        log_every=10,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    t0 = time.perf_counter()
    trainer = Trainer(model, dataset, loss_fn, cfg, out, device=device, resume=not args.fresh)
    model = trainer.fit().eval()
    seconds = time.perf_counter() - t0
    model = model.cpu()
    test_acc = accuracy(model, x_test, y_test)
    train_acc = accuracy(model, x_train[:2000], y_train[:2000])
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "source": source,
        "steps": steps,
        "batch_size": args.batch_size,
        "train_size": n_train,
        "test_size": n_test,
        "params": n_params,
        "train_accuracy": round(train_acc, 4),
        "test_accuracy": round(test_acc, 4),
        "train_seconds": round(seconds, 1),
        "resumed_from": str(trainer.resumed_from or ""),
    }
    print(
        f"held-out accuracy {test_acc:.4f} ({n_test} test digits, fonts unseen in training); "
        f"train accuracy {train_acc:.4f}; {seconds:.0f} s of training this run"
    )
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.ship:

        def write(folder: Path) -> None:
            model.save(folder)
            write_card(folder, result, argv if argv is not None else sys.argv[1:], device, shown=args.ship)

        ship = cli.ship(args.ship, "classifier", write, overwrite=args.overwrite)
        print(f"shipped to {ship}")
    return result


def write_card(
    path: Path, result: dict, argv: list[str], device: torch.device, shown: str | None = None
) -> None:
    """``path/README.md``; ``shown``: the folder name the card tells the reader to load (default ``path``)."""
    data = (
        "digits rendered from matplotlib's fonts with random affine and elastic distortion "
        "(common.data.Digits, offline stand-in for MNIST: MNIST was not on disk)"
        if result["source"] == "rendered"
        else "MNIST (torchvision), training split"
    )
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    card = f"""# digits_classifier

A small CNN (`common.classifier.DigitClassifier`, {result["params"]:,} parameters) that grades chapter 03's
class-conditional samples: the fraction of samples generated for digit k that it reads as k.

- Command: `{prefix}python 03_latent_ddpm/train_classifier.py {" ".join(argv)}`
- Data: {data}; {result["train_size"]:,} training images at 32x32, white on black, in [-1, 1].
- Training: {result["steps"]} AdamW steps, batch {result["batch_size"]}, cosine LR from 2e-3, \
Gaussian pixel noise (std 0.1).
- Wall time: {result["train_seconds"]} s on {device} ({platform.machine()}, {os.cpu_count()} CPU cores,
  torch threads = {torch.get_num_threads()}; the figure is the last run's own, a resumed \
run counts only its part).
- Held-out accuracy: **{result["test_accuracy"]:.4f}** on {result["test_size"]:,} \
`Digits(split="test")` images
  (fonts never seen in training); training-set accuracy {result["train_accuracy"]:.4f}.
- Caveat: offline, "real digits" means rendered font digits, not handwriting; a sample that looks like a
  handwritten 7 but not like any font's 7 may be misread. Retrain with MNIST on disk for MNIST models.

Load: `DigitClassifier.load("{shown or path}")`.
"""
    write_model_card(path, card, ["model.safetensors", "config.json"])


if __name__ == "__main__":
    sys.exit(cli.run(main))
