"""Train the course's complete text-to-image model on Shapes, and ship it (Rombach et al. 2022, sec. 3.3).

    python 06_stable_diffusion_architecture/train_text_to_image.py                       # --config cpu
    python 06_stable_diffusion_architecture/train_text_to_image.py --ship checkpoints/course_t2i
    accelerate launch 06_stable_diffusion_architecture/train_text_to_image.py --config gpu   # N GPUs, bf16
    COURSE_FAST=1 python 06_stable_diffusion_architecture/train_text_to_image.py --out /tmp/t2i   # seconds

Frozen shipped VAE (checkpoints/vae_shapes), a CLIP-architecture text encoder trained from scratch jointly
with the cross-attention UNet, caption dropout for classifier-free guidance, EMA weights, bf16 on a GPU,
checkpoints every ``checkpoint_every`` steps and exact resume (run the same command again after a kill). The
logic lives in common/text_to_image.py; this script reads arguments, prints what it measures and ships the
model: ``--ship DIR`` writes a diffusers-format folder through ``StableDiffusion.save_pretrained`` and a model
card (fill its metrics with ``evaluate.py --model DIR --update-card``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from common import cli
from common.pipeline_io import write_pipeline
from common.runtime import describe, get_device, is_fast, seed_everything
from common.text_to_image import (
    CONFIG_NAMES,
    OBJECTIVES,
    TextToImageConfig,
    build_pipeline,
    check_fits_vae,
    load_vae,
    train,
    vae_path,
    write_model_card,
)
from common.weights import count_parameters

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        default=None,
        help=f"one of {', '.join(CONFIG_NAMES)} (default: tiny under COURSE_FAST, gpu on CUDA, else cpu)",
    )
    p.add_argument(
        "--steps", type=cli.positive_int, default=None, help="override the config's optimizer steps"
    )
    p.add_argument(
        "--batch-size", type=cli.positive_int, default=None, help="override the config's batch size"
    )
    p.add_argument("--lr", type=cli.positive_float, default=None, help="override the config's learning rate")
    p.add_argument(
        "--train-size",
        type=cli.positive_int,
        default=None,
        help="override the number of cached training items",
    )
    p.add_argument(
        "--precision",
        choices=("no", "bf16", "fp16"),
        default=None,
        help="override the config's mixed precision (no = fp32)",
    )
    p.add_argument("--ema-decay", type=cli.fraction, default=None, help="override the config's EMA decay")
    p.add_argument(
        "--warmup", type=cli.nonnegative_int, default=None, help="override the config's LR warm-up steps"
    )
    p.add_argument(
        "--checkpoint-every",
        type=cli.nonnegative_int,
        default=None,
        help="override how often (steps) a checkpoint is written",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help="eps: predict the noise (SD 1.x); v: predict v on the zero-terminal-SNR schedule, sampled from "
        "its last timestep (SD 2.x, Lin et al. 2023); flow: SD 3's flow matching (a velocity, sampled with "
        "flow_euler). Default: the config's",
    )
    p.add_argument(
        "--snr-offset",
        type=cli.nonnegative_float,
        default=None,
        help="v only: the x0 error's weight is min(SNR + offset, gamma). 1 keeps the pure-noise steps at "
        "weight 1; smaller spends more of the gradient on the low-noise steps, where shapes are drawn. "
        "Default: the config's",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from a shipped course pipeline folder of the same config (fine-tuning), "
        "e.g. checkpoints/course_t2i",
    )
    p.add_argument(
        "--minutes",
        type=cli.positive_float,
        default=None,
        help="wall-clock budget of the training loop: the step count (at most --steps) is lowered to "
        "fit, and the LR schedule with it",
    )
    p.add_argument(
        "--echo-prompt",
        action="store_true",
        help="write each prompt twice into a 32-token context (ShapesTokenizer echo=True): every "
        "word of the second copy sees the whole prompt through the causal text encoder",
    )
    p.add_argument(
        "--snapshot-every",
        type=cli.nonnegative_int,
        default=None,
        help="keep the EMA weights every N steps in OUT/snapshots (0 = never; default: the config's), "
        "for adherence_curve.py",
    )
    p.add_argument(
        "--vae", default=None, help="the frozen VAE folder (default: the config's, under checkpoints/)"
    )
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "06_t2i"), help="run folder: checkpoints, log.csv, loss.png"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the latent cache goes (default ~/.cache/latent_diffusion_course)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start fresh even if --out holds checkpoints")
    p.add_argument(
        "--ship", default=None, help="write the trained pipeline (EMA weights) here, with a model card"
    )
    p.add_argument(
        "--ship-dtype",
        choices=("fp32", "fp16"),
        default=None,
        help="how --ship stores the weights (default: the config's; fp16 halves the folder)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="ship into a non-course folder: replace same-named files, keep the others",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    t0 = time.perf_counter()  # the whole command's clock: latent caching included
    args = parse_args(argv)
    device = get_device(args.device)
    name = args.config or ("tiny" if is_fast() else "gpu" if device.type == "cuda" else "cpu")
    config = TextToImageConfig.named(name).with_overrides(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        train_size=args.train_size,
        mixed_precision=args.precision,
        ema_decay=args.ema_decay,
        warmup_steps=args.warmup,
        checkpoint_every=args.checkpoint_every,
        ship_dtype=args.ship_dtype,
        objective=args.objective,
        snr_offset=args.snr_offset,
    )
    if args.echo_prompt:
        config = config.with_overrides(echo_prompt=True, context_length=max(32, config.context_length))
    out = cli.writable_dir(args.out, "--out")  # every output place is checked before the training
    if args.ship:
        cli.check_ship(args.ship, "pipeline", overwrite=args.overwrite)
    if args.init_from and not (Path(args.init_from) / "model_index.json").is_file():
        raise cli.UsageError(
            f"--init-from {args.init_from}: no course pipeline there (no model_index.json); give a "
            "folder that --ship wrote, e.g. checkpoints/course_t2i"
        )
    seed_everything(args.seed)
    print(describe(device))
    args.vae = args.vae or str(vae_path(config))
    vae = load_vae(args.vae, device)
    try:
        check_fits_vae(config, vae)
    except ValueError as e:
        raise cli.UsageError(f"--vae {args.vae}: {e}") from None
    timing_path = out / "timing.json"
    previous = json.loads(timing_path.read_text()) if timing_path.is_file() and not args.no_resume else {}
    snapshot_every = config.snapshot_every if args.snapshot_every is None else args.snapshot_every
    trainer, tokenizer = train(
        config,
        vae,
        out,
        seed=args.seed,
        device=device,
        resume=not args.no_resume,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        time_budget_s=args.minutes * 60 if args.minutes else None,
        init_from=args.init_from,
        snapshot_every=snapshot_every,
        clock_start=t0 - previous.get("seconds", 0.0),
    )
    config = config.with_overrides(steps=trainer.cfg.steps)  # a --minutes budget may have lowered it
    seconds = time.perf_counter() - t0
    if not trainer.accelerator.is_main_process:
        return {}
    timing = {
        "seconds": previous.get("seconds", 0.0) + seconds,
        "invocations": previous.get("invocations", 0) + 1,
        "steps": config.steps,
    }
    timing_path.write_text(json.dumps(timing, indent=2) + "\n")
    model = trainer.ema_model()  # the EMA weights: what the shipped model samples with
    pipe = build_pipeline(model, tokenizer, vae, config, device=device)
    n_unet, n_text = count_parameters(model["unet"]), count_parameters(model["text_encoder"])
    final_loss = trainer._log_rows()[-1]["loss"] if trainer._log_rows() else "n/a"
    print(
        f"config {name}: UNet {n_unet / 1e6:.2f} M, text encoder {n_text / 1e6:.2f} M parameters; "
        f"{config.steps} steps x batch {config.batch_size}; final loss {final_loss}; "
        f"wall time {seconds:.0f} s this run, {timing['seconds']:.0f} s over "
        f"{timing['invocations']} invocation(s)"
    )
    with torch.no_grad():  # one look at the result: the first held-out prompts, 4 samples
        from common.shapes import Shapes

        prompts = Shapes.prompts("test", 4)
        images = pipe(
            prompts,
            num_inference_steps=10 if is_fast() else 25,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="pt",
            progress=False,
        ).images
        from torchvision.utils import save_image

        save_image(images, out / "samples.png", nrow=4)
        print(f"samples for {prompts} -> {out / 'samples.png'}")
    weighting = {
        "eps": f"eps prediction, Min-SNR gamma {config.snr_gamma}",
        "v": f"v prediction on the zero-terminal-SNR schedule, trailing timesteps, Min-SNR gamma "
        f"{config.snr_gamma} on SNR + {config.snr_offset:g}",
        "flow": "flow matching (SD 3: velocity target, logit-normal t, plain MSE; sampler flow_euler, "
        f"shift {config.flow_shift})",
    }[config.objective]
    result = {
        "config": name,
        "objective": config.objective,
        "steps": config.steps,
        "seconds": timing["seconds"],
        "unet_params": n_unet,
        "text_params": n_text,
        "final_loss": final_loss,
    }
    if args.ship:
        command = "python " + " ".join(
            shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
        )
        hardware = (
            f"{describe(device)}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
        )
        training = (
            f"- command: `{command}`\n- config: `{name}` (common/text_to_image.py "
            f"`TextToImageConfig.{name}()`), "
            f'seed {args.seed}\n- data: Shapes 64 px, {config.train_size:,} training items (split="train": '
            "no "
            f"held-out colour/shape pair), latents from the frozen VAE `{os.path.relpath(args.vae, ROOT)}`\n"
            + (
                f"- initialised from `{os.path.relpath(args.init_from, ROOT)}` (its UNet and text encoder; a "
                f"fresh optimizer): a fine-tune, so the steps and time below add to that model's own\n"
                if args.init_from
                else ""
            )
            + f"- model: UNet {n_unet:,} + text encoder {n_text:,} parameters (the VAE is frozen)\n"
            f"- steps: {config.steps:,} x batch {config.batch_size}, "
            f"AdamW lr {config.lr} ({config.warmup_steps} warm-up, {config.lr_schedule}), "
            f"EMA {config.ema_decay}, caption dropout {config.caption_dropout}, "
            f"objective {config.objective}: {weighting}, latents: "
            f"posterior {config.latents} x scaling_factor, "
            f"{'fp32' if config.mixed_precision == 'no' else config.mixed_precision} precision; "
            f"final training loss {final_loss}\n"
            f"- wall time: {timing['seconds'] / 60:.1f} min over {timing['invocations']} invocation(s)\n"
            f"- hardware: {hardware}\n- weights: the EMA weights, stored in {config.ship_dtype}\n"
        )

        def write(folder: Path) -> None:
            write_pipeline(pipe, folder, torch.float16 if config.ship_dtype == "fp16" else torch.float32)
            write_model_card(folder, training)

        ship = cli.ship(args.ship, "pipeline", write, overwrite=args.overwrite)
        print(f"shipped to {ship}")
    return result


if __name__ == "__main__":
    sys.exit(cli.run(main))
