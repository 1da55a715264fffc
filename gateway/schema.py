"""The building blocks every key of ``gateway.yaml`` and ``policy.yaml`` is declared with.

Each key is one field of a pydantic model (``gateway/config.py`` for the
config, ``gateway/policy.py`` and the modules it names for the policy): its
name, type, default, bounds and a one-line ``description``. Loading, defaults,
unknown-key errors, the ``check-config`` summary and the reference in
``docs/config.md`` all follow from that one declaration.

Values arrive from YAML (``gateway/yamlsource.py``) and are never coerced:
``"30"`` is not a number and ``1.5`` is not an integer. A check that finds a
problem raises ``Invalid`` (a ``ValueError``, so pydantic collects it with every
other problem); ``yamlsource`` turns each into ``FILE:LINE: key.path: message``.

Validation context (``info.context``), set by the loader:

    base      the folder of the file being read: relative paths start there
    problems  where problems of another file (the policy, read while the
              config is validated) are collected
    seen      names already used, per kind, so a twin is named however bad
              the first entry was
    roles     the policy's roles, once they validated, for role references
    files     every file a key names that the load reads (``resolve``): what
              ``Settings.watched_files`` reports and ``reload_on_change`` polls
    warnings  what ``warn`` recorded: problems that do not stop a load
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from typing import Annotated, Any, Final

from annotated_types import Ge, Gt
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    Strict,
    ValidationInfo,
)

Loc = tuple[str | int, ...]
# ``Field(json_schema_extra=MASKED)``: summaries show only a value's first letters.
MASKED: Final[dict[str, Any]] = {"summary": "masked"}
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_ENV_REF: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Invalid(ValueError):
    """One problem with the value being validated.

    ``at`` names a key below that value (``("hmac_secret",)``) when the problem
    belongs there; ``key_line`` points the problem at that key's own line
    rather than its value's (e.g. an unknown key inside a mapping); ``near``
    names a sibling key whose line to use when the value's own key is absent
    (a default that clashes with a key that was written).
    """

    def __init__(
        self, message: str, *, at: Loc = (), key_line: bool = False, near: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.at, self.key_line, self.near = message, at, key_line, near


class Invalids(ValueError):
    """Several problems found by one check (e.g. every rule of a route)."""

    def __init__(self, problems: list[Invalid]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


class Reported(ValueError):
    """The value's problems were already recorded against another file."""


class Model(BaseModel):
    """A mapping of the config or policy: unknown keys are problems, values frozen."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        arbitrary_types_allowed=True,
        hide_input_in_errors=True,  # a value may be a secret
    )


def context(info: ValidationInfo) -> dict[str, Any]:
    ctx = info.context
    return ctx if isinstance(ctx, dict) else {}


def seen(info: ValidationInfo, kind: str) -> set[str]:
    """The names of ``kind`` used so far in this load (a twin is a problem)."""
    found: dict[str, set[str]] = context(info).setdefault("seen", {})
    return found.setdefault(kind, set())


def warn(info: ValidationInfo, message: str, *, at: Loc) -> None:
    """Note something worth an operator's attention that does not stop the load
    (a certificate about to expire). ``at`` is the key's whole path from the top
    of the file being read, e.g. ``("tls", "cert_file")``: it becomes
    ``FILE:LINE: tls.cert_file: message``, which ``check-config`` prints after its
    summary (exit 0) and ``serve`` logs as it starts and reloads."""
    context(info).setdefault("warnings", []).append((at, message))


# --- plain values: never coerced ------------------------------------------------------

Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Int = Annotated[int, Strict()]
Count = Annotated[int, Strict(), Ge(1)]
Number = Annotated[float, Strict(), AllowInfNan(False)]
Seconds = Annotated[float, Strict(), AllowInfNan(False), Gt(0)]
SecondsOrZero = Annotated[float, Strict(), AllowInfNan(False), Ge(0)]


def expand_env(value: object) -> object:
    """``${VAR}`` replaced from the environment; every unset one is named."""
    if not isinstance(value, str):
        return value
    missing = [name for name in _ENV_REF.findall(value) if name not in os.environ]
    if missing:
        raise Invalid(f"environment variable {', '.join(missing)} is not set")
    return _ENV_REF.sub(lambda m: os.environ[m.group(1)], value)


def check(test: Callable[[Any], str | None]) -> AfterValidator:
    """An after-validator from a function that returns a problem, or None."""

    def run(value: Any) -> Any:
        problem = test(value)
        if problem is not None:
            raise Invalid(problem)
        return value

    return AfterValidator(run)


def matching(pattern: re.Pattern[str], rule: str) -> AfterValidator:
    return check(lambda v: None if pattern.fullmatch(v) else rule)


def not_empty(value: str) -> str | None:
    return "is empty" if value == "" else None


EnvStr = Annotated[str, Strict(), BeforeValidator(expand_env)]
NonEmpty = Annotated[str, Strict(), check(not_empty)]


def text(value: object, kind: str = "a string") -> str:
    """``value`` if it is a string, else the problem a plain validator reports."""
    if not isinstance(value, str):
        raise Invalid(f"must be {kind}")
    return value


def plain(
    parse: Callable[[str], Any], *, env: bool = False, keep: type | tuple[type, ...] = ()
) -> PlainValidator:
    """A validator for a type read from one string (an address, a regex, a network);
    a value that already is one (``keep``, built in code rather than read) passes."""

    def run(value: object) -> Any:
        if keep and isinstance(value, keep):
            return value
        return parse(text(expand_env(value) if env else value))

    return PlainValidator(run)


def compile_regex(source: str) -> re.Pattern[str]:
    try:
        return re.compile(source)
    except re.error as exc:
        raise Invalid(f"bad regex: {exc}") from None


def network(source: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(source, strict=True)
    except ValueError as exc:
        raise Invalid(f"not a CIDR network: {exc}") from None


Regex = Annotated[re.Pattern[str], plain(compile_regex, keep=re.Pattern)]
Network = Annotated[IPNetwork, plain(network, keep=(ipaddress.IPv4Network, ipaddress.IPv6Network))]


def json_scalar(value: object) -> str | int | float | bool | None:
    """One JSON value that is not a list or an object."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid("must be a finite number")
        return value
    raise Invalid("must be one value: a string, a number, true, false or null")


JsonScalar = Annotated[str | int | float | bool | None, PlainValidator(json_scalar)]


def none_as_empty(value: object) -> object:
    """``key:`` with nothing after it reads as null: take it as an empty list."""
    return [] if value is None else value


def resolve(info: ValidationInfo, name: str, *, output: bool = False) -> str:
    """A path from the file being read, relative to that file's folder.

    Every file-valued key resolves its path here, so the load knows every file it
    depends on (``files`` in the context); ``output``: a file the gateway writes
    (the audit log), which is not one of them."""
    path = os.path.join(str(context(info).get("base", "")), name)
    if not output:
        files = context(info).get("files")
        if isinstance(files, list):
            files.append(path)
    return path


def file_path(value: object, info: ValidationInfo, *, output: bool = False) -> str:
    """A file's path as written (``${VAR}`` allowed), relative to the file being read
    (``output``: one the gateway writes, see ``resolve``)."""
    name = text(expand_env(value))
    if not name:
        raise Invalid("is empty")
    return resolve(info, name, output=output)


def read_text(path: str) -> str:
    """A file's text, or the problem of reading it."""
    try:
        # newline="": the text as the bytes say (its SHA-256 is that of the file).
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise Invalid(f"cannot read {path}: {why}") from None
