"""Receipt PDFs: rendered once per paid payment, stored on disk, served from memory when hot."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from models.payment import PaymentRecord, Plan
from services import receipt_render
from services.money import format_amount

log = logging.getLogger("payments.receipts")

# Labels for the payment-method line; unknown methods print as given.
_METHOD_LABELS = {
    "sandbox": "Sandbox test payment",
    "card": "Card",
    "paypal": "PayPal",
    "link": "Link",
}


@dataclass(frozen=True, slots=True)
class ReceiptInfo:
    payment_id: str
    receipt_number: str
    plan: Plan
    amount_formatted: str
    payment_method: str
    paid_at: datetime


def receipt_number(payment_id: str, paid_at: datetime) -> str:
    """Stable per payment, so re-rendering never changes the number on the paper."""
    digest = hashlib.sha256(payment_id.encode()).hexdigest()[:10].upper()
    return f"R-{paid_at:%Y%m%d}-{digest}"


class _ByteCache:
    """A small LRU of recent PDFs, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._max = max_bytes

    def get(self, key: str) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self._max:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= len(old)
        self._items[key] = value
        self._size += len(value)
        while self._size > self._max:
            _, evicted = self._items.popitem(last=False)
            self._size -= len(evicted)


def new_render_pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: forking a process that runs an event loop and threads is unsafe.
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=receipt_render.init_worker,
    )


@dataclass(frozen=True, slots=True)
class ReceiptConfig:
    """Who sells, where receipts are kept and how they are rendered."""

    merchant_name: str
    merchant_address: str
    merchant_vat_id: str | None
    directory: Path
    render_workers: int = 1
    memory_cache_bytes: int = 16 * 1024 * 1024


class ReceiptService:
    """Renders receipts in a process pool and stores them under ``RECEIPTS_DIR``.

    Concurrent first requests for one receipt in a process share one render. Across
    processes the atomic rename makes a duplicate render harmless: both write the same bytes.
    """

    def __init__(
        self, config: ReceiptConfig, *, executor: ProcessPoolExecutor | None = None
    ) -> None:
        self._config = config
        self._directory = config.directory
        self._workers = config.render_workers
        # An executor handed in (one shared pool for many apps, as in the tests) is not ours
        # to shut down.
        self._pool: ProcessPoolExecutor | None = executor
        self._owns_pool = executor is None
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._cache = _ByteCache(config.memory_cache_bytes)

    # -- pool ------------------------------------------------------------------------------

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._owns_pool = True
            self._pool = new_render_pool(self._workers)
        return self._pool

    async def warm_up(self) -> None:
        """Start the render workers ahead of the first receipt."""
        loop = asyncio.get_running_loop()
        pool = self._executor()
        await asyncio.gather(
            *(loop.run_in_executor(pool, receipt_render.warm_up) for _ in range(self._workers))
        )

    def close(self) -> None:
        if self._pool is not None and self._owns_pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # -- receipts --------------------------------------------------------------------------

    def path_for(self, payment_id: str) -> Path:
        # Payment IDs are validated to [A-Za-z0-9_-], so they are safe file names; a two-level
        # fan-out keeps directories small.
        shard = hashlib.sha256(payment_id.encode()).hexdigest()[:2]
        return self._directory / shard / f"{payment_id}.pdf"

    @staticmethod
    def key_of(record: PaymentRecord) -> str:
        """Which rendering of the receipt ``record`` needs: one per sum of succeeded refunds,
        so that a receipt shows what went back once (and only once) it has."""
        if record.amount_refunded <= 0:
            return record.payment_id
        return f"{record.payment_id}-r{record.amount_refunded}"

    def info(self, record: PaymentRecord, plan: Plan) -> ReceiptInfo:
        paid_at = record.paid_at or record.updated_at
        return ReceiptInfo(
            payment_id=record.payment_id,
            receipt_number=receipt_number(record.payment_id, paid_at),
            plan=plan,
            amount_formatted=format_amount(record.amount, record.currency),
            payment_method=_METHOD_LABELS.get(
                record.payment_method or record.provider, record.payment_method or record.provider
            ),
            paid_at=paid_at,
        )

    def _context(self, info: ReceiptInfo, record: PaymentRecord) -> dict[str, Any]:
        config = self._config
        return {
            "merchant": {
                "name": config.merchant_name,
                "address": config.merchant_address,
                "vat_id": config.merchant_vat_id,
            },
            "receipt_number": info.receipt_number,
            "paid_at": info.paid_at.strftime("%d %B %Y, %H:%M UTC"),
            "plan_name": info.plan.name,
            "plan_code": info.plan.code,
            "amount": info.amount_formatted,
            "currency": record.currency,
            "payment_method": info.payment_method,
            "provider": record.provider,
            "payment_id": record.payment_id,
            "customer_email": record.customer_email,
            # Succeeded refunds only: a pending one has given nothing back yet.
            "refunded": (
                format_amount(record.amount_refunded, record.currency)
                if record.amount_refunded > 0
                else None
            ),
            "net": format_amount(record.amount - record.amount_refunded, record.currency),
        }

    def in_memory(self, payment_id: str) -> bytes | None:
        """The receipt's bytes if this process holds them, else None (no I/O)."""
        return self._cache.get(payment_id)

    async def pdf(self, record: PaymentRecord, plan: Plan) -> bytes:
        """The receipt's bytes: from memory, from disk, or rendered now (once)."""
        key = self.key_of(record)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        path = self.path_for(key)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            data = await self._render_once(record, plan)
        self._cache.put(key, data)
        return data

    async def ensure(self, record: PaymentRecord, plan: Plan) -> None:
        """Make sure the receipt exists on disk (called when a payment succeeds)."""
        key = self.key_of(record)
        if self._cache.get(key) is not None:
            return
        if await asyncio.to_thread(self.path_for(key).exists):
            return
        data = await self._render_once(record, plan)
        self._cache.put(key, data)

    async def _render_once(self, record: PaymentRecord, plan: Plan) -> bytes:
        key = self.key_of(record)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._inflight[key] = future
        try:
            context = self._context(self.info(record, plan), record)
            started = loop.time()
            data = await loop.run_in_executor(
                self._executor(), receipt_render.render_to_file, context, str(self.path_for(key))
            )
            log.info(
                "receipt.rendered",
                extra={
                    "payment_id": key,
                    "bytes": len(data),
                    "ms": round((loop.time() - started) * 1000, 1),
                },
            )
            future.set_result(data)
            return data
        except BaseException as error:
            future.set_exception(error)
            # Mark the exception retrieved when nobody else was waiting on it.
            future.exception()
            raise
        finally:
            del self._inflight[key]
