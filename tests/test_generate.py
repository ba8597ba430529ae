"""06_stable_diffusion_architecture/generate.py, the course's main command, run as a
learner runs it (subprocess).

Until the shipped course model exists these runs use a tiny random pipeline saved by the test (``--model``);
the last test runs the default model when ``checkpoints/course_t2i`` is there.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "06_stable_diffusion_architecture" / "generate.py"


def run(*args, cwd):
    env = dict(os.environ, COURSE_FAST="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from common.pipeline import tiny_random_pipeline

    folder = tmp_path_factory.mktemp("gen") / "tiny"
    tiny_random_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_generate_writes_a_grid_and_prints_the_time(tiny_model, tmp_path):
    out = tmp_path / "sub" / "out.png"
    r = run(
        "a small red circle at the top left",
        "--model",
        tiny_model,
        "--out",
        out,
        "--num-images",
        "2",
        "--height",
        16,
        "--width",
        16,
        "--sampler",
        "dpmpp_2m",
        "--seed",
        3,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (32, 16)  # two 16 px images side by side
    assert "generated 2 image(s) of 16x16 px in" in r.stdout and "dpmpp_2m" in r.stdout
    again = tmp_path / "again.png"
    r = run(
        "a small red circle at the top left",
        "--model",
        tiny_model,
        "--out",
        again,
        "--num-images",
        "2",
        "--height",
        16,
        "--width",
        16,
        "--sampler",
        "dpmpp_2m",
        "--seed",
        3,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))  # same seed, same image


@pytest.mark.slow
def test_generate_inpaints_and_rejects_bad_input(tiny_model, tmp_path):
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small_mask.png")
    r = run(
        "a blue square",
        "--model",
        tiny_model,
        "--init-image",
        tmp_path / "init.png",
        "--mask",
        tmp_path / "mask.png",
        "--strength",
        1.0,
        "--out",
        tmp_path / "inpaint.png",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "inpaint.png").size == (16, 16)
    r = run(
        "a blue square",
        "--model",
        tiny_model,
        "--init-image",
        tmp_path / "init.png",
        "--mask",
        tmp_path / "small_mask.png",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "mask_image is 8 x 8 but the image is 16 x 16" in r.stderr
    r = run("a blue square", "--model", tiny_model, "--height", 17, "--width", 16, cwd=tmp_path)
    assert r.returncode == 2 and "multiples of 2" in r.stderr
    r = run("a blue square", "--model", tmp_path / "no_such_model", cwd=tmp_path)
    assert r.returncode == 2 and "no model at" in r.stderr


def test_generate_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--init-image" in r.stdout and "--tokenizer" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    not (ROOT / "checkpoints" / "course_t2i" / "model_index.json").is_file(),
    reason="the course model is not shipped yet (06's train_text_to_image.py writes it)",
)
def test_generate_with_the_course_model(tmp_path):
    r = run("a small red circle at the top left", "--out", tmp_path / "out.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out.png").size == (64, 64)
