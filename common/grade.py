"""Grade a chapter's exercises: ``python -m common.grade 03`` (or ``--file my_exercises.py``).

Each chapter folder holds three files with the same exercise names:

* ``exercises.py``: the stubs the learner fills in (each raises ``NotImplementedError`` until solved);
* ``solutions.py``: the reference solutions, same signatures;
* ``checks.py``: ``CHECKS``, an ordered list of ``(exercise_name, check_function)``; a check takes the loaded
  module (the learner's file or the solutions), calls the exercise and raises ``AssertionError`` with a
  message that says what was expected when the answer is wrong.

The report has one line per exercise: passed, failed (with why), error (an exception, with its message),
or not yet attempted (the stub's ``NotImplementedError``). The exit status is 0 only when all pass.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]

PASSED, FAILED, ERROR, TODO = "passed", "failed", "error", "not yet attempted"


@dataclass
class Result:
    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0


def chapter_dir(chapter: str) -> Path:
    """The folder of chapter ``"03"`` (or ``"3"``, or its full name)."""
    chapter = str(chapter)
    prefix = chapter.zfill(2) if chapter.isdigit() else chapter
    found = sorted(p for p in ROOT.iterdir() if p.is_dir() and p.name[:2].isdigit() and p.name.startswith(prefix))
    if len(found) != 1:
        names = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name[:2].isdigit())
        raise ValueError(f"no single chapter matches {chapter!r}; chapters are {names}")
    return found[0]


def load_module(path: str | Path, name: str | None = None) -> ModuleType:
    """Import a Python file by path (chapter folders start with a digit, so they cannot be imported by name)."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    name = name or f"_course_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def grade(chapter: str, file: str | Path | None = None, only: list[str] | None = None) -> list[Result]:
    """Run the chapter's checks on ``file`` (default: the chapter's ``exercises.py``)."""
    folder = chapter_dir(chapter)
    checks = load_module(folder / "checks.py").CHECKS
    target = load_module(file or folder / "exercises.py")
    results = []
    for name, check in checks:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            check(target)
            res = Result(name, PASSED)
        except NotImplementedError:
            res = Result(name, TODO, "the stub still raises NotImplementedError")
        except AssertionError as e:
            res = Result(name, FAILED, str(e) or "an assertion failed")
        except Exception as e:  # a crash in the learner's code is a result, not a crash of the grader
            tb = traceback.extract_tb(e.__traceback__)[-1]
            res = Result(name, ERROR, f"{type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})")
        res.seconds = time.perf_counter() - t0
        results.append(res)
    return results


def report(results: list[Result]) -> str:
    marks = {PASSED: "PASS", FAILED: "FAIL", ERROR: "ERR ", TODO: "TODO"}
    width = max((len(r.name) for r in results), default=10)
    lines = [f"{marks[r.status]}  {r.name:<{width}}  {r.seconds:5.1f}s  {r.detail}".rstrip() for r in results]
    n_pass = sum(r.status == PASSED for r in results)
    lines.append(f"{n_pass}/{len(results)} exercises passed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.grade", description=__doc__.split("\n\n")[0])
    p.add_argument("chapter", help="chapter number, e.g. 03")
    p.add_argument("--file", help="the file to grade (default: the chapter's exercises.py)")
    p.add_argument("--only", nargs="*", help="grade only these exercises")
    args = p.parse_args(argv)
    results = grade(args.chapter, args.file, args.only)
    print(report(results))
    return 0 if results and all(r.status == PASSED for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
