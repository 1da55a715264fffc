"""The deciding half of a request's walk: every check, and no I/O.

    target → identity → route → role → params → query → body → rules → limits  → "would forward"

    locate       the target (HTTP/1.0 or 1.1, one Host, a framing the gateway
                 trusts, canonical syntax), and the route lookup (its verdict waits)
    admit        identity, then ``authorize``: the route's verdict, role, path and
                 query parameters
    check_body   the body, the route's body rules, and which rate limits apply
    decide       all three in a row, for a body already in hand

Two answers come from the process's shared state (gateway/state.py), which
the walk cannot see: whether an HMAC caller's salt was used before (asked
between ``identify`` and ``authorize``, and turned into the identity step's
refusal by ``refuse_identity``), and whether the rate limits that apply still
have room (asked after ``check_body``; the limits step only names them and
what the request costs). ``explain`` says so on those two lines. A batch
larger than a limit's burst can never pass: that refusal is the walk's own.

The body is read between ``admit`` and ``check_body``, and only then: the
live handler reads it from the socket once ``admit`` has said yes (so nobody
unidentified makes the gateway read a megabyte), ``solapi-gateway explain``
reads a file. The live gateway and ``explain`` call these same functions, so
they cannot disagree about a request.

Every refusal that depends only on the request is made here. The others are
not the request's doing, and ``explain`` cannot foresee them: the gateway
draining (503 ``ShuttingDown``, after ``locate``), a body that does not arrive
in time (408) or is cut off (499), no upstream slot free (503 ``Overloaded``),
upstream failing (502/504). Before any of this, and before a handler exists,
gateway/protocol.py answers what the HTTP parser itself refuses: a request that
is not well-formed HTTP/1.x (a missing Host included). What the parser lets
through is judged here, from the request line and headers alone: the HTTP
version and how the body is framed (``Transfer-Encoding``) are part of the
request's target step. ``explain`` takes a request that was already parsed: its
body is a file, its version HTTP/1.1 unless told otherwise, and it assumes the
one Host every HTTP/1.1 client sends.

Each step is recorded in the ``Decision`` as it passes or refuses: the first
step that says no raises its ``GatewayError`` (and stores it), and no later
step runs. The route is looked up before identity, but only so that logs and
metrics can name it whichever step refuses; its 404/405 is still reported at
the route step, after the 401.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, NoReturn

from multidict import MultiMapping

from gateway import batch, limits
from gateway.errors import (
    GatewayError,
    InvalidBody,
    InvalidRequest,
    PayloadTooLarge,
)
from gateway.headers import ONCE_ONLY
from gateway.identity import Caller, PeerCert
from gateway.identity import identify as identify_caller
from gateway.limits import Charge
from gateway.policy import UNMATCHED, Policy
from gateway.routes import Route
from gateway.signing import Verifier
from gateway.target import split_target

STEPS: Final = (
    "target", "identity", "route", "role", "params", "query", "body", "rules", "limits",
)  # fmt: skip
SERVED_VERSIONS: Final = ((1, 0), (1, 1))  # the HTTP versions a request line may name


class Step(NamedTuple):  # a tuple: made seven times a request, and a tuple is cheap
    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Decision:
    """What the walk found out about one request, step by step."""

    method: str
    target: str  # the request target as received: path and query
    version: tuple[int, int] = (1, 1)  # as the request line said
    path: str | None = None  # once the target is known to be canonical
    query: str = ""  # the raw query string, once the target is known to be canonical
    route: Route | None = None
    caller: Caller | None = None
    items: list[str] | None = None  # the batch's items, once they passed validation
    charges: list[Charge] | None = None  # the rate limits the request counts against
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
    eight times per request and a generator-based one costs several times more."""

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

    The target is the request target with the version it was asked in, the Host
    it names (RFC 9110 §7.1) and how its body is framed: each of these is refused
    here, first of all."""
    with d.step("target") as note:
        problem = framing_problem(d.version, headers)
        if problem is not None:
            raise InvalidRequest(problem)
        path, query = split_target(d.target)
        d.path, d.query = path, query
        note(path)
    try:
        d.route = policy.match(d.method, path)
    except GatewayError as exc:
        d.unrouted = exc


def framing_problem(version: tuple[int, int], headers: MultiMapping[str]) -> str | None:
    """Why the request line or the headers that frame the request cannot be trusted."""
    if version not in SERVED_VERSIONS:
        # HTTP/2.0 or 0.9 in an HTTP/1 request line is nobody's real request:
        # what a server behind would make of it is anyone's guess.
        return "The gateway serves HTTP/1.0 and HTTP/1.1 requests only."
    for name in ONCE_ONLY:
        if len(headers.getall(name, ())) > 1:
            # RFC 9112 §3.2: which of two hosts (or lengths, or types) was meant is
            # anyone's guess. The live parser refuses these itself: here for explain.
            return f"The request carries more than one {name} header."
    codings = headers.getall("Transfer-Encoding", ())
    if codings:
        # RFC 9112 §6.1: a server in front of the gateway could frame these otherwise.
        if version < (1, 1):
            return "Transfer-Encoding is not allowed on an HTTP/1.0 request."
        if len(codings) != 1 or codings[0].strip().lower() != "chunked":
            return "The only transfer coding accepted is chunked."
    return None


def admit(
    d: Decision,
    headers: MultiMapping[str],
    peer: str | None,
    policy: Policy,
    verifier: Verifier,
    now: float,
    cert: PeerCert | None = None,
) -> None:
    """Steps 2-4 and the path parameters, after ``locate``; raises the first refusal.
    ``cert``: the client certificate the TLS handshake verified, if any."""
    identify(d, headers, peer, policy, verifier, now, cert)
    authorize(d, policy)


def identify(
    d: Decision,
    headers: MultiMapping[str],
    peer: str | None,
    policy: Policy,
    verifier: Verifier,
    now: float,
    cert: PeerCert | None = None,
) -> None:
    """Step 2. An HMAC signature is checked here; whether its salt is new is the
    replay memory's to say (gateway/state.py), before ``authorize``."""
    with d.step("identity") as note:
        caller = d.caller = identify_caller(headers, peer, policy, verifier, now, cert)
        if d.explain:  # (the live gateway records no step: no detail is built for it)
            memory = "; a reused salt is known only to the running gateway" if caller.signed else ""
            note(f"{caller.principal} (role {caller.role}, via {caller.via}{memory})")


