"""Why diffuse in latent space? The same UNet at pixel and at latent resolution: time and memory per step.

    python 03_latent_ddpm/pixel_vs_latent.py                 # both data sets, batch 32, CPU
    COURSE_FAST=1 python 03_latent_ddpm/pixel_vs_latent.py   # seconds (tests)

Rombach et al. 2022 (sec. 1 and 3) move diffusion from pixels x (H, W, 3) to latents z (H/f, W/f, 4) of a
frozen autoencoder, so the UNet, which runs once per training step and once per sampling step, sees f^2 times
fewer positions. This script measures that claim: one architecture (the chapter's UNet presets), two input
sizes, one training step each (forward, backward, AdamW update):

    digits   32 x 32 x 1 pixels   against    8 x  8 x 4 latents   (f = 4)
    shapes   64 x 64 x 3 pixels   against   16 x 16 x 4 latents   (f = 4)

Reported per step: median wall and process-CPU seconds over ``--repeats`` steps (after a warm-up step; CPU
time is the steadier figure on a shared machine), and memory: the
activations autograd saves for backward (measured exactly with ``torch.autograd.graph.saved_tensors_hooks``:
the part of training memory that grows with resolution), plus on CUDA the peak allocated bytes. Parameters,
gradients and AdamW state are the same for both (the UNet's convolutions do not depend on H, W), listed once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from common import cli
from common.runtime import budget, describe, get_device, seed_everything
from common.unet import UNet, UNetConfig

CASES = {  # name -> (preset, pixel (C, H), latent (C, h)); the presets come from common.unet
    "digits": (UNetConfig.digits, (1, 32), (4, 8)),
    "shapes": (UNetConfig.shapes_uncond, (3, 64), (4, 16)),
}


def saved_activation_bytes(step_fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``step_fn()`` builds its
    graph (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_fn()
    loss.backward()
    return sum(seen.values())


def measure(config: UNetConfig, channels: int, side: int, batch_size: int, repeats: int, device) -> dict:
    """One training step of ``config`` (with in/out channels set to ``channels``) on
    (B, channels, side, side)."""
    config = dataclasses.replace(config, in_channels=channels, out_channels=channels, sample_size=side)
    torch.manual_seed(0)
    unet = UNet(config).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    z = torch.randn(batch_size, channels, side, side, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device) if config.num_class_embeds else None

    def forward():
        return (unet(z, t, class_labels=labels) - z).pow(2).mean()

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward().backward()
        optimizer.step()

    step()  # warm-up: allocator, AdamW state
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    optimizer.zero_grad(set_to_none=True)
    activations = saved_activation_bytes(forward)
    n_params = sum(p.numel() for p in unet.parameters())
    row = {
        "input": f"{side}x{side}x{channels}",
        "positions": side * side,
        "seconds_per_step": statistics.median(times),
        "cpu_seconds_per_step": statistics.median(cpu_times),
        "activation_MB": activations / 2**20,
        "params": n_params,
        "params_grads_adam_MB": 4 * n_params * 4 / 2**20,
    }  # fp32 weights + grads + Adam's two moments
    if device.type == "cuda":
        row["cuda_peak_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def compare(case: str, batch_size: int, repeats: int, device, width: int | None = None) -> list[dict]:
    """Pixel and latent rows for one case of CASES (``width``: base channels, as train_ldm.py's --width)."""
    preset, (pc, ps), (lc, ls) = CASES[case]
    config = preset()
    if width is not None:
        widths = tuple(width * (1 if i == 0 else 2) for i in range(len(config.block_out_channels)))
        config = dataclasses.replace(config, block_out_channels=widths, norm_num_groups=min(32, width))
    rows = []
    for space, (c, s) in (("pixel", (pc, ps)), ("latent", (lc, ls))):
        rows.append({"case": case, "space": space, **measure(config, c, s, batch_size, repeats, device)})
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| case | space | input | wall s / step | CPU s / step | activations MB | "
        "params + grads + AdamW MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['space']} | {r['input']} | {r['seconds_per_step']:.3f} | "
            f"{r['cpu_seconds_per_step']:.3f} | {r['activation_MB']:.1f} | {r['params_grads_adam_MB']:.1f} |"
        )
    for case in dict.fromkeys(r["case"] for r in rows):
        pix, lat = [r for r in rows if r["case"] == case]
        lines.append(
            f"\n{case}: latent is {pix['seconds_per_step'] / lat['seconds_per_step']:.1f}x faster per step "
            f"(wall; {pix['cpu_seconds_per_step'] / lat['cpu_seconds_per_step']:.1f}x in CPU time) and "
            f"holds {pix['activation_MB'] / lat['activation_MB']:.1f}x less activation memory"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--cases", default="digits,shapes", help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--batch-size", type=cli.positive_int, default=None, help="default: fast 4 / cpu 32")
    p.add_argument(
        "--repeats", type=cli.positive_int, default=None, help="timed steps per row (default: fast 1 / cpu 5)"
    )
    p.add_argument(
        "--width", type=cli.positive_int, default=None, help="base UNet width (default: the presets')"
    )
    p.add_argument("--out", default="runs/pixel_vs_latent", help="writes result.json here")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; expected among {', '.join(CASES)}")
    out = cli.writable_dir(args.out, "--out")  # checked before the measurements
    device = get_device(args.device)
    seed_everything(args.seed)
    batch_size = args.batch_size if args.batch_size is not None else budget(fast=4, cpu=32, device=device)
    repeats = args.repeats if args.repeats is not None else budget(fast=1, cpu=5, device=device)
    width = args.width if args.width is not None else budget(fast=16, cpu=None, device=device)
    print(describe(device), f"batch={batch_size} repeats={repeats}")
    rows = [row for case in cases for row in compare(case, batch_size, repeats, device, width)]
    print(table(rows))
    result = json.dumps({"batch_size": batch_size, "rows": rows}, indent=2) + "\n"
    cli.atomic_write(out / "result.json", result)
    return rows


if __name__ == "__main__":
    sys.exit(cli.run(main))
