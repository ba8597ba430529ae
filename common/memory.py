"""Memory: measure where the bytes of a diffusion model go, and the switches of chapter 05 that cut them.

Measuring (what ``measure`` and ``measure_isolated`` report):

* time: wall-clock seconds of the call (``perf_counter``; on a GPU after ``torch.cuda.synchronize``), the
  median over ``repeats`` calls after ``warmup`` untimed ones;
* peak extra memory: the most memory the call held at once above what was held just before it (the
  "baseline": model and inputs built). On a GPU: ``torch.cuda.reset_peak_memory_stats`` then
  ``max_memory_allocated - memory_allocated``. On the CPU the process's peak resident set size (RSS) above
  its RSS before the call, read in the first way that works here (``RSS_METHOD`` says which):

  ``vmhwm``      Linux: write "5" to /proc/self/clear_refs, which resets the kernel's high-water mark
                 VmHWM to the current RSS, run the call, read VmHWM from /proc/self/status. Exact, no
                 overhead.
  ``sampler``    Linux without a writable clear_refs: a thread reads /proc/self/statm every ~1 ms and keeps
                 the maximum. May miss a peak shorter than a millisecond.
  ``ru_maxrss``  elsewhere (macOS): ``resource.getrusage(...).ru_maxrss``, the process's lifetime peak. Only
                 a peak above every earlier one shows, which is why ``measure_isolated`` runs each case in a
                 fresh process (spawned, so nothing is inherited) where setup is the only earlier peak.

  Freed memory that the C allocator keeps for reuse would blur both ends. Where there is a glibc, ``measure``
  fixes its mmap threshold at 128 KiB (``fix_malloc_threshold``; ``measure_isolated`` sets the same in its
  child's environment), so every tensor's pages return to the OS when it is freed and the RSS follows the
  live tensors, and calls ``malloc_trim(0)`` before each call. (By default glibc raises the threshold as
  blocks are freed and keeps up to 64 MiB of freed blocks resident: a sliced attention call measured
  +88 MiB that way, +40 MiB with the threshold fixed.)

The switches (each documented where it lives; chapter 05 measures each one in ``benchmark.py``):

=====================
========================================================================================== attention backends
``common.attention.attention_backend("math" | "sdpa" | "sliced", slice_size=...)`` chunked feed-forward
``common.attention.set_chunk_feed_forward(unet, chunk_size, dim=1)`` gradient checkpointing
``unet.enable_gradient_checkpointing()`` / ``vae.enable_gradient_checkpointing()`` autocast
``autocast(device, "bf16" | "fp16")`` here; ``decode_fp32(vae, z)`` keeps the VAE in fp32 VAE tiling, slicing
``common.tiling.tiled_decode / tiled_encode / sliced_decode / sliced_encode`` model CPU offload
``common.offload.enable_model_cpu_offload(model, device)`` channels_last, compile ``to_channels_last(model)``,
``compile_model(model)`` here =====================
==========================================================================================
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import gc
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from common.attention import attention, attention_backend
from common.cli import atomic_write

MiB = 2**20
FP16_MAX = torch.finfo(torch.float16).max  # 65,504: anything larger becomes inf in fp16


# ------------------------------------------------------------------------------------------------------
# Reading the resident set size
# ------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _clear_refs_works() -> bool:
    if _status_kib("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _pick_method() -> str:
    if _clear_refs_works():
        return "vmhwm"
    if os.path.exists("/proc/self/statm"):
        return "sampler"
    return "ru_maxrss"


RSS_METHOD = _pick_method()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The process's resident set size now (bytes); on systems without /proc, its lifetime peak."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return _ru_maxrss_bytes()


def _ru_maxrss_bytes() -> int:
    import resource  # Unix only; reached only where /proc is missing

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _statm_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free pages back to the OS (glibc's malloc_trim)."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)


_malloc_fixed = False


def fix_malloc_threshold(threshold: int = 131072) -> bool:
    """Fix glibc's mmap threshold (and trim threshold) at ``threshold`` bytes in THIS process.

    glibc raises its mmap threshold as big blocks are freed (up to 32 MiB) and then keeps freed blocks below
    it resident for reuse, so an RSS peak counts the allocator's cache as well as live tensors. Fixed, every
    block above ``threshold`` is its own mapping, returned to the OS when freed. ``measure`` calls this once;
    ``measure_isolated`` sets the same through the environment of its child. False where there is no glibc.
    """
    global _malloc_fixed
    if _malloc_fixed:
        return True
    libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
        _malloc_fixed = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, threshold)
        )
    except (OSError, AttributeError):
        return False
    return _malloc_fixed


class _Sampler(threading.Thread):
    """Reads the RSS every ``interval`` seconds and keeps the maximum (the fallback without clear_refs)."""

    def __init__(self, interval: float = 1e-3):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, _statm_rss_bytes(), threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _statm_rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _statm_rss_bytes())


# ------------------------------------------------------------------------------------------------------
# Measuring a call
# ------------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    seconds: float  # median wall-clock time of one call
    peak_bytes: int  # most memory held during a call above the baseline (max over the repeats)
    baseline_bytes: int  # memory held just before the call: model, inputs, the runtime itself
    method: str  # how peak_bytes was read: vmhwm, sampler, ru_maxrss or cuda
    device: str
    repeats: int
    note: str = (
        ""  # what the measured callable reports about itself (its ``note`` attribute): compile time, ...
    )

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_once(fn: Callable[[], object], device: torch.device):
    _sync(device)
    release_free_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        seconds = time.perf_counter() - t0
        return out, seconds, torch.cuda.max_memory_allocated(device) - baseline, baseline, "cuda"
    baseline = rss_bytes()
    sampler = None
    if RSS_METHOD == "vmhwm":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
    elif RSS_METHOD == "sampler":
        sampler = _Sampler()
        sampler.start()
    else:
        baseline = _ru_maxrss_bytes()  # a lifetime peak: only growth above it shows
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    if RSS_METHOD == "vmhwm":
        peak = _status_kib("VmHWM") * 1024
    elif sampler is not None:
        peak = sampler.stop()
    else:
        peak = _ru_maxrss_bytes()
    return out, seconds, max(peak - baseline, 0), baseline, RSS_METHOD


def measure(
    fn: Callable[[], object], *, device: str | torch.device = "cpu", repeats: int = 1, warmup: int = 0
) -> tuple[Measurement, object]:
    """Time ``fn()`` and its peak extra memory in this process; returns ``(Measurement, last output)``.

    In a long-lived process (a notebook) an earlier peak cannot hide this one with the vmhwm and sampler
    methods, but can with ru_maxrss: use ``measure_isolated`` for figures you will compare.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    if device.type == "cpu":
        fix_malloc_threshold()
    for _ in range(warmup):
        fn()
    times, peaks, out, baseline, method = [], [], None, 0, RSS_METHOD
    for _ in range(repeats):
        out = None  # the previous output is not part of this call's memory
        out, seconds, peak, baseline, method = _measure_once(fn, device)
        times.append(seconds)
        peaks.append(peak)
    return Measurement(statistics.median(times), max(peaks), baseline, method, str(device), repeats), out


