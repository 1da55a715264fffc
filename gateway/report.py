"""What the commands print: the ``check-config`` summary, ``explain``'s walk, the key reference.

The summary and the reference are generated from the schema (the pydantic
fields of ``gateway/config.py`` and the policy modules), so a key added there
shows up here with its value, default and description without further edits.
Secrets show only where they came from; the API key only its first letters.
"""

from __future__ import annotations

import ipaddress
import re
import types
import typing
from collections.abc import Iterator
from typing import Any

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from yarl import URL

from gateway import walk
from gateway.addresses import Address, StateURL
from gateway.config import Settings
from gateway.limits import ANY_ROUTE, Limit
from gateway.policy import Policy
from gateway.routes import Route
from gateway.schema import MASKED
from gateway.signing import Secret


def summary(settings: Settings) -> str:
    """``check-config``'s answer: every key of gateway.yaml with its value, then the policy."""
    rows = list(_rows(settings, ""))
    width = max(len(key) for key, _ in rows) + 2
    lines = [f"{settings.config_path}: OK"]
    lines += [f"  {key:<{width}}{value}" for key, value in rows]
    lines += policy_summary(settings.policy)
    return "\n".join(lines)


def _rows(model: BaseModel, prefix: str) -> Iterator[tuple[str, str]]:
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel) and not isinstance(value, Policy):
            yield from _rows(value, f"{key}.")
            continue
        shown = _shown(value, info)
        if name not in model.model_fields_set:
            shown += "  (default)"
        yield key, shown


def _shown(value: Any, info: FieldInfo) -> str:
    extra = info.json_schema_extra
    if extra == MASKED and isinstance(value, str):
        return value[:4] + "…" if len(value) > 4 else "…"
    if value is None or value == ():
        return "-"
    if isinstance(value, Secret):
        return f"from {value.source}"  # never the value
    if isinstance(value, StateURL):
        return value.shown  # never the password
    if isinstance(value, Policy):
        return value.path
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return ", ".join(str(v) for v in value)
    return str(value)


def policy_summary(policy: Policy) -> list[str]:
    trusted = "off"
    if policy.trusted_headers is not None:
        t = policy.trusted_headers
        trusted = f"{t.principal}/{t.role} from {', '.join(str(n) for n in t.sources)}"
    tokens = sum(p.token_sha256 is not None for p in policy.principals)
    certs = sum(p.cert is not None for p in policy.principals)
    lines = [
        f"policy {policy.path}: roles {' < '.join(policy.roles)}",
        f"  {len(policy.principals)} principal(s): {tokens} with a token, "
        f"{len(policy.principals) - tokens - certs} with an internal key pair"
        + (f", {certs} by client certificate" if certs else ""),
        f"  trusted headers {trusted}",
        f"  {len(policy.routes)} route(s):",
    ]
    lines += [f"    {route_line(r)}" for r in policy.routes]
    lines += [f"  {len(policy.limits)} rate limit(s):" if policy.limits else "  rate limits: none"]
    lines += [f"    {limit_line(limit)}" for limit in policy.limits]
    return lines


def limit_line(limit: Limit) -> str:
    routes = "every route" if ANY_ROUTE in limit.routes else ", ".join(limit.routes)
    return f"{limit.name}: {limit.describe()}; on {routes}"


def route_line(r: Route) -> str:
    extras = []
    if r.batch is not None:
        unique = ", unique" if r.batch.unique else ""
        extras.append(f"batch {r.batch.field}: 1..{r.batch.max_items}{unique}")
    extras += [f"{name} checked" for name in r.params]
    if r.query is not None:
        extras.append(f"query {', '.join(r.query)}" if r.query else "no query")
    if r.fields is not None:
        extras.append(f"fields {', '.join(r.fields)}")
    extras += [f"{rule.min_role}+ when {rule.when}" for rule in r.rules]
    if r.retry_on_throttle:
        extras.append("retries 429/503")
    shown = "".join(f"; {extra}" for extra in extras)
    return f"{r.name}: {r.method} {r.path}  {r.min_role}+{shown}"


def explanation(
    decision: walk.Decision, settings: Settings, assumed: str = "", handshake: str | None = None
) -> str:
    """``explain``'s answer: one line per step of the walk, then the verdict.
    ``handshake``: what the TLS handshake made of a client certificate (``--cert``)."""
    asked = "" if decision.version == (1, 1) else " HTTP/{}.{}".format(*decision.version)
    lines = [f"{decision.method} {decision.target}{asked}  (nothing is sent)"]
    if handshake is not None:
        lines.append(f"  {'tls':<9} {handshake}")
    reached = {step.name: step for step in decision.steps}
    for name in walk.STEPS:
        step = reached.get(name)
        if step is None:
            lines.append(f"  {name:<9} -        not reached")
            continue
        detail = step.detail + (assumed if name == "identity" and step.ok else "")
        lines.append(f"  {name:<9} {'ok' if step.ok else 'REFUSED':<8} {detail}")
    if decision.error is not None:
        lines.append(f"would refuse: {decision.error.status} {decision.error.code}")
    else:
        url = str(settings.upstream.url).rstrip("/") + decision.target
        lines.append(f"would forward: {decision.method} {url}")
    return "\n".join(lines)


