"""The course text-to-image model: configs, caption dropout, the latent cache, the loss, and both training
scripts plus evaluate.py in fast mode (resume and shipping included)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.autoencoder import AutoencoderKL
from common.data import LatentDataset
from common.text_to_image import (
    CONFIG_NAMES,
    TextToImageConfig,
    build_model,
    build_pipeline,
    cache_latents,
    drop_captions,
    make_loss_fn,
)
from common.tokenizer import ShapesTokenizer

ROOT = Path(__file__).resolve().parents[1]
TRAIN06 = ROOT / "06_stable_diffusion_architecture" / "train_text_to_image.py"
TRAIN04 = ROOT / "04_cross_attention" / "train_text_to_image.py"
EVALUATE = ROOT / "06_stable_diffusion_architecture" / "evaluate.py"


def _run(script, *args, check=True):
    env = {**os.environ, "COURSE_FAST": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_presets_build_and_unknown_name_is_refused():
    for name in CONFIG_NAMES:
        config = TextToImageConfig.named(name)
        assert config.unet.cross_attention_dim == config.text_encoder.hidden_size
    with pytest.raises(ValueError, match="expected one of cpu, gpu, tiny"):
        TextToImageConfig.named("huge")
    with pytest.raises(ValueError, match="latents must be one of"):
        TextToImageConfig.tiny().with_overrides(latents="median")


def test_laptop_preset_ships_under_10_mb_in_fp16():
    """The laptop model ships in fp16 with their VAE inside the pipeline folder: at most 10 MB in all."""
    config = TextToImageConfig.cpu()
    assert config.ship_dtype == "fp16" and config.objective == "v" and config.vae == "vae_shapes_f8"
    n = sum(p.numel() for p in build_model(config).parameters())
    assert (n + 1_250_759) * 2 < 9.9e6, n  # + the f = 8 VAE's parameters (its model card)
    assert config.unet.sample_size * 8 == config.resolution


def test_gpu_preset_ships_under_30_mb():
    # the shipped model is the gpu preset: UNet + text encoder in fp32, plus the Shapes VAE (~1 M parameters)
    model = build_model(TextToImageConfig.gpu())
    n = sum(p.numel() for p in model.parameters())
    assert (n + 1_000_000) * 4 < 30e6, n


def test_latent_dataset_gathers_a_batch_like_the_collate_of_its_items():
    g = torch.Generator().manual_seed(0)
    cache = {
        "mean": torch.randn(10, 4, 2, 2, generator=g),
        "std": torch.rand(10, 4, 2, 2, generator=g),
        "input_ids": torch.randint(0, 40, (10, 6), generator=g),
    }
    ds = LatentDataset(cache)
    idx = [3, 0, 9, 3]
    fast, slow = ds.get_batch(idx), torch.utils.data.default_collate([ds[i] for i in idx])
    assert fast.keys() == slow.keys()
    for k in fast:
        assert torch.equal(fast[k], slow[k]), k


def test_caption_dropout_rate_and_replacement():
    tok = ShapesTokenizer.for_shapes()
    empty = tok([""])[0]
    ids = tok(["a small red circle at the top"] * 20_000)
    g = torch.Generator().manual_seed(0)
    out, dropped = drop_captions(ids, empty, 0.1, g)
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(out[dropped], empty.expand(int(dropped.sum()), -1))
    assert torch.equal(out[~dropped], ids[~dropped])
    out0, dropped0 = drop_captions(ids[:100], empty, 0.0, g)
    assert not dropped0.any() and torch.equal(out0, ids[:100])


def test_latent_cache_is_written_once_and_keyed_by_the_vae(tmp_path, vae_dir):
    tok = ShapesTokenizer.for_shapes()
    vae = AutoencoderKL.load(vae_dir)
    first = cache_latents(vae, tok, length=6, cache_dir=tmp_path, verbose=False)
    second = cache_latents(vae, tok, length=6, cache_dir=tmp_path, verbose=False)
    assert not first["hit"] and second["hit"] and first["path"] == second["path"]
    assert first["mean"].shape == (6, 4, 16, 16) and first["input_ids"].shape == (6, 24)
    torch.testing.assert_close(first["mean"], second["mean"])
    assert second["captions"] == first["captions"]
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # other weights: another key, never the stale file
    third = cache_latents(vae, tok, length=6, cache_dir=tmp_path, verbose=False)
    assert not third["hit"] and third["path"] != first["path"]


def test_loss_is_finite_reproducible_and_reaches_both_parts(tmp_path, vae_dir):
    config = TextToImageConfig.tiny()
    tok = ShapesTokenizer.for_shapes()
    cache = cache_latents(AutoencoderKL.load(vae_dir), tok, length=4, cache_dir=tmp_path, verbose=False)
    batch = torch.utils.data.default_collate([LatentDataset(cache)[i] for i in range(4)])
    torch.manual_seed(0)
    model = build_model(config)
    loss_fn = make_loss_fn(config, tok([""])[0])
    a, logs = loss_fn(model, batch, torch.Generator().manual_seed(1))
    b, _ = loss_fn(model, batch, torch.Generator().manual_seed(1))
    assert torch.isfinite(a) and a.item() == b.item() and "dropped" in logs
    a.backward()
    assert model["unet"].conv_in.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model["text_encoder"].parameters())
    sample = make_loss_fn(config.with_overrides(latents="sample"), tok([""])[0])
    assert torch.isfinite(sample(model, batch, torch.Generator().manual_seed(1))[0])
    min_snr = make_loss_fn(config.with_overrides(snr_gamma=5.0), tok([""])[0])
    weighted, logs = min_snr(model, batch, torch.Generator().manual_seed(1))
    assert torch.isfinite(weighted) and weighted.item() <= logs["mse"].item() + 1e-6  # weights are <= 1


@pytest.mark.parametrize("offset", [1.0, 0.1])
def test_v_loss_weights_the_x0_error_by_min_snr_plus_offset(monkeypatch, offset):
    """The v loss's Min-SNR weight, read off the loss at one fixed timestep: the v error is the x0 error times
    sqrt(SNR + 1), so the weight on the v MSE is min(SNR + offset, gamma) / (SNR + 1)."""
    from types import SimpleNamespace

    from common.schedules import NoiseSchedule

    config = TextToImageConfig.tiny().with_overrides(objective="v", snr_gamma=5.0, snr_offset=offset)
    assert config.schedule.prediction_type == "v_prediction" and config.schedule.rescale_zero_snr

    class Text(torch.nn.Module):
        def forward(self, ids):
            return SimpleNamespace(last_hidden_state=torch.zeros(ids.shape[0], ids.shape[1], 32))

    class Zero(torch.nn.Module):  # predicts v = 0, so the per-item MSE is the mean squared target
        def forward(self, z, t, context):
            return torch.zeros_like(z)

    model = torch.nn.ModuleDict({"text_encoder": Text(), "unet": Zero()})
    batch = {"z0_mean": torch.randn(3, 4, 8, 8), "input_ids": torch.zeros(3, 24, dtype=torch.long)}
    loss_fn = make_loss_fn(config, torch.zeros(24, dtype=torch.long))
    for t in (999, 600, 300, 0):
        monkeypatch.setattr(
            NoiseSchedule,
            "sample_timesteps",
            lambda self, b, generator=None, device=None, t=t: torch.full((b,), t, dtype=torch.long),
        )
        weighted, logs = loss_fn(model, batch, torch.Generator().manual_seed(0))
        snr = float(config.schedule.snr(torch.tensor([t]))[0])
        expected = min(snr + offset, 5.0) / (snr + 1)
        assert weighted.item() == pytest.approx(expected * logs["mse"].item(), rel=1e-5), (t, snr)


def test_build_pipeline_generates_64px(vae_dir):
    torch.manual_seed(0)
    config = TextToImageConfig.tiny()
    pipe = build_pipeline(
        build_model(config), ShapesTokenizer.for_shapes(), AutoencoderKL.load(vae_dir), config
    )
    out = pipe(
        ["a small red circle at the top"],
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        progress=False,
        height=64,
        width=64,
    )
    assert out.images.shape == (1, 3, 64, 64)


@pytest.mark.slow
def test_train06_fast_resume_ship_and_evaluate(tmp_path, vae_dir, judge_dir):
    out, ship, cache = tmp_path / "run", tmp_path / "ship", tmp_path / "cache"
    first = _run(TRAIN06, "--vae", vae_dir, "--out", out, "--cache-dir", cache, "--steps", 2, "--no-progress")
    assert "written" in first.stdout and (out / "samples.png").is_file()
    second = _run(
        TRAIN06,
        "--vae",
        vae_dir,
        "--out",
        out,
        "--cache-dir",
        cache,
        "--steps",
        4,
        "--no-progress",
        "--ship",
        ship,
    )
    assert "resuming from" in second.stdout and "reused" in second.stdout, second.stdout
    for part in (
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
        "README.md",
    ):
        assert (ship / part).is_file(), part
    assert "sha256" in (ship / "README.md").read_text()
    ev = _run(
        EVALUATE,
        "--model",
        ship,
        "--judge",
        judge_dir,
        "--out",
        tmp_path / "eval",
        "--samplers",
        "ddim",
        "dpmpp_2m",
        "--update-card",
    )
    assert (tmp_path / "eval" / "results.md").is_file() and (tmp_path / "eval" / "samples.png").is_file()
    csv_text = (tmp_path / "eval" / "results.csv").read_text()
    assert "real renders" in csv_text and "VAE reconstructions" in csv_text and "dpmpp_2m" in csv_text
    assert "### One-object prompts" in (ship / "README.md").read_text(), ev.stdout
    # --init-from: a fine-tune starts from the shipped weights, not from a fresh initialisation
    tune = _run(
        TRAIN06,
        "--vae",
        vae_dir,
        "--out",
        tmp_path / "tune",
        "--cache-dir",
        cache,
        "--steps",
        1,
        "--seed",
        1,
        "--lr",
        1e-12,
        "--warmup",
        0,
        "--no-progress",
        "--init-from",
        ship,
        "--ship",
        tmp_path / "ship2",
    )
    assert "initialised from" in (tmp_path / "ship2" / "README.md").read_text(), tune.stdout
    from safetensors.torch import load_file

    before = load_file(str(ship / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(tmp_path / "ship2" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(
        torch.allclose(before[k], after[k], atol=1e-6) for k in before
    )  # lr ~0 (seed 1 would draw other weights)


@pytest.mark.slow
def test_train04_fast_reports_attribute_accuracy(tmp_path, vae_dir, judge_dir):
    proc = _run(
        TRAIN04,
        "--vae",
        vae_dir,
        "--judge",
        judge_dir,
        "--out",
        tmp_path / "run",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert "colour" in proc.stdout and "position" in proc.stdout and "relation" in proc.stdout


def test_init_weights_refuses_another_config(tmp_path, vae_dir):
    from common.text_to_image import init_weights

    tiny = TextToImageConfig.named("tiny")
    pipe = build_pipeline(
        build_model(tiny), ShapesTokenizer.for_shapes(tiny.context_length), AutoencoderKL.load(vae_dir), tiny
    )
    pipe.save_pretrained(tmp_path / "tiny")
    model = build_model(tiny)
    init_weights(model, tmp_path / "tiny")
    assert all(
        torch.equal(a, b)
        for a, b in zip(model["unet"].state_dict().values(), pipe.unet.state_dict().values())
    )
    with pytest.raises(ValueError, match="not this config's unet"):
        init_weights(build_model(TextToImageConfig.named("cpu")), tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match="text_encoder/model.safetensors"):
        (tmp_path / "tiny" / "text_encoder" / "model.safetensors").unlink()
        init_weights(build_model(tiny), tmp_path / "tiny")


def test_scripts_refuse_bad_input(tmp_path, vae_dir):
    proc = _run(TRAIN06, "--config", "huge", "--vae", vae_dir, "--out", tmp_path / "x", check=False)
    assert proc.returncode != 0 and "expected one of cpu, gpu, tiny" in proc.stderr
    proc = _run(TRAIN06, "--vae", tmp_path / "nowhere", "--out", tmp_path / "x", check=False)
    assert proc.returncode != 0 and "no VAE at" in proc.stderr
    proc = _run(TRAIN06, "--minutes", "0", "--vae", vae_dir, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "argument --minutes: expected a number > 0" in proc.stderr
    proc = _run(EVALUATE, "--samplers", "euler", "--out", tmp_path / "y", check=False)
    assert proc.returncode != 0 and "unknown sampler 'euler'" in proc.stderr
