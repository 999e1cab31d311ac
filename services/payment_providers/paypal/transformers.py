"""Conversions between the service's types and PayPal's JSON, kept apart from the calls.

Requests: the Orders v2 body that creates an order, and the money objects of refunds.
Responses: PayPal's orders, captures and refunds (plain dicts from its JSON) to
``PaymentState``, ``IntentResult``, ``RefundResult`` and ``WebhookEvent``. Unknown PayPal
statuses map to pending: only an explicit success or failure from PayPal is final.

Amounts: the service counts in ISO 4217 minor units; PayPal takes decimal strings with as
many decimals as *it* allows for the currency, which is not always ISO's exponent: HUF and
TWD have two decimals in ISO 4217 but none at PayPal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from models.payment import PaymentStatus, RefundStatus
from services.money import currency_exponent

from ..base import IntentRequest, IntentResult, PaymentState, RefundResult, WebhookEvent

PayPalObject = Mapping[str, Any]

PREFIX = "pp_"
# PayPal's IDs (orders, captures, refunds) as its descriptions constrain them. Anything else
# is refused before it can become part of a URL path.
PAYPAL_ID = re.compile(r"^[A-Z0-9]{1,36}$")
# PayPal-Request-Id: at most 108 characters (Orders v2).
REQUEST_ID_MAX = 108
# Currencies whose amounts PayPal takes without decimals, whatever ISO 4217 says.
PAYPAL_NO_DECIMALS = frozenset({"HUF", "JPY", "TWD"})

ORDER_STATUS: Mapping[str, PaymentStatus] = {
    "CREATED": PaymentStatus.PENDING,
    "SAVED": PaymentStatus.PENDING,
    "PAYER_ACTION_REQUIRED": PaymentStatus.PENDING,
    "APPROVED": PaymentStatus.REQUIRES_CAPTURE,
    "VOIDED": PaymentStatus.CANCELED,
    # COMPLETED: decided by the capture, below.
}
# A COMPLETED order's capture. PENDING: PayPal holds the money for review or an eCheck; it
# reports the end with PAYMENT.CAPTURE.COMPLETED or .DENIED.
CAPTURE_STATUS: Mapping[str, PaymentStatus] = {
    "COMPLETED": PaymentStatus.SUCCEEDED,
    "PENDING": PaymentStatus.PROCESSING,
    "PARTIALLY_REFUNDED": PaymentStatus.PARTIALLY_REFUNDED,
    "REFUNDED": PaymentStatus.REFUNDED,
    "DECLINED": PaymentStatus.FAILED,
    "FAILED": PaymentStatus.FAILED,
}
REFUND_STATUS: Mapping[str, RefundStatus] = {
    "COMPLETED": RefundStatus.SUCCEEDED,
    "PENDING": RefundStatus.PENDING,
    "FAILED": RefundStatus.FAILED,
    "CANCELLED": RefundStatus.CANCELED,
}
# Our refund ids, as we send them in a refund's custom_id. A refund made at PayPal directly
# carries the capture's custom_id instead (our order reference).
_OUR_REFUND_ID = re.compile(r"^rf_[0-9a-f]{24}$")

EVENT_ORDER_APPROVED = "CHECKOUT.ORDER.APPROVED"
EVENT_CAPTURE_COMPLETED = "PAYMENT.CAPTURE.COMPLETED"
EVENT_CAPTURE_DENIED = "PAYMENT.CAPTURE.DENIED"
EVENT_CAPTURE_REFUNDED = "PAYMENT.CAPTURE.REFUNDED"
# PayPal gave money back on its own (a reversal): a refund we did not ask for.
EVENT_CAPTURE_REVERSED = "PAYMENT.CAPTURE.REVERSED"
# Events whose resource is a refund. A refund PayPal denies arrives as a refund resource whose
# status says FAILED; whatever the event's name, the resource's status decides.
REFUND_EVENTS = frozenset({EVENT_CAPTURE_REFUNDED, EVENT_CAPTURE_REVERSED})
HANDLED_EVENTS = frozenset(
    {EVENT_ORDER_APPROVED, EVENT_CAPTURE_COMPLETED, EVENT_CAPTURE_DENIED, *REFUND_EVENTS}
)

_CAPTURE_LINK = re.compile(r"/v2/payments/captures/([A-Z0-9]{1,36})/?$")


class AmountNotRepresentable(ValueError):
    """An amount PayPal cannot take in this currency (HUF 10.50: PayPal has no HUF cents)."""


# -- amounts -------------------------------------------------------------------------------


def paypal_decimals(currency: str) -> int:
    code = currency.upper()
    return 0 if code in PAYPAL_NO_DECIMALS else currency_exponent(code)


def to_paypal_value(amount: int, currency: str) -> str:
    """Minor units to PayPal's decimal string: 1900 EUR -> "19.00", 1900 JPY -> "1900",
    100000 HUF -> "1000". Raises ``AmountNotRepresentable`` for HUF 1050 (10.50)."""
    iso = currency_exponent(currency)
    major = Decimal(amount).scaleb(-iso)
    places = paypal_decimals(currency)
    quantum = Decimal(1).scaleb(-places)
    value = major.quantize(quantum)
    if value != major:
        raise AmountNotRepresentable(
            f"{major} {currency.upper()} has more decimals than PayPal takes ({places})"
        )
    return f"{value:f}"


def from_paypal_value(value: Any, currency: str) -> int:
    """PayPal's decimal string to minor units: "19.00" EUR -> 1900, "1000" HUF -> 100000."""
    try:
        major = Decimal(str(value))
    except InvalidOperation as error:
        raise ValueError(f"not an amount: {value!r}") from error
    # Nothing PayPal moves is infinite, NaN or beyond 10^18 major units; refusing those first
    # also keeps a value like "1e300000" from costing seconds of CPU in int() below.
    if not major.is_finite() or major.adjusted() > 18:
        raise ValueError(f"not an amount: {value!r}")
    minor = major.scaleb(currency_exponent(currency))
    if minor != minor.to_integral_value():
        raise ValueError(f"{value} {currency} is finer than the currency's minor unit")
    return int(minor)


