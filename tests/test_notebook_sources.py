"""The notebooks' percent-format sources: jupytext reads them as tools/nbbuild.py does, each opens with its
chapter (set-up lives in common.runtime.setup_notebook), and a cell that looks for optional weights names the
fetch command."""

from pathlib import Path

import pytest

from common.grade import load_module

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "tools" / "notebooks").glob("*.py"))
nbbuild = load_module(ROOT / "tools" / "nbbuild.py", "nbbuild")  # a tool, not part of the installed package

MACHINERY = (
    "def ",
    "rcParams",
    "filterwarnings",
    "is_fast()",
    "seed_everything(",
    "describe()",
    "Path.cwd()",
)
OPTIONAL = {"sd15_path(": "fetch sd15", "lpips_backbone_available(": "fetch lpips"}


def code_cells(path: Path) -> list[str]:
    return [c.source for c in nbbuild.read_source(path).cells if c.cell_type == "code"]


def test_there_are_seven_sources():
    assert len(SOURCES) == 7


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_first_code_cell_is_about_the_chapter(path):
    first = code_cells(path)[0]
    assert "setup_notebook()" in first
    found = [m for m in MACHINERY if m in first]
    assert not found, f"{path.name}'s first code cell does set-up work (setup_notebook's job): {found}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_cells_that_look_for_optional_weights_print_the_fetch_command(path):
    for cell in code_cells(path):
        for probe, command in OPTIONAL.items():
            if probe in cell:
                assert f"python -m common.weights {command}" in cell, f"{path.name}: a cell calls {probe} ..."


def test_read_source_keeps_cells_and_drops_jupytext_metadata(tmp_path):
    src = tmp_path / "x.py"
    src.write_text(
        '# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n# %% tags=["raises-exception"]\n1 / 0\n'
    )
    nb = nbbuild.read_source(src)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]
    assert nb.cells[0].source == "# Title\n\ntext" and nb.cells[1].source == "x = 1"
    assert nb.cells[2].metadata == {"tags": ["raises-exception"]} and "jupytext" not in nb.metadata
