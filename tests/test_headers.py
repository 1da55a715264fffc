"""gateway/headers.py: an allow-list upstream, hop-by-hop stripped both ways."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.headers import downstream_headers, request_id, upstream_headers

INCOMING = CIMultiDict(
    [
        ("Host", "gateway.internal"),
        ("Authorization", "Bearer caller-token"),
        ("Cookie", "session=abc"),
        ("X-Internal-Principal", "ops"),
        ("X-Internal-Role", "OWNER"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "12"),
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("Accept", "text/plain"),
        ("Accept-Encoding", "gzip"),
        ("Accept-Language", "ko-KR"),
        ("User-Agent", "billing/1.0"),
        ("X-Trace", "t-1"),
        ("X-Request-ID", "caller-id"),
    ]
)


def test_upstream_gets_only_the_allow_list_plus_its_own_headers() -> None:
    out = upstream_headers(INCOMING, (), "rid-1")
    assert sorted(name for name, _ in out.items()) == sorted(
        [
            "Content-Type", "Accept", "Accept", "Accept-Encoding", "Accept-Language",
            "User-Agent", "X-Request-ID",
        ]
    )  # fmt: skip
    assert out.getall("Accept") == ["application/json", "text/plain"]
    assert "Authorization" not in out  # the caller's never; the gateway signs per attempt
    assert out["X-Request-ID"] == "rid-1"


def test_forward_headers_from_config_are_added() -> None:
    out = upstream_headers(INCOMING, ("X-Trace",), "rid")
    assert out["X-Trace"] == "t-1"


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ([("X-Request-ID", "abc-123_X.y")], True),
        ([("X-Request-ID", "a" * 128)], True),
        ([("X-Request-ID", "a" * 129)], False),
        ([("X-Request-ID", "")], False),
        ([("X-Request-ID", "has space")], False),
        ([("X-Request-ID", "semi;colon")], False),
        ([("X-Request-ID", "a"), ("X-Request-ID", "b")], False),
        ([], False),
    ],
)
def test_request_id_is_kept_only_when_sane(given: list[tuple[str, str]], kept: bool) -> None:
    rid = request_id(CIMultiDict(given))
    if kept:
        assert rid == given[0][1]
    else:
        assert len(rid) == 32 and rid.isalnum()
        assert rid != request_id(CIMultiDict(given))


def test_downstream_drops_hop_by_hop_and_connection_named_headers() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", "99"),
            ("Content-Encoding", "gzip"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Connection", "close, X-Private"),
            ("X-Private", "p"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("X-Request-ID", "upstream-made-this"),
            ("X-RateLimit-Remaining", "7"),
        ]
    )
    out = downstream_headers(upstream, "rid-9")
    assert out["Content-Length"] == "99" and out["Content-Encoding"] == "gzip"
    assert out["X-RateLimit-Remaining"] == "7"
    assert out["X-Request-ID"] == "rid-9"
    # A cookie upstream sets would stick to the gateway's address, for every route.
    for gone in ("Connection", "X-Private", "Keep-Alive", "Transfer-Encoding", "Set-Cookie"):
        assert gone not in out


def test_generated_request_ids_are_32_hex_digits_and_do_not_repeat() -> None:
    from gateway.headers import new_request_id

    ids = [new_request_id() for _ in range(1000)]  # several refills of the pool
    assert len(set(ids)) == len(ids)
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in ids)
