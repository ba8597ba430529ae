"""The course text-to-image model trained by flow matching (SD 3's objective): the loss against a hand
computation, shipping in diffusers format and sampling the same image in our pipeline and in diffusers', the
pipeline's sampler checks, and compare_objectives.py in fast mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from common.autoencoder import AutoencoderConfig, AutoencoderKL
from common.judge import train_judge
from common.pipeline import StableDiffusion
from common.text_to_image import (
    LatentDataset,
    TextToImageConfig,
    build_model,
    build_pipeline,
    cache_latents,
    make_loss_fn,
)
from common.tokenizer import ShapesTokenizer

ROOT = Path(__file__).resolve().parents[1]
COMPARE = ROOT / "06_stable_diffusion_architecture" / "compare_objectives.py"
SETS = ("held-out 1 object", "held-out 2 objects", "paraphrased 1 object", "paraphrased 2 objects")
PROMPTS = ["a small red circle at the top", "a large blue square to the left of a small green star"]


def flow_config() -> TextToImageConfig:
    return TextToImageConfig.tiny().with_overrides(objective="flow")


def random_flow_pipeline(seed: int = 0) -> StableDiffusion:
    """An untrained tiny flow model around a random course-config VAE (64 px -> 16 x 16 latents)."""
    torch.manual_seed(seed)
    config = flow_config()
    model = build_model(config)
    with torch.no_grad():  # a visible output scale, so guidance and every step change the image measurably
        model["unet"].conv_out.weight.normal_(0, 0.05)
    vae = AutoencoderKL(AutoencoderConfig.course())
    return build_pipeline(model, ShapesTokenizer.for_shapes(), vae, config)


def test_objective_is_checked():
    with pytest.raises(ValueError, match="objective must be one of"):
        TextToImageConfig.tiny().with_overrides(objective="x0")


def test_flow_loss_equals_a_hand_computation(tmp_path):
    """SD 3's loss written out: logit-normal t (drawn as diffusers' training utilities draw it), the
    straight path, the UNet at timestep 1000 t, the target eps - z_0, plain MSE; the eps loss's caption
    dropout."""
    torch.manual_seed(0)
    config = flow_config().with_overrides(caption_dropout=0.5)
    tok = ShapesTokenizer.for_shapes()
    vae = AutoencoderKL(AutoencoderConfig.course())
    cache = cache_latents(vae, tok, length=6, cache_dir=tmp_path, verbose=False)
    batch = LatentDataset(cache).get_batch(list(range(6)))
    model = build_model(config)
    empty = tok([""])[0]
    loss, logs = make_loss_fn(config, empty)(model, batch, torch.Generator().manual_seed(1))

    g = torch.Generator().manual_seed(1)  # the same draws, in the loss's order: captions, t, eps
    z0 = batch["z0_mean"]
    B = z0.shape[0]
    dropped = torch.rand(B, generator=g) < 0.5
    ids = torch.where(dropped[:, None], empty[None, :], batch["input_ids"])
    t = compute_density_for_timestep_sampling("logit_normal", B, logit_mean=0.0, logit_std=1.0, generator=g)
    eps = torch.randn(z0.shape, generator=g)
    t4 = t.view(B, 1, 1, 1)
    z_t = (1 - t4) * z0 + t4 * eps
    with torch.no_grad():
        context = model["text_encoder"](ids).last_hidden_state
        v_pred = model["unet"](z_t, 1000 * t, context)
    expected = ((v_pred - (eps - z0)) ** 2).mean()
    assert 0 < dropped.sum() < B  # the dropout really happened on some rows and not others
    assert logs["dropped"].item() == dropped.float().mean().item()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the timestep scale matters: t itself instead of 1000 t gives another loss
        wrong = ((model["unet"](z_t, t, context) - (eps - z0)) ** 2).mean()
    assert (wrong - expected).abs() > 1e-4


def test_flow_model_ships_with_a_flow_scheduler_and_reloads_the_same(tmp_path):
    pipe = random_flow_pipeline()
    assert pipe.is_flow and pipe.sampler_name == "flow_euler"
    pipe.save_pretrained(tmp_path / "m")
    scheduler = json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 1.0
    again = StableDiffusion.from_pretrained(tmp_path / "m")
    assert again.is_flow and again.sampler_name == "flow_euler"
    kw = dict(num_inference_steps=4, guidance_scale=3.0, output_type="pt", progress=False)
    a = pipe(PROMPTS, generator=0, **kw).images
    b = again(PROMPTS, generator=0, **kw).images
    assert (a - b).abs().max() == 0


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_flow_model_samples_the_same_image_in_diffusers(tmp_path, guidance):
    """diffusers' StableDiffusionPipeline loads the shipped flow model with its
    FlowMatchEulerDiscreteScheduler; its __call__ needs two members that the scheduler lacks (what the model
    card says), then gives our image."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    pipe = random_flow_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    ref = StableDiffusionPipeline.from_pretrained(str(tmp_path / "m"), safety_checker=None)
    assert isinstance(ref.scheduler, FlowMatchEulerDiscreteScheduler)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=6, guidance_scale=guidance, output_type="pt", height=64, width=64)
    with pytest.raises(AttributeError, match="init_noise_sigma"):
        ref(PROMPTS, generator=torch.Generator().manual_seed(0), **kw)
    ref.scheduler.init_noise_sigma = 1.0  # z_1 = eps ~ N(0, I)
    ref.scheduler.scale_model_input = lambda sample, timestep=None: sample  # flow matching keeps z_t as is
    theirs = ref(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
    ours = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), progress=False, **kw).images
    assert (ours - theirs).abs().max() <= 1e-4
    other = pipe(
        PROMPTS,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        **{**kw, "guidance_scale": guidance + 2.0},
    ).images
    assert (ours - other).abs().max() > 1e-3  # the comparison is not blind to guidance


