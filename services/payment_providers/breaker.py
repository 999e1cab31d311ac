"""Circuit breakers per provider, with their state in Redis so that every worker agrees.

closed     calls go through; how many were made and how many failed is counted in a window
open       once, within ``window_s``, at least ``min_calls`` calls were made and at least
           ``failure_ratio`` of them failed: calls are refused at once with
           ``provider_unavailable`` and Retry-After, for ``cooldown_s``
half-open  after the cool-down, one call goes through as the probe, and it always resolves:
           any answer from the provider closes the breaker (a result, or a service error that
           is not a technical failure: a declined card, a payment in the wrong state, a 4xx);
           a technical failure opens it again; a probe that ends without an answer (cancelled,
           or a bug of ours) frees its slot, so the next call probes at once. Only a probe
           that never ends (its worker died mid-call) holds the slot, for ``probe_timeout_s``.

Only technical failures count as failures (unavailable, upstream errors, timeouts); every
call that got an answer counts as a call, a declined card included.

Counting calls without a Redis round trip per call. A worker trusts its last look at a
closed breaker for ``cache_s``; the calls it makes meanwhile are tallied in the process and
sent with its next look (so at most once per ``cache_s`` per worker, the round trip the
steady state already made), or at once with a technical failure, so that a failure reaches
Redis, and can open the breaker, without delay. In Redis the window is a hash of ``BUCKETS``
buckets (fields ``c<n>`` and ``f<n>``: calls and failures in the n-th slice of
``window_s / BUCKETS`` since the epoch) next to the breaker's own hash, under the same hash
tag; the script that adds to it also drops the buckets that left the window and decides.
The window thus slides in tenths of itself, and a worker's counts reach it at most
``cache_s`` late: a busy provider that fails now and then stays far below the ratio, and one
failing most calls opens as soon as ``min_calls`` calls are in the window. A tally older
than the window (its worker went quiet) is dropped, not sent late. Opening or closing the
breaker empties the window: what happened before an outage says nothing about after it.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from services.errors import ProviderUnavailable, ProviderUpstreamError, ServiceError

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from services.payment_store import RedisClient

T = TypeVar("T")
log = logging.getLogger("payments.providers")

# Slices of the window: it slides in steps of a tenth of itself.
BUCKETS = 10


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    min_calls: int = 20
    failure_ratio: float = 0.5
    window_s: float = 30.0
    cooldown_s: float = 15.0
    probe_timeout_s: float = 30.0
    cache_s: float = 0.5

    def __post_init__(self) -> None:
        if self.min_calls < 1:
            raise ValueError("min_calls must be at least 1")
        if not 0 < self.failure_ratio <= 1:
            raise ValueError("failure_ratio must be in (0, 1]")


# Every script: KEYS: breaker hash, window hash (same hash tag). The scripts that add to the
# window start with ARGV: now ms, bucket ms, buckets, min calls, failure ratio, calls, failures.
_WINDOW = """
local function window_trips()
  local now, bucket_ms, buckets = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
  local calls, failures = tonumber(ARGV[6]), tonumber(ARGV[7])
  local current = math.floor(now / bucket_ms)
  if calls > 0 then
    redis.call('HINCRBY', KEYS[2], 'c' .. current, calls)
    if failures > 0 then redis.call('HINCRBY', KEYS[2], 'f' .. current, failures) end
    redis.call('PEXPIRE', KEYS[2], bucket_ms * (buckets + 1))
  end
  local fields = redis.call('HGETALL', KEYS[2])
  local total, failed, gone = 0, 0, {}
  for i = 1, #fields, 2 do
    local name = fields[i]
    if tonumber(string.sub(name, 2)) <= current - buckets then
      gone[#gone + 1] = name
    elseif string.sub(name, 1, 1) == 'c' then
      total = total + tonumber(fields[i + 1])
    else
      failed = failed + tonumber(fields[i + 1])
    end
  end
  if #gone > 0 then redis.call('HDEL', KEYS[2], unpack(gone)) end
  return total >= tonumber(ARGV[4]) and failed / total >= tonumber(ARGV[5])
end

local function open(now)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now)
  redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
  redis.call('DEL', KEYS[2])
end
"""

# ARGV 8-10: a token for the probe, cool-down ms, probe timeout ms.
# Returns {verdict, wait ms, state}: allow, probe (this call is the half-open probe) or deny;
# the state is 'opened' when this worker's tally opened it.
_BEFORE_CALL = (
    _WINDOW
    + """
local now = tonumber(ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then
  if not window_trips() then return {'allow', 0, state} end
  open(now)
  return {'deny', tonumber(ARGV[9]), 'opened'}
end
local reopen = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0') + tonumber(ARGV[9])
if now < reopen then return {'deny', reopen - now, state} end
local probe_until = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if now < probe_until then return {'deny', probe_until - now, 'half_open'} end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe', ARGV[8],
  'probe_until', now + tonumber(ARGV[10]))
return {'probe', 0, 'half_open'}
"""
)

# A technical failure. ARGV 8: the probe's token, or '' for a call through a closed breaker.
# Returns the state, or 'opened' when this failure opened it. A failure of a call that began
# before another worker opened the breaker changes nothing: only the probe decides then.
_FAILURE = (
    _WINDOW
    + """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then
  if not window_trips() then return state end
elseif state ~= 'half_open' or ARGV[8] == '' or redis.call('HGET', KEYS[1], 'probe') ~= ARGV[8]
then
  return state
end
open(tonumber(ARGV[1]))
return 'opened'
"""
)

# The probe got an answer. ARGV: its token. Returns the state.
_PROBE_ANSWERED = """
if redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', 'closed')
  redis.call('HDEL', KEYS[1], 'opened_at', 'probe', 'probe_until')
  redis.call('DEL', KEYS[2])
