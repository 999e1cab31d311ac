"""Conversions for Payments v1 sales and their refunds: a subscription's payments at PayPal.

PayPal bills a subscription's cycles as Payments v1 *sales* (``PAYMENT.SALE.COMPLETED``), not
as Orders v2 orders, so a renewal is refunded through ``POST /v1/payments/sale/{id}/refund``
and its refunds read through ``GET /v1/payments/refund/{id}``. ``shared/specs`` has no
description of Payments v1; shapes follow the one PayPal publishes in
github.com/paypal/paypal-rest-api-specifications, ``openapi/payments_payment_v1.json``
(version 1.12; operations ``sale.get``, ``sale.refund``, ``refund.get``; schemas
``refund_request``, ``detailed_refund``, ``sale``) and its error names from the API reference
(developer.paypal.com/docs/api/payments/v1/#errors). Payments v1 money is ``{"total",
"currency"}``, not v2's ``{"value", "currency_code"}``, and states are lower case.

A sale's payment in our store is ``pp_sale_<sale id>``: the PayPal prefix routes it to this
provider, and no order id can take that shape (order ids have no underscore).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, assert_never

from models.payment import PaymentStatus, RefundStatus

from ..base import PaymentState, RefundResult
from .transformers import PREFIX, from_paypal_value, is_paypal_id, to_paypal_value

PayPalObject = Mapping[str, Any]

SALE_PREFIX = f"{PREFIX}sale_"
# PayPal-Request-Id on Payments v1: at most 78 characters (``paypal_request_id`` parameter).
REQUEST_ID_MAX = 78
# Our refund ids, as we send them in a sale refund's ``invoice_number`` (see refund_request).
_OUR_REFUND_ID = re.compile(r"^rf_[0-9a-f]{24}$")
# v1 refunds and reasons: ``reason`` is at most 30 characters of single-byte text.
_REASON_MAX = 30

EVENT_SALE_REFUNDED = "PAYMENT.SALE.REFUNDED"
# PayPal gave a sale's money back on its own (a reversal): a refund nobody here asked for.
EVENT_SALE_REVERSED = "PAYMENT.SALE.REVERSED"
SALE_REFUND_EVENTS = frozenset({EVENT_SALE_REFUNDED, EVENT_SALE_REVERSED})

# Payments v1 errors (HTTP 400, the error's ``name``, no ``details``) about a sale's refund.
REFUND_TOO_LARGE_NAMES = frozenset(
    {"REFUND_EXCEEDED_TRANSACTION_AMOUNT", "TRANSACTION_ALREADY_REFUNDED"}
)
STATE_NAMES = frozenset(
    {
        "REFUND_TIME_LIMIT_EXCEEDED",
        "FULL_REFUND_NOT_ALLOWED_AFTER_PARTIAL_REFUND",
        "PAYMENT_STATE_INVALID",
        "REFUND_FAILED_INSUFFICIENT_FUNDS",
        "TRANSACTION_REFUSED",
    }
)


class SaleState(StrEnum):
    COMPLETED = "completed"
    PARTIALLY_REFUNDED = "partially_refunded"
    PENDING = "pending"
    REFUNDED = "refunded"
    DENIED = "denied"


class SaleRefundState(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


# -- ids -----------------------------------------------------------------------------------


def payment_id_of_sale(sale_id: str) -> str:
    return SALE_PREFIX + sale_id


def sale_id_of(payment_id: str) -> str | None:
    """The sale id inside our payment id, or None when it is not a sale's."""
    if not payment_id.startswith(SALE_PREFIX):
        return None
    sale_id = payment_id[len(SALE_PREFIX) :]
    return sale_id if is_paypal_id(sale_id) else None


# -- amounts -------------------------------------------------------------------------------


def v1_amount(amount: int, currency: str) -> dict[str, str]:
    """Payments v1 money. Raises ``AmountNotRepresentable`` as ``to_paypal_value`` does."""
    return {"total": to_paypal_value(amount, currency), "currency": currency.upper()}


