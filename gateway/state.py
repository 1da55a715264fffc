"""What the processes of one gateway share, chosen once when a process starts.

The state is the replay memory of internal HMAC signatures (gateway/replay.py)
and the rate-limit buckets (gateway/limits.py), kept by one of three stores:

    state.backend  process                      store
    memory         a lone process (serve, demo) ``MemoryState``: its own memory
    memory         a worker of serve --workers  ``StateFile``: the SQLite file its
                                                supervisor made for all workers
    redis          any                          ``RedisState``: one Redis for every replica

``build`` is the one place that decides. The process's start-up code
(gateway/service.py) calls it once and hands the ``State`` to the ``Gateway``;
a reload keeps it (a changed ``state:`` needs a restart, and says so).

The server asks it twice per request, between the pure steps of the walk:

    identity → ``remember`` (HMAC callers only) → route ... body, rules, limits
             → ``consume`` (when limits apply) → sign, forward

``remember`` answers before the route step, so a replayed header is 401 on
any path. When the store fails or takes longer than ``state.timeout_s``:
an HMAC caller gets 503 ``StateUnavailable`` (a replay must never pass), a
rate limit follows ``state.on_error`` (open: allowed; closed: 503); each
failure counts in ``gateway_state_errors_total{op}``, and the first failure
and the recovery after it are logged. Nobody waits longer than the timeout,
and the next request simply tries again: recovery needs nothing.

``Shared`` is what a supervisor sets up for its workers (``prepare_shared``) and
names on each worker's command line: the state file, and the folder where the
workers' metrics are summed (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from gateway import limits, logs, replay, walk
from gateway.config import Settings
from gateway.errors import StateUnavailable, Unauthorized
from gateway.limits import Charge, Verdict
from gateway.metrics import Metrics
from gateway.replay import ReplayMemory
from gateway.statefile import StateError, StateFile

T = TypeVar("T")
_PURGE_BUCKETS_AT = 4096  # a lone process forgets full buckets once it holds this many


@dataclass(frozen=True, slots=True)
class Shared:
    """What the supervisor of ``serve --workers N`` set up for all its workers."""

    state_file: str  # the SQLite file of the replay memory and limits every worker uses
    metrics_dir: str  # where each worker writes its metrics, summed on /metrics


class Store(Protocol):
    async def remember(
        self, api_key: str, salt: str, signed_at: float, now: float, limit: int
    ) -> str | None:
        """Record a signature; why it must be refused, or None. StateError if it cannot tell."""
        ...

    async def consume(self, charges: list[Charge]) -> Verdict:
        """Every charge's bucket, all consumed or none. StateError if it cannot tell."""
        ...

    async def close(self) -> None: ...


class MemoryState:
    """A lone process's state, kept in its own memory: it never fails."""

    def __init__(self) -> None:
        self.replay = ReplayMemory()
        self.buckets: dict[str, float] = {}

    async def remember(
        self, api_key: str, salt: str, signed_at: float, now: float, limit: int
    ) -> str | None:
        return self.replay.remember(api_key, salt, signed_at, now, limit)

    async def consume(self, charges: list[Charge]) -> Verdict:
        now = time.monotonic()
        buckets = self.buckets
        verdict = limits.decide(charges, [buckets.get(c.bucket) for c in charges], now)
        if verdict.allowed:
            for charge, tat in zip(charges, verdict.tats, strict=True):
                buckets[charge.bucket] = tat
            if len(buckets) > _PURGE_BUCKETS_AT:  # a full bucket is the same as none
                for bucket in [b for b, tat in buckets.items() if tat < now]:
                    del buckets[bucket]
        return verdict

    async def close(self) -> None:
        self.replay.close()
        self.buckets.clear()