end
return redis.call('HGET', KEYS[1], 'state') or 'closed'
"""

# The probe ended without an answer: free its slot, if it still holds it. ARGV: its token.
_PROBE_ABANDONED = """
if redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
end
return redis.call('HGET', KEYS[1], 'state') or 'closed'
"""


def counts_as_failure(error: BaseException) -> bool:
    return isinstance(error, ProviderUnavailable | ProviderUpstreamError | TimeoutError)


@dataclass(slots=True)
class _Tally:
    """Calls (and failures among them) this worker made but has not told Redis about yet."""

    calls: int = 0
    failures: int = 0
    since: float = 0.0  # monotonic time of the oldest call in it

    def add(self, *, failed: bool) -> None:
        if not self.calls:
            self.since = time.monotonic()
        self.calls += 1
        self.failures += failed

    def take(self, window_s: float) -> tuple[int, int]:
        """Empty the tally; what it held, or nothing if that has left the window by now."""
        taken = (self.calls, self.failures)
        fresh = time.monotonic() - self.since <= window_s
        self.calls = self.failures = 0
        return taken if fresh else (0, 0)

    def put_back(self, calls: int, failures: int) -> None:
        if calls and not self.calls:
            self.since = time.monotonic()
        self.calls += calls
        self.failures += failures


class CircuitBreaker:
    def __init__(
        self, redis: RedisClient, *, key: str, provider: str, policy: BreakerPolicy
    ) -> None:
        self._redis = redis
        self._key = key
        # The window sits beside the state under the same hash tag ({provider}): one slot.
        self._keys = [key, f"{key}:window"]
        self.provider = provider
        self.policy = policy
        self._before = redis.register_script(_BEFORE_CALL)
        self._failure = redis.register_script(_FAILURE)
        self._answered = redis.register_script(_PROBE_ANSWERED)
        self._abandoned = redis.register_script(_PROBE_ABANDONED)
        self._closed_until = 0.0  # monotonic time until which a closed look is trusted
        self._tally = _Tally()

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
        probe = await self._admit()
        try:
            result = await operation()
        except BaseException as error:
            if counts_as_failure(error):
                await self._failed(probe)
            elif isinstance(error, ServiceError):
                await self._answered_by_provider(probe)  # if only to say no
            elif probe is not None:
                # Cancelled, or a bug of ours: no word from the provider either way.
                await self._record(self._abandoned, [probe])
            raise
        await self._answered_by_provider(probe)
        return result

    async def _admit(self) -> str | None:
        """Let the call go or refuse it; the probe's token when the call is the probe.

        Asks Redis, sending the tally, only once the last look at a closed breaker is older
        than ``cache_s``."""
        if time.monotonic() < self._closed_until:
            return None
        calls, failures = self._tally.take(self.policy.window_s)
        token = secrets.token_hex(8)
        args = [
            *self._window_args(calls, failures),
            token,
            int(self.policy.cooldown_s * 1000),
            int(self.policy.probe_timeout_s * 1000),
        ]
        try:
            verdict, wait_ms, state = await self._before(keys=self._keys, args=args)
        except BaseException:
            self._tally.put_back(calls, failures)
            raise
        if verdict == "allow":
            self._closed_until = time.monotonic() + self.policy.cache_s
            return None
        if verdict == "probe":
            return token
        if state == "opened":
            self._log_opened()
        raise ProviderUnavailable(
            f"{self.provider} is failing; its circuit is open",
            provider=self.provider,
            retry_after=max(1, int(wait_ms) // 1000 + 1),
            outcome_unknown=False,
        )

    async def _answered_by_provider(self, probe: str | None) -> None:
        if probe is None:
            self._tally.add(failed=False)  # sent with the next look: no round trip now
            return
        if await self._record(self._answered, [probe]) == BreakerState.CLOSED:
            log.info("breaker.closed", extra={"provider": self.provider})
            self._closed_until = time.monotonic() + self.policy.cache_s

    async def _failed(self, probe: str | None) -> None:
        calls, failures = self._tally.take(self.policy.window_s)
        calls, failures = calls + 1, failures + 1  # and this one
        state = await self._record(
            self._failure, [*self._window_args(calls, failures), probe or ""]
        )
        if state is None:
            self._tally.put_back(calls, failures)
        elif state != BreakerState.CLOSED:
            self._closed_until = 0.0  # look again before the next call
            if state == "opened":
                self._log_opened()

    async def _record(self, script: AsyncScript, args: list[str | int | float]) -> str | None:
        """Run one of the scripts that record how a call ended; the state it leaves.

        The call's own outcome matters more than the breaker's bookkeeping: with Redis away,
        the result (or the provider's error) still reaches the caller, and None comes back."""
        try:
            return str(await script(keys=self._keys, args=args))
        except (RedisError, RedisClusterException, OSError) as error:
            log.warning(
                "breaker.record_failed",
                extra={"provider": self.provider, "error": type(error).__name__},
            )
            return None

    def _window_args(self, calls: int, failures: int) -> list[str | int | float]:
        policy = self.policy
        bucket_ms = max(1, int(policy.window_s * 1000 / BUCKETS))
        return [
            _now_ms(),
            bucket_ms,
            BUCKETS,
            policy.min_calls,
            policy.failure_ratio,
            calls,
            failures,
        ]

    def _log_opened(self) -> None:
        log.warning(
            "breaker.opened",
            extra={
                "provider": self.provider,
                "cooldown_s": self.policy.cooldown_s,
                "min_calls": self.policy.min_calls,
                "failure_ratio": self.policy.failure_ratio,
            },
        )


def _now_ms() -> int:
    return int(time.time() * 1000)
