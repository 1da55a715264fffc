"""The upstream, as the handler sees it: one pooled session, a bounded number of
exchanges at once, and ``exchange``, which sends one request as the retry
policy allows.

    Upstream.exchange ─→ Retrying (gateway/retry.py)       sign, decide, budget
                          └─→ AiohttpTransport (gateway/transport.py)
                                                            one attempt, errors mapped

One ``ClientSession`` per process, created inside the running loop (after any
fork). It never follows redirects, keeps no cookies and does not decompress,
so upstream's status, headers and body reach the caller exactly as sent.

A bounded number of exchanges run at once; past that a request waits a moment
for a slot and is then refused with 503 ``Overloaded`` instead of joining a
queue that only grows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from gateway.config import UpstreamSettings
from gateway.errors import Overloaded
from gateway.retry import Retrying, Tally
from gateway.transport import AiohttpTransport, Answer, UpstreamRequest

# Headers aiohttp would add on its own; upstream should see only what the caller sent.
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding"})


class Upstream:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._retrying: Retrying | None = None
        self._slots: asyncio.Semaphore | None = None
        self._slots_size = 0

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO,
        )
        self._retrying = Retrying(AiohttpTransport(self._session))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = self._retrying = None

    async def acquire_slot(self, settings: UpstreamSettings) -> asyncio.Semaphore:
        """Take one of ``max_concurrent`` upstream slots, for the whole exchange;
        the caller releases the returned semaphore when the answer is relayed.
        (A plain call, not a context manager: this runs on every request.)"""
        if self._slots is None or self._slots_size != settings.max_concurrent:
            # A reload that changes the bound starts a new semaphore; exchanges
            # holding the old one release the old one.
            self._slots = asyncio.Semaphore(settings.max_concurrent)
            self._slots_size = settings.max_concurrent
        slots = self._slots
        if slots.locked():  # only then wait (wait_for costs a task: not on every request)
            try:
                await asyncio.wait_for(slots.acquire(), settings.queue_timeout_s)
            except TimeoutError:
                raise Overloaded("Too many requests in flight upstream; retry shortly.") from None
        else:
            await slots.acquire()  # free: returns at once
        return slots

    async def exchange(
        self,
        request: UpstreamRequest,
        settings: UpstreamSettings,
        sign: Callable[[], str],
        tally: Tally,
    ) -> Answer:
        """Upstream's answer to ``request`` (any status; the caller releases it), or
        UpstreamUnavailable / UpstreamTimeout. ``sign`` makes a fresh Authorization
        for each attempt; ``tally`` records the attempts for the log and metrics."""
        assert self._retrying is not None, "Upstream.start() was not awaited"
        return await self._retrying.send(request, settings, sign, tally)
