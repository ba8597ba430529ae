"""01_latent_space_learning/train_vae.py end to end (fast mode), its bad-input errors, and
the shipped Shapes VAE."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "01_latent_space_learning" / "train_vae.py"
SHIPPED = ROOT / "checkpoints" / "vae_shapes"


def run(*args, fast=True, check=True):
    env = {**os.environ, "COURSE_FAST": "1" if fast else "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train_vae.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.mark.slow
def test_fast_run_writes_model_card_and_resumes(tmp_path):
    out, ship = tmp_path / "run", tmp_path / "shipped"
    first = run("--out", out, "--steps", 2, "--device", "cpu")
    assert "held-out" in first.stdout and "scaling factor" in first.stdout
    second = run("--out", out, "--steps", 4, "--device", "cpu", "--ship", ship)
    assert "resuming from" in second.stdout and "step_0000002" in second.stdout
    for folder in (out / "final", ship):
        for name in (
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "README.md",
            "reconstructions.png",
        ):
            assert (folder / name).is_file(), f"{folder / name} missing"
    card = (ship / "README.md").read_text()
    for needed in ("command", "sha256", "PSNR", "scaling_factor", "hardware", "wall time"):
        assert needed in card, f"model card lacks {needed!r}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["steps"] == 4 and 0 < metrics["metrics"]["psnr"] < 100 and 0 < metrics["scaling_factor"] < 100
    )
    config = json.loads((ship / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(metrics["scaling_factor"])
    assert config["latent_channels"] == 4 and config["block_out_channels"] == [32, 64, 64]

    from common.autoencoder import AutoencoderKL

    vae = AutoencoderKL.load(ship)
    assert vae.encode(torch.zeros(1, 3, 64, 64)).mean.shape == (1, 4, 16, 16)
    import hashlib

    digest = hashlib.sha256((ship / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert digest in card


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resolution", "66", "--factor", "4"], "not a multiple of --factor 4"),
        (["--resolution", "36", "--factor", "8"], "not a multiple of --factor 8"),
        (["--data", "cifar"], "invalid choice: 'cifar'"),
        (["--factor", "3"], "invalid choice: 3"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_bad_input_is_a_clear_error(args, message, tmp_path):
    proc = run("--out", tmp_path, *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_help():
    proc = run("--help")
    assert "--kl-weight" in proc.stdout and "--ship" in proc.stdout


@pytest.mark.skipif(
    not (SHIPPED / "diffusion_pytorch_model.safetensors").exists(), reason="Shapes VAE not shipped yet"
)
def test_shipped_shapes_vae_reconstructs_held_out_at_30db():
    from common.autoencoder import AutoencoderKL
    from common.data import Shapes
    from common.metrics import psnr

    torch.manual_seed(0)
    vae = AutoencoderKL.load(SHIPPED).eval()
    ds = Shapes(64, "test", 8, seed=1, multiple_of=4)
    x = torch.stack([ds[i]["image"] for i in range(8)])
    with torch.no_grad():
        posterior = vae.encode(x)
        x_hat = vae.decode(posterior.mode()).clamp(-1, 1)
        z = posterior.sample(torch.Generator().manual_seed(0)) * vae.config.scaling_factor
    value = psnr(x_hat, x)
    assert value >= 30.0, f"shipped Shapes VAE reconstructs held-out Shapes at {value:.2f} dB, expected >= 30"
    assert 0.5 < float(z.std()) < 2.0, "scaling_factor should bring the latents near unit variance"

    import diffusers

    ref = diffusers.AutoencoderKL.from_pretrained(SHIPPED).eval()
    assert ref.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    with torch.no_grad():
        ref_out = ref.decode(ref.encode(x[:2]).latent_dist.mode()).sample
        ours = vae.decode(vae.encode(x[:2]).mode())
    diff = (ours - ref_out).abs().max().item()
    assert diff <= 1e-4 * max(1.0, ref_out.abs().max().item()), f"max |ours - diffusers| = {diff}"
    card = (SHIPPED / "README.md").read_text()
    assert "sha256" in card and "PSNR" in card


@pytest.mark.slow
def test_gan_term_trains_discriminator_and_ships_only_the_vae(tmp_path):
    import csv

    from safetensors.torch import load_file

    run("--out", tmp_path, "--steps", 3, "--gan-weight", 0.5, "--disc-start", 1, "--device", "cpu")
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["disc"]) == 0.0, "the discriminator must stay off before --disc-start"
    assert all(float(r["disc"]) > 0 and float(r["gan_weight"]) > 0 for r in rows[1:]), rows
    shipped = load_file(tmp_path / "final" / "diffusion_pytorch_model.safetensors")
    assert not any(k.startswith("disc") for k in shipped), "the shipped folder must hold the VAE alone"
