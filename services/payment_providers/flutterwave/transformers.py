"""Conversions between the service's types and Flutterwave's v3 JSON, kept apart from the calls.

Requests: the body of ``POST /v3/payments`` (Flutterwave Standard) and of a transaction refund.
Responses: transactions (verify by reference), refunds and webhook deliveries to
``PaymentState``, ``RefundResult`` and ``WebhookEvent``. Unknown Flutterwave statuses map to
pending: only an explicit success or failure from Flutterwave is final.

Amounts: the service counts in ISO 4217 minor units; Flutterwave takes and answers amounts in
major units (NGN 45,000.00 is ``45000.00``, not kobo). The conversion is exact, with the
currency's exponent from ``services.money`` and ``Decimal`` throughout: a float never holds an
amount, neither on the way out (the number is written into the JSON text as its decimal
digits) nor on the way back (answers are parsed with ``parse_float=Decimal``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, assert_never
from urllib.parse import urlsplit, urlunsplit

from models.payment import PaymentStatus, RefundStatus
from services.money import currency_exponent

from ..base import IntentRequest, PaymentState, RefundResult, WebhookEvent

FlutterwaveObject = Mapping[str, Any]

PREFIX = "flw_"
# Our tx_ref (the order reference, ``ord_`` + hex) as it may appear in a URL's query and in a
# payment id. Anything else is refused before it can reach Flutterwave.
TX_REF = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
# Flutterwave's transaction and refund ids are integers.
NUMERIC_ID = re.compile(r"^[0-9]{1,19}$")
# Our refund ids, carried in a refund's ``comments``.
OUR_REFUND_ID = re.compile(r"^rf_[0-9a-f]{24}$")

# What Flutterwave Standard (v3) takes, per the currency list of "Payment methods"
# (developer.flutterwave.com/docs/collecting-payments/payment-methods) and "Flutterwave
# Standard" (developer.flutterwave.com/docs/collecting-payments/standard).
CURRENCIES = frozenset(
    {
        "NGN",  # Nigeria
        "GHS",  # Ghana
        "KES",  # Kenya
        "UGX",  # Uganda
        "TZS",  # Tanzania
        "RWF",  # Rwanda
        "ZMW",  # Zambia
        "MWK",  # Malawi
        "ZAR",  # South Africa
        "EGP",  # Egypt
        "XAF",  # Central African CFA franc
        "XOF",  # West African CFA franc
        "USD",
        "EUR",
        "GBP",
    }
)

HEADER_VERIF_HASH = "verif-hash"


class TransactionStatus(StrEnum):
    """A v3 transaction's ``status``."""

    SUCCESSFUL = "successful"
    FAILED = "failed"
    PENDING = "pending"


class RefundState(StrEnum):
    """A v3 refund's ``status``: "new" and "pending" until the money has gone back."""

    COMPLETED = "completed"
    PENDING = "pending"
    NEW = "new"
    FAILED = "failed"


class EventType(StrEnum):
    CHARGE_COMPLETED = "charge.completed"


class AmountNotRepresentable(ValueError):
    """An amount with more decimals than its currency has."""


# -- amounts -------------------------------------------------------------------------------


def to_major(amount: int, currency: str) -> Decimal:
    """Minor units to Flutterwave's major units, exactly: 4500000 NGN -> 45000.00,
    1900 UGX -> 1900, 12345 KWD -> 12.345."""
    exponent = currency_exponent(currency)
    return Decimal(amount).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent))


def major_text(amount: int, currency: str) -> str:
    """The JSON number text for ``amount`` minor units: "45000.00", "1900", "12.345"."""
    return f"{to_major(amount, currency):f}"


