"""The style rules in pyproject.toml hold: `ruff check .` and `ruff format --check .` pass from the repo root
(line length 110, E501 on; the committed notebooks are skipped, their percent-format sources are checked)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff", reason="ruff is not installed: pip install -r requirements.txt")

ROOT = Path(__file__).resolve().parents[1]
# each chapter's exercises.py is where a learner writes, in their own style: the grader judges it, not the
# linter (run ruff on it by hand to check the course's stubs)
LEARNER = ("--extend-exclude", "*/exercises.py")


def _ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ruff", *args]
    return subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    result = _ruff("check", *LEARNER, ".")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`ruff check .` fails (some fix with `ruff check --fix .`):\n{output}"


def test_ruff_format_check_passes():
    result = _ruff("format", "--check", *LEARNER, ".")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`ruff format --check .` fails (run `ruff format .`):\n{output}"


def test_the_repo_config_limits_lines_to_110_characters():
    """The checks above would pass vacuously if E501 were ignored again: a 111-character line must fail."""
    ok, long = 'x = "' + "a" * 104 + '"\n', 'x = "' + "a" * 105 + '"\n'
    assert len(ok.rstrip("\n")) == 110 and len(long.rstrip("\n")) == 111
    assert _ruff("check", "--stdin-filename", "probe.py", "-", stdin=ok).returncode == 0
    result = _ruff("check", "--stdin-filename", "probe.py", "-", stdin=long)
    assert result.returncode == 1 and "E501" in result.stdout, result.stdout + result.stderr
