"""The stronger baseline: the smallest aiohttp signing proxy that does the gateway's job.

Per request it checks the bearer token (SHA-256 lookup), reads the body with
orjson and checks the batch with one joined regex (1-1000 unique IDs of the
right shape), signs with a fresh date and salt, forwards over a pooled
connection, reads the answer whole and returns it in one write. No metrics,
no log, no policy file, no refusal bodies worth the name: what a careful
person would write in an afternoon. The gateway's ratio to this is the price
of everything else it does (metrics, access log, the policy walk, explain).

    python bench/minimal.py LISTEN_PORT UPSTREAM_URL TOKEN API_KEY SECRET
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import sys
import time

import aiohttp
import orjson
from aiohttp import web

ROUTE = ("POST", "/crm-core/v1/records/bulk/restore")
ITEMS = re.compile(r"[A-Z]{5}[0-9]{16}[0-9A-Za-z]{11}(?:\n[A-Z]{5}[0-9]{16}[0-9A-Za-z]{11})*")
FORWARDED = ("Content-Type", "Accept", "Accept-Encoding", "Accept-Language", "User-Agent")
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "server"}
)


def refuse(status: int) -> web.Response:
    return web.Response(status=status, body=b'{"errorCode":"Refused"}')


async def main(port: int, upstream: str, token: str, api_key: str, secret: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )
    tokens = {hashlib.sha256(token.encode()).hexdigest()}
    key = secret.encode()
    timeout = aiohttp.ClientTimeout(total=30, sock_connect=3)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or hashlib.sha256(given.encode()).hexdigest() not in tokens:
            return refuse(401)
        if (request.method, request.path) != ROUTE:
            return refuse(404)
        body = await request.read()
        try:
            items = orjson.loads(body)["recordIds"]
            joined = "\n".join(items)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return refuse(400)
        if not 0 < len(items) <= 1000 or len(set(items)) != len(items):
            return refuse(400)
        if joined.count("\n") != len(items) - 1 or not ITEMS.fullmatch(joined):
            return refuse(400)
        date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        salt = secrets.token_hex(16)
        sig = hmac.new(key, (date + salt).encode(), hashlib.sha256).hexdigest()
        headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
        headers["Authorization"] = (
            f"HMAC-SHA256 apiKey={api_key}, date={date}, salt={salt}, signature={sig}"
        )
        async with session.request(
            request.method, upstream + request.raw_path, headers=headers, data=body,
            allow_redirects=False, timeout=timeout,
        ) as answer:  # fmt: skip
            content = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=answer.status, body=content, headers=kept)

    runner = web.ServerRunner(web.Server(handle, access_log=None, auto_decompress=False))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    args = (int(sys.argv[1]), *sys.argv[2:6])
    try:
        import uvloop

        uvloop.run(main(*args))  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(main(*args))  # type: ignore[arg-type]
