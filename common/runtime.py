"""Runtime: which device to run on, how to seed every random number generator, and how big a run is.

Every notebook and script in the course sizes its work through one switch:

* ``COURSE_FAST=1`` (set by the tests and CI) shrinks every run to seconds, so the whole course can be
  executed end to end as a test;
* otherwise a run is sized for the device it finds: a real lesson of minutes on a laptop CPU, a larger
  one on a GPU.

``budget(fast=..., cpu=..., gpu=...)`` returns the value for the current mode, so a heavy cell reads::

    steps = budget(fast=20, cpu=2_000, gpu=20_000)
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

DEVICES = ("cuda", "mps", "cpu")


def is_fast() -> bool:
    """True when ``COURSE_FAST`` is set to a true value (1, true, yes, on)."""
    return os.environ.get("COURSE_FAST", "").strip().lower() in {"1", "true", "yes", "on"}


def get_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``name`` if given, else ``$COURSE_DEVICE``, else cuda, then mps, then cpu.

    An unknown or unavailable device is an error that names the choices, never a silent fallback.
    """
    if isinstance(name, torch.device):
        return name
    name = name or os.environ.get("COURSE_DEVICE") or None
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = str(name).split(":")[0]
    if kind not in DEVICES:
        raise ValueError(
            f"unknown device {name!r}; expected one of {', '.join(DEVICES)} (optionally 'cuda:N')"
        )
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use 'cpu'")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} was asked for but MPS is not available here; use 'cpu'")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (CPU and every GPU); return a CPU generator seeded the same way."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def mode(device: str | torch.device | None = None) -> str:
    """``"fast"`` under COURSE_FAST, else ``"gpu"`` on a CUDA device, else ``"cpu"``
    (MPS counts as cpu-sized)."""
    if is_fast():
        return "fast"
    return "gpu" if get_device(device).type == "cuda" else "cpu"


def budget(*, fast: T, cpu: T, gpu: T | None = None, device: str | torch.device | None = None) -> T:
    """Pick the size of a run for the current mode: ``fast`` under COURSE_FAST, else ``cpu`` or ``gpu``.

    ``gpu`` defaults to the ``cpu`` value, for runs that do not grow on a GPU.
    """
    m = mode(device)
    if m == "fast":
        return fast
    if m == "gpu" and gpu is not None:
        return gpu
    return cpu


def describe(device: str | torch.device | None = None) -> str:
    """One line a notebook prints first: mode, device and torch version, so every figure
    says where it came from."""
    dev = get_device(device)
    extra = (
        f" ({torch.cuda.get_device_name(dev)})"
        if dev.type == "cuda"
        else f" ({torch.get_num_threads()} threads)"
    )
    return f"mode={mode(dev)} device={dev}{extra} torch={torch.__version__}"


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS; True if it did.

    On a CPU every activation PyTorch makes is a ``malloc``. glibc serves a large block (from 128 KiB up
    to at most 32 MiB, adjusting as it goes) with ``mmap`` and returns it with ``munmap`` when the tensor
    is freed, so the next activation of that size arrives as fresh pages, and the kernel zero-fills each
    4 KiB page the first time it is touched (a minor page fault). One SD 1.5 image at 512 px (2 steps, two
    CPU threads) takes 4.3 million of them, a third of its time (chapter 05, section 8). With ``mmap``
    off (``M_MMAP_MAX = 0``) and the heap never trimmed (``M_TRIM_THRESHOLD``), freed
    blocks are reused as they are. The price: the process keeps its peak memory until it exits.

    Process-wide and one-way (call it once, early); changes nothing and returns False where glibc is not
    the C library (macOS, Windows, musl).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    libc = ctypes.CDLL(None)
    # mallopt takes an int: 2**31 - 1 bytes (2 GiB) of free heap top before any is given back
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


ROOT = Path(__file__).resolve().parents[1]  # the repository: common/ sits in it


def setup_notebook(seed: int = 0, dpi: int = 72) -> Path:
    """What every chapter notebook does first; returns the repository's root folder.

    Seeds every generator, makes inline figures ``dpi`` dots per inch (the stored notebook stays small),
    keeps tqdm from warning that ipywidgets is missing, and under ``COURSE_FAST=1`` runs torch on one thread
    (the tests run the notebooks side by side on a few cores, where OpenMP threads would spin against each
    other). Prints ``describe()``: the mode, device and torch version every figure below came from.
    """
    import matplotlib

    matplotlib.rcParams["figure.dpi"] = dpi
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook without ipywidgets
    if is_fast():
        torch.set_num_threads(1)
    seed_everything(seed)
    print(describe())
    return ROOT