def _child(setup, kwargs, device, repeats, warmup, keep_output, result_path):
    try:
        fn = setup(**kwargs)  # builds the model and inputs; returns the call to measure
        m, out = measure(fn, device=device, repeats=repeats, warmup=warmup)
        m.note = str(getattr(fn, "note", ""))
        if keep_output:
            out = flatten_output(out)
        result = {"measurement": asdict(m), "output": out if keep_output else None}
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, result_path)


_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def flatten_output(out) -> torch.Tensor | None:
    """A call's output as one fp32 CPU tensor: a tensor as is, a list / tuple of tensors
    flattened and joined."""
    if torch.is_tensor(out):
        return out.detach().float().cpu()
    if isinstance(out, (list, tuple)) and out and all(torch.is_tensor(t) for t in out):
        return torch.cat([t.detach().float().cpu().flatten() for t in out])
    return None


def measure_isolated(
    setup: Callable[..., Callable[[], object]],
    kwargs: dict | None = None,
    *,
    device: str | torch.device = "cpu",
    repeats: int = 1,
    warmup: int = 0,
    keep_output: bool = False,
    timeout: float | None = None,
):
    """Measure ``setup(**kwargs)()`` in a fresh (spawned) process; returns ``(Measurement, output or None)``.

    ``setup`` must be importable by name (a function at the top of a module or of the script being run, not a
    lambda or a function defined in a notebook): the child imports it, calls it to build the model and the
    inputs (the baseline), and measures the callable it returns. Its output comes back when ``keep_output``.
    """
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        proc = ctx.Process(
            target=_child, args=(setup, kwargs or {}, str(device), repeats, warmup, keep_output, path)
        )
        # glibc serves big blocks with mmap (returned to the OS on free) only above a threshold that it raises
        # as blocks are freed; fixed at 128 KiB, every tensor's pages leave the RSS when it is freed, so the
        # peak counts live tensors, not the allocator's cache. The child reads this when it starts.
        saved = {k: os.environ.get(k) for k in _MALLOC_ENV}
        os.environ.update(_MALLOC_ENV)
        try:
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        proc.join(timeout)
        if proc.is_alive():
            proc.terminate()
            proc.join()
            raise TimeoutError(f"{getattr(setup, '__name__', setup)}({kwargs}) ran past {timeout} s")
        if not os.path.exists(path):
            raise RuntimeError(
                f"the measuring process died with exit code {proc.exitcode} (out of memory?) "
                f"running {getattr(setup, '__name__', setup)}({kwargs})"
            )
        result = torch.load(path, weights_only=False)
    if "error" in result:
        raise RuntimeError(
            f"{getattr(setup, '__name__', setup)}({kwargs}) failed in the child:\n{result['error']}"
        )
    return Measurement(**result["measurement"]), result["output"]