def handshake_refused(method: str, target: str, why: str) -> str:
    """``explain --cert`` with a certificate the handshake refuses: no request is read."""
    lines = [f"{method} {target}  (nothing is sent)", f"  {'tls':<9} {why}"]
    lines += [f"  {name:<9} -        not reached" for name in walk.STEPS]
    lines.append("would refuse: the TLS handshake (connection closed; no HTTP answer)")
    return "\n".join(lines)


# --- the key reference (docs/config.md) ----------------------------------------------------


def reference(model: type[BaseModel], prefix: str = "") -> list[str]:
    """A Markdown table row per key of ``model``: key, type, default, description."""
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        about = info.description or ""
        nested = _model_of(info.annotation)
        items = _model_of(_item(info.annotation))
        if nested is not None and nested is not Policy:
            default = "required" if info.is_required() else "optional"
            rows.append(f"| `{key}` | mapping | {default} | {about} |")
            rows += reference(nested, f"{key}.")
        elif items is not None:
            rows.append(f"| `{key}` | list of mappings | {_default(info)} | {about} |")
            rows += reference(items, f"{key}[].")
        else:
            rows.append(f"| `{key}` | {_kind(info)} | {_default(info)} | {about} |")
    return rows


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None or value == () or value == {}:
        return "—"
    if isinstance(value, bool):
        return f"`{'true' if value else 'false'}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


_KINDS: dict[Any, str] = {
    float: "number",
    int: "integer",
    str: "string",
    bool: "true/false",
    Address: "HOST:PORT",
    URL: "URL",
    Secret: "secret",
    StateURL: "URL",
    Policy: "file",
    re.Pattern: "regex",
    ipaddress.IPv4Network: "CIDR",
}


def _kind(info: FieldInfo) -> str:
    base = _strip(info.annotation)
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        kind = "list of " + _name(_strip(typing.get_args(base)[0]))
    elif origin is dict:
        kind = "mapping of " + _name(_strip(typing.get_args(base)[1]))
    else:
        kind = _name(base)
    for bound in info.metadata:
        if isinstance(bound, Gt):
            kind += f" > {bound.gt}"
        elif isinstance(bound, Ge):
            kind += f" ≥ {bound.ge}"
        elif isinstance(bound, Le):
            kind += f" ≤ {bound.le}"
    return kind


def _name(kind: Any) -> str:
    if typing.get_origin(kind) is re.Pattern:
        return "regex"
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        return "CIDR" if ipaddress.IPv4Network in args else "JSON value"
    return _KINDS.get(kind, getattr(kind, "__name__", "value"))


def _item(annotation: Any) -> Any:
    base = _strip(annotation)
    if typing.get_origin(base) in (tuple, list):
        return typing.get_args(base)[0]
    return None


def _strip(kind: Any) -> Any:
    while typing.get_origin(kind) is typing.Annotated:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = _strip(options[0]) if len(options) == 1 else kind
    return kind


def _model_of(annotation: Any) -> type[BaseModel] | None:
    kind = _strip(annotation)
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


TABLE_HEAD = ["| key | type | default | what it does |", "|---|---|---|---|"]


def write_reference(page: str) -> bool:
    """Regenerate the key tables between ``<!-- keys: NAME -->`` and ``<!-- /keys -->``
    in ``page`` (NAME ``gateway.yaml`` or ``policy.yaml``); True if it changed."""
    tables: dict[str, type[BaseModel]] = {"gateway.yaml": Settings, "policy.yaml": Policy}
    with open(page, encoding="utf-8") as fh:
        old = fh.read()
    out, rest = [], old
    while "<!-- keys: " in rest:
        before, _, rest = rest.partition("<!-- keys: ")
        name, _, rest = rest.partition(" -->")
        _, _, rest = rest.partition("<!-- /keys -->")
        rows = [*TABLE_HEAD, *reference(tables[name])]
        out += [before, f"<!-- keys: {name} -->\n", "\n".join(rows), "\n<!-- /keys -->"]
    new = "".join([*out, rest])
    if new != old:
        with open(page, "w", encoding="utf-8") as fh:
            fh.write(new)
    return new != old


if __name__ == "__main__":  # make docs
    import sys

    for page in sys.argv[1:]:
        print(f"{page}: {'updated' if write_reference(page) else 'up to date'}")
