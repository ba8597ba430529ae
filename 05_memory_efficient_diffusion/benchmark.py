"""Chapter 05's benchmark: every memory trick on the course's own modules, side by side with diffusers.

One row per technique, each side of each row measured in its own fresh process (``common.memory
.measure_isolated``; ``--quick`` measures in one process, where each call's peak is still reset first): the
model and inputs are built first (the baseline), then one call is timed and its peak extra memory read.
Columns: time, peak extra memory, max |output - baseline output| for ours and for
diffusers' equivalent built with the same config and the same (random, seeded) weights, and the ratios
ours / diffusers. Real SD weights change the numbers of neither time nor memory, so none are needed.

    python 05_memory_efficient_diffusion/benchmark.py --quick --out runs/bench05_quick  # small sizes, ~1 min
    nice -n 5 python 05_memory_efficient_diffusion/benchmark.py --out runs/bench05      # SD 1.5 sizes: ~1 h
    python 05_memory_efficient_diffusion/benchmark.py --device cuda --out runs/bench05_gpu

Writes ``table.md``, ``table.csv`` and ``targets.md`` (the chapter's targets, met or missed) under --out.

``--end-to-end`` measures instead the whole text-to-image call, the course's pipeline against diffusers'
``StableDiffusionPipeline`` (``end_to_end.py``: same weights, scheduler and seed, same image within 1/255),
and where its time goes (text encoder, each UNet call, VAE decode); it writes ``end_to_end.md/.csv/.json``:

    OMP_NUM_THREADS=2 python 05_memory_efficient_diffusion/benchmark.py --end-to-end --steps 2 --out DIR
    python 05_memory_efficient_diffusion/benchmark.py --end-to-end --device cuda --out DIR   # 50 steps

``--reuse-freed-memory`` (CPU, Linux) runs it with glibc's malloc keeping freed blocks for reuse: at SD sizes
a quarter of a decode's CPU time is otherwise the kernel handing out fresh zero-filled pages.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import cli
from common.convert import diffusers_config
from common.memory import flatten_output, format_table, measure, measure_isolated, write_table
from common.runtime import get_device, is_fast, reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------------
# Sizes: SD 1.5 (the real thing) and a quick version with the same structure at toy sizes
# ------------------------------------------------------------------------------------------------------


def sizes(quick: bool) -> dict:
    from common.autoencoder import AutoencoderConfig
    from common.unet import UNetConfig

    if quick:
        return dict(
            unet=UNetConfig.tiny(),
            unet_side=32,
            unet_batch=2,
            ctx_tokens=77,  # 1,024 tokens at level 0
            slice_size=128,
            ff_chunk=256,
            diffusers_slice=1,
            vae=AutoencoderConfig(
                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64
            ),  # f = 2; diffusers tiles above sample_size / f = 32 latents
            vae_small=32,
            vae_large=64,
            vae_slice_side=16,
            vae_slice_batch=4,
            train=UNetConfig.tiny(),
            train_side=16,
            train_batch=8,
            label_small="64 px",
            label_large="128 px",
            label_unet="32x32 latents",
        )
    return dict(
        unet=UNetConfig.sd15(),
        unet_side=64,
        unet_batch=2,
        ctx_tokens=77,  # 512 px, CFG batch of 2
        # 256 query rows x all 16 (batch x head) pairs = the 4096 x 4096 weights of ONE head, which is what
        # diffusers' SlicedAttnProcessor(slice_size=1) holds at once: the same memory, sliced two ways
        # ff_chunk: diffusers requires the chunk to divide every level's token count (4096, 1024, 256, mid 64)
        slice_size=256,
        ff_chunk=64,
        diffusers_slice=1,
        vae=AutoencoderConfig.sd15(),
        vae_small=64,
        vae_large=128,
        vae_slice_side=32,
        vae_slice_batch=4,
        train=UNetConfig.shapes_text(),
        train_side=16,
        train_batch=32,
        label_small="512 px",
        label_large="1024 px",
        label_unet="512 px",
    )


# ------------------------------------------------------------------------------------------------------
# The rows
# ------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    baseline: str  # the row whose OURS output is this row's reference (max abs diff)
    what: str
    options: dict = field(default_factory=dict)
    full: bool = True  # part of the full (SD-sized) table; False: quick / GPU only
    cuda_only: bool = False


def rows(s: dict, compile_row: bool = False) -> list[Row]:
    u, sm, lg = s["label_unet"], s["label_small"], s["label_large"]
    tile = s["vae"].sample_size // s["vae"].downsample_factor  # diffusers' tile_latent_min_size
    out = [
        Row("unet_math", "unet_math", f"UNet forward {u}, CFG batch 2, math attention", dict(backend="math")),
        Row("unet_sdpa", "unet_math", f"UNet forward {u}, SDPA", dict(backend="sdpa")),
        Row(
            "unet_sliced",
            "unet_math",
            f"UNet forward {u}, sliced attention ({s['slice_size']} query rows; "
            f"diffusers: slice_size={s['diffusers_slice']})",
            dict(backend="sliced"),
        ),
        Row(
            "unet_chunked_ff",
            "unet_math",
            f"UNet forward {u}, SDPA + feed-forward in chunks of {s['ff_chunk']} tokens",
            dict(backend="sdpa", chunk_ff=True),
        ),
        Row(
            "unet_channels_last",
            "unet_math",
            f"UNet forward {u}, SDPA + channels_last",
            dict(backend="sdpa", channels_last=True),
        ),
        Row(
            "unet_bf16",
            "unet_math",
            f"UNet forward {u}, SDPA under bf16 autocast",
            dict(backend="sdpa", autocast="bf16"),
            full=False,
        ),
        Row("vae_decode_small", "vae_decode_small", f"VAE decode {sm}", dict(side=s["vae_small"])),
        Row("vae_decode_large", "vae_decode_large", f"VAE decode {lg}", dict(side=s["vae_large"])),
        Row(
            "vae_decode_large_tiled",
            "vae_decode_large",
            f"VAE decode {lg}, tiled ({tile} latents, overlap {tile // 4})",
            dict(side=s["vae_large"], tiled=True),
        ),
        Row(
            "vae_decode_batch",
            "vae_decode_batch",
            f"VAE decode batch of {s['vae_slice_batch']} at {s['vae_slice_side']} latents",
            dict(side=s["vae_slice_side"], batch=s["vae_slice_batch"]),
        ),
        Row(
            "vae_decode_batch_sliced",
            "vae_decode_batch",
            "  the same, one image at a time (batch slicing)",
            dict(side=s["vae_slice_side"], batch=s["vae_slice_batch"], sliced=True),
        ),
        Row("vae_encode_large", "vae_encode_large", f"VAE encode {lg}", dict(side=s["vae_large"])),
        Row(
            "vae_encode_large_tiled",
            "vae_encode_large",
            f"VAE encode {lg}, tiled",
            dict(side=s["vae_large"], tiled=True),
        ),
        Row(
            "train",
            "train",
            f"training step (forward + backward), course UNet, batch {s['train_batch']}",
            dict(checkpointing=False),
        ),
        Row(
            "train_checkpointing", "train", "  the same with gradient checkpointing", dict(checkpointing=True)
        ),
        Row(
            "unet_offload",
            "unet_math",
            f"UNet forward {u}, SDPA, model CPU offload (GPU only)",
            dict(backend="sdpa", offload=True),
            cuda_only=True,
        ),
    ]
    if compile_row:
        out.append(
            Row(
                "unet_compile",
                "unet_math",
                f"UNet forward {u}, SDPA, torch.compile",
                dict(backend="sdpa", compile=True),
            )
        )
    return out


# ------------------------------------------------------------------------------------------------------
# Building one side of one row (runs in the child process)
# ------------------------------------------------------------------------------------------------------


def _diffusers_twin(ours: torch.nn.Module) -> torch.nn.Module:
    """diffusers' model with our weights, sharing the tensors (no second copy in memory)."""
    import diffusers
    from accelerate import init_empty_weights

    from common.autoencoder import AutoencoderKL

    cls = diffusers.AutoencoderKL if isinstance(ours, AutoencoderKL) else diffusers.UNet2DConditionModel
    with init_empty_weights():
        ref = cls(**diffusers_config(ours))
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return ref