class State:
    """The state a serving process uses; closed once, after its last request."""

    def __init__(self, store: Store, timeout_s: float, *, bounded: bool = True) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.bounded = bounded  # False for a store in this process's memory: nothing to wait for
        self.failing = False

    @classmethod
    def in_memory(cls) -> State:
        return cls(MemoryState(), 1.0, bounded=False)

    async def remember(self, d: walk.Decision, settings: Settings, metrics: Metrics) -> None:
        """For an HMAC caller, after the identity step: a reused salt, a key over its
        share, or no answer from the store turns that step into a refusal."""
        caller = d.caller
        if caller is None or caller.signed is None:
            return
        signed, now = caller.signed, time.time()
        share = replay.share(settings.state.replay_salts, len(settings.policy.by_hmac_key))
        call = self.store.remember(signed.api_key, signed.salt, signed.timestamp, now, share)
        try:
            refusal = await self._ask("replay", call, metrics)
        except StateError as exc:
            message = "The gateway's shared state is unavailable; retry."
            walk.refuse_identity(d, StateUnavailable(message, reason=str(exc)))
        if refusal is not None:
            what = "reused (DuplicatedSignature)" if refusal == replay.REUSED else "refused"
            reason = f"hmac {what}: {refusal}, apiKey {signed.api_key}"
            walk.refuse_identity(d, Unauthorized(reason))

    async def consume(self, d: walk.Decision, settings: Settings, metrics: Metrics) -> None:
        """The limits the walk found, all consumed or none; RateLimited if one refuses."""
        if not d.charges:
            return
        try:
            verdict = await self._ask("limits", self.store.consume(d.charges), metrics)
        except StateError as exc:
            if settings.state.on_error == "closed":
                message = "The gateway cannot check its rate limits now; retry."
                raise StateUnavailable(message, reason=str(exc)) from None
            return  # open: allowed, and counted in gateway_state_errors_total
        if not verdict.allowed:
            raise limits.refusal(d.charges[verdict.refused], verdict.retry_after_s)

    async def _ask(self, op: str, call: Awaitable[T], metrics: Metrics) -> T:
        try:
            if self.bounded:
                async with asyncio.timeout(self.timeout_s):
                    answer = await call
            else:
                answer = await call
        except (StateError, TimeoutError) as exc:
            late = f"no answer within {self.timeout_s:g} s"
            why = str(exc) if isinstance(exc, StateError) else late
            metrics.state_error(op)
            if not self.failing:
                self.failing = True
                logs.emit("state_unavailable", op=op, error=why)
            raise StateError(why) from None
        if self.failing:
            self.failing = False
            logs.emit("state_recovered", op=op)
        return answer

    async def close(self) -> None:
        await self.store.close()


def build(settings: Settings, shared: Shared | None = None) -> State:
    """The state of a serving process: by ``state.backend``, its own (``shared``
    None) or a worker's share."""
    config = settings.state
    if config.backend == "redis":
        from gateway.stateredis import RedisState  # only a process that uses Redis loads it

        assert config.url is not None  # the config says so
        return State(RedisState(config.url, config.key_prefix, config.timeout_s), config.timeout_s)
    if shared is None:
        return State.in_memory()
    return State(StateFile(shared.state_file, config.timeout_s), config.timeout_s)


@contextlib.contextmanager
def prepare_shared(metrics_dir: str | None = None) -> Iterator[Shared]:
    """Folders for one run of a supervisor's workers, removed when it ends.

    ``metrics_dir`` is a folder the operator chose for the metrics files; it is
    kept, but the files of an earlier run are removed (they would be summed in).
    """
    with contextlib.ExitStack() as stack:
        if metrics_dir:
            os.makedirs(metrics_dir, exist_ok=True)
            for name in os.listdir(metrics_dir):
                if name.endswith(".db"):
                    os.unlink(os.path.join(metrics_dir, name))
        else:
            metrics_dir = stack.enter_context(_folder("solapi-gateway-metrics-"))
        state_dir = stack.enter_context(_folder("solapi-gateway-state-"))
        yield Shared(os.path.join(state_dir, "state.sqlite3"), metrics_dir)


@contextlib.contextmanager
def _folder(prefix: str) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
