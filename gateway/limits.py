"""Rate limits: the policy's ``limits:`` and the pure decision behind them.

    limits:
      - name: per-service            unique; the ``limit`` label and the header's policy name
        key: principal               principal | global: one bucket per caller, or one in all
        routes: ["*"]                route names, or "*" for every route
        requests_per_s: 50           exactly one of requests_per_s, requests_per_min,
        burst: 100                   items_per_s, items_per_min; burst defaults to the amount

Each limit is a token bucket, kept as one number per bucket (GCRA, the
"generic cell rate algorithm"): the *theoretical arrival time* ``tat``, the
moment the bucket would be full again. A request costing ``c`` units (1 per
request, or the batch's item count) moves it ``c * interval`` later; it may
pass while that stays within ``burst * interval`` of now. So one float per
bucket, no timers, and a refused request changes nothing.

``charges`` (which limits apply to a request, and what it costs) is part of
the request's walk, shown by ``explain``; ``decide`` is the arithmetic every
backend applies to all of a request's buckets at once: all pass and are
consumed together, or none is (gateway/state.py keeps the buckets; the Redis
backend runs the same arithmetic in a Lua script).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Final

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from gateway import names
from gateway.errors import RateLimited
from gateway.schema import Count, Invalid, Invalids, Model, Str, check, seen

ANY_ROUTE: Final = "*"
GLOBAL_BUCKET: Final = "*"  # the bucket's caller part for key: global
RATES: Final = {  # key → (unit, seconds per period)
    "requests_per_s": ("requests", 1),
    "requests_per_min": ("requests", 60),
    "items_per_s": ("items", 1),
    "items_per_min": ("items", 60),
}


def _limit_name(name: str, info: ValidationInfo) -> str:
    used = seen(info, "limit")
    if name in used:
        raise Invalid(f"limit name {name} is used twice")
    used.add(name)
    return name


def _key_kind(value: str) -> str | None:
    return None if value in ("principal", "global") else "must be principal or global"


def _route_refs(routes: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
    """Route names the policy has (its routes are read before its limits), each once."""
    if not routes:
        raise Invalid('list at least one route name, or "*"')
    if ANY_ROUTE in routes and len(routes) > 1:
        raise Invalid('"*" already names every route: list it alone')
    known = seen(info, "route")
    problems = []
    for i, route in enumerate(routes):
        if route in routes[:i]:
            problems.append(Invalid(f"route {route} is listed twice", at=(i,)))
        elif route != ANY_ROUTE and route not in known:
            problems.append(Invalid(f"unknown route {route!r}", at=(i,)))
    if problems:
        raise Invalids(problems)
    return routes


class Limit(Model):
    """One rate limit: which requests it counts, in what, and how fast it refills."""

    name: Annotated[
        Str, check(lambda v: None if names.ROUTE_NAME.fullmatch(v) else names.LIMIT_NAME_RULE),
        AfterValidator(_limit_name),
    ] = Field(description="unique; the limit label of gateway_rate_limited_total")  # fmt: skip
    key: Annotated[Str, check(_key_kind)] = Field(
        description="principal (a bucket per caller) or global (one bucket in all)"
    )
    routes: Annotated[tuple[Str, ...], AfterValidator(_route_refs)] = Field(
        description='route names it counts, or ["*"] for every route'
    )
    requests_per_s: Count | None = Field(None, description="requests per second")
    requests_per_min: Count | None = Field(None, description="requests per minute")
    items_per_s: Count | None = Field(None, description="batch items per second")
    items_per_min: Count | None = Field(None, description="batch items per minute")
    burst: Count | None = Field(
        None, description="the most that may pass at once (default: the rate's amount)"
    )

    @model_validator(mode="after")
    def _one_rate(self) -> Limit:
        given = [key for key in RATES if getattr(self, key) is not None]
        if len(given) != 1:
            what = f"it gives {' and '.join(given)}" if given else "it gives none"
            raise Invalid(f"give exactly one of {', '.join(RATES)}: {what}")
        return self

    @cached_property
    def rate_key(self) -> str:
        return next(key for key in RATES if getattr(self, key) is not None)

    @cached_property
    def unit(self) -> str:
        return RATES[self.rate_key][0]

    @cached_property
    def amount(self) -> int:
        value = getattr(self, self.rate_key)
        assert isinstance(value, int)
        return value

    @cached_property
    def period_s(self) -> int:
        return RATES[self.rate_key][1]

    @cached_property
    def capacity(self) -> int:
        """The burst: what may pass at once, from a full bucket."""
        return self.burst if self.burst is not None else self.amount

    @cached_property
    def interval_s(self) -> float:
        """Seconds for one unit to refill."""
        return self.period_s / self.amount

    @cached_property
    def tolerance_s(self) -> float:
        return self.capacity * self.interval_s

    @cached_property
    def ident(self) -> str:
        """The limit's name and a digest of its whole definition: counters are kept
        under it, so a limit edited in any way starts afresh, one left alone keeps
        counting across a reload."""
        definition = self.model_dump_json(exclude_none=True)
        return f"{self.name}:{hashlib.blake2b(definition.encode(), digest_size=6).hexdigest()}"

    def counts(self, route: str) -> bool:
        return ANY_ROUTE in self.routes or route in self.routes

    def describe(self) -> str:
        per = "s" if self.period_s == 1 else "min"
        burst = f", burst {self.burst}" if self.burst is not None else ""
        return f"{self.amount} {self.unit}/{per}{burst}, per {self.key}"


@dataclass(frozen=True, slots=True)
class Charge:
    """One limit a request counts against: its bucket and what the request costs."""

    limit: Limit
    bucket: str  # "<limit ident>|<principal, or * for a global limit>"
    cost: int

    def describe(self) -> str:
        whose = "all callers" if self.limit.key == "global" else self.bucket.rpartition("|")[2]
        limit = self.limit
        return f"{limit.name}: {self.cost} {limit.unit} of {limit.describe()} ({whose})"


def charges(limits: tuple[Limit, ...], route: str, principal: str, items: int) -> list[Charge]:
    """The limits ``route`` counts against, for this caller and this many batch items.

    An items limit on a request without a batch costs 0 and is left out: it
    could neither refuse nor consume anything."""
    found = []
    for limit in limits:
        if not limit.counts(route):
            continue
        cost = 1 if limit.unit == "requests" else items
        if cost == 0:
            continue
        who = principal if limit.key == "principal" else GLOBAL_BUCKET
        found.append(Charge(limit, f"{limit.ident}|{who}", cost))
    return found


def never_fits(found: list[Charge]) -> Charge | None:
    """A charge larger than its limit's burst: no wait would ever let it pass."""
    return next((c for c in found if c.cost > c.limit.capacity), None)


