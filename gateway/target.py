"""The request target as it arrived, and whether the gateway will touch it.

Policy is decided on exactly the path that is forwarded, so the gateway never
decodes or normalises a path: instead it refuses every target a server behind
it could read differently. Only origin-form targets (``/path?query``) pass;
the path may not hold ``%`` (any percent-encoding, ``%25`` included), ``\\``,
``//``, ``.`` or ``..`` segments, control characters or non-ASCII, and the
target may not carry a fragment. The query string is forwarded unchanged.
"""

from __future__ import annotations

import re
from typing import Final

from gateway.errors import InvalidPath

_FORBIDDEN: Final = frozenset("%\\#") | frozenset(chr(c) for c in range(33)) | {"\x7f"}


# The characters a plain path or query holds: printable ASCII but for %, \ and #.
# One match in C clears nearly every target (a per-character check in Python
# cost more than the rest of this module); anything else gets the full check.
_PLAIN: Final = re.compile(r"[\x21\x22\x24\x26-\x5b\x5d-\x7e]*")
_PLAIN_QUERY: Final = re.compile(r"[\x21\x22\x24-\x7e]*")  # % and \ allowed there


def split_target(raw: str) -> tuple[str, str]:
    """Return (path, query) of a canonical origin-form target, or raise InvalidPath."""
    path, _, query = raw.partition("?")
    if (
        path[:1] == "/"
        and _PLAIN.fullmatch(path)
        and "//" not in path
        and "/." not in path  # a . or .. segment, or a name that merely starts with a dot
        and _PLAIN_QUERY.fullmatch(query)
    ):
        return path, query
    return _refuse(raw)


def _refuse(raw: str) -> tuple[str, str]:
    """The full check, for a target the searches above did not clear: it raises
    the InvalidPath that says what is wrong (or, never in practice, passes it)."""
    if not raw.startswith("/"):
        raise InvalidPath("The request target must be a path starting with /.")
    if "#" in raw:
        raise InvalidPath("The request target must not carry a fragment.")
    path, _, query = raw.partition("?")
    if not path.isascii() or not _FORBIDDEN.isdisjoint(path):
        raise InvalidPath("The path must not hold %, \\, control characters or non-ASCII.")
    if "//" in path:
        raise InvalidPath("The path must not hold empty segments (//).")
    for segment in path.split("/"):
        if segment in (".", ".."):
            raise InvalidPath("The path must not hold . or .. segments.")
    if not query.isascii() or any(ord(c) < 33 or c == "\x7f" for c in query):
        raise InvalidPath("The query must not hold control characters or non-ASCII.")
    return path, query
