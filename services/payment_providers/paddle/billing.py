"""Conversions for Paddle Billing's subscriptions (products, recurring prices, the checkout
transaction that starts a subscription, subscriptions, their transactions and events), kept
apart from the calls and from the one-off payments.

A Paddle subscription exists only once its first transaction is paid on Paddle Checkout (or
its trial started): until then our subscription is that transaction (``txn_...``), as Stripe's
is its Checkout Session. Paddle copies the transaction's ``custom_data`` (our subscription id)
to the subscription it makes, which is how its events lead back to our record.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, assert_never

from models.subscription import SubscriptionStatus

from ..base import InvoicePayment, RecurringPrice, SubscriptionRequest, SubscriptionState
from .transformers import grand_total, is_price_id, is_transaction_id, to_paddle_amount

PaddleObject = Mapping[str, Any]

SUBSCRIPTION_ID = re.compile(r"^sub_[a-z\d]{26}$")
PRODUCT_ID = re.compile(r"^pro_[a-z\d]{26}$")
CUSTOMER_ID = re.compile(r"^ctm_[a-z\d]{26}$")

SUBSCRIPTION_EVENT_PREFIX = "subscription."
# Transaction events that are about one of a subscription's invoices.
INVOICE_EVENTS = frozenset(
    {
        "transaction.completed",
        "transaction.paid",
        "transaction.payment_failed",
        "transaction.past_due",
    }
)
PAID_TRANSACTION_STATUSES = frozenset({"paid", "completed"})


class PaddleSubscriptionStatus(StrEnum):
    ACTIVE = "active"
    CANCELED = "canceled"
    PAST_DUE = "past_due"
    PAUSED = "paused"
    TRIALING = "trialing"


def subscription_status(vendor: Any) -> SubscriptionStatus:
    """Paddle's status in ours. A subscription exists at Paddle only once paid (or in its
    trial), so an unknown status there is past due, never active."""
    try:
        known = PaddleSubscriptionStatus(str(vendor))
    except ValueError:
        return SubscriptionStatus.PAST_DUE
    match known:
        case PaddleSubscriptionStatus.ACTIVE:
            return SubscriptionStatus.ACTIVE
        case PaddleSubscriptionStatus.CANCELED:
            return SubscriptionStatus.CANCELED
        case PaddleSubscriptionStatus.PAST_DUE:
            return SubscriptionStatus.PAST_DUE
        case PaddleSubscriptionStatus.PAUSED:
            return SubscriptionStatus.PAUSED
        case PaddleSubscriptionStatus.TRIALING:
            return SubscriptionStatus.TRIALING
        case _:
            assert_never(known)


def is_subscription_id(value: Any) -> bool:
    return isinstance(value, str) and SUBSCRIPTION_ID.fullmatch(value) is not None


# -- requests ------------------------------------------------------------------------------


def product_request(price: RecurringPrice, *, tax_category: str) -> dict[str, Any]:
    return {
        "name": price.plan.name[:200],
        "tax_category": tax_category,
        "description": f"Plan {price.plan.code}, from the payment service",
        "custom_data": {"plan": price.plan.code},
    }


def price_request(price: RecurringPrice, *, product_id: str) -> dict[str, Any]:
    """A recurring, tax-inclusive price (the customer pays the catalogue amount; Paddle, the
    merchant of record, carves its tax out), with the trial on the price as Paddle has it."""
    body: dict[str, Any] = {
        "product_id": product_id,
        "description": f"{price.plan.name} ({price.key})"[:500],
        "name": price.plan.name[:150],
        "unit_price": {
            "amount": to_paddle_amount(price.plan.amount),
            "currency_code": price.plan.currency,
        },
        "billing_cycle": {"interval": str(price.interval), "frequency": price.interval_count},
        "tax_mode": "internal",
        "custom_data": {"plan": price.plan.code, "price_key": price.key},
    }
    if price.trial_days > 0:
        body["trial_period"] = {"interval": "day", "frequency": price.trial_days}
    return body


def _mapping(value: Any) -> PaddleObject:
    return value if isinstance(value, Mapping) else {}


def price_matches(found: PaddleObject, price: RecurringPrice) -> bool:
    unit = _mapping(found.get("unit_price"))
    cycle = _mapping(found.get("billing_cycle"))
    trial = found.get("trial_period")
    expected_trial = (
        {"interval": "day", "frequency": price.trial_days} if price.trial_days > 0 else None
    )
    return (
        found.get("status") == "active"
        and unit.get("amount") == to_paddle_amount(price.plan.amount)
        and unit.get("currency_code") == price.plan.currency
        and cycle.get("interval") == str(price.interval)
        and cycle.get("frequency") == price.interval_count
        and (dict(trial) if isinstance(trial, Mapping) else None) == expected_trial
    )


def keyed(found: PaddleObject, key: str, value: str) -> bool:
    return _mapping(found.get("custom_data")).get(key) == value


def subscription_custom_data(request: SubscriptionRequest) -> dict[str, str]:
    data = {"subscription_id": request.subscription_id, "plan": request.price.plan.code}
    if request.user_id:
        data["user_id"] = request.user_id
    return data


def checkout_transaction_request(request: SubscriptionRequest, *, price_id: str) -> dict[str, Any]:
    """The transaction whose payment on Paddle Checkout starts the subscription."""
    return {
        "items": [{"price_id": price_id, "quantity": 1}],
        "currency_code": request.price.plan.currency,
        "collection_mode": "automatic",
        "custom_data": subscription_custom_data(request),
    }


def cancel_request(*, at_period_end: bool) -> dict[str, Any]:
    return {"effective_from": "next_billing_period" if at_period_end else "immediately"}


def price_change_request(*, price_id: str, now: bool, prorate: bool) -> dict[str, Any]:
    """``now`` without proration: ``full_immediately`` (the new price charged in full at
    once, no credit for the old one); with: ``prorated_immediately``; either way a failed
    payment refuses the change (``prevent_change``). Not ``now``: ``do_not_bill`` (nothing
    charged or credited today; the next renewal bills the new price)."""
    mode = ("prorated_immediately" if prorate else "full_immediately") if now else "do_not_bill"
    body: dict[str, Any] = {
        "items": [{"price_id": price_id, "quantity": 1}],
        "proration_billing_mode": mode,
    }
    if now:
        body["on_payment_failure"] = "prevent_change"
    return body


# -- responses -----------------------------------------------------------------------------


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def ours_of(obj: PaddleObject) -> str | None:
    found = _mapping(obj.get("custom_data")).get("subscription_id")
    return found if isinstance(found, str) and found else None


def customer_of(subscription: PaddleObject) -> str | None:
    found = subscription.get("customer_id")
    return found if isinstance(found, str) and CUSTOMER_ID.fullmatch(found) else None


def _price_id(subscription: PaddleObject) -> str | None:
    items = subscription.get("items")
    if not isinstance(items, list) or not items:
        return None
    price = _mapping(_mapping(items[0]).get("price"))
    found = price.get("id")
    return found if is_price_id(found) else None


def subscription_state(
    subscription: PaddleObject, *, latest_invoice: InvoicePayment | None = None
) -> SubscriptionState:
    """A subscription in our terms. Raises ValueError for one without a subscription id."""
    provider_id = subscription.get("id")
    if not is_subscription_id(provider_id):
        raise ValueError("a Paddle subscription has a sub_ id")
    period = _mapping(subscription.get("current_billing_period"))
    scheduled = _mapping(subscription.get("scheduled_change"))
    return SubscriptionState(
        provider_subscription_id=str(provider_id),
        status=subscription_status(subscription.get("status")),
        current_period_start=_moment(period.get("starts_at")),
        current_period_end=_moment(period.get("ends_at")),
        cancel_at_period_end=scheduled.get("action") == "cancel",
        vendor_price_id=_price_id(subscription),
        subscription_id=ours_of(subscription),
        latest_invoice=latest_invoice,
        vendor_status=str(subscription.get("status")),
    )


def state_of_unfinished_checkout(transaction: PaddleObject) -> SubscriptionState:
    """The checkout transaction of a subscription Paddle has not made yet: waiting for the
    customer (incomplete) or canceled (the subscription never was)."""
    canceled = transaction.get("status") == "canceled"
    return SubscriptionState(
        provider_subscription_id=str(transaction["id"]),
        status=(
            SubscriptionStatus.INCOMPLETE_EXPIRED if canceled else SubscriptionStatus.INCOMPLETE
        ),
        subscription_id=ours_of(transaction),
        vendor_status=f"transaction {transaction.get('status')}",
    )


def subscription_of_transaction(transaction: PaddleObject) -> str | None:
    found = transaction.get("subscription_id")
    return found if is_subscription_id(found) else None


def invoice_of_transaction(transaction: PaddleObject) -> InvoicePayment:
    """A subscription's transaction as an invoice: paid once Paddle took the money; its
    ``payment_id`` is the transaction, refundable like any Paddle payment. Raises ValueError
    for one not shaped like a transaction."""
    transaction_id = transaction.get("id")
    total = grand_total(transaction)
    if not is_transaction_id(transaction_id) or total is None:
        raise ValueError("a Paddle transaction has an id and totals")
    period = _mapping(transaction.get("billing_period"))
    return InvoicePayment(
        provider_invoice_id=str(transaction_id),
        amount=total[0],
        currency=total[1],
        paid=transaction.get("status") in PAID_TRANSACTION_STATUSES,
        period_start=_moment(period.get("starts_at")),
        period_end=_moment(period.get("ends_at")),
        payment_id=str(transaction_id),
    )


def portal_url(session: PaddleObject) -> str | None:
    """The customer portal's overview page from a portal session."""
    general = _mapping(_mapping(session.get("urls")).get("general"))
    found = general.get("overview")
    return found if isinstance(found, str) and found.startswith("https://") else None
