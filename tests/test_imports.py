"""The modules of ``common/`` import one way: no cycle, and no import hidden inside a function to dodge one.

The graph counts every ``common.*`` import, at module level and inside functions, so a cycle cannot hide in a
function body; a function-local ``from common...`` import is allowed only where it is listed below with its
reason.
"""

import ast
from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "common"
# (module, imported module): why the import waits until the function runs
LOCAL_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}


def common_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported common module, inside a function?) for every import of ``common.*`` in ``path``."""
    tree = ast.parse(path.read_text())
    local = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "common":  # from common import cli, viz
                found += [(f"common.{a.name}", id(node) in local) for a in node.names]
            elif node.module.startswith("common."):
                found.append((node.module, id(node) in local))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in local) for a in node.names if a.name.startswith("common.")]
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {f"common.{p.stem}": p for p in COMMON.glob("*.py") if p.stem != "__init__"}
    return {
        name: {target for target, _ in common_imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: depth-first search with white / grey / black marks."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "grey":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "black"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_common_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in common/: " + " -> ".join(cycle)


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_function_local_common_import_without_a_reason():
    hidden = [
        f"common/{p.name}: {target}"
        for p in sorted(COMMON.glob("*.py"))
        for target, in_function in common_imports(p)
        if in_function and (f"common.{p.stem}", target) not in LOCAL_IMPORTS_ALLOWED
    ]
    assert not hidden, f"function-local imports of common modules (move them to the file's top): {hidden}"


def test_the_pipeline_modules_import_one_way():
    graph = import_graph()
    assert "common.pipeline_io" in graph["common.pipeline"]
    assert "common.single_file" in graph["common.pipeline_io"]
    assert "common.weights" in graph["common.single_file"]
    for low, high in [
        ("common.weights", "common.single_file"),
        ("common.single_file", "common.pipeline_io"),
        ("common.pipeline_io", "common.pipeline"),
        ("common.unet", "common.convert"),
    ]:
        assert high not in graph[low], f"{low} imports {high}, which sits above it"
