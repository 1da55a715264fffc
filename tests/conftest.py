"""Real processes on real sockets, for the end-to-end tests (``pytest -m e2e``).

    creds          (session)  the run's API key, secret (in a file) and bearer tokens
    sandbox        (session)  ``solapi-gateway sandbox`` accepting ``creds``
    gateway        (session)  ``solapi-gateway serve`` in front of ``sandbox``
    start_sandbox  (function) factory for another sandbox, e.g. ``delay_s=3``
    start_gateway  (function) factory for another gateway, e.g. at a dead upstream
    start_demo     (function) factory for ``solapi-gateway demo`` on free ports
    http_session   (function) an ``aiohttp.ClientSession`` that adds no headers of its own
    curl           (function) ``curl(*args) -> Reply`` running the real curl; skips if absent

Every process gets free ports (bind port 0, close, reuse the number), is polled
until it answers (sandbox: ``GET /_sandbox/requests``; gateway: admin
``/readyz``) and is stopped at teardown. Its stderr goes to a file, so a test
can read the gateway's JSON log lines with ``GatewayProc.events()``.

Every way of talking to a gateway answers with the same ``Reply`` (status,
headers, body bytes): ``await gateway.send(session, method, path, ...)`` through
aiohttp, ``await gateway.raw(request_bytes)`` over a bare socket for targets no
client would send as they are, and the ``curl`` fixture.

The shared sandbox is never restarted, so its records remember earlier tests:
take restorable IDs from ``sandbox.trash_ids(n)`` (each handed out once), and
wrap a request that must be refused in ``with sandbox.untouched():`` to prove
nothing reached upstream.

The test policy holds the contract's bulk-restore route exactly, plus three
pass-through routes used to see the sandbox's own 400/404 answers come back.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import itertools
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.sandbox import TRASHED_COUNT, demo_record_id

ROLES = ("VIEWER", "MEMBER", "OWNER")
MAX_BODY_BYTES = 65536  # the test gateways' limit; 1000 IDs take about 35 kB
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
TRUSTED_PRINCIPAL = "X-Internal-Principal"
TRUSTED_ROLE = "X-Internal-Role"

POLICY = """\
roles: [VIEWER, MEMBER, OWNER]
principals:
{principals}
trusted_headers:
  principal: X-Internal-Principal
  role: X-Internal-Role
  sources: ["127.0.0.1/32"]
routes:
  - name: records-bulk-restore
    method: POST
    path: /crm-core/v1/records/bulk/restore
    min_role: MEMBER
    batch:
      field: recordIds
      max_items: 1000
      item_pattern: "^CRMRC[0-9]{{16}}[0-9A-Za-z]{{11}}$"
      unique: true
  - name: record-restore
    method: POST
    path: /crm-core/v1/records/{{recordId}}/restore
    min_role: MEMBER
  - name: records-trash
    method: GET
    path: /crm-core/v1/records/trash
    min_role: VIEWER
  - name: not-in-sandbox
    method: GET
    path: /crm-core/v1/not-in-sandbox
    min_role: VIEWER
