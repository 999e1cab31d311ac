"""Receipts and credit notes as the API serves them: to the payment's owner or an admin only,
for a paid payment (a succeeded refund), numbered and rendered ahead of the first download
when a payment becomes paid (a refund succeeds).

A number is allocated in the receipt ledger (its own Redis slot) and then kept on the payment
(the refund) by the payment store, so that every later read of the payment brings it: the
render then needs the ledger once, for its chain entry. Should a process die between a payment
becoming paid and its number being kept, the first download allocates it instead (the ledger
gives a document one number for ever, so whoever asks first, the number is the same)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from models.payment import (
    CreditNoteView,
    PaymentRecord,
    ReceiptResponse,
    RefundRecord,
    RefundStatus,
    TaxView,
)
from models.user import User
from services.access import owned_by
from services.catalogue import Catalogue
from services.errors import PaymentNotFound, ReceiptNotAvailable, UnknownProvider
from services.payment_store import PaymentStore
from services.receipt_document import Formatter, ProviderFacts, payment_method_line
from services.receipt_service import Document, ReceiptService
from services.tax import TaxLines, refunded_tax
from services.views import API_PREFIX

if TYPE_CHECKING:
    from services.payment_providers.factory import PaymentProviderFactory

log = logging.getLogger("payments.receipts")


def _tax_view(lines: TaxLines) -> TaxView:
    return TaxView(
        name=lines.name,
        rate=lines.rate,
        treatment=lines.treatment,
        net=lines.net,
        tax=lines.tax,
        gross=lines.gross,
    )


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

    def _provider_facts(self, record: PaymentRecord) -> ProviderFacts:
        """The payment's provider as its documents name it; a provider no longer installed
        is named as the payment recorded it."""
        try:
            provider = self._providers().get(record.provider)
        except UnknownProvider:
            return ProviderFacts(display_name=record.provider)
        return ProviderFacts(
            display_name=provider.display_name,
            merchant_of_record=type(provider).merchant_of_record,
        )

    async def _owned(self, payment_id: str, user: User) -> PaymentRecord:
        self._providers().for_payment_id(payment_id)
        return owned_by(await self._store.get(payment_id), payment_id, user)

    async def _receipt_record(self, payment_id: str, user: User) -> PaymentRecord:
        """The paid payment, with its receipt number."""
        record = await self._owned(payment_id, user)
        if not record.status.is_paid:
            raise ReceiptNotAvailable(f"A {record.status} payment has no receipt")
        return await self.numbered(record)

    async def numbered(self, record: PaymentRecord) -> PaymentRecord:
        """The payment with its receipt number: the one it carries, or the ledger's (allocated
        now if need be) kept on the payment first. What a payment becoming paid runs first."""
        if record.receipt_number is not None:
            return record
        number = await self.renderer.receipt_number(record)
        held = await self._store.keep_receipt_number(record.payment_id, number)
        if held is not None and held != number:
            # Never overwritten, never printed: the ledger's number is the one in the chain.
            log.error(
                "receipt.number_mismatch",
                extra={"payment_id": record.payment_id, "number": number, "held": held},
            )
        return record.model_copy(update={"receipt_number": number})

    async def numbered_refund(self, refund: RefundRecord) -> RefundRecord:
        """The refund with its credit note's number, as ``numbered`` for a payment."""
        if refund.credit_note_number is not None:
            return refund
        number = await self.renderer.credit_note_number(refund)
        held = await self._store.keep_credit_note_number(
            refund.payment_id, refund.refund_id, number
        )
        if held is not None and held != number:
            log.error(
                "credit_note.number_mismatch",
                extra={"refund_id": refund.refund_id, "number": number, "held": held},
            )
        return refund.model_copy(update={"credit_note_number": number})

    async def _receipt(self, record: PaymentRecord) -> Document:
        plan = self._catalogue.plan_of(record)
        return await self.renderer.receipt(record, plan, self._provider_facts(record))

    async def receipt(self, payment_id: str, user: User) -> ReceiptResponse:
        record = await self._receipt_record(payment_id, user)
        plan = self._catalogue.plan_of(record)
        facts = self._provider_facts(record)
        # From memory when this process has it; otherwise the stored PDF, or rendered now
        # under the payment's number if the background render has not run.
        document = await self.renderer.receipt(record, plan, facts)
        tax = self.renderer.tax_lines(record, plan)
        fmt = Formatter(self.renderer.config.locale)
        credit_notes = await self._credit_notes(record, tax) if record.amount_refunded > 0 else []
        return ReceiptResponse(
            payment_id=record.payment_id,
            receipt_number=document.number,
            document="payment_confirmation" if facts.merchant_of_record else "receipt",
            merchant_of_record=facts.merchant_of_record,
            test=record.test_mode,
            plan=record.plan,
            plan_name=plan.name,
            amount=tax.gross,
            currency=record.currency,
            amount_formatted=fmt.amount(tax.gross, record.currency),
            tax=_tax_view(tax),
            payment_method=payment_method_line(record, fmt.text),
            status=record.status,
            paid_at=record.paid_at or record.updated_at,
            pdf_url=f"{API_PREFIX}/receipt/{record.payment_id}/pdf",
            pdf_sha256=document.sha256,
            signed=self.renderer.signed,
            credit_notes=credit_notes,
        )

    async def _credit_notes(self, record: PaymentRecord, tax: TaxLines) -> list[CreditNoteView]:
        views = []
        for refund, before in _succeeded_with_running_total(
            await self._store.refunds(record.payment_id)
        ):
            document = await self._credit_note_document(record, refund, before)
            views.append(
                CreditNoteView(
                    number=document.number,
                    refund_id=refund.refund_id,
                    amount=refund.amount,
                    currency=refund.currency,
                    tax=_tax_view(refunded_tax(tax, before, refund.amount)),
                    pdf_url=f"{API_PREFIX}/{record.payment_id}/refunds/{refund.refund_id}/pdf",
                    pdf_sha256=document.sha256,
                )
            )
        return views

    async def _credit_note_document(
        self, record: PaymentRecord, refund: RefundRecord, refunded_before: int
    ) -> Document:
        record = await self.numbered(record)
        refund = await self.numbered_refund(refund)
        return await self.renderer.credit_note(
            record,
            self._catalogue.plan_of(record),
            refund,
            refunded_before=refunded_before,
            provider=self._provider_facts(record),
        )

    async def receipt_pdf(self, payment_id: str, user: User) -> tuple[str, bytes]:
        # A cached receipt costs the record's read (who may see it) and nothing else.
        record = await self._receipt_record(payment_id, user)
        document = await self._receipt(record)
        return f"receipt-{document.number}.pdf", document.data

    async def credit_note_pdf(
        self, payment_id: str, refund_id: str, user: User
    ) -> tuple[str, bytes]:
        """The credit note of a succeeded refund; any other refund id is not found."""
        record = await self._owned(payment_id, user)
        for refund, before in _succeeded_with_running_total(await self._store.refunds(payment_id)):
            if refund.refund_id == refund_id:
                document = await self._credit_note_document(record, refund, before)
                return f"credit-note-{document.number}.pdf", document.data
        raise PaymentNotFound("No credit note for this refund")

    # -- ahead of the first download ------------------------------------------------------

    def _soon(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def render_soon(self, record: PaymentRecord) -> None:
        """A payment became paid: number its receipt, keep the number on the payment, and
        render the receipt, now."""
        self._soon(self._render_receipt(record))

    def credit_note_soon(self, record: PaymentRecord, refund: RefundRecord) -> None:
        """A refund succeeded: number its credit note (kept on the refund) and render it now."""
        self._soon(self._render_credit_notes(record.payment_id))

    async def _render_receipt(self, record: PaymentRecord) -> None:
        try:
            await self._receipt(await self.numbered(record))
        except Exception:
            # Numbered and rendered on first download instead; nothing is lost.
            log.exception("receipt.render_failed", extra={"payment_id": record.payment_id})

    async def _render_credit_notes(self, payment_id: str) -> None:
        try:
            record = await self._store.get(payment_id)
            if record is None or not record.status.is_paid:
                return
            record = await self.numbered(record)
            for refund, before in _succeeded_with_running_total(
                await self._store.refunds(payment_id)
            ):
                await self._credit_note_document(record, refund, before)
        except Exception:
            log.exception("credit_note.render_failed", extra={"payment_id": payment_id})

    async def drain(self, grace_s: float = 30.0) -> None:
        """Let renders in flight finish before shutdown."""
        while self._background:
            done, _ = await asyncio.wait(set(self._background), timeout=grace_s)
            if not done:
                return


def _succeeded_with_running_total(
    refunds: list[RefundRecord],
) -> list[tuple[RefundRecord, int]]:
    """Succeeded refunds, oldest first, each with the sum refunded before it."""
    running = 0
    result = []
    for refund in refunds:
        if refund.status is RefundStatus.SUCCEEDED:
            result.append((refund, running))
            running += refund.amount
    return result