def _seeded(make, seed: int):
    torch.manual_seed(seed)
    return make()


def build_case(*, row: str, side: str, quick: bool, device: str, seed: int = 0, compile_row: bool = False):
    """Build the model and inputs of ``row`` for ``side`` ("ours" or "diffusers");
    return the call to measure."""
    from common.autoencoder import AutoencoderKL
    from common.unet import UNet

    s = sizes(quick)
    spec = {r.name: r for r in rows(s, compile_row)}[row]
    o = spec.options
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed + 1)
    # On a GPU the weights are drawn there (an SD UNet's 860 M random numbers take seconds on a CPU, for every
    # row), so every row of a GPU table has the same weights; the offload row then moves them to CPU memory.
    init = torch.device(dev) if dev.type == "cuda" else torch.device("cpu")
    if row.startswith("unet"):
        return _unet_case(s, o, side, dev, g, seed, init)
    if row.startswith("vae"):
        with init:
            vae = _seeded(lambda: AutoencoderKL(s["vae"]), seed).eval()
        model = vae if side == "ours" else _diffusers_twin(vae)
        del vae
        model.to(dev)
        f = s["vae"].downsample_factor
        tile = s["vae"].sample_size // f  # diffusers' tile_latent_min_size
        overlap = tile // 4  # diffusers' tile_overlap_factor = 0.25
        batch = o.get("batch", 1)
        if "encode" in row:
            x = (torch.rand(batch, 3, o["side"] * f, o["side"] * f, generator=g) * 2 - 1).to(dev)
            return _vae_encode_call(model, x, side, o, tile, overlap)
        z = torch.randn(batch, s["vae"].latent_channels, o["side"], o["side"], generator=g).to(dev)
        return _vae_decode_call(model, z, side, o, tile, overlap)
    if row.startswith("train"):
        with init:
            unet = _seeded(lambda: UNet(s["train"]), seed)
        model = unet if side == "ours" else _diffusers_twin(unet)
        del unet
        return _train_call(model.to(dev).train(), s, o, side, dev, g)
    raise ValueError(f"unknown row {row!r}")