"""


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


def http_request(method: str, port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One plain HTTP exchange with a local port (for polling and introspection)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(data: bytes, *, dechunk: bool) -> Reply:
    """A raw HTTP/1.1 response (after any 1xx ones), as curl -i or a socket shows it."""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"no complete response head in {data[:200]!r}"
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if not 100 <= status < 200:
            break
        data = rest
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    body = rest
    if "Content-Length" in headers:  # anything after it is the next response
        body = rest[: int(headers["Content-Length"])]
    elif dechunk and headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = _dechunk(rest)
    return Reply(status, CIMultiDictProxy(headers), body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


@dataclass(frozen=True)
class Creds:
    api_key: str
    secret: str
    secret_file: Path
    tokens: dict[str, str]  # role → bearer token

    def bearer(self, role: str) -> str:
        return f"Bearer {self.tokens[role]}"


class Proc:
    """A child process whose stderr is kept in a file."""

    def __init__(
        self, name: str, args: list[str], stderr_path: Path, *, stdout: bool = False
    ) -> None:
        self.name = name
        self.args = args
        self.stderr_path = stderr_path
        # A multiprocess metrics dir inherited from the shell would change what
        # /metrics shows; these gateways run as one process.
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with open(stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                stderr=err,
                env=env,
                text=stdout,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, probe: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
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
        if self.popen.poll() is None:
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
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(STOP_TIMEOUT_S)


@dataclass
class SandboxProc:
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


@dataclass
class GatewayProc:
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

    def stderr_lines(self) -> list[str]:
        return self.proc.stderr_text().splitlines()

    def events(self) -> list[dict[str, Any]]:
        """Every stderr line, parsed (a line that is not JSON fails the test)."""
        return [json.loads(line) for line in self.stderr_lines()]

    def access_lines(self) -> list[dict[str, Any]]:
        return [event for event in self.events() if event.get("event") == "access"]

    def admin(self, path: str) -> tuple[int, bytes]:
        return http_request("GET", self.admin_port, path)

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


def launch_sandbox(
    workdir: Path, creds: Creds, *, delay_s: float = 0.0, api_key: str | None = None
) -> SandboxProc:
    port = free_port()
    args = [
        cli(),
        "sandbox",
        "--listen",
        f"127.0.0.1:{port}",
        "--api-key",
        api_key or creds.api_key,
        "--api-secret-file",
        str(creds.secret_file),
    ]
    if delay_s:
        args += ["--delay-s", str(delay_s)]
    proc = Proc(f"sandbox :{port}", args, workdir / f"sandbox-{port}.stderr")
    sandbox = SandboxProc(proc, port)
    proc.wait_ready(lambda: http_request("GET", port, "/_sandbox/requests")[0] == 200)
    return sandbox


def write_gateway_config(
    workdir: Path,
    creds: Creds,
    upstream_url: str,
    *,
    port: int,
    admin_port: int,
    timeout_s: float = 10,
    connect_timeout_s: float = 2,
    api_key: str | None = None,
    secret_file: Path | None = None,
) -> Path:
    principals = "\n".join(
        f"  - name: test-{role.lower()}\n"
        f"    role: {role}\n"
        f'    token_sha256: "{hashlib.sha256(token.encode()).hexdigest()}"'
        for role, token in creds.tokens.items()
    )
    (workdir / "policy.yaml").write_text(POLICY.format(principals=principals), encoding="utf-8")
    config = workdir / "gateway.yaml"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'admin_listen: "127.0.0.1:{admin_port}"\n'
        "upstream:\n"
        f'  url: "{upstream_url}"\n'
        f"  connect_timeout_s: {connect_timeout_s}\n"
        f"  timeout_s: {timeout_s}\n"
        "credentials:\n"
        f'  api_key: "{api_key or creds.api_key}"\n'
        f'  api_secret_file: "{secret_file or creds.secret_file}"\n'
        'policy: "policy.yaml"\n'
        f"max_body_bytes: {MAX_BODY_BYTES}\n"
        "shutdown_grace_s: 5\n",
        encoding="utf-8",
    )
    return config


def launch_gateway(
    workdir: Path,
    creds: Creds,
    upstream_url: str,
    *,
    policy: str | None = None,
    settings: dict[str, Any] | None = None,
    **options: Any,
) -> GatewayProc:
    """A ``serve`` process with the test config; ``policy`` replaces the test policy's
    text, ``settings`` sets top-level gateway.yaml keys (see ``tune_config``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    while admin_port == port:
        admin_port = free_port()
    config = write_gateway_config(
        workdir, creds, upstream_url, port=port, admin_port=admin_port, **options
    )
    if policy is not None:
        (workdir / "policy.yaml").write_text(policy, encoding="utf-8")
    if settings:
        tune_config(config, settings)
    proc = Proc(
        f"gateway :{port}", [cli(), "serve", "--config", str(config)], workdir / "gateway.stderr"
    )
    gateway = GatewayProc(proc, port, admin_port, config)
    proc.wait_ready(lambda: http_request("GET", admin_port, "/readyz")[0] == 200)
    return gateway


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


def demo_config(into: Path, listen: int, admin: int, upstream: int) -> Path:
    """A copy of config/demo whose three addresses are the given local ports."""
    source = Path(__file__).resolve().parent.parent / "config" / "demo"
    for name in ("policy.yaml", "api_secret"):
        shutil.copy(source / name, into / name)
    text = (source / "gateway.yaml").read_text(encoding="utf-8")
    for old, new in (
        ('"127.0.0.1:8080"', f'"127.0.0.1:{listen}"'),
        ('"127.0.0.1:9090"', f'"127.0.0.1:{admin}"'),
        ('"http://127.0.0.1:8089"', f'"http://127.0.0.1:{upstream}"'),
    ):
        assert old in text, f"config/demo/gateway.yaml no longer holds {old}"
        text = text.replace(old, new)
    config = into / "gateway.yaml"
    config.write_text(text, encoding="utf-8")
    return config


@pytest.fixture(scope="session")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    home = tmp_path_factory.mktemp("creds")
    secret = secrets.token_urlsafe(24)
    secret_file = home / "api_secret"
    secret_file.write_text(secret + "\n", encoding="utf-8")  # the newline is stripped
    tokens = {role: f"sgw_{role.lower()}_{secrets.token_urlsafe(24)}" for role in ROLES}
    return Creds(f"NCSE2E{secrets.token_hex(5).upper()}", secret, secret_file, tokens)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory, creds: Creds) -> Iterator[SandboxProc]:
    started = launch_sandbox(tmp_path_factory.mktemp("sandbox"), creds)
    yield started
    started.proc.kill()


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, creds: Creds, sandbox: SandboxProc
) -> Iterator[GatewayProc]:
    started = launch_gateway(tmp_path_factory.mktemp("gateway"), creds, sandbox.url)
    yield started
    started.proc.kill()


