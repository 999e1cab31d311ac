"""Conversions between the service's types and Paystack's JSON, kept apart from the calls.

Requests: the body of ``POST /transaction/initialize`` and of ``POST /refund``. Responses:
Paystack's transactions and refunds (plain dicts from its JSON) to ``PaymentState``,
``RefundResult`` and ``WebhookEvent``. Unknown Paystack statuses map to pending: only an
explicit success or failure from Paystack is final.

Paystack's pages this follows (paystack.com/docs): api/transaction (initialize, verify),
api/refund (create, list, fetch), payments/verify-payments (the transaction statuses),
payments/refunds (refund statuses and events), payments/webhooks (the signature and events),
api/#supported-currency (currencies and their subunits).

References: ours are ``ord_<24 hex>``; Paystack takes only letters, digits, ``-``, ``.`` and
``=`` in a reference, so the underscore becomes ``-`` there (``ord-<24 hex>``) and the payment
ID is ``ps_`` + Paystack's reference.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, assert_never

from models.payment import PaymentStatus, RefundStatus
from services.money import currency_exponent

from ..base import IntentRequest, PaymentState, RefundResult, WebhookEvent

PaystackObject = Mapping[str, Any]

PREFIX = "ps_"
# A reference we made (``ord-`` + 24 hex): only those are looked up, so that nothing else
# becomes part of a URL path.
PAYSTACK_REFERENCE = re.compile(r"^[A-Za-z0-9-]{1,100}$")
# Paystack's refund and transaction IDs are integers.
PAYSTACK_ID = re.compile(r"^[0-9]{1,19}$")
# Our refund ids, as we write them into a refund's merchant_note.
_OUR_REFUND_ID = re.compile(r"rf_[0-9a-f]{24}")

# The currencies Paystack charges in and the exponent of the subunit it counts each in
# (paystack.com/docs/api/#supported-currency: NGN in kobo, GHS in pesewas, ZAR, KES and USD in
# cents; the OpenAPI description's Currency enum names the same five). Every one is a hundredth,
# as in ISO 4217, but the conversion below goes through this table, not an assumption.
SUBUNIT_EXPONENT: Mapping[str, int] = {"NGN": 2, "GHS": 2, "ZAR": 2, "KES": 2, "USD": 2}
CURRENCIES = frozenset(SUBUNIT_EXPONENT)


class TransactionStatus(StrEnum):
    """A transaction's ``status`` (paystack.com/docs/payments/verify-payments)."""

    SUCCESS = "success"
    FAILED = "failed"
    # The customer has not completed the transaction: Paystack says so of a checkout nobody
    # has paid yet too, and such a transaction may still succeed.
    ABANDONED = "abandoned"
    REVERSED = "reversed"  # refunded, or a chargeback went the customer's way
    ONGOING = "ongoing"  # waiting for the customer (an OTP, a bank transfer)
    PENDING = "pending"
    PROCESSING = "processing"  # pending, for direct debits
    QUEUED = "queued"  # bulk charges only


class PaystackRefundStatus(StrEnum):
    """A refund's ``status`` (paystack.com/docs/payments/refunds)."""

    PENDING = "pending"
    PROCESSING = "processing"
    # Paystack could not send the money back and needs the customer's bank details: for us
    # it is still on its way.
    NEEDS_ATTENTION = "needs-attention"
    PROCESSED = "processed"
    FAILED = "failed"


class Event(StrEnum):
    """The events this provider acts on (paystack.com/docs/payments/webhooks, "Supported
    events"); every other one is acknowledged and ignored."""

    CHARGE_SUCCESS = "charge.success"
    REFUND_PENDING = "refund.pending"
    REFUND_PROCESSING = "refund.processing"
    REFUND_NEEDS_ATTENTION = "refund.needs-attention"
    REFUND_PROCESSED = "refund.processed"
    REFUND_FAILED = "refund.failed"


REFUND_EVENTS = frozenset(event for event in Event if event.value.startswith("refund."))