def _unet_case(s, o, side, dev, g, seed, init):
    from common.attention import attention_backend, set_chunk_feed_forward
    from common.offload import enable_model_cpu_offload
    from common.unet import UNet

    with init:
        unet = _seeded(lambda: UNet(s["unet"]), seed).eval()
    B, side_px = s["unet_batch"], s["unet_side"]
    z = torch.randn(B, s["unet"].in_channels, side_px, side_px, generator=g)
    context = torch.randn(B, s["ctx_tokens"], s["unet"].cross_attention_dim, generator=g)
    t = torch.tensor([500] * B)
    if side == "ours":
        model = unet
        if o.get("chunk_ff"):
            set_chunk_feed_forward(model, s["ff_chunk"], dim=1)
    else:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

        model = _diffusers_twin(unet)
        del unet
        processor = {
            "math": AttnProcessor(),
            "sdpa": AttnProcessor2_0(),
            "sliced": SlicedAttnProcessor(s["diffusers_slice"]),
        }[o["backend"]]
        model.set_attn_processor(processor)
        if o.get("chunk_ff"):  # UNet2DConditionModel has no enable_forward_chunking: set it per block
            for block in model.modules():
                if hasattr(block, "set_chunk_feed_forward"):
                    block.set_chunk_feed_forward(s["ff_chunk"], dim=1)
    if o.get("offload"):
        model.to("cpu")  # where a pipeline keeps an offloaded model between calls
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        enable_model_cpu_offload(model, dev)
    else:
        model.to(dev)
        z, context, t = z.to(dev), context.to(dev), t.to(dev)
    if o.get("channels_last"):
        model.to(memory_format=torch.channels_last)
        z = z.to(memory_format=torch.channels_last)
    run = model
    note = ""
    if o.get("compile"):
        run = torch.compile(model)
        t0 = time.perf_counter()
        with torch.no_grad(), attention_backend(o["backend"], slice_size=s["slice_size"]):
            _forward(run, side, z, t, context)
        note = f"compile + first call {time.perf_counter() - t0:.1f} s"
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if o.get("autocast") == "bf16" else None

    def call():
        with torch.no_grad(), attention_backend(o["backend"], slice_size=s["slice_size"]):
            if amp is None:
                return _forward(run, side, z, t, context)
            with amp:
                return _forward(run, side, z, t, context)

    call.note = note
    return call


