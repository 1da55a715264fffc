"""Sending a signed request upstream over one pooled keep-alive session.

One ``ClientSession`` per process, created inside the running loop (after any
fork). It never follows redirects, keeps no cookies and does not decompress,
so upstream's status, headers and body reach the caller exactly as sent.

Failures become the contract's errors, with the ``kind`` the metrics count:

    refused / DNS / unreachable  → UpstreamUnavailable (kind "connect")
    reset / closed mid-exchange  → UpstreamUnavailable (kind "reset")
    unparseable answer           → UpstreamUnavailable (kind "protocol")
    connect or total timeout     → UpstreamTimeout     (kind "timeout")

An upstream 5xx is an answer, not a failure: it is passed back as it is.

Retries happen only where repeating cannot do harm (see ``exchange``), each
attempt signed afresh, all of them inside one ``timeout_s`` budget. A bounded
number of exchanges run at once; past that a request waits a moment for a slot
and is then refused with 503 ``Overloaded`` instead of joining a queue that
only grows.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.config import UpstreamSettings
from gateway.errors import GatewayError, Overloaded, UpstreamTimeout, UpstreamUnavailable

# Headers aiohttp would add on its own; upstream should see only what the caller sent.
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding"})
MAX_ATTEMPTS: Final = 3
_BACKOFF_S: Final = 0.05
_THROTTLE_STATUSES: Final = frozenset({429, 503})


@dataclass(slots=True)
class Attempt:
    """What happened upstream, for the access log and metrics."""

    attempts: int = 0
    error_kind: str | None = None  # of the last failed attempt
    failures: list[str] = field(default_factory=list)  # kind of every failed attempt
    retries: list[str] = field(default_factory=list)  # why each retry happened


class Upstream:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
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

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        settings: UpstreamSettings,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        sign: Callable[[], str],
        attempt: Attempt,
        *,
        on_throttle: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send the request, retrying only where that is safe; the caller releases the answer.

        Retried: a connection that could not be made (nothing was sent, so
        upstream cannot have acted on it), and, on routes that opt in, a 429 or
        503 whose ``Retry-After`` fits in the time left. Never retried: a reset
        or timeout after the request was sent, since upstream may already have
        restored or deleted the records.
        """
        assert self._session is not None, "Upstream.start() was not awaited"
        # encoded=True: the target was checked to be canonical; yarl must not rewrite it.
        url = URL(f"{settings.url}{target}", encoded=True)
        deadline = time.monotonic() + settings.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                attempt.error_kind = "timeout"
                raise UpstreamTimeout("The upstream did not answer in time.")
            headers["Authorization"] = sign()  # a fresh date and salt for every attempt
            timeout = aiohttp.ClientTimeout(
                total=remaining, sock_connect=min(settings.connect_timeout_s, remaining)
            )
            attempt.attempts += 1
            try:
                answer = await self._session.request(
                    method, url, headers=headers, data=body, allow_redirects=False, timeout=timeout
                )
            except Exception as exc:
                error = failure(exc, attempt)
                nothing_sent = isinstance(
                    exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
                )
                pause = _BACKOFF_S * (2 ** (attempt.attempts - 1)) * random.uniform(0.5, 1.0)
                if nothing_sent and self._may_retry(attempt, deadline, pause):
                    attempt.retries.append("connect")
                    await asyncio.sleep(pause)
                    continue
                raise error from None
            if on_throttle and answer.status in _THROTTLE_STATUSES:
                pause_s = retry_after(answer.headers.get("Retry-After"))
                if pause_s is not None and self._may_retry(attempt, deadline, pause_s):
                    answer.release()
                    attempt.retries.append("throttle")
                    await asyncio.sleep(pause_s)
                    continue
            return answer

    @staticmethod
    def _may_retry(attempt: Attempt, deadline: float, pause_s: float) -> bool:
        # Leave the next attempt some time of its own, not just the pause.
        return attempt.attempts < MAX_ATTEMPTS and time.monotonic() + pause_s + 0.05 < deadline


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def failure(exc: BaseException, attempt: Attempt) -> GatewayError:
    """Map an aiohttp/OS failure to the contract's error, recording its kind."""
    error: GatewayError
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        kind, error = "timeout", UpstreamTimeout("The upstream did not answer in time.")
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind, error = "connect", UpstreamUnavailable("The upstream could not be reached.")
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | OSError):
        kind, error = "reset", UpstreamUnavailable("The upstream closed the connection.")
    elif isinstance(exc, aiohttp.ClientError):
        kind = "protocol"
        error = UpstreamUnavailable("The upstream sent an answer that could not be read.")
    else:
        raise exc
    attempt.error_kind = kind
    attempt.failures.append(kind)
    return error