def money(amount: int, currency: str) -> dict[str, str]:
    return {"currency_code": currency.upper(), "value": to_paypal_value(amount, currency)}


def _minor(money_object: Any) -> tuple[int, str] | None:
    """A PayPal money object as (minor units, currency), or None when absent or odd."""
    if not isinstance(money_object, Mapping):
        return None
    currency = money_object.get("currency_code")
    if not isinstance(currency, str):
        return None
    try:
        return from_paypal_value(money_object.get("value"), currency), currency.upper()
    except ValueError:
        return None


# -- IDs -----------------------------------------------------------------------------------


def order_id_of(payment_id: str) -> str | None:
    """The PayPal order ID inside our payment ID, or None when it cannot be one."""
    if not payment_id.startswith(PREFIX):
        return None
    order_id = payment_id[len(PREFIX) :]
    return order_id if PAYPAL_ID.fullmatch(order_id) else None


def payment_id_of(order_id: str) -> str:
    return PREFIX + order_id


def is_paypal_id(value: Any) -> bool:
    return isinstance(value, str) and PAYPAL_ID.fullmatch(value) is not None


# -- requests ------------------------------------------------------------------------------


def _with_query(url: str, query: str) -> str:
    parts = urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit(parts._replace(query=joined))


def experience_urls(request: IntentRequest) -> tuple[str, str]:
    """Where PayPal sends the buyer back. PayPal appends ``token=<order id>`` (and
    ``PayerID`` after an approval); our fallbacks say which provider that token belongs to."""
    base = request.base_url.rstrip("/")
    return_url = request.return_url or _with_query(f"{base}/", "provider=paypal&status=approved")
    cancel_url = request.cancel_url or _with_query(f"{base}/", "provider=paypal&status=canceled")
    return return_url, cancel_url


def order_request(request: IntentRequest) -> dict[str, Any]:
    """The body of ``POST /v2/checkout/orders``: one purchase unit, captured after approval.

    ``reference_id`` and ``custom_id`` both carry our reference: ``custom_id`` is the one
    PayPal copies onto captures (and so into capture webhooks), which is how an event about
    a capture leads back to our payment.
    """
    return_url, cancel_url = experience_urls(request)
    paypal: dict[str, Any] = {
        "experience_context": {
            "return_url": return_url,
            "cancel_url": cancel_url,
            "user_action": "PAY_NOW",
            # Plans are digital: nothing to ship, and no eCheck that would leave the capture
            # pending for days.
            "shipping_preference": "NO_SHIPPING",
            "payment_method_preference": "IMMEDIATE_PAYMENT_REQUIRED",
        }
    }
    if request.customer_email:
        paypal["email_address"] = request.customer_email
    return {
        "intent": "CAPTURE",
        "purchase_units": [
            {
                "reference_id": request.reference,
                "custom_id": request.reference,
                "description": request.plan.name[:127],
                "amount": money(request.plan.amount, request.plan.currency),
            }
        ],
        "payment_source": {"paypal": paypal},
    }


