"""Events for the merchant's backend: every change of a payment or refund, delivered to the
merchant's webhook endpoints at least once, in order per payment, signed as the Standard
Webhooks specification says, retried for about three days.

How an event travels, and why it cannot be lost:

1. The change script that records a transition or a refund's outcome also appends the event
   (the object as it is after the change) to the payment's outbox and marks the outbox in a
   per-slot index: one atomic script on one slot, standalone or Cluster (see outbox.py).
2. The relay moves a payment's outbox entries, oldest first, into a delivery per subscribed
   endpoint (deliveries.py), then pops each entry. It runs at once, in the process that made
   the change; if that process dies first, the sweep finds the outbox through its index (only
   entries older than a grace period, so as not to race the fast path). Enqueueing is once per
   (event, endpoint), so relaying again after a crash changes nothing. One worker sweeps at a
   time, the holder of a leader lease (services/leader_lease.py): on a Cluster the indexes
   are one per slot, and every worker reading a share of 16384 of them each interval would
   be thousands of reads for nothing. The lease only saves that work: the relay is atomic
   and idempotent, so two sweepers at once (a leader that stalled past its lease) are
   harmless, and a dead leader's lease lapses and another worker takes over.
3. Each endpoint keeps, per payment, a queue of its deliveries; only the head is due. The
   scheduler claims due heads under a lease and adds them to one Redis stream read by a
   consumer group: any worker may deliver any of them. A worker that dies holding one leaves
   it pending in the group, and another takes it over with XAUTOCLAIM once it has been idle
   for the claim period (the lease runs out at the same time, so the scheduler hands it out
   again too; the begin step makes sure only one attempt runs at a time).
4. An attempt that fails is retried after the next delay of the schedule; after the last one
   the delivery is given up, the endpoint marked failing, and the payment's next event goes.
   While an endpoint is failing its deliveries get one attempt each; a success clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.exceptions import RedisError, ResponseError

from models.payment import RefundRecord
from services.errors import NotFound, ServiceError, StoreUnavailable
from services.events.deliveries import (
    Attempt,
    BeginOutcome,
    Delivery,
    DeliveryStatus,
    DeliveryStore,
    Event,
    delivery_view,
)
from services.events.endpoints import (
    EndpointStatus,
    EndpointStore,
    RotatedSecret,
    SecretRotation,
    WebhookEndpoint,
    WebhookEndpointCreated,
    WebhookEndpointIn,
    WebhookEndpointPatch,
    endpoint_from_fields,
)
from services.events.outbox import EventType, OutboxKeys
from services.events.sender import Sender
from services.leader_lease import LeaderLease
from services.metrics import WEBHOOK_DELIVERIES
from services.payment_store import RedisClient, payment_from_fields, store_errors
from services.provider_configs import SecretsKeyMissing, SecretsUndecryptable
from services.views import payment_response, refund_view

log = logging.getLogger("payments.events")

GROUP = "deliverers"
SWEEP_SHARES = 8

# KEYS: outbox, index. ARGV: the entry just relayed, the outbox's key. Pops the entry if it is
# still the head (another relay may have popped it), and clears the index when empty.
_POP_LUA = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then redis.call('LPOP', KEYS[1]) end
if redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 0
end
return 1
"""


class EventNotFound(NotFound):
    code = "webhook_event_not_found"
    title = "Webhook event not found"


@dataclass(frozen=True, slots=True)
class EventsConfig:
    retry_schedule_s: Sequence[float]
    claim_idle_s: float  # a delivery's lease, and how idle a pending entry is before takeover
    poll_interval_s: float
    sweep_interval_s: float
    sweep_grace_s: float
    batch: int = 20
    # How long the sweep's leader lease lasts without renewal (the holder renews it every
    # sweep interval): a dead leader is replaced within about this long. None: three sweep
    # intervals, and at least a second.
    sweep_lease_s: float | None = None


