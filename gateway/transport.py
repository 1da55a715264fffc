"""One upstream attempt: a signed request in, one answer or one mapped failure out.

The transport knows nothing of retries, budgets or signing (``gateway/retry.py``
decides those); it sends exactly the ``Outgoing`` it is given, within the time
that carries, and turns every way of getting no answer into the contract's
error with the ``kind`` the metrics count:

    refused / DNS / unreachable  → UpstreamUnavailable (kind "connect")  nothing sent
    connect timeout              → UpstreamTimeout     (kind "timeout")  nothing sent
    reset / closed mid-exchange  → UpstreamUnavailable (kind "reset")
    unparseable answer           → UpstreamUnavailable (kind "protocol")
    total timeout                → UpstreamTimeout     (kind "timeout")

An upstream 5xx is an answer, not a failure: it comes back as an ``Answer``.
An answer whose ``Content-Length`` is at most ``WHOLE_ANSWER_BYTES`` is read
whole within the attempt (its connection goes back to the pool at once, and a
body cut short is a failure before anything reached the caller); a longer or
unframed one comes back as a stream the caller reads (``Answer.read``).
A failure is raised as ``Failure``, which carries the contract's error, its
kind, and whether the request may have reached upstream (``sent``): only a
request that was certainly not sent may be repeated.

``Transport`` is the whole interface (as httpx's ``handle_async_request``), so
the retry layer is tested with a transport that returns scripted answers, and
``AiohttpTransport`` is the one that talks to the network.
"""

from __future__ import annotations

import ssl
from typing import Final, Literal, NamedTuple, Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable

Kind = Literal["connect", "reset", "protocol", "timeout"]
KINDS: Final[tuple[Kind, ...]] = ("connect", "reset", "protocol", "timeout")
# Answers up to this size are read whole: every SOLAPI answer the gateway relays is
# far smaller (1000 record results are ~130 KiB), and holding one whole answer per
# connection is what lets the upstream slot go before a slow caller is served.
WHOLE_ANSWER_BYTES: Final = 256 * 1024


class UpstreamRequest(NamedTuple):
    """What the walk decided to send upstream, before signing. ``headers`` are
    never changed: each attempt sends a copy holding its own Authorization.
    (Tuples, not frozen dataclasses: made on every request, and a tuple is
    made several times faster.)"""

    method: str
    target: str  # path and query exactly as received (checked canonical)
    headers: CIMultiDict[str]
    body: bytes | None
    on_throttle: bool = False  # the route opted in to retrying a throttled answer


class Outgoing(NamedTuple):
    """One attempt, signed: what goes on the wire, and how long it may take."""

    method: str
    url: URL
    headers: CIMultiDict[str]  # with this attempt's Authorization
    body: bytes | None
    timeout_s: float  # connecting, sending and reading the whole answer
    connect_timeout_s: float
    # How an https upstream is verified (upstream.ca_file); None: the system's CAs.
    ssl_context: ssl.SSLContext | None = None


class Failure(Exception):
    """No answer from one attempt (or an answer's body cut short)."""

    def __init__(self, kind: Kind, error: GatewayError, *, sent: bool) -> None:
        super().__init__(f"{kind}: {error.message}")
        self.kind = kind
        self.error = error
        self.sent = sent  # False only when upstream cannot have seen the request


class Answer:
    """Upstream's answer: status, reason and headers at once; the body as it
    arrives (``read``), or already whole when made with ``body``."""

    __slots__ = ("_read", "_response", "body", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        *,
        reason: str | None = None,
        body: bytes | None = None,
        response: aiohttp.ClientResponse | None = None,
    ) -> None:
        assert (body is None) != (response is None), "an answer has a body or a stream"
        self.status, self.headers, self.reason = status, headers, reason
        self.body = body
        self._response = response
        self._read = 0  # of ``body``

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body as they arrive; b"" at its end.
        Raises ``Failure`` if upstream fails before the body is complete."""
        if self._response is None:
            chunk = (self.body or b"")[self._read : self._read + size]
            self._read += len(chunk)
            return chunk
        try:
            return await self._response.content.read(size)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise failure(exc) from None

    def release(self) -> None:
        """Give the connection back to the pool (or drop it if the body was not read)."""
        if self._response is not None:
            self._response.release()


class Transport(Protocol):
    async def send(self, outgoing: Outgoing) -> Answer:
        """Send one attempt: its answer (any status), or raise ``Failure``."""
        ...


class AiohttpTransport:
    """Attempts over one pooled aiohttp session (made and closed by its owner)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        # Most attempts are first attempts, with the same two timeouts each time.
        self._timeouts: dict[tuple[float, float], aiohttp.ClientTimeout] = {}

    async def send(self, outgoing: Outgoing) -> Answer:
        key = (outgoing.timeout_s, outgoing.connect_timeout_s)
        timeout = self._timeouts.get(key)
        if timeout is None:
            if len(self._timeouts) >= 16:  # retries' shorter ones come and go
                self._timeouts.clear()
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(total=key[0], sock_connect=key[1])
        try:
            response = await self._session.request(
                outgoing.method,
                outgoing.url,
                headers=outgoing.headers,
                data=outgoing.body,
                allow_redirects=False,
                timeout=timeout,
                # Never False: certificate and host name are always checked.
                ssl=outgoing.ssl_context or True,
            )
        except Exception as exc:
            raise failure(exc) from None
        length = response.content_length
        if length is None or length > WHOLE_ANSWER_BYTES:
            return Answer(
                response.status, response.headers, reason=response.reason, response=response
            )
        try:
            body = await response.read()  # gives the connection back once it is read
        except Exception as exc:
            response.close()
            raise failure(exc) from None
        return Answer(response.status, response.headers, reason=response.reason, body=body)


def failure(exc: BaseException) -> Failure:
    """The ``Failure`` an aiohttp/OS exception means; any other exception is re-raised."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        # A connect timeout: no byte of the request left the gateway.
        sent = not isinstance(exc, aiohttp.ConnectionTimeoutError)
        error: GatewayError = UpstreamTimeout("The upstream did not answer in time.")
        return Failure("timeout", error, sent=sent)
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = UpstreamUnavailable("The upstream could not be reached.")
        return Failure("connect", error, sent=False)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | OSError):
        error = UpstreamUnavailable("The upstream closed the connection.")
        return Failure("reset", error, sent=True)
    if isinstance(exc, aiohttp.ClientError):
        error = UpstreamUnavailable("The upstream sent an answer that could not be read.")
        return Failure("protocol", error, sent=True)
    raise exc
