"""What came back, however it was asked for: one ``Reply`` (status, headers, body bytes)
from aiohttp, from a bare socket, or from curl's ``-i`` output; and the metrics a
gateway's admin port shows, as samples keyed by name and labels."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(data: bytes, *, dechunk: bool) -> Reply:
    """A raw HTTP/1.1 response (after any 1xx ones), as curl -i or a socket shows it."""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"no complete response head in {data[:200]!r}"
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if not 100 <= status < 200:
            break
        data = rest
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    body = rest
    if "Content-Length" in headers:  # anything after it is the next response
        body = rest[: int(headers["Content-Length"])]
    elif dechunk and headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = _dechunk(rest)
    return Reply(status, CIMultiDictProxy(headers), body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


def http_request(method: str, port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One plain HTTP exchange with a local port (for polling and introspection)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def samples_of(text: bytes) -> Samples:
    """Every sample of a Prometheus text page, keyed by its name and labels."""
    samples = {}
    for metric in text_string_to_metric_families(text.decode()):
        for one in metric.samples:
            samples[one.name, labelled(**one.labels)] = one.value
    return samples


def labelled(**labels: str) -> Labels:
    return frozenset(labels.items())


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels, 0 if there is none (a counter never touched)."""
    return samples.get((name, labelled(**labels)), 0.0)


def family(samples: Samples, name: str) -> dict[Labels, float]:
    """Every sample called ``name``, by its labels."""
    return {labels: v for (n, labels), v in samples.items() if n == name}
