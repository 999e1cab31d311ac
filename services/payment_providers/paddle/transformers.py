"""Conversions between the service's types and Paddle Billing's JSON, kept apart from the calls.

Requests: the body of ``POST /transactions`` (a non-catalogue price from our catalogue, or a
catalogue ``pri_`` price the plan is mapped to) and of ``POST /adjustments`` (a refund, full
or partial). Responses: Paddle's transactions and adjustments (plain dicts from its JSON,
inside its ``data`` envelope) to ``PaymentState``, ``IntentResult``, ``RefundResult`` and
``WebhookEvent``; and the ``Paddle-Signature`` check. Unknown Paddle statuses map to pending:
only an explicit success or failure from Paddle is final.

Amounts: Paddle counts in the currency's lowest denomination, as a string holding an integer
("2900" for 29.00 EUR, "1900" for 1900 JPY): the service's minor units, as text.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar, assert_never

from models.payment import PaymentStatus, RefundStatus

from ..base import IntentRequest, IntentResult, PaymentState, RefundResult, WebhookEvent

PaddleObject = Mapping[str, Any]

PREFIX = "txn_"
# Paddle's IDs, as its description constrains them (``^txn_[a-z\d]{26}$`` and so on).
# Anything else is refused before it can become part of a URL path or a query.
TRANSACTION_ID = re.compile(r"^txn_[a-z\d]{26}$")
ADJUSTMENT_ID = re.compile(r"^adj_[a-z\d]{26}$")
PRICE_ID = re.compile(r"^pri_[a-z\d]{26}$")
TRANSACTION_ITEM_ID = re.compile(r"^txnitm_[a-z\d]{26}$")
# Our refund ids. Paddle's adjustments carry no custom_data, so ours travels at the end of
# the adjustment's ``reason`` (shown in Paddle's dashboard), in brackets.
_OUR_REFUND_ID = re.compile(r"\[(rf_[0-9a-f]{24})\]\s*$")
REASON_MAX = 400  # leaves room for the bracketed id; Paddle states no limit

SIGNATURE_HEADER = "paddle-signature"

# The currencies Paddle Billing takes (the ``currency_code`` enum of its description).
CURRENCIES = frozenset(
    {
        *("USD", "EUR", "GBP", "JPY", "AUD", "CAD", "CHF", "HKD", "SGD", "SEK", "ARS"),
        *("BRL", "CNY", "COP", "CZK", "DKK", "HUF", "ILS", "INR", "KRW", "MXN", "NOK"),
        *("NZD", "PLN", "RUB", "THB", "TRY", "TWD", "UAH", "VND", "ZAR"),
    }
)


class TransactionStatus(StrEnum):
    DRAFT = "draft"
    READY = "ready"
    BILLED = "billed"
    PAID = "paid"
    COMPLETED = "completed"
    CANCELED = "canceled"
    PAST_DUE = "past_due"


class AdjustmentStatus(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    REJECTED = "rejected"
    REVERSED = "reversed"


class EventType(StrEnum):
    TRANSACTION_COMPLETED = "transaction.completed"
    TRANSACTION_PAID = "transaction.paid"
    TRANSACTION_PAYMENT_FAILED = "transaction.payment_failed"
    TRANSACTION_CANCELED = "transaction.canceled"
    ADJUSTMENT_CREATED = "adjustment.created"
    ADJUSTMENT_UPDATED = "adjustment.updated"


E = TypeVar("E", bound=StrEnum)


def _enum_or_none(kind: type[E], value: Any) -> E | None:
    try:
        return kind(value)
    except ValueError:
        return None


def transaction_status(value: Any) -> PaymentStatus:
    """Paddle's transaction status in our terms; anything else is pending.

    ``paid`` is final for us: the money is taken, Paddle only has its own processing left
    before ``completed``. ``billed`` and ``past_due`` are invoices waiting for money.
    """
    status = _enum_or_none(TransactionStatus, value)
    if status is None:
        return PaymentStatus.PENDING
    match status:
        case TransactionStatus.DRAFT | TransactionStatus.READY | TransactionStatus.BILLED:
            return PaymentStatus.PENDING
        case TransactionStatus.PAST_DUE:
            return PaymentStatus.PENDING
        case TransactionStatus.PAID | TransactionStatus.COMPLETED:
            return PaymentStatus.SUCCEEDED
        case TransactionStatus.CANCELED:
            return PaymentStatus.CANCELED
        case _:
            assert_never(status)


def adjustment_status(value: Any) -> RefundStatus:
    """A refund adjustment's status in our terms. Refunds wait for Paddle's approval
    (``pending_approval``); ``reversed`` undoes an adjustment, so no money went back."""
    status = _enum_or_none(AdjustmentStatus, value)
    if status is None:
        return RefundStatus.PENDING
    match status:
        case AdjustmentStatus.PENDING_APPROVAL:
            return RefundStatus.PENDING
        case AdjustmentStatus.APPROVED:
            return RefundStatus.SUCCEEDED
        case AdjustmentStatus.REJECTED | AdjustmentStatus.REVERSED:
            return RefundStatus.FAILED
        case _:
            assert_never(status)


# -- amounts and IDs ----------------------------------------------------------------------------


def to_paddle_amount(amount: int) -> str:
    return str(int(amount))


def from_paddle_amount(value: Any) -> int:
    """Paddle's amount string ("2900") to minor units. Raises ValueError for anything that
    is not a plain integer of a sane size."""
    if not isinstance(value, str) or not re.fullmatch(r"-?\d{1,18}", value):
        raise ValueError(f"not a Paddle amount: {value!r}")
    return int(value)


def is_transaction_id(value: Any) -> bool:
    return isinstance(value, str) and TRANSACTION_ID.fullmatch(value) is not None


def is_adjustment_id(value: Any) -> bool:
    return isinstance(value, str) and ADJUSTMENT_ID.fullmatch(value) is not None


def is_price_id(value: Any) -> bool:
    return isinstance(value, str) and PRICE_ID.fullmatch(value) is not None


def data_of(answer: PaddleObject) -> Any:
    """What Paddle's ``{"data": ..., "meta": ...}`` envelope holds."""
    return answer.get("data")


