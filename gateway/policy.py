"""The policy: who may call, which routes exist, and which role each route needs.

Deny by default: a path that no route names is 404 ``RouteNotFound``, a known
path with another method is 405 ``MethodNotAllowed``. Matching is exact and
case-sensitive on the raw path the gateway will forward; ``{name}`` in a route
path matches one whole, non-empty segment.

Besides its ``min_role``, a route may say more about who may do what:

    params:   {recordId: "^CRMRC...$"}      a {name} segment must fully match
              → 400 InvalidItem (checked after the role, so a VIEWER still gets 403)
    query:    {limit: "^[0-9]{1,4}$"}       the only query parameters it takes
              → 400 InvalidQuery (after the path parameters)
    rules:    - when: {field: permanent, not_equals: false}
                min_role: OWNER            a body condition raises the role needed
              → 403 Forbidden (checked after the body is validated)

Matching itself stays structural: ``params`` never make a route "not match".

``limits:`` (gateway/limits.py) count requests or batch items per caller or
in all, on named routes; a limit naming a route the policy lacks is an error.

``Policy`` is a frozen value read once per load (``read_policy``); every
lookup table the hot path needs (tokens by hash, routes by exact path, role
ranks) is built once, so a request only does dictionary lookups. Its keys are
declared here and in ``gateway/principals.py`` and ``gateway/routes.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PrivateAttr, ValidationInfo, model_validator

from gateway import yamlsource
from gateway.errors import (
    Forbidden,
    InvalidItem,
    InvalidQuery,
    MethodNotAllowed,
    RouteNotFound,
)
from gateway.limits import Limit
from gateway.principals import Principal, Roles, TrustedHeaders
from gateway.routes import UNMATCHED, BodyRule, Route
from gateway.schema import Model, none_as_empty, read_text, warn
from gateway.yamlsource import Problem

__all__ = ["UNMATCHED", "Policy", "parse_policy", "read_policy"]


class Policy(Model):
    roles: Roles = Field(description="every role, lowest first")
    principals: Annotated[tuple[Principal, ...], BeforeValidator(none_as_empty)] = Field(
        (), description="the callers with a token, an internal key pair or a certificate"
    )
    trusted_headers: TrustedHeaders | None = Field(
        None, description="identity headers honoured from trusted peers; absent = off"
    )
    routes: tuple[Route, ...] = Field(description="every route; anything else is refused")
    limits: Annotated[tuple[Limit, ...], BeforeValidator(none_as_empty)] = Field(
        (), description="rate limits per caller or in all (gateway/limits.py); absent = none"
    )
    _path: str = PrivateAttr("")
    _sha256: str = PrivateAttr("")
    _warnings: tuple[Problem, ...] = PrivateAttr(())

    @property
    def path(self) -> str:
        """The file it was read from, as the config names it."""
        return self._path

    @property
    def sha256(self) -> str:
        """SHA-256 of the policy file's bytes as they were read."""
        return self._sha256

    @property
    def warnings(self) -> tuple[Problem, ...]:
        """What its load noted that does not stop it (``schema.warn``)."""
        return self._warnings

    @model_validator(mode="after")
    def _probably_a_mistake(self, info: ValidationInfo) -> Policy:
        """What loads but is probably a mistake: a warning, not an error."""
        if not self.principals:
            who = (
                "only trusted headers can identify a caller"
                if self.trusted_headers
                else "nobody can be identified: every request is 401"
            )
            warn(info, f"none listed, so {who}", at=("principals",))
        for i, principal in enumerate(self.principals):
            digest = principal.token_sha256
            if digest is not None and len(set(digest)) == 1:
                warn(
                    info,
                    f"{digest[:8]}… is a placeholder no token hashes to ({principal.name} cannot"
                    " call); mint one with `solapi-gateway token new`",
                    at=("principals", i, "token_sha256"),
                )
        for i, limit in enumerate(self.limits):
            for route in self.routes:
                batch = route.batch
                counted = limit.unit == "items" and batch is not None and limit.counts(route.name)
                if counted and batch is not None and batch.max_items > limit.capacity:
                    warn(
                        info,
                        f"lets {limit.capacity} items pass at once, but route {route.name}"
                        f" allows batches of {batch.max_items}: larger batches than the"
                        " burst can never pass",
                        at=("limits", i),
                    )
        return self

    @cached_property
    def rank(self) -> Mapping[str, int]:
        return {role: i for i, role in enumerate(self.roles)}

    @cached_property
    def by_token(self) -> Mapping[str, Principal]:
        return {p.token_sha256: p for p in self.principals if p.token_sha256}

    @cached_property
    def by_hmac_key(self) -> Mapping[str, Principal]:
        return {p.hmac_key: p for p in self.principals if p.hmac_key}

    @cached_property
    def by_cert(self) -> Mapping[tuple[str, str], Principal]:
        """Principals by the (kind, value) their client certificate must carry."""
        return {p.cert.match: p for p in self.principals if p.cert is not None}

    @cached_property
    def exact_routes(self) -> Mapping[str, tuple[Route, ...]]:
        exact: dict[str, tuple[Route, ...]] = {}
        for route in self.routes:
            if None not in route.segments:
                exact[route.path] = (*exact.get(route.path, ()), route)
        return exact

    @cached_property
    def template_routes(self) -> Mapping[int, tuple[Route, ...]]:
        templates: dict[int, tuple[Route, ...]] = {}
        for route in self.routes:
            if None in route.segments:
                n = len(route.segments)
                templates[n] = (*templates.get(n, ()), route)
        return templates

    def candidates(self, path: str) -> list[Route]:
        """Every route whose path matches, exact paths before templates."""
        found = list(self.exact_routes.get(path, ()))
        if self.template_routes:
            segments = path.split("/")
            for route in self.template_routes.get(len(segments), ()):
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
        for param in route.param_rules:
            if not param.pattern.fullmatch(segments[param.index]):
                raise InvalidItem(
                    f"The path parameter {param.name!r} is not valid.",
                    details={"param": param.name},
                )

    def check_query(self, route: Route, query: str) -> list[str]:
        """With ``query:`` on the route, each parameter must be listed, given once, as
        ``name=value``, its raw value fully matching its pattern; else 400 InvalidQuery.
        Returns the names given.

        Nothing is decoded: ``perm%61nent`` is not ``permanent`` here, so it is simply
        not a listed name. Upstream may decode, split on ``;`` or read ``+`` as a space,
        but a listed name holds none of those, and the operator's pattern decides
        what a value may hold. A parameter a caller's name does not say is never
        echoed back: it may carry anything, a token included.
        """
        allowed = route.query
        if allowed is None or not query:
            return []
        given: list[str] = []
        for part in query.split("&"):
            name, eq, value = part.partition("=")
            pattern = allowed.get(name)
            if pattern is None:
                takes = ", ".join(sorted(allowed)) or "none"
                raise InvalidQuery(
                    f"The query holds a parameter this route does not take (it takes: {takes}).",
                    details={"allowed": sorted(allowed)},
                )
            if name in given:
                raise InvalidQuery(
                    f"The query parameter {name!r} is given more than once.",
                    details={"param": name},
                )
            if not eq or not pattern.fullmatch(value):
                raise InvalidQuery(
                    f"The query parameter {name!r} is not valid.", details={"param": name}
                )
            given.append(name)
        return given

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


def parse_policy(
    text: str, name: str = "policy.yaml", *, secrets: bool = True
) -> tuple[Policy | None, list[Problem]]:
    """A policy from its YAML text: the Policy, or None and every problem found.

    ``secrets=False``: an internal key's ``hmac_secret`` whose ``${VAR}`` is unset
    stands in as a secret no signature matches (for commands that never verify one
    for real, such as ``explain`` on a laptop).
    """
    doc = yamlsource.read(name, text)
    policy = yamlsource.validate(Policy, doc, {"secrets": secrets})
    if policy is not None and not doc.problems:
        policy._path = name
        policy._sha256 = hashlib.sha256(text.encode()).hexdigest()
        policy._warnings = tuple(doc.warnings)
        return policy, []
    return None, doc.problems


def read_policy(path: str, *, secrets: bool = True) -> tuple[Policy | None, list[Problem]]:
    """``parse_policy`` of a file; a file that cannot be read raises ``Invalid``."""
    return parse_policy(read_text(path), path, secrets=secrets)
