"""The package's import structure: zotune.optim stands alone, and no two parts import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import zotune

SRC = Path(zotune.__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "zotune").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imported(path: Path, known: dict[str, Path]) -> set[str]:
    """zotune modules imported anywhere in ``path``: module level, inside functions, under TYPE_CHECKING."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("zotune"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("zotune"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
    return out


def _part(module: str) -> str:
    """The part of zotune a module belongs to: ``zotune.optim.engine`` -> ``zotune.optim``."""
    return ".".join(module.split(".")[:2])


def part_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = {_part(m) for m in _imported(path, mods) if m in mods or _part(m) in mods}
        graph.setdefault(_part(name), set()).update(d for d in deps if d != _part(name))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return [*stack[stack.index(v) :], v]
            if not state.get(v) and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if not state.get(u) and (found := visit(u)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_between_the_parts_of_zotune():
    """Every import counts (lazy ones inside functions and TYPE_CHECKING ones too)."""
    graph = part_graph()
    assert {"zotune.optim", "zotune.distributed", "zotune.integrations", "zotune.train"} <= set(graph)
    assert "zotune.optim" in graph["zotune.distributed"]  # distributed implements optim's Communicator
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_optim_does_not_load_distributed():
    code = "import sys, zotune.optim; print(sorted(m for m in sys.modules if m.startswith('zotune.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = ast.literal_eval(out)
    assert "zotune.optim.engine" in loaded
    assert not [m for m in loaded if m.startswith("zotune.distributed")], loaded
