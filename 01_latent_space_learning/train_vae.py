"""Stage one of latent diffusion: train the autoencoder (Rombach et al. 2022, sec. 3 and appendix G).

    python 01_latent_space_learning/train_vae.py                  # Shapes, 64 px, f = 4, 4 x 16 x 16 latents
    python 01_latent_space_learning/train_vae.py --data photos --ship checkpoints/vae_photos
    COURSE_FAST=1 python 01_latent_space_learning/train_vae.py --out /tmp/vae   # seconds, for the tests

The objective is common/losses.py's VAELoss (Esser et al. 2021, eq. 5-7; Rombach et al. 2022, appendix G):

    L_G = |x - D(z)|_1 + w_lpips LPIPS(x, D(z)) + w_kl KL(q(z|x) || N(0, I))
          + [step >= disc_start] lambda w_gan L_adv
    L_D = [step >= disc_start] hinge(D_patch(x), D_patch(D(z)))

The run then
1. evaluates on held-out data (``split="test"``: Shapes scenes with held-out colour-shape pairs, or the
   held-out photograph) with the posterior mean: PSNR, SSIM, and LPIPS when its backbone is on disk; beside
   it, the baseline of plain bicubic down/up-sampling that keeps as many numbers as the
   latent (3 s^2 <= c h w);
2. measures the latent scaling factor, 1 / std of posterior samples z ~ q(z|x) over a few training batches
   (the LDM paper's recipe, which gave SD its 0.18215), and stores it in the config;
3. writes a diffusers-format folder (config.json + diffusion_pytorch_model.safetensors, loadable by
   ``diffusers.AutoencoderKL.from_pretrained`` and
   ``common.autoencoder.AutoencoderKL.load``) with a model card.

The adversarial term. ``common.training.Trainer`` drives one model with one AdamW. With ``--gan-weight > 0``
the model is ``ModuleDict(vae=..., disc=PatchDiscriminator)`` and the step minimises L_G + L_D where each term
reaches only its own player: the generator's adversarial term sees the discriminator through a stop-gradient
view (its weights detached), and L_D sees detached reconstructions. Adam is element-wise, so one AdamW over
the two disjoint parameter sets is exactly two AdamWs with the same hyper-parameters taking simultaneous steps
(the one coupling is the global gradient-norm clip, shared by both). Taming/SD alternate the two updates
instead; on Shapes the term is off by default (``--gan-weight 0``): flat-coloured shapes reach 30 dB with L1
alone, and the GAN's job, sharp texture, has little to do there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import cli
from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.losses import (
    LPIPS,
    PatchDiscriminator,
    VAELoss,
    VAELossWeights,
    lpips_backbone_available,
    lpips_backbone_path,
)
from common.metrics import psnr, ssim
from common.runtime import budget, describe, get_device, is_fast, seed_everything
from common.training import TrainConfig, Trainer
from common.weights import WEIGHTS_NAME, file_sha256, write_model_card

DATASETS = ("shapes", "photos", "digits")
FACTORS = (4, 8)


# ------------------------------------------------------------------------------------------------------- data
class Images(torch.utils.data.Dataset):
    """Any of the course's datasets as {"image": (3, H, W) in [-1, 1]} (grey digits repeated to RGB)."""

    def __init__(self, name: str, resolution: int, split: str, length: int, seed: int, factor: int):
        from common.data import Digits, Photos, Shapes

        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
        self.name = name
        if name == "shapes":
            self.ds = Shapes(resolution, split, length, seed=seed, multiple_of=factor)
        elif name == "photos":
            self.ds = Photos(resolution, split, length, seed=seed)
        else:
            self.ds = Digits(resolution, split, length, seed=seed, source="auto")

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        item = self.ds[i]
        image = item[0] if isinstance(item, tuple) else item["image"]
        return {"image": image.expand(3, -1, -1).contiguous()}  # (3, H, W)