def from_major(value: Any, currency: str) -> int:
    """Flutterwave's major-unit amount (an int, a ``Decimal`` from our parser, or a decimal
    string) to minor units. Raises ValueError for anything else, and for an amount finer than
    the currency's minor unit."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise ValueError(f"not an amount: {value!r}")
    try:
        major = Decimal(str(value).strip())
    except InvalidOperation as error:
        raise ValueError(f"not an amount: {value!r}") from error
    if not major.is_finite() or major.adjusted() > 18:
        raise ValueError(f"not an amount: {value!r}")
    minor = major.scaleb(currency_exponent(currency))
    if minor != minor.to_integral_value():
        raise AmountNotRepresentable(f"{value} {currency} is finer than the currency's minor unit")
    return int(minor)


# -- JSON ----------------------------------------------------------------------------------


def encode(body: Mapping[str, Any], *, amount: str | None = None) -> bytes:
    """``body`` as JSON, with ``"amount": <amount>`` written as a JSON number from its decimal
    text (json.dumps would need a float for that)."""
    text = json.dumps(dict(body), separators=(",", ":"), ensure_ascii=False)
    if amount is not None:
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", amount):
            raise ValueError(f"not an amount: {amount!r}")
        text = '{"amount":' + amount + ("," + text[1:] if len(text) > 2 else "}")
    return text.encode()


def decode(content: bytes) -> Any:
    """An answer's JSON, with every non-integer number as a ``Decimal``."""
    return json.loads(content, parse_float=Decimal, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# -- IDs -----------------------------------------------------------------------------------


def payment_id_of(tx_ref: str) -> str:
    return PREFIX + tx_ref


def tx_ref_of(payment_id: str) -> str | None:
    """Our tx_ref inside a payment id, or None when it cannot be one."""
    if not payment_id.startswith(PREFIX):
        return None
    tx_ref = payment_id[len(PREFIX) :]
    return tx_ref if TX_REF.fullmatch(tx_ref) else None


def numeric_id(value: Any) -> str | None:
    """A Flutterwave transaction or refund id (JSON integers) as a string, or None."""
    if isinstance(value, bool):
        return None
    text = str(value) if isinstance(value, int | str) else ""
    return text if NUMERIC_ID.fullmatch(text) else None


# -- requests ------------------------------------------------------------------------------


def _with_query(url: str, query: str) -> str:
    parts = urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit(parts._replace(query=joined))


def redirect_url(request: IntentRequest) -> str:
    """Where Flutterwave sends the customer after paying. It appends ``status``, ``tx_ref``
    and ``transaction_id`` to it, which we never believe: verify asks Flutterwave."""
    if request.return_url:
        return request.return_url
    return _with_query(f"{request.base_url.rstrip('/')}/", "provider=flutterwave")


def payment_request(request: IntentRequest, payment_id: str) -> bytes:
    """The body of ``POST /v3/payments``. ``tx_ref`` is our reference; the amount is the
    plan's, in major units."""
    if request.customer_email is None:
        raise ValueError("Flutterwave needs the customer's email")
    body = {
        "tx_ref": request.reference,
        "currency": request.plan.currency.upper(),
        "redirect_url": redirect_url(request),
        "customer": {"email": request.customer_email},
        "meta": {"payment_id": payment_id},
        "customizations": {"title": request.plan.name[:100]},
    }
    return encode(body, amount=major_text(request.plan.amount, request.plan.currency))


def refund_request(amount: int, currency: str, *, refund_id: str) -> bytes:
    """Always with an amount (none refunds the whole transaction, which is more than we mean
    whenever our view is behind Flutterwave's). Our refund id travels in ``comments``: it is
    how a refund whose answer was lost is found again, Flutterwave v3 having no idempotency
    key."""
    return encode({"comments": refund_id}, amount=major_text(amount, currency))


# -- responses -----------------------------------------------------------------------------


def transaction_status(value: Any) -> PaymentStatus:
    try:
        status = TransactionStatus(str(value).lower())
    except ValueError:
        return PaymentStatus.PENDING  # a word Flutterwave has not used before: not final
    match status:
        case TransactionStatus.SUCCESSFUL:
            return PaymentStatus.SUCCEEDED
        case TransactionStatus.FAILED:
            return PaymentStatus.FAILED
        case TransactionStatus.PENDING:
            return PaymentStatus.PENDING
        case _:
            assert_never(status)


def refund_status(value: Any) -> RefundStatus:
    try:
        status = RefundState(str(value).lower())
    except ValueError:
        return RefundStatus.PENDING
    match status:
        case RefundState.COMPLETED:
            return RefundStatus.SUCCEEDED
        case RefundState.PENDING | RefundState.NEW:
            return RefundStatus.PENDING
        case RefundState.FAILED:
            return RefundStatus.FAILED
        case _:
            assert_never(status)


def _amount_of(data: FlutterwaveObject) -> tuple[int, str] | None:
    currency = data.get("currency")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency):
        return None
    try:
        return from_major(data.get("amount"), currency), currency.upper()
    except ValueError:
        return None


