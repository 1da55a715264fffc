"""The fixtures: thin wrappers over ``tests/support``, where everything else lives.

    creds           (session)  the run's API key, secret (in a file) and bearer tokens
    sandbox         (session)  ``solapi-gateway sandbox`` accepting ``creds``
    gateway         (session)  ``solapi-gateway serve`` in front of ``sandbox``
    sdk_key         (session)  an internal HMAC key pair, as an SDK service would hold
    shipped_gateway (session)  ``config/policy.yaml``'s routes with the test's callers
                               (see ``support.shipped_policy``), in front of ``sandbox``
    start_sandbox   (function) ``start_sandbox(*, port=None, delay_s=0, api_key=None,
                               secret_file=None)``: another sandbox
    start_gateway   (function) ``start_gateway(upstream_url=None, *, policy=None,
                               settings=None, **options)``: a gateway of the test's own
                               (options: timeout_s, connect_timeout_s, api_key,
                               secret_file, env; see ``support.launch_gateway``)
    start_demo      (function) ``start_demo()``: ``solapi-gateway demo`` on free ports
    fake_upstream   (function) a started ``support.FakeUpstream`` answering 200
    http_session    (function) an ``aiohttp.ClientSession`` that adds no headers of its own
    curl            (function) ``curl(*args) -> Reply`` running the real curl; skips if absent

Every process is stopped at teardown. The shared sandbox is never restarted, so its
records remember earlier tests: take restorable IDs from ``sandbox.trash_ids(n)``
and wrap a request that must be refused in ``with sandbox.untouched():``.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import (
    Creds,
    DemoProc,
    FakeUpstream,
    GatewayProc,
    Reply,
    SandboxProc,
    SdkKey,
    each_killed,
    launch_demo,
    launch_gateway,
    launch_sandbox,
    parse_response,
    shipped_policy,
)
from support import poll as poll  # for tests that still import it from here


@pytest.fixture(scope="session")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    return Creds.new(tmp_path_factory.mktemp("creds"))


@pytest.fixture(scope="session")
def sdk_key() -> SdkKey:
    return SdkKey.new()


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


@pytest.fixture(scope="session")
def shipped_gateway(
    tmp_path_factory: pytest.TempPathFactory, creds: Creds, sdk_key: SdkKey, sandbox: SandboxProc
) -> Iterator[GatewayProc]:
    workdir = tmp_path_factory.mktemp("shipped-gateway")
    started = launch_gateway(workdir, creds, sandbox.url, policy=shipped_policy(creds, sdk_key))
    yield started
    started.proc.kill()


@pytest.fixture
def start_sandbox(tmp_path: Path, creds: Creds) -> Iterator[Callable[..., SandboxProc]]:
    yield from each_killed(partial(launch_sandbox, tmp_path, creds))


@pytest.fixture
def start_gateway(
    tmp_path: Path, creds: Creds, sandbox: SandboxProc
) -> Iterator[Callable[..., GatewayProc]]:
    workdirs = (tmp_path / f"gateway-{n}" for n in itertools.count())

    def start(
        upstream_url: str | None = None,
        *,
        policy: str | None = None,
        settings: dict[str, Any] | None = None,
        **options: Any,
    ) -> GatewayProc:
        return launch_gateway(
            next(workdirs),
            creds,
            upstream_url or sandbox.url,
            policy=policy,
            settings=settings,
            **options,
        )

    yield from each_killed(start)


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[[], DemoProc]]:
    yield from each_killed(partial(launch_demo, tmp_path))


@pytest.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


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
