"""Which headers cross the gateway, in each direction.

Upstream gets an allow-list, not a deny-list: a header nobody thought of
(a new identity header, a cookie variant, a tracing header holding a token)
stays behind unless the operator names it in ``forward_headers``. The caller's
``Authorization`` never goes on: the gateway adds its own, signed afresh.

Downstream, upstream's answer comes back whole except for hop-by-hop headers,
which describe one connection and not the message, and ``Set-Cookie``: a
cookie upstream sets would be kept by the caller's client for the gateway's
address and sent back to every route behind it (and never forwarded).

Trace context (W3C ``traceparent`` and ``tracestate``) is the one exception to
the allow-list, and only when well-formed: ``incoming_trace`` picks it out, and
``gateway/tracing.py`` decides what upstream gets (the same header when tracing
is off, the gateway's own child span's when it is on).
"""

from __future__ import annotations

import os
from typing import Final

from multidict import CIMultiDict, MultiMapping

from gateway.names import REQUEST_ID, TRACEPARENT, TRACESTATE_MAX

# Describe one connection, not the message: never forwarded, in either direction.
HOP_BY_HOP: Final = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade", "proxy-authenticate", "proxy-authorization",
    }
)  # fmt: skip
# Never forwarded upstream, whatever ``forward_headers`` lists: the gateway sets
# its own Authorization, Host and Content-Length, and cookies stay behind.
NEVER_FORWARDED: Final = HOP_BY_HOP | {"authorization", "cookie", "host", "content-length"}
# Headers that change how upstream frames the body, which method or target it acts
# on, or whether it waits: the gateway decides those, so ``forward_headers`` may not
# list them (a config error). Content-Encoding would make upstream decode a body the
# gateway checked as plain bytes; the method overrides would turn a route's POST into
# a DELETE behind its back; X-Original-URL and X-Rewrite-URL a path into another.
CHANGES_THE_REQUEST: Final = frozenset(
    {
        "content-encoding", "content-length", "transfer-encoding", "te", "trailer",
        "expect", "upgrade", "x-http-method-override", "x-http-method",
        "x-method-override", "x-original-method", "x-original-url", "x-rewrite-url",
    }
)  # fmt: skip
# Never passed back to the caller.
NEVER_RETURNED: Final = HOP_BY_HOP | {"set-cookie", "set-cookie2", "x-request-id"}
# Headers a request may carry once at most (RFC 9110's singletons, as aiohttp's
# parser refuses a second one): two of them leave each reader to pick its own.
ONCE_ONLY: Final = (
    "Host", "Content-Length", "Content-Type", "Transfer-Encoding", "User-Agent",
    "Max-Forwards", "Content-Location", "Content-Range", "ETag", "Server",
)  # fmt: skip
# Always forwarded upstream when the caller sends them (with X-Request-ID).
ALWAYS_FORWARDED: Final = (
    "Content-Type", "Accept", "Accept-Encoding", "Accept-Language", "User-Agent",
)  # fmt: skip
# Headers that cannot be the policy's trusted identity headers: the request needs them.
NOT_IDENTITY: Final = frozenset(
    {
        "authorization", "cookie", "host", "content-type", "content-length",
        "transfer-encoding", "connection", "x-request-id",
    }
)  # fmt: skip


def request_id(headers: MultiMapping[str]) -> str:
    """The caller's X-Request-ID if it is exactly one sane value, else a new one."""
    given = headers.getall("X-Request-ID", ())
    if len(given) == 1 and REQUEST_ID.fullmatch(given[0]):
        return given[0]
    return new_request_id()


def new_request_id() -> str:
    """32 random hex digits, as unique as uuid4().hex: taken from a pool of random
    bytes drawn 64 ids at a time, so most requests cost no getrandom(2) call."""
    if not _ids:
        pool = os.urandom(16 * 64).hex()
        _ids.extend(pool[i : i + 32] for i in range(0, len(pool), 32))
    return _ids.pop()


_ids: list[str] = []
os.register_at_fork(after_in_child=_ids.clear)  # a child never repeats its parent's


def incoming_trace(headers: MultiMapping[str]) -> tuple[str | None, str | None]:
    """The caller's ``traceparent`` if it is exactly one valid value, and then its
    ``tracestate`` if that is one value of sane length; else (None, None)."""
    parents = headers.getall("traceparent", ())
    if len(parents) != 1:
        return None, None
    parent = parents[0].strip()
    # Version 00 has exactly four fields; a later version may append more.
    if not TRACEPARENT.fullmatch(parent) or (parent[:2] == "00" and len(parent) != 55):
        return None, None
    states = headers.getall("tracestate", ())
    state = states[0] if len(states) == 1 and len(states[0]) <= TRACESTATE_MAX else None
    return parent, state


def upstream_headers(
    incoming: MultiMapping[str],
    forward: tuple[str, ...],
    request_id: str,
) -> CIMultiDict[str]:
    """The headers upstream gets; ``Authorization`` is added per attempt when signing."""
    out: CIMultiDict[str] = CIMultiDict()
    for name in ALWAYS_FORWARDED:
        for value in incoming.getall(name, ()):
            out.add(name, value)
    for name in forward:
        for value in incoming.getall(name, ()):
            out.add(name, value)
    out["X-Request-ID"] = request_id
    return out


def downstream_headers(
    upstream: MultiMapping[str], request_id: str, into: CIMultiDict[str] | None = None
) -> CIMultiDict[str]:
    """Upstream's answer headers for the caller, added to ``into`` (e.g. a response's
    own headers, to spare a copy) or to a new multidict."""
    # Headers named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
    named = {
        token.strip().lower()
        for value in upstream.getall("Connection", ())
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict() if into is None else into
    for name, value in upstream.items():
        lowered = name.lower()
        if lowered in NEVER_RETURNED or lowered in named:
            continue
        out.add(name, value)
    out["X-Request-ID"] = request_id
    return out
