"""Chapter 03's scripts: train_classifier.py, train_ldm.py and pixel_vs_latent.py in fast mode, resume, bad
input, the digits classifier module, and the saved LDM folder loading into diffusers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.grade import load_module

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "03_latent_ddpm"
ENV = {**os.environ, "COURSE_FAST": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(CHAPTER / script), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A random tiny VAE (f = 2: 32 px -> 16x16x4) saved in diffusers layout: the scripts
    only need the format."""
    from common.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae_tiny"
    AutoencoderKL(dataclasses.replace(AutoencoderConfig.tiny(), sample_size=32, scaling_factor=0.5)).save(
        path
    )
    return path


@pytest.fixture(scope="module")
def train_ldm():
    return load_module(CHAPTER / "train_ldm.py", "_ch03_train_ldm")


# ----------------------------------------------------------------------------------------------- classifier
def test_classifier_module(tmp_path):
    from common.classifier import ClassifierConfig, DigitClassifier, conditional_accuracy

    torch.manual_seed(0)
    model = DigitClassifier(ClassifierConfig.tiny())
    x = torch.rand(6, 1, 28, 28) * 2 - 1  # another side: resized to 32 inside
    assert model(x).shape == (6, 10)
    model.save(tmp_path / "clf")
    again = DigitClassifier.load(tmp_path / "clf")
    assert torch.equal(again.predict(x), model.predict(x))
    acc = conditional_accuracy(again, x, again.predict(x))
    assert acc == 1.0
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.zeros(2, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match="train_classifier.py"):
        DigitClassifier.load(tmp_path / "missing")


def test_shipped_classifier_reads_held_out_digits():
    from common.classifier import DigitClassifier, accuracy
    from common.data import Digits

    path = ROOT / "checkpoints" / "digits_classifier"
    if not (path / "model.safetensors").exists():
        pytest.skip("checkpoints/digits_classifier is not shipped")
    ds = Digits(32, "test", length=200, seed=5)
    x = torch.stack([ds[i][0] for i in range(200)])
    y = torch.tensor([ds[i][1] for i in range(200)])
    assert accuracy(DigitClassifier.load(path), x, y) >= 0.95


