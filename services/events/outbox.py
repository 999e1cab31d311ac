"""The event outbox: how a change of a payment or refund and its merchant event are one write.

Every change script of the store (services/payment_store.py) ends with ``OUTBOX_LUA``'s
functions: the event, with the object as it is after the change, is appended to the payment's
outbox list (``pay:{id}:outbox``, in the payment's slot) and the payment is added to an index
of non-empty outboxes, in the same script as the change. A Redis Cluster lets one script touch
keys of one slot only, and a key's slot is the CRC16 of its hash tag: so the index is kept per
slot, under a hash tag chosen (``slot_tags``) to hash to that very slot. The script's writes
are then one atomic operation on one node, on standalone and on Cluster alike; the relay
(services/events/relay.py) moves entries on, and finds the ones a crash left behind by
walking the per-slot indexes (one key on a standalone Redis).
"""

from __future__ import annotations

import secrets
from enum import StrEnum
from functools import cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

# Lua functions for the change scripts. outbox_payment_event(payment hash, outbox, index, event
# id, type, at ISO) snapshots the payment's hash; outbox_refund_event(payment hash, outbox,
# index, event id, refund record table, at ISO) the refund as the script leaves it. The index's
# score is when the outbox became non-empty (Redis's clock), so that a sweep leaves alone what
# the fast path is moving right now.
OUTBOX_LUA = """
local function outbox_push(outbox, index, payment_id, entry)
  redis.call('RPUSH', outbox, cjson.encode(entry))
  local now = redis.call('TIME')
  redis.call('ZADD', index, 'NX', tonumber(now[1]) + tonumber(now[2]) / 1000000, payment_id)
end
local function outbox_payment_event(payment, outbox, index, id, type, at)
  local flat = redis.call('HGETALL', payment)
  local object = {}
  for i = 1, #flat, 2 do object[flat[i]] = flat[i + 1] end
  outbox_push(outbox, index, object['payment_id'],
    {id = id, type = type, at = at, payment_id = object['payment_id'], payment = object})
end
local function outbox_refund_event(payment, outbox, index, id, record, at)
  local payment_id = redis.call('HGET', payment, 'payment_id')
  outbox_push(outbox, index, payment_id, {id = id, type = 'refund.' .. record['status'],
    at = at, payment_id = payment_id, refund = record})
end
"""


class EventType(StrEnum):
    """What a merchant's endpoint may subscribe to: one type per state an object may reach.
    Subscriptions' events join here (``subscription.*``) when their store writes them."""

    PAYMENT_PENDING = "payment.pending"
    PAYMENT_PROCESSING = "payment.processing"
    PAYMENT_REQUIRES_CAPTURE = "payment.requires_capture"
    PAYMENT_SUCCEEDED = "payment.succeeded"
    PAYMENT_FAILED = "payment.failed"
    PAYMENT_CANCELED = "payment.canceled"
    PAYMENT_EXPIRED = "payment.expired"
    PAYMENT_PARTIALLY_REFUNDED = "payment.partially_refunded"
    PAYMENT_REFUNDED = "payment.refunded"
    REFUND_SUCCEEDED = "refund.succeeded"
    REFUND_FAILED = "refund.failed"
    REFUND_CANCELED = "refund.canceled"


def new_event_id() -> str:
    return f"evt_{secrets.token_hex(12)}"


@cache
def slot_tags() -> tuple[str, ...]:
    """For each Redis Cluster slot, a short hash tag whose keys live in it (found once, by
    trying "0", "1", ...: about 160,000 CRC16s, a tenth of a second)."""
    tags: dict[int, str] = {}
    candidate = 0
    while len(tags) < REDIS_CLUSTER_HASH_SLOTS:
        tag = str(candidate)
        tags.setdefault(key_slot(tag.encode()), tag)
        candidate += 1
    return tuple(tags[slot] for slot in range(REDIS_CLUSTER_HASH_SLOTS))


class OutboxKeys:
    """The outbox keys of a payment, and every index key a sweep must look at."""

    def __init__(self, prefix: str, *, cluster: bool) -> None:
        self._prefix = prefix
        self._cluster = cluster

    def outbox(self, payment_id: str) -> str:
        return f"{self._prefix}pay:{{{payment_id}}}:outbox"

    def index(self, payment_id: str) -> str:
        if not self._cluster:
            return f"{self._prefix}evout:{{all}}"
        slot = key_slot(self.outbox(payment_id).encode())
        return f"{self._prefix}evout:{{{slot_tags()[slot]}}}"

    def keys(self, payment_id: str) -> list[str]:
        """KEYS for a change script: the outbox, its index (both in the payment's slot)."""
        return [self.outbox(payment_id), self.index(payment_id)]

    def all_indexes(self) -> list[str]:
        if not self._cluster:
            return [f"{self._prefix}evout:{{all}}"]
        return [f"{self._prefix}evout:{{{tag}}}" for tag in slot_tags()]