def refund_request(
    amount: int, currency: str, *, refund_id: str, reason: str | None
) -> dict[str, Any]:
    # Always with an amount: an empty body refunds "whatever is left", which is more than
    # we mean whenever our view of the payment is behind PayPal's. Our refund id goes in
    # custom_id, so that the refund's events lead back to our record.
    body: dict[str, Any] = {"amount": money(amount, currency), "custom_id": refund_id}
    if reason:
        body["note_to_payer"] = reason[:255]
    return body


# -- responses -----------------------------------------------------------------------------


def _first_unit(order: PayPalObject) -> PayPalObject:
    units = order.get("purchase_units")
    if isinstance(units, list) and units and isinstance(units[0], Mapping):
        return units[0]
    return {}


def _payments(order: PayPalObject) -> PayPalObject:
    payments = _first_unit(order).get("payments")
    return payments if isinstance(payments, Mapping) else {}


def _objects(value: Any) -> list[PayPalObject]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def capture_of(order: PayPalObject) -> PayPalObject | None:
    """The order's capture. An order with intent CAPTURE has at most one that counts: the
    latest one that was not declined, else the latest."""
    captures = _objects(_payments(order).get("captures"))
    if not captures:
        return None
    for capture in reversed(captures):
        if capture.get("status") not in ("DECLINED", "FAILED"):
            return capture
    return captures[-1]


def reference_of(obj: PayPalObject) -> str | None:
    """Our reference, from the ``custom_id`` we gave the order (PayPal copies it onto
    captures and refunds)."""
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str):
        custom_id = _first_unit(obj).get("custom_id")
    if isinstance(custom_id, str) and _OUR_REFUND_ID.match(custom_id):
        return None  # a refund's own id, not the order's reference
    return custom_id if isinstance(custom_id, str) and custom_id else None


def link(obj: PayPalObject, *rels: str) -> str | None:
    """The href of the first HATEOAS link with one of ``rels``, in that order of preference."""
    links = _objects(obj.get("links"))
    for rel in rels:
        for item in links:
            if item.get("rel") == rel and isinstance(item.get("href"), str):
                return str(item["href"])
    return None


def approval_url(order: PayPalObject) -> str | None:
    # "payer-action" when the order was made with payment_source.paypal, "approve" otherwise.
    return link(order, "payer-action", "approve")


def refunds_of(order: PayPalObject) -> tuple[RefundResult, ...]:
    """The order's refunds, as PayPal lists them on its captures."""
    results = []
    for refund in _objects(_payments(order).get("refunds")):
        try:
            results.append(refund_result(refund))
        except ValueError:
            continue  # not shaped like a refund: nothing we can count
    return tuple(results)


def payment_method_of(order: PayPalObject) -> str | None:
    source = order.get("payment_source")
    if isinstance(source, Mapping) and source:
        return str(next(iter(source)))
    return None


def status_of_order(order: PayPalObject) -> PaymentStatus:
    status = order.get("status")
    if status == "COMPLETED":
        capture = capture_of(order)
        if capture is None:
            return PaymentStatus.PENDING  # completed, but not by a capture we can see
        return CAPTURE_STATUS.get(str(capture.get("status")), PaymentStatus.PENDING)
    return ORDER_STATUS.get(str(status), PaymentStatus.PENDING)


def state_from_order(order: PayPalObject) -> PaymentState:
    order_id = str(order["id"])
    capture = capture_of(order)
    status = status_of_order(order)
    amount = _minor(_first_unit(order).get("amount"))
    captured_ok = capture is not None and capture.get("status") not in ("DECLINED", "FAILED")
    vendor = f"order {order.get('status')}"
    if capture is not None:
        vendor += f", capture {capture.get('status')}"
    return PaymentState(
        payment_id=payment_id_of(order_id),
        status=status,
        amount=amount[0] if amount else None,
        currency=amount[1] if amount else None,
        refunds=refunds_of(order),
        capture_id=str(capture["id"]) if captured_ok and capture and "id" in capture else None,
        payment_method=payment_method_of(order),
        vendor_status=vendor,
    )


