"""Grade a chapter's exercises: ``python -m common.grade 03`` (or ``--file my_exercises.py``).

Each chapter folder holds three files with the same exercise names:

* ``exercises.py``: the stubs the learner fills in (each raises ``NotImplementedError`` until solved);
* ``solutions.py``: the reference solutions, same signatures;
* ``checks.py``: ``CHECKS``, an ordered list of ``(exercise_name, check_function)``; a check takes the loaded
  module (the learner's file or the solutions), calls the exercise and raises ``AssertionError`` with a
  message that says what was expected when the answer is wrong.

The report has one line per exercise: passed, failed (with why), error (an exception, with its message, or a
time limit passed), or not yet attempted (the stub's ``NotImplementedError``). The checks run in a worker
process, so an exercise that loops forever, calls ``sys.exit`` or kills its process is reported, not obeyed.
The exit status is 0 only when all pass, 1 otherwise, 2 for a bad command line (no such chapter or file).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from common import cli

ROOT = Path(__file__).resolve().parents[1]

PASSED, FAILED, ERROR, TODO = "passed", "failed", "error", "not yet attempted"
DEFAULT_TIMEOUT = 600.0  # seconds per exercise: the slowest reference solution takes well under a minute
LOAD_TIMEOUT = 120.0  # extra seconds for the worker to import the checks and the learner's file


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
    found = sorted(
        p for p in ROOT.iterdir() if p.is_dir() and p.name[:2].isdigit() and p.name.startswith(prefix)
    )
    if len(found) != 1:
        names = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name[:2].isdigit())
        raise ValueError(f"no single chapter matches {chapter!r}; chapters are {names}")
    return found[0]


def load_module(path: str | Path, name: str | None = None) -> ModuleType:
    """Import a Python file by path (chapter folders start with a digit, so they cannot
    be imported by name)."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    name = name or f"_course_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def yours_or_reference(exercises: ModuleType, solutions: ModuleType, name: str, try_it):
    """``exercises.<name>`` once ``try_it`` runs it without NotImplementedError, else ``solutions.<name>``: a
    notebook then uses your solution when you have one, and the reference (never shown) until then."""
    try:
        try_it(getattr(exercises, name))
    except NotImplementedError:
        print(f"{name}: exercise not solved yet, so the notebook uses the reference in solutions.py")
        return getattr(solutions, name)
    print(f"{name}: using yours from exercises.py")
    return getattr(exercises, name)


