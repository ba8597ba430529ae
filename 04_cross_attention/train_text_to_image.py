"""Chapter 04's text-to-image run: the course's first model that draws what a caption says.

    python 04_cross_attention/train_text_to_image.py              # CPU config: 1,200 steps, ~9 min, 1 thread
    python 04_cross_attention/train_text_to_image.py --steps 400  # a first look in ~3 min
    COURSE_FAST=1 python 04_cross_attention/train_text_to_image.py --out /tmp/t2i04   # seconds

The frozen shipped VAE (checkpoints/vae_shapes) turns each 64 px Shapes image into 4 x 16 x 16 latents, once
(cached). A CLIP-architecture text encoder, trained from scratch with the UNet as the LDM paper trained its
text model, turns the caption into a context c (N_k tokens x D_c); the UNet's cross-attention layers let each
latent pixel read the words (Q from pixels, K and V from c). Captions are dropped to "" 10% of the time, so
the same network also predicts eps(z_t, t, "") and sampling can use classifier-free guidance.

Then it draws the held-out prompts (``Shapes.prompts("test")``: every prompt holds a colour/shape pair never
seen in training) and the judge (``common/judge.py``, checkpoints/shapes_judge) reports colour, shape, size
and position accuracy for one-object prompts, and objects + relation for two-object prompts. All the logic
lives in common/text_to_image.py (shared with chapter 06's train_text_to_image.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import cli
from common.judge import JUDGE_DIR, Judge
from common.runtime import budget, describe, get_device, is_fast, seed_everything
from common.shapes import Shapes
from common.text_to_image import TextToImageConfig, build_pipeline, load_vae, train, vae_path
from common.unet import UNetConfig
from common.weights import count_parameters

ROOT = Path(__file__).resolve().parents[1]


def chapter_config() -> TextToImageConfig:
    """This chapter's model: 4 x 16 x 16 latents of the f = 4 Shapes VAE, UNet 4.2 M, text encoder 0.6 M
    parameters, batch 32 from 4,000 cached items. (Chapter 06's laptop model, the ``cpu`` preset, moves to the
    f = 8 VAE's 4 x 8 x 8 latents, which a CPU trains several times faster per example.)"""
    return TextToImageConfig.cpu().with_overrides(
        unet=UNetConfig.shapes_text(),
        vae="vae_shapes",
        objective="eps",
        warmup_steps=100,
        ema_decay=0.995,
        ema_start=50,
        train_size=4000,
        checkpoint_every=100,
        ship_dtype="fp32",
    )


def main(argv=None) -> dict:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps", type=cli.positive_int, default=None, help="optimizer steps (default 1200; fast: 4)"
    )
    p.add_argument(
        "--vae", default=None, help="the frozen VAE folder (default: the config's, under checkpoints/)"
    )
    p.add_argument("--judge", default=str(JUDGE_DIR), help="the Shapes judge's folder")
    p.add_argument(
        "--n",
        type=cli.positive_int,
        default=None,
        help="held-out prompts per object count (default 32; fast 2)",
    )
    p.add_argument(
        "--guidance", type=cli.nonnegative_float, default=3.0, help="classifier-free guidance scale"
    )
    p.add_argument(
        "--sampling-steps", type=cli.positive_int, default=None, help="DDIM steps (default 25; fast 4)"
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "04_t2i"))
    p.add_argument(
        "--cache-dir", default=None, help="latent cache folder (default ~/.cache/latent_diffusion_course)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument("--no-resume", action="store_true")
    args = p.parse_args(argv)

    cli.writable_dir(args.out, "--out")  # checked before the training
    device = get_device(args.device)
    seed_everything(args.seed)
    print(describe(device))
    config = (TextToImageConfig.tiny() if is_fast() else chapter_config()).with_overrides(
        steps=args.steps if args.steps is not None else budget(fast=4, cpu=1200)
    )
    vae = load_vae(args.vae or vae_path(config), device)
    trainer, tokenizer = train(
        config,
        vae,
        args.out,
        seed=args.seed,
        device=device,
        resume=not args.no_resume,
        cache_dir=args.cache_dir,
    )
    model = trainer.ema_model()
    print(
        f"UNet {count_parameters(model['unet']) / 1e6:.2f} M + text encoder "
        f"{count_parameters(model['text_encoder']) / 1e6:.2f} M parameters, {config.steps} steps x batch "
        f"{config.batch_size}"
    )
    pipe = build_pipeline(model, tokenizer, vae, config, device=device)
    judge = Judge.load(args.judge)
    n = args.n if args.n is not None else budget(fast=2, cpu=32)
    steps = args.sampling_steps if args.sampling_steps is not None else budget(fast=4, cpu=25)
    results = {}
    for objects in (1, 2):
        prompts = Shapes.prompts("test", n, n_objects=(objects,))
        images = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=args.guidance,
            output_type="pt",
            generator=torch.Generator().manual_seed(args.seed),
            progress=False,
        ).images
        scores = judge.score(images, prompts)
        results[objects] = scores["single"] if objects == 1 else scores["pair"]
        if objects == 1:
            from torchvision.utils import save_image

            save_image(images[:16], Path(args.out) / "heldout_samples.png", nrow=8)
    s, pr = results[1], results[2]
    print(
        f"held-out one-object prompts (n={s['n']}, DDIM {steps} steps, guidance {args.guidance}): colour "
        f"{s['color']:.3f}  shape {s['shape']:.3f}  size {s['size']:.3f}  position {s['position']:.3f}  "
        f"all {s['all']:.3f}"
    )
    print(
        f"held-out two-object prompts (n={pr['n']}): both objects right {pr['objects']:.3f}  "
        f"objects + relation {pr['all']:.3f}"
    )
    return results


if __name__ == "__main__":
    sys.exit(cli.run(main))
