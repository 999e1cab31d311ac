"""Deliveries: one event to one endpoint, in order per payment, with their log.

All of an endpoint's delivery keys share its hash tag (``whep:{we_...}``), so every step below
is one script on one slot:

- ``:q:<object>``   the deliveries of one payment (or other object) to this endpoint, in
  event order. Only the head may be attempted: a later event waits until the earlier one
  succeeded or was given up.
- ``:due``          heads that are due (a zset of times). A claim pushes an entry a lease
  ahead and hands it to the delivery stream; when the worker that took it dies, the lease
  runs out and the entry is handed over again.
- ``:d:<delivery>`` the delivery: the event, its status, its attempts, the last answer.
- ``:log``          the latest deliveries, newest first, capped.

Records, queues and the log expire with ``retention_s`` (longer than the retry schedule),
so an endpoint's keys are bounded, and gone some time after the endpoint is deleted.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from pydantic import BaseModel, Field

from services.errors import NotFound
from services.events.endpoints import EndpointStore
from services.payment_store import RedisClient, store_errors

EXCERPT_CHARS = 512


class DeliveryNotFound(NotFound):
    code = "webhook_delivery_not_found"
    title = "Webhook delivery not found"


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for its turn or its next attempt
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # given up


class Delivery(BaseModel):
    id: str
    endpoint_id: str
    event_id: str
    event_type: str
    object_id: str = Field(
        description="The payment (or other object) whose events reach the endpoint in order"
    )
    status: DeliveryStatus
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_latency_ms: float | None = None
    last_response: str | None = None
    last_error: str | None = None
    replay_of: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One merchant event as it is sent: the Standard Webhooks body, and what orders it."""

    id: str
    type: str
    object_id: str  # the deliveries of one payment (refunds included) keep their order
    body: str  # {"type", "timestamp", "data"}


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt got: an HTTP answer, or an error before one."""

    at: datetime
    status_code: int | None
    latency_ms: float
    excerpt: str
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class BeginOutcome(StrEnum):
    GO = "go"
    STALE = "stale"  # done already, or not its turn: a duplicate of the stream
    BUSY = "busy"  # another worker holds it right now
    EARLY = "early"  # its next attempt is later
    GONE = "gone"  # the endpoint was deleted, or the delivery expired
    DISABLED = "disabled"  # the endpoint is paused: try again later


# Shared by the scripts: fields from a JSON object.
_HSET_JSON = """
local function hset_json(key, encoded)
  local flat = {}
  for field, value in pairs(cjson.decode(encoded)) do
    flat[#flat + 1] = field
    flat[#flat + 1] = value
  end
  redis.call('HSET', key, unpack(flat))
end
"""

# KEYS: delivery, queue, log, due. ARGV: delivery id, fields (JSON), now (epoch), log size,
# retention s. Once per delivery id: relaying an event again changes nothing.
_ENQUEUE_LUA = (
    _HSET_JSON
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
hset_json(KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('LPUSH', KEYS[3], ARGV[1])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
redis.call('EXPIRE', KEYS[3], ARGV[5])
if redis.call('LINDEX', KEYS[2], 0) == ARGV[1] then
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
end
return 1
"""
)

# KEYS: due. ARGV: now, lease s, limit. The due heads, each pushed a lease ahead.
_CLAIM_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
end
return due
"""

# KEYS: delivery, queue, due, endpoint. ARGV: delivery id, now, lease s.
_BEGIN_LUA = """
if redis.call('EXISTS', KEYS[4]) == 0 or redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'gone'}
end
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return {'stale'} end
if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[1] then return {'stale'} end
local now = tonumber(ARGV[2])
if tonumber(redis.call('HGET', KEYS[1], 'inflight_until') or '0') > now then return {'busy'} end
if tonumber(redis.call('HGET', KEYS[1], 'next_at') or '0') > now then return {'early'} end
if redis.call('HGET', KEYS[4], 'enabled') ~= '1' then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
  return {'disabled'}
