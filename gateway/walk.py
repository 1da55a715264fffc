"""The deciding half of a request's walk: every check, and no I/O.

    target → identity → route → role → params → body → rules   → "would forward"

    locate       the target (one Host, canonical syntax), and the route lookup
                 (its verdict waits)
    admit        identity, the route's verdict, role, path parameters
    check_body   the body, then the route's body rules
    decide       all three in a row, for a body already in hand

The body is read between ``admit`` and ``check_body``, and only then: the
live handler reads it from the socket once ``admit`` has said yes (so nobody
unidentified makes the gateway read a megabyte), ``solapi-gateway explain``
reads a file. The live gateway and ``explain`` call these same functions, so
they cannot disagree about a request.

Every refusal that depends only on the request is made here. The others are
not the request's doing, and ``explain`` cannot foresee them: the gateway
draining (503 ``ShuttingDown``, after ``locate``), a body that does not arrive
in time (408), no upstream slot free (503 ``Overloaded``), upstream failing
(502/504). Before any of this, and before a handler exists, gateway/protocol.py
refuses what the HTTP parser sees: a request that is not well-formed HTTP/1.x
(a missing Host included) and a ``Transfer-Encoding`` the gateway would not
trust. ``explain`` takes a request that was already parsed and framed: its
body is a file, and it assumes the one Host every HTTP/1.1 client sends.

Each step is recorded in the ``Decision`` as it passes or refuses: the first
step that says no raises its ``GatewayError`` (and stores it), and no later
step runs. The route is looked up before identity, but only so that logs and
metrics can name it whichever step refuses; its 404/405 is still reported at
the route step, after the 401.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from multidict import MultiMapping

from gateway import batch
from gateway.errors import (
    GatewayError,
    InvalidBody,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from gateway.identity import Caller, identify
from gateway.policy import UNMATCHED, Policy
from gateway.routes import Route
from gateway.signing import Verifier
from gateway.target import split_target

STEPS: Final = ("target", "identity", "route", "role", "params", "body", "rules")


class Step(NamedTuple):  # a tuple: made seven times a request, and a tuple is cheap
    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Decision:
    """What the walk found out about one request, step by step."""

    method: str
    target: str  # the request target as received: path and query
    path: str | None = None  # once the target is known to be canonical
    route: Route | None = None
    caller: Caller | None = None
    items: list[str] | None = None  # the batch's items, once they passed validation
    steps: list[Step] = field(default_factory=list)
    error: GatewayError | None = None
    unrouted: GatewayError | None = field(default=None, repr=False)  # held for the route step
    # False in the live gateway: a refusal is only raised, no step is recorded
    # (the steps are what ``explain`` shows; the gateway needs only the facts above).
    explain: bool = True

    @property
    def route_name(self) -> str:
        return self.route.name if self.route is not None else UNMATCHED

    @property
    def would_forward(self) -> bool:
        return self.error is None and len(self.steps) == len(STEPS)

    def step(self, name: str) -> _Recorder | _Quiet:
        """Record step ``name``: passed with the detail given to the callable the
        ``with`` block receives, or refused with the GatewayError that leaves it."""
        return _Recorder(self, name) if self.explain else _QUIET


class _Recorder:
    """The context manager behind ``Decision.step``: a plain class, because it runs
    seven times per request and a generator-based one costs several times more."""

    __slots__ = ("decision", "detail", "name")

    def __init__(self, decision: Decision, name: str) -> None:
        self.decision, self.name, self.detail = decision, name, ""

    def note(self, detail: str) -> None:
        self.detail = detail

    def __enter__(self) -> Callable[[str], None]:
        return self.note

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        d = self.decision
        if exc is None:
            d.steps.append(Step(self.name, True, self.detail))
        elif isinstance(exc, GatewayError):
            d.error = exc
            why = exc.reason or exc.message
            d.steps.append(Step(self.name, False, f"{exc.status} {exc.code}: {why}"))


class _Quiet:
    """``Decision.step`` when nothing is to be recorded: one shared, inert block."""

    __slots__ = ()

    def __enter__(self) -> Callable[[str], None]:
        return _ignore

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        return None


def _ignore(detail: str) -> None:
    pass


_QUIET: Final = _Quiet()


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The body is larger than {limit} bytes.")


def locate(d: Decision, headers: MultiMapping[str], policy: Policy) -> None:
    """Step 1, the target; then the route lookup, whose 404/405 waits for its step.

    The target is the request target with the Host it names (RFC 9110 §7.1), so
    a second Host is refused here, first of all."""
    with d.step("target") as note:
        if len(headers.getall("Host", ())) > 1:
            # RFC 9112 §3.2: which of two hosts was meant is anyone's guess.
            raise InvalidRequest("The request carries more than one Host header.")
        path, _ = split_target(d.target)
        d.path = path
        note(path)
    try:
        d.route = policy.match(d.method, path)
    except GatewayError as exc:
        d.unrouted = exc


def admit(
    d: Decision,
    headers: MultiMapping[str],
    peer: str | None,
    policy: Policy,
    verifier: Verifier,
    now: float,
) -> None:
    """Steps 2-4 and the path parameters, after ``locate``; raises the first refusal."""
    path = d.path
    assert path is not None, "admit before locate"
    with d.step("identity") as note:
        caller = d.caller = identify(headers, peer, policy, verifier, now)
        note(f"{caller.principal} (role {caller.role}, via {caller.via})")
    with d.step("route") as note:
        if d.unrouted is not None:
            raise d.unrouted
        route = d.route
        assert route is not None
        note(f"{route.name} ({route.method} {route.path})")
    with d.step("role") as note:
        policy.authorize(route, caller.role)
        note(f"{caller.role} is at least {route.min_role}")
    with d.step("params") as note:
        policy.check_params(route, path)
        note(", ".join(f"{name} matches" for name in route.params) or "none to check")


def check_body(
    d: Decision,
    headers: MultiMapping[str],
    body: bytes,
    policy: Policy,
    max_body_bytes: int,
) -> None:
    """Step 5, the body, then the route's body rules; raises the first refusal.

    The body is parsed (strictly, as batch bodies are) when the route has a
    ``batch``, or has ``rules`` and the body is not empty: a rule must judge
    the very JSON upstream will read, so it needs ``application/json`` too.
    """
    route, caller = d.route, d.caller
    assert route is not None and caller is not None, "check_body before admit"
    content_type = headers.get("Content-Type")
    content_encoding = headers.get("Content-Encoding")
    document: Any = None
    with d.step("body") as note:
        if len(body) > max_body_bytes:
            raise too_large(max_body_bytes)
        if route.batch is not None:
            batch.check_media(content_type, content_encoding)
            document = batch.parse_json(body)
            d.items = batch.check_document(document, route.batch)
            note(f"{route.batch.field}: {len(d.items)} valid item(s), {len(body)} bytes")
        elif route.rules and body:
            batch.check_media(content_type, content_encoding)
            document = batch.parse_json(body)
            if not isinstance(document, dict):
                raise InvalidBody("The body must be a JSON object.")
            note(f"a JSON object, {len(body)} bytes")
        else:
            if (content_encoding or "identity").strip().lower() != "identity":
                raise UnsupportedMediaType(
                    "Request bodies must not be compressed (Content-Encoding)."
                )
            note(f"{len(body)} bytes, not checked (no batch rule)")
    with d.step("rules") as note:
        applied = policy.authorize_body(route, caller.role, document)
        if not route.rules:
            note("none")
        elif not applied:
            note("none applies")
        else:
            note("; ".join(f"{r.when}: {caller.role} is at least {r.min_role}" for r in applied))


def decide(
    method: str,
    target: str,
    headers: MultiMapping[str],
    peer: str | None,
    body: bytes,
    policy: Policy,
    verifier: Verifier,
    now: float,
    max_body_bytes: int,
) -> Decision:
    """The whole walk for a body already in hand; a refusal is in ``Decision.error``."""
    d = Decision(method, target)
    try:
        locate(d, headers, policy)
        admit(d, headers, peer, policy, verifier, now)
        check_body(d, headers, body, policy, max_body_bytes)
    except GatewayError:
        pass  # recorded in d.error and in the step that refused
    return d
