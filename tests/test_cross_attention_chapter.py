"""Chapter 04's attention_maps.py: a fast run, its bad arguments, and its pieces on renders with known masks.

The bad inputs of issue 5 are covered by the module tests, so none is repeated here: a context of the wrong
width (tests/test_unet.py::test_bad_input_errors, tests/test_attention.py), a prompt longer than the context,
truncated with a warning naming the dropped words (tests/test_tokenizer.py for both tokenizers,
tests/test_pipeline.py::test_bad_inputs), an empty prompt batch (the same two files).

attention_maps.py runs in fast mode (a tiny random pipeline, seconds); its pieces are checked on Shapes
renders whose masks are known. The notebook runs under nbval and the exercises under tests/test_exercises.py.
"""

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
SCRIPT = ROOT / "04_cross_attention" / "attention_maps.py"


@pytest.fixture(scope="module")
def am():
    return load_module(SCRIPT)


def run(*args, timeout=300):
    env = {**os.environ, "COURSE_FAST": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_attention_maps_fast_run(tmp_path):
    proc = run("--out", str(tmp_path), "--prompts", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "attention_maps.json").read_text())
    assert (tmp_path / "attention_maps.png").stat().st_size > 1000
    assert result["model"] == "tiny random pipeline" and len(result["prompts"]) == 2
    layout = result["summary"]["layout"]
    for word in ("colour", "shape"):  # canonical-layout masks exist for every object
        s = layout[word]
        assert s["n"] == s["of"] == 4
        assert 0 <= s["share_own"] <= 1 and 0 < s["chance"] < 0.5 and 0 <= s["above_chance"] <= 1
    for row in result["rows"]:
        assert row["token"] in row["prompt"].split()
    assert "lift" in proc.stdout and "own>other" in proc.stdout


def test_attention_maps_bad_arguments(tmp_path):
    proc = run("--prompts", "0", "--out", str(tmp_path))
    assert proc.returncode == 2 and "argument --prompts: expected an integer >= 1" in proc.stderr
    proc = run("--model", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert proc.returncode == 2 and "no model at" in proc.stderr and "--model tiny" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_generated_masks_find_rendered_objects(am):
    from common.shapes import parse, render

    prompt = "a large red circle to the left of a small blue square"
    scene = parse(prompt)
    image, masks = render(scene, 64)
    found = am.generated_masks((image + 1) / 2, scene)  # the render stands in for a perfect generation
    for k in range(2):
        assert found[k] is not None
        iou = (found[k] & masks[k].numpy()).sum() / (found[k] | masks[k].numpy()).sum()
        assert iou > 0.8, f"object {k}: IoU {iou:.2f}"
    # a colour that is not in the image leaves that object out
    assert (
        am.generated_masks((image + 1) / 2, parse("a large green circle to the left of a small blue square"))[
            0
        ]
        is None
    )


def test_mass_in_mask_and_word_positions(am):
    from common.shapes import parse

    mask = np.zeros((8, 8), bool)
    mask[:2] = True
    share, chance = am.mass_in_mask(torch.ones(8, 8), mask)
    assert share == pytest.approx(0.25) and chance == pytest.approx(0.25)
    share, _ = am.mass_in_mask(torch.from_numpy(mask.astype(np.float32)) * 3, mask)
    assert share == pytest.approx(1.0)
    # the shape word repeats: each object gets the one after its own colour word
    prompt = "a small red circle above a large blue circle"
    tokens = ["<bos>", *prompt.split(), "<eos>", "<pad>"]
    positions = am.word_positions(tokens, parse(prompt))
    assert positions == [{"colour": 3, "shape": 4}, {"colour": 8, "shape": 9}]
    prompts = am.two_object_prompts(5, 1234)
    assert len(prompts) == 5 and all(parse(p).objects[0].color != parse(p).objects[1].color for p in prompts)
