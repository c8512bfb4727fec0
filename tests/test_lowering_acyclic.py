"""No import cycle inside lowering/, function-local imports included (a local import hides a cycle
from import time, not from the reader): issue 26."""
import ast
from pathlib import Path

LOWERING = Path(__file__).resolve().parents[1] / "lowering"


def imports(path: Path) -> set[str]:
    """The lowering modules `path` imports (`from . import x`, `from .x import y`, anywhere in it)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_no_import_cycle_in_lowering():
    graph = {p.stem: imports(p) for p in LOWERING.glob("*.py")}
    assert graph["triton_formats"] and "ops" not in graph["triton_formats"]

    def cycle(node, path):
        if node in path:
            return path[path.index(node):] + [node]
        for nxt in sorted(graph.get(node, ())):
            found = cycle(nxt, path + [node])
            if found:
                return found
        return None
    for module in sorted(graph):
        assert cycle(module, []) is None, " -> ".join(cycle(module, []))