class WebhookEvents:
    def __init__(
        self,
        redis: RedisClient,
        outbox: OutboxKeys,
        endpoints: EndpointStore,
        deliveries: DeliveryStore,
        sender: Sender,
        config: EventsConfig,
        *,
        prefix: str,
    ) -> None:
        self._redis = redis
        self._outbox = outbox
        self.endpoints = endpoints
        self.deliveries = deliveries
        self._sender = sender
        self._config = config
        self._stream = f"{prefix}wh:{{stream}}"
        self._events_prefix = f"{prefix}whevt:"
        self._pop = redis.register_script(_POP_LUA)
        self.consumer = f"worker-{uuid.uuid4().hex[:12]}"
        self._relaying: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        # Set when this process adds to the stream: its consumer reads at once rather than at
        # the next poll (other workers' consumers find it at theirs).
        self._handed_over = asyncio.Event()
        self._sweep_position = 0
        self._sweep_lease = LeaderLease(
            redis,
            f"{prefix}wh:{{sweep}}:leader",
            lease_s=config.sweep_lease_s or max(config.sweep_interval_s * 3, 1.0),
        )
        self.sweeps = 0  # sweep passes this worker ran as the leader
        self._stopping = False

    # -- endpoints (the admin API and the dashboard) ---------------------------------------

    async def create_endpoint(self, body: WebhookEndpointIn) -> WebhookEndpointCreated:
        return await self.endpoints.create(body)

    async def list_endpoints(self) -> list[WebhookEndpoint]:
        return await self.endpoints.all()

    async def get_endpoint(self, endpoint_id: str) -> WebhookEndpoint:
        return await self.endpoints.get(endpoint_id)

    async def update_endpoint(
        self, endpoint_id: str, patch: WebhookEndpointPatch
    ) -> WebhookEndpoint:
        return await self.endpoints.update(endpoint_id, patch)

    async def delete_endpoint(self, endpoint_id: str) -> None:
        await self.endpoints.delete(endpoint_id)

    async def rotate_secret(self, endpoint_id: str, rotation: SecretRotation) -> RotatedSecret:
        return await self.endpoints.rotate_secret(endpoint_id, rotation)

    async def delivery_log(self, endpoint_id: str, *, limit: int = 100) -> list[Delivery]:
        await self.endpoints.get(endpoint_id)
        return await self.deliveries.log(endpoint_id, limit=limit)

    async def get_delivery(self, endpoint_id: str, delivery_id: str) -> Delivery:
        return delivery_view(await self.deliveries.get(endpoint_id, delivery_id))

    async def replay_delivery(self, endpoint_id: str, delivery_id: str) -> Delivery:
        """Send a delivery's event again, as a new delivery after the payment's others."""
        await self.endpoints.get(endpoint_id)
        old = await self.deliveries.get(endpoint_id, delivery_id)
        event = Event(old["event_id"], old["event_type"], old["object_id"], old["body"])
        return await self._replay(endpoint_id, event, replay_of=delivery_id)

    async def replay_event(self, endpoint_id: str, event_id: str) -> Delivery:
        """Send an event (of the retention period) to this endpoint again, or for the first
        time (one that happened before the endpoint existed, or that it did not ask for)."""
        await self.endpoints.get(endpoint_id)
        async with store_errors():
            raw = await self._redis.get(f"{self._events_prefix}{{{event_id}}}")
        if raw is None:
            raise EventNotFound(f"No event {event_id!r} within the retention period")
        stored = json.loads(raw)
        event = Event(event_id, stored["type"], stored["object_id"], stored["body"])
        return await self._replay(endpoint_id, event, replay_of="")

    async def _replay(self, endpoint_id: str, event: Event, *, replay_of: str) -> Delivery:
        new = await self.deliveries.enqueue(
            endpoint_id, event, delivery=self.deliveries.new_id(), replay_of=replay_of
        )
        self._wake.set()
        return delivery_view(await self.deliveries.get(endpoint_id, new))

    # -- relay: outbox -> deliveries -------------------------------------------------------

    def nudge(self, outbox: str) -> None:
        """A change script just wrote to ``outbox``: relay it soon."""
        if outbox in self._relaying:
            self._again.add(outbox)
            return
        task = asyncio.get_running_loop().create_task(self._relay_soon(outbox))
        self._relaying[outbox] = task

    async def _relay_soon(self, outbox: str) -> None:
        try:
            while True:
                self._again.discard(outbox)
                try:
                    await self.relay(outbox)
                except (StoreUnavailable, RedisError):
                    # The sweep will find the outbox: it is still marked in its index.
                    log.warning("events.relay_failed", extra={"outbox": outbox})
                    return
                if outbox not in self._again:
                    return
        finally:
            self._relaying.pop(outbox, None)

    async def relay(self, outbox: str) -> int:
        """Move an outbox into deliveries, oldest first. Answers how many events it moved."""
        index = self._outbox.index(outbox)
        moved = 0
        while True:
            async with store_errors():
                entries = await self._redis.lrange(outbox, 0, self._config.batch - 1)
            if not entries:
                async with store_errors():
                    await self._pop(keys=[outbox, index], args=["", outbox])
                return moved
            for entry in entries:
                await self._fan_out(str(entry))
                moved += 1
                async with store_errors():
                    left = await self._pop(keys=[outbox, index], args=[entry, outbox])
                if not left:
                    return moved

    async def _fan_out(self, entry: str) -> None:
        event = _event_from_outbox(entry)
        if event is None:
            log.error("events.outbox_entry_unreadable", extra={"entry_bytes": len(entry)})
            return
        async with store_errors():
            # Kept for replays of the event by ID, for as long as deliveries are kept.
            await self._redis.set(
                f"{self._events_prefix}{{{event.id}}}",
                json.dumps({"type": event.type, "object_id": event.object_id, "body": event.body}),
                ex=self.deliveries.retention_s,
            )
        for endpoint in await self.endpoints.all():
            if endpoint.wants(event.type):
                await self.deliveries.enqueue(endpoint.id, event)
        self._wake.set()

    @property
    def sweep_leader(self) -> bool:
        """Whether this worker held the sweep's lease when it last looked."""
        return self._sweep_lease.held

    async def sweep_once(self) -> int:
        """Relay the outboxes a crash left behind (older than the grace period). On a
        Cluster the indexes are one per slot: each sweep looks at an eighth of them, so the
        leader goes round all of them every ``SWEEP_SHARES`` intervals."""
        indexes = self._outbox.all_indexes()
        share = -(-len(indexes) // SWEEP_SHARES)
        start = self._sweep_position % len(indexes)
        chosen = indexes[start : start + share]
        self._sweep_position = (start + share) % len(indexes)
        before = datetime.now(UTC).timestamp() - self._config.sweep_grace_s
        async with store_errors(), self._redis.pipeline(transaction=False) as pipe:
            for key in chosen:
                pipe.zrangebyscore(key, "-inf", before, start=0, num=self._config.batch)
            found = await pipe.execute()
        relayed = 0
        for outboxes in found:
            for outbox in outboxes:
                relayed += await self.relay(str(outbox))
        return relayed

    async def sweep_all(self) -> int:
        """Every index once (tests, and an operator's tool)."""
        relayed = 0
        for _ in range(SWEEP_SHARES):
            relayed += await self.sweep_once()
        return relayed

    # -- delivery: due heads -> stream -> HTTP ---------------------------------------------

    async def ensure_group(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: made by another worker
            await self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)

    async def schedule_once(self) -> int:
        """Hand every endpoint's due deliveries to the stream."""
        handed = 0
        for endpoint_id in await self.endpoints.ids():
            due = await self.deliveries.claim_due(
                endpoint_id, lease_s=self._config.claim_idle_s, limit=self._config.batch
            )
            for delivery in due:
                await self._hand_over(endpoint_id, delivery)
                handed += 1
        return handed

    async def _hand_over(self, endpoint_id: str, delivery: str) -> None:
        async with store_errors():
            await self._redis.xadd(self._stream, {"endpoint": endpoint_id, "delivery": delivery})
        self._handed_over.set()

    async def consume_once(self, *, block_ms: int = 0) -> int:
        """Deliver what the stream has for us: entries idle too long in a dead worker's
        hands first, then new ones."""
        async with store_errors():
            claimed = await self._redis.xautoclaim(
                self._stream,
                GROUP,
                self.consumer,
                min_idle_time=int(self._config.claim_idle_s * 1000),
                start_id="0-0",
                count=self._config.batch,
            )
            entries: list[tuple[str, dict[str, str]]] = _claimed_entries(claimed)
            if not entries:
                read: Any = await self._redis.xreadgroup(
                    GROUP,
                    self.consumer,
                    {self._stream: ">"},
                    count=self._config.batch,
                    block=block_ms or None,
                )
                entries = [entry for _stream, items in read or [] for entry in items]
        for entry_id, fields in entries:
            try:
                await self._deliver(str(entry_id), fields)
            except StoreUnavailable:
                raise  # Redis is away: the rest of the batch waits for it too
            except Exception:
                # One entry that fails is claimed again later; the others go on now.
                log.exception("events.delivery_error", extra={"entry": str(entry_id)})
        return len(entries)

    async def _deliver(self, entry_id: str, fields: dict[str, str]) -> None:
        endpoint_id, delivery = fields.get("endpoint", ""), fields.get("delivery", "")
        if endpoint_id and delivery:
            await self.attempt(endpoint_id, delivery)
        async with store_errors(), self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._stream, GROUP, entry_id)
            pipe.xdel(self._stream, entry_id)
            await pipe.execute()

    async def attempt(self, endpoint_id: str, delivery: str) -> BeginOutcome:
        """One attempt of one delivery, if it is its turn and no one else is at it."""
        begun = await self.deliveries.begin(
            endpoint_id, delivery, lease_s=self._config.claim_idle_s
        )
        if begun.outcome is not BeginOutcome.GO:
            return begun.outcome
        record, endpoint_fields = begun.delivery, begun.endpoint
        endpoint = endpoint_from_fields(endpoint_fields)
        now = datetime.now(UTC)
        try:
            secrets = self.endpoints.signing_secrets(endpoint_fields, now=now)
        except (SecretsKeyMissing, SecretsUndecryptable) as error:
            # Never sent unsigned: a failed attempt of this endpoint's, retried on its
            # schedule (the right key may be deployed meanwhile), that holds up no other.
            attempt = Attempt(now.replace(microsecond=0), None, 0.0, "", error.code)
        else:
            attempt = await self._sender.send(
                endpoint.url, record["event_id"], record["body"], secrets
            )
        attempts = int(record.get("attempts", "0")) + 1
        schedule = self._config.retry_schedule_s
        outcome: DeliveryStatus | None
        next_at = None
        if attempt.succeeded:
            outcome = DeliveryStatus.SUCCEEDED
        elif attempts > len(schedule) or endpoint.status is EndpointStatus.FAILING:
            outcome = DeliveryStatus.FAILED
        else:
            outcome = None
            next_at = now + timedelta(seconds=schedule[attempts - 1])
        following = await self.deliveries.finish(record, attempt, outcome=outcome, next_at=next_at)
        # succeeded, retry (failed, to be tried again) or failed (given up)
        WEBHOOK_DELIVERIES.labels(str(outcome or "retry")).inc()
        log.info(
            "events.delivery_attempt",
            extra={
                "endpoint_id": endpoint_id,
                "delivery_id": delivery,
                "event_type": record["event_type"],
                "status_code": attempt.status_code,
                "error": attempt.error,
                "outcome": str(outcome or "retry"),
                "attempt": attempts,
            },
        )
        if outcome is DeliveryStatus.FAILED:
            log.warning("events.delivery_given_up", extra={"endpoint_id": endpoint_id})
        if following:
            self._wake.set()
        return BeginOutcome.GO

    # -- the worker ------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._forever(self._consume_step, "consume")),
            loop.create_task(self._forever(self._schedule_step, "schedule")),
            loop.create_task(self._forever(self._sweep_step, "sweep")),
        ]

    async def _consume_step(self) -> None:
        # No server-side BLOCK, and a look at the flag before waiting: redis-py may swallow
        # the cancel of a stopping worker inside a command (a blocked read waits out its
        # block), which would hold every app's shutdown for a poll interval.
        self._handed_over.clear()
        if not await self.consume_once() and not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._handed_over.wait(), self._config.poll_interval_s)

    async def _schedule_step(self) -> None:
        await self.schedule_once()
        if self._stopping:  # a cancel redis-py swallowed: do not wait a poll for nothing
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._config.poll_interval_s)
        self._wake.clear()

    async def _sweep_step(self) -> None:
        # Only the lease's holder sweeps (renewing it each time); the others look again
        # every interval, and take the lease once a dead holder's has lapsed.
        was_leader = self._sweep_lease.held
        leading = await self._sweep_lease.hold()
        if leading != was_leader:
            log.info(
                "events.sweep_lead_taken" if leading else "events.sweep_lead_lost",
                extra={"worker": self.consumer},
            )
        if leading and not self._stopping:  # the flag: a cancel redis-py may have swallowed
            await self.sweep_once()
            self.sweeps += 1
        if not self._stopping:
            await asyncio.sleep(self._config.sweep_interval_s)

    async def _forever(self, step: Any, name: str) -> None:
        group_ready = False
        # A cancel that lands inside a Redis call may come out of the client as a connection
        # error: the flag ends the loop all the same.
        while not self._stopping:
            try:
                if not group_ready:
                    await self.ensure_group()
                    group_ready = True
                await step()
            except asyncio.CancelledError:
                raise
            except (StoreUnavailable, RedisError):
                if self._stopping:  # the cancel of aclose, come out as a connection error
                    return
                log.warning("events.worker_redis_unavailable", extra={"step": name})
                await asyncio.sleep(self._config.poll_interval_s)
            except Exception:
                if self._stopping:
                    return
                log.exception("events.worker_step_failed", extra={"step": name})
                await asyncio.sleep(self._config.poll_interval_s)

    async def aclose(self) -> None:
        """Stop the worker. An attempt cut short stays pending in the group, for another
        worker (or this one's successor) to take over: at least once."""
        self._stopping = True
        tasks = [*self._tasks, *self._relaying.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            if pending:
                log.warning("events.worker_stop_slow", extra={"tasks": len(pending)})
        self._tasks = []
        if self._sweep_lease.held:
            # Let go, so that another worker sweeps at its next look, not after the lease.
            with contextlib.suppress(ServiceError):  # Redis away: the lease lapses by itself
                await self._sweep_lease.release()


def _claimed_entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """XAUTOCLAIM's entries; ones deleted meanwhile come back without fields, and go."""
    if not reply or len(reply) < 2:
        return []
    return [(entry_id, fields) for entry_id, fields in reply[1] if fields]


def _event_from_outbox(entry: str) -> Event | None:
    """The Standard Webhooks body of an outbox entry: {"type", "timestamp", "data"}, data
    the object as the API shows it, after the change."""
    try:
        raw = json.loads(entry)
        event_type = str(raw["type"])
        data: dict[str, Any]
        if "payment" in raw:
            data = payment_response(payment_from_fields(raw["payment"])).model_dump(mode="json")
        else:
            data = refund_view(RefundRecord.model_validate(raw["refund"])).model_dump(
                mode="json", exclude={"history"}
            )
        body = {"type": event_type, "timestamp": raw["at"], "data": data}
        return Event(
            id=str(raw["id"]),
            type=event_type,
            object_id=str(raw["object_id"]),
            body=json.dumps(body, separators=(",", ":")),
        )
    except (ValueError, KeyError, TypeError):
        return None


__all__ = ["EventType", "EventsConfig", "WebhookEvents"]