def _forward(model, side, z, t, context):
    if side == "ours":
        return model(z, t, context)
    return model(z, t, encoder_hidden_states=context).sample


def _vae_decode_call(model, z, side, o, tile, overlap):
    from common.tiling import sliced_decode, tiled_decode

    if side == "diffusers":
        if o.get("tiled"):
            model.enable_tiling()
        if o.get("sliced"):
            model.enable_slicing()
        return lambda: _no_grad(lambda: model.decode(z).sample)
    if o.get("tiled"):
        return lambda: _no_grad(lambda: tiled_decode(model, z, tile=tile, overlap=overlap))
    if o.get("sliced"):
        return lambda: _no_grad(lambda: sliced_decode(model, z))
    return lambda: _no_grad(lambda: model.decode(z))


def _vae_encode_call(model, x, side, o, tile, overlap):
    from common.tiling import tiled_encode

    if side == "diffusers":
        if o.get("tiled"):
            model.enable_tiling()
        return lambda: _no_grad(lambda: model.encode(x).latent_dist.mean)
    if o.get("tiled"):
        return lambda: _no_grad(lambda: tiled_encode(model, x, tile=tile, overlap=overlap).mean)
    return lambda: _no_grad(lambda: model.encode(x).mean)


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _train_call(model, s, o, side, dev, g):
    """One forward + backward of the eps-prediction loss. The gradients are allocated by a first step in
    setup and zeroed in place in the call, so the peak extra memory is the activations' (and autograd's)."""
    import torch.nn.functional as F

    cfg = s["train"]
    B, n = s["train_batch"], s["train_side"]
    z_t = torch.randn(B, cfg.in_channels, n, n, generator=g).to(dev)
    eps = torch.randn(B, cfg.in_channels, n, n, generator=g).to(dev)
    context = torch.randn(B, s["ctx_tokens"], cfg.cross_attention_dim, generator=g).to(dev)
    t = torch.randint(0, 1000, (B,), generator=g).to(dev)
    if o.get("checkpointing"):
        model.enable_gradient_checkpointing()
    # by name: both models have the same names (the weight contract), not the same registration order
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]

    def step():
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        loss = F.mse_loss(_forward(model, side, z_t, t, context), eps)
        loss.backward()
        return [loss.detach()] + [p.grad for p in params]

    step()  # allocates the gradients: part of the baseline, like the weights
    return step


# ------------------------------------------------------------------------------------------------------
# Running the table
# ------------------------------------------------------------------------------------------------------


