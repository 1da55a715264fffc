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
    batch.check_media((content_type,), ())
    batch.check_media((content_type,), ("identity",))
    batch.check_media((content_type,), ("identity", "Identity"))


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=UTF-8",
        'application/json; charset="utf-8"',
        "application/json;charset=utf-8;v=1",
    ],
)
def test_utf_8_in_any_spelling_is_accepted(content_type: str) -> None:
    batch.check_media((content_type,), ())


@pytest.mark.parametrize(
    ("content_types", "encodings"),
    [
        ((), ()),
        (("",), ()),
        (("text/plain",), ()),
        (("application/jsonx",), ()),
        (("application/x-www-form-urlencoded",), ()),
        (("application/json",), ("gzip",)),
        (("application/json",), ("br",)),
        # Every Content-Encoding header counts, and every coding in each.
        (("application/json",), ("identity", "gzip")),
        (("application/json",), ("identity, gzip",)),
        # A charset upstream could read other keys in ("+AHA-ermanent" in UTF-7).
        (("application/json; charset=utf-7",), ()),
        (("application/json; Charset=UTF-7",), ()),
        (("application/json; charset=latin-1",), ()),
        (("application/json; charset=utf8",), ()),
        (("application/json; charset=utf-8; charset=utf-7",), ()),
        # Two Content-Type headers: which one upstream reads is its own business.
        (("application/json", "application/json"), ()),
        (("application/json", "text/plain"), ()),
    ],
)
def test_other_media_is_415(content_types: tuple[str, ...], encodings: tuple[str, ...]) -> None:
    with pytest.raises(GatewayError) as err:
        batch.check_media(content_types, encodings)
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
                                 "12345678901234567890123", ":", '"\\ud800"', "{}", " ",
                                 '"\\u003a"', '"\\u003A:"', '"\\\\u003a"', '"\\\\\\u003a"',
                                 '"a\\u003a"', '{"a\\u003a":1,']),
                max_size=10))  # fmt: skip
def test_fast_and_strict_readers_agree_on_fragments(parts: list[str]) -> None:
    fast, strict = both_readers("".join(parts).encode())
    assert fast == strict


def test_duplicate_keys_are_caught_even_where_orjson_would_keep_the_last() -> None:
    assert both_readers(b'{"recordIds": ["a"], "recordIds": ["b"]}')[0] == ("error", "InvalidJSON")
    big = b'{"n": 123456789012345678901234567890}'
    assert batch.parse_json(big) == {"n": 123456789012345678901234567890}  # exact, not a float
    deep = b'{"a":' * 1000 + b"1" + b"}" * 1000
    assert both_readers(deep)[0] == both_readers(deep)[1]


@pytest.mark.parametrize(
    ("raw", "document"),
    [
        # A ":" the body spells as an escape still counts as a string's own colon...
        (b'{"a":"\\u003a"}', {"a": ":"}),
        (b'{"a\\u003A":1}', {"a:": 1}),
        # ...unless its backslash is itself escaped: then it is six plain characters.
        (b'{"a":"\\\\u003a"}', {"a": "\\u003a"}),
        (b'{"a":"\\\\\\u003a:"}', {"a": "\\::"}),
    ],
)
def test_escaped_colons_are_no_duplicate_keys(raw: bytes, document: object) -> None:
    assert batch.parse_json(raw) == document


@pytest.mark.parametrize(
    "raw",
    [
        # orjson keeps {"a": ":"}: as many colons as the body had, were it not for the escape.
        b'{"a":1,"a":"\\u003a"}',
        b'{"a":1,"a":"\\u003a\\u003a"}',
        b'{"x":[{"k":1,"k":"\\u003A"}]}',
        b'{"a":"\\\\","a":"\\u003a"}',
    ],
)
def test_a_duplicate_key_hidden_behind_an_escaped_colon_is_found(raw: bytes) -> None:
    with pytest.raises(GatewayError) as err:
        batch.parse_json(raw)
    assert err.value.code == "InvalidJSON"
    assert "duplicate key" in err.value.message


def many_small_objects(n: int, *, tail: bytes = b"") -> bytes:
    """Valid JSON the size of the body limit: small objects and one ':' in a string."""
    return (
        b'{"recordIds": ["'
        + ID.encode()
        + b'"], "x": ['
        + b",".join([b'{"a":1}'] * n)
        + b'], "note": "a:b"'
        + tail
        + b"}"
    )


def test_a_body_of_many_small_objects_is_read_whole_and_exactly() -> None:
    raw = many_small_objects(1000)
    assert batch.parse_json(raw) == json.loads(raw)
    assert batch.validate(raw, RULE) == 1


@pytest.mark.parametrize(
    "tail",
    [
        b', "note": "again"',  # a repeated top-level key, after all the small objects
        b', "y": {"b": 1, "b": 2}',  # a repeated key deep inside
        b', "y": {"b": "\\u003a", "b": "c:d"}',
    ],
)
def test_a_duplicate_key_among_many_small_objects_is_still_found(tail: bytes) -> None:
    assert code_of(many_small_objects(1000, tail=tail)) == "InvalidJSON"


def test_a_body_holding_more_values_than_its_route_allows_is_refused_unread() -> None:
    limit = RULE.structure_limit
    assert limit == batch.MIN_STRUCTURE == 4096
    under = many_small_objects(limit // 2 - 8)  # a comma and a brace per object
    assert batch.validate(under, RULE) == 1
    over = many_small_objects(limit // 2 + 8)
    with pytest.raises(GatewayError) as err:
        batch.validate(over, RULE)
    assert err.value.code == "InvalidJSON"
    assert f"more than {limit} JSON values" in err.value.message
    # Commas inside strings count too: the bound is read off the bytes, unparsed.
    assert code_of(body({"recordIds": [ID], "note": "," * (limit + 1)})) == "InvalidJSON"


def test_a_rule_for_larger_batches_allows_larger_bodies() -> None:
    rule = BatchRule(field="ids", max_items=5000, unique=False)
    assert rule.structure_limit == 20_000
    assert batch.validate(body({"ids": ["x"] * 5000}), rule) == 5000
