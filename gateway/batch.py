"""Body checks for routes with a ``batch:`` rule, e.g. ``recordIds`` on the restore.

The body is forwarded byte for byte, so these checks only read it. They are
strict where a lenient parser would let two readers disagree about what was
sent: duplicate object keys, NaN/Infinity, a BOM or invalid UTF-8 are all
``InvalidJSON``, because upstream might read such a body differently from us.

    check_media(content_type, content_encoding)   → 415 UnsupportedMediaType
    validate(body, rule)                          → 400 InvalidJSON / InvalidBody /
                                                    BatchEmpty / BatchTooLarge /
                                                    InvalidItem / DuplicateItems
    checked_items(body, rule)                     → the same checks; the items themselves
    check_document(parse_json(body), rule)        → the same in two steps, so a body is
                                                    parsed once for its batch and its rules
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from gateway.errors import (
    BatchEmpty,
    BatchTooLarge,
    DuplicateItems,
    InvalidBody,
    InvalidItem,
    InvalidJSON,
    UnsupportedMediaType,
)
from gateway.policy import BatchRule

MAX_REPORTED: Final = 10  # offending indices listed in ``details``


def check_media(content_type: str | None, content_encoding: str | None) -> None:
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType("This route takes Content-Type: application/json.")
    if content_encoding is not None and content_encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedMediaType("Request bodies must not be compressed (Content-Encoding).")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float
)


def parse_json(body: bytes) -> Any:
    if body.startswith(b"\xef\xbb\xbf"):
        raise InvalidJSON("The body starts with a byte order mark.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidJSON("The body is not valid UTF-8.") from None
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, duplicate keys, NaN and over-long integers.
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        if isinstance(exc, RecursionError):
            message = "nested too deeply"
        raise InvalidJSON(f"The body is not valid JSON: {message}.") from None


def _offenders(indices: list[int], field: str) -> dict[str, Any]:
    return {"field": field, "indices": indices[:MAX_REPORTED], "count": len(indices)}


def validate(body: bytes, rule: BatchRule) -> int:
    """Check a batch body against ``rule``; return its number of items."""
    return len(checked_items(body, rule))


def checked_items(body: bytes, rule: BatchRule) -> list[str]:
    """Check a batch body against ``rule``; return its items (e.g. for the audit log)."""
    return check_document(parse_json(body), rule)


def check_document(document: Any, rule: BatchRule) -> list[str]:
    """``checked_items`` for a body already parsed with ``parse_json``."""
    if not isinstance(document, dict):
        raise InvalidBody("The body must be a JSON object.")
    if rule.field not in document:
        raise InvalidBody(f"The body must hold {rule.field!r}.", details={"field": rule.field})
    items = document[rule.field]
    if not isinstance(items, list):
        raise InvalidBody(f"{rule.field!r} must be a list.", details={"field": rule.field})
    count = len(items)
    if count == 0:
        raise BatchEmpty(f"{rule.field!r} is empty.", details={"field": rule.field})
    if count > rule.max_items:
        raise BatchTooLarge(
            f"{rule.field!r} holds {count} items; at most {rule.max_items} are allowed.",
            details={"field": rule.field, "count": count, "max_items": rule.max_items},
        )
    pattern = rule.item_pattern
    bad = [
        i
        for i, item in enumerate(items)
        if not isinstance(item, str) or (pattern is not None and not pattern.fullmatch(item))
    ]
    if bad:
        raise InvalidItem(
            f"{len(bad)} item(s) of {rule.field!r} are not valid IDs.",
            details=_offenders(bad, rule.field),
        )
    if rule.unique and len(set(items)) != count:
        seen: set[str] = set()
        repeats = []
        for i, item in enumerate(items):
            if item in seen:
                repeats.append(i)
            seen.add(item)
        raise DuplicateItems(
            f"{len(repeats)} item(s) of {rule.field!r} repeat an earlier one.",
            details=_offenders(repeats, rule.field),
        )
    return items