def run(args) -> list[dict]:
    device = get_device(args.device)
    quick = args.quick or is_fast()
    s = sizes(quick)
    all_rows = [r for r in rows(s, args.compile) if (quick or r.full or device.type == "cuda")]
    if args.rows:
        unknown = sorted(set(args.rows) - {r.name for r in all_rows})
        if unknown:
            raise cli.UsageError(f"unknown rows {unknown}; choose from {[r.name for r in all_rows]}")
        order = {name: i for i, name in enumerate(args.rows)}
        all_rows = sorted((r for r in all_rows if r.name in order), key=lambda r: order[r.name])  # as asked
    repeats = args.repeats if args.repeats is not None else (3 if quick or device.type == "cuda" else 1)
    warmup = args.warmup if args.warmup is not None else (1 if quick or device.type == "cuda" else 0)
    isolation = args.isolation or ("none" if quick else "process")
    outputs: dict[str, torch.Tensor] = {}
    table = []
    for r in all_rows:
        if r.cuda_only and device.type != "cuda":
            print(f"{r.name}: skipped, model CPU offload only saves GPU memory (no GPU here)", flush=True)
            continue
        res = {"row": r.name, "what": r.what}
        for side in ("ours", "diffusers"):
            if side == "diffusers" and r.options.get("offload"):
                continue  # diffusers offloads whole models of a pipeline: no like-for-like single-model row
            t0 = time.perf_counter()
            case = dict(
                row=r.name,
                side=side,
                quick=quick,
                device=str(device),
                seed=args.seed,
                compile_row=args.compile,
            )
            try:
                if isolation == "process":
                    m, out = measure_isolated(
                        build_case, case, device=device, repeats=repeats, warmup=warmup, keep_output=True
                    )
                else:
                    fn = build_case(**case)
                    m, out = measure(fn, device=device, repeats=repeats, warmup=warmup)
                    m.note, out = str(getattr(fn, "note", "")), flatten_output(out)
                    del fn
            except (
                RuntimeError,
                TimeoutError,
                ValueError,
            ) as e:  # one failed row (out of memory, ...) keeps the rest
                print(f"{r.name:<24} {side:<9} FAILED: {str(e)[-400:]}", flush=True)
                res["note"] = f"{side} failed: {str(e).strip().splitlines()[-1][:120]}"
                continue
            if side == "ours" and r.name == r.baseline:
                outputs[r.name] = out
            ref = outputs.get(r.baseline)
            diff = float((out - ref).abs().max()) if ref is not None and out is not None else None
            res[f"{side}_s"], res[f"{side}_peak_MiB"], res[f"{side}_maxdiff"] = m.seconds, m.peak_mib, diff
            if m.note:
                res["note"] = m.note
            print(
                f"{r.name:<24} {side:<9} {m.seconds:8.3f} s  +{m.peak_mib:9.1f} MiB  diff {diff}  "
                f"({time.perf_counter() - t0:.0f} s with setup) {m.note}",
                flush=True,
            )
            del out
            gc.collect()
        if "diffusers_s" in res and "ours_s" in res:
            res["time_ratio"] = res["ours_s"] / res["diffusers_s"]
            res["mem_ratio"] = res["ours_peak_MiB"] / max(res["diffusers_peak_MiB"], 1e-9)
        table.append(res)
        if args.out is not None:  # rewrite after every row: a long run that is stopped keeps what it measured
            write_table(table, args.out, "table", COLUMNS)
    return table


COLUMNS = [
    "row",
    "what",
    "ours_s",
    "ours_peak_MiB",
    "ours_maxdiff",
    "diffusers_s",
    "diffusers_peak_MiB",
    "diffusers_maxdiff",
    "time_ratio",
    "mem_ratio",
    "note",
]


