"""Receipt rendering, in this process: the service's ReceiptService with its process pool
against WeasyPrint called bare (the tuned way: one FontConfiguration and pre-parsed CSS, which
is what ``receipt_render.init_worker``/``render_pdf`` do).

Every receipt is for a fresh payment record, so nothing comes from a cache. As in the service,
each payment's receipt number is allocated when it is paid, before (and outside) the render
that is timed: a first render then goes to the ledger once, for its chain entry.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from app.main import receipt_config
from app.settings import Settings
from models.payment import PaymentRecord, PaymentStatus, Plan
from services import receipt_render
from services.payment_store import redis_client
from services.receipt_document import ProviderFacts, receipt_context
from services.receipt_ledger import ReceiptLedger
from services.receipt_service import ReceiptService, new_render_pool

from .procs import read_memory_kb

PLAN = Plan(code="pro", name="Pro", amount=2900, currency="EUR")
PROVIDER = ProviderFacts(display_name="Sandbox")


@dataclass(frozen=True)
class RenderConfig:
    first_render_samples: int  # sequential first renders, service and bare, interleaved
    rss_early: int  # RSS read after this many renders ...
    rss_late: int  # ... and after this many
    throughput_receipts: int  # receipts in flight at once, per pool size
    throughput_rounds: int  # 1-process and 2-process pools alternate this many times


@dataclass
class RenderFigures:
    bare_ms: list[float] = field(default_factory=list)
    service_ms: list[float] = field(default_factory=list)
    cold_bare_ms: float = 0.0
    cold_service_ms: float = 0.0
    rss_early: dict[str, int] = field(default_factory=dict)  # VmHWM, VmRSS in kB
    rss_mid: dict[str, int] = field(default_factory=dict)
    rss_late: dict[str, int] = field(default_factory=dict)
    rss_counts: tuple[int, int, int] = (0, 0, 0)  # renders done at each reading
    throughput: dict[int, tuple[int, float]] = field(default_factory=dict)  # procs: (n, s)
    calibration: dict[int, tuple[int, float]] = field(default_factory=dict)  # procs: (n, s)
    pdf_bytes: int = 0

    def receipts_per_s(self, processes: int) -> float:
        done, seconds = self.throughput.get(processes, (0, 0.0))
        return done / seconds if seconds else 0.0

    def spins_per_s(self, processes: int) -> float:
        done, seconds = self.calibration.get(processes, (0, 0.0))
        return done / seconds if seconds else 0.0


def spin(iterations: int) -> int:
    """Pure-Python CPU work (no I/O, no shared state): what the machine gives 1 or 2 processes."""
    total = 0
    for value in range(iterations):
        total += value * value
    return total


def _spin_iterations(target_ms: float = 50.0) -> int:
    iterations = 100_000
    started = time.perf_counter()
    spin(iterations)
    elapsed_ms = (time.perf_counter() - started) * 1000
    return max(10_000, int(iterations * target_ms / max(elapsed_ms, 0.001)))


def _add(table: dict[int, tuple[int, float]], processes: int, done: int, seconds: float) -> None:
    count, total = table.get(processes, (0, 0.0))
    table[processes] = (count + done, total + seconds)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _record(created: datetime) -> PaymentRecord:
    payment_id = f"sb_{secrets.token_hex(12)}"
    return PaymentRecord(
        payment_id=payment_id,
        provider="sandbox",
        reference=f"ord_{secrets.token_hex(12)}",
        plan=PLAN.code,
        amount=PLAN.amount,
        currency=PLAN.currency,
        status=PaymentStatus.SUCCEEDED,
        owner="bench-user",
        customer_email="customer@example.com",
        payment_method="sandbox",
        created_at=created,
        updated_at=created,
        paid_at=created,
    )


def _pool_pids(pool: ProcessPoolExecutor) -> list[int]:
    # ProcessPoolExecutor keeps its worker processes here (CPython 3.8+).
    processes: dict[int, Any] = getattr(pool, "_processes", None) or {}
    return sorted(processes)


def _memory(pids: list[int]) -> dict[str, int]:
    """The largest VmHWM and VmRSS among ``pids`` (kB)."""
    readings = [read_memory_kb(pid) for pid in pids]
    return {"VmHWM": max(r[0] for r in readings), "VmRSS": max(r[1] for r in readings)}


class _Receipts:
    """One ReceiptService over a pool of ``processes`` render processes."""

    def __init__(self, settings: Settings, processes: int, directory: Path, redis_url: str) -> None:
        self.pool = new_render_pool(processes)
        # The service's own client (its pool waits for a free connection under load).
        self.redis = redis_client(
            redis_url, cluster=False, timeout_s=settings.redis_timeout_seconds
        )
        self.service = ReceiptService(
            replace(receipt_config(settings), directory=directory, render_workers=processes),
            ReceiptLedger(self.redis, prefix=f"bench:{processes}:"),
            executor=self.pool,
        )

    async def start(self, warm_renders: int) -> None:
        await self.service.warm_up()
        if warm_renders:
            await self.render_all(await self.paid(warm_renders))

    async def paid(self, count: int) -> list[PaymentRecord]:
        """Fresh payments as they are once paid: each with its receipt number, allocated in
        the ledger as the service does when a payment succeeds (where it is then kept on the
        payment, which every later read of it brings along)."""
        records = [_record(datetime.now(UTC)) for _ in range(count)]
        numbers = await asyncio.gather(*(self.service.receipt_number(r) for r in records))
        return [
            record.model_copy(update={"receipt_number": number})
            for record, number in zip(records, numbers, strict=True)
        ]

    async def render(self, record: PaymentRecord) -> bytes:
        """A paid payment's first render: rendered, written, entered in the chain."""
        document = await self.service.receipt(record, PLAN, PROVIDER)
        return document.data

    async def render_all(self, records: list[PaymentRecord]) -> list[bytes]:
        return await asyncio.gather(*(self.render(record) for record in records))

    def context(self) -> dict[str, Any]:
        """The template context the service builds for a fresh receipt (same HTML)."""
        record = _record(datetime.now(UTC))
        config = self.service.config
        return receipt_context(
            record,
            PLAN,
            number="R-2026-000001",
            tax=config.tax.lines(record, PLAN),
            seller=config.seller,
            provider=PROVIDER,
            locale=config.locale,
        )

    def close(self) -> None:
        self.service.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def aclose(self) -> None:
        await self.redis.aclose()


