"""Circuit breakers per provider, with their state in Redis so that every worker agrees.

closed     calls go through; technical failures are counted in a window
open       after ``failure_threshold`` failures within ``window_s``: calls are refused at once
           with ``provider_unavailable`` and Retry-After, for ``cooldown_s``
half-open  after the cool-down, one probe call goes through; its success closes the breaker,
           its failure opens it again

Only technical failures count (unavailable, upstream errors, timeouts), never a declined card.
A worker trusts its last look at a closed breaker for ``cache_s``, so the steady state costs
no Redis round trip; the open state reaches every worker within that time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from app.errors import ProviderUnavailable, ProviderUpstreamError

if TYPE_CHECKING:
    from redis.asyncio import Redis

T = TypeVar("T")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int = 5
    window_s: float = 30.0
    cooldown_s: float = 15.0
    probe_timeout_s: float = 30.0
    cache_s: float = 0.5


# KEYS: breaker hash. ARGV: now ms, cool-down ms, probe timeout ms.
# Returns {verdict, wait ms, state}: allow, probe (this call is the half-open probe) or deny.
_BEFORE_CALL = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then return {'allow', 0, state} end
local now = tonumber(ARGV[1])
local reopen = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0') + tonumber(ARGV[2])
if now < reopen then return {'deny', reopen - now, state} end
local probe_until = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if now < probe_until then return {'deny', probe_until - now, 'half_open'} end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_until', now + tonumber(ARGV[3]))
return {'probe', 0, 'half_open'}
"""

# KEYS: breaker hash. ARGV: now ms, window ms, threshold. Returns the new state.
_FAILURE = """
local now = tonumber(ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state ~= 'closed' then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'failures', 0)
  redis.call('HDEL', KEYS[1], 'probe_until')
  return 'open'
end
local started = tonumber(redis.call('HGET', KEYS[1], 'window_start') or '0')
local failures
if now - started > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'window_start', now, 'failures', 1)
  failures = 1
else
  failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
end
if failures >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now)
  return 'open'
end
return 'closed'
"""

# KEYS: breaker hash.
_SUCCESS = """
if (redis.call('HGET', KEYS[1], 'state') or 'closed') ~= 'closed' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0)
  redis.call('HDEL', KEYS[1], 'probe_until', 'opened_at')
end
return 'closed'
"""


def counts_as_failure(error: BaseException) -> bool:
    return isinstance(error, ProviderUnavailable | ProviderUpstreamError | TimeoutError)


class CircuitBreaker:
    def __init__(self, redis: Redis, *, key: str, provider: str, policy: BreakerPolicy) -> None:
        self._redis = redis
        self._key = key
        self.provider = provider
        self.policy = policy
        self._before = redis.register_script(_BEFORE_CALL)
        self._failure = redis.register_script(_FAILURE)
        self._success = redis.register_script(_SUCCESS)
        self._closed_until = 0.0  # monotonic time until which a closed look is trusted

    async def state(self) -> BreakerState:
        """The shared state, as of now (for health reports)."""
        raw = await self._redis.hget(self._key, "state")
        state = BreakerState(str(raw)) if raw else BreakerState.CLOSED
        if state is BreakerState.OPEN:
            opened = float(await self._redis.hget(self._key, "opened_at") or 0)
            if _now_ms() >= opened + self.policy.cooldown_s * 1000:
                return BreakerState.HALF_OPEN  # the next call will probe
        return state

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` if the breaker lets it, and record how it went."""
        probing = False
        if time.monotonic() >= self._closed_until:
            verdict, wait_ms, _ = await self._before(
                keys=[self._key],
                args=[
                    _now_ms(),
                    int(self.policy.cooldown_s * 1000),
                    int(self.policy.probe_timeout_s * 1000),
                ],
            )
            if verdict == "deny":
                raise ProviderUnavailable(
                    f"{self.provider} is failing; its circuit is open",
                    provider=self.provider,
                    retry_after=max(1, int(wait_ms) // 1000 + 1),
                    outcome_unknown=False,
                )
            probing = verdict == "probe"
            if not probing:
                self._closed_until = time.monotonic() + self.policy.cache_s
        try:
            result = await operation()
        except BaseException as error:
            if counts_as_failure(error):
                state = await self._failure(
                    keys=[self._key],
                    args=[
                        _now_ms(),
                        int(self.policy.window_s * 1000),
                        self.policy.failure_threshold,
                    ],
                )
                if state == "open":
                    self._closed_until = 0.0
            raise
        if probing:
            await self._success(keys=[self._key])
            self._closed_until = time.monotonic() + self.policy.cache_s
        return result


def _now_ms() -> int:
    return int(time.time() * 1000)