end
redis.call('HSET', KEYS[1], 'inflight_until', now + tonumber(ARGV[3]))
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
return {'go', redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[4])}
"""

# KEYS: delivery, queue, due, endpoint. ARGV: delivery id, now (epoch), outcome (succeeded |
# retry | failed), next attempt (epoch, for retry), attempt fields (JSON), retention s, now ISO.
# Answers the payment's next delivery to this endpoint, now due, if there is one.
_FINISH_LUA = (
    _HSET_JSON
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return '' end
hset_json(KEYS[1], ARGV[5])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HDEL', KEYS[1], 'inflight_until')
if ARGV[3] == 'retry' then
  redis.call('HSET', KEYS[1], 'next_at', ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
  return ''
end
redis.call('HSET', KEYS[1], 'status', ARGV[3])
redis.call('HDEL', KEYS[1], 'next_at')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if redis.call('LINDEX', KEYS[2], 0) == ARGV[1] then redis.call('LPOP', KEYS[2]) end
local following = redis.call('LINDEX', KEYS[2], 0)
if following then redis.call('ZADD', KEYS[3], ARGV[2], following) end
if redis.call('EXISTS', KEYS[4]) == 1 then
  if ARGV[3] == 'succeeded' then
    redis.call('HSET', KEYS[4], 'status', 'active')
    redis.call('HDEL', KEYS[4], 'failing_since')
  elseif redis.call('HGET', KEYS[4], 'status') ~= 'failing' then
    redis.call('HSET', KEYS[4], 'status', 'failing', 'failing_since', ARGV[7])
  end
end
return following or ''
"""
)


@dataclass(frozen=True, slots=True)
class Begun:
    outcome: BeginOutcome
    delivery: dict[str, str]
    endpoint: dict[str, str]


def delivery_id(event_id: str, endpoint_id: str) -> str:
    """The same event relayed twice to one endpoint is one delivery."""
    digest = hashlib.sha256(f"{event_id}\n{endpoint_id}".encode()).hexdigest()
    return f"wd_{digest[:24]}"


