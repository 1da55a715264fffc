"""Abusive callers, run beside normal traffic: what they cost everyone else.

Each scenario is started against a gateway of its own (``Victim``), normal paced
traffic is measured before and while it runs, and the gateway's RSS is read
before and at the end. bench/run.py runs every scenario in ``SCENARIOS``; to
add one (a replay flood, say), write a class with ``name``, ``what``,
``start(victim)`` and ``stop()``, and append it there. ``start`` returns once the
abuse is under way and keeps it going (threads, processes) until ``stop``; a
scenario that needs more in the victim's config (an internal HMAC key, say) adds
it to bench/common.py's ``write_gateway_config``. The report's table takes its
``name`` and ``what`` as they are.

    slow-reader   as many connections as upstream.max_concurrent, each pipelining
                  requests for ~130 KiB answers and never reading one
                  (THREAT_MODEL.md, "A caller that does not read")
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common import TRASH

# The abused gateway's upstream.max_concurrent (small, so that the attack is complete
# with as many connections, and the bench machine is not the bottleneck).
MAX_CONCURRENT = 32
TRASH_ANSWER_BYTES = 130_000  # what the sandbox answers for ?limit=1000


@dataclass(frozen=True)
class Victim:
    """The gateway a scenario abuses, and what a caller needs to reach it."""

    port: int
    admin_port: int
    pid: int
    token: str
    max_concurrent: int
    workdir: Path


class Scenario(Protocol):
    name: str
    what: str

    def start(self, victim: Victim) -> None: ...

    def stop(self) -> None: ...


class SlowReader:
    name = "slow-reader"
    what = (
        f"{MAX_CONCURRENT} connections (= upstream.max_concurrent), each pipelining 300 "
        f"GET {TRASH} (~{TRASH_ANSWER_BYTES // 1000} kB answers) and never reading"
    )

    def __init__(self, pipelined: int = 300) -> None:
        self.pipelined = pipelined
        self.sockets: list[socket.socket] = []

    def start(self, victim: Victim) -> None:
        request = (
            f"GET {TRASH}?limit=1000 HTTP/1.1\r\nHost: gateway\r\n"
            f"Authorization: Bearer {victim.token}\r\n\r\n"
        ).encode()
        for _ in range(victim.max_concurrent):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", victim.port))
            sock.sendall(request * self.pipelined)
            self.sockets.append(sock)
        time.sleep(2.0)  # until the socket buffers are full and the gateway waits

    def stop(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


# Scenarios bench/run.py runs, in order. Add new ones here.
SCENARIOS: list[Scenario] = [SlowReader()]
