"""Conversions between the service's types and LemonSqueezy's JSON:API documents, kept apart
from the calls.

Requests: the ``POST /v1/checkouts`` document for a catalogue plan, and the order refund
document. Responses: LemonSqueezy's orders (plain dicts from its JSON) to ``PaymentState`` and
``WebhookEvent``. Unknown order statuses map to pending: only an explicit success or failure
from LemonSqueezy is final.

Amounts: LemonSqueezy counts in "cents", the currency's minor unit, as we do. As merchant of
record it adds the tax it computes on top of our price (or takes it out of it, with tax-inclusive
pricing): ``subtotal`` is our price, ``total`` what the customer paid. The amount we compare with
the catalogue is ``subtotal - discount_total``; a refund of our price is converted to the share
of ``total`` it stands for, so that the tax on it goes back too.
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

from ..base import IntentRequest, PaymentState, RefundResult, WebhookEvent

LemonObject = Mapping[str, Any]

PREFIX = "ls_"
# Our payment ids: the prefix and 24 hex characters derived from the attempt's key.
PAYMENT_ID = re.compile(r"^ls_[0-9a-f]{24}$")
# LemonSqueezy's ids: orders, stores and variants are integers; checkouts are UUIDs.
NUMERIC_ID = re.compile(r"^[1-9][0-9]{0,18}$")
CHECKOUT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# A refund as we name it (LemonSqueezy keeps no refund objects, only the order's running
# total): the order and the order's refunded_amount right after that refund.
REFUND_ID = re.compile(r"^([1-9][0-9]{0,18})@([1-9][0-9]{0,18})$")
_OUR_REFUND_ID = re.compile(r"^rf_[0-9a-f]{24}$")

JSON_API = "application/vnd.api+json"
HEADER_SIGNATURE = "x-signature"
HEADER_EVENT_NAME = "x-event-name"


class OrderStatus(StrEnum):
    """``status`` of an order (API reference, "The order object")."""

    PENDING = "pending"
    FAILED = "failed"
    PAID = "paid"
    REFUNDED = "refunded"
    PARTIAL_REFUND = "partial_refund"
    FRAUDULENT = "fraudulent"


class EventName(StrEnum):
    """The webhook events this service acts on; every other one is acknowledged and ignored."""

    ORDER_CREATED = "order_created"
    ORDER_REFUNDED = "order_refunded"


def payment_status(status: Any) -> PaymentStatus:
    """An order's status in our terms; anything LemonSqueezy may add later is pending."""
    try:
        known = OrderStatus(status)
    except ValueError:
        return PaymentStatus.PENDING
    match known:
        case OrderStatus.PENDING:
            return PaymentStatus.PENDING
        case OrderStatus.PAID:
            return PaymentStatus.SUCCEEDED
        case OrderStatus.PARTIAL_REFUND:
            return PaymentStatus.PARTIALLY_REFUNDED
        case OrderStatus.REFUNDED:
            return PaymentStatus.REFUNDED
        case OrderStatus.FAILED | OrderStatus.FRAUDULENT:
            # fraudulent: LemonSqueezy's fraud checks stopped the payment; no money is ours.
            return PaymentStatus.FAILED
        case _:
            assert_never(known)


# -- ids -----------------------------------------------------------------------------------


def payment_id_for(idempotency_key: str) -> str:
    """Our payment id for one creation attempt: the same key always names the same payment,
    so a retry finds the checkout the first attempt made (LemonSqueezy takes no idempotency
    key of its own)."""
    return PREFIX + hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]


def is_payment_id(value: Any) -> bool:
    return isinstance(value, str) and PAYMENT_ID.fullmatch(value) is not None


def is_numeric_id(value: Any) -> bool:
    return isinstance(value, str) and NUMERIC_ID.fullmatch(value) is not None


def refund_id_of(order_id: str, refunded_after: int) -> str:
    return f"{order_id}@{refunded_after}"


def parse_refund_id(value: str) -> tuple[str, int] | None:
    match = REFUND_ID.fullmatch(value)
    return (match.group(1), int(match.group(2))) if match else None


# -- requests ------------------------------------------------------------------------------


