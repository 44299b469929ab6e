"""The package's modules import each other one way only: no import cycles.

Walks src/llmkit with ``ast`` (no module is imported), builds the graph of
llmkit modules each module imports -- at module level and inside functions --
and asserts the graph has no cycle.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "llmkit"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def module_names(src: Path = SRC) -> dict[str, Path]:
    """Map each dotted module name under ``src`` to its file."""
    names = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                resolved = _resolve(target, modules)
                if resolved and resolved != module:
                    found.add(resolved)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = module_names(src)
    return {m: _imported(m, p, modules) for m, p in modules.items()}


def _is_ancestor_package(a: str, b: str) -> bool:
    """Importing ``a.b.c`` runs ``a/__init__`` first: a package and its own
    submodules are not a cycle worth reporting."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan),
    ignoring package -> own-submodule edges."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def edges(v):
        return [w for w in sorted(graph.get(v, ())) if not _is_ancestor_package(v, w)]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_graph_sees_the_package():
    graph = import_graph()
    assert "llmkit.cli" in graph
    assert "llmkit.config" in graph["llmkit.cli"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_pipeline_runner_starts_without_torch():
    """Module-level imports of the lifecycle pipeline stay light: torch loads only in the stages that train,
    quantize or evaluate (so `llmkit pipeline status` answers at once)."""
    code = "import sys, llmkit.pipeline.run; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


if __name__ == "__main__":
    for component in cycles(import_graph()):
        print(" <-> ".join(component))
