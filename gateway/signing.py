"""SOLAPI's HMAC-SHA256 request signing: making headers and verifying them.

    Authorization: HMAC-SHA256 apiKey=<key>, date=<date>, salt=<salt>, signature=<sig>
    sig = hex(HMAC-SHA256(key=secret, msg=date + salt))

The gateway signs every upstream attempt with a fresh date and salt. The same
module verifies headers, for the sandbox upstream and for internal callers that
sign with an SDK: one implementation, so the two can never disagree about
what a valid signature is. It accepts every dialect the official SDKs send:
``apiKey=``/``ApiKey=`` and ``date=``/``Date=``, ``Z`` or ``+09:00`` offsets,
no fraction up to nanoseconds, hex, uuid and alphanumeric salts.

Everything here is pure: clocks and randomness come in as arguments.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from gateway.names import API_KEY

SCHEME: Final = "HMAC-SHA256"
WINDOW_S: Final = 15 * 60
_MAX_HEADER_CHARS: Final = 1024

_DATE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})", re.ASCII
)
# 12-64 alphanumerics; hyphens only inside, so uuid text salts pass too.
_SALT = re.compile(r"[0-9A-Za-z](?:[0-9A-Za-z-]{10,62})[0-9A-Za-z]")
_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")
_PARTS: Final = {"apikey": "api_key", "date": "date", "salt": "salt", "signature": "signature"}


class Secret:
    """A secret string that will not print itself: repr, str and format all hide it."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "environment") -> None:
        self._value = value
        self.source = source  # where it was read from, for summaries: "file PATH" or "environment"

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(
            self._value.encode(), other._value.encode()
        )

    def __hash__(self) -> int:
        return hash(Secret)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


def signature(secret: Secret, date: str, salt: str) -> str:
    return hmac.new(secret.reveal().encode(), (date + salt).encode(), hashlib.sha256).hexdigest()


def format_date(now: datetime) -> str:
    """The seed's own form: ``2026-11-28T09:15:02Z``."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_formatted: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def current_date() -> str:
    """``format_date`` of now, formatted once a second rather than once a request."""
    second = int(time.time())
    if second != _formatted[0]:
        _formatted[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))]
    return str(_formatted[1])


def new_salt() -> str:
    return secrets.token_hex(16)


def authorization(api_key: str, secret: Secret, date: str, salt: str) -> str:
    sig = signature(secret, date, salt)
    return f"{SCHEME} apiKey={api_key}, date={date}, salt={salt}, signature={sig}"


@dataclass(frozen=True, slots=True)
class Signer:
    """Signs with the gateway's real credentials. One per loaded config."""

    api_key: str
    secret: Secret

    def header_for(self, date: str, salt: str) -> str:
        return authorization(self.api_key, self.secret, date, salt)

    def fresh_header(self) -> str:
        """A header with the current date and a new salt: one per upstream attempt."""
        return self.header_for(current_date(), new_salt())


# --- verifying --------------------------------------------------------------


