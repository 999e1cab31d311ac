"""Receipt and credit-note PDFs: numbered by the ledger, rendered once, entered in the hash
chain, stored on disk and served from memory when hot.

A document's number is allocated before its first render (it is printed on it) and is kept by
the payment store on the payment (or the refund) from then on: a first render of a numbered
document makes one ledger round trip, its chain entry, after rendering."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.payment import PaymentRecord, PaymentStatus, Plan, RefundRecord
from services import receipt_render
from services.errors import ReceiptStorageUnavailable
from services.metrics import timed_render
from services.receipt_document import (
    ProviderFacts,
    Seller,
    credit_note_context,
    receipt_context,
)
from services.receipt_ledger import LedgerDocument, ReceiptLedger, Series
from services.receipt_signing import SigningMaterial
from services.tax import TaxLines, TaxPolicy, refunded_tax

log = logging.getLogger("payments.receipts")


@dataclass(frozen=True, slots=True)
class Document:
    """A rendered receipt or credit note, as served: its number, bytes and their hash."""

    number: str
    data: bytes
    sha256: str


class _ByteCache:
    """A small LRU of recent documents, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self._items: OrderedDict[str, Document] = OrderedDict()
        self._size = 0
        self._max = max_bytes

    def get(self, key: str) -> Document | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: Document) -> None:
        if len(value.data) > self._max:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= len(old.data)
        self._items[key] = value
        self._size += len(value.data)
        while self._size > self._max:
            _, evicted = self._items.popitem(last=False)
            self._size -= len(evicted.data)


def document_path(directory: Path, doc_id: str) -> Path:
    """Where a receipt (by payment id) or credit note (by refund id) is stored. The IDs are
    validated to [A-Za-z0-9_-], so they are safe file names; a two-level fan-out keeps
    directories small."""
    shard = hashlib.sha256(doc_id.encode()).hexdigest()[:2]
    return directory / shard / f"{doc_id}.pdf"


def new_render_pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: forking a process that runs an event loop and threads is unsafe.
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=receipt_render.init_pool_worker,
    )


@dataclass(frozen=True, slots=True)
class ReceiptConfig:
    """Who sells, how tax and numbers read, where documents are kept and how rendered."""

    seller: Seller
    directory: Path
    tax: TaxPolicy = field(default_factory=TaxPolicy)
    locale: str = "en"
    receipt_number_format: str = "R-{year}-{seq:06d}"
    credit_note_number_format: str = "CN-{year}-{seq:06d}"
    signing: SigningMaterial | None = None
    render_workers: int = 1
    memory_cache_bytes: int = 16 * 1024 * 1024