@pytest.mark.slow
def test_train_classifier_fast_and_resume(tmp_path):
    proc = run("train_classifier.py", "--out", str(tmp_path / "run"), "--ship", str(tmp_path / "ship"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["steps"] == 5
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (tmp_path / "ship" / name).exists()
    assert "sha256" in (tmp_path / "ship" / "README.md").read_text()
    proc = run("train_classifier.py", "--out", str(tmp_path / "run"), "--steps", "7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "step 5 of 7" in proc.stdout


# ------------------------------------------------------------------------------------------------ train_ldm
@pytest.mark.slow
def test_train_ldm_fast_then_resume(tmp_path, tiny_vae, train_ldm):
    out, ship = tmp_path / "run", tmp_path / "ship"
    proc = run("train_ldm.py", "--vae", str(tiny_vae), "--out", str(out), "--ship", str(ship))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert [r["sampler"] for r in result["samplers"]] == ["ddim", "dpmpp_2m", "ddpm"]
    for row in result["samplers"]:
        assert row["samples"] == 20 and row["seconds"] > 0
        if (ROOT / "checkpoints" / "digits_classifier" / "model.safetensors").exists():
            assert 0.0 <= row["accuracy"] <= 1.0
    assert result["scaling_factor"] == 0.5  # the VAE's own, by default
    assert (out / "forward_process.png").exists() and (out / "samples_ddim_5.png").exists()
    assert list((out / "cache").glob("latents_digits_256_0_*.pt")), "the latents are cached"
    card = (ship / "README.md").read_text()
    assert "sha256" in card and "| ddim | 5 | 20 |" in card
    # the saved folder loads back (EMA weights) and into diffusers' UNet2DConditionModel with the same output
    unet, schedule, info = train_ldm.load_model(ship)
    assert info["scaling_factor"] == 0.5 and schedule.beta_schedule == "scaled_linear"
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(ship).eval()
    z, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([3, 7])
    with torch.no_grad():
        ours, theirs = (
            unet(z, t, class_labels=y),
            ref(z, t, encoder_hidden_states=None, class_labels=y).sample,
        )
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)
    # resume: the same folder, more steps; the cache is reused
    proc = run(
        "train_ldm.py",
        "--vae",
        str(tiny_vae),
        "--out",
        str(out),
        "--steps",
        "6",
        "--samplers",
        "ddim:3",
        "--scaling-factor",
        "computed",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "step 4 of 6" in proc.stdout and "encoded" not in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert abs(result["scaling_factor"] - result["computed_scaling_factor"]) < 1e-9


@pytest.mark.slow
def test_train_ldm_shapes_unconditional_fast(tmp_path, tiny_vae):
    proc = run(
        "train_ldm.py",
        "--data",
        "shapes",
        "--vae",
        str(tiny_vae),
        "--out",
        str(tmp_path),
        "--samplers",
        "dpmpp_2m:3",
        "--preview-t",
        "0,999",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["unet"]["num_class_embeds"] is None and result["cfg_dropout"] == 0.0
    row = result["samplers"][0]
    assert row["samples"] == 8 and "accuracy" not in row and row["latent_fd"] >= 0


@pytest.mark.parametrize(
    "args, allowed",
    [
        (["--schedule", "quadratic"], "linear, scaled_linear, cosine"),
        (["--prediction-type", "noise"], "epsilon, v_prediction, sample"),
        (["--samplers", "euler:20"], "ddpm, ddim, dpmpp_2m"),
        (["--samplers", "ddim:2000"], "between 1 and num_train_timesteps=1000"),
        (
            ["--num-train-timesteps", "100", "--samplers", "ddpm:1000"],
            "between 1 and num_train_timesteps=100",
        ),
        (["--preview-t", "0,1000"], r"outside \[0, 999\]"),
        (["--data", "cifar"], "digits, shapes"),
        (["--scaling-factor", "big"], "'vae', 'computed' or a number"),
    ],
)
def test_train_ldm_bad_input_lists_what_is_allowed(args, allowed, train_ldm, capsys, tmp_path, tiny_vae):
    import re

    with pytest.raises(SystemExit) as exit_info:
        train_ldm.main([*args, "--out", str(tmp_path), "--vae", str(tiny_vae)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(allowed, err), err


def test_ldm_loss_and_scaling(train_ldm):
    from common.schedules import NoiseSchedule

    torch.manual_seed(0)
    unet = __import__("common.unet", fromlist=["UNet"]).UNet(train_ldm.unet_config("digits", 16))
    schedule = NoiseSchedule.sd15()
    z0 = torch.randn(4, 4, 8, 8)
    loss = train_ldm.ldm_loss(
        unet, schedule, z0, torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0)
    )
    assert loss.ndim == 0 and torch.isfinite(loss)
    again = train_ldm.ldm_loss(
        unet, schedule, z0, torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0)
    )
    assert loss.item() == again.item()  # all randomness from the generator
    cache = {"mean": torch.randn(64, 4, 8, 8) * 4, "std": torch.full((64, 4, 8, 8), 0.1)}
    assert abs(train_ldm.computed_scaling_factor(cache) - 0.25) < 0.02


# ------------------------------------------------------------------------------------------ pixel vs latent
@pytest.mark.slow
def test_pixel_vs_latent_fast(tmp_path):
    proc = run("pixel_vs_latent.py", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "result.json").read_text())["rows"]
    assert [(r["case"], r["space"]) for r in rows] == [
        ("digits", "pixel"),
        ("digits", "latent"),
        ("shapes", "pixel"),
        ("shapes", "latent"),
    ]
    for pixel, latent in (rows[:2], rows[2:]):
        assert (
            pixel["params"] - latent["params"] < 2000
        )  # same architecture (only conv_in/out channels differ)
        assert pixel["activation_MB"] > 4 * latent["activation_MB"]
