"""The ``redis`` state: the replay memory and the rate-limit buckets of every replica.

Each check is one Lua script run with ``EVALSHA``: one round trip, atomic in
Redis, and timed by Redis's own clock (``TIME``), never a replica's.

    <prefix>r:{<key>}:<salt>     a remembered salt, expiring with its signature
    <prefix>rc:{<key>}           a hash: partition → salts of that key in it
    <prefix>l:<limit>:<digest>|<principal or *>    a bucket's arrival time (GCRA)

``<digest>`` is the limit's definition (gateway/limits.py): edit a limit and
its buckets start afresh, leave it alone and a reload keeps counting. The
``{<key>}`` hash tags keep one key's salts and counts in one slot.

The client is redis-py's ``redis.asyncio`` (with hiredis), its own retries
off: the caller bounds every call with ``state.timeout_s`` and a failed call
is answered at once (gateway/state.py); the next call connects again.

Calls made in the same turn of the event loop go out together, as one
pipeline (one write, one connection; still one script and one round trip per
request): under load a replica sends its checks in batches, which costs it
and Redis a fraction of one command at a time, and a lone request goes out
at once, as it would anyway.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from gateway import replay
from gateway.addresses import StateURL
from gateway.limits import Charge, Verdict
from gateway.signing import WINDOW_S
from gateway.statefile import StateError

# Returns 0 (new, recorded), 1 (reused) or 2 (the key's share is full).
_REMEMBER: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
local first = math.floor((now - tonumber(ARGV[5])) / tonumber(ARGV[4]))
local fields = redis.call('HGETALL', KEYS[2])
local total = 0
for i = 1, #fields, 2 do
  if tonumber(fields[i]) < first then
    redis.call('HDEL', KEYS[2], fields[i])
  else
    total = total + tonumber(fields[i + 1])
  end
end
if total >= tonumber(ARGV[3]) then return 2 end
local ttl = math.ceil((tonumber(ARGV[2]) - now) * 1000)
if ttl < 1000 then ttl = 1000 end
redis.call('SET', KEYS[1], '1', 'PX', ttl)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 0
"""

# Every bucket must fit, then every one is consumed (gateway/limits.py decide()).
# Returns {0} or {index of the refusing bucket (from 1), seconds to wait}.
_CONSUME: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tats, worst, wait = {}, 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 2])
  local tolerance = tonumber(ARGV[3 * i - 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tat = tat + tonumber(ARGV[3 * i]) * interval
  local late = tat - tolerance - now
  if late > 1e-9 and late > wait then worst, wait = i, late end
  tats[i] = tat
end
if worst > 0 then return {worst, string.format('%.6f', wait)} end
for i = 1, #KEYS do
  local ttl = math.ceil((tats[i] - now) * 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.6f', tats[i]), 'PX', ttl)
end
return {0}
"""

_HORIZON_MS: Final = int((2 * WINDOW_S + replay.MARGIN_S + replay.PARTITION_S) * 1000)
_REFUSALS: Final = {1: replay.REUSED, 2: replay.FULL}


class RedisState:
    """The state of a replica whose ``state.backend`` is redis."""

    def __init__(self, url: StateURL, prefix: str, timeout_s: float) -> None:
        self.url, self.prefix = url, prefix
        self.client = redis.Redis.from_url(
            url.reveal(),
            socket_connect_timeout=timeout_s,
            # The caller's asyncio.timeout bounds each whole call (a cancelled read
            # drops its connection): a socket timeout too would wrap every read in
            # a task of its own for nothing.
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),
        )
        self.timeout_s = timeout_s
        self._remember = self.client.register_script(_REMEMBER)
        self._consume = self.client.register_script(_CONSUME)
        self._pending: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def remember(
        self, api_key: str, salt: str, signed_at: float, now: float, limit: int
    ) -> str | None:
        keys = [f"{self.prefix}r:{{{api_key}}}:{salt}", f"{self.prefix}rc:{{{api_key}}}"]
        expires = signed_at + WINDOW_S + replay.MARGIN_S
        args = [replay.partition(signed_at), f"{expires:.3f}", limit, replay.PARTITION_S,
                WINDOW_S + replay.MARGIN_S, _HORIZON_MS]  # fmt: skip
        answer = await self._run(self._remember, keys, args)
        return _REFUSALS.get(int(answer))

    async def consume(self, charges: list[Charge]) -> Verdict:
        keys = [f"{self.prefix}l:{c.bucket}" for c in charges]
        args: list[Any] = []
        for c in charges:
            args += [repr(c.limit.interval_s), repr(c.limit.tolerance_s), c.cost]
        answer = await self._run(self._consume, keys, args)
        refused = int(answer[0])
        if refused == 0:
            return Verdict(True, [])
        return Verdict(False, [], refused - 1, float(answer[1]))

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future())
        self._pending.append(call)
        if len(self._pending) == 1:  # the first of this turn: send them all at its end
            loop.call_soon(self._flush)
        return await call.answer  # the caller's timeout may cancel this wait, not the batch

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)  # held until done, so it is not collected half-way
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                results = await self._pipeline(batch)
                pairs = zip(batch, results, strict=True)
                missing = [c for c, r in pairs if isinstance(r, NoScriptError)]
                if missing:  # a restarted (or flushed) Redis: load the scripts, send those again
                    for script in {id(c.script): c.script for c in missing}.values():
                        await self.client.script_load(script.script)
                    again = await self._pipeline(missing)
                    found = dict(zip(map(id, missing), again, strict=True))
                    results = [found.get(id(c), r) for c, r in zip(batch, results, strict=True)]
        except (RedisError, OSError, TimeoutError) as exc:
            error = StateError(self._scrub(f"redis: {type(exc).__name__}: {exc}"))
            results = [error] * len(batch)
        for call, result in zip(batch, results, strict=True):
            if call.answer.done():  # its caller gave up waiting
                continue
            if isinstance(result, StateError):
                call.answer.set_exception(result)
            elif isinstance(result, Exception):
                why = self._scrub(f"redis: {type(result).__name__}: {result}")
                call.answer.set_exception(StateError(why))
            else:
                call.answer.set_result(result)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for call in batch:
            assert call.script.sha, "registered scripts know their digest"
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _scrub(self, text: str) -> str:
        """An error's text without the URL's password, whatever the client put in it."""
        secret = self.url.reveal()
        if secret and secret in text:
            text = text.replace(secret, self.url.shown)
        password = _password(secret)
        return text.replace(password, "****") if password else text

    async def close(self) -> None:
        await self.client.aclose()


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: list[str]
    args: list[Any]
    answer: asyncio.Future[Any]


def _password(url: str) -> str | None:
    userinfo = url.partition("://")[2].partition("@")
    if not userinfo[1]:
        return None
    password = userinfo[0].partition(":")[2]
    return password or None
