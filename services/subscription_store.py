"""Subscriptions in Redis, standalone or Cluster, as payment_store keeps payments.

A subscription's keys share the hash tag ``sub:{id}`` (its hash, history, applied events and
invoices), so that every script touches one Redis Cluster slot. The per-user index lives in
the user's own slot (``subs:{owner}``) and is written after the subscription, in a call of
its own.

Every change is one Lua script: the transition table (forward only), the event it applies
(at most once), the period (never moved back) and its history entry go together or not at all.
``active`` and ``past_due`` may follow each other for the life of a subscription, so the table
alone cannot say what is backwards: a state about an earlier period than the one stored, or an
event older than the last one applied to the same period, is refused as stale.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from models.subscription import SubscriptionHistoryEntry, SubscriptionRecord, SubscriptionStatus
from services.payment_store import RedisClient, _lua_state_machine, store_errors

T = SubscriptionStatus

# The only moves a subscription can make. canceled and incomplete_expired are final; the live
# states move among themselves as renewals succeed and fail.
TRANSITIONS: Mapping[SubscriptionStatus, frozenset[SubscriptionStatus]] = {
    T.INCOMPLETE: frozenset(
        {T.TRIALING, T.ACTIVE, T.PAST_DUE, T.PAUSED, T.CANCELED, T.INCOMPLETE_EXPIRED}
    ),
    T.TRIALING: frozenset({T.ACTIVE, T.PAST_DUE, T.PAUSED, T.CANCELED}),
    T.ACTIVE: frozenset({T.PAST_DUE, T.PAUSED, T.CANCELED}),
    T.PAST_DUE: frozenset({T.ACTIVE, T.PAUSED, T.CANCELED}),
    T.PAUSED: frozenset({T.ACTIVE, T.PAST_DUE, T.CANCELED}),
    T.CANCELED: frozenset(),
    T.INCOMPLETE_EXPIRED: frozenset(),
}

# KEYS: subscription hash, history list, applied-events set.
# ARGV: 1 target status, 2 history entry JSON (previous filled in here), 3 event id ('' for
# none), 4 now (ISO), 5 the state's period end (epoch seconds, '' if not known), 6 the event's
# time (epoch seconds, '' for a read of the vendor's truth), 7 the moment to record as
# past_due_since, then field/value pairs to record ('' deletes the field).
_APPLY_LUA = (
    _lua_state_machine(TRANSITIONS)
    + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {'missing', ''} end
if ARGV[3] ~= '' and redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 1 then
  return {'duplicate', current, redis.call('HGETALL', KEYS[1])}
end
if ARGV[3] ~= '' then redis.call('SADD', KEYS[3], ARGV[3]) end
local stored_end = tonumber(redis.call('HGET', KEYS[1], 'period_end_ts') or '0')
local stored_at = tonumber(redis.call('HGET', KEYS[1], 'event_ts') or '0')
local period_end = tonumber(ARGV[5])
local event_at = tonumber(ARGV[6])
if period_end and period_end < stored_end then
  return {'stale', current, redis.call('HGETALL', KEYS[1])}
end
if event_at and (not period_end or period_end == stored_end) and event_at < stored_at then
  return {'stale', current, redis.call('HGETALL', KEYS[1])}
end
local target = ARGV[1]
local outcome = outcome_of(current, target)
if outcome == 'rejected' then return {outcome, current, redis.call('HGETALL', KEYS[1])} end
for i = 8, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local renewed = period_end and period_end > stored_end and stored_end > 0
if period_end then redis.call('HSET', KEYS[1], 'period_end_ts', ARGV[5]) end
if event_at and event_at > stored_at then redis.call('HSET', KEYS[1], 'event_ts', ARGV[6]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
if outcome == 'applied' then
  redis.call('HSET', KEYS[1], 'status', target)
  if target == 'past_due' then
    redis.call('HSET', KEYS[1], 'past_due_since', ARGV[7])
  else
    redis.call('HDEL', KEYS[1], 'past_due_since')
  end
  if target == 'canceled' or target == 'incomplete_expired' then
    redis.call('HSET', KEYS[1], 'canceled_at', ARGV[4])
  end
end
if outcome == 'applied' or renewed then
  local entry = cjson.decode(ARGV[2])
  entry['previous'] = current
  redis.call('RPUSH', KEYS[2], cjson.encode(entry))
end
return {outcome, current, redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: subscription hash, history list. ARGV: fields (JSON object of strings), history entry.
# Creates once: 0 when the subscription exists already.
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local flat = {}
for field, value in pairs(cjson.decode(ARGV[1])) do
  flat[#flat + 1] = field
  flat[#flat + 1] = value
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""

# KEYS: subscription hash, invoices hash. ARGV: provider invoice id, our payment id.
# Records an invoice once: 1 the first time, 0 after.
_INVOICE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
"""

# Fields that are the store's own bookkeeping, not the record's.
_INTERNAL = ("period_end_ts", "event_ts")


class ApplyOutcome(StrEnum):
    APPLIED = "applied"  # the status moved
    UNCHANGED = "unchanged"  # same status (the period or other fields may have moved)
    REJECTED = "rejected"  # not a legal move from where it is
    STALE = "stale"  # about an earlier period, or older than what was applied
    DUPLICATE = "duplicate"  # this event was applied before
    MISSING = "missing"  # no such subscription


@dataclass(frozen=True, slots=True)
class Applied:
    outcome: ApplyOutcome
    previous: SubscriptionStatus | None
    record: SubscriptionRecord | None


