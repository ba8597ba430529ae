"""Text in, PNG out: the course's main command.

    python 06_stable_diffusion_architecture/generate.py "a small red circle at the top left" --out out.png

uses the course's own text-to-image model (``checkpoints/course_t2i``, trained from scratch on Shapes by
``train_text_to_image.py``), offline. ``--model PATH`` takes any diffusers-format folder or a single-file SD 1.x
checkpoint (.safetensors; give SD 1.5's CLIP tokenizer folder with ``--tokenizer``), e.g. real Stable Diffusion 1.5:

    python 06_stable_diffusion_architecture/generate.py "a watercolor fox" --model ~/sd15 --height 512 --width 512

``--init-image`` (with ``--strength``) turns on img2img, ``--init-image`` + ``--mask`` inpainting (white = repaint).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path from anywhere: `common` is importable

import torch  # noqa: E402

from common.pipeline import StableDiffusion, image_grid, main_model_path  # noqa: E402
from common.runtime import budget, get_device  # noqa: E402
from common.samplers import SAMPLERS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("prompt", help="what to draw, e.g. 'a small red circle at the top left'")
    p.add_argument("--out", default="out.png", help="the PNG to write (a grid with --num-images > 1)")
    p.add_argument("--model", default=None,
                   help="diffusers folder or single-file .safetensors (default: checkpoints/course_t2i)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder, for a single-file checkpoint")
    p.add_argument("--seed", type=int, default=0, help="same seed, same image")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 25; 2 under COURSE_FAST=1)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale s (1 = off)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: the model's scheduler")
    p.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's training size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's training size)")
    p.add_argument("--init-image", default=None, help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: 0 keeps the image, 1 ignores it")
    p.add_argument("--mask", default=None, help="inpainting: white = repaint (needs --init-image, same size)")
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt, saved side by side")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU only)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 for models under 50 M parameters, where thread start-up costs more "
                        "than it saves and a shared machine makes it worse; torch's default for larger ones)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from PIL import Image

    if args.num_images < 1:
        raise SystemExit(f"--num-images must be >= 1, got {args.num_images}")
    if args.mask and not args.init_image:
        raise SystemExit("--mask needs --init-image: inpainting repaints part of an image")
    device = get_device(args.device)
    dtype = torch.float16 if args.fp16 else torch.float32
    if args.fp16 and device.type == "cpu":
        raise SystemExit("--fp16 needs a GPU; drop it on the CPU")
    try:
        model = Path(args.model) if args.model else main_model_path()
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    t0 = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(model, device=device, dtype=dtype, sampler=args.sampler,
                                           tokenizer_path=args.tokenizer)
    t_load = time.perf_counter() - t0
    if device.type == "cpu":
        small = sum(p.numel() for p in pipe.unet.parameters()) < 50_000_000
        torch.set_num_threads(args.threads or (1 if small else torch.get_num_threads()))
    image = Image.open(args.init_image).convert("RGB") if args.init_image else None
    mask = Image.open(args.mask).convert("L") if args.mask else None
    steps = args.steps or budget(fast=2, cpu=25)
    t0 = time.perf_counter()
    out = pipe([args.prompt] * args.num_images, negative_prompt=args.negative, height=args.height, width=args.width,
               num_inference_steps=steps, guidance_scale=args.guidance, generator=args.seed, image=image,
               strength=args.strength, mask_image=mask, progress=sys.stderr.isatty())
    t_gen = time.perf_counter() - t0
    grid = image_grid(out.images)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.png")
    grid.save(tmp)
    os.replace(tmp, out_path)  # atomic: a killed run never leaves half a PNG
    w, h = out.images[0].size
    print(f"model: {model} ({pipe.sampler_name if args.sampler is None else args.sampler}, {steps} steps, "
          f"guidance {args.guidance}, seed {args.seed})")
    print(f"loaded in {t_load:.2f} s; generated {args.num_images} image(s) of {w}x{h} px in {t_gen:.2f} s "
          f"on {device}" + (f" ({torch.get_num_threads()} thread(s))" if device.type == "cpu" else ""))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
