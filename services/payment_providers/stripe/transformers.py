"""Conversions between the service's types and Stripe's, kept apart from the calls.

Requests: what we send to create a Checkout Session or a PaymentIntent. Responses: Stripe's
objects (as plain dicts, from the SDK's ``to_dict()`` or a webhook's JSON) to ``PaymentState``,
``RefundResult`` and ``WebhookEvent``; a created session or intent to ``IntentResult`` straight
from the SDK's object. Unknown Stripe statuses map to pending: only an explicit success or
failure from Stripe is final.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from models.payment import PaymentStatus, RefundStatus

from ..base import (
    CardDetails,
    IntentRequest,
    IntentResult,
    PaymentState,
    RefundResult,
    WebhookEvent,
)

if TYPE_CHECKING:
    import stripe
    from stripe.params import PaymentIntentCaptureParams, PaymentIntentCreateParams
    from stripe.params.checkout import SessionCreateParams

StripeObject = Mapping[str, Any]

UI_MODES = ("hosted", "embedded")
CAPTURE_METHODS = ("automatic", "manual")

# PaymentIntent.status -> ours. requires_payment_method is also where an intent returns after
# a declined attempt: the customer may still pay, so it is pending, not failed.
PAYMENT_INTENT_STATUS: Mapping[str, PaymentStatus] = {
    "requires_payment_method": PaymentStatus.PENDING,
    "requires_confirmation": PaymentStatus.PENDING,
    "requires_action": PaymentStatus.PENDING,
    "processing": PaymentStatus.PROCESSING,
    "requires_capture": PaymentStatus.REQUIRES_CAPTURE,
    "succeeded": PaymentStatus.SUCCEEDED,
    "canceled": PaymentStatus.CANCELED,
}

# Webhook event type -> the status the event claims (None: the type carries no status).
# payment_intent.payment_failed is pending on purpose: Stripe puts the intent back to
# requires_payment_method and the customer may retry on the same page. It is final only when
# nobody retries, which Stripe reports later as checkout.session.expired or
# payment_intent.canceled.
EVENT_STATUS: Mapping[str, PaymentStatus] = {
    "checkout.session.expired": PaymentStatus.EXPIRED,
    "checkout.session.async_payment_succeeded": PaymentStatus.SUCCEEDED,
    "checkout.session.async_payment_failed": PaymentStatus.FAILED,
    "payment_intent.succeeded": PaymentStatus.SUCCEEDED,
    "payment_intent.processing": PaymentStatus.PROCESSING,
    "payment_intent.payment_failed": PaymentStatus.PENDING,
    "payment_intent.canceled": PaymentStatus.CANCELED,
    "payment_intent.amount_capturable_updated": PaymentStatus.REQUIRES_CAPTURE,
}
# Events about one refund, carrying the Refund object. charge.refunded is not among them: it
# carries the charge, whose refunds the refund.* events of the same change already name.
REFUND_EVENTS = frozenset(
    {"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"}
)
HANDLED_EVENTS = frozenset({*EVENT_STATUS, "checkout.session.completed", *REFUND_EVENTS})

REFUND_STATUS: Mapping[str, RefundStatus] = {
    "succeeded": RefundStatus.SUCCEEDED,
    "pending": RefundStatus.PENDING,
    "requires_action": RefundStatus.PENDING,
    "failed": RefundStatus.FAILED,
    "canceled": RefundStatus.CANCELED,
}


# -- requests ------------------------------------------------------------------------------


def metadata_for(request: IntentRequest) -> dict[str, str]:
    """What we attach to Stripe's objects so that events lead back to our payment."""
    metadata = {"reference": request.reference, "plan": request.plan.code}
    if request.user_id:
        metadata["user_id"] = request.user_id
    return metadata


def _with_query(url: str, query: str) -> str:
    parts = urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit(parts._replace(query=joined))


def checkout_urls(request: IntentRequest) -> tuple[str, str]:
    """success_url and cancel_url. Stripe fills in ``{CHECKOUT_SESSION_ID}`` on success, so
    the page the customer lands on can ask us to verify that payment."""
    base = request.base_url.rstrip("/")
    success = request.return_url or f"{base}/"
    cancel = request.cancel_url or request.return_url or f"{base}/"
    success = _with_query(success, "payment_id={CHECKOUT_SESSION_ID}&status=succeeded")
    return success, cancel


def checkout_session_params(request: IntentRequest, *, capture_method: str) -> SessionCreateParams:
    metadata = metadata_for(request)
    success_url, cancel_url = checkout_urls(request)
    params: SessionCreateParams = {
        "mode": "payment",
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": request.plan.currency.lower(),
                    "unit_amount": request.plan.amount,
                    "product_data": {"name": request.plan.name},
                },
            }
        ],
        "success_url": success_url,
        "cancel_url": cancel_url,
        "client_reference_id": request.reference,
        "metadata": metadata,
        "payment_intent_data": {"metadata": metadata},
    }
    if capture_method == "manual":
        params["payment_intent_data"]["capture_method"] = "manual"
    if request.customer_email:
        params["customer_email"] = request.customer_email
    return params


