"""What every course command shares: one-line errors, checked arguments, and writes that never lose a file.

A user error (a bad flag value, a missing file, a folder that cannot be written) ends a command with one line
on stderr that says what is wrong and how to fix it, and exit status 2; a traceback means a bug in the course.

    def main(argv=None):
        p = cli.ArgumentParser(description=...)              # argparse, but its errors are one line
        p.add_argument("--steps", type=cli.positive_int)     # 0, -3 or "many" are refused at parse time
        ...
        raise cli.UsageError("--mask needs --init-image")   # any later user error

    if __name__ == "__main__":
        sys.exit(cli.run(main))                              # UsageError & co -> "prog: error: ..." + exit 2

Files. ``atomic_write`` writes through a temporary file in the same folder and renames it into place, so a
kill never leaves half a file under the real name. ``ship`` writes a model folder: it refuses a non-empty
folder the course did not write (unless ``overwrite``), keeps every file it did not write, and replaces only
the files listed in the folder's manifest (``.course_manifest``), which it writes last. Shipping into
``checkpoints/`` is refused under ``COURSE_FAST=1``: a seconds-long run never replaces a shipped model.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from common.runtime import is_fast

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
MANIFEST = ".course_manifest"  # no .json suffix: model cards list a folder's .json files, and this is not one


class UsageError(Exception):
    """A mistake in how a command was called: reported as one line and exit status 2, never a traceback."""


# the exceptions a user's input causes; the library raises ValueError naming the allowed values
USER_ERRORS = (
    UsageError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
# OS errors that name a file are about the user's paths
# (a read-only folder, a full disk), not the course's code
USER_OS_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
    errno.EDQUOT,
}


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def run(main: Callable, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Call ``main(argv)``; a user error becomes ``prog: error: <one line>`` on stderr and exit status 2.

    ``COURSE_DEBUG=1`` re-raises instead, to see the traceback. ``main`` may return an int (the exit status)
    or anything else (0).
    """
    prog = prog or Path(sys.argv[0]).name
    try:
        result = main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # sys.exit("message"): a message is an error; a number is a status
        if isinstance(e.code, str):
            print(f"{prog}: error: {one_line(e.code)}", file=sys.stderr)
            return 2
        return e.code or 0  # argparse's own exits: 0 after --help, 2 after its one-line error
    except Exception as e:
        if os.environ.get("COURSE_DEBUG") or not is_user_error(e):
            raise
        print(f"{prog}: error: {one_line(describe_error(e))}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, USER_ERRORS):
        return True
    return isinstance(e, OSError) and e.errno in USER_OS_ERRNOS and e.filename is not None


def describe_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        hint = {
            errno.EACCES: "pick a path you can write to",
            errno.EPERM: "pick a path you can write to",
            errno.EROFS: "pick a folder on a writable disk",
            errno.ENOSPC: "free some disk space",
            errno.EISDIR: "give a file name, not a folder",
        }.get(e.errno, "check the path")
        return f"{e.filename}: {e.strerror.lower()}; {hint}"
    if isinstance(e, (FileNotFoundError, KeyError)) and e.args:
        return str(e.args[0])
    return str(e)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: argument --steps: expected an integer >= 1, got '0' (see
    --help)`` and exit status 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


# ----------------------------------------------------------------------------------------- argument types
def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _at_least(kind: type, low: float, strict: bool = False) -> Callable[[str], int | float]:
    def parse(text: str):
        value = _number(kind, text)
        if value < low or (strict and value == low):
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(
                f"expected {what} {'>' if strict else '>='} {low:g}, got {text!r}"
            )
        return value

    parse.__name__ = (
        f"{kind.__name__} {'>' if strict else '>='} {low:g}"  # what argparse names in its messages
    )
    return parse


positive_int = _at_least(int, 1)
nonnegative_int = _at_least(int, 0)
positive_float = _at_least(float, 0.0, strict=True)
nonnegative_float = _at_least(float, 0.0)


def finite_float(text: str) -> float:
    return _number(float, text)


def fraction(text: str) -> float:
    """A number in [0, 1] (a probability, an img2img strength)."""
    value = _number(float, text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


# ----------------------------------------------------------------------------------------- paths
def writable_dir(path: str | Path, what: str = "--out") -> Path:
    """Create ``path`` (and its parents) if needed and check that a file can be written there; a UsageError
    naming ``what`` otherwise. Call it before the expensive work, so a bad ``--out`` fails in a second."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"{what} {path}: cannot write there ({e.strerror or e}); pick a folder you can write to"
        ) from None
    return path


def output_file(path: str | Path, what: str = "--out", suffixes: tuple[str, ...] | None = None) -> Path:
    """Check an output file's path before the work that fills it: a known suffix, not a folder, a writable
    folder to go in (created if needed)."""
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UsageError(f"{what} {path}: expected a file name ending in {', '.join(suffixes)}")
    if path.is_dir():
        raise UsageError(
            f"{what} {path} is a folder; expected a file name such as "
            f"{path / ('out' + (suffixes or ('',))[0])}"
        )
    writable_dir(path.parent if str(path.parent) else Path("."), f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path} is read-only; pick another file name")
    return path


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes a given path) to ``path`` through a temporary
    file in the same folder, renamed into place; the temporary file never outlives a failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_tmp(folder: Path, pattern: str) -> None:
    """Remove ``folder/pattern`` leftovers (``name.<pid>.tmp``) of processes that are no longer running."""
    for leftover in Path(folder).glob(pattern):
        try:
            pid = int(leftover.name.rsplit(".", 2)[-2].rsplit("-", 1)[-1])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(
                missing_ok=True
            )


# ----------------------------------------------------------------------------------------- shipping
def read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), list) else None


def write_manifest(folder: str | Path, kind: str) -> Path:
    """Record every file now in ``folder`` as the course's ``kind`` ship (for a folder shipped by hand)."""
    folder = Path(folder)
    files = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    return atomic_write(folder / MANIFEST, json.dumps({"kind": kind, "files": files}, indent=1))


def add_to_manifest(folder: str | Path, *files: str) -> Path:
    """List more files (paths relative to ``folder``) in the manifest of a folder the course shipped, so the
    next ship recognises them as the course's (a file written into a shipped folder after it, e.g. a plot)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ValueError(f"{folder} holds no course manifest ({MANIFEST}): it was not shipped by the course")
    manifest["files"] = sorted(set(manifest["files"]) | set(files))
    return atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1))


def in_checkpoints(path: Path) -> bool:
    return Path(path).resolve().is_relative_to(CHECKPOINTS.resolve())


def check_ship(dest: str | Path, kind: str, *, overwrite: bool = False, what: str = "--ship") -> Path:
    """Whether ``dest`` may receive a ``kind`` ship; a UsageError saying why not. Cheap: call it first."""
    dest = Path(dest)
    flag = "--overwrite" if what.startswith("--") else "overwrite=True"
    if is_fast() and in_checkpoints(dest):
        raise UsageError(
            f"{what} {dest}: COURSE_FAST=1 never writes into checkpoints/ (a seconds-long run would "
            "replace a shipped model); unset COURSE_FAST or ship somewhere else"
        )
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{what} {dest} is a file; expected a folder (new or empty)")
    if dest.is_dir() and not overwrite:
        manifest = read_manifest(dest)
        if manifest is not None and manifest.get("kind") != kind:
            raise UsageError(
                f"{what} {dest} holds a {manifest.get('kind')} the course shipped, not a {kind}; ship "
                f"into a new folder, or pass {flag} to replace it (other files are kept)"
            )
        if manifest is None:
            theirs = sorted(p.name for p in dest.iterdir())
            if theirs:
                raise UsageError(
                    f"{what} {dest} is not empty and was not shipped by the course (it holds "
                    f"{', '.join(theirs[:3])}{', ...' if len(theirs) > 3 else ''}); ship into a new or "
                    f"empty folder, or pass {flag} to write over same-named files (the others are kept)"
                )
    writable_dir(dest.parent, f"the folder of {what}")
    return dest


def _relative_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def ship(
    dest: str | Path,
    kind: str,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    what: str = "--ship",
) -> Path:
    """Write a ``kind`` folder (``"pipeline"``, ``"vae"``, ...) to ``dest`` without losing a file.

    ``write(tmp)`` fills an empty temporary folder beside ``dest``; its files then move into ``dest`` one by
    one (each an atomic rename), the files of the previous ship that this one does not write are removed, and
    the manifest naming the files is written last. A file in ``dest`` that no ship listed is never touched.
    """
    dest = check_ship(
        dest, kind, overwrite=overwrite, what=what
    ).resolve()  # "." and ".." get their real names
    parent = dest.parent
    remove_stale_tmp(parent, f".{dest.name}.ship-*.tmp")
    tmp = parent / f".{dest.name}.ship-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        new = _relative_files(tmp)
        old = (read_manifest(dest) or {}).get("files", []) if dest.is_dir() else []
        dest.mkdir(exist_ok=True)
        # listed before the move, so a kill half-way leaves a folder the next ship recognises and finishes
        atomic_write(
            dest / MANIFEST, json.dumps({"kind": kind, "files": sorted(set(old) | set(new))}, indent=1)
        )
        for rel in new:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, dest / rel)
        for rel in sorted(set(old) - set(new)):  # the previous ship's files that this one does not write
            target = dest / rel
            if target.resolve().is_relative_to(dest) and target.is_file():
                target.unlink()
                for folder in target.parents:  # the sub-folders the course made, once empty
                    if folder == dest or not folder.is_relative_to(dest) or any(folder.iterdir()):
                        break
                    folder.rmdir()
        atomic_write(dest / MANIFEST, json.dumps({"kind": kind, "files": new}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