def checkout_request(request: IntentRequest, *, store_id: str, variant_id: str) -> dict[str, Any]:
    """The document of ``POST /v1/checkouts``: the plan's variant at our catalogue price.

    ``checkout_data.custom`` carries our payment id: LemonSqueezy copies it into the
    ``meta.custom_data`` of the order's webhooks, which is how an order leads back to us. The
    discount field is hidden: a discount would make the order differ from the catalogue price,
    and the service never calls such a payment paid.
    """
    custom = {"payment_id": payment_id_for(request.idempotency_key), "reference": request.reference}
    if request.user_id:
        custom["user"] = request.user_id
    checkout_data: dict[str, Any] = {"custom": custom}
    if request.customer_email:
        checkout_data["email"] = request.customer_email
    product_options: dict[str, Any] = {"enabled_variants": [int(variant_id)]}
    if request.return_url:
        product_options["redirect_url"] = request.return_url
    return {
        "data": {
            "type": "checkouts",
            "attributes": {
                "custom_price": request.plan.amount,
                "product_options": product_options,
                "checkout_options": {"discount": False},
                "checkout_data": checkout_data,
            },
            "relationships": {
                "store": {"data": {"type": "stores", "id": store_id}},
                "variant": {"data": {"type": "variants", "id": variant_id}},
            },
        }
    }


def refund_request(order_id: str, vendor_amount: int) -> dict[str, Any]:
    # Always with an amount: without one LemonSqueezy refunds whatever is left, which is more
    # than we mean whenever our view of the order is behind LemonSqueezy's.
    return {"data": {"type": "orders", "id": order_id, "attributes": {"amount": vendor_amount}}}


# -- responses -----------------------------------------------------------------------------


def resource(document: Any, kind: str) -> LemonObject:
    """The primary resource of a JSON:API document, checked to be a ``kind`` with an id and
    attributes. Raises ValueError otherwise."""
    data = document.get("data") if isinstance(document, Mapping) else None
    if (
        not isinstance(data, Mapping)
        or data.get("type") != kind
        or not isinstance(data.get("id"), str)
        or not isinstance(data.get("attributes"), Mapping)
    ):
        raise ValueError(f"not a LemonSqueezy {kind} document")
    return data


def resources(document: Any, kind: str) -> list[LemonObject]:
    data = document.get("data") if isinstance(document, Mapping) else None
    if not isinstance(data, list):
        raise ValueError(f"not a list of LemonSqueezy {kind}")
    return [resource({"data": item}, kind) for item in data]


def checkout_url(checkout: LemonObject) -> str | None:
    url = checkout["attributes"].get("url")
    return url if isinstance(url, str) and url.startswith(("https://", "http://")) else None


def _count(attributes: LemonObject, name: str) -> int:
    value = attributes.get(name, 0)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"order {name} is not a count of cents")
    return value


@dataclass(frozen=True, slots=True)
class OrderFigures:
    """An order's sums, in the order currency's minor units."""

    order_id: str
    currency: str
    net: int  # our price as charged: subtotal less discounts, before LemonSqueezy's tax
    total: int  # what the customer paid, tax included
    refunded: int  # the order's refunded_amount, out of total
    status: Any
    variant_id: int | None
    created_at: datetime | None

    @classmethod
    def of(cls, order: LemonObject) -> OrderFigures:
        attributes = order["attributes"]
        currency = attributes.get("currency")
        if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency):
            raise ValueError("order currency is not an ISO 4217 code")
        item = attributes.get("first_order_item")
        variant = item.get("variant_id") if isinstance(item, Mapping) else None
        return cls(
            order_id=str(order["id"]),
            currency=currency.upper(),
            net=_count(attributes, "subtotal") - _count(attributes, "discount_total"),
            total=_count(attributes, "total"),
            refunded=_count(attributes, "refunded_amount"),
            status=attributes.get("status"),
            variant_id=variant if isinstance(variant, int) else None,
            created_at=timestamp(attributes.get("created_at")),
        )

    def to_vendor(self, amount: int) -> int:
        """Our ``amount`` (out of ``net``) as LemonSqueezy's share of ``total``, rounded half
        up: with tax added on top, refunding our price gives the tax on it back too."""
        if self.net <= 0 or self.total == self.net:
            return amount
        return (2 * amount * self.total + self.net) // (2 * self.net)

    def to_ours(self, vendor_amount: int) -> int:
        """LemonSqueezy's refunded cents (out of ``total``) as our amount (out of ``net``)."""
        if self.total <= 0 or self.total == self.net:
            return vendor_amount
        return (2 * vendor_amount * self.net + self.total) // (2 * self.total)


