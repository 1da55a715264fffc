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
import re

# The regex parser and its opcodes: public in all but name (typeshed has no stubs).
import re._constants as sre  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]
from functools import cached_property
from typing import Any, Final

import orjson
from pydantic import Field

from gateway.errors import (
    BatchEmpty,
    BatchTooLarge,
    DuplicateItems,
    InvalidBody,
    InvalidItem,
    InvalidJSON,
    UnsupportedMediaType,
)
from gateway.schema import Bool, Count, Model, NonEmpty, Regex

MAX_REPORTED: Final = 10  # offending indices listed in ``details``


class BatchRule(Model):
    """``batch:`` on a route: the body is a JSON object holding a list of items."""

    field: NonEmpty = Field(description="the top-level member holding the items")
    max_items: Count = Field(description="the most items one request may hold")
    item_pattern: Regex | None = Field(None, description="each item must fully match it")
    unique: Bool = Field(True, description="refuse a batch naming one item twice")

    @cached_property
    def joined(self) -> re.Pattern[str] | None:
        """``item_pattern`` for all items at once, joined by newlines: see joined_pattern()."""
        return joined_pattern(self.item_pattern) if self.item_pattern else None


def joined_pattern(pattern: re.Pattern[str]) -> re.Pattern[str] | None:
    """A pattern that fully matches ``"\n".join(items)`` exactly when every item
    fully matches ``pattern`` and none holds a newline; None if no such pattern
    can be built safely.

    One compiled match over the joined items replaces a Python-level loop of
    ``fullmatch`` calls (about 2.5x faster for 1000 record IDs). It is exact
    only when ``pattern`` can never match a newline itself, does not look
    around or refer back (which could see into a neighbour), and anchors with
    ``^``/``$`` rather than ``\\A``/``\\Z``: under MULTILINE, ``^`` and ``$``
    then anchor at each item's edges. Anything else keeps the per-item loop.
    """
    try:
        tree = sre_parse.parse(pattern.pattern, pattern.flags)
    except re.error:
        return None
    if not _never_matches_newline(tree, bool(pattern.flags & re.DOTALL)):
        return None
    source = pattern.pattern
    # Each item must end at its line's end ($), so the loop over the following
    # items can be possessive (*+): giving an item back could never lead to a
    # full match, and not keeping the way back makes the match ~25% faster.
    try:
        return re.compile(f"(?:{source})$(?:\n(?:{source})$)*+", pattern.flags | re.MULTILINE)
    except re.error:  # e.g. inline global flags, which must lead the whole expression
        return None


_SAFE_CATEGORIES: Final = frozenset({sre.CATEGORY_DIGIT, sre.CATEGORY_WORD})
_REPEATS: Final = frozenset({sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT})


def _never_matches_newline(tree: Any, dotall: bool) -> bool:
    for op, arg in tree:
        if op is sre.LITERAL:
            if arg == 10:
                return False
        elif op is sre.ANY:
            if dotall:
                return False
        elif op is sre.IN:
            for kind, value in arg:
                if kind is sre.NEGATE or (kind is sre.LITERAL and value == 10):
                    return False
                if kind is sre.RANGE and value[0] <= 10 <= value[1]:
                    return False
                if kind is sre.CATEGORY and value not in _SAFE_CATEGORIES:
                    return False
        elif op in _REPEATS:
            if not _never_matches_newline(arg[2], dotall):
                return False
        elif op is sre.SUBPATTERN:
            _group, add_flags, _del_flags, sub = arg
            if not _never_matches_newline(sub, dotall or bool(add_flags & re.DOTALL)):
                return False
        elif op is sre.ATOMIC_GROUP:
            if not _never_matches_newline(arg, dotall):
                return False
        elif op is sre.BRANCH:
            if not all(_never_matches_newline(branch, dotall) for branch in arg[1]):
                return False
        elif op is sre.AT:
            if arg in (sre.AT_BEGINNING_STRING, sre.AT_END_STRING):
                return False
        else:  # NOT_LITERAL, look-arounds, back-references, conditionals...
            return False
    return True


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
    """The JSON document in ``body``, read as strictly as ``_strict`` reads it.

    orjson reads the usual body in half the time. Where it could read a body
    differently from the strict reader (a duplicate key keeps its last value; an
    integer beyond 64 bits becomes a float), the strict reader decides instead.
    """
    if body.startswith(b"\xef\xbb\xbf"):
        raise InvalidJSON("The body starts with a byte order mark.")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _strict(body)  # the strict reader finds the error (or reads it after all)
    # Every ':' outside a string separates one object member. If orjson kept
    # fewer members than there are ':' bytes, a key may repeat (or a string
    # holds a ':'): let the strict reader look.
    try:
        members = _members(document)
    except RecursionError:  # orjson nests deeper than this walk may recurse
        return _strict(body)
    colons = len(body) - len(body.replace(b":", b""))  # 10x faster than bytes.count here
    if members != colons:
        return _strict(body)
    return document


def _members(value: Any) -> int:
    """Object members in ``value``, or -1 for a number orjson may have read as a float."""
    kind = type(value)
    if kind is dict:
        total = len(value)
        for item in value.values():
            inner = _members(item)
            if inner < 0:
                return -1
            total += inner
        return total
    if kind is list:
        try:
            "".join(value)  # a list of strings holds no objects: no need to look in it
            return 0
        except TypeError:
            pass
        total = 0
        for item in value:
            inner = _members(item)
            if inner < 0:
                return -1
            total += inner
        return total
    if kind is float and value.is_integer() and abs(value) >= 2**63:
        return -1
    return 0


def _strict(body: bytes) -> Any:
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


def _all_valid(items: list[Any], rule: BatchRule) -> bool:
    """True when every item is a string matching the rule, decided without a Python
    loop per item; False means "look item by item" (which finds the offenders)."""
    try:
        text = "\n".join(items)  # TypeError unless every item is a string
    except TypeError:
        return False
    if rule.item_pattern is None:
        return True
    joined = rule.joined
    return (
        joined is not None
        and text.count("\n") == len(items) - 1  # no item holds a newline of its own
        and joined.fullmatch(text) is not None
    )


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
    if not _all_valid(items, rule):
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
