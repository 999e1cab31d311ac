"""Payment state in Redis, standalone or Cluster, through redis-py's public API.

Every state change is one Lua script, so a transition, its history entry and the webhook event
that caused it are applied together or not at all. Keys carry a configurable prefix and a hash
tag, so that the keys of every script and every MULTI live in one Redis Cluster slot: a
payment's keys share ``pay:{id}``, a mapping's two hashes ``map:{provider:entity}``, the
reconciliation queue, its steps, stats and leader lock ``{recon}``. Commands that span slots
(create's batch) go in a pipeline without MULTI, which the cluster client splits by node.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeAlias, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from models.payment import (
    HistoryEntry,
    PaymentRecord,
    PaymentStatus,
    RefundHistoryEntry,
    RefundRecord,
    RefundStatus,
)
from services.errors import StoreUnavailable
from services.events.outbox import OUTBOX_LUA, OutboxKeys, new_event_id
from services.metrics import REDIS_ERRORS

S = PaymentStatus

# The service's one Redis client: redis-py's standalone client, or its cluster client with
# REDIS_CLUSTER. Both speak the same commands, scripts and pipelines.
RedisClient: TypeAlias = Redis | RedisCluster


def redis_client(
    url: str, *, cluster: bool, timeout_s: float, max_connections: int = 200
) -> RedisClient:
    """The client for ``url``; with ``cluster``, for the Redis Cluster that ``url`` names any
    node of (the client learns the others and their slots from it).

    It connects lazily and reconnects by itself: the service starts, and answers 503, while
    Redis is down, and recovers when it is back."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 30,
    }
    if cluster:
        return RedisCluster.from_url(url, **options)
    # A pool that waits for a free connection (up to the timeout) rather than failing at once:
    # redis-py's default pool holds 100 connections and raises "Too many connections" at the
    # 101st concurrent command, which a busy worker reaches (seen in the receipts bench).
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s, **options
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


class RedisKeyValue:
    """ProviderKeyValue on the service's Redis: one provider's namespace (``namespace``), every
    key hash-tagged so that each script stays in one Cluster slot."""

    def __init__(self, redis: RedisClient, namespace: str) -> None:
        self._redis = redis
        self._namespace = namespace

    @property
    def namespace(self) -> str:
        return self._namespace

    def key(self, tag: str) -> str:
        return f"{self._namespace}{{{tag}}}"

    def script(self, lua: str) -> Callable[..., Awaitable[Any]]:
        script: Callable[..., Awaitable[Any]] = self._redis.register_script(lua)
        return script

    async def read_hash(self, key: str) -> dict[str, str]:
        return cast(dict[str, str], await self._redis.hgetall(key))

    async def read_hash_field(self, key: str, field: str) -> str | None:
        value = await self._redis.hget(key, field)
        return None if value is None else str(value)

    async def read_hash_fields(self, key: str, fields: list[str]) -> list[str | None]:
        return cast(list[str | None], await self._redis.hmget(key, fields))

    async def read_list(self, key: str) -> list[str]:
        return cast(list[str], await self._redis.lrange(key, 0, -1))

    async def remove_from_list(self, key: str, value: str) -> int:
        return int(await self._redis.lrem(key, 1, value))

    async def append_capped(self, key: str, value: str, *, keep: int, ttl_s: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, value)
            pipe.ltrim(key, -keep, -1)
            pipe.expire(key, ttl_s)
            await pipe.execute()

    async def ping(self) -> None:
        await self._redis.ping()


def key_values(redis: RedisClient, prefix: str) -> Callable[[str], RedisKeyValue]:
    """Each provider's namespace under the service's key prefix: ``<prefix><provider>:``."""
    return lambda provider: RedisKeyValue(redis, f"{prefix}{provider}:")


# The only moves a payment can make. Paid states never go back to unpaid ones; a failed,
# canceled or expired payment may still turn out paid when the provider says money moved.
TRANSITIONS: Mapping[PaymentStatus, frozenset[PaymentStatus]] = {
    S.CREATED: frozenset(
        {S.PENDING, S.PROCESSING, S.REQUIRES_CAPTURE, S.SUCCEEDED, S.FAILED, S.CANCELED, S.EXPIRED}
    ),
    S.PENDING: frozenset(
        {S.PROCESSING, S.REQUIRES_CAPTURE, S.SUCCEEDED, S.FAILED, S.CANCELED, S.EXPIRED}
    ),
    S.PROCESSING: frozenset({S.PENDING, S.REQUIRES_CAPTURE, S.SUCCEEDED, S.FAILED, S.CANCELED}),
    S.REQUIRES_CAPTURE: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELED, S.EXPIRED}),
    S.FAILED: frozenset({S.SUCCEEDED}),
    S.CANCELED: frozenset({S.SUCCEEDED}),
    S.EXPIRED: frozenset({S.SUCCEEDED}),
    # Refunded states follow the payment's succeeded refunds, set by the refund script only.
    S.SUCCEEDED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.PARTIALLY_REFUNDED: frozenset({S.REFUNDED}),
    S.REFUNDED: frozenset(),
}


REFUND_TRANSITIONS: Mapping[RefundStatus, frozenset[RefundStatus]] = {
    RefundStatus.PENDING: frozenset(
        {RefundStatus.SUCCEEDED, RefundStatus.FAILED, RefundStatus.CANCELED}
    ),
    RefundStatus.SUCCEEDED: frozenset({RefundStatus.FAILED}),
    RefundStatus.FAILED: frozenset(),
    RefundStatus.CANCELED: frozenset(),
}


_State = TypeVar("_State", bound=StrEnum)