@dataclass(frozen=True, slots=True)
class Verdict:
    """``decide``'s answer: the new arrival times to store, or the refusal."""

    allowed: bool
    tats: list[float]  # the buckets' new values, in the charges' order (when allowed)
    refused: int = -1  # index of the refusing charge, when not allowed
    retry_after_s: float = 0.0


def decide(found: list[Charge], tats: list[float | None], now: float) -> Verdict:
    """All of a request's charges against their buckets' stored ``tats`` (None: a
    full bucket) at ``now``: every one must fit, and then every one is consumed.

    The refusal names the charge that would have to wait longest."""
    new, worst, wait = [], -1, 0.0
    for i, (charge, stored) in enumerate(zip(found, tats, strict=True)):
        limit = charge.limit
        tat = max(stored if stored is not None else now, now) + charge.cost * limit.interval_s
        late = tat - limit.tolerance_s - now
        if late > 1e-9 and late > wait:  # a float's last bit is no reason to refuse
            worst, wait = i, late
        new.append(tat)
    if worst >= 0:
        return Verdict(False, [], worst, wait)
    return Verdict(True, new)


def refusal(charge: Charge, retry_after_s: float) -> RateLimited:
    """429 with ``Retry-After`` and the IETF draft's ``RateLimit-Policy`` / ``RateLimit``.

    The policy is described as the bucket is: ``q`` the burst, ``w`` the seconds
    an empty bucket takes to fill (so ``q/w`` is the rate); ``RateLimit`` says
    nothing remains (``r=0``) and when this request would fit (``t``)."""
    limit = charge.limit
    wait = max(1, math.ceil(retry_after_s))
    window = max(1, math.ceil(limit.tolerance_s))
    unit = ';qu="items"' if limit.unit == "items" else ""
    if charge.cost > limit.capacity:
        message = (
            f"Rate limit {limit.name} lets at most {limit.capacity} {limit.unit} pass at once; "
            f"this request counts {charge.cost} and can never pass: split it."
        )
    else:
        message = f"Rate limit {limit.name} reached ({limit.describe()}); retry after {wait} s."
    return RateLimited(
        message,
        details={"limit": limit.name, "retry_after_s": wait},
        headers={
            "Retry-After": str(wait),
            "RateLimit-Policy": f'"{limit.name}";q={limit.capacity};w={window}{unit}',
            "RateLimit": f'"{limit.name}";r=0;t={wait}',
        },
        reason=f"limit {limit.name}: {charge.describe()}",
        limit=limit.name,
    )
