"""Conversions for Stripe Billing (products, recurring prices, Checkout in subscription mode,
subscriptions, invoices), kept apart from the calls and from the one-off payment conversions.

Stripe moved fields between API versions: the SDK pins one (2026-10-28) where a
subscription's ``current_period_start/end`` live on its items and an invoice names its
subscription under ``parent.subscription_details`` and its payments under ``payments``;
older versions (and the 2022 description in ``shared/specs``) had them on the subscription
and as ``invoice.subscription`` / ``invoice.payment_intent``. Both are read, newer first.

Unknown subscription statuses map to ``incomplete`` before a first paid invoice and to
``past_due`` after one: never to active.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, assert_never
from urllib.parse import urlsplit, urlunsplit

from models.subscription import SubscriptionStatus

from ..base import InvoicePayment, RecurringPrice, SubscriptionRequest, SubscriptionState

if TYPE_CHECKING:
    from stripe.params import PriceCreateParams, ProductCreateParams, SubscriptionUpdateParams
    from stripe.params.checkout import SessionCreateParams
    from stripe.params.checkout._session_create_params import (
        SessionCreateParamsSubscriptionData,
    )

StripeObject = Mapping[str, Any]

# Events about a subscription (the Subscription object) and about one of its invoices.
SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
    }
)
INVOICE_EVENTS = frozenset({"invoice.paid", "invoice.payment_failed"})


class StripeSubscriptionStatus(StrEnum):
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    UNPAID = "unpaid"
    CANCELED = "canceled"
    PAUSED = "paused"


def subscription_status(vendor: Any, *, paid_before: bool) -> SubscriptionStatus:
    """Stripe's status in ours. ``unpaid`` (Stripe stopped retrying but keeps the
    subscription) is past due: entitlements end with the grace period, not at once."""
    try:
        known = StripeSubscriptionStatus(str(vendor))
    except ValueError:
        return SubscriptionStatus.PAST_DUE if paid_before else SubscriptionStatus.INCOMPLETE
    match known:
        case StripeSubscriptionStatus.INCOMPLETE:
            return SubscriptionStatus.INCOMPLETE
        case StripeSubscriptionStatus.INCOMPLETE_EXPIRED:
            return SubscriptionStatus.INCOMPLETE_EXPIRED
        case StripeSubscriptionStatus.TRIALING:
            return SubscriptionStatus.TRIALING
        case StripeSubscriptionStatus.ACTIVE:
            return SubscriptionStatus.ACTIVE
        case StripeSubscriptionStatus.PAST_DUE | StripeSubscriptionStatus.UNPAID:
            return SubscriptionStatus.PAST_DUE
        case StripeSubscriptionStatus.CANCELED:
            return SubscriptionStatus.CANCELED
        case StripeSubscriptionStatus.PAUSED:
            return SubscriptionStatus.PAUSED
        case _:
            assert_never(known)


# -- requests ------------------------------------------------------------------------------


def product_id_for(price: RecurringPrice) -> str:
    """The product of a plan is ours to name (Stripe takes an ``id`` on create): one product
    per plan, whatever its prices, found again without a search."""
    return f"plan_{price.plan.code}"


def product_params(price: RecurringPrice) -> ProductCreateParams:
    return {
        "id": product_id_for(price),
        "name": price.plan.name,
        "metadata": {"plan": price.plan.code},
    }


def price_params(price: RecurringPrice, *, product_id: str) -> PriceCreateParams:
    # No trial on the price: Checkout's subscription_data.trial_period_days carries it, so
    # that a trial change needs no new price at Stripe (the key still changes, by design).
    return {
        "product": product_id,
        "currency": price.plan.currency.lower(),
        "unit_amount": price.plan.amount,
        "recurring": {"interval": str(price.interval), "interval_count": price.interval_count},
        "lookup_key": price.key,
        "transfer_lookup_key": True,
        "metadata": {"plan": price.plan.code, "price_key": price.key},
    }


def price_matches(found: StripeObject, price: RecurringPrice) -> bool:
    """Whether Stripe's price bills exactly ``price`` (and may still be used)."""
    recurring = _expanded(found.get("recurring")) or {}
    return (
        found.get("active") is True
        and found.get("unit_amount") == price.plan.amount
        and str(found.get("currency", "")).upper() == price.plan.currency
        and recurring.get("interval") == str(price.interval)
        and recurring.get("interval_count") == price.interval_count
    )


def _with_query(url: str, query: str) -> str:
    parts = urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit(parts._replace(query=joined))


def subscription_metadata(request: SubscriptionRequest) -> dict[str, str]:
    """What we attach so that Stripe's events lead back to our subscription."""
    metadata = {"subscription_id": request.subscription_id, "plan": request.price.plan.code}
    if request.user_id:
        metadata["user_id"] = request.user_id
    return metadata


def subscription_checkout_params(
    request: SubscriptionRequest, *, vendor_price_id: str
) -> SessionCreateParams:
    base = request.base_url.rstrip("/")
    success = request.return_url or f"{base}/"
    cancel = request.cancel_url or request.return_url or f"{base}/"
    success = _with_query(success, f"subscription_id={request.subscription_id}")
    metadata = subscription_metadata(request)
    subscription_data: SessionCreateParamsSubscriptionData = {"metadata": metadata}
    if request.price.trial_days > 0:
        subscription_data["trial_period_days"] = request.price.trial_days
    params: SessionCreateParams = {
        "mode": "subscription",
        "line_items": [{"price": vendor_price_id, "quantity": 1}],
        "success_url": success,
        "cancel_url": cancel,
        "client_reference_id": request.subscription_id,
        "metadata": metadata,
        "subscription_data": subscription_data,
    }
    if request.customer_email:
        params["customer_email"] = request.customer_email
    return params