def vae_config(*, resolution: int, factor: int, latent_channels: int) -> AutoencoderConfig:
    """The course preset (f = 4); f = 8 adds a fourth level of the last width, as SD's VAE has four."""
    base = AutoencoderConfig.course()
    widths = base.block_out_channels
    levels = int(math.log2(factor)) + 1
    widths = widths + (widths[-1],) * (levels - len(widths))
    return dataclasses.replace(
        base, block_out_channels=widths, latent_channels=latent_channels, sample_size=resolution
    )


class StopGradient(nn.Module):
    """Runs ``module`` with its parameters detached: gradients reach the input, never the module's weights."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = [module]  # a list, so the module is not registered twice (and not saved twice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.inner[0]
        params = {k: v.detach() for k, v in module.named_parameters()}
        return torch.func.functional_call(module, {**params, **dict(module.named_buffers())}, (x,))


# ------------------------------------------------------------------------------------------------------- eval
def bicubic_baseline(x: torch.Tensor, numbers: int) -> tuple[torch.Tensor, int]:
    """Bicubic down to s x s with 3 s^2 <= ``numbers`` (the latent's size), then back
    up; returns (x_hat, s)."""
    C, H, W = x.shape[1:]
    s = int(math.floor(math.sqrt(numbers / C)))
    small = F.interpolate(x, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(H, W), mode="bicubic", align_corners=False).clamp(-1, 1), s


@torch.no_grad()
def evaluate(vae: AutoencoderKL, ds: Images, n: int, device, batch_size: int = 32) -> dict:
    """PSNR / SSIM (and LPIPS when available) of reconstructions through the posterior
    mean, and of bicubic."""
    vae.eval()
    xs, recs, bics = [], [], []
    for start in range(0, n, batch_size):
        x = torch.stack([ds[i]["image"] for i in range(start, min(n, start + batch_size))]).to(device)
        z = vae.encode(x).mode()  # (B, c, H/f, W/f)
        recs.append(vae.decode(z).clamp(-1, 1).cpu())
        bic, side = bicubic_baseline(x, z[0].numel())
        bics.append(bic.cpu())
        xs.append(x.cpu())
    x, rec, bic = torch.cat(xs), torch.cat(recs), torch.cat(bics)
    out = {
        "n_images": n,
        "psnr": psnr(rec, x),
        "ssim": ssim(rec, x),
        "bicubic_side": side,
        "latent_numbers": int(z[0].numel()),
        "bicubic_numbers": 3 * side * side,
        "bicubic_psnr": psnr(bic, x),
        "bicubic_ssim": ssim(bic, x),
    }
    if lpips_backbone_available():
        from common.metrics import lpips_distance

        out["lpips"] = lpips_distance(rec, x)
        out["bicubic_lpips"] = lpips_distance(bic, x)
    return out, (x[:8], rec[:8], bic[:8])


@torch.no_grad()
def measure_scaling_factor(
    vae: AutoencoderKL, ds: Images, device, *, batches: int = 4, batch_size: int = 32, seed: int = 0
) -> tuple[float, float]:
    """1 / std of posterior samples z ~ q(z|x) over a few batches (the LDM recipe); returns (factor, std)."""
    vae.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    zs = []
    for b in range(batches):
        x = torch.stack([ds[i]["image"] for i in range(b * batch_size, (b + 1) * batch_size)]).to(device)
        zs.append(vae.encode(x).sample(g).flatten().cpu())
    std = float(torch.cat(zs).std())
    return 1.0 / std, std


# ------------------------------------------------------------------------------------------------------- card
def write_card(folder: Path, info: dict) -> Path:
    m, c = info["metrics"], info["config"]
    lp = (
        f"| LPIPS (AlexNet) | {m['lpips']:.4f} | {m['bicubic_lpips']:.4f} |\n"
        if "lpips" in m
        else "| LPIPS | not measured (backbone not on disk) | |\n"
    )
    text = f"""# {info["name"]}: a course-trained AutoencoderKL ({info["data"]}, {c["sample_size"]} \
px, f = {info["factor"]})

