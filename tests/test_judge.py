"""The Shapes judge: near-perfect on real renders, segmentation and relation rules, save/load, bad input."""

import numpy as np
import pytest
import torch

from common.judge import (
    JUDGE_DIR,
    MIN_AREA,
    Judge,
    ShapeNet,
    real_renders,
    relation_holds,
    segment,
    size_thresholds,
    to_uint8,
    train_judge,
)
from common.shapes import BACKGROUND, SIZES, Shapes


@pytest.fixture(scope="module")
def judge():
    """The shipped judge (checkpoints/shapes_judge)."""
    return Judge.load(JUDGE_DIR)


def test_shipped_judge_reads_real_renders_of_held_out_prompts(judge):
    one = Shapes.prompts("test", 12, n_objects=(1,))
    two = Shapes.prompts("test", 12, n_objects=(2,))
    s = judge.score(real_renders(one + two, seed=3), one + two)
    assert s["single"]["n"] == 12 and s["pair"]["n"] == 12
    assert s["single"]["all"] == 1.0, s["records"][:12]
    assert s["pair"]["objects"] == 1.0 and s["pair"]["all"] >= 11 / 12


def test_segment_finds_nothing_on_the_background_and_drops_specks():
    rgb = np.broadcast_to(np.asarray(BACKGROUND, np.float32), (64, 64, 3)).copy()
    assert segment(rgb) == []
    rgb[10:12, 10:12] = (220, 30, 30)  # a 4-pixel speck
    assert segment(rgb) == []
    rgb[30:40, 30:40] = (220, 30, 30)  # a 100-pixel square
    masks = segment(rgb)
    assert len(masks) == 1 and masks[0].sum() == 100 > MIN_AREA


def test_detect_reads_every_attribute_of_a_render(judge):
    prompt = "a large blue triangle at the bottom right"
    (d,) = judge.detect(real_renders([prompt]))[0]
    assert (d.shape, d.color, d.size, d.position) == ("triangle", "blue", "large", "bottom right")


def test_relation_rule():
    assert relation_holds("left of", (10, 30), (50, 32))
    assert not relation_holds("left of", (50, 30), (10, 32))
    assert relation_holds("above", (30, 10), (32, 50)) and relation_holds("below", (30, 50), (32, 10))
    assert not relation_holds("right of", (50, 10), (40, 60))  # along the axis less than across it


def test_size_thresholds_lie_between_small_and_large():
    t = size_thresholds(64)
    scale = (SIZES["large"] / SIZES["small"]) ** 2
    for shape, threshold in t.items():
        assert 50 < threshold < 400, shape
    assert len(t) == 6 and scale > 2


def test_score_rejects_mismatched_lengths(judge):
    with pytest.raises(ValueError, match="one image per prompt"):
        judge.score(torch.zeros(2, 3, 64, 64), ["a small red circle at the top"])
    with pytest.raises(ValueError, match="RGB"):
        to_uint8(torch.zeros(2, 1, 64, 64))


def test_missing_judge_says_how_to_train_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train-judge"):
        Judge.load(tmp_path)


def test_train_save_load_round_trip(tmp_path):
    j = train_judge(n_images=24, steps=3, batch_size=16, verbose=False)
    j.save(tmp_path)
    k = Judge.load(tmp_path)
    x = torch.rand(4, 1, 24, 24)
    torch.testing.assert_close(j.net(x)[0], k.net(x)[0])
    assert isinstance(k.net, ShapeNet)


def test_generated_looking_noise_scores_zero(judge):
    torch.manual_seed(0)
    s = judge.score(
        torch.rand(2, 3, 64, 64),
        ["a small red circle at the top", "a small red circle above a large blue square"],
    )
    assert s["single"]["all"] == 0.0 and s["pair"]["all"] == 0.0
