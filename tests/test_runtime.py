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