class DeliveryStore:
    def __init__(
        self,
        redis: RedisClient,
        endpoints: EndpointStore,
        *,
        log_size: int,
        retention_s: int,
    ) -> None:
        self._redis = redis
        self._endpoints = endpoints
        self._log_size = log_size
        self.retention_s = retention_s
        self._enqueue = redis.register_script(_ENQUEUE_LUA)
        self._claim = redis.register_script(_CLAIM_LUA)
        self._begin = redis.register_script(_BEGIN_LUA)
        self._finish = redis.register_script(_FINISH_LUA)

    def _keys(self, endpoint_id: str, delivery: str, object_id: str) -> dict[str, str]:
        base = self._endpoints.key(endpoint_id)
        return {
            "delivery": f"{base}:d:{delivery}",
            "queue": f"{base}:q:{object_id}",
            "log": f"{base}:log",
            "due": f"{base}:due",
            "endpoint": base,
        }

    async def enqueue(
        self, endpoint_id: str, event: Event, *, delivery: str | None = None, replay_of: str = ""
    ) -> str:
        """Queue ``event`` for the endpoint (once per event, unless ``delivery`` names a new
        one: a replay); answers the delivery's ID."""
        delivery = delivery or delivery_id(event.id, endpoint_id)
        keys = self._keys(endpoint_id, delivery, event.object_id)
        now = datetime.now(UTC)
        fields = {
            "id": delivery,
            "endpoint_id": endpoint_id,
            "event_id": event.id,
            "event_type": event.type,
            "object_id": event.object_id,
            "body": event.body,
            "status": str(DeliveryStatus.PENDING),
            "attempts": "0",
            "created_at": now.isoformat(),
            "replay_of": replay_of,
        }
        async with store_errors():
            await self._enqueue(
                keys=[keys["delivery"], keys["queue"], keys["log"], keys["due"]],
                args=[
                    delivery,
                    json.dumps(fields),
                    now.timestamp(),
                    self._log_size,
                    self.retention_s,
                ],
            )
        return delivery

    async def claim_due(self, endpoint_id: str, *, lease_s: float, limit: int) -> list[str]:
        async with store_errors():
            due = await self._claim(
                keys=[f"{self._endpoints.key(endpoint_id)}:due"],
                args=[datetime.now(UTC).timestamp(), lease_s, limit],
            )
        return [str(item) for item in due]

    async def begin(self, endpoint_id: str, delivery: str, *, lease_s: float) -> Begun:
        """Take the delivery for one attempt, if it is its turn and nobody else holds it."""
        async with store_errors():
            raw = await self._redis.hget(
                f"{self._endpoints.key(endpoint_id)}:d:{delivery}", "object_id"
            )
            if raw is None:
                return Begun(BeginOutcome.GONE, {}, {})
            keys = self._keys(endpoint_id, delivery, str(raw))
            reply = await self._begin(
                keys=[keys["delivery"], keys["queue"], keys["due"], keys["endpoint"]],
                args=[delivery, datetime.now(UTC).timestamp(), lease_s],
            )
        outcome = BeginOutcome(reply[0])
        if outcome is not BeginOutcome.GO:
            return Begun(outcome, {}, {})
        return Begun(outcome, _pairs(reply[1]), _pairs(reply[2]))

    async def finish(
        self,
        record: dict[str, str],
        attempt: Attempt,
        *,
        outcome: DeliveryStatus | None,
        next_at: datetime | None,
    ) -> str | None:
        """Record the attempt: ``outcome`` None is a retry at ``next_at``. Answers the
        payment's next delivery to this endpoint when this one is done."""
        keys = self._keys(record["endpoint_id"], record["id"], record["object_id"])
        fields = {
            "last_attempt_at": attempt.at.isoformat(),
            "last_status_code": "" if attempt.status_code is None else str(attempt.status_code),
            "last_latency_ms": f"{attempt.latency_ms:.1f}",
            "last_response": attempt.excerpt[:EXCERPT_CHARS],
            "last_error": attempt.error or "",
        }
        async with store_errors():
            following = await self._finish(
                keys=[keys["delivery"], keys["queue"], keys["due"], keys["endpoint"]],
                args=[
                    record["id"],
                    datetime.now(UTC).timestamp(),
                    "retry" if outcome is None else str(outcome),
                    next_at.timestamp() if next_at else "",
                    json.dumps(fields),
                    self.retention_s,
                    datetime.now(UTC).isoformat(),
                ],
            )
        return str(following) or None

    async def get(self, endpoint_id: str, delivery: str) -> dict[str, str]:
        async with store_errors():
            fields = await self._redis.hgetall(f"{self._endpoints.key(endpoint_id)}:d:{delivery}")
        if not fields:
            raise DeliveryNotFound(f"No delivery {delivery!r} of endpoint {endpoint_id!r}")
        return cast(dict[str, str], fields)

    async def log(self, endpoint_id: str, *, limit: int) -> list[Delivery]:
        """The endpoint's latest deliveries, newest first."""
        base = self._endpoints.key(endpoint_id)
        async with store_errors():
            ids = await self._redis.lrange(f"{base}:log", 0, limit - 1)
            if not ids:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for item in ids:
                    pipe.hgetall(f"{base}:d:{item!s}")
                rows = await pipe.execute()
        return [delivery_view(row) for row in rows if row]

    @staticmethod
    def new_id() -> str:
        return f"wd_{secrets.token_hex(12)}"


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def delivery_view(fields: dict[str, str]) -> Delivery:
    def optional(name: str) -> str | None:
        return fields.get(name) or None

    next_at = optional("next_at")
    return Delivery.model_validate(
        {
            "id": fields["id"],
            "endpoint_id": fields["endpoint_id"],
            "event_id": fields["event_id"],
            "event_type": fields["event_type"],
            "object_id": fields["object_id"],
            "status": fields["status"],
            "attempts": int(fields.get("attempts", "0")),
            "created_at": fields["created_at"],
            "next_attempt_at": (datetime.fromtimestamp(float(next_at), UTC) if next_at else None),
            "last_attempt_at": optional("last_attempt_at"),
            "last_status_code": optional("last_status_code"),
            "last_latency_ms": optional("last_latency_ms"),
            "last_response": optional("last_response"),
            "last_error": optional("last_error"),
            "replay_of": optional("replay_of"),
        }
    )
