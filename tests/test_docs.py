"""README.md and docs/: every pasteable block runs, every page and link can be found.

The conventions (docs/development.md, "Docs whose commands are run"):

- ```sh blocks run with ``bash -euo pipefail`` and must exit 0; ```console blocks
  run each ``$ `` line and must print exactly the lines that follow it; ```python
  blocks run with this interpreter. All of them run against one demo started on
  free ports (and its log file), from a scratch folder holding the
  repository's ``config/``, ``deploy/`` and ``.venv/``.
- An HTML comment right before a block: ``<!-- not run: why -->``,
  ``<!-- expect: TEXT -->`` (repeatable), ``<!-- env: NAME=VALUE ... -->``,
  ``<!-- needs: TOOL ... -->`` (system tools: the block is left out where one is
  missing, except in CI, which installs them).

And: every fence names its language; every docs page is linked from README.md or
docs/README.md; every relative link leads to a file, and to a heading that exists;
the README's Layout names every module of gateway/ and nothing else.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import Proc, cli, demo_config, free_port, http_request

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
RUNNABLE = ("sh", "console", "python")
# The demo's addresses as the docs write them; a block gets the test demo's instead.
DEMO_PORTS = {"8080": "listen", "9090": "admin", "8089": "upstream"}
DEMO_LOG = "/tmp/solapi-gateway-demo.log"  # likewise its log file
BLOCK_TIMEOUT_S = 60

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
_DIRECTIVE = re.compile(
    r"^\s*<!--\s*(?P<name>not run|expect|env|needs|walkthrough)\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$"
)


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    run: bool = True
    why_not: str = ""
    expect: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)  # system tools (.ci/run installs them)

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, with the directives written right before each."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, start = fence["indent"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        assert i < len(lines), f"{page}:{start + 1}: a fence that is never closed"
        block = Block(page, start + 1, fence["lang"], "\n".join(body) + "\n")
        j = start - 1
        while j >= 0 and (directive := _DIRECTIVE.match(lines[j])):
            name, arg = directive["name"], directive["arg"] or ""
            if name == "not run":
                block.run, block.why_not = False, arg
            elif name == "expect":
                block.expect.append(arg)
            elif name == "env":
                block.env.update(pair.split("=", 1) for pair in shlex.split(arg))
            elif name == "needs":
                block.needs += arg.split()
            j -= 1
        found.append(block)
        i += 1
    return found


def all_blocks() -> Iterator[Block]:
    for page in PAGES:
        yield from blocks(page)


# --- the blocks run ---------------------------------------------------------------------


@dataclass
class Demo:
    ports: dict[str, int]
    proc: Proc
    log: Path

    def localise(self, text: str) -> str:
        for port, name in DEMO_PORTS.items():
            text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{self.ports[name]}")
        return text.replace(DEMO_LOG, str(self.log))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    home = tmp_path_factory.mktemp("docs-demo")
    ports = {name: free_port() for name in DEMO_PORTS.values()}
    while len(set(ports.values())) < len(ports):
        ports = {name: free_port() for name in DEMO_PORTS.values()}
    config = demo_config(home, ports["listen"], ports["admin"], ports["upstream"])
    log = home / "demo.log"
    command = [cli(), "demo", "--config", str(config), "--log-file", str(log)]
    proc = Proc("demo", command, home / "demo.stderr")
    proc.wait_ready(lambda: http_request("GET", ports["admin"], "/readyz")[0] == 200)
    yield Demo(ports, proc, log)
    proc.kill()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A folder that looks like the repository to a pasted command, but is not it."""
    for name in ("config", "deploy", ".venv"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def run_block(block: Block, demo: Demo, cwd: Path) -> str:
    """Run one block; return what it printed (stdout and stderr)."""
    env = {**os.environ, **{k: demo.localise(v) for k, v in block.env.items()}}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    text = demo.localise(block.text)
    if block.lang == "console":
        return run_console(block, text, env, cwd)
    command = ["bash", "-euo", "pipefail", "-c", text]
    if block.lang == "python":
        command = [sys.executable, "-c", text]
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{output}"
    return output


def run_console(block: Block, text: str, env: dict[str, str], cwd: Path) -> str:
    """Each ``$ `` command (with its continuation lines) and the output it must print."""
    steps: list[tuple[str, list[str]]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command += "\n" + next(lines)
            steps.append((command, []))
        else:
            assert steps, f"{block}: output before the first $ line"
            steps[-1][1].append(line)
    printed = []
    for command, expected in steps:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
        )  # fmt: skip
        assert done.stdout.splitlines() == expected, f"{block}: {command}\n{done.stderr}"
        printed.append(done.stdout)
    return "".join(printed)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if any(b.run and b.lang in RUNNABLE for b in blocks(p))],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_every_pasteable_block_runs(page: Path, demo: Demo, scratch: Path) -> None:
    for block in blocks(page):
        if not block.run or block.lang not in RUNNABLE:
            continue
        missing = [tool for tool in block.needs if shutil.which(tool) is None]
        if missing and not os.environ.get("CI"):  # CI installs them: there it fails below
            continue
        output = run_block(block, demo, scratch)
        for wanted in block.expect:
            assert wanted in output, f"{block}: {wanted!r} not in:\n{output}"


def test_every_fence_names_its_language_and_skipped_ones_say_why() -> None:
    for block in all_blocks():
        assert block.lang, f"{block}: name the block's language (sh, console, yaml, text...)"
        if not block.run:
            assert block.why_not, f"{block}: <!-- not run: ... --> must say why"


def test_the_first_block_of_the_readme_is_the_two_commands() -> None:
    first = blocks(REPO / "README.md")[0]
    commands = [line.split("#")[0].strip() for line in first.text.splitlines()]
    assert commands == ["make run", "make test"]


# --- pages and links ----------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)  # no headings in code
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    return _LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_somewhere(page: Path) -> None:
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {path}"


def test_every_docs_page_is_linked_from_the_readme_or_the_index() -> None:
    linked = set()
    for page in (REPO / "README.md", REPO / "docs" / "README.md"):
        for target in links(page):
            linked.add((page.parent / target.partition("#")[0]).resolve())
    for page in (REPO / "docs").glob("*.md"):
        if page.name != "README.md":
            assert page.resolve() in linked, f"docs/{page.name} is linked from neither index"
    assert (REPO / "docs" / "README.md").resolve() in linked
    assert {REPO / "CHANGELOG.md", REPO / "THREAT_MODEL.md"} <= linked


def test_the_layout_names_every_module_and_only_those() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout") :]
    section = section[: section.index("\n## ")]
    listed = set(re.findall(r"^\| `([\w/.]+)` \|", section, re.M))
    modules = {p.name for p in (REPO / "gateway").glob("*.py")} | {"sandbox/"}
    assert listed == modules, (modules - listed, listed - modules)


def test_every_test_the_threat_model_names_exists() -> None:
    """THREAT_MODEL.md proves each defence by naming tests: a renamed one must not
    leave its defence unproven."""
    text = (REPO / "THREAT_MODEL.md").read_text()
    named = set(re.findall(r"(test_[a-z0-9_]+\.py)::([A-Za-z0-9_]+)", text))
    assert named, "THREAT_MODEL.md names no test"
    missing = [
        f"{file}::{name}"
        for file, name in sorted(named)
        if not (REPO / "tests" / file).exists()
        or f"def {name}(" not in (REPO / "tests" / file).read_text()
    ]
    assert not missing, missing