# -- requests -------------------------------------------------------------------------------


def custom_data(request: IntentRequest) -> dict[str, str]:
    """What we put on the transaction so that its events lead back to our payment (our
    payment id is Paddle's transaction id, unknown until it answers: the reference is ours)."""
    data = {"payment_reference": request.reference, "plan": request.plan.code}
    if request.user_id:
        data["user_id"] = request.user_id
    return data


def transaction_request(
    request: IntentRequest, *, price_id: str | None, tax_category: str
) -> dict[str, Any]:
    """The body of ``POST /transactions``, collected automatically through Paddle Checkout.

    Without a mapped price, a non-catalogue price and product made from our catalogue: the
    price is tax-inclusive (``tax_mode: internal``), so that the customer pays exactly the
    catalogue amount and Paddle, the merchant of record, carves its tax out of it.
    """
    plan = request.plan
    item: dict[str, Any]
    if price_id is not None:
        item = {"quantity": 1, "price_id": price_id}
    else:
        item = {
            "quantity": 1,
            "price": {
                # Internal notes for the merchant (2 to 500 characters); `name` is shown.
                "description": f"{plan.name} ({plan.code}), from the payment service"[:500],
                "name": plan.name[:150],
                "tax_mode": "internal",
                "unit_price": {
                    "amount": to_paddle_amount(plan.amount),
                    "currency_code": plan.currency.upper(),
                },
                "product": {"name": plan.name[:200], "tax_category": tax_category},
            },
        }
    return {
        "items": [item],
        "currency_code": plan.currency.upper(),
        "collection_mode": "automatic",
        "custom_data": custom_data(request),
    }


def refund_reason(reason: str | None, refund_id: str) -> str:
    text = " ".join((reason or "Refund requested by the merchant").split())[:REASON_MAX]
    return f"{text} [{refund_id}]"


def refund_id_of(adjustment: PaddleObject) -> str | None:
    """Our refund id, from the adjustment's reason."""
    reason = adjustment.get("reason")
    match = _OUR_REFUND_ID.search(reason) if isinstance(reason, str) else None
    return match.group(1) if match else None


@dataclass(frozen=True, slots=True)
class LineItem:
    item_id: str
    total: int


def line_items(transaction: PaddleObject) -> list[LineItem]:
    """The transaction's line items (``details.line_items``) with their totals."""
    details = transaction.get("details")
    raw = details.get("line_items") if isinstance(details, Mapping) else None
    found = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), str):
            continue
        if not TRANSACTION_ITEM_ID.fullmatch(item["id"]):
            continue
        totals = item.get("totals")
        try:
            total = from_paddle_amount(totals.get("total") if isinstance(totals, Mapping) else None)
        except ValueError:
            continue
        found.append(LineItem(item["id"], total))
    return found


