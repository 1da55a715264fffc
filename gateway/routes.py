"""A route of the policy: one method and path, the role it needs, and what else it checks.

    - name: records-bulk-delete          unique; the metrics label
      method: POST
      path: /crm-core/v1/records/{id}    {name} = one whole, non-empty segment
      min_role: MEMBER
      params:  {id: "^CRMRC...$"}        a {name} segment must fully match
      query:   {limit: "^[0-9]{1,4}$"}   the query parameters it takes ({} = none)
      batch:   {field, max_items, item_pattern, unique}    (gateway/batch.py)
      fields:  [recordIds, permanent]    the top-level members a batch body may hold
      rules:   - when: {field: permanent, not_equals: false}
                 min_role: OWNER         a body condition raises the role needed
      retry:   {on_throttle: true}       repeat a 429/503 whose Retry-After fits

Each key is declared once, here. Matching and the decisions themselves are
``gateway/policy.py``'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from gateway import names
from gateway.batch import BatchRule
from gateway.principals import RoleRef
from gateway.schema import (
    Bool,
    Invalid,
    Invalids,
    JsonScalar,
    Model,
    NonEmpty,
    Regex,
    Str,
    check,
    context,
    matching,
    seen,
)

UNMATCHED = "unmatched"  # the metrics label of a request that matched no route

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


class Condition(Model):
    """``when:`` on a top-level field of the JSON body. An absent field never holds."""

    field: NonEmpty = Field(description="a top-level member of the JSON body")
    equals: JsonScalar = Field(None, description="holds when the member is this value")
    not_equals: JsonScalar = Field(
        None, description="holds when the member is present and not this"
    )

    @model_validator(mode="after")
    def _one_op(self) -> Condition:
        if len(self.model_fields_set & {"equals", "not_equals"}) != 1:
            raise Invalid("give exactly one of equals, not_equals")
        return self

    @cached_property
    def op(self) -> Literal["equals", "not_equals"]:
        return "equals" if "equals" in self.model_fields_set else "not_equals"

    @cached_property
    def value(self) -> Scalar:
        return self.equals if self.op == "equals" else self.not_equals

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


class BodyRule(Model):
    when: Condition = Field(description="a condition on the body")
    min_role: RoleRef = Field(description="the role needed when it holds")


class Retry(Model):
    on_throttle: Bool = Field(description="repeat a 429/503 whose Retry-After fits the budget")


@dataclass(frozen=True, slots=True)
class ParamRule:
    name: str
    index: int  # which segment of the split path holds it
    pattern: re.Pattern[str]


def route_path_problem(path: str) -> str | None:
    if not path.startswith("/"):
        return "must start with /"
    if any(c in path for c in "%\\?#") or any(ord(c) <= 32 or ord(c) >= 127 for c in path):
        return "must be a plain path: no %, \\, ?, #, spaces or non-ASCII"
    segments = path.split("/")[1:]
    if "" in segments[:-1]:
        return "must not contain //"
    if any(s in (".", "..") for s in segments):
        return "must not contain . or .. segments"
    params = []
    for segment in segments:
        m = names.PLACEHOLDER.fullmatch(segment)
        if m:
            params.append(m.group(1))
        elif "{" in segment or "}" in segment:
            return "a {name} placeholder must be a whole segment"
    if len(params) != len(set(params)):
        return "placeholder names must differ"
    return None


def placeholders(route_path: str) -> list[str]:
    return [m.group(1) for s in route_path.split("/") if (m := names.PLACEHOLDER.fullmatch(s))]


def route_name(name: str, info: ValidationInfo) -> str:
    if name == UNMATCHED:
        raise Invalid(f"{UNMATCHED!r} is reserved for metrics")
    used = seen(info, "route")
    if name in used:
        raise Invalid(f"route name {name} is used twice")
    used.add(name)
    return name


def method_problem(method: str) -> str | None:
    return None if method in names.METHODS else f"one of {', '.join(names.METHODS)}"


class Route(Model):
    name: Annotated[
        Str, matching(names.ROUTE_NAME, names.ROUTE_NAME_RULE), AfterValidator(route_name)
    ] = Field(description="unique; the route label of every metric")
    method: Annotated[Str, check(method_problem)] = Field(description="one HTTP method, upper case")
    path: Annotated[Str, check(route_path_problem)] = Field(
        description="the exact path, case-sensitive; {name} matches one whole segment"
    )
    min_role: RoleRef = Field(description="the lowest role that may call it")
    batch: BatchRule | None = Field(None, description="the body holds a list of items to check")
    params: dict[str, Regex] = Field(
        default_factory=dict, description="{name} segment → the pattern it must fully match"
    )
    query: dict[str, Regex] | None = Field(
        None,
        description="query parameter → the pattern its raw value must fully match;"
        " any other parameter, or one sent twice, is refused ({} = none)",
    )
    fields: tuple[NonEmpty, ...] | None = Field(
        None, description="with batch: the top-level members the body may hold, exactly"
    )
    rules: tuple[BodyRule, ...] = Field((), description="body conditions that need a higher role")
    retry: Retry | None = Field(None, description="the upstream retries this route opts into")

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Route:
        problems = self._param_problems() + self._rule_problems(context(info).get("roles"))
        problems += self._query_problems() + self._field_problems()
        key = f"{self.method} {'/'.join(s or '{}' for s in self.segments)}"
        served = seen(info, "method+path")
        if key in served:
            problems.append(Invalid(f"another route already serves {self.method} {self.path}"))
        served.add(key)
        if problems:
            raise Invalids(problems)
        return self

    def _param_problems(self) -> list[Invalid]:
        if "params" not in self.model_fields_set:
            return []
        known = placeholders(self.path)
        if not known:
            return [Invalid("the path has no {name} segment to check", at=("params",))]
        if not self.params:
            return [
                Invalid("name at least one {placeholder} of the path, or leave params out",
                        at=("params",))
            ]  # fmt: skip
        allowed = ", ".join(sorted(known))
        return [
            Invalid(f"unknown key (allowed: {allowed})", at=("params", name), key_line=True)
            for name in self.params
            if name not in known
        ]

    def _query_problems(self) -> list[Invalid]:
        return [
            Invalid(names.QUERY_NAME_RULE, at=("query", name), key_line=True)
            for name in self.query or {}
            if not names.QUERY_NAME.fullmatch(name)
        ]

    def _field_problems(self) -> list[Invalid]:
        """``fields`` needs a batch, and must hold what the batch and the rules read."""
        if self.fields is None:
            return []
        if self.batch is None:
            return [Invalid("only a route with batch: reads a JSON body to check", at=("fields",))]
        problems = [
            Invalid(f"{name} is listed twice", at=("fields", i))
            for i, name in enumerate(self.fields)
            if name in self.fields[:i]
        ]
        if self.batch.field not in self.fields:
            problems.append(
                Invalid(f"must list the batch field {self.batch.field}", at=("fields",))
            )
        problems += [
            Invalid(f"{rule.when.field} is not in the route's fields, so this never holds",
                    at=("rules", i, "when", "field"))
            for i, rule in enumerate(self.rules)
            if rule.when.field not in self.fields
        ]  # fmt: skip
        return problems

    def _rule_problems(self, roles: tuple[str, ...] | None) -> list[Invalid]:
        if roles is None:
            return []
        return [
            Invalid(
                f"must be above the route's min_role ({self.min_role}), "
                "or the rule changes nothing",
                at=("rules", i, "min_role"),
            )
            for i, rule in enumerate(self.rules)
            if roles.index(rule.min_role) <= roles.index(self.min_role)
        ]

    @cached_property
    def segments(self) -> tuple[str | None, ...]:
        """One entry per segment: the literal text, or None for a ``{name}`` segment."""
        return tuple(None if names.PLACEHOLDER.fullmatch(s) else s for s in self.path.split("/"))

    @cached_property
    def param_rules(self) -> tuple[ParamRule, ...]:
        segments = self.path.split("/")
        return tuple(
            ParamRule(name, segments.index("{" + name + "}"), pattern)
            for name, pattern in self.params.items()
        )

    @cached_property
    def allowed_fields(self) -> frozenset[str] | None:
        return frozenset(self.fields) if self.fields is not None else None

    @property
    def retry_on_throttle(self) -> bool:
        return self.retry is not None and self.retry.on_throttle
