"""The release: ``make dist``'s wheel, installed into a fresh virtual environment, works.

The wheel is built as ``make dist`` builds it (``python -m build``), installed
with the pinned lock as constraints from pip's configured indexes (so it works
offline wherever those are local) into an environment that has nothing else,
and then used as a newcomer would: the
version, ``check-config`` on the demo config, and the demo's first request.
Nothing of the repository's own ``.venv`` is on that environment's path.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support import Proc, demo_config, free_port, http_request

from gateway import __version__

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 300


def run(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done


def test_the_version_is_one_and_dated_in_the_changelog() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
    changelog = (REPO / "CHANGELOG.md").read_text()
    first = re.search(r"^## (\S+) — (\S+)$", changelog, re.M)
    assert first is not None, "the newest CHANGELOG section names its version and date"
    assert first.group(1) == __version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", first.group(2)), first.group(2)


def test_make_dist_builds_with_python_m_build() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("\ndist:") :].split("\n\n")[0]
    assert "-m build --outdir dist" in recipe
    test_extra = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert any(
        r.startswith("build") for r in test_extra["project"]["optional-dependencies"]["test"]
    )
    assert re.search(r"^build==", (REPO / "requirements.lock").read_text(), re.M)


@pytest.mark.e2e
def test_the_built_wheel_installs_and_runs_the_demo(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, REPO)
    (wheel,) = dist.glob(f"solapi_gateway-{__version__}-py3-none-any.whl")
    assert len(list(dist.glob(f"solapi_gateway-{__version__}.tar.gz"))) == 1

    venv = tmp_path / "venv"
    # Without a pip of its own (this one installs into it: seconds instead of a minute).
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q"]
    run(*pip, "--disable-pip-version-check", "-c", REPO / "requirements.lock", wheel)
    script = venv / "bin" / "solapi-gateway"

    home = tmp_path / "home"  # not the repository: nothing of it is on the path
    home.mkdir()
    assert run(script, "--version", cwd=home).stdout == f"solapi-gateway {__version__}\n"
    where = run(venv / "bin" / "python", "-c", "import gateway; print(gateway.__file__)", cwd=home)
    assert where.stdout.startswith(str(venv))

    ports = [free_port() for _ in range(3)]
    while len(set(ports)) < 3:
        ports = [free_port() for _ in range(3)]
    config = demo_config(home, *ports)
    checked = run(script, "check-config", "--config", config, cwd=home)
    assert checked.stdout.splitlines()[0] == f"{config}: OK"

    command = [str(script), "demo", "--config", str(config), "--log-file", str(home / "demo.log")]
    demo = Proc("installed demo", command, home / "demo.stderr", stdout=True)
    try:
        demo.wait_ready(lambda: http_request("GET", ports[1], "/readyz")[0] == 200)
        assert demo.popen.stdout is not None
        first = next(line for line in demo.popen.stdout if line.startswith("curl "))
        answer = subprocess.run(shlex.split(first), capture_output=True, text=True, timeout=30)
        head, _, body = answer.stdout.partition("\n\n")  # text mode: \r\n read as \n
        assert head.startswith("HTTP/1.1 200"), answer.stdout + answer.stderr
        assert {r["result"] for r in json.loads(body)["results"]} == {"restored"}
    finally:
        demo.kill()
