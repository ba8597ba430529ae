"""common.runtime: device choice, seeding, the fast switch and budgets."""

import random

import numpy as np
import pytest
import torch

from common import runtime


def test_unknown_or_unavailable_device_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="expected one of cuda, mps, cpu"):
        runtime.get_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.get_device("cuda")
    assert runtime.get_device("cpu") == torch.device("cpu")


def test_device_override_from_the_environment(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert runtime.get_device() == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="unknown device"):
        runtime.get_device()


def test_seed_everything_makes_every_rng_repeat():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    g1 = runtime.seed_everything(7)
    a = draw(), torch.rand(1, generator=g1).item()
    g2 = runtime.seed_everything(7)
    b = draw(), torch.rand(1, generator=g2).item()
    assert a == b
    with pytest.raises(ValueError, match="non-negative int"):
        runtime.seed_everything(-1)


def test_fast_switch_and_budget(monkeypatch):
    monkeypatch.setenv("COURSE_FAST", "1")
    assert runtime.is_fast() and runtime.mode("cpu") == "fast"
    assert runtime.budget(fast=1, cpu=2, gpu=3) == 1
    monkeypatch.setenv("COURSE_FAST", "0")
    assert not runtime.is_fast()
    assert runtime.budget(fast=1, cpu=2, gpu=3, device="cpu") == 2
    assert runtime.budget(fast=1, cpu=2, device="cpu") == 2
    assert "device=cpu" in runtime.describe("cpu")


def test_reuse_freed_memory_stops_most_page_faults_of_a_repeated_workload():
    """Decoder-like work on 32 MiB activations (GroupNorm, SiLU, upsampling, an add), repeated: with glibc's
    defaults every repeat gets its activations as fresh pages (hundreds of thousands of minor page faults);
    after reuse_freed_memory() the freed blocks are reused (a small fraction of that). Run in fresh
    interpreters: the setting is process-wide and cannot be undone."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    script = """
import resource, sys, torch
import torch.nn.functional as F
from common import runtime
torch.set_num_threads(1)
x = torch.randn(1, 128, 256, 256)  # 32 MiB
def work():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        h = F.silu(F.group_norm(x, 32))
        h = F.interpolate(h, scale_factor=2.0)[..., ::2, ::2] + x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
applied = runtime.reuse_freed_memory() if sys.argv[1] == "reuse" else None
work()  # the first run may take new pages either way
print(applied, sum(work() for _ in range(3)))
"""

    def run(how):
        out = subprocess.run(
            [sys.executable, "-c", script, how], capture_output=True, text=True, check=True, cwd=runtime.ROOT
        ).stdout.split()
        return out[0], int(out[1])

    (_, default), (applied, reused) = run("default"), run("reuse")
    assert applied == "True"
    assert default > 100_000  # 3 x 4 x 5 activations of 8,192 pages each, most of them faulted in anew
    assert reused < default / 10
