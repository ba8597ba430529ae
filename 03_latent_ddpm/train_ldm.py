"""Stage two of latent diffusion: train a UNet on the latents of a frozen VAE, then sample and grade it.

    python 03_latent_ddpm/train_ldm.py                              # Digits, class-conditional, 8x8x4 latents
    python 03_latent_ddpm/train_ldm.py --ship checkpoints/ldm_digits
    python 03_latent_ddpm/train_ldm.py --data shapes                # Shapes, unconditional, 16x16x4 latents
    python 03_latent_ddpm/train_ldm.py --scaling-factor 1.0         # the scaling-factor experiment
    COURSE_FAST=1 python 03_latent_ddpm/train_ldm.py --out /tmp/ldm # seconds (tests)

Rombach et al. 2022 (sec. 3.2, eq. 2): with the autoencoder (E, D) frozen, train
    L_LDM = E_{z0 = s E(x), y, eps ~ N(0, I), t ~ U{0..T-1}} || eps - eps_theta(z_t, t, y) ||^2,
    z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps                       (Ho et al. 2020, eq. 4, 14)
where s is the latent scaling factor (SD 1.x: 0.18215 = 1 / std of its latents) and y
the class label (Digits).

What the run does:
1. loads the VAE (``--vae``, default the shipped checkpoints/vae_digits or vae_shapes), frozen;
2. encodes the training images once and caches the posterior mean and std on disk (``--out/cache``); each
   training step draws z0 ~ q(z | x) from them, as LDM training does;
3. scales the latents: ``--scaling-factor vae`` (the VAE's own, measured when it was trained), ``computed``
   (1 / std of the cached latents, measured now), or a number (1.0, 0.18215, ...);
4. trains the UNet with ``common.training.Trainer`` (EMA, checkpoints, exact resume: rerun the same command);
5. samples with each sampler of ``--samplers`` from the same noise (EMA weights), decodes, and reports seconds
   and quality: for Digits the fraction of samples the digits classifier (checkpoints/digits_classifier)
   reads as the digit asked for; for both data sets a Frechet distance between generated and data latents.
Bad input (an unknown schedule, prediction type or sampler, more sampling steps than training steps, a
timestep outside the schedule) stops the run before any work, with the allowed values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import cli, weights
from common.autoencoder import AutoencoderKL
from common.convert import unet_config_from_diffusers, unet_config_to_diffusers
from common.data import Digits, LatentDataset, Shapes, cached
from common.runtime import budget, describe, get_device, seed_everything
from common.samplers import make_sampler, sample_loop
from common.schedules import NoiseSchedule
from common.training import TrainConfig, Trainer
from common.unet import UNet, UNetConfig
from common.weights import WEIGHTS_NAME, file_sha256, load_weights, read_model

DATASETS = ("digits", "shapes")
ROOT = Path(__file__).resolve().parents[1]
SD_SCALING_FACTOR = 0.18215


# ---------------------------------------------------------------------------------------------- configuration
def unet_config(data: str, width: int | None, null_class: bool = False) -> UNetConfig:
    """The chapter's presets (common.unet), with base width ``width``: channels
    (w, 2w, ...), min(32, w) groups.

    ``null_class`` adds an 11th class embedding, "no label", for classifier-free
    guidance (Ho & Salimans 2022).
    """
    config = UNetConfig.digits() if data == "digits" else UNetConfig.shapes_uncond()
    if null_class and config.num_class_embeds is not None:
        config = dataclasses.replace(config, num_class_embeds=config.num_class_embeds + 1)
    if width is not None:
        widths = tuple(width * (1 if i == 0 else 2) for i in range(len(config.block_out_channels)))
        config = dataclasses.replace(config, block_out_channels=widths, norm_num_groups=min(32, width))
    return config


def make_schedule(name: str, prediction_type: str, T: int) -> NoiseSchedule:
    """SD's scaled-linear betas, Ho et al.'s linear ones (1e-4 .. 0.02) or the cosine
    schedule (errors list them)."""
    if name == "linear":
        return NoiseSchedule(T, "linear", 1e-4, 0.02, prediction_type=prediction_type)
    return NoiseSchedule(T, name, prediction_type=prediction_type)


def parse_samplers(spec: str, schedule: NoiseSchedule) -> list:
    """'ddim:50,dpmpp_2m:20,ddpm:1000' -> samplers (all with trailing spacing: the first
    step starts at t = T-1)."""
    samplers = []
    for item in spec.split(","):
        name, _, steps = item.strip().partition(":")
        if not steps.isdigit():
            raise ValueError(f"sampler spec {item!r} must read name:steps, e.g. ddim:50")
        samplers.append(make_sampler(name, schedule, int(steps), timestep_spacing="trailing"))
    return samplers


# ----------------------------------------------------------------------------------------------------- data
def load_images(
    data: str, split: str, n: int, seed: int, resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, R, R) in [-1, 1], labels (n,)); digits are grey, repeated to RGB
    as the VAE was trained."""
    if data == "digits":
        ds = Digits(resolution, split, length=n, seed=seed)
        items = [ds[i] for i in range(n)]
        return torch.stack([x for x, _ in items]).repeat(1, 3, 1, 1), torch.tensor([y for _, y in items])
    ds = Shapes(resolution, split, length=n, seed=seed, multiple_of=4)
    return torch.stack([ds[i]["image"] for i in range(n)]), torch.zeros(n, dtype=torch.long)