def state_from_order(
    payment_id: str, order: LemonObject, refunds: tuple[RefundResult, ...] | None
) -> PaymentState:
    figures = OrderFigures.of(order)
    return PaymentState(
        payment_id=payment_id,
        status=payment_status(figures.status),
        amount=figures.net,
        currency=figures.currency,
        capture_id=figures.order_id,
        payment_method="card",
        vendor_status=f"order {figures.status}",
        refunds=refunds,
    )


def refund_result(
    figures: OrderFigures, refunded_after: int, amount: int, refund_id: str | None
) -> RefundResult:
    return RefundResult(
        provider_refund_id=refund_id_of(figures.order_id, refunded_after),
        amount=amount,
        status=RefundStatus.SUCCEEDED,
        currency=figures.currency,
        refund_id=refund_id if refund_id and _OUR_REFUND_ID.fullmatch(refund_id) else None,
    )


def timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


# -- webhooks ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One webhook delivery, read: the event's name, its order and our payment id."""

    event_name: str
    order: LemonObject | None
    payment_id: str | None
    reference: str | None

    @property
    def event_id(self) -> str:
        """LemonSqueezy sends no event id and no timestamp: an event is identified by its
        name, its order and the order's state it reports (``updated_at`` and the refunded
        total). A redelivery of the same event has the same identity; a later change of the
        order is another event."""
        if self.order is None:
            return f"{self.event_name}:-"
        attributes = self.order["attributes"]
        return ":".join(
            (
                self.event_name,
                str(self.order["id"]),
                str(attributes.get("updated_at")),
                str(attributes.get("refunded_amount", 0)),
            )
        )[:200]


def read_delivery(payload: Any, event_header: str | None) -> Delivery:
    """Raises ValueError for a body that is not a LemonSqueezy event."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("meta"), Mapping):
        raise ValueError("not a LemonSqueezy event")
    meta = payload["meta"]
    name = meta.get("event_name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z_]{1,64}", name):
        raise ValueError("the event has no name")
    if event_header is not None and event_header != name:
        raise ValueError("X-Event-Name and the event's name differ")
    custom = meta.get("custom_data")
    custom = custom if isinstance(custom, Mapping) else {}
    payment_id = custom.get("payment_id")
    reference = custom.get("reference")
    order = None
    data = payload.get("data")
    if isinstance(data, Mapping) and data.get("type") == "orders":
        order = resource(payload, "orders")
    return Delivery(
        event_name=name,
        order=order,
        payment_id=payment_id if is_payment_id(payment_id) else None,
        reference=reference if isinstance(reference, str) and len(reference) <= 64 else None,
    )


def webhook_event(
    delivery: Delivery, *, verified: bool, refund: RefundResult | None = None
) -> WebhookEvent:
    base: dict[str, Any] = {
        "event_id": delivery.event_id,
        "event_type": delivery.event_name,
        "verified": verified,
        "payment_id": delivery.payment_id,
        "reference": delivery.reference,
    }
    order = delivery.order
    if order is None:
        return WebhookEvent(**base)
    base["occurred_at"] = timestamp(order["attributes"].get("updated_at"))
    base["capture_id"] = str(order["id"])
    if delivery.event_name == EventName.ORDER_CREATED:
        status = payment_status(order["attributes"].get("status"))
        # The order as created: paid, or failed / fraudulent, or pending. A refund later is
        # order_refunded's to tell, never this event's.
        if status.is_paid:
            status = PaymentStatus.SUCCEEDED
        return WebhookEvent(**base, status=status)
    if delivery.event_name == EventName.ORDER_REFUNDED and refund is not None:
        return WebhookEvent(**base, refund=refund)
    return WebhookEvent(**base)
