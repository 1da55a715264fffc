"""Reading ``policy.yaml`` into a ``Policy``, reporting every problem at once.

Each reader takes a node of the composed YAML tree and its key path, and records
problems as ``FILE:LINE: key.path: message`` in the shared list (see
``gateway/yamlsource.py``) instead of raising, so one run names them all.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Literal

import yaml

from gateway.batch import BatchRule
from gateway.policy import (
    METHODS,
    UNMATCHED,
    BodyRule,
    Condition,
    IPNetwork,
    ParamRule,
    Policy,
    Principal,
    Route,
    Scalar,
    TrustedHeaders,
)
from gateway.signing import Secret
from gateway.yamlsource import Source

_ROLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_HMAC_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
_METHOD = re.compile("|".join(METHODS))
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NOT_IDENTITY_HEADERS = {
    "authorization", "cookie", "host", "content-type", "content-length",
    "transfer-encoding", "connection", "x-request-id",
}  # fmt: skip


def load_policy(src: Source, root: yaml.Node) -> Policy | None:
    keys = src.mapping(
        root, "", required=("roles", "routes"), optional=("principals", "trusted_headers")
    )
    if keys is None:
        return None
    before = len(src.problems.items)
    roles = _roles(src, keys["roles"]) if "roles" in keys else None
    principals = _principals(src, keys.get("principals"), roles)
    trusted = _trusted(src, keys["trusted_headers"]) if "trusted_headers" in keys else None
    routes = _routes(src, keys["routes"], roles) if "routes" in keys else []
    if len(src.problems.items) > before or roles is None:
        return None
    return Policy(tuple(roles), tuple(principals), trusted, tuple(routes))


def _roles(src: Source, node: yaml.Node) -> list[str] | None:
    roles: list[str] = []
    ok = True
    for path, item, value in src.strings(node, "roles"):
        if not _ROLE.fullmatch(value):
            src.error(item, path, "a role is a letter then letters, digits, _ or -")
            ok = False
        elif value in roles:
            src.error(item, path, f"role {value} is listed twice")
            ok = False
        else:
            roles.append(value)
    if ok and not roles and isinstance(node, yaml.SequenceNode):
        src.error(node, "roles", "list at least one role, lowest first")
    return roles if ok and roles else None


def _role_ref(src: Source, node: yaml.Node, path: str, roles: list[str] | None) -> str | None:
    value = src.string(node, path)
    if value is not None and roles is not None and value not in roles:
        src.error(node, path, f"unknown role {value!r} (roles: {', '.join(roles)})")
        return None
    return value


def _principals(src: Source, node: yaml.Node | None, roles: list[str] | None) -> list[Principal]:
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
        return []
    out: list[Principal] = []
    names: set[str] = set()
    hashes: set[str] = set()
    keys_seen: set[str] = set()
    for path, item in src.sequence(node, "principals"):
        keys = src.mapping(
            item,
            path,
            required=("name", "role"),
            optional=("token_sha256", "hmac_key", "hmac_secret"),
        )
        if keys is None:
            continue
        name = _matching(src, keys, path, "name", _NAME, "a name is letters, digits and ._@-")
        if name is not None and name in names:
            src.error(keys["name"], f"{path}.name", f"principal {name} is listed twice")
        if name is not None:  # now, so a later twin is caught even if this entry is bad
            names.add(name)
        role = _role_ref(src, keys["role"], f"{path}.role", roles) if "role" in keys else None
        token_hash = hmac_key = None
        hmac_secret: Secret | None = None
        has_token, has_hmac = "token_sha256" in keys, "hmac_key" in keys or "hmac_secret" in keys
        if has_token == has_hmac:
            src.error(item, path, "give either token_sha256, or hmac_key with hmac_secret")
        if has_token:
            token_hash = _matching(
                src, keys, path, "token_sha256", _SHA256, "must be 64 hex digits (SHA-256)"
            )
            if token_hash is not None:
                token_hash = token_hash.lower()
                if token_hash in hashes:
                    src.error(keys["token_sha256"], f"{path}.token_sha256", "token used twice")
                hashes.add(token_hash)
        if has_hmac:
            for part in ("hmac_key", "hmac_secret"):
                if part not in keys:
                    src.error(item, f"{path}.{part}", "required with an internal HMAC key pair")
            if "hmac_key" in keys:
                hmac_key = _matching(
                    src, keys, path, "hmac_key", _HMAC_KEY, "letters, digits, _ and - only"
                )
                if hmac_key is not None and hmac_key in keys_seen:
                    src.error(keys["hmac_key"], f"{path}.hmac_key", "key used twice")
                keys_seen.add(hmac_key or "")
            if "hmac_secret" in keys:
                text = src.string(keys["hmac_secret"], f"{path}.hmac_secret", env=True)
                if text is not None and not text.strip():
                    src.error(keys["hmac_secret"], f"{path}.hmac_secret", "is empty")
                elif text is not None:
                    hmac_secret = Secret(text.strip())
        if name is not None and role is not None:
            out.append(Principal(name, role, token_hash, hmac_key, hmac_secret))
    return out


def _matching(
    src: Source,
    keys: dict[str, yaml.Node],
    path: str,
    key: str,
    pattern: re.Pattern[str],
    message: str,
) -> str | None:
    """The string at ``key`` if present and fully matching ``pattern``."""
    if key not in keys:
        return None
    here = f"{path}.{key}"
    value = src.string(keys[key], here)
    return src.checked(keys[key], here, value, lambda v: None if pattern.fullmatch(v) else message)


def _header_name(src: Source, node: yaml.Node, path: str) -> str | None:
    value = src.string(node, path)
    if value is None:
        return None
    if not _HEADER_NAME.fullmatch(value):
        src.error(node, path, "not a valid header name")
        return None
    if value.lower() in _NOT_IDENTITY_HEADERS:
        src.error(node, path, f"{value} cannot carry identity")
        return None
    return value


def _trusted(src: Source, node: yaml.Node) -> TrustedHeaders | None:
    path = "trusted_headers"
    keys = src.mapping(node, path, required=("principal", "role", "sources"))
    if keys is None or len(keys) < 3:
        return None
    principal = _header_name(src, keys["principal"], f"{path}.principal")
    role = _header_name(src, keys["role"], f"{path}.role")
    if principal and role and principal.lower() == role.lower():
        src.error(keys["role"], f"{path}.role", "must differ from the principal header")
    sources: list[IPNetwork] = []
    for item_path, item, value in src.strings(keys["sources"], f"{path}.sources"):
        try:
            sources.append(ipaddress.ip_network(value, strict=True))
        except ValueError as exc:
            src.error(item, item_path, f"not a CIDR network: {exc}")
    if isinstance(keys["sources"], yaml.SequenceNode) and not keys["sources"].value:
        src.error(keys["sources"], f"{path}.sources", "list at least one network")
    if principal is None or role is None or not sources:
        return None
    return TrustedHeaders(principal, role, tuple(sources))


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
        m = _PARAM.fullmatch(segment)
        if m:
            params.append(m.group(1))
        elif "{" in segment or "}" in segment:
            return "a {name} placeholder must be a whole segment"
    if len(params) != len(set(params)):
        return "placeholder names must differ"
    return None


def _routes(src: Source, node: yaml.Node, roles: list[str] | None) -> list[Route]:
    out: list[Route] = []
    names: set[str] = set()
    seen: set[tuple[str, tuple[str | None, ...]]] = set()
    for path, item in src.sequence(node, "routes"):
        keys = src.mapping(
            item,
            path,
            required=("name", "method", "path", "min_role"),
            optional=("batch", "params", "rules", "retry"),
        )
        if keys is None:
            continue
        route_path = None
        name = _matching(
            src, keys, path, "name", _ROUTE_NAME, "a route name is letters, digits and ._-"
        )
        if name == UNMATCHED:
            src.error(keys["name"], f"{path}.name", f"{UNMATCHED!r} is reserved for metrics")
            name = None
        if name is not None and name in names:
            src.error(keys["name"], f"{path}.name", f"route name {name} is used twice")
            name = None
        if name is not None:  # now, so a later twin is caught even if this route is bad
            names.add(name)
        method = _matching(src, keys, path, "method", _METHOD, f"one of {', '.join(METHODS)}")
        if "path" in keys:
            route_path = src.checked(
                keys["path"],
                f"{path}.path",
                src.string(keys["path"], f"{path}.path"),
                route_path_problem,
            )
        min_role = (
            _role_ref(src, keys["min_role"], f"{path}.min_role", roles)
            if "min_role" in keys
            else None
        )
        batch = _batch(src, keys["batch"], f"{path}.batch") if "batch" in keys else None
        params: tuple[ParamRule, ...] | None = ()
        if "params" in keys:
            params = _params(src, keys["params"], f"{path}.params", route_path)
        rules: tuple[BodyRule, ...] | None = ()
        if "rules" in keys:
            rules = _rules(src, keys["rules"], f"{path}.rules", roles, min_role)
        on_throttle: bool | None = False
        if "retry" in keys:
            on_throttle = _retry(src, keys["retry"], f"{path}.retry")
        if route_path is not None:
            segments = tuple(None if _PARAM.fullmatch(s) else s for s in route_path.split("/"))
            if method is not None and (method, segments) in seen:
                src.error(item, path, f"another route already serves {method} {route_path}")
                continue
            if method is not None:
                seen.add((method, segments))
        if None in (name, method, route_path, min_role, params, rules, on_throttle) or (
            "batch" in keys and batch is None
        ):
            continue
        assert name and method and route_path and min_role
        assert params is not None and rules is not None and on_throttle is not None
        out.append(
            Route(name, method, route_path, min_role, batch, segments, params, rules, on_throttle)
        )
    return out


def _retry(src: Source, node: yaml.Node, path: str) -> bool | None:
    """``retry: {on_throttle: BOOL}``: the only retry a route can opt into."""
    keys = src.mapping(node, path, required=("on_throttle",))
    if keys is None or "on_throttle" not in keys:
        return None
    return src.boolean(keys["on_throttle"], f"{path}.on_throttle")


def _regex(src: Source, node: yaml.Node, path: str) -> re.Pattern[str] | None:
    text = src.string(node, path)
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        src.error(node, path, f"bad regex: {exc}")
        return None


def _params(
    src: Source, node: yaml.Node, path: str, route_path: str | None
) -> tuple[ParamRule, ...] | None:
    """``params: {name: regex}``, one entry per ``{name}`` segment it constrains."""
    if route_path is None:  # the keys cannot be checked against a bad path
        return None
    names = _placeholders(route_path)
    if not names:
        src.error(node, path, "the path has no {name} segment to check")
        return None
    before = len(src.problems.items)
    keys = src.mapping(node, path, optional=tuple(names))
    if keys is None:
        return None
    segments = route_path.split("/")
    out = []
    for name, value in keys.items():
        pattern = _regex(src, value, f"{path}.{name}")
        if pattern is not None:
            out.append(ParamRule(name, segments.index("{" + name + "}"), pattern))
    if len(src.problems.items) > before:
        return None
    if not out:
        src.error(node, path, "name at least one {placeholder} of the path, or leave params out")
        return None
    return tuple(out)


def _placeholders(route_path: str) -> list[str]:
    return [m.group(1) for s in route_path.split("/") if (m := _PARAM.fullmatch(s))]


_CONSTRUCTOR = yaml.SafeLoader("")
_OPS = ("equals", "not_equals")


def _scalar(src: Source, node: yaml.Node, path: str) -> tuple[bool, Scalar]:
    """A YAML scalar as a JSON value: (ok, value)."""
    if not isinstance(node, yaml.ScalarNode) or node.tag.rpartition(":")[2] not in (
        "str", "int", "float", "bool", "null",
    ):  # fmt: skip
        src.error(node, path, "must be one value: a string, a number, true, false or null")
        return False, None
    value = _CONSTRUCTOR.construct_object(node)
    if isinstance(value, float) and not math.isfinite(value):
        src.error(node, path, "must be a finite number")
        return False, None
    assert value is None or isinstance(value, str | int | float | bool)
    return True, value


def _condition(src: Source, node: yaml.Node, path: str) -> Condition | None:
    before = len(src.problems.items)
    keys = src.mapping(node, path, required=("field",), optional=_OPS)
    if keys is None:
        return None
    ops = [op for op in _OPS if op in keys]
    if len(ops) != 1 and len(src.problems.items) == before:  # not after "unknown key"
        src.error(node, path, "give exactly one of equals, not_equals")
    field_name = src.string(keys["field"], f"{path}.field") if "field" in keys else None
    if field_name == "":
        src.error(keys["field"], f"{path}.field", "is empty")
        field_name = None
    ok, value = _scalar(src, keys[ops[0]], f"{path}.{ops[0]}") if ops else (False, None)
    if field_name is None or len(ops) != 1 or not ok:
        return None
    op: Literal["equals", "not_equals"] = "equals" if ops[0] == "equals" else "not_equals"
    return Condition(field_name, op, value)


def _rules(
    src: Source,
    node: yaml.Node,
    path: str,
    roles: list[str] | None,
    route_role: str | None,
) -> tuple[BodyRule, ...] | None:
    before = len(src.problems.items)
    out = []
    for item_path, item in src.sequence(node, path):
        keys = src.mapping(item, item_path, required=("when", "min_role"))
        if keys is None or len(keys) < 2:
            continue
        when = _condition(src, keys["when"], f"{item_path}.when")
        role = _role_ref(src, keys["min_role"], f"{item_path}.min_role", roles)
        if (
            role is not None
            and route_role is not None
            and roles is not None
            and roles.index(role) <= roles.index(route_role)
        ):
            src.error(
                keys["min_role"],
                f"{item_path}.min_role",
                f"must be above the route's min_role ({route_role}), or the rule changes nothing",
            )
            continue
        if when is not None and role is not None:
            out.append(BodyRule(when, role))
    if len(src.problems.items) > before:
        return None
    return tuple(out)


def _batch(src: Source, node: yaml.Node, path: str) -> BatchRule | None:
    keys = src.mapping(
        node, path, required=("field", "max_items"), optional=("item_pattern", "unique")
    )
    if keys is None or not {"field", "max_items"} <= keys.keys():
        return None
    field_name = src.string(keys["field"], f"{path}.field")
    if field_name is not None and not field_name:
        src.error(keys["field"], f"{path}.field", "is empty")
        field_name = None
    max_items = src.integer(keys["max_items"], f"{path}.max_items", minimum=1)
    pattern: re.Pattern[str] | None = None
    pattern_ok = True
    if "item_pattern" in keys:
        text = src.string(keys["item_pattern"], f"{path}.item_pattern")
        pattern_ok = text is not None
        if text is not None:
            try:
                pattern = re.compile(text)
            except re.error as exc:
                src.error(keys["item_pattern"], f"{path}.item_pattern", f"bad regex: {exc}")
                pattern_ok = False
    unique = src.boolean(keys["unique"], f"{path}.unique") if "unique" in keys else True
    if field_name is None or max_items is None or not pattern_ok or unique is None:
        return None
    return BatchRule(field_name, max_items, pattern, unique)
