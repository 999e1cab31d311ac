"""Idempotency-Key handling shared by every state-changing call (create-intent, refunds).

A request with a key first claims it: the claim holds the request's fingerprint and says
"in progress" until the request stores its answer. Same key and body: the stored answer
(or, while the first request still runs, a short wait and then 409). Another body: 422.

The claim lives as long as its request, however long the provider calls take: it is taken
with a short lease that a background task renews while the request runs. A request that dies
stops renewing, so its claim lapses within one lease and a retry can go ahead; a request that
is merely slow keeps its claim, so a retry never starts a second payment or refund beside it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from services.errors import IdempotencyKeyReused, IdempotencyRequestInProgress, StoreUnavailable
from services.payment_store import IdempotencyState, PaymentStore

log = logging.getLogger("payments.idempotency")

WAIT_S = 10.0  # how long a retry waits for the first request before answering 409
POLL_S = 0.05


class IdempotencyClaims:
    def __init__(self, store: PaymentStore, *, lease_s: float = 60.0) -> None:
        self._store = store
        self._lease_ms = max(1, int(lease_s * 1000))

    @staticmethod
    def fingerprint(fields: Mapping[str, object]) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    async def claim(self, scope: str, key: str, fingerprint: str) -> dict[str, Any] | None:
        """Claim ``key`` for this request: None when it is ours to run, the stored answer
        when an earlier request with the same body has answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while True:
            begin = await self._store.idempotency_begin(
                scope, key, fingerprint, pending_ttl_ms=self._lease_ms
            )
            if begin.state is IdempotencyState.NEW:
                return None
            if begin.state is IdempotencyState.MISMATCH:
                raise IdempotencyKeyReused(
                    "This Idempotency-Key was used with a different request body"
                )
            if begin.state is IdempotencyState.DONE and begin.response is not None:
                return begin.response
            if loop.time() >= deadline:
                raise IdempotencyRequestInProgress(headers={"Retry-After": "1"})
            await asyncio.sleep(POLL_S)

    @asynccontextmanager
    async def held(self, scope: str, key: str) -> AsyncIterator[None]:
        """Keep the claim on ``key`` alive while the body runs; give it up if the body
        fails, so that a retry may try again."""
        # Most requests answer well within a third of the lease: a timer, not a task, until
        # renewing is due (a task per request was a measurable part of create-intent's CPU).
        renewing: list[asyncio.Task[None]] = []

        def start_renewing() -> None:
            renewing.append(asyncio.create_task(self._renew(scope, key), name="idempotency-renew"))

        timer = asyncio.get_running_loop().call_later(self._lease_ms / 3000, start_renewing)
        try:
            yield
        except BaseException:
            try:
                await self._store.idempotency_abort(scope, key)
            except StoreUnavailable:
                log.warning("idempotency.abort_failed", extra={"scope": scope})
            raise
        finally:
            timer.cancel()
            for task in renewing:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _renew(self, scope: str, key: str) -> None:
        """Renew now, then every third of the lease, while the claim is still in progress."""
        interval = self._lease_ms / 3000
        while True:
            try:
                if not await self._store.idempotency_renew(scope, key, lease_ms=self._lease_ms):
                    return  # answered already, or lost: nothing left to keep alive
            except StoreUnavailable:
                log.warning("idempotency.renew_failed", extra={"scope": scope})
            await asyncio.sleep(interval)