def test_samplers_must_fit_the_objective():
    flow = random_flow_pipeline()
    with pytest.raises(ValueError, match="flow-matching model"):
        flow(PROMPTS[:1], num_inference_steps=2, sampler="ddim", progress=False)
    eps = build_pipeline(
        build_model(TextToImageConfig.tiny()),
        ShapesTokenizer.for_shapes(),
        AutoencoderKL(AutoencoderConfig.course()),
        TextToImageConfig.tiny(),
    )
    assert not eps.is_flow and eps.sampler_name == "ddim"
    with pytest.raises(ValueError, match="flow_euler samples flow-matching models"):
        eps(PROMPTS[:1], num_inference_steps=2, sampler="flow_euler", progress=False)


def test_img2img_starts_from_the_straight_path():
    """With a flow model, img2img noises the image to t on the straight line (1 - t) z_0 + t eps."""
    pipe = random_flow_pipeline()
    image = torch.rand(1, 3, 64, 64)
    out = pipe(
        PROMPTS[:1],
        image=image,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=0,
        output_type="pt",
        progress=False,
    ).images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A random course-config VAE and a barely trained judge: the script runs, its numbers mean nothing."""
    torch.manual_seed(0)
    vae = tmp_path_factory.mktemp("vae")
    AutoencoderKL(AutoencoderConfig.course()).save(vae)
    judge = tmp_path_factory.mktemp("judge")
    train_judge(n_images=16, steps=2, batch_size=8, verbose=False).save(judge)
    return vae, judge


def _compare(*args):
    env = {**os.environ, "COURSE_FAST": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(COMPARE), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.slow
def test_compare_objectives_fast(tmp_path, assets):
    vae, judge = assets
    out = tmp_path / "objectives"
    common = ["--vae", vae, "--judge", judge, "--cache-dir", tmp_path / "cache"]
    proc = _compare("--out", out, "--results", tmp_path / "results", *common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "objectives.json").read_text())
    assert (tmp_path / "results" / "objectives.md").read_text() == (out / "objectives.md").read_text()
    eps, flow, v = (result["trainings"][o] for o in ("eps", "flow", "v"))
    assert eps["steps"] == flow["steps"] == v["steps"] == TextToImageConfig.tiny().steps  # equal compute
    assert "--objective v" in v["command"] and result["objectives"] == ["eps", "v", "flow"]
    v_scheduler = json.loads((out / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert v_scheduler["prediction_type"] == "v_prediction" and v_scheduler["rescale_betas_zero_snr"]
    assert v_scheduler["timestep_spacing"] == "trailing"
    assert 0 < eps["loop_seconds"] <= eps["seconds"] and 0 < flow["loop_seconds"] <= flow["seconds"]
    assert "--objective flow" in flow["command"] and "--objective eps" in eps["command"]
    assert (
        json.loads((out / "flow" / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        == "FlowMatchEulerDiscreteScheduler"
    )
    runs = {(r["objective"], r["sampler"], r["steps"]) for r in result["rows"]}
    assert runs == {
        (o, s, k)
        for o, s in (
            ("eps", "ddim"),
            ("eps", "dpmpp_2m"),
            ("v", "ddim"),
            ("v", "dpmpp_2m"),
            ("flow", "flow_euler"),
        )
        for k in (4, 8, 25)
    }
    for row in result["rows"]:
        for name in SETS:
            s = row[name]
            assert 0 <= s["low"] <= s["all"] <= s["high"] <= 1 and s["n"] == result["n"]
    assert "| flow | flow_euler | 25 |" in (out / "objectives.md").read_text()
    # again, with the eps model given: nothing is retrained, the eps model's steps come from its card
    again = _compare("--out", out, "--eps-model", out / "eps", "--sampling-steps", 4, "--no-dpmpp", *common)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already shipped" in again.stdout and "already holds this evaluation" not in again.stdout
    assert "$ python 06_stable_diffusion_architecture/train_text_to_image.py" not in again.stdout
    result = json.loads((out / "objectives.json").read_text())
    assert result["trainings"]["eps"]["reused"] and result["trainings"]["eps"]["steps"] == eps["steps"]
    assert {(r["sampler"], r["steps"]) for r in result["rows"]} == {("ddim", 4), ("flow_euler", 4)}
    # and once more: the same evaluations are read back, not run again
    third = _compare("--out", out, "--eps-model", out / "eps", "--sampling-steps", 4, "--no-dpmpp", *common)
    assert third.returncode == 0 and third.stdout.count("already holds this evaluation") == 3, third.stdout
    assert json.loads((out / "objectives.json").read_text())["rows"] == result["rows"]


def test_compare_objectives_refuses_a_missing_eps_model(tmp_path):
    proc = _compare("--out", tmp_path / "o", "--eps-model", tmp_path / "nothing")
    assert proc.returncode == 2 and "no model_index.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = _compare("--out", tmp_path / "o", "--model", f"x0={tmp_path}")
    assert proc.returncode == 2 and "OBJECTIVE=PATH" in proc.stderr and "Traceback" not in proc.stderr
