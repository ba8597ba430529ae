"""Chapter 02's checks fail the answers a learner is likely to get wrong, not only the untouched stubs."""

from pathlib import Path

import pytest

from common.grade import FAILED, PASSED, chapter_dir, grade

SOLUTIONS = chapter_dir("02") / "solutions.py"


def _variant(tmp_path: Path, old: str, new: str) -> Path:
    """The reference solutions with one line changed."""
    source = SOLUTIONS.read_text()
    assert old in source, f"the solutions no longer contain {old!r}: update this test"
    path = tmp_path / "variant.py"
    path.write_text(source.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    "name, old, new",
    [
        ("Upsample", 'mode="nearest"', 'mode="bilinear"'),  # a smoother upsample is a different function
        (
            "Upsample",
            "nn.Conv2d(channels, channels, 3, padding=1)",
            "nn.ConvTranspose2d(channels, channels, 3, padding=1)",
        ),  # same weight shape, not SD's layer
        ("decode", "    h = mid.attentions[0](h)", "    pass"),  # the mid-block attention left out
        ("decode", "    z = vae.post_quant_conv(z)", "    pass"),  # post_quant_conv left out
        (
            "decode",
            "    decoder = vae.decoder\n",
            "    return vae.decode(z)\n",
        ),  # the shortcut the check forbids
    ],
)
def test_a_wrong_answer_fails(tmp_path, name, old, new):
    results = {r.name: r for r in grade("02", _variant(tmp_path, old, new), only=[name])}
    assert results[name].status == FAILED, (results[name].status, results[name].detail)


def test_the_reference_passes_each_check():
    assert all(r.status == PASSED for r in grade("02", SOLUTIONS, only=["Upsample", "decode"]))
