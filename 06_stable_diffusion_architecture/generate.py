"""Text in, PNG out: the course's main command.

    python 06_stable_diffusion_architecture/generate.py "a small red circle at the top left" --out out.png

uses the course's own text-to-image model (``checkpoints/course_t2i``, trained from scratch on Shapes by
``train_text_to_image.py``), offline. ``--model PATH`` takes any diffusers-format folder or a single-file SD
1.x checkpoint (.safetensors; give SD 1.5's CLIP tokenizer folder with ``--tokenizer``), e.g.
real Stable Diffusion 1.5:

    python 06_stable_diffusion_architecture/generate.py "a watercolor fox" --model ~/sd15

``--init-image`` (with ``--strength``) turns on img2img, ``--init-image`` + ``--mask``
inpainting (white = repaint).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from common import cli
from common.pipeline import SAMPLER_NAMES, StableDiffusion, main_model_path
from common.runtime import budget, get_device, reuse_freed_memory
from common.viz import pil_grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # written by PIL in the format the extension names
PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
BIG_AREA = 4  # a request over this many times the model's training area is warned about first


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("prompt", help="what to draw, e.g. 'a small red circle at the top left'")
    p.add_argument(
        "--out",
        default="out.png",
        help=f"the image to write, {'/'.join(IMAGE_SUFFIXES)} (a grid with --num-images > 1)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="diffusers folder or single-file .safetensors (default: checkpoints/course_t2i)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder: needed for a single-file checkpoint (SD 1.5's CLIP tokenizer); for a "
        "folder model it replaces the folder's own",
    )
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="same seed, same image")
    p.add_argument(
        "--steps",
        type=cli.positive_int,
        default=None,
        help="denoising steps (default 25; 2 under COURSE_FAST=1)",
    )
    p.add_argument(
        "--guidance",
        type=cli.nonnegative_float,
        default=7.5,
        help="classifier-free guidance scale s >= 0 (1 = off, 0 = unconditional)",
    )
    p.add_argument(
        "--sampler",
        default=None,
        choices=SAMPLER_NAMES,
        help="default: the model's scheduler (flow_euler: flow-matching models only)",
    )
    p.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    p.add_argument(
        "--height", type=cli.positive_int, default=None, help="pixels (default: the model's training size)"
    )
    p.add_argument(
        "--width", type=cli.positive_int, default=None, help="pixels (default: the model's training size)"
    )
    p.add_argument("--init-image", default=None, help="img2img: start from this image")
    p.add_argument(
        "--strength", type=cli.fraction, default=0.8, help="img2img: 0 keeps the image, 1 ignores it"
    )
    p.add_argument("--mask", default=None, help="inpainting: white = repaint (needs --init-image, same size)")
    p.add_argument(
        "--num-images", type=cli.positive_int, default=1, help="images for the prompt, saved side by side"
    )
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU only)")
    p.add_argument(
        "--threads",
        type=cli.positive_int,
        default=None,
        help="CPU threads (default: 1 for models under 50 M parameters, where thread start-up costs more "
        "than it saves and a shared machine makes it worse; torch's default for larger ones)",
    )
    return p.parse_args(argv)


def open_image(path: str, flag: str, mode: str):
    """An input image, read now (before the model loads), or a one-line error naming the flag."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise cli.UsageError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise cli.UsageError(
            f"{flag} {path} is not an image PIL can read ({cli.one_line(e)}); give a PNG or JPEG"
        ) from None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (None when it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_size(pipe, height: int, width: int, n: int, steps: int, guidance: float) -> None:
    """Warn before a request much larger than the model's training size, with a lower bound on its memory (the
    VAE decoder's widest activation at full resolution) and time (one UNet call timed at the training size,
    scaled by the area: attention grows faster still); refuse one that cannot fit in memory."""
    f = pipe.vae_scale_factor
    side = pipe.unet.config.sample_size * f  # the training size in pixels
    ratio = height * width / side**2
    if ratio <= BIG_AREA:
        return
    bytes_per = torch.finfo(pipe.dtype).bits // 8
    memory = (
        3 * n * pipe.vae.config.block_out_channels[0] * height * width * bytes_per
    )  # 3 maps alive at once
    free = available_bytes(pipe.device)
    if free is not None and memory > free:
        raise cli.UsageError(
            f"{height}x{width} px x {n} image(s) needs at least {memory / 2**30:.1f} GiB to decode "
            f"and {free / 2**30:.1f} GiB is free; ask for a smaller --height/--width (the model "
            f"was trained at {side}x{side})"
        )
    batch = 2 if guidance != 1.0 else 1
    z = torch.zeros(
        batch, pipe.unet.config.in_channels, side // f, side // f, device=pipe.device, dtype=pipe.dtype
    )
    context = pipe.encode_prompt([""] * batch)
    with torch.no_grad():
        t0 = time.perf_counter()
        pipe.unet(z, torch.zeros(batch, dtype=torch.long, device=pipe.device), context)
        per_call = time.perf_counter() - t0
    seconds = per_call * ratio * steps * n
    print(
        f"warning: {height}x{width} px is {ratio:.0f}x the area the model was trained at ({side}x{side}): "
        f"expect at least {memory / 2**30:.1f} GiB of memory and {seconds:.0f} s ({steps} steps x {n} "
        f"image(s); Ctrl-C stops it)",
        file=sys.stderr,
        flush=True,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    # every input is checked before the model loads: a bad path costs a second, not a generation
    if args.mask and not args.init_image:
        raise cli.UsageError("--mask needs --init-image: inpainting repaints part of an image")
    out_path = cli.output_file(args.out, "--out", IMAGE_SUFFIXES)
    image = open_image(args.init_image, "--init-image", "RGB") if args.init_image else None
    mask = open_image(args.mask, "--mask", "L") if args.mask else None
    device = get_device(args.device)
    dtype = torch.float16 if args.fp16 else torch.float32
    if args.fp16 and device.type == "cpu":
        raise cli.UsageError("--fp16 needs a GPU; drop it on the CPU")
    model = Path(args.model) if args.model else main_model_path()
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise cli.UsageError(f"--tokenizer {args.tokenizer}: no such folder")
    t0 = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(
        model, device=device, dtype=dtype, sampler=args.sampler, tokenizer_path=args.tokenizer
    )
    t_load = time.perf_counter() - t0
    if device.type == "cpu":
        small = sum(p.numel() for p in pipe.unet.parameters()) < 50_000_000
        torch.set_num_threads(args.threads or (1 if small else torch.get_num_threads()))
    steps = args.steps if args.steps is not None else budget(fast=2, cpu=25)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = (
        (image.height, image.width) if image is not None else (args.height or side, args.width or side)
    )
    pipe._check_size(height, width)
    check_size(pipe, height, width, args.num_images, steps, args.guidance)
    t0 = time.perf_counter()
    out = pipe(
        [args.prompt] * args.num_images,
        negative_prompt=args.negative,
        height=args.height,
        width=args.width,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        generator=args.seed,
        image=image,
        strength=args.strength,
        mask_image=mask,
        progress=sys.stderr.isatty(),
    )
    t_gen = time.perf_counter() - t0
    grid = pil_grid(out.images)
    fmt = PIL_FORMATS[out_path.suffix.lower()]
    cli.atomic_write(
        out_path, lambda tmp: grid.save(tmp, format=fmt)
    )  # a killed run never leaves half a file
    w, h = out.images[0].size
    print(
        f"model: {model} ({pipe.sampler_name if args.sampler is None else args.sampler}, {steps} steps, "
        f"guidance {args.guidance}, seed {args.seed})"
    )
    print(
        f"loaded in {t_load:.2f} s; generated {args.num_images} image(s) of {w}x{h} px in {t_gen:.2f} s "
        f"on {device}" + (f" ({torch.get_num_threads()} thread(s))" if device.type == "cpu" else "")
    )
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    # On a CPU, glibc hands large freed blocks back to the kernel, and every new activation then arrives as
    # fresh pages the kernel must zero-fill: a third of an SD-size image's time at 512 px (chapter 05,
    # section 8). This command exits when the image is written, so keeping freed memory for reuse costs
    # nothing; a no-op off Linux.
    reuse_freed_memory()
    sys.exit(cli.run(main))
