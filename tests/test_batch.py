"""gateway/batch.py: the recordIds checks, pure and without a network."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import batch
from gateway.errors import GatewayError
from gateway.policy import BatchRule

PATTERN = re.compile(r"^CRMRC[0-9]{16}[0-9A-Za-z]{11}$")
RULE = BatchRule("recordIds", 1000, PATTERN, True)
ID = "CRMRC1260422100000000REC11122233"  # the seed page's example


def ids(n: int) -> list[str]:
    return [f"CRMRC{i:016d}ABCDEFGHIJK" for i in range(n)]


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def code_of(raw: bytes, rule: BatchRule = RULE) -> str:
    with pytest.raises(GatewayError) as err:
        batch.validate(raw, rule)
    return err.value.code


def test_the_seed_example_passes() -> None:
    assert batch.validate(body({"recordIds": [ID]}), RULE) == 1


def test_a_full_batch_passes_and_extra_fields_are_allowed() -> None:
    assert batch.validate(body({"recordIds": ids(1000), "note": {"x": [1, 2]}}), RULE) == 1000


def test_batch_limits() -> None:
    assert code_of(body({"recordIds": []})) == "BatchEmpty"
    assert code_of(body({"recordIds": ids(1001)})) == "BatchTooLarge"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"recordIds": [1,]}',
        b'{"recordIds": ["a"], "recordIds": ["b"]}',  # duplicate keys
        b'{"a": {"b": 1, "b": 2}, "recordIds": []}',
        b'{"recordIds": [NaN]}',
        b'{"recordIds": [Infinity]}',
        b'{"recordIds": [-Infinity]}',
        b'{"recordIds": [1e400]}',
        b'{"recordIds": [' + b"9" * 5000 + b"]}",
        b"\xef\xbb\xbf" + body({"recordIds": [ID]}),
        b'{"recordIds": ["\xff\xfe"]}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_ambiguous_or_broken_json_is_invalid_json(raw: bytes) -> None:
    assert code_of(raw) == "InvalidJSON"


@pytest.mark.parametrize(
    "value",
    [[ID], "text", 3, None, {"ids": [ID]}, {"recordIds": ID}, {"recordIds": {"0": ID}}],
)
def test_wrong_shapes_are_invalid_body(value: object) -> None:
    assert code_of(body(value)) == "InvalidBody"


@pytest.mark.parametrize(
    "bad",
    [1, None, ["x"], {"id": ID}, True, ID + "\n", ID.lower(), ID[:-1], ID + "A", " " + ID, ""],
)
def test_bad_items_are_reported_by_index(bad: object) -> None:
    items: list[object] = [*ids(3), bad, *ids(2)]
    with pytest.raises(GatewayError) as err:
        batch.validate(body({"recordIds": items}), RULE)
    assert err.value.code == "InvalidItem"
    assert err.value.details == {"field": "recordIds", "indices": [3], "count": 1}


def test_reported_indices_are_bounded() -> None:
    with pytest.raises(GatewayError) as err:
        batch.validate(body({"recordIds": ["bad"] * 500}), RULE)
    assert err.value.details["indices"] == list(range(10))
    assert err.value.details["count"] == 500


def test_duplicates_are_reported_by_their_later_index() -> None:
    items = ids(5)
    items[4] = items[1]
    with pytest.raises(GatewayError) as err:
        batch.validate(body({"recordIds": items}), RULE)
    assert err.value.code == "DuplicateItems"
    assert err.value.details == {"field": "recordIds", "indices": [4], "count": 1}


def test_duplicates_allowed_when_unique_is_off() -> None:
    rule = BatchRule("recordIds", 10, PATTERN, unique=False)
    assert batch.validate(body({"recordIds": [ID, ID]}), rule) == 2


def test_without_a_pattern_any_string_passes() -> None:
    rule = BatchRule("ids", 3, None, True)
    assert batch.validate(body({"ids": ["a", "b"]}), rule) == 2
    assert code_of(body({"ids": ["a", 1]}), rule) == "InvalidItem"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        " application/json ",
    ],
)
def test_json_media_types_are_accepted(content_type: str) -> None:
    batch.check_media(content_type, None)
    batch.check_media(content_type, "identity")


@pytest.mark.parametrize(
    ("content_type", "encoding"),
    [
        (None, None),
        ("", None),
        ("text/plain", None),
        ("application/jsonx", None),
        ("application/x-www-form-urlencoded", None),
        ("application/json", "gzip"),
        ("application/json", "br"),
    ],
)
def test_other_media_is_415(content_type: str | None, encoding: str | None) -> None:
    with pytest.raises(GatewayError) as err:
        batch.check_media(content_type, encoding)
    assert err.value.code == "UnsupportedMediaType" and err.value.status == 415


valid_id = st.from_regex(r"\ACRMRC[0-9]{16}[0-9A-Za-z]{11}\Z")


@given(st.lists(valid_id, min_size=1, max_size=50, unique=True))
def test_any_unique_list_of_valid_ids_passes(items: list[str]) -> None:
    assert batch.validate(body({"recordIds": items}), RULE) == len(items)


@given(st.lists(valid_id, min_size=1, max_size=20), st.data())
def test_any_repeat_is_found(items: list[str], data: st.DataObject) -> None:
    repeat = data.draw(st.sampled_from(items))
    items = [*items, repeat]
    assert code_of(body({"recordIds": items})) == "DuplicateItems"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    try:
        batch.validate(raw, RULE)
    except GatewayError as exc:
        assert exc.status == 400