class ReceiptService:
    """Renders receipts and credit notes in a process pool and stores them under
    ``RECEIPTS_DIR``, each numbered by the ledger and entered in its hash chain.

    A document is rendered once: later downloads come from memory or disk, and the ledger
    keeps its number. Concurrent first requests for one document in a process share one
    render; across processes the atomic rename and the deterministic output make a duplicate
    render harmless (same bytes, and the chain enters the same bytes once).
    """

    def __init__(
        self,
        config: ReceiptConfig,
        ledger: ReceiptLedger,
        *,
        executor: ProcessPoolExecutor | None = None,
    ) -> None:
        self._config = config
        self._ledger = ledger
        self._directory = config.directory
        self._workers = config.render_workers
        # An executor handed in (one shared pool for many apps, as in the tests) is not ours
        # to shut down.
        self._pool: ProcessPoolExecutor | None = executor
        self._owns_pool = executor is None
        self._inflight: dict[str, asyncio.Future[Document]] = {}
        self._cache = _ByteCache(config.memory_cache_bytes)

    @property
    def config(self) -> ReceiptConfig:
        return self._config

    @property
    def ledger(self) -> ReceiptLedger:
        return self._ledger

    @property
    def signed(self) -> bool:
        return self._config.signing is not None

    # -- pool ------------------------------------------------------------------------------

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._owns_pool = True
            self._pool = new_render_pool(self._workers)
        return self._pool

    async def warm_up(self) -> None:
        """Start the render workers ahead of the first receipt, each rendering a throwaway
        one (the configured seller, tax and locale; nothing numbered, written or chained)."""
        loop = asyncio.get_running_loop()
        pool = self._executor()
        context, signing = self._warm_up_context(), self._config.signing
        await asyncio.gather(
            *(
                loop.run_in_executor(pool, receipt_render.warm_up, context, signing)
                for _ in range(self._workers)
            )
        )

    def _warm_up_context(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        plan = Plan(code="warm-up", name="Warm-up", amount=1000, currency="EUR")
        record = PaymentRecord(
            payment_id="warm-up",
            provider="warm-up",
            reference="warm-up",
            plan=plan.code,
            amount=plan.amount,
            currency=plan.currency,
            status=PaymentStatus.SUCCEEDED,
            created_at=now,
            updated_at=now,
            paid_at=now,
            test_mode=True,
        )
        return receipt_context(
            record,
            plan,
            number="WARM-UP",
            tax=self.tax_lines(record, plan),
            seller=self._config.seller,
            provider=ProviderFacts(display_name="Warm-up"),
            locale=self._config.locale,
        )

    def close(self) -> None:
        if self._pool is not None and self._owns_pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # -- documents -------------------------------------------------------------------------

    def _storage_error(self, error: OSError) -> ReceiptStorageUnavailable:
        log.error(
            "receipt.storage_failed",
            extra={"directory": str(self._directory), "error": type(error).__name__},
        )
        return ReceiptStorageUnavailable(
            f"Receipts cannot be stored now ({type(error).__name__}); retry later"
        )

    async def storage_problem(self) -> str | None:
        """Why RECEIPTS_DIR cannot take a PDF now, or None: a file is written there and
        removed, as a render would (for /ready and /admin/health)."""

        def probe() -> None:
            self._directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self._directory, prefix=".ready-"):
                pass

        try:
            await asyncio.to_thread(probe)
        except OSError as error:
            return f"RECEIPTS_DIR {self._directory} cannot be written: {type(error).__name__}"
        return None

    def path_for(self, doc_id: str) -> Path:
        return document_path(self._directory, doc_id)

    def tax_lines(self, record: PaymentRecord, plan: Plan) -> TaxLines:
        return self._config.tax.lines(record, plan)

    def in_memory(self, doc_id: str) -> Document | None:
        """The document if this process holds it, else None (no I/O)."""
        return self._cache.get(doc_id)

    async def receipt_number(self, record: PaymentRecord) -> str:
        """The payment's receipt number: the one the ledger gave it, or the next of the year it
        was paid in, allocated now. One round trip."""
        paid_at = record.paid_at or record.updated_at
        document = await self._ledger.number(
            record.payment_id,
            series=Series.RECEIPT,
            year=paid_at.year,
            template=self._config.receipt_number_format,
            kind="receipt",
        )
        return document.number

    async def credit_note_number(self, refund: RefundRecord) -> str:
        """The refund's credit-note number, as ``receipt_number`` for a payment."""
        document = await self._ledger.number(
            refund.refund_id,
            series=Series.CREDIT_NOTE,
            year=refund.updated_at.year,
            template=self._config.credit_note_number_format,
            kind="credit_note",
        )
        return document.number

    async def receipt(self, record: PaymentRecord, plan: Plan, provider: ProviderFacts) -> Document:
        """The payment's receipt: from memory, from disk, or rendered now under the number the
        record carries (allocated now when it carries none)."""
        config = self._config
        number = record.receipt_number or await self.receipt_number(record)

        def context() -> dict[str, Any]:
            return receipt_context(
                record,
                plan,
                number=number,
                tax=self.tax_lines(record, plan),
                seller=config.seller,
                provider=provider,
                locale=config.locale,
            )

        return await self._document(
            record.payment_id, kind="receipt", number=number, context=context
        )

    async def credit_note(
        self,
        record: PaymentRecord,
        plan: Plan,
        refund: RefundRecord,
        *,
        refunded_before: int,
        provider: ProviderFacts,
    ) -> Document:
        """The credit note for one succeeded refund: it names the receipt it corrects and the
        tax that went back. Numbers as for ``receipt``: the records' own, else allocated now."""
        config = self._config
        receipt_number = record.receipt_number or await self.receipt_number(record)
        number = refund.credit_note_number or await self.credit_note_number(refund)

        def context() -> dict[str, Any]:
            return credit_note_context(
                record,
                plan,
                refund,
                number=number,
                receipt_number=receipt_number,
                tax=refunded_tax(self.tax_lines(record, plan), refunded_before, refund.amount),
                seller=config.seller,
                provider=provider,
                locale=config.locale,
            )

        return await self._document(
            refund.refund_id, kind="credit_note", number=number, context=context
        )

    async def _document(
        self, doc_id: str, *, kind: str, number: str, context: Callable[[], dict[str, Any]]
    ) -> Document:
        cached = self._cache.get(doc_id)
        if cached is not None:
            return cached
        pending = self._inflight.get(doc_id)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Document] = loop.create_future()
        self._inflight[doc_id] = future
        try:
            entry = LedgerDocument(doc_id=doc_id, kind=kind, number=number)
            document = await self._load_or_render(entry, context)
            self._cache.put(doc_id, document)
            future.set_result(document)
            return document
        except BaseException as error:
            future.set_exception(error)
            # Mark the exception retrieved when nobody else was waiting on it.
            future.exception()
            raise
        finally:
            del self._inflight[doc_id]

    async def _stored(self, path: Path) -> bytes | None:
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._storage_error(error) from error

    async def _load_or_render(
        self, entry: LedgerDocument, context: Callable[[], dict[str, Any]]
    ) -> Document:
        path = self.path_for(entry.doc_id)
        data = await self._stored(path)
        if data is not None:
            digest = hashlib.sha256(data).hexdigest()
            # Rendered before (by another process, before a restart): are these the bytes the
            # chain holds? Not a first render, so the ledger is asked.
            held = await self._ledger.document(entry.doc_id)
            chained = held.sha256 if held is not None else None
            if chained is None or digest == chained:
                if chained is None:  # rendered, but the chain never heard of it
                    await self._ledger.record(entry, digest, at=datetime.now(UTC))
                return Document(entry.number, data, digest)
            # Not the bytes the chain holds: keep them as evidence, never serve them, and
            # render the document again as a new version.
            log.error(
                "receipt.tampered",
                extra={"doc_id": entry.doc_id, "number": entry.number, "sha256": digest},
            )
            await asyncio.to_thread(
                os.replace, path, path.with_name(f"{path.name}.tampered-{digest[:12]}")
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with timed_render():
                data = await loop.run_in_executor(
                    self._executor(),
                    receipt_render.render_to_file,
                    context(),
                    str(path),
                    self._config.signing,
                )
        except OSError as error:  # the PDF could not be written where it belongs
            raise self._storage_error(error) from error
        digest = hashlib.sha256(data).hexdigest()
        # The first render's one ledger round trip (the number came with the record): the
        # bytes enter the chain, as a new version if they differ from the last ones entered.
        recorded = await self._ledger.record(entry, digest, at=datetime.now(UTC))
        log.info(
            "receipt.rendered",
            extra={
                "payment_id": entry.doc_id,
                "kind": entry.kind,
                "number": entry.number,
                "version": recorded.version,
                "bytes": len(data),
                "ms": round((loop.time() - started) * 1000, 1),
            },
        )
        return Document(entry.number, data, digest)
