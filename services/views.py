"""How the service's records are shown to API clients."""

from __future__ import annotations

from models.payment import (
    PaymentRecord,
    PaymentResponse,
    RefundHistoryEntry,
    RefundRecord,
    RefundView,
)

API_PREFIX = "/api/v1/payment"


def payment_response(record: PaymentRecord) -> PaymentResponse:
    return PaymentResponse(
        payment_id=record.payment_id,
        status=record.status,
        plan=record.plan,
        amount=record.amount,
        currency=record.currency,
        provider=record.provider,
        amount_captured=record.amount_captured,
        amount_refunded=record.amount_refunded,
        amount_pending_refund=record.amount_pending_refund,
        receipt_url=(
            f"{API_PREFIX}/receipt/{record.payment_id}/pdf" if record.status.is_paid else None
        ),
    )


def refund_view(
    refund: RefundRecord, history: list[RefundHistoryEntry] | None = None
) -> RefundView:
    return RefundView(
        refund_id=refund.refund_id,
        payment_id=refund.payment_id,
        amount=refund.amount,
        currency=refund.currency,
        status=refund.status,
        reason=refund.reason,
        failure_code=refund.failure_code,
        provider_refund_id=refund.provider_refund_id,
        created_at=refund.created_at,
        updated_at=refund.updated_at,
        history=history or [],
    )
