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
# index, event id, refund record table, at ISO) the refund as the script leaves it (ordered with
# its payment's events). Another kind of object (subscriptions) calls outbox_push with its own
# outbox (``OutboxKeys.for_object``) and an entry {id, type, at, object_id, <kind> = object},
# and services/events/service.py's ``_event_from_outbox`` learns to show that kind. The index
# holds outbox keys, scored by when each became non-empty (Redis's clock), so that a sweep
# leaves alone what the fast path is moving right now.
OUTBOX_LUA = """
local function outbox_push(outbox, index, entry)
  redis.call('RPUSH', outbox, cjson.encode(entry))
  local now = redis.call('TIME')
  redis.call('ZADD', index, 'NX', tonumber(now[1]) + tonumber(now[2]) / 1000000, outbox)
end
local function outbox_payment_event(payment, outbox, index, id, type, at)
  local flat = redis.call('HGETALL', payment)
  local object = {}
  for i = 1, #flat, 2 do object[flat[i]] = flat[i + 1] end
  outbox_push(outbox, index,
    {id = id, type = type, at = at, object_id = object['payment_id'], payment = object})
end
local function outbox_refund_event(payment, outbox, index, id, record, at)
  outbox_push(outbox, index, {id = id, type = 'refund.' .. record['status'], at = at,
    object_id = redis.call('HGET', payment, 'payment_id'), refund = record})
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

    def payment_key(self, payment_id: str) -> str:
        return f"{self._prefix}pay:{{{payment_id}}}"

    def outbox(self, payment_id: str) -> str:
        return f"{self.payment_key(payment_id)}:outbox"

    def index(self, outbox: str) -> str:
        """The index an outbox is marked in: one in its own slot."""
        if not self._cluster:
            return f"{self._prefix}evout:{{all}}"
        return f"{self._prefix}evout:{{{slot_tags()[key_slot(outbox.encode())]}}}"

    def for_object(self, object_key: str) -> list[str]:
        """KEYS for a change script of the object stored at ``object_key``: its outbox and
        that outbox's index, both in the object's slot."""
        outbox = f"{object_key}:outbox"
        return [outbox, self.index(outbox)]

    def keys(self, payment_id: str) -> list[str]:
        return self.for_object(self.payment_key(payment_id))

    def all_indexes(self) -> list[str]:
        if not self._cluster:
            return [f"{self._prefix}evout:{{all}}"]
        return [f"{self._prefix}evout:{{{tag}}}" for tag in slot_tags()]