class SubscriptionStore:
    def __init__(self, redis: RedisClient, *, prefix: str = "") -> None:
        self._redis = redis
        self._prefix = prefix
        self._apply = redis.register_script(_APPLY_LUA)
        self._create = redis.register_script(_CREATE_LUA)
        self._invoice = redis.register_script(_INVOICE_LUA)

    def _key(self, subscription_id: str) -> str:
        return f"{self._prefix}sub:{{{subscription_id}}}"

    def _keys(self, subscription_id: str) -> list[str]:
        base = self._key(subscription_id)
        return [base, f"{base}:history", f"{base}:events"]

    def _owner_key(self, owner: str) -> str:
        return f"{self._prefix}subs:{{owner:{owner}}}"

    async def create(self, record: SubscriptionRecord, *, cause: str) -> bool:
        """Store a new subscription and index it under its owner. False when it exists."""
        fields = _to_fields(record)
        entry = SubscriptionHistoryEntry(
            at=record.created_at, status=record.status, cause=cause
        ).model_dump_json()
        keys = self._keys(record.subscription_id)[:2]
        async with store_errors():
            created = await self._create(keys=keys, args=[json.dumps(fields), entry])
            # The index is in the owner's slot: written after the subscription exists, so it
            # never names one that does not.
            await self._redis.zadd(
                self._owner_key(record.owner),
                {record.subscription_id: record.created_at.timestamp()},
                nx=True,
            )
        return bool(created)

    async def get(self, subscription_id: str) -> SubscriptionRecord | None:
        async with store_errors():
            fields = await self._redis.hgetall(self._key(subscription_id))
        return _from_fields(cast(dict[str, str], fields)) if fields else None

    async def of_owner(self, owner: str, *, limit: int = 100) -> list[SubscriptionRecord]:
        """The owner's subscriptions, newest first."""
        async with store_errors():
            ids = await self._redis.zrevrange(self._owner_key(owner), 0, limit - 1)
        records = [await self.get(str(found)) for found in ids]
        return [record for record in records if record is not None]

    async def history(self, subscription_id: str) -> list[SubscriptionHistoryEntry]:
        async with store_errors():
            entries = await self._redis.lrange(f"{self._key(subscription_id)}:history", 0, -1)
        return [SubscriptionHistoryEntry.model_validate_json(entry) for entry in entries]

    async def apply(
        self,
        subscription_id: str,
        status: SubscriptionStatus,
        *,
        cause: str,
        event_id: str | None = None,
        period_end: datetime | None = None,
        event_at: datetime | None = None,
        past_due_since: datetime | None = None,
        fields: Mapping[str, str | None] | None = None,
    ) -> Applied:
        """Move a subscription to ``status`` with ``fields`` (None: leave as is; '': remove),
        atomically, at most once per ``event_id``, never back to an earlier period or to an
        older event's word."""
        now = datetime.now(UTC)
        entry = SubscriptionHistoryEntry(
            at=now, status=status, cause=cause, current_period_end=period_end
        ).model_dump_json()
        pairs = [
            item
            for name, value in (fields or {}).items()
            if value is not None
            for item in (name, value)
        ]
        async with store_errors():
            outcome, previous, *rest = await self._apply(
                keys=self._keys(subscription_id),
                args=[
                    str(status),
                    entry,
                    event_id or "",
                    now.isoformat(),
                    _epoch(period_end),
                    _epoch(event_at),
                    (past_due_since or now).isoformat(),
                    *pairs,
                ],
            )
        flat: list[str] = rest[0] if rest else []
        stored = dict(zip(flat[::2], flat[1::2], strict=True))
        return Applied(
            ApplyOutcome(outcome),
            SubscriptionStatus(previous) if previous else None,
            _from_fields(stored) if stored else None,
        )

    async def record_invoice(
        self, subscription_id: str, provider_invoice_id: str, payment_id: str
    ) -> bool:
        """Link a paid invoice to the subscription: True the first time."""
        base = self._key(subscription_id)
        async with store_errors():
            done = await self._invoice(
                keys=[base, f"{base}:invoices"], args=[provider_invoice_id, payment_id]
            )
        return int(done) == 1

    async def invoices(self, subscription_id: str) -> list[str]:
        """The payment ids of the subscription's paid invoices."""
        async with store_errors():
            found = await self._redis.hvals(f"{self._key(subscription_id)}:invoices")
        return sorted(str(payment_id) for payment_id in found)


def _epoch(moment: datetime | None) -> str:
    return "" if moment is None else str(int(moment.timestamp()))


def _to_fields(record: SubscriptionRecord) -> dict[str, str]:
    data = record.model_dump(mode="json", exclude_none=True)
    fields = {key: _text(value) for key, value in data.items()}
    if record.current_period_end is not None:
        fields["period_end_ts"] = _epoch(record.current_period_end)
    return fields


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _from_fields(fields: Mapping[str, str]) -> SubscriptionRecord:
    values: dict[str, Any] = {k: v for k, v in fields.items() if k not in _INTERNAL}
    if "cancel_at_period_end" in values:
        values["cancel_at_period_end"] = values["cancel_at_period_end"] == "1"
    if "test_mode" in values:
        values["test_mode"] = values["test_mode"] == "1"
    return SubscriptionRecord.model_validate(values)


def text_of(value: datetime | bool | int | str | None) -> str | None:
    """A field's stored text, for ``SubscriptionStore.apply``."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return _text(value)
