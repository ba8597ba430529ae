"""The laptop course model's machinery: echoed prompts, EMA snapshots and the adherence
curve, fp16 shipping."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.text_encoder import CLIPTextModel
from common.text_to_image import TextToImageConfig, _text_config, build_model, load_snapshots
from common.tokenizer import ShapesTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "06_stable_diffusion_architecture" / "train_text_to_image.py"
CURVE = ROOT / "06_stable_diffusion_architecture" / "adherence_curve.py"
RELATIONS = ROOT / "06_stable_diffusion_architecture" / "relation_analysis.py"
STAGES = ROOT / "06_stable_diffusion_architecture" / "training_stages.py"
TRAIN_VAE = ROOT / "01_latent_space_learning" / "train_vae.py"
PROMPT = "a large blue square to the left of a small green triangle"


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vae_dir):
    """One fast run of the training command: snapshots every 2 steps, shipped in fp16; (run, ship) folders."""
    root = tmp_path_factory.mktemp("t2i")
    run, ship = root / "run", root / "ship"
    _run(
        TRAIN,
        "--out",
        run,
        "--vae",
        vae_dir,
        "--cache-dir",
        root / "cache",
        "--snapshot-every",
        2,
        "--ship",
        ship,
        "--ship-dtype",
        "fp16",
        "--no-progress",
    )
    return run, ship


def test_echo_writes_the_prompt_twice_and_survives_saving(tmp_path):
    plain, echo = ShapesTokenizer.for_shapes(32), ShapesTokenizer.for_shapes(32, echo=True)
    words = plain([PROMPT])[0]
    n = int((words != plain.pad_id).sum())  # bos, 12 words, eos
    row = echo([PROMPT])[0]
    assert row[:n].tolist() == words[:n].tolist()
    assert row[n : 2 * n - 1].tolist() == words[1:n].tolist()  # the words again, then eos
    assert (row[2 * n - 1 :] == echo.pad_id).all()
    assert echo([""])[0, :3].tolist() == [echo.bos_id, echo.eos_id, echo.eos_id]
    assert echo.echo and not plain.echo
    echo.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.echo and torch.equal(again([PROMPT]), echo([PROMPT]))
    from transformers import PreTrainedTokenizerFast  # what diffusers' pipeline runs on a saved folder

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf([PROMPT], padding="max_length", max_length=32).input_ids[0] == row.tolist()


def test_echo_lets_the_first_object_see_the_relation():
    # under the causal mask, "square" (4th token) cannot see the relation; its echo (after the first eos) can
    torch.manual_seed(0)
    tok = ShapesTokenizer.for_shapes(32, echo=True)
    encoder = CLIPTextModel(_text_config(32, 2, 2, 32)).eval()
    left, right = PROMPT, PROMPT.replace("left", "right")
    with torch.no_grad():
        h = encoder(tok([left, right])).last_hidden_state  # (2, 32, 32)
    first, echoed = 4, 4 + 13  # "square" in each copy: bos a large blue square ... eos a large blue square
    assert tok.decode([int(tok([left])[0, first])]) == tok.decode([int(tok([left])[0, echoed])]) == "square"
    assert torch.allclose(h[0, first], h[1, first], atol=1e-6)  # blind to what follows
    assert (h[0, echoed] - h[1, echoed]).abs().max() > 1e-3  # sees "left" against "right"


def test_snapshots_curve_and_card(trained, vae_dir, judge_dir):
    run, ship = trained
    snaps = load_snapshots(run)
    assert [s["step"] for s in snaps] == [0, 2, 4]  # the untrained model, then every 2 steps to the end (4)
    assert all(b["seconds"] >= a["seconds"] for a, b in zip(snaps, snaps[1:]))
    model = build_model(TextToImageConfig.tiny())
    model.load_state_dict(load_file(str(snaps[-1]["path"])))  # strict: every key of the bundle
    first, last = load_file(str(snaps[0]["path"])), load_file(str(snaps[-1]["path"]))
    assert any(not torch.equal(first[k], last[k]) for k in first)
    proc = _run(CURVE, "--run", run, "--vae", vae_dir, "--judge", judge_dir, "--card", ship)
    curve = json.loads((run / "curve.json").read_text())
    assert [r["step"] for r in curve["rows"]] == [0, 2, 4]
    assert {"one_object", "two_objects", "relation_error", "minutes"} <= set(curve["rows"][0])
    assert (run / "curve.png").is_file() and (ship / "curve.png").is_file()
    assert "curve.png" in json.loads((ship / ".course_manifest").read_text())["files"]  # the course wrote it
    card = (ship / "README.md").read_text()
    assert "## Adherence during training" in card and "stored in fp16" in card
    proc = _run(CURVE, "--run", run, "--vae", vae_dir, "--judge", judge_dir)  # nothing left to evaluate
    assert "step" not in proc.stdout.split("->")[0].split("\n")[-2]


def test_fp16_ship_loads_in_both_pipelines_with_the_same_image(trained):
    import diffusers

    from common.pipeline import StableDiffusion

    _, ship = trained
    weights = load_file(str(ship / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    ours = StableDiffusion.from_pretrained(ship)
    assert ours.dtype == torch.float32
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(ship)  # no dtype argument: fp32 throughout
    theirs.set_progress_bar_config(disable=True)
    assert {theirs.unet.dtype, theirs.text_encoder.dtype, theirs.vae.dtype} == {torch.float32}
    a = ours(
        [PROMPT],
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        progress=False,
    ).images
    b = theirs(
        PROMPT,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        height=64,
        width=64,
    ).images
    assert (a - b).abs().max() < 1e-4


def test_curve_refuses_a_run_without_snapshots(tmp_path):
    proc = _run(CURVE, "--run", tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no snapshots there" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_relation_analysis_reads_both_wordings_and_the_blind_first_object(trained, judge_dir, tmp_path):
    _, ship = trained
    _run(RELATIONS, "--models", ship, "--judge", judge_dir, "--out", tmp_path)
    result = json.loads((tmp_path / "relations.json").read_text())["results"][0]
    assert set(result["wordings"]) == {"A rel B", "B inverse A"}
    for table in result["wordings"].values():
        t = table["all"]
        assert t["n"] == 4 and t["right"] + t["swapped"] + t["other"] == t["objects right"]
    assert result["blindness"]["first copy"] == 0.0  # the causal mask, exactly
    assert "relation error" in (tmp_path / "relations.md").read_text()


def test_classify_names_a_swap():
    import importlib.util

    from common.shapes import Scene, ShapeObject, layout

    spec = importlib.util.spec_from_file_location("relation_analysis", RELATIONS)
    sys.path.insert(0, str(RELATIONS.parent))  # the script imports evaluate.py from its folder
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(RELATIONS.parent))
    scene = layout(
        Scene((ShapeObject("square", "blue", "large"), ShapeObject("circle", "red", "small")), "left of")
    )
    square = {"shape": "square", "color": "blue", "size": "large"}
    circle = {"shape": "circle", "color": "red", "size": "small"}
    base = {"objects": 2, "pair_objects": True, "all": False}
    # the square is right of the circle although the prompt put it left: the inverse relation holds
    assert (
        module.classify(
            {**base, "detections": [{**circle, "center": (10, 32)}, {**square, "center": (50, 32)}]}, scene
        )
        == "swapped"
    )
    assert (
        module.classify(
            {**base, "detections": [{**square, "center": (30, 10)}, {**circle, "center": (30, 50)}]}, scene
        )
        == "other"
    )
    assert module.classify({**base, "pair_objects": False, "detections": []}, scene) == "wrong objects"


def test_training_stages_from_kept_checkpoints(trained, vae_dir, tmp_path):
    """Both stages looked back at: a VAE run that kept its checkpoints and the diffusion run's snapshots give
    loss curves and one grid row per kept step; a run that kept nothing is refused in one line."""
    vae_run = tmp_path / "vae_run"
    _run(TRAIN_VAE, "--data", "shapes", "--out", vae_run, "--keep-checkpoints", 10, "--eval-images", 4)
    kept = sorted((vae_run / "checkpoints").glob("step_*"))
    assert len(kept) >= 2  # every checkpoint of the (fast) run, not only the newest two
    run, _ = trained
    out = tmp_path / "stages"
    _run(STAGES, "--vae-run", vae_run, "--t2i-run", run, "--vae", vae_dir, "--out", out, "--rows", 2)
    result = json.loads((out / "stages.json").read_text())
    assert [r["step"] for r in result["t2i"]["rows"]] == [0, 4]  # first and last snapshot
    assert len(result["vae"]["rows"]) == 2 and all("psnr" in r for r in result["vae"]["rows"])
    assert result["vae"]["loss"] and result["t2i"]["loss"]
    from PIL import Image

    assert Image.open(out / "t2i_stage.png").size == (6 * 66 + 2, 2 * 66 + 2)  # 6 prompts x 2 rows, 64 px
    assert Image.open(out / "vae_stage.png").size == (8 * 66 + 2, 3 * 66 + 2)  # originals + 2 kept rows
    bare = tmp_path / "bare"
    bare.mkdir()
    proc = _run(STAGES, "--vae-run", bare, "--t2i-run", run, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "log.csv" in proc.stderr


def test_v_zero_snr_model_ships_and_samples_as_diffusers(tmp_path, vae_dir):
    """`--objective v`: the schedule rescaled to zero terminal SNR, v targets, trailing timesteps; the shipped
    scheduler says so, and diffusers' pipeline draws our image from it (DDIM and DPM-Solver++)."""
    import diffusers

    from common.pipeline import StableDiffusion

    config = TextToImageConfig.tiny().with_overrides(objective="v")
    assert config.schedule.prediction_type == "v_prediction" and float(config.schedule.alpha_bar[-1]) == 0.0
    assert TextToImageConfig.tiny().with_overrides(objective="eps").schedule.prediction_type == "epsilon"
    ship = tmp_path / "ship"
    _run(
        TRAIN, "--out", tmp_path / "run", "--vae", vae_dir, "--cache-dir", tmp_path / "cache",
        "--objective", "v", "--ship", ship, "--no-progress",
    )  # fmt: skip
    scheduler = json.loads((ship / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["timestep_spacing"] == "trailing" and scheduler["steps_offset"] == 0
    ours = StableDiffusion.from_pretrained(ship)
    assert ours.make_sampler("ddim", 4).timesteps[0] == 999  # sampling starts from pure noise
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(ship)
    theirs.set_progress_bar_config(disable=True)
    for sampler, cls in (
        ("ddim", diffusers.DDIMScheduler),
        ("dpmpp_2m", diffusers.DPMSolverMultistepScheduler),
    ):
        theirs.scheduler = cls.from_config(scheduler)
        kw = dict(num_inference_steps=4, guidance_scale=3.0, output_type="pt")
        a = ours([PROMPT], generator=torch.Generator().manual_seed(0), sampler=sampler, progress=False, **kw)
        b = theirs(PROMPT, generator=torch.Generator().manual_seed(0), height=64, width=64, **kw)
        assert (a.images - b.images).abs().max() < 1e-4, sampler
