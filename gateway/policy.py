"""The policy: who may call, which routes exist, and which role each route needs.

Deny by default: a path that no route names is 404 ``RouteNotFound``, a known
path with another method is 405 ``MethodNotAllowed``. Matching is exact and
case-sensitive on the raw path the gateway will forward; ``{name}`` in a route
path matches one whole, non-empty segment.

Besides its ``min_role``, a route may say more about who may do what:

    params:   {recordId: "^CRMRC...$"}      a {name} segment must fully match
              → 400 InvalidItem (checked after the role, so a VIEWER still gets 403)
    rules:    - when: {field: permanent, not_equals: false}
                min_role: OWNER            a body condition raises the role needed
              → 403 Forbidden (checked after the body is validated)

Matching itself stays structural: ``params`` never make a route "not match".

``Policy`` is a frozen value built once per load; every lookup table the hot
path needs (tokens by hash, routes by exact path, role ranks) is built here so
a request only does dictionary lookups.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.batch import BatchRule
from gateway.errors import Forbidden, InvalidItem, MethodNotAllowed, RouteNotFound
from gateway.signing import Secret

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
UNMATCHED = "unmatched"  # the metrics label of a request that matched no route


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str
    token_sha256: str | None = None
    hmac_key: str | None = None
    hmac_secret: Secret | None = None


@dataclass(frozen=True, slots=True)
class TrustedHeaders:
    principal: str
    role: str
    sources: tuple[IPNetwork, ...]

    def trusts(self, peer: str | None) -> bool:
        if not peer:
            return False
        try:
            address = ipaddress.ip_address(peer.partition("%")[0])
        except ValueError:
            return False
        # On a dual-stack listener ("[::]:8080") IPv4 peers arrive as ::ffff:a.b.c.d.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.sources)


Scalar = str | int | float | bool | None


def same_json(a: object, b: Scalar) -> bool:
    """JSON equality: ``true`` is not ``1``, ``1`` is ``1.0``, a list is no scalar."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if a is None or b is None:
        return a is b
    return isinstance(a, str) and isinstance(b, str) and a == b


@dataclass(frozen=True, slots=True)
class Condition:
    """``when:`` on a top-level field of the JSON body. An absent field never holds."""

    field: str
    op: Literal["equals", "not_equals"]
    value: Scalar

    def holds(self, document: Mapping[str, Any] | None) -> bool:
        if document is None or self.field not in document:
            return False
        equal = same_json(document[self.field], self.value)
        return equal if self.op == "equals" else not equal

    def __str__(self) -> str:
        shown = "null" if self.value is None else repr(self.value)
        if isinstance(self.value, bool):
            shown = "true" if self.value else "false"
        verb = "is" if self.op == "equals" else "is not"
        return f"{self.field} {verb} {shown}"


@dataclass(frozen=True, slots=True)
class BodyRule:
    when: Condition
    min_role: str


@dataclass(frozen=True, slots=True)
class ParamRule:
    name: str
    index: int  # which segment of the split path holds it
    pattern: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    method: str
    path: str
    min_role: str
    batch: BatchRule | None = None
    # One entry per segment: the literal text, or None for a ``{name}`` segment.
    segments: tuple[str | None, ...] = field(default=(), repr=False)
    params: tuple[ParamRule, ...] = ()
    rules: tuple[BodyRule, ...] = ()
    # ``retry: {on_throttle: true}``: repeat a 429/503 whose Retry-After fits the budget.
    retry_on_throttle: bool = False


@dataclass(frozen=True, slots=True)
class Policy:
    roles: tuple[str, ...]
    principals: tuple[Principal, ...]
    trusted_headers: TrustedHeaders | None
    routes: tuple[Route, ...]
    rank: Mapping[str, int] = field(init=False, repr=False)
    by_token: Mapping[str, Principal] = field(init=False, repr=False)
    by_hmac_key: Mapping[str, Principal] = field(init=False, repr=False)
    _exact: Mapping[str, tuple[Route, ...]] = field(init=False, repr=False)
    _templates: Mapping[int, tuple[Route, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("rank", {role: i for i, role in enumerate(self.roles)})
        put("by_token", {p.token_sha256: p for p in self.principals if p.token_sha256})
        put("by_hmac_key", {p.hmac_key: p for p in self.principals if p.hmac_key})
        exact: dict[str, tuple[Route, ...]] = {}
        templates: dict[int, tuple[Route, ...]] = {}
        for route in self.routes:
            if None in route.segments:
                n = len(route.segments)
                templates[n] = (*templates.get(n, ()), route)
            else:
                exact[route.path] = (*exact.get(route.path, ()), route)
        put("_exact", exact)
        put("_templates", templates)

    def candidates(self, path: str) -> list[Route]:
        """Every route whose path matches, exact paths before templates."""
        found = list(self._exact.get(path, ()))
        if self._templates:
            segments = path.split("/")
            for route in self._templates.get(len(segments), ()):
                if _segments_match(route.segments, segments):
                    found.append(route)
        return found

    def match(self, method: str, path: str) -> Route:
        """The route for this request, or RouteNotFound / MethodNotAllowed."""
        routes = self.candidates(path)
        for route in routes:
            if route.method == method:
                return route
        if not routes:
            raise RouteNotFound(f"No route for {path}.")
        allowed = tuple(dict.fromkeys(r.method for r in routes))
        raise MethodNotAllowed(method, allowed)

    def authorize(self, route: Route, role: str) -> None:
        if self.rank.get(role, -1) < self.rank[route.min_role]:
            raise Forbidden(f"Route {route.name} needs role {route.min_role} or higher.")

    def check_params(self, route: Route, path: str) -> None:
        """Each ``params`` segment must fully match its pattern, else 400 InvalidItem."""
        if not route.params:
            return
        segments = path.split("/")
        for param in route.params:
            if not param.pattern.fullmatch(segments[param.index]):
                raise InvalidItem(
                    f"The path parameter {param.name!r} is not valid.",
                    details={"param": param.name},
                )

    def authorize_body(
        self, route: Route, role: str, document: Mapping[str, Any] | None
    ) -> list[BodyRule]:
        """Apply every rule whose condition holds; return those that applied."""
        applied = []
        for rule in route.rules:
            if not rule.when.holds(document):
                continue
            if self.rank.get(role, -1) < self.rank[rule.min_role]:
                raise Forbidden(
                    f"Route {route.name} needs role {rule.min_role} or higher when {rule.when}."
                )
            applied.append(rule)
        return applied


def _segments_match(template: tuple[str | None, ...], segments: list[str]) -> bool:
    for want, got in zip(template, segments, strict=True):
        if want is None:
            if not got:
                return False
        elif want != got:
            return False
    return True