def _timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000


async def _timed_async(coroutine: Any) -> float:
    started = time.perf_counter()
    await coroutine
    return (time.perf_counter() - started) * 1000


async def run_render_bench(
    settings: Settings,
    config: RenderConfig,
    workdir: Path,
    log: Callable[[str], None],
    redis_url: str,
) -> RenderFigures:
    """``redis_url``: where the receipts' ledger (numbers, hash chain) lives, as in the
    service: each payment is numbered untimed, as when it is paid, and each of the service's
    first renders includes its one ledger round trip (the chain entry)."""
    figures = RenderFigures()
    one = _Receipts(settings, 1, workdir / "receipts-1", redis_url)
    try:
        # What RECEIPT_WARM_UP does (start the process, import, build fonts and CSS), and
        # the same for the bare renderer here.
        await one.start(warm_renders=0)
        receipt_render.init_worker()
        context = one.context
        [first] = await one.paid(1)
        figures.cold_service_ms = await _timed_async(one.render(first))
        figures.cold_bare_ms = _timed(lambda: receipt_render.render_pdf(context()))
        rendered = 1
        for record in await one.paid(2):  # both sides warm before the samples
            await one.render(record)
            receipt_render.render_pdf(context())
            rendered += 1

        early = 0
        log(f"first render: {config.first_render_samples} x (service, bare), interleaved")
        samples = await one.paid(config.first_render_samples)
        for index, record in enumerate(samples):
            ctx = context()
            bare = partial(receipt_render.render_pdf, ctx)
            if index % 2:
                figures.bare_ms.append(_timed(bare))
                figures.service_ms.append(await _timed_async(one.render(record)))
            else:
                figures.service_ms.append(await _timed_async(one.render(record)))
                figures.bare_ms.append(_timed(bare))
            rendered += 1
            if rendered == config.rss_early:
                figures.rss_early = _memory(_pool_pids(one.pool))
                early = rendered
        while rendered < config.rss_early:
            [record] = await one.paid(1)
            await one.render(record)
            rendered += 1
        if not figures.rss_early:
            figures.rss_early = _memory(_pool_pids(one.pool))
            early = rendered

        log(f"render process memory: rendering up to {config.rss_late} receipts")
        in_flight = 4
        halfway = max(early, config.rss_late // 2)
        mid = early
        figures.rss_mid = figures.rss_early
        while rendered < config.rss_late:
            batch = min(in_flight, config.rss_late - rendered)
            sizes = await one.render_all(await one.paid(batch))
            figures.pdf_bytes = len(sizes[-1])
            rendered += batch
            if mid == early and rendered >= halfway:
                figures.rss_mid = _memory(_pool_pids(one.pool))
                mid = rendered
        figures.rss_late = _memory(_pool_pids(one.pool))
        figures.rss_counts = (early, mid, rendered)

        two = _Receipts(settings, 2, workdir / "receipts-2", redis_url)
        spinners = {n: new_render_pool(n) for n in (1, 2)}
        try:
            await two.start(warm_renders=4)
            loop = asyncio.get_running_loop()
            iterations = _spin_iterations()
            for pool in spinners.values():  # start the processes before timing them
                await asyncio.gather(*(loop.run_in_executor(pool, spin, 1000) for _ in range(4)))
            count = config.throughput_receipts
            for round_ in range(config.throughput_rounds):
                for processes, receipts in ((1, one), (2, two)):
                    log(
                        f"throughput round {round_ + 1}: {count} receipts in flight, "
                        f"{processes} render process(es)"
                    )
                    records = await receipts.paid(count)
                    started = time.perf_counter()
                    await receipts.render_all(records)
                    _add(figures.throughput, processes, count, time.perf_counter() - started)
                for processes, pool in spinners.items():
                    started = time.perf_counter()
                    await asyncio.gather(
                        *(loop.run_in_executor(pool, spin, iterations) for _ in range(count))
                    )
                    _add(figures.calibration, processes, count, time.perf_counter() - started)
        finally:
            two.close()
            await two.aclose()
            for pool in spinners.values():
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        one.close()
        await one.aclose()
    return figures
