"""Chapter 03's training-progress weights (train_ldm.py --keep-checkpoints / --stop-at), the sampler
comparison (compare_samplers.py, fast mode) and its statistics, and the shipped progress checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.grade import load_module

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "03_latent_ddpm"
PROGRESS = ROOT / "checkpoints" / "ldm_digits_progress"
ENV = {**os.environ, "COURSE_FAST": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHAPTER / script), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def compare():
    return load_module(CHAPTER / "compare_samplers.py", "_ch03_compare_samplers")


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A random tiny VAE saved in diffusers layout: train_ldm.py only needs the format."""
    from common.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae_tiny"
    config = dataclasses.replace(AutoencoderConfig.tiny(), sample_size=32, scaling_factor=0.5)
    AutoencoderKL(config).save(path)
    return path


# ----------------------------------------------------------------------------------------- kept checkpoints
def test_keep_checkpoints_and_stop_at_match_the_full_run(tmp_path, tiny_vae):
    """--stop-at leaves the loop early, its LR schedule unchanged: the kept weights equal the full run's."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    common = ["--vae", str(tiny_vae), "--steps", "6", "--keep-checkpoints", "0,2,4", "--samplers", "ddim:2"]
    proc = run("train_ldm.py", *common, "--out", str(full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("train_ldm.py", *common, "--out", str(stopped), "--stop-at", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped at step 4" in proc.stdout and not (stopped / "result.json").exists()
    for step in (0, 2, 4):
        a = load_file(str(full / "progress" / f"step_{step:06d}.safetensors"))
        b = load_file(str(stopped / "progress" / f"step_{step:06d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"step {step} differs"
    # the kept step-4 weights are the EMA weights of the trainer's step-4 checkpoint, and differ from step 0
    ema = load_file(str(stopped / "checkpoints" / "step_0000004" / "ema.safetensors"))
    kept = load_file(str(stopped / "progress" / "step_000004.safetensors"))
    assert all(torch.equal(kept[k], ema[k]) for k in kept)
    init = load_file(str(stopped / "progress" / "step_000000.safetensors"))
    assert any(not torch.equal(kept[k], init[k]) for k in kept)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--keep-checkpoints", "2,x"], "expected steps like 0,250,1000"),
        (["--keep-checkpoints", "9"], r"must lie in 0..6"),
        (["--stop-at", "7"], r"expected a step in 1..6"),
    ],
)
def test_keep_checkpoints_bad_input(args, expected, tmp_path, tiny_vae, capsys):
    import re

    train_ldm = load_module(CHAPTER / "train_ldm.py", "_ch03_train_ldm")
    with pytest.raises(SystemExit) as exit_info:
        train_ldm.main(["--steps", "6", *args, "--out", str(tmp_path), "--vae", str(tiny_vae)])
    assert exit_info.value.code == 2
    assert re.search(expected, capsys.readouterr().err)


def test_shipped_progress_checkpoints_load_and_learn():
    """The shipped snapshots fit the shipped UNet config, and later ones predict the noise better."""
    from common.convert import unet_config_from_diffusers
    from common.schedules import NoiseSchedule
    from common.unet import UNet

    files = sorted(PROGRESS.glob("step_*.safetensors"))
    assert [f.stem for f in files] == ["step_000000", "step_000250", "step_001000"]
    shipped = ROOT / "checkpoints" / "ldm_digits"
    config = unet_config_from_diffusers(json.loads((shipped / "config.json").read_text()))
    log = (PROGRESS / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and int(log[-1].split(",")[0]) == 1000
    # the noise-prediction error on 64 held-out digits' latents, at fixed t and eps
    from common.autoencoder import AutoencoderKL
    from common.data import Digits

    vae = AutoencoderKL.load(ROOT / "checkpoints" / "vae_digits").eval()
    digits = Digits(32, "test", length=64, seed=0)
    x = torch.stack([digits[i][0] for i in range(64)]).repeat(1, 3, 1, 1)  # (64, 3, 32, 32)
    y = torch.tensor([digits[i][1] for i in range(64)])
    with torch.no_grad():
        z0 = vae.encode(x).mean * vae.config.scaling_factor  # (64, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (64,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    z_t = NoiseSchedule.sd15().add_noise(z0, eps, t)
    errors = []
    for f in files:
        unet = UNet(config)
        unet.load_state_dict(load_file(str(f)))
        with torch.no_grad():
            errors.append(float(((unet.eval()(z_t, t, class_labels=y) - eps) ** 2).mean()))
    assert errors[0] > errors[1] > errors[2], errors


# ---------------------------------------------------------------------------------------- sampler comparison
def test_wilson_interval_matches_scipy(compare):
    from scipy.stats import binomtest

    for k, n in ((0, 20), (7, 20), (20, 20), (913, 1000), (1000, 1000)):
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = compare.wilson_interval(k, n)
        assert abs(lo - ref.low) < 2e-4 and abs(hi - ref.high) < 2e-4, (k, n, lo, hi, ref)


def test_bootstrap_fd_interval_separates_different_sets(compare):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    same, shifted = rng.normal(size=(400, 8)), rng.normal(loc=0.5, size=(400, 8))
    fd_same, lo_same, hi_same = compare.bootstrap_fd(same, real, 50, 0)
    fd_far, lo_far, hi_far = compare.bootstrap_fd(shifted, real, 50, 0)
    assert lo_same <= fd_same <= hi_same and lo_far <= fd_far <= hi_far
    assert hi_same < lo_far  # a mean shift of 0.5 in 8 dimensions (FD ~2) is far outside the noise at n = 400


def test_compare_samplers_fast(tmp_path, compare):
    proc = run("compare_samplers.py", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "samplers.json").read_text())
    sampled = [r for r in result["rows"] if r["steps"] is not None]
    expected = [(s, n) for s in ("ddpm", "ddim", "dpmpp_2m") for n in (2, 4)]
    assert [(r["sampler"], r["steps"]) for r in sampled] == expected
    for r in sampled:
        assert r["samples"] == 20 and r["unet_evals"] == r["steps"]  # unguided by default: one call a step
        assert 0 <= r["acc_lo"] <= r["accuracy"] <= r["acc_hi"] <= 1
        assert 0 <= r["fd_lo"] <= r["fd"] <= r["fd_hi"]
    floors = [r["sampler"] for r in result["rows"] if r["steps"] is None]
    assert floors == ["real digits (a second held-out set)", "VAE reconstructions"]
    for figure in ("samplers.png", "samples_4_steps.png"):
        assert (tmp_path / figure).stat().st_size > 0
    assert "| DDIM | 4 | 4 |" in compare.table(result)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--n", "15"], "multiple of 10"),
        (["--samplers", "euler"], "ddpm, ddim, dpmpp_2m"),
        (["--steps", "2,x"], "integers like 2,4,8"),
        (["--steps", "0"], "between 1 and 1000"),
        (["--model", "/nonexistent"], "diffusion_pytorch_model.safetensors"),
    ],
)
def test_compare_samplers_bad_input(args, expected, tmp_path, compare, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.main([*args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err


def test_committed_sampler_table_discriminates():
    """The committed table separates samplers and step counts beyond their 95% intervals."""
    result = json.loads((CHAPTER / "results" / "samplers" / "samplers.json").read_text())
    rows = {(r["sampler"], r["steps"]): r for r in result["rows"] if r["steps"] is not None}
    assert result["samples"] >= 500 and {s for _, s in rows} == {2, 4, 8, 16, 50}
    accuracies = {r["accuracy"] for r in rows.values()}
    assert len(accuracies) > 3 and max(accuracies) < 1.0, "a table of identical accuracies compares nothing"
    for steps in (4, 8, 16, 50):  # the stochastic sampler above both deterministic ones
        for name in ("ddim", "dpmpp_2m"):
            assert rows[("ddpm", steps)]["acc_lo"] > rows[(name, steps)]["acc_hi"], (steps, name)
    # two steps are too few: DDPM at 2 steps is worse than at 4 in accuracy and in FD
    assert rows[("ddpm", 2)]["acc_hi"] < rows[("ddpm", 4)]["acc_lo"]
    assert rows[("ddpm", 2)]["fd_lo"] > rows[("ddpm", 4)]["fd_hi"]


# ------------------------------------------------------------------------------------ exercise 7's fast check
def test_train_digits_ldm_check_fails_a_loop_that_does_not_learn(tmp_path):
    """Under COURSE_FAST the check is quick, yet a loop that never steps its optimizer still fails it."""
    from common.grade import FAILED, chapter_dir, grade

    mutant = tmp_path / "no_step.py"
    mutant.write_text(
        "import torch\n"
        "from common.grade import load_module\n"
        f"ref = load_module({str(chapter_dir('03') / 'solutions.py')!r}, 'ref03')\n"
        "def train_digits_ldm(z0, labels, config, alphas_cumprod, *, steps, batch_size=64, **kw):\n"
        "    from common.unet import UNet\n"
        "    torch.manual_seed(1)\n"
        "    unet = UNet(config)\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    losses = []\n"
        "    for _ in range(steps):\n"
        "        idx = torch.randint(0, len(z0), (batch_size,), generator=g)\n"
        "        loss = ref.ldm_loss(unet, z0[idx], labels[idx], alphas_cumprod, g)\n"
        "        loss.backward()  # but no optimizer step\n"
        "        losses.append(float(loss.detach()))\n"
        "    return unet.eval(), losses\n"
    )
    results = grade("03", mutant, only=["train_digits_ldm"])
    assert [r.status for r in results] == [FAILED], [(r.status, r.detail) for r in results]
    assert "held-out loss" in results[0].detail
