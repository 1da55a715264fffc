"""Whether to try upstream again: the retry policy, over any ``Transport``.

    send ─→ Answer ─┬─ 429/503 on a route that opted in, Retry-After fits ─→ wait, send again
           │        └─ any other answer ────────────────────────────────→ returned as it is
           └─→ Failure ─┬─ nothing was sent (connect refused or timed out),
                        │  and the backoff fits ───────────────────────→ wait, send again
                        └─ anything else ──────────────────────────────→ its error raised

Retried only where repeating cannot do harm: a connection that was never made
(upstream cannot have acted on it), and, on routes that opt in, a throttled
answer whose ``Retry-After`` says when to come back. Never retried: a reset
or timeout after the request was sent, since upstream may already have
restored or deleted the records.

Every attempt is signed afresh (upstream refuses a signature it has seen), there
are at most ``max_attempts``, and all of them share one ``timeout_s`` budget:
each attempt may take the time left, and a pause is taken only if the next
attempt still has ``margin_s`` of its own after it. The clock, the sleep and
the backoff's jitter are passed in, so tests/test_retry.py runs every rule on
a scripted transport in fake time.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from yarl import URL

from gateway.config import UpstreamSettings
from gateway.errors import UpstreamTimeout
from gateway.transport import Answer, Failure, Outgoing, Transport, UpstreamRequest

MAX_ATTEMPTS: Final = 3
THROTTLE_STATUSES: Final = frozenset({429, 503})

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class Tally:
    """What happened upstream, for the access log and metrics."""

    attempts: int = 0
    error_kind: str | None = None  # of the last failed attempt
    failures: list[str] = field(default_factory=list)  # kind of every failed attempt
    retries: list[str] = field(default_factory=list)  # why each retry happened

    def failed(self, kind: str) -> None:
        self.error_kind = kind
        self.failures.append(kind)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = MAX_ATTEMPTS
    backoff_s: float = 0.05  # before the second attempt, doubling after; times the jitter
    margin_s: float = 0.05  # the least time left to an attempt that follows a pause
    throttle_statuses: frozenset[int] = THROTTLE_STATUSES

    def backoff(self, attempts: int, jitter: float) -> float:
        """The pause after ``attempts`` failed connections."""
        return self.backoff_s * 2.0 ** (attempts - 1) * jitter


DEFAULT_POLICY: Final = RetryPolicy()


def _jitter() -> float:
    # Spread the retries of many requests that failed at once.
    return random.uniform(0.5, 1.0)


class Retrying:
    """Sends an ``UpstreamRequest`` over ``transport`` as ``policy`` allows."""

    def __init__(
        self,
        transport: Transport,
        policy: RetryPolicy = DEFAULT_POLICY,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = _jitter,
    ) -> None:
        self.transport, self.policy = transport, policy
        self._clock, self._sleep, self._jitter = clock, sleep, jitter

    async def send(
        self,
        request: UpstreamRequest,
        settings: UpstreamSettings,
        sign: Callable[[], str],
        tally: Tally,
    ) -> Answer:
        """The answer to pass back (the caller releases it), or the last failure's error."""
        # encoded=True: the target was checked to be canonical; yarl must not rewrite it.
        url = URL(f"{settings.url}{request.target}", encoded=True)
        deadline = self._clock() + settings.timeout_s
        remaining = settings.timeout_s  # the whole budget for the first attempt
        while True:
            if tally.attempts:
                remaining = deadline - self._clock()
            if remaining <= 0:
                tally.error_kind = "timeout"
                raise UpstreamTimeout("The upstream did not answer in time.")
            headers = request.headers.copy()
            headers["Authorization"] = sign()  # a fresh date and salt for every attempt
            outgoing = Outgoing(
                request.method,
                url,
                headers,
                request.body,
                remaining,
                min(settings.connect_timeout_s, remaining),
                settings.ssl_context,
            )
            tally.attempts += 1
            try:
                answer = await self.transport.send(outgoing)
            except Failure as failed:
                tally.failed(failed.kind)
                pause_s = self.policy.backoff(tally.attempts, self._jitter())
                if not failed.sent and self._may_retry(tally, deadline, pause_s):
                    tally.retries.append("connect")
                    await self._sleep(pause_s)
                    continue
                raise failed.error from None
            if request.on_throttle and answer.status in self.policy.throttle_statuses:
                pause = retry_after(answer.headers.get("Retry-After"))
                if pause is not None and self._may_retry(tally, deadline, pause):
                    answer.release()
                    tally.retries.append("throttle")
                    await self._sleep(pause)
                    continue
            return answer

    def _may_retry(self, tally: Tally, deadline: float, pause_s: float) -> bool:
        # Leave the next attempt some time of its own, not just the pause.
        return (
            tally.attempts < self.policy.max_attempts
            and self._clock() + pause_s + self.policy.margin_s < deadline
        )


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
