"""gateway/batch.py: the recordIds checks, pure and without a network."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import batch
from gateway.batch import BatchRule
from gateway.errors import GatewayError

PATTERN = re.compile(r"^CRMRC[0-9]{16}[0-9A-Za-z]{11}$")
RULE = BatchRule(field="recordIds", max_items=1000, item_pattern=PATTERN, unique=True)
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
    rule = BatchRule(field="recordIds", max_items=10, item_pattern=PATTERN, unique=False)
    assert batch.validate(body({"recordIds": [ID, ID]}), rule) == 2


def test_without_a_pattern_any_string_passes() -> None:
    rule = BatchRule(field="ids", max_items=3, item_pattern=None, unique=True)
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


# --- the joined fast path must agree with the per-item loop -----------------------------

PATTERNS = [
    r"^CRMRC[0-9]{16}[0-9A-Za-z]{11}$",
    r"[a-c]+",
    r"^\d{1,3}$",
    r"(ab|c)*",
    r"\w+\b",
    r"^$",
    r".+",
    r"(?:a|b)?c",
    r"[^,]+",  # can match a newline: no fast path
    r"(?s).+",
    r"a(?=b)|b",
    r"(a)\1",
    r"\Aab\Z",
    r"(?i)abc",
    r"[\s\S]",
    r"\D+",
    r"[0-9]+?",  # lazy: the shortest match is not the item
    r"(a|ab)(c|bcd)?",
]


@pytest.mark.parametrize(
    ("pattern", "fast"),
    [
        (r"^CRMRC[0-9]{16}[0-9A-Za-z]{11}$", True),
        (r"[a-c]+", True),
        (r".+", True),
        (r"\w+\b", True),
        (r"[^,]+", False),
        (r"(?s).+", False),
        (r"a(?=b)|b", False),
        (r"(a)\1", False),
        (r"\Aab\Z", False),
        (r"[\s\S]", False),
        (r"\D+", False),
        (r"[\x00-\x1f]", False),
    ],
)
def test_the_joined_pattern_is_built_only_when_it_is_exact(pattern: str, fast: bool) -> None:
    assert (
        BatchRule(field="ids", max_items=10, item_pattern=re.compile(pattern), unique=True).joined
        is not None
    ) is fast


@given(
    st.sampled_from(PATTERNS),
    st.lists(st.text(alphabet="abc,1 \n9xCRM", max_size=6), min_size=1, max_size=8),
)
def test_joined_check_agrees_with_the_item_by_item_check(pattern: str, items: list[str]) -> None:
    compiled = re.compile(pattern)
    rule = BatchRule(field="ids", max_items=100, item_pattern=compiled, unique=False)
    per_item = [i for i, item in enumerate(items) if not compiled.fullmatch(item)]
    raw = body({"ids": items})
    if per_item:
        with pytest.raises(GatewayError) as err:
            batch.validate(raw, rule)
        assert err.value.details["indices"] == per_item[:10]
    else:
        assert batch.validate(raw, rule) == len(items)


# --- the fast reader must read exactly what the strict reader reads ------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='ab:"\\{}é\u2028', max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(alphabet="ab:", max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)


def both_readers(raw: bytes) -> tuple[object, object]:
    def read(reader: object) -> object:
        try:
            return ("ok", reader(raw))  # type: ignore[operator]
        except GatewayError as exc:
            return ("error", exc.code)

    return read(batch.parse_json), read(batch._strict)


@given(json_values)
def test_fast_and_strict_readers_agree_on_documents(value: object) -> None:
    fast, strict = both_readers(json.dumps(value).encode())
    assert fast == strict


@given(st.lists(st.sampled_from(['{"a":1,', '"a":2}', "[", "]", '"x:y"', ",", "1e999", "NaN",
                                 "12345678901234567890123", ":", '"\\ud800"', "{}", " "]),
                max_size=8))  # fmt: skip
def test_fast_and_strict_readers_agree_on_fragments(parts: list[str]) -> None:
    fast, strict = both_readers("".join(parts).encode())
    assert fast == strict


def test_duplicate_keys_are_caught_even_where_orjson_would_keep_the_last() -> None:
    assert both_readers(b'{"recordIds": ["a"], "recordIds": ["b"]}')[0] == ("error", "InvalidJSON")
    big = b'{"n": 123456789012345678901234567890}'
    assert batch.parse_json(big) == {"n": 123456789012345678901234567890}  # exact, not a float
    deep = b'{"a":' * 1000 + b"1" + b"}" * 1000
    assert both_readers(deep)[0] == both_readers(deep)[1]
