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
    replay-flood  one internal HMAC key sending validly signed requests with fresh
                  salts as fast as it can (bench/flood.py), past its share of the
                  replay memory; another key must still get in
                  (THREAT_MODEL.md, "One internal key filling the replay memory")
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common import HMAC_KEYS, TRASH

from gateway.signing import Secret, Signer

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
    config: str  # more gateway.yaml lines the victim needs ("" for none)

    def start(self, victim: Victim) -> None: ...

    def stop(self) -> None: ...


class SlowReader:
    config = ""
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


class ReplayFlood:
    name = "replay-flood"
    share = 10_000  # salts per internal key: the flood passes it within seconds
    # Two internal keys in the victim's policy (bench/common.py): each gets half.
    config = f"state: {json.dumps({'replay_salts': 2 * share})}\n"
    what = (
        f"internal key flood-svc sending signed GET /nope (404) with fresh salts on 8 "
        f"connections, past its share of {share:,} remembered salts"
    )

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.other_key = ""  # what another key got during the flood

    def start(self, victim: Victim) -> None:
        key, secret = HMAC_KEYS["flood-svc"]
        script = str(Path(__file__).with_name("flood.py"))
        self.proc = subprocess.Popen(
            [sys.executable, script, str(victim.port), key, secret, "8"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(3.0)  # until its share is full and it is being refused
        self.other_key = self._other_key(victim.port)

    @staticmethod
    def _other_key(port: int) -> str:
        """The status another key's request got, and the gateway's errorCode if it
        refused it itself (none: it passed the gateway, whatever upstream said)."""
        key, secret = HMAC_KEYS["sdk-svc"]
        headers = {"Authorization": Signer(key, Secret(secret)).fresh_header()}
        request = urllib.request.Request(f"http://127.0.0.1:{port}{TRASH}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return str(answer.status)
        except urllib.error.HTTPError as exc:
            refused = exc.headers.get("X-Gateway-Error")
            return f"{exc.code} {refused}" if refused else str(exc.code)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        print(f"replay-flood: another internal key got {self.other_key} during it", flush=True)


# Scenarios bench/run.py runs, in order. Add new ones here.
SCENARIOS: list[Scenario] = [SlowReader(), ReplayFlood()]