def payment_intent_params(
    request: IntentRequest, *, capture_method: str
) -> PaymentIntentCreateParams:
    params: PaymentIntentCreateParams = {
        "amount": request.plan.amount,
        "currency": request.plan.currency.lower(),
        "automatic_payment_methods": {"enabled": True},
        "description": request.plan.name,
        "metadata": metadata_for(request),
    }
    if capture_method == "manual":
        params["capture_method"] = "manual"
    return params


def capture_params(*, amount: int | None, expand: list[str]) -> PaymentIntentCaptureParams:
    """A capture of all that is authorized, or of ``amount`` of it: Stripe releases the rest
    (``amount_to_capture``; an intent is captured once, so the rest cannot be taken later)."""
    params: PaymentIntentCaptureParams = {"expand": expand}
    if amount is not None:
        params["amount_to_capture"] = amount
    return params


# -- responses -----------------------------------------------------------------------------


def _expanded(value: Any) -> StripeObject | None:
    """An expanded object, or None when Stripe gave an ID (or nothing)."""
    return value if isinstance(value, Mapping) else None


def _id_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def _upper(currency: Any) -> str | None:
    return currency.upper() if isinstance(currency, str) else None


def payment_intent_id_of(session: StripeObject) -> str | None:
    return _id_of(session.get("payment_intent"))


def status_of_payment_intent(intent: StripeObject) -> PaymentStatus:
    """The intent's status. Refunds are followed one by one (refund.* events, the refunds
    API), not read off the charge's running total."""
    return PAYMENT_INTENT_STATUS.get(str(intent.get("status")), PaymentStatus.PENDING)