@torch.no_grad()
def encode_cached(
    vae: AutoencoderKL,
    vae_id: str,
    data: str,
    n: int,
    seed: int,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 256,
) -> dict:
    """Posterior mean and std of ``n`` training images, encoded once; {"mean", "std", "labels"} (unscaled)."""
    path = cache_dir / f"latents_{data}_{n}_{seed}_{vae_id}.pt"

    def encode() -> dict:
        t0 = time.perf_counter()
        images, labels = load_images(data, "train", n, seed, vae.config.sample_size)
        means, stds = [], []
        for i in range(0, n, batch_size):
            posterior = vae.encode(images[i : i + batch_size].to(device))
            means.append(posterior.mean.cpu())
            stds.append(posterior.std.cpu())
        print(
            f"encoded {n} {data} images to latents {tuple(means[0].shape[1:])} in "
            f"{time.perf_counter() - t0:.1f} s -> {path}"
        )
        return {"mean": torch.cat(means), "std": torch.cat(stds), "labels": labels}

    return cached(path, encode)[0]


def computed_scaling_factor(cache: dict, seed: int = 0) -> float:
    """1 / std of posterior samples z ~ q(z | x) over the cache (Rombach et al. 2022,
    sec. 4.3.2 / appendix G)."""
    g = torch.Generator().manual_seed(seed)
    z = cache["mean"] + cache["std"] * torch.randn(cache["mean"].shape, generator=g)
    return float(1.0 / z.std())


def ldm_loss(
    unet: UNet,
    schedule: NoiseSchedule,
    z0: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Ho et al. 2020's simple loss on latents: || target - net(z_t, t, y) ||^2 with t ~ U, eps ~ N(0, I)."""
    B = z0.shape[0]
    t = schedule.sample_timesteps(B, generator, device=z0.device)  # (B,)
    eps = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0.device)  # (B, C, h, w)
    z_t = schedule.add_noise(z0, eps, t)  # eq. 4
    prediction = unet(z_t, t, class_labels=labels)  # (B, C, h, w)
    return F.mse_loss(prediction.float(), schedule.training_target(z0, eps, t).float())


# ------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate(
    unet: UNet,
    sampler,
    z_T: torch.Tensor,
    labels: torch.Tensor | None,
    seed: int,
    batch_size: int = 500,
    callback=None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Run ``sampler`` from z_T (B, C, h, w) in batches; returns scaled latents z0.

    ``guidance`` w != 1 uses classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u), where
    eps_u is the prediction for the null class (the last class embedding).
    """
    unet.eval()
    out = []
    for i in range(0, len(z_T), batch_size):
        y = labels[i : i + batch_size] if labels is not None else None
        if guidance == 1.0 or y is None:
            denoise = lambda z, t, y=y: unet(z, t, class_labels=y)  # noqa: E731
        else:
            null = torch.full_like(y, unet.config.num_class_embeds - 1)

            def denoise(z, t, y=y, null=null):
                eps_c, eps_u = unet(torch.cat([z, z]), t, class_labels=torch.cat([y, null])).chunk(2)
                return eps_u + guidance * (eps_c - eps_u)

        out.append(
            sample_loop(denoise, z_T[i : i + batch_size], sampler, generator=seed + i, callback=callback)
        )
    return torch.cat(out)


@torch.no_grad()
def decode(
    vae: AutoencoderKL, z0: torch.Tensor, scaling_factor: float, batch_size: int = 256
) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (B, 3, H, W)."""
    return torch.cat(
        [
            vae.decode(z0[i : i + batch_size] / scaling_factor).clamp(-1, 1)
            for i in range(0, len(z0), batch_size)
        ]
    )