def _minor(amount: Any) -> tuple[int, str] | None:
    """A v1 amount in minor units (a reversal's may be negative: its size counts)."""
    if not isinstance(amount, Mapping):
        return None
    currency = amount.get("currency")
    if not isinstance(currency, str):
        return None
    try:
        return abs(from_paypal_value(amount.get("total"), currency)), currency.upper()
    except ValueError:
        return None


# -- requests ------------------------------------------------------------------------------


def refund_request(
    amount: int, currency: str, *, refund_id: str, reason: str | None
) -> dict[str, Any]:
    """Always with an amount (an empty body refunds whatever is left, more than we mean when
    our view is behind PayPal's). Our refund id goes in ``invoice_number``, the one field of
    the request that PayPal keeps on the refund, so that the refund's events lead back to our
    record even when the answer to this call was lost."""
    body: dict[str, Any] = {"amount": v1_amount(amount, currency), "invoice_number": refund_id}
    if reason and reason.isascii() and reason.isprintable():
        body["reason"] = reason[:_REASON_MAX]
    return body


# -- responses -----------------------------------------------------------------------------


def refund_status(state: Any) -> RefundStatus:
    try:
        known = SaleRefundState(str(state))
    except ValueError:
        return RefundStatus.PENDING  # only PayPal's explicit word is final
    match known:
        case SaleRefundState.COMPLETED:
            return RefundStatus.SUCCEEDED
        case SaleRefundState.PENDING:
            return RefundStatus.PENDING
        case SaleRefundState.FAILED:
            return RefundStatus.FAILED
        case SaleRefundState.CANCELLED:
            return RefundStatus.CANCELED
        case _:
            assert_never(known)


def refund_result(
    refund: PayPalObject, *, amount: int | None = None, currency: str | None = None
) -> RefundResult:
    """A v1 refund in our terms; ``amount`` and ``currency`` (what we asked for) stand in when
    the answer lacks them. Raises ValueError for an object not shaped like a refund."""
    refund_id = refund.get("id")
    if not is_paypal_id(refund_id):
        raise ValueError("a PayPal refund without an id")
    refunded = _minor(refund.get("amount"))
    if refunded is None and amount is None:
        raise ValueError("a PayPal refund without an amount")
    invoice_number = refund.get("invoice_number")
    ours = (
        invoice_number
        if isinstance(invoice_number, str) and _OUR_REFUND_ID.match(invoice_number)
        else None
    )
    return RefundResult(
        provider_refund_id=str(refund_id),
        amount=refunded[0] if refunded else int(amount or 0),
        status=refund_status(refund.get("state")),
        currency=refunded[1] if refunded else currency,
        refund_id=ours,
    )


def sale_of_refund(refund: PayPalObject) -> str | None:
    sale_id = refund.get("sale_id")
    return sale_id if is_paypal_id(sale_id) else None


def sale_status(state: Any) -> PaymentStatus:
    try:
        known = SaleState(str(state))
    except ValueError:
        return PaymentStatus.PENDING
    match known:
        case SaleState.COMPLETED | SaleState.PARTIALLY_REFUNDED | SaleState.REFUNDED:
            # Paid. A sale does not list its refunds, so its refunded states cannot move our
            # sums: the refunds do that themselves, each from its own answer or event.
            return PaymentStatus.SUCCEEDED
        case SaleState.PENDING:
            return PaymentStatus.PROCESSING
        case SaleState.DENIED:
            return PaymentStatus.FAILED
        case _:
            assert_never(known)


def state_from_sale(sale: PayPalObject) -> PaymentState:
    """A sale (``GET /v1/payments/sale/{id}``) as a payment's state. A sale does not list its
    refunds: those come from their own events (or a read of each by id)."""
    sale_id = sale.get("id")
    if not is_paypal_id(sale_id):
        raise ValueError("a PayPal sale has an id")
    amount = _minor(sale.get("amount"))
    return PaymentState(
        payment_id=payment_id_of_sale(str(sale_id)),
        status=sale_status(sale.get("state")),
        amount=amount[0] if amount else None,
        currency=amount[1] if amount else None,
        payment_method="paypal",
        vendor_status=f"sale {sale.get('state')}",
    )
