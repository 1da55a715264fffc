"""How the modules of gateway/ depend on each other, read from their source (ast).

- No import cycle: no module imports another that (directly or through others)
  imports it back. Every import counts, at module level or inside a function.
- The request's walk reads no environment variable and opens no file: the
  process's start-up code decides such things and hands them down.
- The sandbox, a test double, is imported only by the commands that run it.
- Nothing blocks the event loop: no ``time.sleep`` anywhere in gateway/ (every
  module of it runs on a loop, or may be called from one) but in an explicit
  allow-list, and no blocking client, subprocess or socket call in the modules
  a request passes through.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

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


# --- nothing blocks the event loop -----------------------------------------------------------

# ``time.sleep`` stalls every request of the process. Each place allowed to call it
# anyway, as "module.function", with why; an entry whose call is gone fails too.
SLEEP_ALLOWED: dict[str, str] = {}  # a function allowed to sleep → why (none is)
# The modules a request passes through, and what none of them may call: each
# waits on the network, a child process or a terminal with the loop held.
REQUEST_PATH = (*WALK, "gateway.transport", "gateway.retry", "gateway.upstream", "gateway.admin")
BLOCKING_MODULES = frozenset({"subprocess", "requests", "urllib.request", "http.client", "socket"})
BLOCKING_CALLS = frozenset({"os.system", "os.popen", "os.wait", "os.waitpid", "input"})
# A module of the request path allowed one of them, and why it does not block.
BLOCKING_ALLOWED = {
    ("gateway.protocol", "socket"): "SO_LINGER constants, set on the connection's own socket",
}


def sleeps(name: str, tree: ast.Module) -> Iterator[str]:
    """``module.function`` (or ``module`` at top level) for each ``time.sleep`` call or
    import, however the module or the function was named on import."""
    modules = {"time"} | {
        a.asname for n in ast.walk(tree) if isinstance(n, ast.Import)
        for a in n.names if a.name == "time" and a.asname
    }  # fmt: skip

    def visit(node: ast.AST, where: str) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = f"{name}.{child.name}"
            if (
                isinstance(child, ast.ImportFrom)
                and child.module == "time"
                and any(a.name == "sleep" for a in child.names)
            ):
                yield inner
            if (
                isinstance(child, ast.Attribute)
                and child.attr == "sleep"
                and isinstance(child.value, ast.Name)
                and child.value.id in modules
            ):
                yield inner
            yield from visit(child, inner)

    yield from visit(tree, name)


def test_the_sleep_finder_sees_every_spelling() -> None:
    source = (
        "import time\nimport time as clock\nfrom time import sleep\n"
        "def a():\n    time.sleep(1)\n"
        "async def b():\n    def c():\n        clock.sleep(1)\n"
        "def d():\n    asyncio.sleep(1)\n"
    )
    assert sorted(sleeps("m", ast.parse(source))) == ["m", "m.a", "m.c"]


def test_nothing_in_the_gateway_sleeps_on_the_event_loop() -> None:
    found = {where for name, tree in modules().items() for where in sleeps(name, tree)}
    unexpected = found - set(SLEEP_ALLOWED)
    assert not unexpected, f"time.sleep blocks the event loop: use asyncio.sleep in {unexpected}"
    stale = set(SLEEP_ALLOWED) - found
    assert not stale, f"no longer sleeps: remove {stale} from SLEEP_ALLOWED"


@pytest.mark.parametrize("name", REQUEST_PATH)
def test_the_request_path_makes_no_blocking_call(name: str) -> None:
    tree = modules()[name]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
        else:
            names = set()
        blocking = {n for n in names & BLOCKING_MODULES if (name, n) not in BLOCKING_ALLOWED}
        assert not blocking, f"{name} imports {blocking}"
        if isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            assert called not in BLOCKING_CALLS, f"{name} calls {called}"


def test_only_the_commands_that_run_the_sandbox_import_it() -> None:
    users = {
        name
        for name, targets in import_graph().items()
        if not name.startswith("gateway.sandbox")
        and any(t == "gateway.sandbox" or t.startswith("gateway.sandbox.") for t in targets)
    }
    assert users == {"gateway.cli", "gateway.demo"}


def test_a_plain_gateway_loads_no_tls_redis_or_tracing_library() -> None:
    """Each costs a worker megabytes (cryptography alone about 7 MiB): loaded only by
    a config that uses it (tls:, state.backend: redis, tracing:)."""
    script = (
        "import sys\n"
        "from gateway import cli, config, service, supervisor\n"
        "config.load('config/demo/gateway.yaml')\n"
        "print(sorted(m for m in ('cryptography', 'redis', 'opentelemetry') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
