"""Build a chapter notebook from a percent-format script and execute it, so the committed
notebook shows real outputs.

    python tools/nbbuild.py SRC.py OUT.ipynb [--fast] [--timeout 1800]

SRC.py is a jupytext percent-format script: ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell
(each line starts with ``# ``), ``# %% tags=["..."]`` a tagged one. jupytext reads it; nbclient executes it.
Without ``--fast`` the notebook runs the real lesson (as a learner's CPU would); the stored outputs are what
a reader sees on GitHub. Images are stored as PNG at the figure's dpi: keep figures small so the notebook
stays under 3 MB.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient


def read_source(src: Path) -> nbformat.NotebookNode:
    """The notebook jupytext reads from ``src``, less jupytext's own metadata (the .ipynb is not paired)."""
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata.pop("jupytext", None)
    for cell in nb.cells:
        cell.metadata.pop("lines_to_next_cell", None)
    return nb


def build(src: Path, out: Path, fast: bool, timeout: int) -> float:
    nb = read_source(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    env_fast = os.environ.pop("COURSE_FAST", None)
    if fast:
        os.environ["COURSE_FAST"] = "1"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    t0 = time.perf_counter()
    try:
        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(out.parent)}}
        ).execute()
    finally:
        os.environ.pop("COURSE_FAST", None)
        if env_fast is not None:
            os.environ["COURSE_FAST"] = env_fast
    for cell in nb.cells:  # the execution counts and timings are noise in a diff
        cell.metadata.pop("execution", None)
    nbformat.write(nb, out)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument(
        "--fast", action="store_true", help="execute in COURSE_FAST mode (seconds, not the real lesson)"
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = p.parse_args()
    seconds = build(args.src, args.out, args.fast, args.timeout)
    size = args.out.stat().st_size / 1e6
    print(f"{args.out}: executed in {seconds:.0f} s, {size:.2f} MB")
    if size > 3:
        print("warning: over 3 MB; use smaller figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
