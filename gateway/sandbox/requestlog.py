"""What the sandbox received, for tests to check what the gateway really sent.

One ``ReceivedRequest`` per API request, signed or not, kept in a ring of the
last ``LOG_CAPACITY``; the counters and the set of distinct salts are kept
whole since the start or the last reset (``GET /_sandbox/requests`` and
``POST /_sandbox/reset``, see gateway/sandbox/app.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from gateway.signing import Rejected, parse

LOG_CAPACITY: Final = 5000


@dataclass(slots=True)
class ReceivedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body_sha256: str
    body_length: int
    salt: str | None
    api_key: str | None
    verified: bool = False
    status: int | None = None


@dataclass(slots=True)
class RequestLog:
    count: int = 0
    accepted: int = 0
    entries: deque[ReceivedRequest] = field(default_factory=lambda: deque(maxlen=LOG_CAPACITY))
    # Every salt since the start or reset (about 100 bytes each): a test tool's memory.
    salts: set[str] = field(default_factory=set)

    def add(self, entry: ReceivedRequest) -> None:
        self.count += 1
        self.entries.append(entry)
        if entry.salt is not None:
            self.salts.add(entry.salt)

    def reset(self) -> None:
        self.count = 0
        self.accepted = 0
        self.entries.clear()
        self.salts.clear()

    def as_json(self) -> dict[str, Any]:
        entries = [dataclasses.asdict(entry) for entry in self.entries]
        return {
            "count": self.count,
            "accepted": self.accepted,
            "distinct_salts": len(self.salts),
            "requests": entries,
        }


def received(request: web.Request, body: bytes, authorizations: list[str]) -> ReceivedRequest:
    """The log entry of one request, before it is verified or answered."""
    api_key = salt = None
    if len(authorizations) == 1:
        try:
            creds = parse(authorizations[0])
        except Rejected:
            pass
        else:
            api_key, salt = creds.api_key, creds.salt
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    # raw_path is the request target as sent, query included and nothing decoded.
    path, _, query = request.raw_path.partition("?")
    return ReceivedRequest(
        method=request.method,
        path=path,
        query=query,
        headers=headers,
        body_sha256=hashlib.sha256(body).hexdigest(),
        body_length=len(body),
        salt=salt,
        api_key=api_key,
    )