def latent_features(z: torch.Tensor) -> torch.Tensor:
    """Latents pooled to 4x4 and flattened (64-d for 4 channels): the features of the
    latent Frechet distance."""
    return F.adaptive_avg_pool2d(z.float(), 4).flatten(1)


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--data", default="digits", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--vae", default=None, help="VAE folder (default: checkpoints/vae_digits or vae_shapes)")
    p.add_argument(
        "--scaling-factor", default="vae", help="'vae' (its config), 'computed' (1/std now) or a number"
    )
    p.add_argument(
        "--schedule", default="scaled_linear", help="beta schedule: linear, scaled_linear or cosine"
    )
    p.add_argument("--prediction-type", default="epsilon", help="epsilon, v_prediction or sample")
    p.add_argument("--num-train-timesteps", type=cli.positive_int, default=1000, help="T")
    p.add_argument(
        "--width",
        type=cli.positive_int,
        default=None,
        help="base UNet width w: channels (w, 2w, ...) and min(32, w) GroupNorm groups "
        "(default: fast 16, cpu 32, gpu 64)",
    )
    p.add_argument(
        "--steps",
        type=cli.positive_int,
        default=None,
        help="optimizer steps (default: fast 4 / cpu 6000 / gpu 20000)",
    )
    p.add_argument(
        "--batch-size", type=cli.positive_int, default=None, help="default: fast 16 / cpu 64 / gpu 256"
    )
    p.add_argument(
        "--lr", type=cli.positive_float, default=None, help="default: 1e-3 (cpu, fast), 5e-4 (gpu)"
    )
    p.add_argument(
        "--train-size",
        type=cli.positive_int,
        default=None,
        help="training images (default: fast 256 / cpu 10000 / gpu 60000)",
    )
    p.add_argument(
        "--samplers",
        default=None,
        help="name:steps,... (default ddim:50,dpmpp_2m:20,ddpm:1000; fast ddim:5,dpmpp_2m:4,ddpm:10)",
    )
    p.add_argument(
        "--samples-per-class",
        type=cli.positive_int,
        default=None,
        help="digits: per class (default: fast 2, cpu 10, gpu 100)",
    )
    p.add_argument(
        "--samples",
        type=cli.positive_int,
        default=None,
        help="shapes: samples per sampler (default: fast 8, cpu 200)",
    )
    p.add_argument(
        "--cfg-dropout",
        type=cli.finite_float,
        default=0.1,
        help="digits: fraction of labels replaced by a null class while training (enables guidance; 0 = off)",
    )
    p.add_argument(
        "--guidance",
        type=cli.nonnegative_float,
        default=1.0,
        help="classifier-free guidance scale when sampling (1.0 = plain class-conditional)",
    )
    p.add_argument("--preview-t", default="0,250,500,750,999", help="timesteps of the forward-process figure")
    p.add_argument("--classifier", default=str(ROOT / "checkpoints" / "digits_classifier"))
    p.add_argument(
        "--keep-checkpoints",
        default="",
        help="steps whose EMA UNet weights are kept in --out/progress (e.g. 0,250,1000; 0: init)",
    )
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop training at this step (the LR schedule still spans --steps); no sampling then",
    )
    p.add_argument("--out", default=None, help="run folder (default: runs/ldm_<data>)")
    p.add_argument("--ship", default=None, help="also write the model folder + README.md card here")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="ship into a non-course folder: replace same-named files, keep the others",
    )
    p.add_argument(
        "--resume", default="auto", help="'auto' (newest checkpoint in --out), 'no', or a checkpoint path"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    args = p.parse_args(argv)
    args.parser = p
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except (
        ValueError
    ) as err:  # bad input found by the schedule, the samplers or the UNet: say what is allowed
        args.parser.error(str(err))


def run(args) -> dict:
    if args.data not in DATASETS:
        raise ValueError(f"unknown --data {args.data!r}; expected one of {', '.join(DATASETS)}")
    device = get_device(args.device)
    seed_everything(args.seed)
    digits = args.data == "digits"
    # validate everything cheap before any work: these raise ValueErrors that list the allowed values
    schedule = make_schedule(args.schedule, args.prediction_type, args.num_train_timesteps)
    samplers = parse_samplers(
        args.samplers
        or budget(fast="ddim:5,dpmpp_2m:4,ddpm:10", cpu="ddim:50,dpmpp_2m:20,ddpm:1000", device=device),
        schedule,
    )
    preview_t = schedule.check_timesteps([int(t) for t in args.preview_t.split(",")])
    width = args.width if args.width is not None else budget(fast=16, cpu=32, gpu=64, device=device)
    if not 0 <= args.cfg_dropout < 1:
        raise ValueError(f"--cfg-dropout must be in [0, 1), got {args.cfg_dropout}")
    null_class = digits and args.cfg_dropout > 0
    if args.guidance != 1.0 and not null_class:
        raise ValueError("--guidance needs a model trained with a null class: digits with --cfg-dropout > 0")
    config = unet_config(args.data, width, null_class)
    steps = args.steps if args.steps is not None else budget(fast=4, cpu=6000, gpu=20_000, device=device)
    batch_size = (
        args.batch_size if args.batch_size is not None else budget(fast=16, cpu=64, gpu=256, device=device)
    )
    lr = args.lr if args.lr is not None else budget(fast=1e-3, cpu=1e-3, gpu=5e-4, device=device)
    n_train = (
        args.train_size
        if args.train_size is not None
        else budget(fast=256, cpu=10_000, gpu=60_000, device=device)
    )
    out = Path(args.out or f"runs/ldm_{args.data}")
    vae_path = Path(args.vae or ROOT / "checkpoints" / f"vae_{args.data}")
    try:
        keep_steps = sorted({int(k) for k in args.keep_checkpoints.split(",") if k.strip()})
    except ValueError:
        raise ValueError(
            f"--keep-checkpoints {args.keep_checkpoints!r}: expected steps like 0,250,1000"
        ) from None
    if any(not 0 <= k <= steps for k in keep_steps):
        raise ValueError(
            f"--keep-checkpoints {args.keep_checkpoints!r}: steps must lie in 0..{steps} (--steps)"
        )
    if args.stop_at is not None and not 1 <= args.stop_at <= steps:
        raise ValueError(f"--stop-at {args.stop_at}: expected a step in 1..{steps} (--steps)")
    if args.resume not in ("auto", "no") and not Path(args.resume).exists():
        raise ValueError(f"--resume {args.resume!r}: expected 'auto', 'no' or an existing checkpoint folder")
    if args.scaling_factor not in ("vae", "computed"):
        try:
            number = float(args.scaling_factor)
        except ValueError:
            number = float("nan")
        if not (math.isfinite(number) and number > 0):
            raise ValueError(
                f"--scaling-factor {args.scaling_factor!r}: expected 'vae', 'computed' or a number > 0"
            )
    cli.writable_dir(out, "--out")  # where the outputs go is checked before the work
    if args.ship:
        cli.check_ship(args.ship, "ldm", overwrite=args.overwrite)
    print(describe(device))
    print(
        f"data={args.data} schedule={schedule.beta_schedule} prediction={schedule.prediction_type} "
        f"T={schedule.num_train_timesteps} steps={steps} batch={batch_size} lr={lr} train_size={n_train} "
        f"unet widths={config.block_out_channels}"
    )

    # 1-3. the frozen VAE, the cached latents, the scaling factor
    vae = AutoencoderKL.load(vae_path, device=device).eval().requires_grad_(False)
    vae_id = file_sha256(vae_path / WEIGHTS_NAME)[:12]
    cache = encode_cached(vae, vae_id, args.data, n_train, args.seed, out / "cache", device)
    computed = computed_scaling_factor(cache, args.seed)
    if args.scaling_factor == "vae":
        scale = float(vae.config.scaling_factor)
    elif args.scaling_factor == "computed":
        scale = computed
    else:
        try:
            scale = float(args.scaling_factor)
        except ValueError:
            raise ValueError(
                f"--scaling-factor {args.scaling_factor!r}: expected 'vae', 'computed' or a number"
            ) from None
    print(
        f"scaling factor {scale:.5f} (VAE's {vae.config.scaling_factor:.5f}, computed 1/std {computed:.5f}, "
        f"SD 1.x {SD_SCALING_FACTOR}); scaled latent std {1 / computed * scale:.3f}"
    )
    save_forward_preview(vae, cache, scale, schedule, preview_t, out / "forward_process.png", args.seed)

    # 4. train
    unet = UNet(config)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet: {n_params:,} parameters")

    def loss_fn(model, batch, generator):
        mean, std, labels = batch["z0_mean"], batch["z0_std"], batch["labels"]
        noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
        z0 = (mean + std * noise) * scale  # z0 ~ q(z | x), scaled
        if null_class:  # drop labels to the null class, so the model also learns p(z) for guidance
            drop = (
                torch.rand(labels.shape, generator=generator, device=generator.device).to(labels.device)
                < args.cfg_dropout
            )
            labels = torch.where(drop, torch.full_like(labels, config.num_class_embeds - 1), labels)
        return ldm_loss(model, schedule, z0, labels if digits else None, generator)

    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=min(100, steps // 10),
        lr_schedule="cosine",
        ema_decay=budget(fast=0.9, cpu=0.995, gpu=0.999, device=device),
        checkpoint_every=budget(fast=2, cpu=250, gpu=1000, device=device),
        log_every=budget(fast=1, cpu=25),
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    resume = {"auto": True, "no": False}.get(args.resume, args.resume)
    t0 = time.perf_counter()

    def keep_progress(trainer, step):  # EMA weights at the kept steps, and the stop of --stop-at
        if step in keep_steps:
            save_progress(trainer.ema_model(), out / "progress", step)
        if step == args.stop_at:
            raise _StopTraining

    trainer = Trainer(
        unet,
        LatentDataset(cache, "labels"),
        loss_fn,
        cfg,
        out,
        device=device,
        resume=resume,
        callbacks=[keep_progress],
        callback_every=1,
    )
    if trainer.step == 0 and 0 in keep_steps:
        save_progress(trainer.ema_model(), out / "progress", 0)
    try:
        trainer.fit()
    except _StopTraining:
        print(f"stopped at step {args.stop_at} (--stop-at); kept {keep_steps} in {out / 'progress'}")
        return {"stopped_at": args.stop_at, "progress": str(out / "progress")}
    train_seconds = time.perf_counter() - t0
    logged = _log_rows(out / "log.csv")
    if (
        trainer.resumed_from is not None and logged
    ):  # a finished run re-sampled: its training time is in the log
        train_seconds = max(train_seconds, float(logged[-1]["seconds"]))
    ema = trainer.ema_model().to(device)
    print(f"trained {steps} steps in {train_seconds:.0f} s (this run; resumed from {trainer.resumed_from})")

    # 5. sample with each sampler from the same noise, decode, grade
    if digits:
        per_class = args.samples_per_class or budget(fast=2, cpu=10, gpu=100, device=device)
        labels = torch.arange(10).repeat_interleave(per_class).to(device)
        n = len(labels)
    else:
        n = args.samples or budget(fast=8, cpu=200, device=device)
        labels = None
    h = cache["mean"].shape[-1]
    z_T = torch.randn(n, config.in_channels, h, h, generator=torch.Generator().manual_seed(args.seed + 1)).to(
        device
    )
    data_feats = latent_features(cache["mean"][: max(n, 500)] * scale)
    classifier = load_classifier(args.classifier) if digits else None
    rows = []
    from common.metrics import frechet_distance
    from common.viz import save_grid

    for sampler in samplers:
        t1 = time.perf_counter()
        z0 = generate(ema, sampler, z_T, labels, args.seed, guidance=args.guidance)
        sample_seconds = time.perf_counter() - t1
        images = decode(vae, z0, scale).cpu()
        row = {
            "sampler": sampler.name,
            "steps": sampler.num_inference_steps,
            "samples": n,
            "guidance": args.guidance,
            "seconds": round(sample_seconds, 2),
            "latent_fd": round(frechet_distance(latent_features(z0.cpu()), data_feats), 3),
        }
        if classifier is not None:
            from common.classifier import conditional_accuracy

            row["accuracy"] = round(
                conditional_accuracy(classifier, images.mean(1, keepdim=True), labels.cpu()), 4
            )
        rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()))
        pick = (
            torch.cat([torch.arange(10) * (n // 10) + j for j in range(min(4, n // 10))])
            if digits
            else torch.arange(min(n, 32))
        )
        save_grid(
            images[pick],
            out / f"samples_{sampler.name}_{sampler.num_inference_steps}.png",
            ncols=10 if digits else 8,
        )

    result = {
        "data": args.data,
        "unet": dataclasses.asdict(config),
        "params": n_params,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "cfg_dropout": args.cfg_dropout if null_class else 0.0,
        "train_size": n_train,
        "schedule": schedule.to_diffusers(),
        "scaling_factor": scale,
        "computed_scaling_factor": computed,
        "vae": str(vae_path),
        "train_seconds": round(train_seconds, 1),
        "resumed_from": str(trainer.resumed_from or ""),
        "final_loss": _last_loss(out / "log.csv"),
        "samplers": rows,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    save_model(ema, schedule, out / "model", result)
    if args.ship:

        def write(folder: Path) -> None:
            save_model(ema, schedule, folder, result)
            write_card(folder, result, args.argv)

        ship = cli.ship(args.ship, "ldm", write, overwrite=args.overwrite)
        print(f"shipped to {ship}")
    return result


class _StopTraining(Exception):
    """Raised by the --stop-at callback to leave the training loop early."""


def save_progress(unet: UNet, folder: Path, step: int) -> Path:
    """The EMA UNet weights at ``step`` as ``folder/step_{step:06d}.safetensors`` (no optimizer state)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.safetensors"
    tensors = {k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}
    metadata = {"format": "pt", "step": str(step)}
    return cli.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_classifier(path: str):
    from common.classifier import DigitClassifier

    if not Path(path, "model.safetensors").exists():
        print(f"no digits classifier at {path}: accuracy not measured (train one with train_classifier.py)")
        return None
    return DigitClassifier.load(path)


def save_forward_preview(vae, cache, scale, schedule, ts, path: Path, seed: int) -> None:
    """z_t for a few training latents at timesteps ``ts``, decoded: what the forward
    process does to an image."""
    from common.viz import plot_trajectory

    z0 = cache["mean"][:4] * scale
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    device = next(vae.parameters()).device
    columns = [decode(vae, schedule.add_noise(z0, eps, int(t)).to(device), scale).cpu() for t in ts]
    fig = plot_trajectory(columns, [int(t) for t in ts], title="forward process on latents, decoded")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70, bbox_inches="tight")


def save_model(unet: UNet, schedule: NoiseSchedule, folder: Path, result: dict) -> Path:
    """diffusers layout: config.json + diffusion_pytorch_model.safetensors,
    scheduler_config.json, ldm.json."""
    config = {"_class_name": "UNet2DConditionModel", **unet_config_to_diffusers(unet.config)}
    weights.save_model(unet, folder, config)
    cli.atomic_write(
        folder / "scheduler_config.json",
        json.dumps({"_class_name": "DDPMScheduler", **schedule.to_diffusers()}, indent=2) + "\n",
    )
    ldm = {
        "scaling_factor": result["scaling_factor"],
        "vae": Path(result["vae"]).name,
        "data": result["data"],
        "null_class": unet.config.num_class_embeds - 1 if result["cfg_dropout"] else None,
    }
    cli.atomic_write(folder / "ldm.json", json.dumps(ldm, indent=2) + "\n")
    return folder


def load_model(folder: str | Path, device=None) -> tuple[UNet, NoiseSchedule, dict]:
    """Read a folder written by ``save_model``: (UNet with EMA weights, its NoiseSchedule, ldm.json)."""
    folder = Path(folder)
    config, state = read_model(folder)
    unet = load_weights(UNet(unet_config_from_diffusers(config)), state, str(folder))
    schedule = NoiseSchedule.from_diffusers(json.loads((folder / "scheduler_config.json").read_text()))
    return unet.to(device or "cpu").eval(), schedule, json.loads((folder / "ldm.json").read_text())


def _env_prefix() -> str:
    """The thread setting the run used, for the card's command (1 thread is far faster on a crowded CPU)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={threads} " if threads else ""


def _log_rows(log: Path) -> list[dict]:
    import csv

    if not log.exists():
        return []
    with open(log) as f:
        return list(csv.DictReader(f))


def _last_loss(log: Path) -> float | None:
    rows = _log_rows(log)
    tail = [float(r["loss"]) for r in rows[-10:]]
    return round(sum(tail) / len(tail), 5) if tail else None


def write_card(folder: Path, result: dict, argv: list[str]) -> None:
    table = "\n".join(
        f"| {r['sampler']} | {r['steps']} | {r['samples']} | {r['guidance']} | {r['seconds']} | "
        f"{r.get('accuracy', 'n/a')} | {r['latent_fd']} |"
        for r in result["samplers"]
    )
    data = (
        "Digits (common.data.Digits, split='train'): offline, digits rendered from matplotlib's fonts with "
        "random affine + elastic distortion (MNIST was not on disk)"
        if result["data"] == "digits"
        else "Shapes (common.data.Shapes)"
    )
    card = f"""# ldm_{result["data"]}

A {"class-conditional" if result["data"] == "digits" else "unconditional"} latent diffusion UNet
(`common.unet.UNet`, diffusers `UNet2DConditionModel` layout, {result["params"]:,} parameters, widths
{tuple(result["unet"]["block_out_channels"])}) trained on the latents of the frozen VAE \
`checkpoints/{Path(result["vae"]).name}`
(scaled by {result["scaling_factor"]:.5f}; 1/std measured now: \
{result["computed_scaling_factor"]:.5f}). EMA weights.

- Command: `{_env_prefix()}python 03_latent_ddpm/train_ldm.py {" ".join(argv)}`
- Data: {data}; {result["train_size"]:,} images, encoded once (posterior mean and std \
cached; z0 ~ q(z|x) per step).
- Objective: eps-prediction MSE (Ho et al. 2020 eq. 14) under `{result["schedule"]["beta_schedule"]}` betas, \
T = {result["schedule"]["num_train_timesteps"]}
  (`scheduler_config.json`), prediction type `{result["schedule"]["prediction_type"]}`.
- Training: {result["steps"]} AdamW steps, batch {result["batch_size"]}, lr \
{result["lr"]} (cosine, warm-up), EMA;
  labels dropped to a null class (index \
{result["unet"]["num_class_embeds"] - 1 if result["unet"]["num_class_embeds"] else "n/a"}) with probability \
{result["cfg_dropout"]} (classifier-free guidance possible;
  the table's `guidance` column says whether it was used: 1.0 = plain class-conditional).
  Final loss (mean of the last 10 logged values) {result["final_loss"]}.
- Wall time: {result["train_seconds"]} s of training on {result["device"]} ({platform.machine()}, \
{os.cpu_count()} CPU cores,
  torch threads = {result["torch_threads"]}; the time logged by the run that reached the
  last step: after a resume, only its own part).
- Samples: {result["samplers"][0]["samples"]} per sampler from the same noise, trailing timestep \
spacing; accuracy = fraction
  the digits classifier (`checkpoints/digits_classifier`) reads as the digit asked for; latent FD = Frechet
  distance between generated and data latents pooled to 4x4 (64-d).

| sampler | steps | samples | guidance | seconds | accuracy | latent FD |
|---|---|---|---|---|---|---|
{table}

Load it: `UNet(common.convert.unet_config_from_diffusers(json.load(open("config.json"))))`, then
`load_state_dict(load_file(...))`,
or `diffusers.UNet2DConditionModel.from_pretrained(folder)`; the scheduler config loads into any diffusers
scheduler.
"""
    files = [WEIGHTS_NAME, "config.json", "scheduler_config.json", "ldm.json"]
    weights.write_model_card(folder, card, files)


if __name__ == "__main__":
    sys.exit(cli.run(main))
