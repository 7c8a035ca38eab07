"""The house rules of llmux's layout, read from its imports (TYPE_CHECKING and function-level
ones included): no package imports itself back in a circle, the config knows no HTTP, the core
does no I/O, and the edge is handed its fleet instead of building one (server.py assembles)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmux"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each llmux module and the llmux modules it imports anywhere in its text."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    target = full if full in modules else node.module
                    if target in modules:
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_back_through_others():
    assert _cycles(_imports()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_config_knows_no_http_and_the_core_no_runtime():
    graph = _imports()
    assert not {m for m in graph["llmux.config"] if m.startswith("llmux.http")}
    for name, imported in graph.items():
        if name.startswith("llmux.core"):
            outside = {m for m in imported if m.startswith(("llmux.runtime", "llmux.http"))}
            assert not outside, f"{name} imports {outside}"


def test_the_edge_is_handed_its_fleet():
    """(A worker process assembles its own, from a RemoteFleet: workers/worker.py.)"""
    text = (PACKAGE / "http" / "app.py").read_text()
    assert "Fleet(" not in text and "Metrics(" not in text
    assert "llmux.core.costs" not in _imports()["llmux.http.app"]
    assert "Fleet(" in (PACKAGE / "server.py").read_text()
