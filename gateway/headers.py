"""Which headers cross the gateway, in each direction.

Upstream gets an allow-list, not a deny-list: a header nobody thought of
(a new identity header, a cookie variant, a tracing header holding a token)
stays behind unless the operator names it in ``forward_headers``. The caller's
``Authorization`` never goes on: the gateway adds its own, signed afresh.

Downstream, upstream's answer comes back whole except for hop-by-hop headers,
which describe one connection and not the message.
"""

from __future__ import annotations

import os
from typing import Final

from multidict import CIMultiDict, MultiMapping

from gateway.names import REQUEST_ID

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
        if lowered in HOP_BY_HOP or lowered in named or lowered == "x-request-id":
            continue
        out.add(name, value)
    out["X-Request-ID"] = request_id
    return out