@pytest.fixture
def start_sandbox(tmp_path: Path, creds: Creds) -> Iterator[Callable[..., SandboxProc]]:
    started: list[SandboxProc] = []

    def start(**options: Any) -> SandboxProc:
        sandbox = launch_sandbox(tmp_path, creds, **options)
        started.append(sandbox)
        return sandbox

    yield start
    for sandbox in started:
        sandbox.proc.kill()


@pytest.fixture
def start_gateway(
    tmp_path: Path, creds: Creds, sandbox: SandboxProc
) -> Iterator[Callable[..., GatewayProc]]:
    """``start_gateway(upstream_url=..., timeout_s=..., api_key=..., secret_file=...)``."""
    started: list[GatewayProc] = []

    def start(upstream_url: str | None = None, **options: Any) -> GatewayProc:
        workdir = tmp_path / f"gateway-{len(started)}"
        gateway = launch_gateway(workdir, creds, upstream_url or sandbox.url, **options)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.proc.kill()


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[[], DemoProc]]:
    started: list[DemoProc] = []

    def start() -> DemoProc:
        ports = [free_port() for _ in range(3)]
        while len(set(ports)) < 3:
            ports = [free_port() for _ in range(3)]
        config = demo_config(tmp_path, *ports)
        proc = Proc(
            "demo", [cli(), "demo", "--config", str(config)], tmp_path / "demo.stderr", stdout=True
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.popen.stdout is not None
            for line in proc.popen.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        demo = DemoProc(proc, *ports, stdout=lines)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        demo.proc.kill()


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    # No Content-Type or User-Agent of aiohttp's own: the tests say what is sent.
    async with aiohttp.ClientSession(
        skip_auto_headers=("User-Agent", "Content-Type", "Accept", "Accept-Encoding"),
        auto_decompress=False,
    ) as session:
        yield session


@pytest.fixture
def curl() -> Callable[..., Reply]:
    """``curl(*args)`` runs ``curl -sS -i *args`` and parses what it printed."""
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed (.ci/run installs it before the tests)")

    def run(*args: str) -> Reply:
        done = subprocess.run([exe, "-sS", "-i", *args], capture_output=True, timeout=20)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return parse_response(done.stdout, dechunk=False)

    return run


# --- the shipped policy, with the test's callers (SDK keys, the records routes) ----------
#
#    sdk_key           (session)  an internal HMAC key pair, as an SDK service would hold
#    shipped_gateway   (session)  ``config/policy.yaml``'s routes, the test tokens, the SDK
#                                 key (MEMBER), trusted headers from 127.0.0.1, and a
#                                 ``cash-balance`` route for the SDKs' balance call
#    start_policy_gateway (function)  ``start(policy_text, **options)``: a gateway of its own


@dataclass(frozen=True)
class SdkKey:
    api_key: str
    secret: str
    principal: str = "sdk-svc"


CASH_BALANCE_ROUTE = """\
  - name: cash-balance
    method: GET
    path: /cash/v1/balance
    min_role: VIEWER
    query: {}
"""


def shipped_policy(creds: Creds, sdk_key: SdkKey) -> str:
    """``config/policy.yaml`` as shipped, with the test principals and trusted headers."""
    text = (Path(__file__).resolve().parent.parent / "config" / "policy.yaml").read_text()
    assert "\nprincipals: []\n" in text, "config/policy.yaml no longer starts with no principals"
    principals = "".join(
        f"  - name: test-{role.lower()}\n"
        f"    role: {role}\n"
        f'    token_sha256: "{hashlib.sha256(token.encode()).hexdigest()}"\n'
        for role, token in creds.tokens.items()
    )
    principals += (
        f"  - name: {sdk_key.principal}\n"
        "    role: MEMBER\n"
        f'    hmac_key: "{sdk_key.api_key}"\n'
        f'    hmac_secret: "{sdk_key.secret}"\n'
    )
    text = text.replace("\nprincipals: []\n", "\nprincipals:\n" + principals, 1)
    assert text.rstrip().splitlines()[-1].startswith("    "), "routes: must come last"
    return (
        text.rstrip()
        + "\n"
        + CASH_BALANCE_ROUTE
        + "trusted_headers:\n"
        + f"  principal: {TRUSTED_PRINCIPAL}\n"
        + f"  role: {TRUSTED_ROLE}\n"
        + '  sources: ["127.0.0.1/32"]\n'
    )


@pytest.fixture(scope="session")
def sdk_key() -> SdkKey:
    return SdkKey(f"NCSINT{secrets.token_hex(5).upper()}", secrets.token_urlsafe(24))


@pytest.fixture(scope="session")
def shipped_gateway(
    tmp_path_factory: pytest.TempPathFactory, creds: Creds, sdk_key: SdkKey, sandbox: SandboxProc
) -> Iterator[GatewayProc]:
    workdir = tmp_path_factory.mktemp("shipped-gateway")
    started = launch_gateway(workdir, creds, sandbox.url, policy=shipped_policy(creds, sdk_key))
    yield started
    started.proc.kill()


@pytest.fixture
def start_own_gateway(
    tmp_path: Path, creds: Creds, sandbox: SandboxProc
) -> Iterator[Callable[..., GatewayProc]]:
    """``start(upstream_url=None, **launch_gateway_options)``: a gateway of its own,
    killed after the test (behind the two fixtures below)."""
    started: list[GatewayProc] = []

    def start(upstream_url: str | None = None, **options: Any) -> GatewayProc:
        workdir = tmp_path / f"own-gateway-{len(started)}"
        gateway = launch_gateway(workdir, creds, upstream_url or sandbox.url, **options)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.proc.kill()


@pytest.fixture
def start_policy_gateway(
    start_own_gateway: Callable[..., GatewayProc],
) -> Callable[..., GatewayProc]:
    """``start_policy_gateway(policy_text, upstream_url=None, **options)``."""

    def start(policy: str, upstream_url: str | None = None, **options: Any) -> GatewayProc:
        return start_own_gateway(upstream_url, policy=policy, **options)

    return start


async def poll(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` holds (checked every 20 ms), or fail the test."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


# --- a gateway with settings of its own ---------------------------------------------------
#
#    start_tuned_gateway (function)  ``start({"keepalive_timeout_s": 1}, **options)``: like
#                                    ``start_gateway``, with top-level gateway.yaml keys set


def tune_config(config: Path, settings: dict[str, Any]) -> None:
    """Set top-level keys of a written gateway.yaml, replacing the line of one already set."""
    lines = config.read_text(encoding="utf-8").splitlines()
    for key, value in settings.items():
        line = f"{key}: {json.dumps(value)}"  # JSON scalars and lists are YAML too
        at = [n for n, old in enumerate(lines) if old.startswith(f"{key}:")]
        if at:
            lines[at[0]] = line
        else:
            lines.append(line)
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def start_tuned_gateway(
    start_own_gateway: Callable[..., GatewayProc],
) -> Callable[..., GatewayProc]:
    """``start_tuned_gateway(settings, upstream_url=None, **options)``."""

    def start(
        settings: dict[str, Any], upstream_url: str | None = None, **options: Any
    ) -> GatewayProc:
        return start_own_gateway(upstream_url, settings=settings, **options)

    return start
