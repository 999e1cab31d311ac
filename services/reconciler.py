"""Reconciliation: payments left open, with refunds still pending, or after an operation whose
outcome is unknown, are verified again with the provider on a growing schedule, so that a
lost webhook or a crashed request never leaves a payment wrong for long.

Every worker runs a ``Reconciler``; only the one holding the leader lock (a Redis key with a
short expiry that its holder keeps renewing: services/leader_lease.py) does the work, so the
providers see one verification per payment and step, however many workers there are. Due
payments are leased, not removed, while they are checked: a leader that dies mid-batch leaves
them to its successor.
A batch of slow provider calls can outlast the lock's lease, so the leader keeps renewing it
while a batch runs; if it finds the lock held by another worker all the same, it stops after
the payment in hand and leaves the rest leased, for whoever leads once their lease is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from services.errors import ServiceError
from services.leader_lease import LeaderLease
from services.payment_store import OPEN_STATUSES, RedisClient, store_errors

if TYPE_CHECKING:
    from services.payment_state import PaymentStateService
    from services.payment_store import PaymentStore
    from services.subscription_state import SubscriptionStateService

log = logging.getLogger("payments.reconcile")


@dataclass(slots=True)
class ReconcileRun:
    """What one pass did; also logged as ``reconcile.run``."""

    leader: bool
    checked: int = 0
    changed: int = 0
    settled: int = 0
    gave_up: int = 0
    errors: int = 0
    payments: dict[str, str] = field(default_factory=dict)
    # Another worker took the leader lock mid-batch: the payments left were not checked.
    lost_lead: bool = False


class Reconciler:
    def __init__(
        self,
        service: PaymentStateService,
        store: PaymentStore,
        redis: RedisClient,
        *,
        schedule_s: list[float],
        interval_s: float,
        batch: int,
        lease_s: float | None = None,
        subscriptions: SubscriptionStateService | None = None,
    ) -> None:
        self._service = service
        # Subscriptions share the queue (by their sub_ ids) and are read again by it.
        self._subscriptions = subscriptions
        self._store = store
        self._redis = redis
        self._schedule = schedule_s
        self._interval_s = interval_s
        self._batch = batch
        # The lock outlives a few missed ticks, not a dead worker: another takes over soon.
        self._lease_s = lease_s or max(interval_s * 3, 2.0)
        self._lease = LeaderLease(redis, store.reconcile_leader_key, lease_s=self._lease_s)
        self._token = self._lease.token
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def worker_id(self) -> str:
        return self._token

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="reconciler")

    async def aclose(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=2.0)
        with contextlib.suppress(ServiceError):  # Redis away: the lock expires by itself
            await self._lease.release()

    async def _loop(self) -> None:
        while not self._closing:
            try:
                await self.run_once()
            except ServiceError:
                pass  # Redis away: try again next tick
            except Exception:
                log.exception("reconcile.failed")
            if self._closing:
                # aclose's cancel can land inside a Redis call and come out of redis-py as a
                # connection error, caught above: stop now rather than sleep a tick first.
                return
            await asyncio.sleep(self._interval_s)

    async def is_leader(self) -> bool:
        """Take or renew the leader lock; True while this worker holds it."""
        return await self._lease.hold()

    async def run_once(self) -> ReconcileRun:
        """One pass: if this worker leads, verify every payment that is due."""
        if not await self.is_leader():
            return ReconcileRun(leader=False)
        run = ReconcileRun(leader=True)
        started = time.perf_counter()
        # A lease long enough for the batch's provider calls, each bounded by its deadline.
        lease_s = max(self._interval_s * 4, 60.0)
        due = await self._store.claim_due_reconciles(lease_s=lease_s, limit=self._batch)
        if not due:
            return run
        async with self._keeping_lead() as lost:
            for index, (payment_id, step) in enumerate(due):
                if lost.is_set():
                    run.lost_lead = True
                    log.warning("reconcile.lost_lead", extra={"left": len(due) - index})
                    break
                await self._reconcile(payment_id, step, run)
        await self._record(run, time.perf_counter() - started)
        return run

    @contextlib.asynccontextmanager
    async def _keeping_lead(self) -> AsyncIterator[asyncio.Event]:
        """Renew the leader lock in the background while a batch runs: a batch of provider
        calls, each allowed up to the provider deadline, can outlast the lease. The event is
        set once a renewal finds the lock held by another worker."""
        lost, done = asyncio.Event(), asyncio.Event()

        async def renew() -> None:
            while True:
                try:
                    await asyncio.wait_for(done.wait(), timeout=self._lease_s / 3)
                    return  # the batch is over
                except TimeoutError:
                    pass  # time to renew
                try:
                    if not await self.is_leader():
                        lost.set()
                        return
                except ServiceError:
                    pass  # Redis away: try again at the next tick

        # Stopped by an event, not by a cancel: redis-py (8.2) swallows a cancel that lands
        # while a call connects, and the task would renew on.
        renewing = asyncio.create_task(renew(), name="reconciler-lead")
        try:
            yield lost
        finally:
            done.set()
            await renewing

    async def _reconcile(self, payment_id: str, step: int, run: ReconcileRun) -> None:
        if self._subscriptions is not None and self._subscriptions.follows(payment_id):
            await self._follow_subscription(payment_id, step, run)
            return
        run.checked += 1
        try:
            before = await self._store.get(payment_id)
            if before is None:
                await self._store.finish_reconcile(payment_id)
                return
            after = await self._service.reconcile_payment(before)
        except ServiceError as error:
            # The provider (or Redis) is away: same step again after the first delay.
            run.errors += 1
            run.payments[payment_id] = f"error:{error.code}"
            log.warning(
                "reconcile.error",
                extra={"payment_id": payment_id, "code": error.code, "step": step},
            )
            await self._store.schedule_reconcile(
                payment_id, after_s=self._schedule[0], step=step, sooner_only=False
            )
            return
        if after.status != before.status:
            run.changed += 1
            log.info(
                "reconcile.changed",
                extra={
                    "payment_id": payment_id,
                    "from": str(before.status),
                    "to": str(after.status),
                },
            )
        run.payments[payment_id] = str(after.status)
        if after.status not in OPEN_STATUSES and after.amount_pending_refund <= 0:
            run.settled += 1
            await self._store.finish_reconcile(payment_id)
        elif step + 1 < len(self._schedule):
            await self._store.schedule_reconcile(
                payment_id, after_s=self._schedule[step + 1], step=step + 1, sooner_only=False
            )
        else:
            run.gave_up += 1
            log.warning(
                "reconcile.gave_up",
                extra={"payment_id": payment_id, "status": str(after.status), "steps": step + 1},
            )
            await self._store.finish_reconcile(payment_id)

    async def _follow_subscription(
        self, subscription_id: str, step: int, run: ReconcileRun
    ) -> None:
        assert self._subscriptions is not None
        run.checked += 1
        try:
            status, then = await self._subscriptions.reconcile(
                subscription_id, step, self._schedule
            )
        except ServiceError as error:
            run.errors += 1
            run.payments[subscription_id] = f"error:{error.code}"
            log.warning(
                "reconcile.error",
                extra={"subscription_id": subscription_id, "code": error.code, "step": step},
            )
            await self._store.schedule_reconcile(
                subscription_id, after_s=self._schedule[0], step=step, sooner_only=False
            )
            return
        run.payments[subscription_id] = status
        if then is None:
            run.settled += 1
            await self._store.finish_reconcile(subscription_id)
        else:
            after_s, next_step = then
            await self._store.schedule_reconcile(
                subscription_id, after_s=after_s, step=next_step, sooner_only=False
            )

    async def _record(self, run: ReconcileRun, elapsed_s: float) -> None:
        stats = self._store.reconcile_stats_key
        async with store_errors(), self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(stats, "runs", 1)
            for name in ("checked", "changed", "settled", "gave_up", "errors"):
                pipe.hincrby(stats, name, getattr(run, name))
            pipe.hset(
                stats,
                mapping={
                    "last_run_at": datetime.now(UTC).isoformat(),
                    "last_run_ms": str(round(elapsed_s * 1000, 1)),
                    "last_leader": self._token,
                },
            )
            await pipe.execute()
        log.info(
            "reconcile.run",
            extra={
                "checked": run.checked,
                "changed": run.changed,
                "settled": run.settled,
                "gave_up": run.gave_up,
                "errors": run.errors,
                "ms": round(elapsed_s * 1000, 1),
            },
        )

    async def stats(self) -> dict[str, object]:
        """Totals since the stats were last cleared, the queue, and who leads now."""
        async with store_errors():
            raw = await self._redis.hgetall(self._store.reconcile_stats_key)
            leader = await self._redis.get(self._store.reconcile_leader_key)
        queued, due = await self._store.reconcile_queue_size()
        totals = {
            name: int(raw.get(name, 0))
            for name in ("runs", "checked", "changed", "settled", "gave_up", "errors")
        }
        return {
            **totals,
            "queued": queued,
            "due": due,
            "schedule_seconds": self._schedule,
            "last_run_at": raw.get("last_run_at"),
            "last_run_ms": float(raw["last_run_ms"]) if "last_run_ms" in raw else None,
            "leader": leader,
            "this_worker": self._token,
        }
