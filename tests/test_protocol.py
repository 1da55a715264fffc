"""Framings the HTTP parser lets through but the gateway refuses (RFC 9112 §6.1).

End to end, with every other request the parser refuses: tests/test_adversarial.py.
"""

from __future__ import annotations

import pytest
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.protocol import framing_problem


def framing(version: HttpVersion, *codings: str) -> str | None:
    headers = CIMultiDict(("Transfer-Encoding", coding) for coding in codings)
    request = make_mocked_request("POST", "/", headers=headers, version=version)
    problem = framing_problem(request)
    return None if problem is None else problem.message


@pytest.mark.parametrize("codings", [(), ("chunked",), ("CHUNKED",), (" chunked ",)])
def test_no_coding_or_plain_chunked_on_http_1_1_passes(codings: tuple[str, ...]) -> None:
    assert framing(HttpVersion11, *codings) is None


@pytest.mark.parametrize(
    "codings",
    [("gzip, chunked",), ("deflate,chunked",), ("chunked", "chunked"), ("identity",)],
)
def test_any_other_coding_is_refused(codings: tuple[str, ...]) -> None:
    assert framing(HttpVersion11, *codings) == "a transfer coding other than chunked"


def test_transfer_encoding_on_http_1_0_is_refused() -> None:
    assert framing(HttpVersion10, "chunked") == "Transfer-Encoding on an HTTP/1.0 request"
    assert framing(HttpVersion10) is None
