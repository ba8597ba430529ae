"""A notebook may call the learner's exercise, never show its answer: no run of six lines of any function in a
chapter's ``solutions.py`` appears in any notebook (nor in the notebooks' percent-format sources)."""

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = 6  # this many consecutive lines of a solution, found in a notebook, give the answer away
CHAPTERS = sorted(
    p for p in ROOT.iterdir() if p.is_dir() and p.name[:2].isdigit() and (p / "solutions.py").exists()
)


def _normalise(lines):
    """Code lines without indentation, blank lines or comments: copying is caught
    however it was re-indented."""
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(" ".join(line.split()))
    return out


def solution_bodies(path: Path) -> dict:
    """{function name: its normalised body lines} for every function in a solutions file, nested ones too."""
    source = path.read_text()
    lines = source.splitlines()
    bodies = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            start = (
                first.end_lineno
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                else first.lineno - 1
            )
            bodies[node.name] = _normalise(lines[start : node.end_lineno])
    return bodies


def notebook_cells(path: Path) -> list:
    """Normalised code lines of each code cell of a notebook (.ipynb) or percent-format source (.py)."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        return [_normalise("".join(c["source"]).splitlines()) for c in cells if c["cell_type"] == "code"]
    chunks, current, code = [], [], False
    for line in path.read_text().splitlines():
        if line.startswith("# %%"):
            if code:
                chunks.append(_normalise(current))
            current, code = [], "[markdown]" not in line
        else:
            current.append(line)
    if code:
        chunks.append(_normalise(current))
    return chunks


def shared_runs(body: list, cells: list, run: int = RUN) -> list:
    """The runs of ``run`` consecutive body lines that occur, consecutively, in one of the cells."""
    windows = {tuple(body[i : i + run]) for i in range(len(body) - run + 1)}
    found = []
    for cell in cells:
        for i in range(len(cell) - run + 1):
            if tuple(cell[i : i + run]) in windows:
                found.append(cell[i : i + run])
    return found


NOTEBOOKS = sorted(ROOT.glob("[0-9][0-9]_*/*.ipynb")) + sorted((ROOT / "tools" / "notebooks").glob("*.py"))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name[:2])
def test_no_notebook_shows_a_solution(chapter):
    bodies = solution_bodies(chapter / "solutions.py")
    leaks = []
    for nb in NOTEBOOKS:
        cells = notebook_cells(nb)
        for name, body in bodies.items():
            for run in shared_runs(body, cells):
                leaks.append(
                    f"{nb.relative_to(ROOT)} shows {chapter.name}/solutions.py:{name}: {run[0]!r} ..."
                )
    assert not leaks, "a notebook gives an exercise's answer away:\n" + "\n".join(sorted(set(leaks)))


def test_the_leak_detector_finds_a_copied_body(tmp_path):
    sol = tmp_path / "solutions.py"
    sol.write_text(
        'def f(x):\n    """Doc."""\n    a = x + 1\n    b = a * 2\n    # why\n    c = b - 3\n'
        "    d = c / 4\n    e = d ** 2\n    g = e + a\n    return g\n"
    )
    nb = tmp_path / "n.py"
    nb.write_text(
        "# %% [markdown]\n# a = x + 1\n# %%\nx = 1\na = x + 1\nb = a * 2\nc = b - 3\nd = c / 4\n"
        "e = d ** 2\n  g = e + a\n"
    )
    body = solution_bodies(sol)["f"]
    assert len(shared_runs(body, notebook_cells(nb))) == 1
    nb.write_text("# %%\na = x + 1\nb = a * 2\nc = b - 3\nd = c / 4\ne = d ** 2\nprint(e)\n")
    assert shared_runs(body, notebook_cells(nb)) == []
