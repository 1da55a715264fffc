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
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.config import UpstreamSettings
from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable

# Headers aiohttp would add on its own; upstream should see only what the caller sent.
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding"})


@dataclass(slots=True)
class Attempt:
    """What happened upstream, for the access log and metrics."""

    attempts: int = 0
    error_kind: str | None = None


class Upstream:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

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

    async def send(
        self,
        settings: UpstreamSettings,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        attempt: Attempt,
    ) -> aiohttp.ClientResponse:
        """Send one attempt; the caller must release the returned response."""
        assert self._session is not None, "Upstream.start() was not awaited"
        # encoded=True: the target was checked to be canonical; yarl must not rewrite it.
        url = URL(f"{settings.url}{target}", encoded=True)
        timeout = aiohttp.ClientTimeout(
            total=settings.timeout_s, sock_connect=settings.connect_timeout_s
        )
        attempt.attempts += 1
        try:
            return await self._session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
            )
        except Exception as exc:
            raise failure(exc, attempt) from None


def failure(exc: BaseException, attempt: Attempt) -> GatewayError:
    """Map an aiohttp/OS failure to the contract's error, recording its kind."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        attempt.error_kind = "timeout"
        return UpstreamTimeout("The upstream did not answer in time.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        attempt.error_kind = "connect"
        return UpstreamUnavailable("The upstream could not be reached.")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | OSError):
        attempt.error_kind = "reset"
        return UpstreamUnavailable("The upstream closed the connection.")
    if isinstance(exc, aiohttp.ClientError):
        attempt.error_kind = "protocol"
        return UpstreamUnavailable("The upstream sent an answer that could not be read.")
    raise exc
