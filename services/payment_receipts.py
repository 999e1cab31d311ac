"""Receipts as the API serves them: to the payment's owner or an admin only, for a paid
payment, rendered ahead of the first download when a payment becomes paid."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from models.payment import PaymentRecord, ReceiptResponse
from models.user import User
from services.access import owned_by
from services.catalogue import Catalogue
from services.errors import ReceiptNotAvailable
from services.payment_store import PaymentStore
from services.receipt_service import ReceiptService
from services.views import API_PREFIX

if TYPE_CHECKING:
    from services.payment_providers.factory import PaymentProviderFactory

log = logging.getLogger("payments.receipts")


class PaymentReceipts:
    def __init__(
        self,
        store: PaymentStore,
        providers: Callable[[], PaymentProviderFactory],
        catalogue: Catalogue,
        renderer: ReceiptService,
    ) -> None:
        self._store = store
        self._providers = providers
        self._catalogue = catalogue
        self.renderer = renderer
        self._background: set[asyncio.Task[None]] = set()

    async def _owned(self, payment_id: str, user: User) -> PaymentRecord:
        self._providers().for_payment_id(payment_id)
        return owned_by(await self._store.get(payment_id), payment_id, user)

    async def _receipt_record(self, payment_id: str, user: User) -> PaymentRecord:
        record = await self._owned(payment_id, user)
        if not record.status.is_paid:
            raise ReceiptNotAvailable(f"A {record.status} payment has no receipt")
        return record

    async def receipt(self, payment_id: str, user: User) -> ReceiptResponse:
        record = await self._receipt_record(payment_id, user)
        info = self.renderer.info(record, self._catalogue.plan_of(record))
        return ReceiptResponse(
            payment_id=record.payment_id,
            receipt_number=info.receipt_number,
            plan=record.plan,
            plan_name=info.plan.name,
            amount=record.amount,
            currency=record.currency,
            amount_formatted=info.amount_formatted,
            payment_method=info.payment_method,
            status=record.status,
            paid_at=info.paid_at,
            pdf_url=f"{API_PREFIX}/receipt/{record.payment_id}/pdf",
        )

    async def receipt_pdf(self, payment_id: str, user: User) -> tuple[str, bytes]:
        # The record is read on every download: a refund that succeeded since the last one
        # changes what the receipt says (ReceiptService.key_of), on whichever worker it did.
        record = await self._receipt_record(payment_id, user)
        info = self.renderer.info(record, self._catalogue.plan_of(record))
        data = await self.renderer.pdf(record, info.plan)
        return f"receipt-{info.receipt_number}.pdf", data

    def render_soon(self, record: PaymentRecord) -> None:
        task = asyncio.create_task(self._render_receipt(record))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _render_receipt(self, record: PaymentRecord) -> None:
        try:
            await self.renderer.ensure(record, self._catalogue.plan_of(record))
        except Exception:
            # The receipt is rendered on first download instead; nothing is lost.
            log.exception("receipt.render_failed", extra={"payment_id": record.payment_id})

    async def drain(self, grace_s: float = 30.0) -> None:
        """Let receipt renders in flight finish before shutdown."""
        if self._background:
            await asyncio.wait(self._background, timeout=grace_s)