def payment_status(status: TransactionStatus) -> PaymentStatus:
    """Ours for one of Paystack's transaction statuses.

    ``abandoned`` is canceled, not failed: no money moved and nothing was declined (failed is
    what a client reads as a decline). It is not final at Paystack, which says abandoned of a
    checkout the customer has not finished yet; our transition table lets a canceled payment
    still become succeeded, so a customer who comes back to the page and pays is not lost
    (Paystack's charge.success, a verify or the reconciler bring it in).

    ``reversed`` means money went back: the payment was paid, and what went back is told by
    the refunds Paystack lists (refund records of their own)."""
    match status:
        case TransactionStatus.SUCCESS | TransactionStatus.REVERSED:
            return PaymentStatus.SUCCEEDED
        case TransactionStatus.FAILED:
            return PaymentStatus.FAILED
        case TransactionStatus.ABANDONED:
            return PaymentStatus.CANCELED
        case (
            TransactionStatus.ONGOING
            | TransactionStatus.PENDING
            | TransactionStatus.PROCESSING
            | TransactionStatus.QUEUED
        ):
            return PaymentStatus.PENDING
        case _:
            assert_never(status)


def refund_status(status: PaystackRefundStatus) -> RefundStatus:
    match status:
        case PaystackRefundStatus.PROCESSED:
            return RefundStatus.SUCCEEDED
        case PaystackRefundStatus.FAILED:
            return RefundStatus.FAILED
        case (
            PaystackRefundStatus.PENDING
            | PaystackRefundStatus.PROCESSING
            | PaystackRefundStatus.NEEDS_ATTENTION
        ):
            return RefundStatus.PENDING
        case _:
            assert_never(status)


def _transaction_status(value: Any) -> TransactionStatus | None:
    try:
        return TransactionStatus(str(value))
    except ValueError:
        return None  # a status Paystack added after this was written: pending


def _refund_status(value: Any) -> RefundStatus:
    try:
        return refund_status(PaystackRefundStatus(str(value)))
    except ValueError:
        return RefundStatus.PENDING


# -- amounts -------------------------------------------------------------------------------


class AmountNotRepresentable(ValueError):
    """An amount or currency Paystack cannot take."""


def _rescaled(value: int, places: int) -> int | None:
    """``value`` times 10**places, or None when that is not a whole number."""
    factor: int = 10 ** abs(places)
    if places >= 0:
        return value * factor
    whole, rest = divmod(value, factor)
    return None if rest else whole


def to_subunits(amount: int, currency: str) -> int:
    """Our minor units (ISO 4217) to Paystack's subunits for ``currency``, exactly."""
    code = currency.upper()
    if code not in SUBUNIT_EXPONENT:
        raise AmountNotRepresentable(f"Paystack does not charge in {code}")
    subunits = _rescaled(amount, SUBUNIT_EXPONENT[code] - currency_exponent(code))
    if subunits is None:
        raise AmountNotRepresentable(f"{amount} {code} is finer than Paystack's subunit")
    return subunits


def from_subunits(value: Any, currency: str) -> int:
    """Paystack's subunits to our minor units. Paystack sends integers, but some events send
    them as strings ("10000"); anything else is refused."""
    code = currency.upper()
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not an amount: {value!r}")
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,18}", value):
            raise ValueError(f"not an amount: {value!r}")
        value = int(value)
    if value < 0 or code not in SUBUNIT_EXPONENT:
        raise ValueError(f"not an amount: {value!r} {code}")
    minor = _rescaled(value, currency_exponent(code) - SUBUNIT_EXPONENT[code])
    if minor is None:
        raise ValueError(f"{value} {code} is finer than the currency's minor unit")
    return minor


# -- IDs -----------------------------------------------------------------------------------


def paystack_reference(reference: str) -> str:
    """Paystack's reference for our order reference (``ord_ab12`` -> ``ord-ab12``)."""
    return reference.replace("_", "-")


def our_reference(paystack_ref: str) -> str:
    return paystack_ref.replace("-", "_")


def payment_id_of(paystack_ref: str) -> str:
    return PREFIX + paystack_ref


def reference_of(payment_id: str) -> str | None:
    """Paystack's reference inside our payment ID, or None when it cannot be one."""
    if not payment_id.startswith(PREFIX):
        return None
    reference = payment_id[len(PREFIX) :]
    return reference if PAYSTACK_REFERENCE.fullmatch(reference) else None


def is_paystack_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | str) and PAYSTACK_ID.fullmatch(str(value)) is not None


# -- requests ------------------------------------------------------------------------------