def refuse_identity(d: Decision, exc: GatewayError) -> NoReturn:
    """The replay memory's verdict on an HMAC caller the identity step let pass:
    the identity step refuses after all, and no later step runs."""
    why = exc.reason or exc.message
    d.steps[:] = [s for s in d.steps if s.name != "identity"]
    d.steps.append(Step("identity", False, f"{exc.status} {exc.code}: {why}"))
    d.caller = None  # not identified after all: the log names no principal
    d.error = exc
    raise exc


def authorize(d: Decision, policy: Policy) -> None:
    """Steps 3-4 and the path parameters, after ``identify``; raises the first refusal."""
    path, caller = d.path, d.caller
    assert path is not None and caller is not None, "authorize before identify"
    with d.step("route") as note:
        if d.unrouted is not None:
            raise d.unrouted
        route = d.route
        assert route is not None
        if d.explain:
            note(f"{route.name} ({route.method} {route.path})")
    with d.step("role") as note:
        policy.authorize(route, caller.role)
        if d.explain:
            note(f"{caller.role} is at least {route.min_role}")
    with d.step("params") as note:
        policy.check_params(route, path)
        if d.explain:
            note(", ".join(f"{name} matches" for name in route.params) or "none to check")
    with d.step("query") as note:
        given = policy.check_query(route, d.query)
        if not d.explain:
            pass
        elif route.query is None:
            note("not checked (no query rule)")
        else:
            note(", ".join(f"{name} matches" for name in given) or "none given")


def check_body(
    d: Decision,
    headers: MultiMapping[str],
    body: bytes,
    policy: Policy,
    max_body_bytes: int,
) -> None:
    """Step 5, the body, then the route's body rules and its rate limits; raises the
    first refusal.

    The body is parsed (strictly, as batch bodies are) when the route has a
    ``batch``, or has ``rules`` and the body is not empty: a rule must judge
    the very JSON upstream will read, so it needs ``application/json`` too.
    """
    route, caller = d.route, d.caller
    assert route is not None and caller is not None, "check_body before admit"
    content_types = headers.getall("Content-Type", ())
    content_encodings = headers.getall("Content-Encoding", ())
    document: Any = None
    with d.step("body") as note:
        if len(body) > max_body_bytes:
            raise too_large(max_body_bytes)
        if route.batch is not None:
            batch.check_media(content_types, content_encodings)
            document = batch.parse_json(body, route.batch.structure_limit)
            d.items = batch.check_document(document, route.batch, route.allowed_fields)
            if d.explain:
                note(f"{route.batch.field}: {len(d.items)} valid item(s), {len(body)} bytes")
        elif route.rules and body:
            batch.check_media(content_types, content_encodings)
            document = batch.parse_json(body)
            if not isinstance(document, dict):
                raise InvalidBody("The body must be a JSON object.")
            if d.explain:
                note(f"a JSON object, {len(body)} bytes")
        else:
            batch.check_encoding(content_encodings)
            if d.explain:
                note(f"{len(body)} bytes, not checked (no batch rule)")
    with d.step("rules") as note:
        applied = policy.authorize_body(route, caller.role, document)
        if not d.explain:
            pass
        elif not route.rules:
            note("none")
        elif not applied:
            note("none applies")
        else:
            note("; ".join(f"{r.when}: {caller.role} is at least {r.min_role}" for r in applied))
    with d.step("limits") as note:
        items = len(d.items) if d.items is not None else 0
        found = d.charges = limits.charges(policy.limits, route.name, caller.principal, items)
        too_big = limits.never_fits(found)
        if too_big is not None:
            raise limits.refusal(too_big, too_big.limit.tolerance_s)
        if not d.explain:
            pass
        elif found:
            shown = "; ".join(charge.describe() for charge in found)
            note(f"{shown} [counted by the running gateway: whether room is left is its to say]")
        else:
            note("none apply")


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
    cert: PeerCert | None = None,
    version: tuple[int, int] = (1, 1),
) -> Decision:
    """The whole walk for a body already in hand; a refusal is in ``Decision.error``."""
    d = Decision(method, target, version)
    try:
        locate(d, headers, policy)
        admit(d, headers, peer, policy, verifier, now, cert)
        check_body(d, headers, body, policy, max_body_bytes)
    except GatewayError:
        pass  # recorded in d.error and in the step that refused
    return d