def state_from_transaction(
    data: FlutterwaveObject, payment_id: str, *, expected: tuple[int, str] | None
) -> tuple[PaymentState, bool]:
    """A verified transaction in our terms, and whether its amount or currency departs from
    ``expected`` (ours, as we asked for it). A success whose amount or currency is not ours is
    a failure: the customer paid something else than the price."""
    status = transaction_status(data.get("status"))
    paid = _amount_of(data)
    mismatch = False
    if status is PaymentStatus.SUCCEEDED and expected is not None:
        mismatch = paid != (expected[0], expected[1].upper())
        if mismatch:
            status = PaymentStatus.FAILED
    payment_type = data.get("payment_type")
    return (
        PaymentState(
            payment_id=payment_id,
            status=status,
            amount=paid[0] if paid else None,
            currency=paid[1] if paid else None,
            # The transaction id, which refunds name: kept as the payment's capture id.
            capture_id=numeric_id(data.get("id")) if status.is_paid else None,
            payment_method=str(payment_type)[:40] if isinstance(payment_type, str) else None,
            vendor_status=str(data.get("status"))[:40],
        ),
        mismatch,
    )


def refund_result(
    data: FlutterwaveObject, currency: str, *, refund_id: str | None = None
) -> RefundResult:
    """A refund in our terms. Flutterwave's refund carries no currency: it is the
    transaction's, ``currency``. Raises ValueError for an object that is not a refund."""
    flw_id = numeric_id(data.get("id"))
    if flw_id is None:
        raise ValueError("a Flutterwave refund without an id")
    amount = from_major(data.get("amount_refunded"), currency)
    comments = data.get("comments", data.get("comment"))
    ours = comments if isinstance(comments, str) and OUR_REFUND_ID.fullmatch(comments) else None
    return RefundResult(
        provider_refund_id=flw_id,
        amount=amount,
        status=refund_status(data.get("status")),
        currency=currency.upper(),
        refund_id=refund_id or ours,
    )


def refund_comment(data: FlutterwaveObject) -> str | None:
    comments = data.get("comments", data.get("comment"))
    return comments if isinstance(comments, str) else None


def transaction_of_refund(data: FlutterwaveObject) -> str | None:
    return numeric_id(data.get("tx_id", data.get("transaction_id")))


# -- webhooks ------------------------------------------------------------------------------


def is_event(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and isinstance(payload.get("event"), str)
        and bool(payload["event"])
        and isinstance(payload.get("data"), Mapping)
    )


def _occurred_at(data: FlutterwaveObject) -> datetime | None:
    created = data.get("created_at")
    if not isinstance(created, str):
        return None
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return None


def webhook_event(payload: FlutterwaveObject) -> WebhookEvent:
    """Normalize one delivery. Always unverified: ``verif-hash`` is a shared secret sent
    as is, not a signature over the body, so the service re-reads the transaction."""
    event_type = str(payload["event"])[:100]
    data: FlutterwaveObject = payload["data"]
    tx_ref = data.get("tx_ref")
    tx_ref = tx_ref if isinstance(tx_ref, str) and TX_REF.fullmatch(tx_ref) else None
    flw_id = numeric_id(data.get("id")) or "unknown"
    # Flutterwave's v3 events have no id of their own: the transaction and the state it
    # claims name the event (duplicates are harmless anyway: the event only causes a read).
    event_id = f"{event_type}:{flw_id}:{str(data.get('status'))[:20]}"
    base: dict[str, Any] = {
        "event_id": event_id,
        "event_type": event_type,
        "verified": False,
        "occurred_at": _occurred_at(data),
        "reference": tx_ref,
        "payment_id": payment_id_of(tx_ref) if tx_ref else None,
    }
    if event_type == EventType.CHARGE_COMPLETED:
        # The state it claims: the service only takes it as a reason to verify.
        return WebhookEvent(**base, status=transaction_status(data.get("status")))
    return WebhookEvent(**base)