def _lua_state_machine(table: Mapping[_State, frozenset[_State]]) -> str:
    """A script's prelude for a transition table: ``outcome_of(from, to)`` answers
    'unchanged', 'applied' (a legal move) or 'rejected', by the same rule for payments and
    refunds."""
    rows = []
    for source, targets in table.items():
        allowed = ", ".join(f'["{target}"]=true' for target in sorted(targets))
        rows.append(f'["{source}"]={{{allowed}}}')
    return (
        "local allowed = {" + ", ".join(rows) + "}\n"
        "local function outcome_of(from, to)\n"
        "  if from == to then return 'unchanged' end\n"
        "  if allowed[from] and allowed[from][to] then return 'applied' end\n"
        "  return 'rejected'\n"
        "end\n"
    )


# KEYS: payment hash, history list, applied-events set, event outbox, outbox index.
# ARGV: new status, history entry JSON, event id ('' for none), now (ISO), the merchant event's
# id, then field/value pairs to record with the change.
_TRANSITION_LUA = (
    _lua_state_machine(TRANSITIONS)
    + OUTBOX_LUA
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {'missing', ''} end
if ARGV[3] ~= '' and redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 1 then
  return {'duplicate', current, redis.call('HGETALL', KEYS[1])}
end
local target = ARGV[1]
local outcome = outcome_of(current, target)
if ARGV[3] ~= '' then redis.call('SADD', KEYS[3], ARGV[3]) end
if outcome == 'rejected' then return {outcome, current, redis.call('HGETALL', KEYS[1])} end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if outcome == 'applied' then
  redis.call('HSET', KEYS[1], 'status', target, 'updated_at', ARGV[4])
  if target == 'succeeded' then redis.call('HSETNX', KEYS[1], 'paid_at', ARGV[4]) end
  local entry = cjson.decode(ARGV[2])
  entry['previous'] = current
  redis.call('RPUSH', KEYS[2], cjson.encode(entry))
  outbox_payment_event(KEYS[1], KEYS[4], KEYS[5], ARGV[5], 'payment.' .. target, ARGV[4])
end
return {outcome, current, redis.call('HGETALL', KEYS[1])}
"""
)

# The two writes of create that must happen in order, each on the keys of one slot; ARGV[1]
# says which.
#   'payment'  KEYS: payment hash, history list. ARGV: payment fields (a JSON object of
#              strings), history entry JSON. 0 when the payment exists already.
#   'answer'   KEYS: idempotency hash. ARGV: the response to replay (JSON), TTL in seconds.
# One script for both so that they share one digest: after Redis has lost its script cache (a
# restart, a failover, SCRIPT FLUSH), both fail with NOSCRIPT in a batch or neither does, and
# the answer, sent after the payment, can never be stored while the payment was refused.
# Fields travel as one JSON argument, not as field/value arguments: each argument is encoded
# in Python, and the thirty-odd of a payment were a tenth of create-intent's CPU.
_CREATE_LUA = """
if ARGV[1] == 'answer' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'response', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local function hset_json(key, encoded)
  local flat = {}
  for field, value in pairs(cjson.decode(encoded)) do
    flat[#flat + 1] = field
    flat[#flat + 1] = value
  end
  redis.call('HSET', key, unpack(flat))
end
hset_json(KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
return 1
"""

# KEYS: ours -> theirs hash, theirs -> ours hash (one slot). ARGV: our ID, their ID.
_MAPPING_LUA = """
-- A new link of the same ID of ours replaces the old: the old reverse entry goes with it.
local previous = redis.call('HGET', KEYS[1], ARGV[1])
if previous and previous ~= ARGV[2] then redis.call('HDEL', KEYS[2], previous) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS: idempotency hash. ARGV: request fingerprint, pending TTL in ms.
_IDEMPOTENCY_BEGIN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'state', 'pending')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'new', ''}
end
local found = redis.call('HMGET', KEYS[1], 'fingerprint', 'state', 'response')
if found[1] ~= ARGV[1] then return {'mismatch', ''} end
if found[2] == 'pending' then return {'pending', ''} end
return {'done', found[3]}
"""

# KEYS: payment hash, refunds hash, the refund's history list.
# ARGV: refund id, amount ('' for all that is left), the refund record (JSON, amount to fill
# in), its first history entry (JSON). Reserves the amount against what may still be refunded:
# succeeded and pending refunds both count, so two refunds in flight never exceed the payment.
_REFUND_BEGIN_LUA = """
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing then return {'exists', existing} end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', ''} end
if status ~= 'succeeded' and status ~= 'partially_refunded' and status ~= 'refunded' then
  return {'unpaid', status}
end
-- What was taken: a partial capture's amount, else the whole amount.
local total = tonumber(redis.call('HGET', KEYS[1], 'amount_captured')
  or redis.call('HGET', KEYS[1], 'amount'))
local refunded = tonumber(redis.call('HGET', KEYS[1], 'amount_refunded') or '0')
local pending = tonumber(redis.call('HGET', KEYS[1], 'amount_pending_refund') or '0')
local left = total - refunded - pending
local amount = left
if ARGV[2] ~= '' then amount = tonumber(ARGV[2]) end
if left <= 0 or amount > left then return {'exceeds', tostring(left)} end
local record = cjson.decode(ARGV[3])
record['amount'] = amount
local encoded = cjson.encode(record)
redis.call('HSET', KEYS[2], ARGV[1], encoded)
redis.call('HINCRBY', KEYS[1], 'amount_pending_refund', amount)
redis.call('RPUSH', KEYS[3], ARGV[4])
return {'created', encoded}
"""

# KEYS: payment hash, refunds hash, provider refund id -> ours hash, the refund's history,
# the payment's history, applied-events set.
# ARGV: refund id, provider refund id ('' if not known), new status, refund history entry
# (JSON), now (ISO), event id ('' for none), failure code ('' for none), payment history entry
# (JSON), a record to adopt when we have none ('' not to: a refund made at the provider
# directly, counted from pending like ours), the merchant events' ids (the refund's, the
# payment's). KEYS 7 and 8: the payment's event outbox and its index (services/events).
# A refund moves pending -> succeeded | failed | canceled, and succeeded -> failed (a vendor
# may fail a refund it had called succeeded). The payment's sums move with it, and its status
# follows its succeeded refunds, forwards only: a failed refund gives the balance back but
# never moves a payment backwards.
_REFUND_APPLY_LUA = (
    _lua_state_machine(REFUND_TRANSITIONS)
    + OUTBOX_LUA
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {'missing', '', ''} end
if ARGV[6] ~= '' and redis.call('SISMEMBER', KEYS[6], ARGV[6]) == 1 then
  return {'duplicate', redis.call('HGET', KEYS[2], ARGV[1]) or '', ''}
end
local raw = redis.call('HGET', KEYS[2], ARGV[1])
local record
if raw then
  record = cjson.decode(raw)
elseif ARGV[9] ~= '' then
  record = cjson.decode(ARGV[9])
  record['status'] = 'pending'
  redis.call('HINCRBY', KEYS[1], 'amount_pending_refund', record['amount'])
  local first = cjson.decode(ARGV[4])
  first['status'] = 'pending'
  redis.call('RPUSH', KEYS[4], cjson.encode(first))
else
  return {'unknown', '', ''}
end
if ARGV[6] ~= '' then redis.call('SADD', KEYS[6], ARGV[6]) end
local changed = raw == nil or raw == false
if ARGV[2] ~= '' and record['provider_refund_id'] ~= ARGV[2] then
  record['provider_refund_id'] = ARGV[2]
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
  changed = true
end
local from = record['status']
local to = ARGV[3]
local outcome = outcome_of(from, to)
if outcome == 'applied' then
  local amount = tonumber(record['amount'])
  if from == 'pending' then redis.call('HINCRBY', KEYS[1], 'amount_pending_refund', -amount) end
  if to == 'succeeded' then redis.call('HINCRBY', KEYS[1], 'amount_refunded', amount) end
  if from == 'succeeded' then redis.call('HINCRBY', KEYS[1], 'amount_refunded', -amount) end
  record['status'] = to
  record['updated_at'] = ARGV[5]
  if ARGV[7] ~= '' then record['failure_code'] = ARGV[7] end
  local entry = cjson.decode(ARGV[4])
  entry['previous'] = from
  redis.call('RPUSH', KEYS[4], cjson.encode(entry))
  changed = true
  local refunded = tonumber(redis.call('HGET', KEYS[1], 'amount_refunded') or '0')
  local total = tonumber(redis.call('HGET', KEYS[1], 'amount_captured')
    or redis.call('HGET', KEYS[1], 'amount'))
  local target = nil
  if refunded >= total then
    target = 'refunded'
  elseif refunded > 0 then
    target = 'partially_refunded'
  end
  local forwards = current == 'succeeded'
    or (current == 'partially_refunded' and target == 'refunded')
  if target and forwards then
    redis.call('HSET', KEYS[1], 'status', target, 'updated_at', ARGV[5])
    local moved = cjson.decode(ARGV[8])
    moved['status'] = target
    moved['previous'] = current
    redis.call('RPUSH', KEYS[5], cjson.encode(moved))
  end
  outbox_refund_event(KEYS[1], KEYS[7], KEYS[8], ARGV[10], record, ARGV[5])
  if target and forwards then
    outbox_payment_event(KEYS[1], KEYS[7], KEYS[8], ARGV[11], 'payment.' .. target, ARGV[5])
  end
end
local encoded = cjson.encode(record)
if changed then redis.call('HSET', KEYS[2], ARGV[1], encoded) end
return {outcome, encoded, from}
"""
)

# KEYS: payment hash, refunds hash, the refund's history. ARGV: refund id.
# Forgets a refund that never reached the provider (or that the provider refused outright):
# it is pending, the provider has no id for it, and its amount is given back to the balance.
_REFUND_DISCARD_LUA = """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return 0 end
local record = cjson.decode(raw)
if record['status'] ~= 'pending' or type(record['provider_refund_id']) == 'string' then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'amount_pending_refund', -tonumber(record['amount']))
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: payment hash. ARGV: the receipt's number (services/receipt_ledger.py allocated it).
# The first number a payment is given stays: the ledger gives a payment one number for ever,
# so a second write (a retried follow-up, another worker) brings the same one, and a different
# one is never taken. A payment that is gone is not brought back as a stub. The number it
# holds, or nil.
_KEEP_RECEIPT_NUMBER_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local held = redis.call('HGET', KEYS[1], 'receipt_number')
if held then return held end
redis.call('HSET', KEYS[1], 'receipt_number', ARGV[1])
return ARGV[1]
"""

# KEYS: the payment's refunds hash. ARGV: refund id, its credit note's number.
# The same for a refund's credit note, kept in the refund's record (null until numbered).
_KEEP_CREDIT_NOTE_NUMBER_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local record = cjson.decode(raw)
if type(record['credit_note_number']) == 'string' then return record['credit_note_number'] end
record['credit_note_number'] = ARGV[2]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(record))
return ARGV[2]
"""

# KEYS: idempotency hash. ARGV: lease in ms. Extends an in-progress claim, and only that.
_IDEMPOTENCY_RENEW_LUA = """
if redis.call('HGET', KEYS[1], 'state') == 'pending' then
  return redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: counter. ARGV: window in ms. Fixed window: the first hit of a window sets its expiry.
