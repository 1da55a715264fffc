"""Real processes on real sockets: the sandbox and the gateway (the demo is in demo.py),
each started on free ports, polled until it answers (sandbox: ``GET /_sandbox/requests``;
gateway: admin ``/readyz``), its stderr kept in a file so a test can read the JSON log
lines, and killed by the fixture that started it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.sandbox import TRASHED_COUNT, demo_record_id

from .configs import MAX_BODY_BYTES, Creds, gateway_policy, write_gateway_config
from .replies import Reply, Samples, http_request, parse_response, samples_of

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
# What the test gateways get unless a test says otherwise.
TEST_SETTINGS = {"max_body_bytes": MAX_BODY_BYTES, "shutdown_grace_s": 5}


def cli() -> str:
    """The venv's console script, next to the running interpreter."""
    script = Path(sys.executable).with_name("solapi-gateway")
    if script.exists():
        return str(script)
    found = shutil.which("solapi-gateway")
    if found is None:
        pytest.fail("the solapi-gateway console script is not installed")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` different free ports (bind port 0, close, reuse the number)."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return list(ports)


def answers(port: int, path: str) -> Callable[[], bool]:
    """A readiness probe: does ``GET path`` on ``port`` answer 200?"""
    return lambda: http_request("GET", port, path)[0] == 200


async def poll(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` holds (checked every 20 ms), or fail the test."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every complete line of JSON-lines ``text``, parsed (a line that is not JSON fails
    the test); a last line still being written, with no newline yet, is left out."""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


class Proc:
    """A child process whose stderr is kept in a file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        stderr_path: Path,
        *,
        stdout: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.stderr_path = stderr_path
        # A multiprocess metrics dir inherited from the shell would change what
        # /metrics shows: a test that wants one says so in ``env``.
        environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with open(stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                stderr=err,
                env={**environ, **(env or {})},
                text=stdout,
                # A group of its own, so that ``kill`` takes the workers of a
                # ``serve --workers N`` down with their supervisor.
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exited(self) -> bool:
        return self.popen.poll() is not None

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, probe: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.exited:
                pytest.fail(
                    f"{self.name} exited with {self.popen.returncode} before it was ready:\n"
                    f"{self.stderr_text()}"
                )
            try:
                if probe():
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        pytest.fail(f"{self.name} was not ready after {START_TIMEOUT_S}s:\n{self.stderr_text()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and return the exit code (killing it if it does not exit in time)."""
        if not self.exited:
            self.popen.send_signal(sig)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """The exit code, once it exits by itself (killed and failed after ``timeout_s``)."""
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not exit within {timeout_s}s:\n{self.stderr_text()}")
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL to it and to every process it started (its workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if not self.exited:
            self.popen.wait(STOP_TIMEOUT_S)


Launched = TypeVar("Launched", bound="Launchable")


class Launchable(Protocol):
    proc: Proc


def each_killed(launch: Callable[..., Launched]) -> Iterator[Callable[..., Launched]]:
    """For a factory fixture (``yield from each_killed(launch)``): ``launch``, and every
    process it started killed when the fixture ends."""
    started: list[Launched] = []

    def start(*args: Any, **options: Any) -> Launched:
        started.append(launch(*args, **options))
        return started[-1]

    yield start
    for launched in started:
        launched.proc.kill()


def stderr_file(workdir: Path, stem: str) -> Path:
    """A file name no earlier process in ``workdir`` has used."""
    for n in itertools.count(1):
        path = workdir / (f"{stem}.stderr" if n == 1 else f"{stem}-{n}.stderr")
        if not path.exists():
            return path
    raise AssertionError("unreachable")


# --- the sandbox ----------------------------------------------------------------------------


@dataclass
class SandboxProc:
    """``solapi-gateway sandbox``. Its records remember earlier requests: take restorable
    IDs from ``trash_ids(n)`` (each handed out once)."""

    proc: Proc
    port: int
    _next_trash: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> dict[str, Any]:
        """What the sandbox received: {"count", "accepted", "requests": [...]}."""
        status, body = http_request("GET", self.port, "/_sandbox/requests")
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def count(self) -> int:
        return int(self.log()["count"])

    def requests(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.log()["requests"]
        return result

    def last(self) -> dict[str, Any]:
        requests = self.requests()
        assert requests, "the sandbox received nothing"
        return requests[-1]

    def reset(self) -> None:
        status, body = http_request("POST", self.port, "/_sandbox/reset", b"")
        assert status == 200, body

    def trash_ids(self, n: int) -> list[str]:
        """``n`` seed records still in the trash: no other test has been given them."""
        numbers = [next(self._next_trash) for _ in range(n)]
        assert numbers[-1] <= TRASHED_COUNT, "the sandbox's trash is used up"
        return [demo_record_id("TRASH", number) for number in numbers]

    @contextmanager
    def untouched(self) -> Iterator[None]:
        """Assert that nothing reached the sandbox inside the block."""
        before = self.count()
        yield
        after = self.count()
        assert after == before, f"{after - before} request(s) reached upstream"


def launch_sandbox(
    workdir: Path,
    creds: Creds,
    *,
    port: int | None = None,
    delay_s: float = 0.0,
    api_key: str | None = None,
    secret_file: Path | None = None,
) -> SandboxProc:
    """A sandbox accepting ``creds`` (or ``api_key``/``secret_file``), on ``port`` if given."""
    port = port or free_port()
    args = [
        cli(), "sandbox", "--listen", f"127.0.0.1:{port}",
        "--api-key", api_key or creds.api_key,
        "--api-secret-file", str(secret_file or creds.secret_file),
    ]  # fmt: skip
    if delay_s:
        args += ["--delay-s", str(delay_s)]
    proc = Proc(f"sandbox :{port}", args, stderr_file(workdir, f"sandbox-{port}"))
    sandbox = SandboxProc(proc, port)
    proc.wait_ready(answers(port, "/_sandbox/requests"))
    return sandbox


# --- the gateway ----------------------------------------------------------------------------


@dataclass
class GatewayProc:
    """``solapi-gateway serve``. Every way of talking to it answers with the same
    ``Reply``: ``send`` through aiohttp, ``raw`` over a bare socket."""

    proc: Proc
    port: int
    admin_port: int
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines on stderr so far (only the ``event`` called ``name``, if
        given). A line a worker is still writing waits for a later call; once the
        process has exited, every line must be whole."""
        text = self.proc.stderr_text()
        if self.proc.exited:
            assert text.endswith("\n") or not text, f"a partial last line: {text[-200:]!r}"
        lines = json_lines(text)
        return lines if name is None else [e for e in lines if e.get("event") == name]

    def access_lines(self) -> list[dict[str, Any]]:
        return self.events("access")

    def worker_pids(self) -> list[int]:
        """Every worker that has started so far, oldest first (``serve --workers N``)."""
        return [e["pid"] for e in self.events("started") if e["pid"] != self.proc.pid]

    def admin(self, path: str) -> tuple[int, bytes]:
        return http_request("GET", self.admin_port, path)

    def metrics(self) -> Samples:
        status, text = self.admin("/metrics")
        assert status == 200, text
        return samples_of(text)

    async def send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        *,
        headers: Any = None,
        data: Any = None,
    ) -> Reply:
        """One request through aiohttp; ``headers`` may repeat names (a list of pairs)."""
        async with session.request(
            method, self.url + path, headers=CIMultiDict(headers or ()), data=data
        ) as response:
            body = await response.read()
            return Reply(response.status, response.headers, body)

    async def raw(self, request: bytes) -> Reply:
        """Write ``request`` to the proxy port as it is and read the answer to EOF."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
            await writer.wait_closed()
        return parse_response(data, dechunk=True)


def launch_gateway(
    workdir: Path,
    creds: Creds,
    upstream_url: str,
    *,
    policy: str | None = None,
    settings: Mapping[str, Any] | None = None,
    timeout_s: float = 10,
    connect_timeout_s: float = 2,
    api_key: str | None = None,
    secret_file: Path | None = None,
    workers: int | None = None,
    env: Mapping[str, str] | None = None,
    upstream: Mapping[str, Any] | None = None,
) -> GatewayProc:
    """``serve`` on a config of its own in ``workdir``: ``policy`` is policy.yaml's text
    (else ``gateway_policy(creds)``), ``settings`` top-level gateway.yaml keys (over
    ``TEST_SETTINGS``), ``workers`` is ``serve --workers``, ``env`` more environment."""
    port, admin_port = free_ports(2)
    config = write_gateway_config(
        workdir,
        port=port,
        admin_port=admin_port,
        upstream_url=upstream_url,
        api_key=api_key or creds.api_key,
        secret_file=secret_file or creds.secret_file,
        policy=gateway_policy(creds) if policy is None else policy,
        timeout_s=timeout_s,
        connect_timeout_s=connect_timeout_s,
        settings={**TEST_SETTINGS, **(settings or {})},
        upstream=upstream,
    )
    args = [cli(), "serve", "--config", str(config)]
    if workers is not None:
        args += ["--workers", str(workers)]
    proc = Proc(f"gateway :{port}", args, stderr_file(workdir, "gateway"), env=env)
    gateway = GatewayProc(proc, port, admin_port, config)
    proc.wait_ready(answers(admin_port, "/readyz"))
    return gateway