def refund_request(
    transaction: PaddleObject,
    *,
    amount: int,
    refund_id: str,
    reason: str | None,
    refunded_before: int,
) -> dict[str, Any]:
    """The body of ``POST /adjustments`` refunding ``amount`` of ``transaction``.

    ``full`` only when nothing was refunded before and the amount is the whole of it (a
    second ``full`` would ask for the grand total again); otherwise ``partial``, spread over
    the line items in order (ours have one). Raises ValueError when the line items cannot
    hold the amount."""
    body: dict[str, Any] = {
        "action": "refund",
        "transaction_id": transaction["id"],
        "reason": refund_reason(reason, refund_id),
    }
    total = grand_total(transaction)
    if refunded_before == 0 and total is not None and amount == total[0]:
        return {**body, "type": "full"}
    items = []
    left = amount
    for item in line_items(transaction):
        if left <= 0:
            break
        part = min(left, item.total)
        if part > 0:
            items.append({"item_id": item.item_id, "type": "partial", "amount": str(part)})
            left -= part
    if left > 0 or not items:
        raise ValueError("the transaction's line items do not hold the amount")
    return {**body, "type": "partial", "items": items}


# -- responses -------------------------------------------------------------------------------


def grand_total(transaction: PaddleObject) -> tuple[int, str] | None:
    """What the customer is charged (tax included), from ``details.totals``."""
    details = transaction.get("details")
    totals = details.get("totals") if isinstance(details, Mapping) else None
    if not isinstance(totals, Mapping):
        return None
    currency = totals.get("currency_code") or transaction.get("currency_code")
    if not isinstance(currency, str):
        return None
    try:
        return from_paddle_amount(totals.get("grand_total")), currency.upper()
    except ValueError:
        return None


def payment_method_of(transaction: PaddleObject) -> str | None:
    """How the customer paid: the type of the captured attempt (``card``, ``paypal``,
    ``apple_pay``, ...). Paddle lists attempts newest first."""
    payments = transaction.get("payments")
    for attempt in payments if isinstance(payments, list) else []:
        if not isinstance(attempt, Mapping) or attempt.get("status") != "captured":
            continue
        details = attempt.get("method_details")
        kind = details.get("type") if isinstance(details, Mapping) else None
        return kind if isinstance(kind, str) and re.fullmatch(r"[a-z_]{1,32}", kind) else None
    return None


def reference_of(transaction: PaddleObject) -> str | None:
    data = transaction.get("custom_data")
    reference = data.get("payment_reference") if isinstance(data, Mapping) else None
    return reference if isinstance(reference, str) and reference else None


def state_from_transaction(
    transaction: PaddleObject, refunds: tuple[RefundResult, ...] | None = None
) -> PaymentState:
    total = grand_total(transaction)
    return PaymentState(
        payment_id=str(transaction["id"]),
        status=transaction_status(transaction.get("status")),
        amount=total[0] if total else None,
        currency=total[1] if total else None,
        payment_method=payment_method_of(transaction),
        vendor_status=f"transaction {transaction.get('status')}",
        refunds=refunds,
    )


def checkout_url(transaction: PaddleObject) -> str | None:
    checkout = transaction.get("checkout")
    url = checkout.get("url") if isinstance(checkout, Mapping) else None
    return url if isinstance(url, str) and url.startswith(("https://", "http://")) else None


def intent_result(transaction: PaddleObject) -> IntentResult:
    return IntentResult(
        payment_id=str(transaction["id"]),
        status=PaymentStatus.PENDING,
        redirect_url=checkout_url(transaction),
    )


def is_refund(adjustment: PaddleObject) -> bool:
    return adjustment.get("action") == "refund"


def refund_result(adjustment: PaddleObject) -> RefundResult:
    """A refund adjustment in our terms. Raises ValueError for an object that is not one."""
    if not is_adjustment_id(adjustment.get("id")):
        raise ValueError("a Paddle adjustment without an id")
    if not is_refund(adjustment):
        raise ValueError("a Paddle adjustment that is not a refund")
    totals = adjustment.get("totals")
    amount = from_paddle_amount(totals.get("total") if isinstance(totals, Mapping) else None)
    if amount <= 0:
        raise ValueError("a Paddle refund's total is positive")
    currency = adjustment.get("currency_code")
    status = adjustment_status(adjustment.get("status"))
    return RefundResult(
        provider_refund_id=str(adjustment["id"]),
        amount=amount,
        status=status,
        currency=currency.upper() if isinstance(currency, str) else None,
        refund_id=refund_id_of(adjustment),
        failure_code=str(adjustment.get("status")) if status is RefundStatus.FAILED else None,
    )