class Rejected(Exception):
    """A header that does not verify. ``code`` is SOLAPI's own errorCode."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


MALFORMED: Final = "Unauthorized"  # SOLAPI answers a missing/garbled header with 401


@dataclass(frozen=True, slots=True)
class HmacCredentials:
    api_key: str
    date: str
    salt: str
    signature: str
    timestamp: float  # the date as POSIX seconds


def parse(header: str) -> HmacCredentials:
    """Parse an ``HMAC-SHA256 ...`` header value; raise Rejected(MALFORMED) if it is not one."""
    if len(header) > _MAX_HEADER_CHARS:
        raise Rejected(MALFORMED, "authorization header too long")
    scheme, _, rest = header.strip().partition(" ")
    if scheme.upper() != SCHEME:
        raise Rejected(MALFORMED, "not an HMAC-SHA256 header")
    # A reason never quotes the header: a caller may have put a token in it (say,
    # ``HMAC-SHA256 <bearer token>``), and reasons go to the access log.
    found: dict[str, str] = {}
    parts = rest.split(",")
    for number, part in enumerate(parts, 1):
        name, eq, value = part.strip().partition("=")
        field = _PARTS.get(name.lower())
        if not eq or field is None:
            raise Rejected(
                MALFORMED,
                f"part {number} of {len(parts)} is not apiKey=, date=, salt= or signature=",
            )
        if field in found:
            raise Rejected(MALFORMED, f"repeated part {name.lower()}")
        found[field] = value.strip()
    missing = [name for name in _PARTS.values() if name not in found]
    if missing:
        raise Rejected(MALFORMED, f"missing {', '.join(missing)}")
    if not API_KEY.fullmatch(found["api_key"]):
        raise Rejected(MALFORMED, "malformed apiKey")
    if not _DATE.fullmatch(found["date"]):
        raise Rejected(MALFORMED, "date is not ISO 8601 with a zone")
    if not _SALT.fullmatch(found["salt"]):
        raise Rejected(MALFORMED, "salt must be 12-64 letters and digits")
    if not _SIGNATURE.fullmatch(found["signature"]):
        raise Rejected(MALFORMED, "signature must be 64 hex digits")
    try:
        timestamp = datetime.fromisoformat(found["date"]).timestamp()
    except ValueError as exc:  # e.g. month 13: the shape was right, the date is not
        raise Rejected(MALFORMED, "date is not a real date") from exc
    return HmacCredentials(
        api_key=found["api_key"],
        date=found["date"],
        salt=found["salt"],
        signature=found["signature"].lower(),
        timestamp=timestamp,
    )


REPLAY_REUSED: Final = "salt already used within the window"
REPLAY_FULL: Final = "replay memory full"


class ReplayMemory(Protocol):
    """Where a verifier remembers the salts it accepted.

    ``ReplayCache`` below, the sandbox's; the gateway's own, bounded per key and
    shared by workers or replicas, is gateway/replay.py behind gateway/state.py.
    """

    def check_and_add(self, key: str, now: float) -> str | None:
        """Atomically record ``key``; return why it must be refused, or None if it is new."""
        ...

    def close(self) -> None:
        """Let go of what it holds (a file, a connection) once the process is done with it."""
        ...


class ReplayCache:
    """Remembers (key, salt) pairs for as long as their signature could still verify.

    A signature is accepted only within ``window_s`` of its date, and its date within
    ``window_s`` of now, so nothing needs remembering longer than ``2 * window_s``
    after it was first seen. Keeping that constant horizon keeps insertion order
    equal to expiry order, so eviction is a pop from the front. Memory is bounded
    by ``max_entries``; when every slot is still live the cache refuses new
    entries (fails closed) rather than forget one that could be replayed.
    """

    def __init__(self, window_s: float = WINDOW_S, max_entries: int = 1_000_000) -> None:
        self._horizon = 2 * window_s
        self._max = max_entries
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def check_and_add(self, key: str, now: float) -> str | None:
        """Record ``key``; return why it must be refused, or None if it is new."""
        expiry = self._expiry
        while expiry:
            oldest_key, oldest = next(iter(expiry.items()))
            if oldest > now:
                break
            del expiry[oldest_key]
        if key in expiry:
            return REPLAY_REUSED
        if len(expiry) >= self._max:
            return REPLAY_FULL
        expiry[key] = now + self._horizon
        return None

    def close(self) -> None:
        self._expiry.clear()


class Verifier:
    """Verifies SOLAPI headers against known key pairs, as SOLAPI itself does."""

    def __init__(
        self,
        secrets_by_key: dict[str, Secret],
        *,
        window_s: float = WINDOW_S,
        replay: ReplayMemory | None = None,
    ) -> None:
        self._secrets = secrets_by_key
        self._window_s = window_s
        self.replay: ReplayMemory = replay if replay is not None else ReplayCache(window_s)

    def verify(self, header: str, now: float) -> HmacCredentials:
        """Return the verified credentials, or raise Rejected with SOLAPI's errorCode:
        ``check``, then the salt recorded in this verifier's own replay memory."""
        creds = self.check(header, now)
        # Only a valid signature is remembered, so garbage cannot fill the memory.
        refusal = self.replay.check_and_add(f"{creds.api_key}:{creds.salt}", now)
        if refusal is not None:
            raise Rejected("DuplicatedSignature", refusal)
        return creds

    def check(self, header: str, now: float) -> HmacCredentials:
        """The signature and its date, without the replay memory: pure. The gateway
        asks its shared replay memory afterwards (gateway/state.py)."""
        creds = parse(header)
        secret = self._secrets.get(creds.api_key)
        if secret is None:
            raise Rejected("InvalidAPIKey", "unknown apiKey")
        if abs(now - creds.timestamp) > self._window_s:
            raise Rejected("RequestTimeTooSkewed", "date too far from now")
        expected = signature(secret, creds.date, creds.salt)
        if not hmac.compare_digest(expected, creds.signature):
            raise Rejected("SignatureDoesNotMatch", "signature does not match")
        return creds
