"""Every chapter's reference solutions pass its checks, and its untouched stubs do not."""

import os
from pathlib import Path

import pytest

from common.grade import ERROR, FAILED, PASSED, TODO, chapter_dir, grade, main

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(
    p.name[:2] for p in ROOT.iterdir() if p.is_dir() and p.name[:2].isdigit() and (p / "checks.py").exists()
)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_solutions_pass(chapter):
    results = grade(chapter, chapter_dir(chapter) / "solutions.py")
    assert len(results) >= 3, f"chapter {chapter} has fewer than three exercises"
    failed = [f"{r.name}: {r.status} {r.detail}" for r in results if r.status != PASSED]
    assert not failed, failed


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_untouched_stubs_fail(chapter):
    results = grade(chapter)
    passed = [r.name for r in results if r.status == PASSED]
    assert not passed, f"stubs pass without being solved: {passed}"
    assert all(r.status in (TODO, FAILED, ERROR) for r in results)


def test_grader_reports_each_outcome(tmp_path, capsys):
    folder = tmp_path / "99_demo"
    folder.mkdir()
    (folder / "checks.py").write_text(
        "def c_ok(m): assert m.f(2) == 4\n"
        "def c_bad(m): assert m.g() == 1, 'g() should return 1'\n"
        "def c_todo(m): m.h()\n"
        "def c_err(m): m.k()\n"
        "CHECKS = [('f', c_ok), ('g', c_bad), ('h', c_todo), ('k', c_err)]\n"
    )
    (folder / "exercises.py").write_text(
        "def f(x): return x * x\ndef g(): return 0\n"
        "def h(): raise NotImplementedError\ndef k(): return 1 / 0\n"
    )
    import common.grade as g

    old = g.ROOT
    g.ROOT = tmp_path
    try:
        status = {r.name: r.status for r in grade("99")}
        assert status == {"f": PASSED, "g": FAILED, "h": TODO, "k": ERROR}
        assert main(["99"]) == 1
        out = capsys.readouterr().out
        assert "g() should return 1" in out and "ZeroDivisionError" in out and "1/4 exercises passed" in out
        with pytest.raises(ValueError, match="no single chapter"):
            chapter_dir("42")
    finally:
        g.ROOT = old


def test_grading_after_torch_ran_parallel_ops_here_does_not_hang(tmp_path):
    """Forking a process whose OpenMP pool has run leaves the child stuck at its first convolution; the
    grader's workers come from a clean server instead. Run threaded convolutions here, then grade one."""
    import torch

    import common.grade as g

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            for _ in range(3):
                conv(torch.randn(4, 8, 32, 32))
        folder = tmp_path / "98_conv"
        folder.mkdir()
        (folder / "checks.py").write_text(
            "import os, torch\n"
            "def c(m):\n"
            "    torch.set_num_threads(2)\n"
            "    y = m.f(torch.nn.Conv2d(8, 8, 3, padding=1), torch.randn(4, 8, 32, 32))\n"
            "    assert y.shape == (4, 8, 32, 32)\n"
            "    assert os.environ.get('GRADER_TEST_VAR') == 'set after the server started'\n"
            "CHECKS = [('f', c)]\n"
        )
        (folder / "exercises.py").write_text("def f(conv, x):\n    return conv(x)\n")
        old = g.ROOT
        g.ROOT = tmp_path
        os.environ["GRADER_TEST_VAR"] = "set after the server started"
        try:
            results = grade("98", timeout=60)
        finally:
            g.ROOT = old
            del os.environ["GRADER_TEST_VAR"]
        assert [(r.name, r.status) for r in results] == [("f", PASSED)], results
    finally:
        torch.set_num_threads(threads)