def refunds_of(adjustments: Sequence[Any]) -> tuple[RefundResult, ...]:
    results = []
    for adjustment in adjustments:
        if not isinstance(adjustment, Mapping) or not is_refund(adjustment):
            continue  # credits and chargebacks are not refunds we asked for
        try:
            results.append(refund_result(adjustment))
        except ValueError:
            continue
    return tuple(results)


# -- webhooks --------------------------------------------------------------------------------


class SignatureInvalid(ValueError):
    """Why a ``Paddle-Signature`` does not prove the delivery (for logs, never a client)."""


def parse_signature(header: str | None) -> tuple[int, list[str]]:
    """``ts=1671552777;h1=<hex>[;h1=<hex>...]`` as (timestamp, signatures). During a secret
    rotation Paddle signs with each secret: several ``h1``."""
    if not header or not header.isascii() or len(header) > 2048:
        raise SignatureInvalid("no usable Paddle-Signature header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == "ts" and value.isdigit() and len(value) <= 12:
            timestamp = int(value)
        elif key == "h1" and re.fullmatch(r"[0-9a-f]{64}", value):
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureInvalid("the Paddle-Signature header lacks ts or h1")
    return timestamp, signatures


def verify_signature(
    body: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    now: float,
    tolerance_s: int,
) -> int:
    """Check ``header`` against the raw ``body`` with any of ``secrets``: HMAC-SHA256 of
    ``"{ts}:{body}"``, hex, compared in constant time. Refuses a timestamp further than
    ``tolerance_s`` from ``now`` either way (old: a replay; ahead: one that would stay
    replayable). Returns the timestamp; raises ``SignatureInvalid``."""
    timestamp, signatures = parse_signature(header)
    if abs(now - timestamp) > tolerance_s:
        raise SignatureInvalid("the Paddle-Signature timestamp is outside the tolerance")
    signed = f"{timestamp}:".encode() + body
    for secret in secrets:
        expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        # Every h1 against every secret, each compare in constant time.
        if any(hmac.compare_digest(expected, given) for given in signatures):
            return timestamp
    raise SignatureInvalid("no h1 matches the signing secret")


def is_event(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and isinstance(payload.get("event_id"), str)
        and bool(payload["event_id"])
        and isinstance(payload.get("event_type"), str)
        and bool(payload["event_type"])
        and isinstance(payload.get("data"), Mapping)
    )


def _occurred_at(event: PaddleObject) -> datetime | None:
    value = event.get("occurred_at")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def webhook_event(event: PaddleObject) -> WebhookEvent:
    """Normalize one verified event. Events this service does not handle come back with no
    payment, status or refund (acknowledged and ignored). Raises ValueError for an event
    whose data is not what its type says."""
    data: PaddleObject = event["data"]
    base: dict[str, Any] = {
        "event_id": str(event["event_id"]),
        "event_type": str(event["event_type"]),
        "verified": True,
        "occurred_at": _occurred_at(event),
    }
    kind = _enum_or_none(EventType, event["event_type"])
    if kind is None:
        return WebhookEvent(**base)
    match kind:
        case (
            EventType.TRANSACTION_COMPLETED
            | EventType.TRANSACTION_PAID
            | EventType.TRANSACTION_PAYMENT_FAILED
            | EventType.TRANSACTION_CANCELED
        ):
            if not is_transaction_id(data.get("id")):
                raise ValueError("a transaction event without a transaction id")
            return WebhookEvent(
                **base,
                payment_id=str(data["id"]),
                status=_event_status(kind),
                reference=reference_of(data),
            )
        case EventType.ADJUSTMENT_CREATED | EventType.ADJUSTMENT_UPDATED:
            if not is_refund(data):
                return WebhookEvent(**base)  # a credit or a chargeback: not ours to follow
            transaction_id = data.get("transaction_id")
            if not is_transaction_id(transaction_id):
                raise ValueError("a refund event without its transaction")
            return WebhookEvent(**base, payment_id=str(transaction_id), refund=refund_result(data))
        case _:
            assert_never(kind)


def _event_status(kind: EventType) -> PaymentStatus | None:
    match kind:
        case EventType.TRANSACTION_COMPLETED | EventType.TRANSACTION_PAID:
            return PaymentStatus.SUCCEEDED
        case EventType.TRANSACTION_PAYMENT_FAILED:
            # The transaction stays open and the customer may try again on the same checkout:
            # pending, not failed (as Stripe's payment_intent.payment_failed).
            return PaymentStatus.PENDING
        case EventType.TRANSACTION_CANCELED:
            return PaymentStatus.CANCELED
        case EventType.ADJUSTMENT_CREATED | EventType.ADJUSTMENT_UPDATED:
            return None
        case _:
            assert_never(kind)
