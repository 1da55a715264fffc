"""How the modules of gateway/ depend on each other, read from their source (ast).

- No import cycle: no module imports another that (directly or through others)
  imports it back. Every import counts, at module level or inside a function.
- The request's walk reads no environment variable and opens no file: the
  process's start-up code decides such things and hands them down.
- The sandbox, a test double, is imported only by the commands that run it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "gateway"
# The modules a request passes through, from the handler down.
WALK = (
    "gateway.server", "gateway.walk", "gateway.target", "gateway.identity", "gateway.policy",
    "gateway.batch", "gateway.signing", "gateway.headers", "gateway.errors", "gateway.protocol",
    "gateway.relay",
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def imported(name: str, tree: ast.Module, known: set[str]) -> Iterator[str]:
    """The gateway modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = (name if _is_package(name) else name.rpartition(".")[0]).split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..y import z
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    yield f"{base}.{alias.name}"
                elif base in known:
                    yield base


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: set(imported(name, tree, known)) - {name} for name, tree in trees.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_direct_and_indirect_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "gateway.supervisor" in graph["gateway.cli"]  # from gateway import supervisor
    assert "gateway.config" in graph["gateway.service"]  # from gateway.config import Settings
    assert "gateway.sandbox.records" in graph["gateway.sandbox.app"]
    assert "gateway.sandbox.app" in graph["gateway.sandbox"]  # the package's __init__


def test_no_module_imports_another_that_imports_it_back() -> None:
    assert cycles(import_graph()) == []


def test_service_and_supervisor_know_nothing_of_each_other() -> None:
    graph = import_graph()
    assert "gateway.supervisor" not in graph["gateway.service"]
    assert "gateway.service" not in graph["gateway.supervisor"]


@pytest.mark.parametrize("name", WALK)
def test_the_walk_reads_no_environment_and_opens_no_file(name: str) -> None:
    tree = modules()[name]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in {"environ", "getenv", "environb"}, (
                f"{name} reads the environment"
            )
        if isinstance(node, ast.Name):
            assert node.id not in {"open", "getenv", "environ"}, f"{name} uses {node.id}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = {a.name for a in node.names} | {getattr(node, "module", None) or ""}
            assert not names & {"sqlite3", "tempfile", "gateway.replay"}, f"{name}: {names}"


def test_only_the_commands_that_run_the_sandbox_import_it() -> None:
    users = {
        name
        for name, targets in import_graph().items()
        if not name.startswith("gateway.sandbox")
        and any(t == "gateway.sandbox" or t.startswith("gateway.sandbox.") for t in targets)
    }
    assert users == {"gateway.cli", "gateway.demo"}