def _minor_units(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def amount_received(intent: StripeObject) -> int | None:
    """What the intent collected (``amount_received``): all of it, or what a capture of part
    of it took."""
    return _minor_units(intent.get("amount_received"))


def amount_captured_of(intent: StripeObject | None) -> int | None:
    """What a partial capture took: the intent's ``amount_received`` when it is less than its
    ``amount`` (the rest was released). None when all of it was taken, or nothing yet."""
    if intent is None:
        return None
    received = amount_received(intent)
    amount = _minor_units(intent.get("amount"))
    if received is None or amount is None or not 0 < received < amount:
        return None
    return received


def _charge_facts(intent: StripeObject | None) -> dict[str, Any]:
    charge = _expanded(intent.get("latest_charge")) if intent is not None else None
    if charge is None:
        return {"capture_id": None, "payment_method": None}
    details = _expanded(charge.get("payment_method_details")) or {}
    method = details.get("type")
    return {
        "capture_id": _id_of(charge) if charge.get("captured") else None,
        "payment_method": method if isinstance(method, str) else None,
        "card": _card_of(details),
    }


def _card_of(details: StripeObject) -> CardDetails | None:
    """The receipt's card line from the charge's payment_method_details.card: brand, last
    four and the wallet (apple_pay, google_pay, link, ...) it came through, if any."""
    card = _expanded(details.get("card"))
    if card is None:
        return None
    wallet = _expanded(card.get("wallet"))
    brand, last4 = card.get("brand"), card.get("last4")
    wallet_type = wallet.get("type") if wallet is not None else None
    return CardDetails(
        brand=brand if isinstance(brand, str) else None,
        last4=last4 if isinstance(last4, str) else None,
        wallet=wallet_type if isinstance(wallet_type, str) else None,
    )


def state_from_payment_intent(
    intent: StripeObject, *, payment_id: str | None = None
) -> PaymentState:
    """``intent`` should have ``latest_charge`` expanded, for refunds and the method."""
    return PaymentState(
        payment_id=payment_id or str(intent["id"]),
        status=status_of_payment_intent(intent),
        amount=intent.get("amount"),
        currency=_upper(intent.get("currency")),
        amount_captured=amount_captured_of(intent),
        vendor_status=str(intent.get("status")),
        **_charge_facts(intent),
    )


def state_from_checkout_session(session: StripeObject) -> PaymentState:
    """``session`` should have ``payment_intent`` and ``payment_intent.latest_charge``
    expanded. The intent says most (capture, refunds); the session says what the intent
    cannot: that it expired, or that it was paid before we could see the intent."""
    intent = _expanded(session.get("payment_intent"))
    session_status = session.get("status")
    payment_status = session.get("payment_status")
    status = status_of_payment_intent(intent) if intent is not None else PaymentStatus.PENDING
    if session_status == "expired" and status in (
        PaymentStatus.PENDING,
        PaymentStatus.CANCELED,  # Stripe cancels the intent of a session that expires
    ):
        status = PaymentStatus.EXPIRED
    elif (
        session_status == "complete"
        and payment_status == "paid"
        and status in (PaymentStatus.PENDING, PaymentStatus.PROCESSING)
    ):
        status = PaymentStatus.SUCCEEDED
    vendor = f"session {session_status}/{payment_status}"
    if intent is not None:
        vendor += f", payment_intent {intent.get('status')}"
    amount = session.get("amount_total")
    if amount is None and intent is not None:
        amount = intent.get("amount")
    return PaymentState(
        payment_id=str(session["id"]),
        status=status,
        amount=amount,
        currency=_upper(session.get("currency") or (intent or {}).get("currency")),
        amount_captured=amount_captured_of(intent),
        vendor_status=vendor,
        **_charge_facts(intent),
    )


def intent_result_from_session(session: stripe.checkout.Session) -> IntentResult:
    """A created Checkout Session, read from the SDK's object: its ID and URL are all we
    need of it."""
    return IntentResult(
        payment_id=session.id,
        status=PaymentStatus.PENDING,
        redirect_url=session.url,
    )


def intent_result_from_payment_intent(
    intent: stripe.PaymentIntent, *, publishable_key: str | None
) -> IntentResult:
    """A created PaymentIntent, read from the SDK's object."""
    return IntentResult(
        payment_id=intent.id,
        status=PaymentStatus.PENDING,
        client_secret=intent.client_secret,
        publishable_key=publishable_key,
    )


def refund_metadata(*, refund_id: str, payment_id: str, reason: str | None) -> dict[str, str]:
    """What we attach to a Refund, so that its events lead back to our record."""
    metadata = {"refund_id": refund_id, "payment_id": payment_id}
    if reason:
        metadata["reason"] = reason[:500]  # Stripe's own `reason` is an enum, not free text
    return metadata


def refund_result(refund: StripeObject) -> RefundResult:
    """A Refund object (from the API or an event) in our terms. Raises ValueError for an
    object that is not shaped like one."""
    amount = refund.get("amount")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise ValueError("a Stripe refund's amount is a positive integer")
    metadata = _expanded(refund.get("metadata")) or {}
    ours = metadata.get("refund_id")
    failure = refund.get("failure_reason")
    return RefundResult(
        provider_refund_id=_required_id(refund),
        amount=amount,
        status=REFUND_STATUS.get(str(refund.get("status")), RefundStatus.PENDING),
        currency=_upper(refund.get("currency")),
        refund_id=ours if isinstance(ours, str) and ours else None,
        failure_code=failure if isinstance(failure, str) else None,
    )


def _required_id(obj: StripeObject) -> str:
    found = _id_of(obj)
    if not found:
        raise ValueError("a Stripe object without an id")
    return found


# -- webhooks ------------------------------------------------------------------------------


def is_event(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and payload.get("object") == "event"
        and isinstance(payload.get("id"), str)
        and isinstance(payload.get("type"), str)
        and isinstance(payload.get("data"), Mapping)
        and isinstance(payload["data"].get("object"), Mapping)
    )


def reference_of(obj: StripeObject) -> str | None:
    """Our order reference, from the metadata we put on Stripe's objects."""
    metadata = _expanded(obj.get("metadata")) or {}
    reference = metadata.get("reference")
    return reference if isinstance(reference, str) and reference else None


def webhook_event(event: StripeObject) -> WebhookEvent:
    """Normalize one verified event. A refund made at Stripe directly comes without our
    metadata: the provider looks the reference up on its intent. Raises ValueError for an
    event whose object is not shaped as its type says."""
    event_type = str(event["type"])
    obj: StripeObject = event["data"]["object"]
    created = event.get("created")
    base: dict[str, Any] = {
        "event_id": str(event["id"]),
        "event_type": event_type,
        "verified": True,
        "occurred_at": moment(created),
    }
    if event_type not in HANDLED_EVENTS:
        return WebhookEvent(**base)
    if event_type.startswith("checkout.session."):
        status = EVENT_STATUS.get(event_type)
        if event_type == "checkout.session.completed":
            # Paid now, or completed with the money still to come (manual capture, or a
            # delayed method that ends in async_payment_succeeded/failed).
            status = (
                PaymentStatus.SUCCEEDED
                if obj.get("payment_status") == "paid"
                else PaymentStatus.PENDING
            )
        return WebhookEvent(
            **base, payment_id=_id_of(obj), status=status, reference=reference_of(obj)
        )
    if event_type in REFUND_EVENTS:
        metadata = _expanded(obj.get("metadata")) or {}
        ours = metadata.get("payment_id")
        return WebhookEvent(
            **base,
            payment_id=ours if isinstance(ours, str) else _id_of(obj.get("payment_intent")),
            refund=refund_result(obj),
            reference=reference_of(obj),
        )
    # payment_intent.*: the intent itself, which says what a partial capture took
    return WebhookEvent(
        **base,
        payment_id=_id_of(obj),
        status=EVENT_STATUS[event_type],
        reference=reference_of(obj),
        amount_captured=amount_captured_of(obj),
    )


def moment(created: Any) -> datetime | None:
    """An event's ``created``, when it is a time at all (not 1e300, not a bool)."""
    if not isinstance(created, int | float) or isinstance(created, bool):
        return None
    try:
        return datetime.fromtimestamp(created, UTC)
    except (OverflowError, OSError, ValueError):
        return None
