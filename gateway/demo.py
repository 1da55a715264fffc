"""``solapi-gateway demo``: the sandbox and a gateway wired to it, in one process.

The sandbox is started with the very key pair the demo config signs with, so
the two cannot drift apart. The tokens below are public demo values; the demo
policy holds only their SHA-256.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
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
        "# MEMBER restores two records from the trash → 200, both restored",
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


async def run(settings: Settings) -> int:
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
        print(
            f"\nsolapi-gateway demo: gateway on http://{settings.listen}, "
            f"sandbox upstream on http://{host}:{port}, admin on http://{settings.admin_listen}",
            "Paste any of these in another terminal (Ctrl-C here stops both):\n",
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