def targets(table: list[dict]) -> list[dict]:
    """The chapter's targets, each with the measured figure and whether it is met."""
    by = {r["row"]: r for r in table if "ours_s" in r}
    out = []

    def add(name, value, ok):
        out.append({"target": name, "measured": value, "met": "yes" if ok else "NO"})

    for row in ("unet_sdpa", "vae_decode_small"):
        if row in by and "time_ratio" in by[row]:
            r = by[row]
            add(f"{row}: time <= 1.0x diffusers", f"{r['time_ratio']:.2f}x", r["time_ratio"] <= 1.0)
            add(
                f"{row}: peak extra memory <= 1.0x diffusers", f"{r['mem_ratio']:.2f}x", r["mem_ratio"] <= 1.0
            )
    if "unet_sliced" in by and "unet_math" in by:
        ratio = by["unet_sliced"]["ours_peak_MiB"] / by["unet_math"]["ours_peak_MiB"]
        add("sliced attention peak <= 1/4 of math's (UNet forward)", f"{ratio:.3f}", ratio <= 0.25)
    if "train" in by and "train_checkpointing" in by:
        a, b = by["train"], by["train_checkpointing"]
        saved = 1 - b["ours_peak_MiB"] / a["ours_peak_MiB"]
        extra = b["ours_s"] / a["ours_s"] - 1
        add("checkpointing: activation memory down >= 40%", f"{saved:.0%}", saved >= 0.40)
        add("checkpointing: <= 40% more time", f"{extra:+.0%}", extra <= 0.40)
    if "vae_decode_large" in by and "vae_decode_large_tiled" in by:
        a, b = by["vae_decode_large"], by["vae_decode_large_tiled"]
        ratio = b["ours_peak_MiB"] / a["ours_peak_MiB"]
        add("tiled decode (large): peak <= 1/3 of untiled", f"{ratio:.3f}", ratio <= 1 / 3)
        add(
            "tiled decode (large): max abs diff from untiled (stated)",
            f"ours {b['ours_maxdiff']:.3g}, diffusers {b.get('diffusers_maxdiff') or float('nan'):.3g}",
            True,
        )
    return out


def end_to_end_main(args, device: torch.device) -> int:
    import end_to_end  # this folder's end_to_end.py (the script's folder is on sys.path when run by path)

    quick = args.quick or is_fast()
    gpu = device.type == "cuda"
    side = args.side or (32 if quick else 512)
    if side % 8:
        raise cli.UsageError(f"--side must be a multiple of 8 (the VAE's factor), got {side}")
    steps = args.steps or (4 if quick else 50 if gpu else 2)
    settings = args.settings or (["fp32", "fp16", "compile"] if gpu else ["fp32"])
    repeats = args.repeats or (5 if gpu else 3)
    cli.writable_dir(args.out, "--out")
    allocator = "default"
    if args.reuse_freed_memory:  # both pipelines share this process: the setting falls on both sides alike
        allocator = "reuse freed memory" if reuse_freed_memory() else "default (not glibc: unchanged)"
    print(
        f"end to end: {device}, {torch.get_num_threads()} threads, {side} px, {steps} DPM-Solver++ steps, "
        f"CFG 7.5, settings {settings}, {repeats} timed calls per side (interleaved) after one warm-up, "
        f"allocator: {allocator}",
        flush=True,
    )
    t0 = time.perf_counter()
    end_to_end.run_table(
        quick=quick,
        device=device,
        settings=settings,
        steps=steps,
        image_side=side,
        repeats=repeats,
        seed=args.seed,
        out=args.out,
        log=lambda m: print(m, flush=True),
        info={"allocator": allocator},
    )
    print((args.out / "end_to_end.md").read_text())
    print(
        f"wrote {args.out}/end_to_end.md, .csv and .json in {time.perf_counter() - t0:.0f} s "
        f"(seconds per image; time_ratio = ours / diffusers, medians)"
    )
    return 0