def initialize_request(request: IntentRequest, email: str) -> dict[str, Any]:
    """The body of ``POST /transaction/initialize``.

    ``callback_url`` is where Paystack sends the customer after paying (it appends
    ``?trxref=&reference=``); without a return URL the one set in the dashboard applies.
    ``metadata.cancel_action`` is where the checkout's cancel button leads. Our payment ID
    and reference travel in ``metadata`` too, for whoever reads the transaction in the
    dashboard."""
    reference = paystack_reference(request.reference)
    metadata: dict[str, Any] = {
        "payment_id": payment_id_of(reference),
        "reference": request.reference,
        "plan": request.plan.code,
    }
    if request.user_id:
        metadata["user_id"] = request.user_id
    if request.cancel_url:
        metadata["cancel_action"] = request.cancel_url
    body: dict[str, Any] = {
        "email": email,
        "amount": to_subunits(request.plan.amount, request.plan.currency),
        "currency": request.plan.currency.upper(),
        "reference": reference,
        "metadata": metadata,
    }
    if request.return_url:
        body["callback_url"] = request.return_url
    return body


def refund_request(
    paystack_ref: str, amount: int, currency: str, *, refund_id: str, reason: str | None
) -> dict[str, Any]:
    """The body of ``POST /refund``: always with an amount (without one Paystack refunds
    whatever is left, more than we mean whenever our view is behind its), and our refund id
    in ``merchant_note``, which Paystack keeps and lists: Paystack takes no idempotency key,
    so that note is how a repeated ask finds the refund it already made."""
    return {
        "transaction": paystack_ref,
        "amount": to_subunits(amount, currency),
        "currency": currency.upper(),
        "merchant_note": f"{refund_id}",
        "customer_note": (reason or "Refund")[:255],
    }


# -- responses -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expected:
    """What we asked Paystack to charge for a payment."""

    amount: int
    currency: str


def refund_id_in(refund: PaystackObject) -> str | None:
    """Our refund id, from the merchant_note we wrote."""
    note = refund.get("merchant_note")
    match = _OUR_REFUND_ID.fullmatch(note) if isinstance(note, str) else None
    return match.group(0) if match else None


def refund_result(refund: PaystackObject) -> RefundResult:
    """A refund in our terms. Raises ValueError for one not shaped like a refund."""
    refund_id = refund.get("id")
    if not is_paystack_id(refund_id):
        raise ValueError("a Paystack refund without an id")
    currency = refund.get("currency")
    if not isinstance(currency, str):
        raise ValueError("a Paystack refund without a currency")
    return RefundResult(
        provider_refund_id=str(refund_id),
        amount=from_subunits(refund.get("amount"), currency),
        status=_refund_status(refund.get("status")),
        currency=currency.upper(),
        refund_id=refund_id_in(refund),
        failure_code="paystack_refund_failed" if refund.get("status") == "failed" else None,
    )


def refunds_of(refunds: list[Any], transaction_id: int | str | None) -> tuple[RefundResult, ...]:
    """The listed refunds that belong to ``transaction_id`` (the list is filtered by
    Paystack, and again here: a filter it ignored must not count another sale's refunds)."""
    results = []
    for refund in refunds:
        if not isinstance(refund, Mapping):
            continue
        if transaction_id is not None and str(refund.get("transaction")) != str(transaction_id):
            continue
        try:
            results.append(refund_result(refund))
        except ValueError:
            continue  # not shaped like a refund: nothing we can count
    return tuple(results)


def amount_of(transaction: PaystackObject) -> tuple[int, str] | None:
    currency = transaction.get("currency")
    if not isinstance(currency, str):
        return None
    try:
        return from_subunits(transaction.get("amount"), currency), currency.upper()
    except ValueError:
        return None


def requested_amount_of(transaction: PaystackObject) -> int | None:
    """What was asked, before Paystack's fees when the merchant passes them to customers
    (``amount`` then includes them)."""
    currency = transaction.get("currency")
    if not isinstance(currency, str) or "requested_amount" not in transaction:
        return None
    try:
        return from_subunits(transaction.get("requested_amount"), currency)
    except ValueError:
        return None


def mismatch(transaction: PaystackObject, expected: Expected) -> str | None:
    """Why what Paystack charged is not what we asked for, or None when it is.

    The currency must be ours and the amount asked for ours (``requested_amount``, else
    ``amount``); the amount taken may exceed it only by Paystack's fees passed on to the
    customer, never fall short of it."""
    charged = amount_of(transaction)
    if charged is None:
        return "no amount or currency"
    amount, currency = charged
    if currency != expected.currency.upper():
        return f"currency {currency}, not {expected.currency}"
    requested = requested_amount_of(transaction)
    asked = requested if requested is not None else amount
    if asked != expected.amount or amount < expected.amount:
        return f"amount {amount} (asked {asked}), not {expected.amount}"
    return None


