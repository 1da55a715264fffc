"""A replay flood, for bench/abuse.py: one internal HMAC key sends validly signed
requests with a fresh salt each, as fast as it can, to a path no route has (404,
nothing forwarded: only the replay memory does any work), until it is stopped.

    python bench/flood.py PORT API_KEY SECRET [CONNECTIONS]

Every signature is one the gateway must remember for its whole window, so this is
the cheapest way one caller can fill the replay memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.signing import Secret, Signer


async def flood(port: int, api_key: str, secret: str, connections: int) -> None:
    signer = Signer(api_key, Secret(secret))
    url = f"http://127.0.0.1:{port}/nope"
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_connection() -> None:
            while True:
                headers = {"Authorization": signer.fresh_header()}
                try:
                    async with session.get(url, headers=headers) as answer:
                        await answer.read()
                except aiohttp.ClientError:
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(one_connection() for _ in range(connections)))


if __name__ == "__main__":
    port, api_key, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    connections = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(flood(port, api_key, secret, connections))