# ------------------------------------------------------------------------------------------------------
# Arithmetic, demos and tables
# ------------------------------------------------------------------------------------------------------


def attention_matrix_bytes(
    batch: int, heads: int, n_q: int, n_k: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of one layer's attention weight matrix: B x h x N_q x N_k elements of ``dtype``.

    The math path holds two such matrices at its peak (the scores and their softmax), the sliced path two
    of B x h x slice_size x N_k.
    """
    return batch * heads * n_q * n_k * torch.empty((), dtype=dtype).element_size()


def allocation_case(n_bytes: int) -> Callable[[], int]:
    """A known allocation, for testing the meter: the call fills ``n_bytes`` of fresh
    memory, then frees it."""

    def call() -> int:
        buf = torch.ones(n_bytes // 4, dtype=torch.float32)  # ones: every page is written, so it is resident
        return int(buf.numel())

    return call


def attention_case(
    *, backend: str, batch: int, heads: int, tokens: int, dim_head: int, slice_size: int = 1024, seed: int = 0
) -> Callable[[], torch.Tensor]:
    """One self-attention layer's core on random q, k, v of shape (batch, heads, tokens, dim_head)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, tokens, dim_head, generator=g) for _ in range(3))

    def call() -> torch.Tensor:
        with torch.no_grad(), attention_backend(backend, slice_size=slice_size):
            return attention(q, k, v)

    return call


@contextlib.contextmanager
def autocast(device: str | torch.device, dtype: str = "bf16"):
    """Mixed precision: matmuls and convs in ``dtype`` ("bf16" or "fp16"), reductions and norms in fp32.

    bf16 keeps fp32's exponent range (max ~3.4e38) with 8 bits of mantissa; fp16 has 11 bits of mantissa
    but overflows above 65,504, which the SD VAE decoder's activations exceed: decode with ``decode_fp32``.
    """
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"unknown autocast dtype {dtype!r}; expected one of {tuple(dtypes)}")
    with torch.autocast(device_type=torch.device(device).type, dtype=dtypes[dtype]):
        yield


def decode_fp32(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Decode with autocast switched off and fp32 weights: the VAE step of a half-precision pipeline.

    The decoder is ~10% of a pipeline's compute, so running it in fp32 costs little, and it is where
    fp16's 65,504 ceiling is crossed (see ``max_activations``).
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        if next(vae.parameters()).dtype != torch.float32:
            raise ValueError("decode_fp32 needs the VAE's weights in fp32: keep the VAE out of .half()")
        return vae.decode(z.float())


def max_activations(
    model: nn.Module, fn: Callable[[], object], kinds: tuple[type, ...] = (nn.Module,)
) -> dict[str, float]:
    """Run ``fn()`` and return the largest |activation| each named submodule of ``model`` output."""
    found: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if name and isinstance(module, kinds):

            def hook(mod, args, out, name=name):
                if torch.is_tensor(out) and out.is_floating_point():
                    found[name] = max(found.get(name, 0.0), float(out.detach().abs().max()))

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return found


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store conv weights (and so activations) as (B, H, W, C) in memory: faster convs
    on many CPU/GPU kernels.

    The values are unchanged; only the strides differ. Inputs follow with ``x.to(memory_format=...)``.
    """
    return model.to(memory_format=torch.channels_last)


def compile_model(model: nn.Module, *, mode: str | None = None) -> nn.Module:
    """``torch.compile(model, mode=mode)``: nothing is compiled until the first call, so time that one apart.

    On a CPU the first call can take minutes (C++ code generation); later calls reuse the compiled graph.
    ``mode``: None (default), "reduce-overhead" or "max-autotune" (torch.compile's).
    """
    return torch.compile(model, mode=mode)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A markdown table: one row per dict, ``columns`` (default: the first row's keys) as the header."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:,.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_table(
    rows: Sequence[dict], out: str | Path, name: str = "table", columns: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Write ``name.md`` (markdown) and ``name.csv`` under ``out`` atomically; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = []
    for suffix, text in ((".md", format_table(rows, columns) + "\n"), (".csv", buf.getvalue())):
        path = out / f"{name}{suffix}"
        paths.append(atomic_write(path, text))
    return paths[0], paths[1]
