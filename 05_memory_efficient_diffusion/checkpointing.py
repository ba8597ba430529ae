"""Gradient checkpointing, the course's UNet against diffusers': time, peak memory and recomputed FLOPs.

One training step (forward, MSE to the noise, backward) of the same UNet with the same weights, on each side
with and without ``enable_gradient_checkpointing()``; the four cases interleaved ``repeats`` times (ABCD,
DCBA, ...), so a load that comes and goes falls on all of them alike. Reported per side: the median wall
and CPU (process) seconds of a step; the median peak extra memory of a step (``common.memory.measure``, 3
steps per case, apart from the timed ones: measuring costs time of its own); the FLOPs of a step
(``torch.utils.flop_counter``: what checkpointing recomputes shows as the difference); the MiB of
activations autograd saves for backward in the forward (distinct tensors, counted by a saved-tensor hook:
what checkpointing keeps, exact where the peak is a noisy reading of the process's memory), and the peak
of the tensors themselves during a step (PyTorch's profiler counts every allocation and free: no allocator
caching or fragmentation in it); the ratios checkpointed / plain.

    OMP_NUM_THREADS=1 python 05_memory_efficient_diffusion/benchmark.py --checkpointing --out DIR
    python 05_memory_efficient_diffusion/benchmark.py --checkpointing --device cuda --repeats 20 --out DIR
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

CONFIGS = ("sd15", "shapes_text", "tiny")
COLUMNS = [
    "side",
    "config",
    "latent",
    "batch",
    "plain_s",
    "ckpt_s",
    "extra_time",
    "plain_cpu_s",
    "ckpt_cpu_s",
    "extra_cpu",
    "plain_MiB",
    "ckpt_MiB",
    "memory_saved",
    "plain_saved_MiB",
    "ckpt_saved_MiB",
    "plain_tensor_MiB",
    "ckpt_tensor_MiB",
    "plain_GFLOP",
    "ckpt_GFLOP",
    "extra_flops",
]


def build(config: str, seed: int = 0):
    """Our UNet and diffusers' UNet2DConditionModel sharing the same weight tensors, in training mode."""
    from benchmark import _diffusers_twin  # this folder's benchmark.py

    from common.unet import UNet, UNetConfig

    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; expected one of {CONFIGS}")
    torch.manual_seed(seed)
    ours = UNet(getattr(UNetConfig, config)()).train()
    return {"ours": ours, "diffusers": _diffusers_twin(ours).train()}


def batch_of(cfg, batch: int, side: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(batch, cfg.in_channels, side, side, generator=g)  # (B, 4, h, w)
    eps = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)  # (B, N_k, D_c)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return z_t, t, context, eps


def train_step(side: str, model, z_t, t, context, eps) -> torch.Tensor:
    """Forward, loss, backward; returns the loss. Gradients are set to None first (no accumulation)."""
    for p in model.parameters():
        p.grad = None
    out = model(z_t, t, context) if side == "ours" else model(z_t, t, encoder_hidden_states=context).sample
    loss = F.mse_loss(out, eps)
    loss.backward()
    return loss.detach()


def saved_for_backward_mib(side: str, model, z_t, t, context, eps) -> float:
    """MiB of the distinct activations autograd saves during the forward of a training step (the weights
    it saves too are left out: they are held anyway). Inside a checkpointed region nothing is kept but the
    region's inputs; the backward, which recomputes the regions, runs after the count."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        ptr = x.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = x.untyped_storage().nbytes()
        return x

    for p in model.parameters():
        p.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = (
            model(z_t, t, context) if side == "ours" else model(z_t, t, encoder_hidden_states=context).sample
        )
        loss = F.mse_loss(out, eps)
    loss.backward()
    return sum(seen.values()) / 2**20


def tensor_peak_mib(fn) -> float:
    """The most memory ``fn``'s tensors hold at once, above what was held before it: PyTorch's own count of
    every allocation and free (``torch.profiler`` with ``profile_memory``), in order. Unlike the process's
    resident memory it does not see the C library's caching or fragmentation."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop chatter, read on its first use
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage + event.self_device_memory_usage
        peak = max(peak, held)
    return peak / 2**20


def set_checkpointing(model, on: bool) -> None:
    if on:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_table(
    *, config: str, side_px: int, batch: int, repeats: int, device: str | torch.device = "cpu", log=print
) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from common.memory import measure

    device = torch.device(device)
    models = {
        side: model.to(device) for side, model in build(config).items()
    }  # the shared tensors stay shared
    cfg = models["ours"].config
    inputs = [x.to(device) for x in batch_of(cfg, batch, side_px)]
    cases = [(s, ck) for s in models for ck in (False, True)]
    wall = {c: [] for c in cases}
    cpu = {c: [] for c in cases}
    flops, saved, tensor_peak = {}, {}, {}
    peaks = {c: [] for c in cases}
    for s, ck in cases:  # warm-up, one counted step for the FLOPs
        set_checkpointing(models[s], ck)
        train_step(s, models[s], *inputs)
        with FlopCounterMode(display=False) as counter:
            train_step(s, models[s], *inputs)
        flops[(s, ck)] = counter.get_total_flops() / 1e9
        saved[(s, ck)] = saved_for_backward_mib(s, models[s], *inputs)
        tensor_peak[(s, ck)] = tensor_peak_mib(lambda s=s: train_step(s, models[s], *inputs))
    for r in range(repeats):
        for s, ck in cases if r % 2 == 0 else cases[::-1]:
            set_checkpointing(models[s], ck)
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            train_step(s, models[s], *inputs)
            _sync(device)
            wall[(s, ck)].append(time.perf_counter() - w0)
            cpu[(s, ck)].append(time.process_time() - c0)
        log(
            f"repeat {r + 1}/{repeats}: "
            + ", ".join(f"{s}{' ckpt' if ck else ''} {wall[(s, ck)][-1]:.2f} s" for s, ck in cases)
        )
    for r in range(3):  # the memory apart: measuring costs time of its own (a collection, a malloc_trim)
        for s, ck in cases if r % 2 == 0 else cases[::-1]:
            set_checkpointing(models[s], ck)
            peaks[(s, ck)].append(
                measure(lambda s=s: train_step(s, models[s], *inputs), device=device)[0].peak_mib
            )
    peak = {c: statistics.median(p) for c, p in peaks.items()}
    rows = []
    for s in models:
        a, b = (s, False), (s, True)
        row = {
            "side": s,
            "config": config,
            "latent": f"{side_px}x{side_px}",
            "batch": batch,
            "plain_s": statistics.median(wall[a]),
            "ckpt_s": statistics.median(wall[b]),
            "plain_cpu_s": statistics.median(cpu[a]),
            "ckpt_cpu_s": statistics.median(cpu[b]),
            "plain_MiB": peak[a],
            "ckpt_MiB": peak[b],
            "plain_saved_MiB": saved[a],
            "ckpt_saved_MiB": saved[b],
            "plain_tensor_MiB": tensor_peak[a],
            "ckpt_tensor_MiB": tensor_peak[b],
            "plain_GFLOP": flops[a],
            "ckpt_GFLOP": flops[b],
        }
        row["extra_time"] = f"{row['ckpt_s'] / row['plain_s'] - 1:+.1%}"
        row["extra_cpu"] = f"{row['ckpt_cpu_s'] / row['plain_cpu_s'] - 1:+.1%}"
        row["memory_saved"] = f"{1 - row['ckpt_MiB'] / row['plain_MiB']:.1%}"
        row["extra_flops"] = f"{row['ckpt_GFLOP'] / row['plain_GFLOP'] - 1:+.1%}"
        rows.append(row)
    return rows