def checkpointing_main(args, device: torch.device) -> int:
    import checkpointing  # this folder's checkpointing.py

    cli.writable_dir(args.out, "--out")
    repeats = args.repeats or 5
    print(
        f"checkpointing: {args.ckpt_config} UNet, {args.ckpt_latent}x{args.ckpt_latent} latents, batch "
        f"{args.ckpt_batch}, {device}, {torch.get_num_threads()} threads, {repeats} interleaved repeats",
        flush=True,
    )
    rows = checkpointing.run_table(
        config=args.ckpt_config,
        side_px=args.ckpt_latent,
        batch=args.ckpt_batch,
        repeats=repeats,
        device=device,
        log=lambda m: print(m, flush=True),
    )
    md, _ = write_table(rows, args.out, "checkpointing", checkpointing.COLUMNS)
    print(format_table(rows, checkpointing.COLUMNS))
    print(f"wrote {md} (seconds: medians; MiB: peak extra memory of one step; GFLOP: one step's)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="small configs, seconds per row (also under COURSE_FAST=1)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument(
        "--out", type=Path, default=Path("runs/bench05"), help="folder for table.md/.csv, targets.md"
    )
    p.add_argument(
        "--rows", nargs="*", help="run only these rows, in this order (a row's baseline row first)"
    )
    p.add_argument(
        "--repeats",
        type=cli.positive_int,
        help="timed calls per measurement (default: 3 quick/GPU, 1 CPU full)",
    )
    p.add_argument(
        "--warmup", type=cli.nonnegative_int, help="untimed calls first (default: 1 quick/GPU, 0 CPU full)"
    )
    p.add_argument(
        "--compile", action="store_true", help="add a torch.compile row (slow to compile on a CPU)"
    )
    p.add_argument(
        "--isolation",
        choices=("process", "none"),
        help="process: each side of each row in a fresh process (default for the full table); none: "
        "all in this process, peaks still reset per call (default for --quick: no 20 s start-ups)",
    )
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    e2e = p.add_argument_group("end to end (--end-to-end)")
    e2e.add_argument(
        "--end-to-end",
        action="store_true",
        help="time the whole text-to-image call, ours against diffusers (end_to_end.py)",
    )
    e2e.add_argument(
        "--steps", type=cli.positive_int, help="DPM-Solver++ steps (default: 2 CPU, 50 GPU, 4 quick)"
    )
    e2e.add_argument("--side", type=cli.positive_int, help="image side in px (default: 512; 32 with --quick)")
    e2e.add_argument(
        "--settings",
        nargs="+",
        choices=("fp32", "fp16", "compile"),
        help="default: fp32 on a CPU; fp32 fp16 compile on a GPU (compile: fp16 + channels_last)",
    )
    e2e.add_argument(
        "--reuse-freed-memory",
        action="store_true",
        help="CPU: have glibc's malloc reuse freed blocks instead of returning them to the OS, so "
        "activations stop arriving as fresh zero-filled pages (common.runtime.reuse_freed_memory; both "
        "sides alike)",
    )
    ck = p.add_argument_group("gradient checkpointing, ours against diffusers (--checkpointing)")
    ck.add_argument(
        "--checkpointing",
        action="store_true",
        help="time, peak memory and FLOPs of a training step with and without checkpointing",
    )
    ck.add_argument(
        "--ckpt-config",
        default="shapes_text",
        choices=("sd15", "shapes_text", "tiny"),
        help="UNet configuration (default shapes_text: the train rows' model)",
    )
    ck.add_argument("--ckpt-latent", type=cli.positive_int, default=16, help="latent side (default 16)")
    ck.add_argument("--ckpt-batch", type=cli.positive_int, default=32, help="batch size (default 32)")
    args = p.parse_args(argv)
    device = get_device(args.device)  # an unknown or absent device is a one-line error before anything runs
    if args.end_to_end:
        return end_to_end_main(args, device)
    if args.checkpointing:
        return checkpointing_main(args, device)
    if args.list:
        for r in rows(sizes(args.quick or is_fast()), args.compile):
            print(f"{r.name:<24} {r.what}")
        return 0
    cli.writable_dir(args.out, "--out")
    t0 = time.perf_counter()
    table = run(args)
    md, csv_path = write_table(table, args.out, "table", COLUMNS)
    goals = targets(table)
    text = format_table(table, COLUMNS)
    if goals:
        write_table(goals, args.out, "targets")
        text += "\n\n" + format_table(goals)
    print(text)
    print(
        f"\nwrote {md} and {csv_path} in {time.perf_counter() - t0:.0f} s "
        f"(peak extra memory in MiB; ratios ours / diffusers; maxdiff vs the row's baseline, ours)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