_RATE_LIMIT_LUA = """
local hits = redis.call('INCR', KEYS[1])
if hits == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); ttl = tonumber(ARGV[1]) end
return {hits, ttl}
"""

# KEYS: reconciliation queue (zset), steps (hash). ARGV: now, lease seconds, batch size.
# Takes the payments that are due and pushes each one lease ahead, so that a leader that dies
# mid-batch leaves them to be taken again after the lease, not lost.
_RECONCILE_CLAIM_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
  claimed[#claimed + 1] = id
  claimed[#claimed + 1] = redis.call('HGET', KEYS[2], id) or '0'
end
return claimed
"""

OPEN_STATUSES = frozenset(
    {
        PaymentStatus.CREATED,
        PaymentStatus.PENDING,
        PaymentStatus.PROCESSING,
        PaymentStatus.REQUIRES_CAPTURE,
    }
)


@dataclass(frozen=True, slots=True)
class Mapping_:
    """Our ID for something and the provider's ID for the same thing."""

    provider: str
    entity: str  # payment | capture | ...
    local_id: str
    external_id: str


class TransitionOutcome(StrEnum):
    APPLIED = "applied"  # the payment moved
    UNCHANGED = "unchanged"  # already there (fields may have been filled in)
    REJECTED = "rejected"  # not a legal move from where the payment is
    DUPLICATE = "duplicate"  # this event was applied before
    MISSING = "missing"  # no such payment


@dataclass(frozen=True, slots=True)
class TransitionResult:
    outcome: TransitionOutcome
    previous: PaymentStatus | None
    record: PaymentRecord | None = None  # the payment after the transition


class RefundBeginOutcome(StrEnum):
    CREATED = "created"  # reserved: now ask the provider
    EXISTS = "exists"  # a refund with this id was asked for before
    EXCEEDS = "exceeds"  # more than is left once succeeded and pending refunds count
    UNPAID = "unpaid"  # the payment has not been paid (or is gone from paid)
    MISSING = "missing"  # no such payment


@dataclass(frozen=True, slots=True)
class RefundBegin:
    outcome: RefundBeginOutcome
    refund: RefundRecord | None = None
    left: int | None = None  # with EXCEEDS: what may still be refunded


@dataclass(frozen=True, slots=True)
class RefundApplied:
    outcome: TransitionOutcome  # applied | unchanged | rejected | duplicate | missing
    refund: RefundRecord | None
    previous: RefundStatus | None = None


class IdempotencyState(StrEnum):
    NEW = "new"
    PENDING = "pending"
    DONE = "done"
    MISMATCH = "mismatch"


@dataclass(frozen=True, slots=True)
class IdempotencyAnswer:
    """The first response to a request with an idempotency key, to replay later."""

    scope: str
    key: str
    response: Mapping[str, Any]
    ttl_s: int = 86_400


@dataclass(frozen=True, slots=True)
class IdempotencyBegin:
    state: IdempotencyState
    response: dict[str, Any] | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _history_entry(
    status: PaymentStatus, previous: PaymentStatus | None, cause: str, at: datetime
) -> str:
    return HistoryEntry(at=at, status=status, previous=previous, cause=cause).model_dump_json()


@dataclass(frozen=True, slots=True)
class _ScriptCall:
    """One call of a registered script, to send in a batch."""

    script: AsyncScript
    keys: list[str]
    args: list[str | int | float] = field(default_factory=list)

    async def run(self) -> Any:
        """Call it alone: by digest, loading the script first if Redis has lost it."""
        return await self.script(keys=self.keys, args=self.args)


class PaymentStore:
    """Payments, their history, idempotency records and rate-limit counters in Redis.

    Redis errors surface as ``StoreUnavailable`` (503); the client reconnects by itself when
    Redis is back.
    """

    def __init__(self, redis: RedisClient, *, prefix: str = "") -> None:
        self._redis = redis
        self._cluster = isinstance(redis, RedisCluster)
        self._prefix = prefix
        self._create = redis.register_script(_CREATE_LUA)
        self._mapping = redis.register_script(_MAPPING_LUA)
        self._idempotency_begin = redis.register_script(_IDEMPOTENCY_BEGIN_LUA)
        self._rate_limit = redis.register_script(_RATE_LIMIT_LUA)
        self._transition = redis.register_script(_TRANSITION_LUA)
        self._reconcile_claim = redis.register_script(_RECONCILE_CLAIM_LUA)
        self._refund_begin = redis.register_script(_REFUND_BEGIN_LUA)
        self._refund_apply = redis.register_script(_REFUND_APPLY_LUA)
        self._refund_discard = redis.register_script(_REFUND_DISCARD_LUA)
        self._idempotency_renew = redis.register_script(_IDEMPOTENCY_RENEW_LUA)
        self._keep_receipt_number = redis.register_script(_KEEP_RECEIPT_NUMBER_LUA)
        self._keep_credit_note_number = redis.register_script(_KEEP_CREDIT_NOTE_NUMBER_LUA)
        # services/events: the merchant events each change script writes, and who to tell.
        self.outbox = OutboxKeys(prefix, cluster=self._cluster)
        self.outbox_listener: Callable[[str], None] | None = None
        recon = f"{prefix}{{recon}}"
        self._recon_queue, self._recon_steps = f"{recon}:queue", f"{recon}:steps"
        self.reconcile_stats_key = f"{recon}:stats"
        self.reconcile_leader_key = f"{recon}:leader"

    # -- keys ------------------------------------------------------------------------------

    def _payment_key(self, payment_id: str) -> str:
        return f"{self._prefix}pay:{{{payment_id}}}"

    def _keys(self, payment_id: str) -> list[str]:
        base = self._payment_key(payment_id)
        return [base, f"{base}:history", f"{base}:events"]

    def _mapping_keys(self, provider: str, entity: str) -> tuple[str, str]:
        """Two hashes per provider and entity: ours -> theirs, theirs -> ours."""
        base = f"{self._prefix}map:{{{provider}:{entity}}}"
        return f"{base}:local", f"{base}:external"

    def _mapping_call(
        self, provider: str, entity: str, local_id: str, external_id: str
    ) -> _ScriptCall:
        return _ScriptCall(
            self._mapping, list(self._mapping_keys(provider, entity)), [local_id, external_id]
        )

    async def add_mapping(
        self, provider: str, entity: str, local_id: str, external_id: str
    ) -> None:
        async with store_errors():
            await self._mapping_call(provider, entity, local_id, external_id).run()

    async def lookup_mapping(
        self,
        provider: str,
        entity: str,
        *,
        local_id: str | None = None,
        external_id: str | None = None,
    ) -> Mapping_ | None:
        to_external, to_local = self._mapping_keys(provider, entity)
        async with store_errors():
            if local_id is not None:
                found = await self._redis.hget(to_external, local_id)
                return Mapping_(provider, entity, local_id, str(found)) if found else None
            if external_id is not None:
                found = await self._redis.hget(to_local, external_id)
                return Mapping_(provider, entity, str(found), external_id) if found else None
        return None

    async def external_id(self, provider: str, entity: str, local_id: str) -> str | None:
        """``ProviderMappings``: the vendor's ID for our ``local_id``."""
        found = await self.lookup_mapping(provider, entity, local_id=local_id)
        return found.external_id if found else None

    async def local_id(self, provider: str, entity: str, external_id: str) -> str | None:
        """``ProviderMappings``: our ID for the vendor's ``external_id``."""
        found = await self.lookup_mapping(provider, entity, external_id=external_id)
        return found.local_id if found else None

    async def link(self, provider: str, entity: str, local_id: str, external_id: str) -> None:
        """``ProviderMappings``: map both ways."""
        await self.add_mapping(provider, entity, local_id, external_id)

    async def list_mappings(
        self, provider: str, entity: str, *, cursor: int = 0, count: int = 100
    ) -> tuple[int, list[Mapping_]]:
        to_external, _ = self._mapping_keys(provider, entity)
        async with store_errors():
            next_cursor, items = await self._redis.hscan(to_external, cursor=cursor, count=count)
        pairs = cast(dict[str, str], items)
        return int(next_cursor), [
            Mapping_(provider, entity, local, external) for local, external in pairs.items()
        ]

    # -- payments --------------------------------------------------------------------------

    async def ping(self) -> None:
        async with store_errors():
            await self._redis.ping()

    async def create(
        self,
        record: PaymentRecord,
        *,
        cause: str = "api",
        idempotency: IdempotencyAnswer | None = None,
        reconcile_after_s: float | None = None,
    ) -> bool:
        """Store a new payment, its reference index and, when given, the idempotency answer.
        False when a payment with that ID exists already.

        With ``reconcile_after_s``, an open payment is also queued for reconciliation then, so
        that a lost webhook cannot leave it open for good.

        The answer is never stored before the payment exists. On a standalone Redis all of it
        is one round trip: one pipeline, whose commands Redis runs in order on one connection,
        the payment's first. On a Redis Cluster the payment, the mapping, the answer and the
        queue live in different slots, mostly on different nodes, and the cluster client sends
        each node its share of a pipeline at the same time, so order holds only within a
        node: there the payment is written on its own first, and the rest follows in a second
        round trip (one per node, in parallel) once Redis has said the payment is stored.
        """
        payment = _ScriptCall(
            self._create,
            self._keys(record.payment_id)[:2],
            [
                "payment",
                _json(_record_to_fields(record)),
                _history_entry(record.status, None, cause, record.created_at),
            ],
        )
        # Our order reference <-> the provider's ID: how events that name only our reference
        # (or another vendor object of the same payment) find the payment.
        after = [
            self._mapping_call(record.provider, "payment", record.reference, record.payment_id)
        ]
        if idempotency is not None:
            after.append(self._answer_call(idempotency))
        queue = None
        if reconcile_after_s is not None and record.status in OPEN_STATUSES:
            queue = (record.payment_id, record.created_at.timestamp() + reconcile_after_s)
        async with store_errors():
            if self._cluster:
                created = await payment.run()
                await self._batch(after, reconcile=queue, indexed=record)
            else:
                created, *_ = await self._batch([payment, *after], reconcile=queue, indexed=record)
        return bool(created)

    async def _batch(
        self,
        calls: Sequence[_ScriptCall],
        *,
        reconcile: tuple[str, float] | None = None,
        indexed: PaymentRecord | None = None,
    ) -> list[Any]:
        """Run ``calls`` in order in one pipeline (without MULTI: they may span slots), then,
        with ``reconcile``, queue that payment at that time unless it is queued already, and
        with ``indexed``, add that payment to the search indexes.

        Scripts go by digest (EVALSHA) and not through the pipeline's own script support,
        which asks SCRIPT EXISTS first, a round trip of its own (and a cluster pipeline has
        none). A call that met an empty script cache runs again through its ``Script``, which
        loads it: in order, so a step runs again only after those before it.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            if reconcile is not None:
                payment_id, due = reconcile
                pipe.zadd(self._recon_queue, {payment_id: due}, nx=True)
            if indexed is not None:  # the admin dashboard's search indexes
                entry = {indexed.payment_id: indexed.created_at.timestamp()}
                for key in self._index_keys(indexed):
                    pipe.zadd(key, entry, nx=True)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for index, call in enumerate(calls):
            if isinstance(replies[index], NoScriptError):
                replies[index] = await call.run()
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def get(self, payment_id: str) -> PaymentRecord | None:
        async with store_errors():
            fields = cast(dict[str, str], await self._redis.hgetall(self._payment_key(payment_id)))
        return _record_from_fields(fields) if fields else None

    async def find_by_reference(self, provider: str, reference: str) -> PaymentRecord | None:
        mapping = await self.lookup_mapping(provider, "payment", local_id=reference)
        return await self.get(mapping.external_id) if mapping else None

    async def history(self, payment_id: str) -> list[HistoryEntry]:
        async with store_errors():
            entries = await self._redis.lrange(f"{self._payment_key(payment_id)}:history", 0, -1)
        return [HistoryEntry.model_validate_json(entry) for entry in entries]

    async def transition(
        self,
        payment_id: str,
        status: PaymentStatus,
        *,
        cause: str,
        event_id: str | None = None,
        fields: Mapping[str, str | int | None] | None = None,
    ) -> TransitionResult:
        """Move a payment to ``status`` if the transition table allows it, atomically.

        ``event_id`` makes the change happen at most once for that event, however often it
        is delivered. ``fields`` are recorded alongside (``amount_refunded`` only grows).
        """
        now = _now()
        # The script fills in the entry's `previous`: only it knows the status it replaced.
        entry = _history_entry(status, None, cause, now)
        pairs = _flatten({k: str(v) for k, v in (fields or {}).items() if v is not None})
        async with store_errors():
            outcome, previous, *rest = await self._transition(
                keys=[*self._keys(payment_id), *self.outbox.keys(payment_id)],
                args=[str(status), entry, event_id or "", now.isoformat(), new_event_id(), *pairs],
            )
        if outcome == TransitionOutcome.APPLIED:
            self._outbox_written(self.outbox.outbox(payment_id))
        flat: list[str] = rest[0] if rest else []
        stored = dict(zip(flat[::2], flat[1::2], strict=True))
        return TransitionResult(
            outcome=TransitionOutcome(outcome),
            previous=PaymentStatus(previous) if previous else None,
            record=_record_from_fields(stored) if stored else None,
        )

    async def keep_receipt_number(self, payment_id: str, number: str) -> str | None:
        """Keep the receipt's number in the payment's hash, so that whoever reads the payment
        reads its number too. The first number kept stays; the number the payment holds, None
        when there is no such payment."""
        async with store_errors():
            held = await self._keep_receipt_number(
                keys=[self._payment_key(payment_id)], args=[number]
            )
        return None if held is None else str(held)

    # -- search indexes (the admin dashboard) ----------------------------------------------
    #
    # Sorted sets of payment IDs by creation time: every payment, each owner's, each
    # provider's. Each is one key in a slot of its own (a Cluster cannot put an owner's index
    # in the slot of each of the owner's payments), so no script of a payment can write one:
    # they are written by create's batch (plain ZADD NX after the payment's own script, in
    # the same round trip on a standalone Redis), and hold only what never changes once a
    # payment exists. Status is not indexed: it changes in the transition and refund scripts,
    # and an index written after them would be lost by a crash in between, for good. A search
    # by status walks one of these indexes newest first and reads each payment's status from
    # the payment itself, a bounded page at a time.
    #
    # The one gap: on a Cluster a crash between create's two round trips leaves a payment
    # unindexed (found by its ID only), as it leaves its reference mapping unwritten.

    def _index_keys(self, record: PaymentRecord) -> list[str]:
        keys = [self.payment_index_key(), self.payment_index_key(provider=record.provider)]
        if record.owner is not None:
            keys.append(self.payment_index_key(owner=record.owner))
        return keys

    def payment_index_key(self, *, owner: str | None = None, provider: str | None = None) -> str:
        """The index of every payment, or of one owner's, or of one provider's. An owner is
        any string a token carries: the key holds its digest, so no brace in it moves the
        key's hash tag."""
        if owner is not None:
            return f"{self._prefix}idx:{{owner:{hashlib.sha256(owner.encode()).hexdigest()}}}"
        if provider is not None:
            return f"{self._prefix}idx:{{provider:{provider}}}"
        return f"{self._prefix}idx:{{payments}}"

    async def indexed_payments(
        self, key: str, *, before: tuple[float, str] | None, limit: int
    ) -> list[tuple[str, float]]:
        """Up to ``limit`` (payment ID, created at) of index ``key``, newest first, after
        ``before`` (the last pair of the previous page)."""
        top: float | str = "+inf" if before is None else before[0]
        # Payments of the same instant come in reverse ID order: skip those already seen.
        extra = 0 if before is None else 64
        async with store_errors():
            rows = await self._redis.zrevrangebyscore(
                key, top, "-inf", start=0, num=limit + extra, withscores=True
            )
        found = [(str(member), float(score)) for member, score in cast(list[Any], rows)]
        if before is not None:
            found = [
                (member, score)
                for member, score in found
                if score < before[0] or member < before[1]
            ]
        return found[:limit]

    async def get_many(self, payment_ids: Sequence[str]) -> list[PaymentRecord | None]:
        """The payments, in the order asked (None for one that is gone)."""
        async with store_errors(), self._redis.pipeline(transaction=False) as pipe:
            for payment_id in payment_ids:
                pipe.hgetall(self._payment_key(payment_id))
            replies = await pipe.execute()
        return [_record_from_fields(fields) if fields else None for fields in replies]

    async def reconcile_backlog(self, *, limit: int) -> list[tuple[str, float, int]]:
        """The payments queued for reconciliation, soonest first: (ID, due at, step)."""
        async with store_errors():
            rows = cast(
                list[Any],
                await self._redis.zrange(self._recon_queue, 0, limit - 1, withscores=True),
            )
            ids = [str(member) for member, _ in rows]
            steps = await self._redis.hmget(self._recon_steps, ids) if ids else []
        return [
            (payment_id, float(score), int(step or 0))
            for payment_id, (_, score), step in zip(ids, rows, steps, strict=True)
        ]

    # -- refunds ---------------------------------------------------------------------------

    def _refund_keys(self, payment_id: str, refund_id: str) -> tuple[str, str, str]:
        """The payment's refunds (refund id -> record JSON), the provider's refund ids
        (theirs -> ours), and this refund's history: all in the payment's slot."""
        base = self._payment_key(payment_id)
        return f"{base}:refunds", f"{base}:refund-ids", f"{base}:refund:{refund_id}:history"

    async def begin_refund(
        self,
        payment_id: str,
        *,
        refund_id: str,
        provider: str,
        amount: int | None,
        currency: str,
        reason: str | None,
        cause: str,
    ) -> RefundBegin:
        """Record a pending refund of ``amount`` (None: all that is left) and reserve it
        against the balance, atomically; or find the refund already asked for under
        ``refund_id``."""
        now = _now()
        refunds, _, history = self._refund_keys(payment_id, refund_id)
        template = {
            "refund_id": refund_id,
            "payment_id": payment_id,
            "provider": provider,
            "provider_refund_id": None,
            "currency": currency,
            "status": str(RefundStatus.PENDING),
            "reason": reason,
            "failure_code": None,
            "created_at": now.isoformat(),
            "updated_at": now.isoformat(),
        }
        entry = RefundHistoryEntry(at=now, status=RefundStatus.PENDING, cause=cause)
        async with store_errors():
            outcome, raw = await self._refund_begin(
                keys=[self._payment_key(payment_id), refunds, history],
                args=[
                    refund_id,
                    "" if amount is None else str(amount),
                    json.dumps(template),
                    entry.model_dump_json(),
                ],
            )
        result = RefundBeginOutcome(outcome)
        if result in (RefundBeginOutcome.CREATED, RefundBeginOutcome.EXISTS):
            return RefundBegin(result, refund=RefundRecord.model_validate_json(raw))
        if result is RefundBeginOutcome.EXCEEDS:
            return RefundBegin(result, left=max(0, int(raw)))
        return RefundBegin(result)

    async def apply_refund(
        self,
        payment_id: str,
        *,
        status: RefundStatus,
        cause: str,
        refund_id: str | None = None,
        provider_refund_id: str | None = None,
        failure_code: str | None = None,
        event_id: str | None = None,
        adopt: RefundRecord | None = None,
    ) -> RefundApplied:
        """Move one refund to what the provider says, with the payment's sums and status.

        The refund is ours (``refund_id``) or found by the provider's id. A refund we have no
        record of is ``adopt``ed when given (one made at the provider directly); otherwise the
        outcome is MISSING. ``event_id`` applies the change at most once for that event."""
        refunds, by_provider, _ = self._refund_keys(payment_id, "")
        if refund_id is None and provider_refund_id is not None:
            async with store_errors():
                found = await self._redis.hget(by_provider, provider_refund_id)
            refund_id = str(found) if found else (adopt.refund_id if adopt else None)
        if refund_id is None:
            return RefundApplied(TransitionOutcome.MISSING, None)
        now = _now()
        _, _, history = self._refund_keys(payment_id, refund_id)
        payment_key = self._payment_key(payment_id)
        entry = RefundHistoryEntry(at=now, status=status, cause=cause)
        moved = HistoryEntry(at=now, status=PaymentStatus.SUCCEEDED, cause=cause)
        async with store_errors():
            outcome, raw, previous = await self._refund_apply(
                keys=[
                    payment_key,
                    refunds,
                    by_provider,
                    history,
                    f"{payment_key}:history",
                    f"{payment_key}:events",
                    *self.outbox.keys(payment_id),
                ],
                args=[
                    refund_id,
                    provider_refund_id or "",
                    str(status),
                    entry.model_dump_json(),
                    now.isoformat(),
                    event_id or "",
                    failure_code or "",
                    moved.model_dump_json(),
                    adopt.model_dump_json() if adopt is not None else "",
                    new_event_id(),
                    new_event_id(),
                ],
            )
        if outcome == TransitionOutcome.APPLIED:
            self._outbox_written(self.outbox.outbox(payment_id))
        if outcome == "unknown":
            return RefundApplied(TransitionOutcome.MISSING, None)
        return RefundApplied(
            TransitionOutcome(outcome),
            RefundRecord.model_validate_json(raw) if raw else None,
            RefundStatus(previous) if previous else None,
        )

    def _outbox_written(self, outbox: str) -> None:
        """Tell the events relay at once; its sweep finds the outbox anyway if we die here."""
        if self.outbox_listener is not None:
            self.outbox_listener(outbox)

    async def discard_refund(self, payment_id: str, refund_id: str) -> bool:
        """Forget a pending refund the provider never made, giving its amount back."""
        refunds, _, history = self._refund_keys(payment_id, refund_id)
        async with store_errors():
            done = await self._refund_discard(
                keys=[self._payment_key(payment_id), refunds, history], args=[refund_id]
            )
        return bool(done)

    async def refunds(self, payment_id: str) -> list[RefundRecord]:
        """The payment's refunds, oldest first."""
        refunds, _, _ = self._refund_keys(payment_id, "")
        async with store_errors():
            raw = await self._redis.hvals(refunds)
        records = [RefundRecord.model_validate_json(item) for item in raw]
        return sorted(records, key=lambda record: (record.created_at, record.refund_id))

    async def keep_credit_note_number(
        self, payment_id: str, refund_id: str, number: str
    ) -> str | None:
        """Keep a refund's credit-note number in its record, as ``keep_receipt_number`` does
        for a payment: the first stays; the number held, None when there is no such refund."""
        refunds, _, _ = self._refund_keys(payment_id, refund_id)
        async with store_errors():
            held = await self._keep_credit_note_number(keys=[refunds], args=[refund_id, number])
        return None if held is None else str(held)

    async def refund_history(self, payment_id: str, refund_id: str) -> list[RefundHistoryEntry]:
        _, _, history = self._refund_keys(payment_id, refund_id)
        async with store_errors():
            entries = await self._redis.lrange(history, 0, -1)
        return [RefundHistoryEntry.model_validate_json(entry) for entry in entries]

    # -- idempotency -----------------------------------------------------------------------

    def _idempotency_key(self, scope: str, key: str) -> str:
        return f"{self._prefix}idem:{{{scope}:{key}}}"

    async def idempotency_begin(
        self, scope: str, key: str, fingerprint: str, *, pending_ttl_ms: int = 60_000
    ) -> IdempotencyBegin:
        async with store_errors():
            state, response = await self._idempotency_begin(
                keys=[self._idempotency_key(scope, key)], args=[fingerprint, pending_ttl_ms]
            )
        return IdempotencyBegin(
            state=IdempotencyState(state), response=json.loads(response) if response else None
        )

    def _answer_call(self, answer: IdempotencyAnswer) -> _ScriptCall:
        # The answer step of create's script (see _CREATE_LUA for why it is one script).
        return _ScriptCall(
            self._create,
            [self._idempotency_key(answer.scope, answer.key)],
            ["answer", json.dumps(answer.response), answer.ttl_s],
        )

    async def idempotency_complete(self, answer: IdempotencyAnswer) -> None:
        async with store_errors():
            await self._answer_call(answer).run()

    async def idempotency_renew(self, scope: str, key: str, *, lease_ms: int) -> bool:
        """Extend an in-progress claim by ``lease_ms``; False when it is no longer ours to
        extend (answered, or expired)."""
        async with store_errors():
            renewed = await self._idempotency_renew(
                keys=[self._idempotency_key(scope, key)], args=[lease_ms]
            )
        return bool(renewed)

    async def idempotency_abort(self, scope: str, key: str) -> None:
        async with store_errors():
            await self._redis.delete(self._idempotency_key(scope, key))

    # -- rate limits -----------------------------------------------------------------------

    async def hit_rate_limit(self, bucket: str, window_s: int) -> tuple[int, float]:
        """Count one hit in ``bucket``'s current window: (hits so far, seconds left)."""
        async with store_errors():
            hits, ttl_ms = await self._rate_limit(
                keys=[f"{self._prefix}rl:{{{bucket}}}"], args=[window_s * 1000]
            )
        return int(hits), int(ttl_ms) / 1000

    # -- reconciliation queue --------------------------------------------------------------

    async def schedule_reconcile(
        self, payment_id: str, *, after_s: float, step: int = 0, sooner_only: bool = True
    ) -> None:
        """Queue ``payment_id`` to be re-verified in ``after_s``. With ``sooner_only`` an
        earlier time already queued stays; the reconciler, which holds a lease on the
        payments it checks, sets the next step's time whatever the lease said."""
        async with store_errors(), self._redis.pipeline(transaction=True) as pipe:
            due = {payment_id: _now().timestamp() + after_s}
            pipe.zadd(self._recon_queue, due, lt=sooner_only)
            pipe.hset(self._recon_steps, payment_id, str(step))
            await pipe.execute()

    async def reconcile_due_at(self, payment_id: str) -> float | None:
        """When ``payment_id`` is next to be re-verified (epoch seconds), if it is queued."""
        async with store_errors():
            due = await self._redis.zscore(self._recon_queue, payment_id)
        return None if due is None else float(due)

    async def claim_due_reconciles(self, *, lease_s: float, limit: int) -> list[tuple[str, int]]:
        """The payments due for reconciliation with the step each is at, leased to us."""
        async with store_errors():
            flat = await self._reconcile_claim(
                keys=[self._recon_queue, self._recon_steps],
                args=[_now().timestamp(), lease_s, limit],
            )
        return [(str(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def finish_reconcile(self, payment_id: str) -> None:
        async with store_errors(), self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._recon_queue, payment_id)
            pipe.hdel(self._recon_steps, payment_id)
            await pipe.execute()

    async def reconcile_queue_size(self) -> tuple[int, int]:
        """(queued, due now)."""
        async with store_errors(), self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._recon_queue)
            pipe.zcount(self._recon_queue, "-inf", _now().timestamp())
            queued, due = await pipe.execute()
        return int(queued), int(due)


# Redis out of reach: the connection (or a cluster node's), its timeout, a cluster that has
# lost a slot's every node or that the client cannot reach at all.
_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    SlotNotCoveredError,
    RedisClusterUnreachableError,
)


class store_errors:
    """Turn Redis connection trouble into ``StoreUnavailable``."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, _UNAVAILABLE):
            REDIS_ERRORS.labels(type(exc).__name__).inc()
            raise StoreUnavailable("The payment store is unavailable; retry shortly") from exc


def _flatten(fields: Mapping[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _json(fields: Mapping[str, str]) -> str:
    # Raw UTF-8, not \u escapes: Lua's cjson passes bytes through unchanged.
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


_JSON_FIELDS = ("attempts",)


def _record_to_fields(record: PaymentRecord) -> dict[str, str]:
    data = record.model_dump(mode="json", exclude_none=True)
    return {
        key: json.dumps(value) if key in _JSON_FIELDS else str(value) for key, value in data.items()
    }


def payment_from_fields(fields: Mapping[str, str]) -> PaymentRecord:
    """A payment from its hash's fields (as the event outbox carries them)."""
    return _record_from_fields(fields)


def _record_from_fields(fields: Mapping[str, str]) -> PaymentRecord:
    values: dict[str, Any] = dict(fields)
    for key in _JSON_FIELDS:
        if key in values:
            values[key] = json.loads(values[key])
    return PaymentRecord.model_validate(values)
