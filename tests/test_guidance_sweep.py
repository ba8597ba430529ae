"""Chapter 04's guidance_sweep.py: its statistics on inputs with known answers, s = 0 as the unconditional
model, the grid's choice rule, a fast run end to end, and its bad arguments."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.grade import load_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "04_cross_attention" / "guidance_sweep.py"


@pytest.fixture(scope="module")
def gs():
    return load_module(SCRIPT)


def run(*args, timeout=600):
    env = {**os.environ, "COURSE_FAST": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wilson_interval_against_scipy(gs):
    from scipy.stats import binomtest

    for k, n in ((5, 10), (0, 10), (48, 48), (30, 96), (1, 3)):
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        # our z = 1.96 against scipy's exact normal quantile 1.95996...
        assert gs.wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=2e-4)


def test_mean_pairwise_distance(gs):
    same = torch.rand(1, 3, 8, 8).expand(5, -1, -1, -1)
    assert gs.mean_pairwise_distance(same) == pytest.approx(0.0, abs=1e-7)
    two = torch.stack([torch.zeros(3, 8, 8), torch.full((3, 8, 8), 0.5)])
    assert gs.mean_pairwise_distance(two) == pytest.approx(0.5)
    # three images at 0, 0.5 and 1: pairwise RMS distances 0.5, 0.5 and 1, mean 2/3
    three = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.5, 1.0)])
    assert gs.mean_pairwise_distance(three) == pytest.approx(2 / 3)


def test_bootstrap_interval_brackets_the_mean(gs):
    values = np.random.default_rng(0).normal(1.0, 0.1, size=12)
    lo, hi = gs.bootstrap_mean(values)
    assert lo < values.mean() < hi and hi - lo < 0.2
    assert gs.bootstrap_mean(np.full(6, 0.3)) == pytest.approx((0.3, 0.3))


def test_grid_picks_the_largest_rise_from_s1_to_s3(gs):
    scales = [0.0, 1.0, 3.0]
    per_prompt = {
        "one flat": {
            "objects": 1,
            "all": [[False] * 4, [True] * 4, [True] * 4],
            "change_from_s1": [0, 0, 0.1],
        },
        "one rising": {
            "objects": 1,
            "all": [[False] * 4, [False] * 4, [True] * 4],
            "change_from_s1": [0, 0, 0.1],
        },
        "two rising": {
            "objects": 2,
            "all": [[False] * 4, [False] * 4, [True, True, False, False]],
            "change_from_s1": [0, 0, 0.2],
        },
    }
    assert gs.pick_for_grid(per_prompt, scales) == ["one rising", "two rising"]


def test_scale_zero_ignores_the_prompt(gs):
    from common.pipeline import tiny_random_pipeline

    pipe = tiny_random_pipeline(0)
    kw = dict(seeds=2, steps=2, seed=0, size=32)
    a0 = gs.generate(pipe, "a small red circle at the top", 0.0, **kw)
    b0 = gs.generate(pipe, "a large blue square on the left", 0.0, **kw)
    assert torch.equal(a0, b0)  # s = 0 is eps(z_t, t, ""): the prompt plays no part
    a1 = gs.generate(pipe, "a small red circle at the top", 1.0, **kw)
    b1 = gs.generate(pipe, "a large blue square on the left", 1.0, **kw)
    assert not torch.equal(a1, b1)
    again = gs.generate(pipe, "a small red circle at the top", 1.0, **kw)
    assert torch.equal(a1, again)  # same seed, same z_T, same image


@pytest.mark.slow
def test_guidance_sweep_fast_run(tmp_path):
    proc = run("--out", str(tmp_path), "--scales", "0", "1", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "guidance_sweep.json").read_text())
    assert (tmp_path / "guidance_sweep.png").stat().st_size > 1000
    assert result["model"] == "tiny random pipeline" and result["scales"] == [0.0, 1.0, 3.0]
    assert len(result["per_prompt"]) == 2 and len(result["grid_prompts"]) == 2
    for group in ("one object", "two objects", "all prompts"):
        for point in result["curves"][group]["adherence"]:
            assert 0 <= point["lo"] <= point["mean"] <= point["hi"] <= 1
        for point in result["curves"][group]["diversity"]:
            assert 0 < point["lo"] <= point["mean"] <= point["hi"] < 1
    for record in result["per_prompt"].values():
        assert np.array(record["all"]).shape == (3, result["seeds"])
        assert record["change_from_s1"][1] == 0.0  # s = 1 against itself


def test_guidance_sweep_bad_arguments(tmp_path):
    proc = run("--seeds", "0", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--seeds must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("--scales", "2", "5", "--out", str(tmp_path))
    assert proc.returncode == 2 and "include 1 and 3" in proc.stderr
    proc = run("--model", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert proc.returncode == 2 and "no model at" in proc.stderr and "Traceback" not in proc.stderr