def state_from_transaction(
    transaction: PaystackObject,
    *,
    expected: Expected | None,
    refunds: tuple[RefundResult, ...] | None,
) -> tuple[PaymentState, str | None]:
    """The transaction in our terms, and why it is refused when what was charged is not what
    we asked for (a success for another sum or currency is failed, never paid)."""
    reference = str(transaction["reference"])
    vendor = str(transaction.get("status"))
    known = _transaction_status(transaction.get("status"))
    status = payment_status(known) if known is not None else PaymentStatus.PENDING
    charged = amount_of(transaction)
    refused = None
    if status.is_paid and expected is not None:
        refused = mismatch(transaction, expected)
        if refused is not None:
            status = PaymentStatus.FAILED
            vendor = f"{vendor} (refused: {refused})"
    channel = transaction.get("channel")
    # The amount we report is ours when Paystack's includes fees passed to the customer.
    amount = expected.amount if expected is not None and refused is None and charged else None
    if amount is None and charged is not None:
        amount = charged[0]
    return (
        PaymentState(
            payment_id=payment_id_of(reference),
            status=status,
            amount=amount,
            currency=charged[1] if charged else None,
            payment_method=str(channel) if isinstance(channel, str) and channel else None,
            vendor_status=vendor,
            refunds=refunds,
        ),
        refused,
    )


# -- webhooks ------------------------------------------------------------------------------


def is_event(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and isinstance(payload.get("event"), str)
        and bool(payload["event"])
        and isinstance(payload.get("data"), Mapping)
    )


def event_identity(payload: PaystackObject, body: bytes) -> str:
    """What makes one event itself, for deduplication. Paystack's events carry no ID of
    their own: a charge succeeds once per transaction, so ``charge.success`` is known by the
    transaction's ID; a refund event by the refund's ID when it carries one, else by its
    exact bytes (Paystack delivers an event again as it was)."""
    name = str(payload["event"])
    data = payload["data"]
    object_id = data.get("id")
    if is_paystack_id(object_id):
        return f"{name}:{object_id}"
    return f"{name}:sha256:{hashlib.sha256(body).hexdigest()[:32]}"


def _occurred_at(data: PaystackObject) -> datetime | None:
    for field in ("paid_at", "paidAt", "updatedAt", "createdAt"):
        value = data.get(field)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
    return None


def event_reference(payload: PaystackObject) -> str | None:
    """The Paystack reference of the transaction an event is about, if it is one of ours."""
    data = payload["data"]
    name = payload["event"]
    value = data.get("transaction_reference") if name in REFUND_EVENTS else data.get("reference")
    return value if isinstance(value, str) and PAYSTACK_REFERENCE.fullmatch(value) else None


def charge_event(
    payload: PaystackObject, body: bytes, *, expected: Expected | None
) -> WebhookEvent:
    """``charge.success``, signed by Paystack. Taken at its word only when it charged what we
    asked for; otherwise it is passed on unverified, so that the service reads the
    transaction itself (and finds it refused)."""
    data = payload["data"]
    reference = event_reference(payload)
    trusted = expected is not None and mismatch(data, expected) is None
    return WebhookEvent(
        event_id=event_identity(payload, body),
        event_type=str(payload["event"]),
        verified=trusted,
        payment_id=payment_id_of(reference) if reference else None,
        status=PaymentStatus.SUCCEEDED,
        occurred_at=_occurred_at(data),
        reference=our_reference(reference) if reference else None,
    )


def ignored_event(payload: PaystackObject, body: bytes) -> WebhookEvent:
    reference = event_reference(payload) if payload["event"] in set(Event) else None
    return WebhookEvent(
        event_id=event_identity(payload, body),
        event_type=str(payload["event"]),
        verified=True,
        payment_id=payment_id_of(reference) if reference else None,
    )


def matching_refund(event: PaystackObject, listed: tuple[RefundResult, ...]) -> RefundResult | None:
    """The refund an event is about, among those Paystack lists for its transaction: by
    Paystack's ID when the event carries one, by our refund id from its merchant_note, else
    the first of the same amount (preferring one in the state the event names)."""
    data = event["data"]
    if is_paystack_id(data.get("id")):
        return next((r for r in listed if r.provider_refund_id == str(data["id"])), None)
    ours = refund_id_in(data)
    if ours is not None:
        return next((r for r in listed if r.refund_id == ours), None)
    currency = data.get("currency")
    try:
        amount = from_subunits(data.get("amount"), str(currency))
    except ValueError:
        return None
    same = [r for r in listed if r.amount == amount]
    claimed = _refund_status(data.get("status"))
    return next((r for r in same if r.status is claimed), same[0] if same else None)
