"""What bench/run.py and bench/soak.py share: ports, waiting, RSS, the machine's
description, a gateway config of their own, and their section of a docs/ page."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.configs import (  # noqa: E402
    RESTORE_ROUTE,
    ROLES_LINE,
    principal_yaml,
)
from support.configs import write_gateway_config as support_config  # noqa: E402

RESTORE = "/crm-core/v1/records/bulk/restore"
TRASH = "/crm-core/v1/records/trash"
# Two internal HMAC keys every bench gateway knows (bench/abuse.py floods with one).
HMAC_KEYS = {
    "flood-svc": ("NCSBENCHFLOOD001", "bench-flood-secret-0123456789"),
    "sdk-svc": ("NCSBENCHSDK00001", "bench-sdk-secret-0123456789"),
}
TRASH_ROUTE = f"""\
  - name: records-trash
    method: GET
    path: {TRASH}
    min_role: VIEWER
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 15.0
) -> None:
    """Until ``url`` answers; fail at once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench: {proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not come up")


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    """Until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: port {port} did not open")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"bench: no VmRSS for process {pid}")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Linux {platform.release()}; "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}"
    )


def write_gateway_config(
    folder: Path,
    port: int,
    admin: int,
    upstream_url: str,
    api_key: str,
    token: str,
    *,
    upstream: Mapping[str, Any] | None = None,
) -> Path:
    """A gateway.yaml + policy.yaml in ``folder`` with the restore and trash routes and
    one MEMBER token; the secret file holds a random secret. ``upstream``: more
    ``upstream:`` keys. Written by the tests' one config writer. Returns the
    gateway.yaml path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secret").write_text("bench-secret-" + os.urandom(12).hex() + "\n")
    return support_config(
        folder,
        port=port,
        admin_port=admin,
        upstream_url=upstream_url,
        api_key=api_key,
        secret_file="secret",
        policy=ROLES_LINE
        + "principals:\n"
        + principal_yaml("bench-svc", "MEMBER", token=token)
        + "".join(
            principal_yaml(name, "MEMBER", hmac_key=key, hmac_secret=secret)
            for name, (key, secret) in HMAC_KEYS.items()
        )
        + "routes:\n"
        + RESTORE_ROUTE
        + TRASH_ROUTE,
        settings={"shutdown_grace_s": 2},
        upstream=upstream,
    )


def write_section(doc: Path, name: str, title: str, report: str) -> None:
    """Put ``report`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in
    ``doc``, keeping everything around it (the hand-written analysis)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else f"# {title}\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(f"{head}{begin}\n{report}\n{end}{tail}")
    print(f"{name}: wrote {doc.relative_to(ROOT)}")


def stop_all(procs: list[subprocess.Popen[bytes]], tmp: Path, grace_s: float) -> None:
    """SIGTERM every process still running, kill what outlives ``grace_s``, remove ``tmp``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)
