"""The addresses the config names: where to listen, and the URLs of upstream,
a span collector and Redis.

Each is read from one string (``${VAR}`` allowed, see ``gateway/config.py``) and
checked the same way: a URL's scheme, host and port first (``http_url``), then
what its key allows beyond them. A problem names what is wrong, never the value
when the value may hold a password (a Redis URL).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated

from yarl import URL

from gateway.schema import Invalid, plain


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address | str:
    """``HOST:PORT`` or ``[V6]:PORT`` → Address, or a problem description."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return "must be HOST:PORT with a port from 1 to 65535"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "the part in [] must be an IPv6 address"
    elif not host or ":" in host:
        return "must be HOST:PORT (write IPv6 hosts as [::1]:PORT)"
    return Address(host, int(port_text))


def _address(value: str) -> Address:
    parsed = parse_address(value)
    if isinstance(parsed, str):
        raise Invalid(parsed)
    return parsed


AddressField = Annotated[Address, plain(_address, env=True, keep=Address)]


def http_url(value: str, shape: str, schemes: tuple[str, ...], *, secret: bool = False) -> URL:
    """``value`` as a URL of one of ``schemes`` naming a host (and a port from 1 to
    65535), or ``Invalid`` starting with ``shape``. ``secret``: the URL may hold a
    password, so no problem quotes any part of it."""
    scheme, sep, _ = value.partition("://")
    if not sep or scheme not in schemes:
        if secret:
            raise Invalid(shape)
        why = f"the scheme is {scheme!r}" if sep else f"it has no scheme (write https://{value})"
        raise Invalid(f"{shape}: {why}")
    try:
        url = URL(value)
        port = url.port
    except ValueError:
        raise Invalid(f"{shape}: the port must be a number from 1 to 65535") from None
    if not url.host:
        raise Invalid(f"{shape}: it names no host")
    if port is not None and not 0 < port < 65536:
        raise Invalid(f"{shape}: the port must be a number from 1 to 65535")
    if url.query_string or url.fragment or (not secret and ("?" in value or "#" in value)):
        raise Invalid(f"{shape}: it must not hold a query or fragment")
    return url


def origin(value: str) -> URL:
    """``http(s)://HOST[:PORT]``, and nothing else: each request brings its own path."""
    shape = "must be http(s)://HOST[:PORT] only"
    url = http_url(value, shape, ("http", "https"))
    if url.user is not None or url.password is not None:
        raise Invalid(f"{shape}: it must not hold a user or password")
    if url.path not in ("", "/"):
        raise Invalid(f"{shape}: it must not hold a path (each request brings its own)")
    return url.with_path("")


def collector(value: str) -> URL:
    """An OTLP/HTTP collector: ``http(s)://HOST[:PORT]`` (spans go to ``/v1/traces``
    there), or the full URL of its traces endpoint when a path is given."""
    shape = "must be http(s)://HOST[:PORT][/PATH]"
    url = http_url(value, shape, ("http", "https"))
    if url.user is not None or url.password is not None:
        raise Invalid(f"{shape}: it must not hold a user or password")
    return url if url.path not in ("", "/") else url.with_path("/v1/traces")


class StateURL:
    """Where Redis is: a URL that prints itself without its password (logs, errors,
    ``check-config``); only the client that connects is given ``reveal()``."""

    __slots__ = ("_value", "shown")

    def __init__(self, value: str, shown: str) -> None:
        self._value, self.shown = value, shown

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return self.shown

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StateURL) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a StateURL cannot be pickled")


def state_url(value: str) -> StateURL:
    shape = "must be redis://[:PASSWORD@]HOST[:PORT][/DB] or rediss://... (TLS)"
    url = http_url(value, shape, ("redis", "rediss"), secret=True)
    if url.path not in ("", "/") and not url.path[1:].isdigit():
        raise Invalid(f"{shape}: the path may only be a database number")
    shown = url.with_password("****") if url.password is not None else url
    return StateURL(value, str(shown))