def intent_result(order: PayPalObject) -> IntentResult:
    return IntentResult(
        payment_id=payment_id_of(str(order["id"])),
        status=ORDER_STATUS.get(str(order.get("status")), PaymentStatus.PENDING),
        redirect_url=approval_url(order),
    )


def refund_result(
    refund: PayPalObject, *, amount: int | None = None, currency: str | None = None
) -> RefundResult:
    """A refund resource in our terms. ``amount`` and ``currency`` are what we asked for,
    used when PayPal's answer is minimal (no representation). Raises ValueError for an
    object that is not shaped like a refund."""
    refund_id = refund.get("id")
    if not is_paypal_id(refund_id):
        raise ValueError("a PayPal refund without an id")
    refunded = _minor(refund.get("amount"))
    if refunded is None and amount is None:
        raise ValueError("a PayPal refund without an amount")
    custom_id = refund.get("custom_id")
    ours = custom_id if isinstance(custom_id, str) and _OUR_REFUND_ID.match(custom_id) else None
    return RefundResult(
        provider_refund_id=str(refund_id),
        amount=refunded[0] if refunded else int(amount or 0),
        status=REFUND_STATUS.get(str(refund.get("status")), RefundStatus.PENDING),
        currency=refunded[1] if refunded else currency,
        refund_id=ours,
    )


# -- webhooks ------------------------------------------------------------------------------


def is_event(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and isinstance(payload.get("id"), str)
        and bool(payload["id"])
        and isinstance(payload.get("event_type"), str)
        and bool(payload["event_type"])
        and isinstance(payload.get("resource", {}), Mapping)
    )


def _occurred_at(event: PayPalObject) -> datetime | None:
    created = event.get("create_time")
    if not isinstance(created, str):
        return None
    try:
        return datetime.fromisoformat(created)
    except ValueError:
        return None


def _related_order_id(resource: PayPalObject) -> str | None:
    supplementary = resource.get("supplementary_data")
    related = supplementary.get("related_ids") if isinstance(supplementary, Mapping) else None
    order_id = related.get("order_id") if isinstance(related, Mapping) else None
    return order_id if is_paypal_id(order_id) else None


def captured_id_of_refund(refund: PayPalObject) -> str | None:
    """The capture a refund belongs to, from its ``up`` link (only the ID is used: the
    link's host is the sender's word, and calls go to our configured PayPal only)."""
    href = link(refund, "up")
    if href is None:
        return None
    match = _CAPTURE_LINK.search(urlsplit(href).path)
    return match.group(1) if match else None


def webhook_event(event: PayPalObject, *, verified: bool) -> WebhookEvent:
    """Normalize one event. ``PAYMENT.CAPTURE.REFUNDED`` comes back without ``payment_id``
    (a refund does not name its order): the provider looks its capture up."""
    event_type = str(event["event_type"])
    resource = event.get("resource")
    resource = resource if isinstance(resource, Mapping) else {}
    base: dict[str, Any] = {
        "event_id": str(event["id"]),
        "event_type": event_type,
        "verified": verified,
        "occurred_at": _occurred_at(event),
        "reference": reference_of(resource),
    }
    resource_id = resource.get("id") if is_paypal_id(resource.get("id")) else None
    if event_type.startswith("CHECKOUT.ORDER."):
        payment_id = payment_id_of(resource_id) if resource_id else None
        status = PaymentStatus.REQUIRES_CAPTURE if event_type == EVENT_ORDER_APPROVED else None
        return WebhookEvent(**base, payment_id=payment_id, status=status)
    if event_type in REFUND_EVENTS:
        # The refund names its capture, not its order: the provider looks the order up.
        return WebhookEvent(
            **base, refund=refund_result(resource), capture_id=captured_id_of_refund(resource)
        )
    if event_type.startswith("PAYMENT.CAPTURE."):
        order_id = _related_order_id(resource)
        status = None
        if event_type == EVENT_CAPTURE_COMPLETED:
            status = PaymentStatus.SUCCEEDED
        elif event_type == EVENT_CAPTURE_DENIED:
            status = PaymentStatus.FAILED
        return WebhookEvent(
            **base,
            payment_id=payment_id_of(order_id) if order_id else None,
            status=status,
            # Only a capture that took the money is one to refund later.
            capture_id=resource_id if event_type == EVENT_CAPTURE_COMPLETED else None,
        )
    return WebhookEvent(**base)


def order_id_of_capture(capture: PayPalObject) -> str | None:
    return _related_order_id(capture)
