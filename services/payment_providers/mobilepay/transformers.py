"""Conversions between the service's types and the Vipps MobilePay ePayment API's JSON, kept
apart from the calls.

Requests: the body of ``createPayment`` and the ``modificationAmount`` of capture and refund.
Responses: the payment (``GetPaymentResponse``), its event log and webhook events, to
``PaymentState``, ``RefundResult`` and ``WebhookEvent``. Unknown states map to pending: only an
explicit answer from Vipps MobilePay is final.

Amounts: the ePayment API counts in minor units already (``{"currency": "NOK", "value":
1000}`` is NOK 10.00), as the service does, so they pass through as integers.

References: the ePayment ``reference`` is ours, and our payment ID is ``mp_<reference>``. The
API allows ``^[a-zA-Z0-9-]{8,50}$``; our order references (``ord_<hex>``) become
``ord-<hex>``, and anything else that does not fit becomes a digest of itself.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, assert_never
from urllib.parse import urlencode

from models.payment import PaymentStatus, RefundStatus

from ..base import IntentRequest, PaymentState, RefundResult, WebhookEvent

VippsObject = Mapping[str, Any]

PREFIX = "mp_"
CURRENCIES = frozenset({"NOK", "DKK", "EUR"})
# The ePayment ``Reference`` and ``Idempotency-Key`` as the description constrains them.
REFERENCE = re.compile(r"^[a-zA-Z0-9-]{8,50}$")
IDEMPOTENCY_KEY_MAX = 50
# Amount.value's maximum in the description.
AMOUNT_MAX = 65_000_000
# What we say the payment is for, within paymentDescription's 3..100 characters.
DESCRIPTION_MIN, DESCRIPTION_MAX = 3, 100
# The metadata key that says how the payment is captured (the API keeps metadata and gives it
# back with the payment, so that verify knows without a store of its own).
CAPTURE_METHOD_KEY = "captureMethod"
# Our refund ids, as we send them as the refund's Idempotency-Key.
OUR_REFUND_ID = re.compile(r"^rf_[0-9a-f]{24}$")
# A refund made in the merchant portal carries no key of ours: it is named by its pspReference.
PORTAL_REFUND_PREFIX = "psp-"


class State(StrEnum):
    """``State`` of a payment (ePayment API)."""

    CREATED = "CREATED"
    ABORTED = "ABORTED"
    EXPIRED = "EXPIRED"
    AUTHORIZED = "AUTHORIZED"
    TERMINATED = "TERMINATED"


class EventName(StrEnum):
    """``PaymentEventName``: what happened to a payment (event log and webhooks)."""

    CREATED = "CREATED"
    ABORTED = "ABORTED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    CAPTURED = "CAPTURED"
    REFUNDED = "REFUNDED"
    AUTHORIZED = "AUTHORIZED"
    TERMINATED = "TERMINATED"


class UnreadablePayment(ValueError):
    """An answer that is not shaped like what the description promises."""


# -- IDs -----------------------------------------------------------------------------------


def vipps_reference(reference: str) -> str:
    """Our order reference as an ePayment reference: ``ord_ab12`` -> ``ord-ab12``."""
    candidate = reference.replace("_", "-")
    if REFERENCE.fullmatch(candidate):
        return candidate
    return "ref-" + hashlib.sha256(reference.encode()).hexdigest()[:40]


def payment_id_of(reference: str) -> str:
    return PREFIX + reference


def reference_of(payment_id: str) -> str | None:
    """The ePayment reference inside our payment ID, or None when it cannot be one (so that
    nothing else ever becomes part of a URL path)."""
    if not payment_id.startswith(PREFIX):
        return None
    reference = payment_id[len(PREFIX) :]
    return reference if REFERENCE.fullmatch(reference) else None


def idempotency_key(key: str) -> str:
    """The Idempotency-Key header: ``key`` when it fits the API's 50 characters, else a
    digest of it (stable, so that a retry still matches)."""
    if 0 < len(key) <= IDEMPOTENCY_KEY_MAX and key.isascii() and key.isprintable():
        return key
    return hashlib.sha256(key.encode()).hexdigest()[:IDEMPOTENCY_KEY_MAX]


# -- requests ------------------------------------------------------------------------------


def amount(value: int, currency: str) -> dict[str, Any]:
    return {"currency": currency.upper(), "value": value}


def return_url(request: IntentRequest) -> str:
    """Where the customer comes back to: the client's URL, else our own page with the
    payment named (the API appends nothing of its own)."""
    if request.return_url:
        return request.return_url
    payment_id = payment_id_of(vipps_reference(request.reference))
    query = urlencode({"provider": "mobilepay", "payment_id": payment_id})
    return f"{request.base_url.rstrip('/')}/?{query}"


def description(request: IntentRequest) -> str:
    text = request.plan.name.strip()[:DESCRIPTION_MAX]
    return text if len(text) >= DESCRIPTION_MIN else f"Plan {request.plan.code}"[:DESCRIPTION_MAX]


def create_payment_request(request: IntentRequest, *, capture_method: str) -> dict[str, Any]:
    """The body of ``POST /epayment/v1/payments``: a wallet payment in the browser."""
    return {
        "amount": amount(request.plan.amount, request.plan.currency),
        "paymentMethod": {"type": "WALLET"},
        "reference": vipps_reference(request.reference),
        "userFlow": "WEB_REDIRECT",
        "returnUrl": return_url(request),
        "paymentDescription": description(request),
        "metadata": {CAPTURE_METHOD_KEY: capture_method},
    }


def modification(value: int, currency: str) -> dict[str, Any]:
    """The body of capture and refund."""
    return {"modificationAmount": amount(value, currency)}


# -- responses -----------------------------------------------------------------------------


def _minor(value: Any) -> tuple[int, str] | None:
    """An ``Amount`` as (minor units, currency), or None when absent or not one."""
    if not isinstance(value, Mapping):
        return None
    currency, minor = value.get("currency"), value.get("value")
    if not isinstance(currency, str) or isinstance(minor, bool) or not isinstance(minor, int):
        return None
    if not 0 <= minor <= AMOUNT_MAX:
        return None
    return minor, currency.upper()


def _aggregate(payment: VippsObject, field: str) -> int:
    aggregate = payment.get("aggregate")
    found = _minor(aggregate.get(field)) if isinstance(aggregate, Mapping) else None
    return found[0] if found else 0


def status_of(state: Any, *, captured: int) -> PaymentStatus:
    """Our status for a payment in ``state`` with ``captured`` minor units taken."""
    try:
        known = State(str(state))
    except ValueError:
        return PaymentStatus.PENDING  # a state newer than this code: not final
    match known:
        case State.CREATED:
            return PaymentStatus.PENDING
        case State.AUTHORIZED:
            # AUTHORIZED stays the state through captures and refunds: the aggregate says
            # whether money was taken.
            return PaymentStatus.SUCCEEDED if captured > 0 else PaymentStatus.REQUIRES_CAPTURE
        case State.ABORTED | State.TERMINATED:
            return PaymentStatus.CANCELED
        case State.EXPIRED:
            return PaymentStatus.EXPIRED
        case _:
            assert_never(known)


def capture_method_of(payment: VippsObject) -> str:
    metadata = payment.get("metadata")
    method = metadata.get(CAPTURE_METHOD_KEY) if isinstance(metadata, Mapping) else None
    return "manual" if method == "manual" else "automatic"


def check_payment(payment: Any) -> VippsObject:
    """``payment`` if it is a payment (or modification) object we can read."""
    if (
        not isinstance(payment, Mapping)
        or not isinstance(payment.get("reference"), str)
        or not REFERENCE.fullmatch(payment["reference"])
        or _minor(payment.get("amount")) is None
    ):
        raise UnreadablePayment("not a payment")
    return payment


def state_of_payment(
    payment: VippsObject, refunds: tuple[RefundResult, ...] | None = None
) -> PaymentState:
    reference = str(payment["reference"])
    planned = _minor(payment.get("amount"))
    assert planned is not None  # check_payment
    captured = _aggregate(payment, "capturedAmount")
    method = payment.get("paymentMethod")
    method_type = method.get("type") if isinstance(method, Mapping) else None
    psp = payment.get("pspReference")
    return PaymentState(
        payment_id=payment_id_of(reference),
        status=status_of(payment.get("state"), captured=captured),
        amount=planned[0],
        currency=planned[1],
        amount_captured=captured if captured > 0 else None,
        capture_id=str(psp) if captured > 0 and isinstance(psp, str) and psp else None,
        # WALLET: the Vipps or MobilePay app; CARD: a card outside the app.
        payment_method=str(method_type).lower() if isinstance(method_type, str) else None,
        vendor_status=(
            f"{payment.get('state')}, captured {captured}, "
            f"cancelled {_aggregate(payment, 'cancelledAmount')}, "
            f"refunded {_aggregate(payment, 'refundedAmount')}"
        ),
        refunds=refunds,
    )


def amount_refunded(payment: VippsObject) -> int:
    return _aggregate(payment, "refundedAmount")


def amount_captured(payment: VippsObject) -> int:
    return _aggregate(payment, "capturedAmount")


def amount_cancelled(payment: VippsObject) -> int:
    return _aggregate(payment, "cancelledAmount")


def refund_key_of(event: VippsObject) -> str | None:
    """How a refund event is named: our refund id (its Idempotency-Key), else its
    pspReference (a refund made in the merchant portal)."""
    key = event.get("idempotencyKey")
    if isinstance(key, str) and OUR_REFUND_ID.fullmatch(key):
        return key
    psp = event.get("pspReference")
    return f"{PORTAL_REFUND_PREFIX}{psp}" if isinstance(psp, str) and psp else None


def refund_of_event(event: VippsObject) -> RefundResult | None:
    """A REFUNDED event as a refund; None for any other event or a failed one (the API
    made no refund: nothing to count)."""
    if event.get("name") != EventName.REFUNDED or event.get("success") is not True:
        return None
    money = _minor(event.get("amount"))
    name = refund_key_of(event)
    if money is None or name is None:
        return None
    ours = name if OUR_REFUND_ID.fullmatch(name) else None
    # A refund the API reports is done: the ePayment API refunds synchronously.
    return RefundResult(
        provider_refund_id=name,
        amount=money[0],
        currency=money[1],
        status=RefundStatus.SUCCEEDED,
        refund_id=ours,
    )


def refunds_of_events(events: Any) -> tuple[RefundResult, ...]:
    if not isinstance(events, list):
        raise UnreadablePayment("the event log is not a list")
    found = (refund_of_event(item) for item in events if isinstance(item, Mapping))
    return tuple(refund for refund in found if refund is not None)


# -- webhooks ------------------------------------------------------------------------------


def is_event(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and isinstance(payload.get("reference"), str)
        and REFERENCE.fullmatch(payload["reference"]) is not None
        and isinstance(payload.get("name"), str)
        and isinstance(payload.get("pspReference"), str)
        and isinstance(payload.get("success"), bool)
    )


def _occurred_at(event: VippsObject) -> datetime | None:
    raw = event.get("timestamp")
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None


def event_id_of(event: VippsObject) -> str:
    """The API gives events no ID of their own: one delivery is the payment, what happened,
    the modification's pspReference and its key; a redelivery has the same four."""
    parts = [
        str(event["reference"]),
        str(event["name"]),
        str(event["pspReference"]),
        str(event.get("idempotencyKey") or ""),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def event_name(event: VippsObject) -> EventName | None:
    try:
        return EventName(str(event["name"]))
    except ValueError:
        return None


def webhook_event(
    event: VippsObject, *, verified: bool, status: PaymentStatus | None
) -> WebhookEvent:
    """Normalize one event. ``status`` is the payment's status as the provider read it where
    the event's name alone does not tell (see ``MobilePayProvider.parse_webhook``)."""
    reference = str(event["reference"])
    return WebhookEvent(
        event_id=event_id_of(event),
        event_type=f"epayments.payment.{str(event['name']).lower()}.v1",
        verified=verified,
        payment_id=payment_id_of(reference),
        status=status,
        refund=refund_of_event(event),
        occurred_at=_occurred_at(event),
    )


def status_named_by(name: EventName) -> PaymentStatus | None:
    """The status an event's name alone proves, or None when the payment must be read
    (AUTHORIZED: it may be captured at once; CANCELLED: the rest of a partly captured one
    may be released; CAPTURED and REFUNDED: amounts)."""
    match name:
        case EventName.CREATED:
            return PaymentStatus.PENDING
        case EventName.ABORTED | EventName.TERMINATED:
            return PaymentStatus.CANCELED
        case EventName.EXPIRED:
            return PaymentStatus.EXPIRED
        case EventName.AUTHORIZED | EventName.CANCELLED | EventName.CAPTURED:
            return None
        case EventName.REFUNDED:
            return None
        case _:
            assert_never(name)
