"""``solapi-gateway demo``: the one-command demo, on a copy of config/demo at free ports,
with the curl lines it prints read as they come."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .configs import demo_config
from .procs import START_TIMEOUT_S, Proc, cli, free_ports, stderr_file


@dataclass
class DemoProc:
    proc: Proc
    port: int
    admin_port: int
    upstream_port: int
    stdout: queue.Queue[str | None]

    def curl_lines(self, timeout_s: float = START_TIMEOUT_S) -> list[str]:
        """The curl lines the demo prints once it is ready (a blank line ends them)."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.stdout.get(timeout=left)
            except queue.Empty:
                break
            if line is None:  # stdout closed: the demo exited
                break
            if line.startswith("curl "):
                lines.append(line)
            elif lines and not line.strip():
                return lines
        pytest.fail(
            f"the demo printed no complete list of curl lines (got {lines}):\n"
            f"{self.proc.stderr_text()}"
        )


def launch_demo(workdir: Path) -> DemoProc:
    """``solapi-gateway demo`` on a copy of config/demo at free ports; not waited for
    (``curl_lines()`` does that), its stdout read line by line as it comes."""
    port, admin_port, upstream_port = free_ports(3)
    config = demo_config(workdir, port, admin_port, upstream_port)
    args = [cli(), "demo", "--config", str(config)]
    proc = Proc("demo", args, stderr_file(workdir, "demo"), stdout=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.popen.stdout is not None
        for line in proc.popen.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return DemoProc(proc, port, admin_port, upstream_port, lines)
