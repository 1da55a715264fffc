"""``solapi-gateway demo``: the sandbox and a gateway wired to it, in one process.

The sandbox is started with the very key pair the demo config signs with, so
the two cannot drift apart. The tokens below are public demo values; the demo
policy holds only their SHA-256.

Start-up lines go to stderr as usual; once the curl lines are printed, the log
lines (one per request pasted) go to a file instead, so that they do not
scroll the curl lines away. ``--log-file -`` keeps them on stderr.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
from typing import Final

import orjson

from gateway import logs, sandbox, service
from gateway.config import Settings
from gateway.server import Gateway

DEMO_CONFIG: Final = "config/demo/gateway.yaml"
DEMO_API_KEY: Final = "NCSDEMOKEY000001"
DEMO_API_SECRET: Final = "demo-sandbox-secret-not-for-production"
DEMO_TOKENS: Final = {
    "VIEWER": "demo-viewer-token",
    "MEMBER": "demo-member-token",
    "OWNER": "demo-owner-token",
}
RESTORE_PATH: Final = "/crm-core/v1/records/bulk/restore"
DEMO_LOG: Final = os.path.join(tempfile.gettempdir(), "solapi-gateway-demo.log")


def curl_lines(settings: Settings) -> list[str]:
    """Ready-to-paste commands against the running demo, each after a comment."""
    base = f"http://{settings.listen}"
    admin = f"http://{settings.admin_listen}"

    def restore(token: str | None, ids: list[str], *extra: str) -> str:
        body = orjson.dumps({"recordIds": ids}).decode()
        parts = ["curl", "-si", "-X", "POST", base + RESTORE_PATH]
        if token is not None:
            parts += ["-H", f"Authorization: Bearer {token}"]
        parts += [*extra, "-H", "Content-Type: application/json", "-d", body]
        return shlex.join(parts)

    owner_auth = f"Authorization: Bearer {DEMO_TOKENS['OWNER']}"
    trash = [sandbox.demo_record_id("TRASH", n) for n in (1, 2)]
    purged = sandbox.demo_record_id("PURGE", 1)
    alive = sandbox.demo_record_id("ALIVE", 1)
    more = [sandbox.demo_record_id("TRASH", n) for n in range(3, 6)]
    return [
        '# MEMBER restores two records from the trash → 200 "restored";'
        ' pasted again: 200 "notDeleted"',
        restore(DEMO_TOKENS["MEMBER"], trash),
        "# OWNER: one restorable, one purged (>14 days), one never deleted → 200 per record",
        restore(DEMO_TOKENS["OWNER"], [more[0], purged, alive]),
        "# VIEWER may not restore → 403 Forbidden",
        restore(DEMO_TOKENS["VIEWER"], [more[1]]),
        "# no token → 401 Unauthorized; an unknown token is the same",
        restore(None, [more[1]]),
        "# an ID of the wrong shape → 400 InvalidItem (nothing is sent upstream)",
        restore(DEMO_TOKENS["MEMBER"], [more[1], "not-a-record-id"]),
        "# the same ID twice → 400 DuplicateItems",
        restore(DEMO_TOKENS["MEMBER"], [more[2], more[2]]),
        "# an empty batch → 400 BatchEmpty",
        restore(DEMO_TOKENS["MEMBER"], []),
        "# trusted identity headers, honoured from 127.0.0.1 only",
        restore(
            None,
            [more[1]],
            "-H",
            "X-Internal-Principal: ops-console",
            "-H",
            "X-Internal-Role: MEMBER",
        ),
        "# a path nobody declared → 404 RouteNotFound",
        shlex.join(["curl", "-si", base + "/crm-core/v1/records", "-H", owner_auth]),
        "# the gateway's metrics and readiness",
        shlex.join(["curl", "-s", admin + "/metrics"]),
        shlex.join(["curl", "-s", admin + "/readyz"]),
    ]


def _log_to(path: str) -> None:
    """From now on, write this process's stderr (every log line) to ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)


async def run(settings: Settings, log_file: str = DEMO_LOG) -> int:
    url = settings.upstream.url
    host, port = url.host or "127.0.0.1", url.port or 80
    keys = {settings.signer.api_key: settings.signer.secret}
    started = asyncio.get_running_loop().create_future()
    upstream = asyncio.create_task(
        sandbox.run_sandbox(host, port, keys, ready=lambda p: started.set_result(p))
    )
    done, _ = await asyncio.wait({upstream, started}, return_when=asyncio.FIRST_COMPLETED)
    if upstream in done:  # it stopped before it was ready: the port is taken
        exc = upstream.exception()
        logs.emit("start_failed", error=f"sandbox cannot listen on {host}:{port}: {exc}")
        return 1

    async def announce(gateway: Gateway) -> None:
        to_file = log_file != "-"
        try:
            if to_file:
                _log_to(log_file)
        except OSError as exc:
            logs.emit("demo_log_file_failed", path=log_file, error=exc.strerror or str(exc))
            to_file = False
        where = f"Log lines go to {log_file} (tail -f it to watch them)." if to_file else ""
        print(
            f"\nsolapi-gateway demo: gateway on http://{settings.listen}, "
            f"sandbox upstream on http://{host}:{port}, admin on http://{settings.admin_listen}",
            *([where] if where else []),
            "Paste any of these in another terminal (Ctrl-C here stops the demo):\n",
            *curl_lines(settings),
            "",
            sep="\n",
            flush=True,
        )

    try:
        return await service.serve(settings, ready=announce)
    finally:
        upstream.cancel()
        await asyncio.gather(upstream, return_exceptions=True)
        sys.stdout.flush()