Stage one of latent diffusion, trained by `01_latent_space_learning/train_vae.py`. Diffusers folder layout:
`diffusers.AutoencoderKL.from_pretrained(this_folder)` and \
`common.autoencoder.AutoencoderKL.load(this_folder)`
both load it. Latents: {c["latent_channels"]} x {c["sample_size"] // info["factor"]} x \
{c["sample_size"] // info["factor"]} for a {c["sample_size"]} px image;
multiply them by `scaling_factor` = {c["scaling_factor"]:.5f} (1 / std \
{info["latent_std"]:.4f} of posterior samples,
measured on the training data) before diffusion, divide before decoding.

| | |
|---|---|
| command | `{info["command"]}` |
| data | {info["data_description"]} |
| steps x batch | {info["steps"]} x {info["batch_size"]} (lr {info["lr"]}, cosine, warm-up \
{info["warmup"]}){info["init_note"]} |
| loss | mean L1 + {info["weights"]["lpips"]} LPIPS + {info["weights"]["kl"]:.3g} KL + \
{info["weights"]["gan"]} GAN (from step {info["weights"]["disc_start"]}); the KL weight is SD's \
{info["kl_weight_sd"]:g} on summed pixels |
| LPIPS | {info["lpips_note"]} |
| wall time | {info["train_minutes"]:.1f} min training, {info["total_minutes"]:.1f} min in all |
| hardware | {info["hardware"]} |
| parameters | {info["parameters"]:,} |

Held-out reconstructions ({m["n_images"]} images of split "test", posterior mean), against \
bicubic down/up that keeps
as many numbers ({m["bicubic_side"]} x {m["bicubic_side"]} x 3 = {m["bicubic_numbers"]}) as the \
latent ({m["latent_numbers"]}):

| metric | VAE | bicubic |
|---|---|---|
| PSNR (dB) | {m["psnr"]:.2f} | {m["bicubic_psnr"]:.2f} |
| SSIM | {m["ssim"]:.4f} | {m["bicubic_ssim"]:.4f} |
{lp}
`reconstructions.png`: held-out inputs, VAE reconstructions, bicubic.
"""
    return write_model_card(folder, text)


def ship(
    vae: AutoencoderKL,
    folder: Path,
    info: dict,
    grid: Path | None,
    *,
    overwrite: bool = False,
    what: str = "--ship",
) -> Path:
    """Write the diffusers folder + card through ``common.cli.ship``: a user's files in ``folder`` are kept, a
    folder the course did not write is refused unless ``overwrite``, a previous VAE ship is replaced."""

    def write(tmp: Path) -> None:
        vae.save(tmp)
        info["sha256"] = file_sha256(tmp / WEIGHTS_NAME)
        metrics = {k: v for k, v in info.items() if k != "config"}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if grid is not None and grid.exists():
            shutil.copy(grid, tmp / "reconstructions.png")
        write_card(tmp, info)

    return cli.ship(folder, "vae", write, overwrite=overwrite, what=what)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", choices=DATASETS, default="shapes")
    p.add_argument(
        "--resolution", type=cli.positive_int, default=None, help="image side (default: 64, digits 32)"
    )
    p.add_argument(
        "--factor",
        type=int,
        choices=FACTORS,
        default=4,
        help="downsampling factor f = image side / latent side",
    )
    p.add_argument("--latent-channels", type=cli.positive_int, default=4)
    p.add_argument(
        "--steps",
        type=cli.positive_int,
        default=None,
        help="default: budget(fast=4, cpu=2500 on shapes, else 1000)",
    )
    p.add_argument("--batch-size", type=cli.positive_int, default=None, help="default: budget(fast=4, cpu=8)")
    p.add_argument("--lr", type=cli.positive_float, default=1e-3)
    p.add_argument(
        "--warmup", type=cli.nonnegative_int, default=None, help="warm-up steps (default: 5%% of the run)"
    )
    p.add_argument(
        "--init-logvar",
        type=cli.finite_float,
        default=-6.0,
        help="initial bias of the posterior's log-variance. At the default init (logvar ~ 0) z carries "
        "noise of std ~1 and, with a KL weight of 1e-6, Adam takes thousands of steps to walk it down; "
        "the trained posterior ends narrow anyway, so a short run starts it there",
    )
    p.add_argument(
        "--init-from", default=None, help="start from a trained VAE folder of the same config (fine-tuning)"
    )
    p.add_argument(
        "--kl-weight",
        type=cli.nonnegative_float,
        default=1e-6,
        help="SD's kl_weight: KL summed per image against the L1 summed over the image's pixels (taming/SD "
        "convention). VAELoss averages the L1 over pixels, so it gets kl_weight / (3 H W)",
    )
    p.add_argument(
        "--lpips-weight",
        type=cli.nonnegative_float,
        default=1.0,
        help="used only when the LPIPS backbone is on disk",
    )
    p.add_argument(
        "--gan-weight",
        type=cli.nonnegative_float,
        default=0.0,
        help="adversarial weight (x adaptive lambda); 0 = off",
    )
    p.add_argument(
        "--disc-start",
        type=cli.nonnegative_int,
        default=None,
        help="step the discriminator starts (default: half the run)",
    )
    p.add_argument(
        "--eval-images",
        type=cli.positive_int,
        default=None,
        help="held-out images to evaluate (default: fast 8, cpu 256)",
    )
    p.add_argument(
        "--out", default="runs/vae", help="run folder: checkpoints, log, grid, metrics, final model"
    )
    p.add_argument(
        "--keep-checkpoints",
        type=cli.positive_int,
        default=2,
        help="checkpoints kept in --out (the newest; one every 200 steps): keep them all to look back at "
        "the training later (chapter 06's training_stages.py)",
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="'auto' (the newest checkpoint in --out, if any), 'no', or a checkpoint path",
    )
    p.add_argument(
        "--ship",
        default=None,
        help="also write the diffusers folder + model card here (e.g. checkpoints/vae_shapes)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="ship into a non-course folder: replace same-named files, keep the others",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    args = p.parse_args(argv)
    args.resolution = args.resolution or (32 if args.data == "digits" else 64)
    if args.resolution % args.factor:
        p.error(
            f"--resolution {args.resolution} is not a multiple of --factor {args.factor}; "
            f"the encoder halves the side {int(math.log2(args.factor))} times (try "
            f"{args.resolution // args.factor * args.factor})"
        )
    if args.latent_channels < 1:
        p.error(f"--latent-channels must be >= 1, got {args.latent_channels}")
    args.steps = (
        args.steps if args.steps is not None else budget(fast=4, cpu=2500 if args.data == "shapes" else 1000)
    )
    args.batch_size = args.batch_size if args.batch_size is not None else budget(fast=4, cpu=8)
    args.warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    args.disc_start = args.disc_start if args.disc_start is not None else args.steps // 2
    args.eval_images = args.eval_images if args.eval_images is not None else budget(fast=8, cpu=256)
    try:
        get_device(args.device)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    seed_everything(args.seed)
    device = get_device(args.device)
    print(describe(device))
    out = cli.writable_dir(args.out, "--out")  # the outputs' places are checked before the training
    if args.ship:
        cli.check_ship(args.ship, "vae", overwrite=args.overwrite)
    if args.resume not in ("auto", "no") and not Path(args.resume).exists():
        raise cli.UsageError(
            f"--resume {args.resume}: no such checkpoint folder; expected 'auto', 'no' or a "
            "checkpoint path such as runs/vae/checkpoints/step_0000200"
        )
    if args.init_from and not (Path(args.init_from) / "config.json").is_file():
        raise cli.UsageError(
            f"--init-from {args.init_from}: no trained VAE there (expected config.json and "
            f"{WEIGHTS_NAME}, as --ship writes)"
        )
    train_ds = Images(
        args.data, args.resolution, "train", args.steps * args.batch_size + 256, args.seed, args.factor
    )
    test_ds = Images(args.data, args.resolution, "test", args.eval_images, args.seed + 1, args.factor)

    config = vae_config(resolution=args.resolution, factor=args.factor, latent_channels=args.latent_channels)
    vae = AutoencoderKL(config)
    if args.init_from:  # fine-tune a trained VAE of the same config (its weights replace the initialisation)
        start = AutoencoderKL.load(args.init_from)
        if (
            start.config.block_out_channels != config.block_out_channels
            or start.config.latent_channels != config.latent_channels
        ):
            raise cli.UsageError(
                f"--init-from {args.init_from} holds a VAE of another config "
                f"({start.config.block_out_channels}, {start.config.latent_channels} latent channels); "
                f"expected {config.block_out_channels}, {config.latent_channels}"
            )
        vae.load_state_dict(start.state_dict())
        print(f"initialised from {args.init_from}")
    else:
        with torch.no_grad():  # start the posterior narrow: see --init-logvar
            vae.quant_conv.bias[config.latent_channels :].fill_(args.init_logvar)
    f = config.downsample_factor
    print(
        f"AutoencoderKL {config.block_out_channels} f={f}: {args.resolution} px -> latents "
        f"{args.latent_channels} x {args.resolution // f} x {args.resolution // f}; "
        f"{sum(p.numel() for p in vae.parameters()):,} parameters"
    )

    lpips_on = args.lpips_weight > 0 and lpips_backbone_available()
    if args.lpips_weight > 0 and not lpips_on:
        lpips_note = (
            f"requested (weight {args.lpips_weight}) but OFF: the AlexNet backbone is not at "
            f"{lpips_backbone_path()}; trained without the perceptual term"
        )
        print(f"note: LPIPS {lpips_note} (see common/losses.py LPIPS for how to get it)")
    else:
        lpips_note = "on" if lpips_on else "off (weight 0)"
    kl_per_pixel = args.kl_weight / (3 * args.resolution**2)  # SD's weight in VAELoss's per-pixel-mean units
    print(f"KL weight {args.kl_weight:g} (SD convention) = {kl_per_pixel:.3g} on VAELoss's per-pixel-mean L1")
    weights = VAELossWeights(
        rec=1.0,
        lpips=args.lpips_weight if lpips_on else 0.0,
        kl=kl_per_pixel,
        gan=args.gan_weight,
        disc_start=args.disc_start,
    )
    lpips = LPIPS() if lpips_on else None
    gan = args.gan_weight > 0
    disc = PatchDiscriminator(base_channels=32, n_layers=2) if gan else None  # small D for 32-64 px images
    model = nn.ModuleDict({"vae": vae, "disc": disc}) if gan else vae
    generator_loss = VAELoss(weights, lpips=lpips, discriminator=StopGradient(disc) if gan else None)
    critic_loss = VAELoss(weights, lpips=lpips, discriminator=disc) if gan else None
    holder: dict = {}

    def loss_fn(model, batch, generator):
        x = batch["image"]  # (B, 3, H, W)
        ae = model["vae"] if gan else model
        step = holder["trainer"].step  # the optimizer step about to be taken (restored on resume)
        x_hat, posterior = ae(x, sample_posterior=True, generator=generator)
        loss, terms = generator_loss.generator_loss(x, x_hat, posterior, step=step, last_layer=ae.last_layer)
        if gan:
            d_loss, d_terms = critic_loss.discriminator_loss(x, x_hat, step=step)
            loss = loss + d_loss
            terms.update(d_terms)
        return loss, {k: v for k, v in terms.items() if k != "total"}

    if lpips is not None:
        lpips.to(device)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        lr_schedule="cosine",
        ema_decay=None,
        betas=(0.5, 0.9) if gan else (0.9, 0.999),
        checkpoint_every=budget(fast=2, cpu=200),
        keep=args.keep_checkpoints,
        log_every=budget(fast=1, cpu=25),
        seed=args.seed,
        progress=not is_fast(),
    )
    resume = {"auto": True, "no": False}.get(args.resume, args.resume)
    probe = torch.stack([test_ds[i]["image"] for i in range(min(16, len(test_ds)))])

    def report_psnr(trainer, step):  # a quick held-out check while training runs
        ae = trainer.unwrapped["vae"] if gan else trainer.unwrapped
        with torch.no_grad():
            ae.eval()
            rec = ae.decode(ae.encode(probe.to(device)).mode()).clamp(-1, 1).cpu()
            ae.train()
        print(f"step {step}: held-out PSNR {psnr(rec, probe):.2f} dB ({len(probe)} images)", flush=True)

    trainer = Trainer(
        model,
        train_ds,
        loss_fn,
        cfg,
        out,
        device=device,
        resume=resume,
        callbacks=[report_psnr],
        callback_every=budget(fast=0, cpu=100),
    )
    holder["trainer"] = trainer
    t0 = time.perf_counter()
    trained = trainer.fit()
    train_minutes = (time.perf_counter() - t0) / 60
    vae = trained["vae"] if gan else trained

    scale, std = measure_scaling_factor(
        vae,
        train_ds,
        device,
        batches=budget(fast=1, cpu=4),
        batch_size=budget(fast=8, cpu=32),
        seed=args.seed,
    )
    vae.config = dataclasses.replace(vae.config, scaling_factor=round(scale, 5))
    metrics, (x, rec, bic) = evaluate(vae, test_ds, args.eval_images, device)
    print(f"scaling factor: 1 / std(z) = 1 / {std:.4f} = {scale:.5f}   (SD 1.x: 0.18215)")
    print(
        f"held-out ({metrics['n_images']} images): VAE PSNR {metrics['psnr']:.2f} dB "
        f"SSIM {metrics['ssim']:.4f}"
        + (
            f" LPIPS {metrics['lpips']:.4f}"
            if "lpips" in metrics
            else " LPIPS not measured (backbone not on disk)"
        )
    )
    print(
        f"bicubic down/up to {metrics['bicubic_side']}x{metrics['bicubic_side']}x3 = "
        f"{metrics['bicubic_numbers']} numbers (latent: {metrics['latent_numbers']}): "
        f"PSNR {metrics['bicubic_psnr']:.2f} dB SSIM {metrics['bicubic_ssim']:.4f}"
        + (f" LPIPS {metrics['bicubic_lpips']:.4f}" if "bicubic_lpips" in metrics else "")
    )

    from common.viz import side_by_side

    grid = out / "reconstructions.png"
    fig = side_by_side({"held-out": x, "VAE": rec, f"bicubic {metrics['bicubic_side']}px": bic}, size=1.0)
    fig.savefig(grid, dpi=72, bbox_inches="tight")
    total_minutes = (time.perf_counter() - t_start) / 60
    from common.data import PHOTOS

    info = {
        "name": f"vae_{args.data}",
        "data": args.data,
        "factor": f,
        "command": "python "
        + " ".join([Path(sys.argv[0]).as_posix().split("/work/main/")[-1], *sys.argv[1:]])
        if argv is None
        else "main(" + repr(argv) + ")",
        "data_description": {
            "shapes": "common.data.Shapes (train split; evaluated on the test split, "
            "held-out colour-shape pairs)",
            "photos": (
                "common.data.Photos: crops of the photographs bundled with scikit-image and matplotlib "
                f"({len(PHOTOS) - 1} for training; evaluated on crops of the held-out 'chelsea')"
            ),
            "digits": f"common.data.Digits ({getattr(train_ds.ds, 'source', '')})",
        }[args.data],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "weights": dataclasses.asdict(weights),
        "kl_weight_sd": args.kl_weight,
        "init_note": f", initialised from {args.init_from}" if args.init_from else "",
        "lpips_note": lpips_note,
        "train_minutes": train_minutes,
        "total_minutes": total_minutes,
        "resumed_from": str(trainer.resumed_from or ""),
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads "
        f"({os.cpu_count()} cores, shared)"
        if device.type == "cpu"
        else describe(device),
        "parameters": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": vae.config.scaling_factor,
        "latent_std": std,
        "metrics": metrics,
        "config": dataclasses.asdict(vae.config),
        "fast_mode": is_fast(),
    }
    ship(vae, out / "final", dict(info), grid, overwrite=True, what="--out")  # the run folder's own copy
    (out / "metrics.json").write_text(
        json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2) + "\n"
    )
    if args.ship:
        shipped = ship(vae, Path(args.ship), dict(info), grid, overwrite=args.overwrite)
        print(f"shipped to {shipped} (diffusers layout + README.md model card)")
    print(f"training {train_minutes:.1f} min, total {total_minutes:.1f} min; run folder {out}")
    return info


if __name__ == "__main__":
    sys.exit(cli.run(main))
