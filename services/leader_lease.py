"""A leader lease: one Redis key that at most one worker holds at a time, across processes and
hosts, for work that one worker does for all of them.

The holder is whoever set the key with its own random token: taken with ``SET key token NX
PX lease``, renewed by its holder with a compare-and-set (the expiry is pushed back only if the
key still holds its token), let go on shutdown with a compare-and-delete. A holder that dies
renews nothing: the key expires after the lease, and the next worker to look takes it. A
holder that stalls longer than the lease may find it taken: ``hold`` then answers False, and
it stops leading. Both scripts are one key each, so they run on a Redis Cluster too.
"""

from __future__ import annotations

import secrets

from services.payment_store import RedisClient, store_errors

# KEYS: the lease. ARGV: our token, the lease in ms. Push the expiry back only if it is ours.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: the lease. ARGV: our token. Let go only if it is still ours.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLease:
    def __init__(self, redis: RedisClient, key: str, *, lease_s: float) -> None:
        self._redis = redis
        self.key = key
        self.token = secrets.token_hex(8)
        self._lease_ms = max(1, int(lease_s * 1000))
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self.held = False  # as of the last ``hold``

    async def hold(self) -> bool:
        """Renew the lease if it is ours, else take it if no one holds it. True while this
        worker leads. Raises ``StoreUnavailable`` when Redis does not answer."""
        async with store_errors():
            if self.held and await self._renew(keys=[self.key], args=[self.token, self._lease_ms]):
                return True
            taken = await self._redis.set(self.key, self.token, nx=True, px=self._lease_ms)
        self.held = bool(taken)
        return self.held

    async def release(self) -> None:
        """Let go (on shutdown), so that another worker takes over at once rather than after
        the lease. Raises ``StoreUnavailable`` when Redis does not answer: the lease then
        lapses by itself."""
        self.held = False
        async with store_errors():
            await self._release(keys=[self.key], args=[self.token])
