"""Every chapter's reference solutions pass its checks, and its untouched stubs do not."""

from pathlib import Path

import pytest

from common.grade import FAILED, PASSED, TODO, ERROR, chapter_dir, grade, main

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.name[:2] for p in ROOT.iterdir() if p.is_dir() and p.name[:2].isdigit() and (p / "checks.py").exists())


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
        "CHECKS = [('f', c_ok), ('g', c_bad), ('h', c_todo), ('k', c_err)]\n")
    (folder / "exercises.py").write_text(
        "def f(x): return x * x\ndef g(): return 0\n"
        "def h(): raise NotImplementedError\ndef k(): return 1 / 0\n")
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