def grade(
    chapter: str,
    file: str | Path | None = None,
    only: list[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Result]:
    """Run the chapter's checks on ``file`` (default: the chapter's ``exercises.py``).

    The checks run in a worker process, one after the other: an exercise that loops is stopped after
    ``timeout`` seconds and reported as timed out, one that calls ``sys.exit`` or ends its process is reported
    as failed, and the checks after it still run (in a fresh worker).
    """
    folder = chapter_dir(chapter)
    target = Path(file) if file is not None else folder / "exercises.py"
    if not target.is_file():
        raise FileNotFoundError(f"--file {target} does not exist; give the path of your exercises file")
    names = [name for name, _ in _load_checks(folder / "checks.py")]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(
            f"no exercise named {', '.join(unknown)} in chapter {folder.name}; "
            f"the exercises are {', '.join(names)}"
        )
    todo = [n for n in names if not only or n in only]
    results: list[Result] = []
    while todo:  # a worker stops at an exercise that hangs or exits; a fresh one grades the rest
        done = _grade_in_worker(folder / "checks.py", target, todo, timeout)
        results += done
        todo = todo[len(done) :]
    return results


def _load_checks(checks_path: Path) -> list[tuple[str, object]]:
    return load_module(checks_path).CHECKS


def _start_method() -> str:
    """How the worker starts: forked from a clean server process that has imported torch and run nothing
    (``forkserver``), so a worker starts in milliseconds. Forking this process itself would be faster still
    but can deadlock: once torch has run a parallel op here, the child inherits OpenMP's locks and hangs at
    its first convolution. ``spawn`` where no forkserver exists (Windows)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return "forkserver"
    return "spawn"


def _grade_in_worker(checks_path: Path, target: Path, names: list[str], timeout: float) -> list[Result]:
    """Grade ``names`` in one worker process until they are done or one of them stops the worker; returns the
    results so far (the one that stopped it included)."""
    ctx = multiprocessing.get_context(_start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["torch"])  # imported once, in the server; no thread has run there
    receive, send = ctx.Pipe(duplex=False)
    setting = (
        dict(os.environ),
        os.getcwd(),
    )  # the worker sees this process's environment now, not the server's
    worker = ctx.Process(
        target=_worker, args=(str(checks_path), str(target), names, send, setting), daemon=True
    )
    worker.start()
    send.close()
    results: list[Result] = []
    try:
        for name in names:
            t0 = time.perf_counter()
            if not receive.poll(timeout + (LOAD_TIMEOUT if not results else 0)):
                if worker.is_alive():
                    results.append(
                        Result(
                            name,
                            ERROR,
                            f"timed out after {timeout:g} s (an endless loop? --timeout sets the limit)",
                            time.perf_counter() - t0,
                        )
                    )
                else:
                    worker.join()
                    results.append(
                        Result(
                            name,
                            ERROR,
                            f"the exercise ended the grader's process (exit status "
                            f"{worker.exitcode}); an exercise must return or raise",
                            time.perf_counter() - t0,
                        )
                    )
                return results
            try:
                results.append(receive.recv())
            except EOFError:  # the worker died between two checks
                worker.join()
                results.append(
                    Result(
                        name,
                        ERROR,
                        f"the exercise ended the grader's process (exit status "
                        f"{worker.exitcode}); an exercise must return or raise",
                    )
                )
                return results
        return results
    finally:
        if worker.is_alive():
            worker.kill()
        worker.join()
        receive.close()


def _worker(checks_path: str, target_path: str, names: list[str], send, setting=None) -> None:
    """In the worker process: load the checks and the file, run the named checks, send one Result each."""
    if setting is not None:
        env, cwd = setting
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        os.chdir(cwd)
    os.environ.setdefault("COURSE_GRADING", "1")
    try:
        checks = dict(_load_checks(Path(checks_path)))
        target = load_module(target_path)
    except BaseException as e:  # the file does not import: every exercise reports it
        detail = f"{Path(target_path).name} does not import: {_describe(e)}"
        for name in names:
            send.send(Result(name, ERROR, detail))
        return
    for name in names:
        send.send(_run_check(name, checks[name], target))
    send.close()


def _describe(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r}){where}; an exercise must return its answer, not exit"
    if isinstance(e, KeyboardInterrupt):
        return f"raised KeyboardInterrupt{where}"
    return f"{type(e).__name__}: {e}{where}"


def _run_check(name: str, check, target: ModuleType) -> Result:
    t0 = time.perf_counter()
    try:
        check(target)
        res = Result(name, PASSED)
    except NotImplementedError:
        res = Result(name, TODO, "the stub still raises NotImplementedError")
    except AssertionError as e:
        res = Result(name, FAILED, str(e) or "an assertion failed")
    except (
        SystemExit,
        KeyboardInterrupt,
    ) as e:  # the exercise's, not the grader's: a failure of that exercise
        res = Result(name, FAILED, _describe(e))
    except Exception as e:  # a crash in the learner's code is a result, not a crash of the grader
        res = Result(name, ERROR, _describe(e))
    res.seconds = time.perf_counter() - t0
    return res


def report(results: list[Result]) -> str:
    marks = {PASSED: "PASS", FAILED: "FAIL", ERROR: "ERR ", TODO: "TODO"}
    width = max((len(r.name) for r in results), default=10)
    lines = [f"{marks[r.status]}  {r.name:<{width}}  {r.seconds:5.1f}s  {r.detail}".rstrip() for r in results]
    n_pass = sum(r.status == PASSED for r in results)
    lines.append(f"{n_pass}/{len(results)} exercises passed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m common.grade", description=__doc__.split("\n\n")[0])
    p.add_argument("chapter", help="chapter number, e.g. 03")
    p.add_argument("--file", help="the file to grade (default: the chapter's exercises.py)")
    p.add_argument("--only", nargs="+", help="grade only these exercises")
    p.add_argument(
        "--timeout",
        type=cli.positive_float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds an exercise may take before it is stopped (default {DEFAULT_TIMEOUT:g})",
    )
    args = p.parse_args(argv)
    results = grade(args.chapter, args.file, args.only, timeout=args.timeout)
    print(report(results))
    return 0 if results and all(r.status == PASSED for r in results) else 1


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="python -m common.grade"))
