"""gateway/retry.py: every retry rule, on a scripted transport in fake time.

No sockets and no real waiting: the transport returns the next scripted answer
or failure (taking as long as the script says), and the clock only moves when
an attempt takes time or the policy sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import signing
from gateway.config import UpstreamSettings
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.retry import DEFAULT_POLICY, MAX_ATTEMPTS, Retrying, RetryPolicy, Tally, retry_after
from gateway.signing import Secret, Signer
from gateway.transport import Answer, Failure, Kind, Outgoing, UpstreamRequest

SIGNER = Signer("NCSTEST000000001", Secret("retry-test-secret"))
TARGET = "/crm-core/v1/records/bulk/restore?x=1"


class Scripted(Answer):
    """An answer that remembers being released (its connection given back)."""

    __slots__ = ("released",)

    def __init__(self, status: int, retry_after: str | None) -> None:
        headers: CIMultiDict[str] = CIMultiDict()
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        super().__init__(status, CIMultiDictProxy(headers), body=b"{}")
        self.released = False

    def release(self) -> None:
        self.released = True


def answer(status: int, retry_after: str | None = None) -> Scripted:
    return Scripted(status, retry_after)


def failed(kind: Kind, *, sent: bool) -> Failure:
    error = UpstreamTimeout("t") if kind == "timeout" else UpstreamUnavailable(kind)
    return Failure(kind, error, sent=sent)


REFUSED = failed("connect", sent=False)
CONNECT_TIMEOUT = failed("timeout", sent=False)
RESET = failed("reset", sent=True)
READ_TIMEOUT = failed("timeout", sent=True)
GARBLED = failed("protocol", sent=True)
THROTTLED = answer(429, "0")


@dataclass
class Script:
    """A transport and a clock: each send takes ``took_s`` and gives the next result."""

    results: list[Scripted | Failure]
    took_s: float = 0.0
    now: float = 1000.0
    oversleep_s: float = 0.0  # a loop that wakes up late
    sent: list[Outgoing] = field(default_factory=list)
    slept: list[float] = field(default_factory=list)
    given: list[Scripted] = field(default_factory=list)

    async def send(self, outgoing: Outgoing) -> Answer:
        self.sent.append(outgoing)
        self.now += self.took_s
        result = self.results.pop(0)
        if isinstance(result, Failure):
            raise result
        self.given.append(result)
        return result

    @property
    def released(self) -> list[Scripted]:
        return [a for a in self.given if a.released]

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds + self.oversleep_s


def settings(timeout_s: float = 10.0, connect_timeout_s: float = 1.0) -> UpstreamSettings:
    return UpstreamSettings(
        url=URL("http://upstream.test:8089"),
        connect_timeout_s=connect_timeout_s,
        timeout_s=timeout_s,
    )


async def run(
    script: Script,
    *,
    on_throttle: bool = False,
    timeout_s: float = 10.0,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> tuple[Answer | Exception, Tally]:
    retrying = Retrying(script, policy, clock=script.clock, sleep=script.sleep, jitter=lambda: 1.0)
    request = UpstreamRequest(
        "POST", TARGET, CIMultiDict({"X-Request-ID": "r1"}), b"{}", on_throttle=on_throttle
    )
    tally = Tally()
    try:
        result: Answer | Exception = await retrying.send(
            request, settings(timeout_s), SIGNER.fresh_header, tally
        )
    except (UpstreamUnavailable, UpstreamTimeout) as exc:
        result = exc
    return result, tally


# --- what is retried ------------------------------------------------------------------------


async def test_an_answer_is_returned_after_one_attempt() -> None:
    script = Script([answer(200)])
    result, tally = await run(script)
    assert isinstance(result, Answer) and result.status == 200
    assert (tally.attempts, tally.failures, tally.retries) == (1, [], [])
    (sent,) = script.sent
    assert (sent.method, str(sent.url), sent.body) == (
        "POST",
        "http://upstream.test:8089" + TARGET,
        b"{}",
    )


async def test_a_refused_connection_is_retried_up_to_max_attempts_then_502() -> None:
    script = Script([REFUSED] * MAX_ATTEMPTS)
    result, tally = await run(script)
    assert isinstance(result, UpstreamUnavailable)
    assert tally.attempts == MAX_ATTEMPTS == len(script.sent)
    assert tally.failures == ["connect"] * MAX_ATTEMPTS
    assert tally.retries == ["connect"] * (MAX_ATTEMPTS - 1)
    assert tally.error_kind == "connect"


async def test_a_connect_timeout_is_retried_too_and_counted_as_timeout() -> None:
    script = Script([CONNECT_TIMEOUT, answer(200)])
    result, tally = await run(script)
    assert isinstance(result, Answer) and result.status == 200
    assert tally.failures == ["timeout"] and tally.retries == ["connect"]


async def test_the_backoff_doubles_between_connection_attempts() -> None:
    script = Script([REFUSED, REFUSED, answer(200)])
    await run(script, policy=RetryPolicy(backoff_s=0.1))
    assert script.slept == [0.1, 0.2]


def test_the_backoff_is_scaled_by_the_jitter() -> None:
    policy = RetryPolicy(backoff_s=0.05)
    assert policy.backoff(1, 0.5) == 0.025
    assert policy.backoff(3, 1.0) == 0.2


@pytest.mark.parametrize(
    "fault", [RESET, READ_TIMEOUT, GARBLED], ids=["reset", "read-timeout", "protocol"]
)
async def test_a_failure_after_sending_is_never_retried(fault: Failure) -> None:
    # Upstream may have acted on it: repeating could restore or delete twice.
    script = Script([fault, answer(200)])
    result, tally = await run(script, on_throttle=True)
    assert result is fault.error
    assert (tally.attempts, tally.failures, tally.retries) == (1, [fault.kind], [])
    assert tally.error_kind == fault.kind


@pytest.mark.parametrize("status", [429, 503])
async def test_a_throttled_answer_is_retried_on_routes_that_opt_in(status: int) -> None:
    script = Script([answer(status, "2"), answer(200)])
    result, tally = await run(script, on_throttle=True)
    assert isinstance(result, Answer) and result.status == 200
    assert tally.retries == ["throttle"] and tally.failures == []
    assert script.slept == [2.0]  # as long as Retry-After says, no backoff of its own
    assert [a.status for a in script.released] == [status]  # the throttled one is let go


async def test_a_throttled_answer_is_passed_back_where_the_route_did_not_opt_in() -> None:
    script = Script([THROTTLED, answer(200)])
    result, tally = await run(script)
    assert result is THROTTLED and tally.attempts == 1 and script.slept == []


@pytest.mark.parametrize("value", [None, "soon"])
async def test_a_throttled_answer_without_a_usable_retry_after_is_passed_back(
    value: str | None,
) -> None:
    throttled = answer(429, value)
    script = Script([throttled, answer(200)])
    result, tally = await run(script, on_throttle=True)
    assert result is throttled and tally.retries == []


async def test_other_statuses_are_answers_even_on_routes_that_opt_in() -> None:
    for status in (500, 502, 504, 400):
        script = Script([answer(status, "0"), answer(200)])
        result, tally = await run(script, on_throttle=True)
        assert isinstance(result, Answer) and result.status == status
        assert tally.attempts == 1


async def test_throttled_answers_stop_at_max_attempts_with_the_last_one() -> None:
    script = Script([answer(429, "0") for _ in range(MAX_ATTEMPTS + 1)])
    result, tally = await run(script, on_throttle=True)
    assert isinstance(result, Answer) and result.status == 429
    assert tally.attempts == MAX_ATTEMPTS and tally.retries == ["throttle"] * (MAX_ATTEMPTS - 1)
    assert len(script.released) == MAX_ATTEMPTS - 1  # the last one goes to the caller


async def test_max_attempts_comes_from_the_policy() -> None:
    script = Script([REFUSED] * 5)
    _, tally = await run(script, policy=RetryPolicy(max_attempts=5))
    assert tally.attempts == 5
    script = Script([REFUSED] * 5)
    _, tally = await run(script, policy=RetryPolicy(max_attempts=1))
    assert tally.attempts == 1 and tally.retries == []


# --- one budget for all attempts ------------------------------------------------------------


async def test_each_attempt_may_take_only_the_time_left() -> None:
    script = Script([REFUSED, REFUSED, answer(200)], took_s=1.0)
    await run(script, timeout_s=5.0, policy=RetryPolicy(backoff_s=0.5))
    # 5 s budget: 1 s attempt, 0.5 s pause, 1 s attempt, 1 s pause, then 1.5 s are left.
    assert [o.timeout_s for o in script.sent] == [5.0, 3.5, 1.5]
    assert [o.connect_timeout_s for o in script.sent] == [1.0, 1.0, 1.0]


async def test_the_connect_timeout_never_exceeds_the_time_left() -> None:
    script = Script([REFUSED, answer(200)], took_s=0.7)
    await run(script, timeout_s=1.0, policy=RetryPolicy(backoff_s=0.1))
    assert script.sent[1].connect_timeout_s == pytest.approx(0.2)


async def test_a_retry_after_beyond_the_budget_is_not_waited_for() -> None:
    script = Script([answer(429, "5"), answer(200)])
    result, tally = await run(script, on_throttle=True, timeout_s=5.0)
    assert isinstance(result, Answer) and result.status == 429
    assert tally.attempts == 1 and script.slept == []


async def test_a_pause_must_leave_the_next_attempt_a_margin_of_its_own() -> None:
    policy = RetryPolicy(margin_s=0.5)
    fits = Script([answer(429, "4"), answer(200)])
    assert (await run(fits, on_throttle=True, timeout_s=4.6, policy=policy))[1].attempts == 2
    short = Script([answer(429, "4"), answer(200)])
    assert (await run(short, on_throttle=True, timeout_s=4.5, policy=policy))[1].attempts == 1


async def test_a_backoff_that_does_not_fit_ends_in_the_connection_error() -> None:
    script = Script([REFUSED, answer(200)], took_s=0.95)
    result, tally = await run(script, timeout_s=1.0)
    assert isinstance(result, UpstreamUnavailable) and tally.attempts == 1


async def test_a_budget_spent_while_sleeping_is_a_timeout_without_another_attempt() -> None:
    script = Script([answer(429, "1"), answer(200)], oversleep_s=5.0)
    result, tally = await run(script, on_throttle=True, timeout_s=3.0)
    assert isinstance(result, UpstreamTimeout)
    assert tally.attempts == 1 and tally.error_kind == "timeout" and tally.failures == []


# --- every attempt is signed afresh ---------------------------------------------------------


async def test_every_attempt_carries_its_own_signature_with_a_fresh_salt() -> None:
    script = Script([REFUSED, THROTTLED, answer(200)])
    await run(script, on_throttle=True)
    headers = [o.headers["Authorization"] for o in script.sent]
    assert len({signing.parse(h).salt for h in headers}) == 3
    for header in headers:
        parsed = signing.parse(header)
        assert parsed.api_key == SIGNER.api_key
        assert parsed.signature == signing.signature(SIGNER.secret, parsed.date, parsed.salt)
    # The rest of the headers go as they were; the request's own are never changed.
    assert all(o.headers["X-Request-ID"] == "r1" for o in script.sent)


async def test_the_request_headers_are_copied_not_changed() -> None:
    request_headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    script = Script([answer(200)])
    retrying = Retrying(script, clock=script.clock, sleep=script.sleep)
    request = UpstreamRequest("GET", "/x", request_headers, None)
    await retrying.send(request, settings(), SIGNER.fresh_header, Tally())
    assert "Authorization" not in request_headers
    assert script.sent[0].headers["Content-Type"] == "application/json"


# --- Retry-After ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), ("7", 7.0), (" 12 ", 12.0), (None, None), ("soon", None), ("-1", None)],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert retry_after(value) == expected


def test_retry_after_http_date() -> None:
    now = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after(later, now.timestamp()) == 30.0
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert retry_after(earlier, now.timestamp()) == 0.0
