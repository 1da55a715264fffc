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
"""

from __future__ import annotations

from typing import Any, Final

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway import replay
from gateway.config import StateURL
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
        self._remember = self.client.register_script(_REMEMBER)
        self._consume = self.client.register_script(_CONSUME)

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

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StateError(self._scrub(f"redis: {type(exc).__name__}: {exc}")) from None

    def _scrub(self, text: str) -> str:
        """An error's text without the URL's password, whatever the client put in it."""
        secret = self.url.reveal()
        if secret and secret in text:
            text = text.replace(secret, self.url.shown)
        password = _password(secret)
        return text.replace(password, "****") if password else text

    async def close(self) -> None:
        await self.client.aclose()


def _password(url: str) -> str | None:
    userinfo = url.partition("://")[2].partition("@")
    if not userinfo[1]:
        return None
    password = userinfo[0].partition(":")[2]
    return password or None