# -- responses -----------------------------------------------------------------------------


def _expanded(value: Any) -> StripeObject | None:
    return value if isinstance(value, Mapping) else None


def _id_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _first_item(subscription: StripeObject) -> StripeObject:
    items = _expanded(subscription.get("items")) or {}
    data = items.get("data")
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        return data[0]
    return {}


def subscription_item_id(subscription: StripeObject) -> str | None:
    return _id_of(_first_item(subscription))


def ours_of(obj: StripeObject) -> str | None:
    """Our subscription id, from the metadata we put on Stripe's objects."""
    metadata = _expanded(obj.get("metadata")) or {}
    found = metadata.get("subscription_id")
    return found if isinstance(found, str) and found else None


def subscription_id_of_invoice(invoice: StripeObject) -> str | None:
    parent = _expanded(invoice.get("parent")) or {}
    details = _expanded(parent.get("subscription_details")) or {}
    return _id_of(details.get("subscription")) or _id_of(invoice.get("subscription"))


def _payment_intent_of_invoice(invoice: StripeObject) -> str | None:
    payments = _expanded(invoice.get("payments")) or {}
    for entry in payments.get("data") or []:
        payment = _expanded(_expanded(entry) and entry.get("payment")) or {}
        found = _id_of(payment.get("payment_intent"))
        if found:
            return found
    return _id_of(invoice.get("payment_intent"))


def invoice_payment(invoice: StripeObject) -> InvoicePayment:
    """An Invoice in our terms: paid when Stripe says so, for what it says was paid.
    Raises ValueError for an object that is not shaped like one."""
    invoice_id = _id_of(invoice)
    currency = invoice.get("currency")
    paid = invoice.get("status") == "paid"
    amount = invoice.get("amount_paid") if paid else invoice.get("amount_due")
    if not invoice_id or not isinstance(currency, str):
        raise ValueError("a Stripe invoice has an id and a currency")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
        raise ValueError("a Stripe invoice's amount is a non-negative integer")
    return InvoicePayment(
        provider_invoice_id=invoice_id,
        amount=amount,
        currency=currency.upper(),
        paid=paid,
        period_start=_moment(invoice.get("period_start")),
        period_end=_moment(invoice.get("period_end")),
        payment_id=_payment_intent_of_invoice(invoice),
    )


def subscription_state(
    subscription: StripeObject, *, subscription_id: str | None = None
) -> SubscriptionState:
    """A Subscription (``latest_invoice`` expanded, where it matters) in our terms."""
    provider_id = _id_of(subscription)
    if not provider_id:
        raise ValueError("a Stripe subscription without an id")
    item = _first_item(subscription)
    invoice = _expanded(subscription.get("latest_invoice"))
    latest = invoice_payment(invoice) if invoice is not None else None
    paid_before = latest is not None and latest.paid
    period_start = item.get("current_period_start", subscription.get("current_period_start"))
    period_end = item.get("current_period_end", subscription.get("current_period_end"))
    return SubscriptionState(
        provider_subscription_id=provider_id,
        status=subscription_status(subscription.get("status"), paid_before=paid_before),
        current_period_start=_moment(period_start),
        current_period_end=_moment(period_end),
        cancel_at_period_end=subscription.get("cancel_at_period_end") is True,
        vendor_price_id=_id_of(item.get("price")),
        subscription_id=ours_of(subscription) or subscription_id,
        latest_invoice=latest,
        vendor_status=str(subscription.get("status")),
    )


def state_of_unfinished_checkout(session: StripeObject) -> SubscriptionState:
    """A Checkout Session in subscription mode that has made no subscription yet: still
    open (incomplete), or expired (the subscription never was)."""
    expired = session.get("status") == "expired"
    return SubscriptionState(
        provider_subscription_id=str(session["id"]),
        status=(
            SubscriptionStatus.INCOMPLETE_EXPIRED if expired else SubscriptionStatus.INCOMPLETE
        ),
        subscription_id=ours_of(session),
        vendor_status=f"checkout session {session.get('status')}",
    )


def is_subscription_checkout(session: StripeObject) -> bool:
    return session.get("mode") == "subscription"


def subscription_of_session(session: StripeObject) -> str | None:
    return _id_of(session.get("subscription"))


def customer_of(subscription: StripeObject) -> str | None:
    return _id_of(subscription.get("customer"))


def price_change_params(
    *, item_id: str, vendor_price_id: str, now: bool, prorate: bool
) -> SubscriptionUpdateParams:
    """How a price change is billed.

    ``now`` without proration (an upgrade that cannot be gamed): the cycle restarts today
    (``billing_cycle_anchor[type]=now``) and, with no proration, Stripe invoices the new price's
    full period at once and credits nothing for the old one. ``now`` with proration:
    Stripe's own arithmetic, invoiced at once (``always_invoice``). Either way a declined
    charge refuses the change (``error_if_incomplete``): nobody gets the new plan unpaid.

    Not ``now`` (a downgrade): the item changes with no proration and no new anchor, so
    nothing is charged or credited today and the next renewal bills the new price. Stripe
    shows the new price on the subscription at once; what the customer may use until the
    renewal is the service's entitlement rule, not Stripe's. (A subscription schedule would
    keep the old price visible until renewal, at the cost of a second object to follow.)
    """
    params: SubscriptionUpdateParams = {
        "items": [{"id": item_id, "price": vendor_price_id}],
    }
    if now:
        params["payment_behavior"] = "error_if_incomplete"
        if prorate:
            params["proration_behavior"] = "always_invoice"
        else:
            params["proration_behavior"] = "none"
            # The pinned API version takes the anchor as an object (the 2022 one: "now").
            params["billing_cycle_anchor"] = {"type": "now"}
    else:
        params["proration_behavior"] = "none"
    return params
