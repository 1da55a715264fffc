"""``solapi-gateway demo`` as a newcomer meets it: the curl lines stay true and stay in view."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from support import Proc, cli, demo_config, free_port, http_request

from gateway.config import load
from gateway.demo import curl_lines


def test_the_first_curl_line_says_what_pasting_it_twice_gives() -> None:
    settings = load("config/demo/gateway.yaml")
    comment, command = curl_lines(settings)[:2]
    assert "→ 200" in comment and "pasted again" in comment and "notDeleted" in comment
    assert command.startswith("curl ")


@pytest.mark.e2e
def test_log_lines_go_to_the_file_so_the_curl_lines_stay_in_view(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    while len(set(ports)) < 3:
        ports = [free_port() for _ in range(3)]
    config = demo_config(tmp_path, *ports)
    log_file = tmp_path / "demo.log"
    args = [cli(), "demo", "--config", str(config), "--log-file", str(log_file)]
    proc = Proc("demo", args, tmp_path / "demo.stderr", stdout=True)
    printed: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.popen.stdout is not None
        for line in proc.popen.stdout:
            printed.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        proc.wait_ready(lambda: http_request("GET", ports[1], "/readyz")[0] == 200)
        lines: list[str] = []
        while not (lines and lines[-1] == "" and any(x.startswith("curl ") for x in lines)):
            lines.append(printed.get(timeout=15))
        assert f"Log lines go to {log_file}" in "\n".join(lines)
        first = next(line for line in lines if line.startswith("curl "))

        answers = [
            subprocess.run(["bash", "-c", first], capture_output=True, text=True, timeout=15)
            for _ in range(2)
        ]
        bodies = [json.loads(a.stdout.partition("\n\n")[2]) for a in answers]
        assert all(a.stdout.startswith("HTTP/1.1 200") for a in answers)
        assert [r["result"] for r in bodies[0]["results"]] == ["restored", "restored"]
        assert [r["result"] for r in bodies[1]["results"]] == ["notDeleted", "notDeleted"]

        assert proc.stop(signal.SIGINT) == 0
    finally:
        proc.kill()
    terminal = [json.loads(line)["event"] for line in proc.stderr_text().splitlines()]
    assert "access" not in terminal  # nothing scrolled the curl lines away
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [e["status"] for e in logged if e["event"] == "access"] == [200, 200]
    assert "stopped" in [e["event"] for e in logged]
