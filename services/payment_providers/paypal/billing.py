"""Conversions for PayPal Subscriptions v1 (catalog products, billing plans, subscriptions,
their transactions and events), kept apart from the calls and from the one-off payments.

PayPal has no published OpenAPI description of this API in ``shared/specs``: shapes follow its
API reference (developer.paypal.com/docs/api/subscriptions/v1/: plans create and get,
subscriptions create, get, revise, suspend, activate, cancel and transactions;
developer.paypal.com/docs/api/catalog-products/v1/: products create; webhook event names from
developer.paypal.com/api/rest/webhooks/event-names/#subscriptions).

Cancel at period end does not exist at PayPal (cancel is immediate and final). It is emulated:
the subscription is *suspended* (no more billing, and ``activate`` can still undo it) with a
note saying when the paid period ends; a subscription suspended by us that way reads as active
with ``cancel_at_period_end`` until then, and as canceled after. A subscription suspended for
any other reason is paused, or past due when PayPal suspended it over failed payments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, assert_never
from urllib.parse import urlsplit, urlunsplit

from models.subscription import BillingInterval, SubscriptionStatus

from ..base import InvoicePayment, RecurringPrice, SubscriptionRequest, SubscriptionState
from .sales import payment_id_of_sale
from .transformers import from_paypal_value, is_paypal_id, link, money

PayPalObject = Mapping[str, Any]

# Subscription (I-...), plan (P-...) and product ids as PayPal shapes them; anything else is
# refused before it becomes part of a URL path.
SUBSCRIPTION_ID = re.compile(r"^I-[A-Z0-9]{1,48}$")
PLAN_ID = re.compile(r"^P-[A-Z0-9]{1,48}$")
# What our suspension note says: "cancel_at_period_end <ISO time>" (PayPal's reason: 128 max).
PERIOD_END_NOTE = "cancel_at_period_end"
_NOTE = re.compile(rf"^{PERIOD_END_NOTE} (\S+)$")

SUBSCRIPTION_EVENT_PREFIX = "BILLING.SUBSCRIPTION."
EVENT_PAYMENT_FAILED = "BILLING.SUBSCRIPTION.PAYMENT.FAILED"
EVENT_SALE_COMPLETED = "PAYMENT.SALE.COMPLETED"

INTERVAL_UNIT = {BillingInterval.MONTH: "MONTH", BillingInterval.YEAR: "YEAR"}


class PayPalSubscriptionStatus(StrEnum):
    APPROVAL_PENDING = "APPROVAL_PENDING"
    APPROVED = "APPROVED"
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


# -- requests ------------------------------------------------------------------------------


# One catalog product for every plan: PayPal's revise moves a subscription only between plans
# of the same product ("You can upgrade or downgrade to subscription plans under the same
# product", Subscriptions guide, "Upgrade or downgrade a subscription"), so plans of ours that
# a customer may switch between must share it. Ours to name (6 to 50 characters): found again
# by a GET, without a search.
PRODUCT_ID = "payments-subscriptions"


def product_id_for(price: RecurringPrice) -> str:
    return PRODUCT_ID


def product_request(price: RecurringPrice) -> dict[str, Any]:
    return {
        "id": PRODUCT_ID,
        "name": "Subscriptions",
        "type": "SERVICE",
        "description": "Recurring plans billed by this payment service",
    }


def plan_request(price: RecurringPrice, *, product_id: str) -> dict[str, Any]:
    """A plan billing ``price``: an optional free trial of ``trial_days`` days, then the price
    every ``interval_count`` ``interval``s until cancelled (total_cycles 0: no end)."""
    cycles: list[dict[str, Any]] = []
    if price.trial_days > 0:
        cycles.append(
            {
                "frequency": {"interval_unit": "DAY", "interval_count": price.trial_days},
                "tenure_type": "TRIAL",
                "sequence": 1,
                "total_cycles": 1,
            }
        )
    cycles.append(
        {
            "frequency": {
                "interval_unit": INTERVAL_UNIT[price.interval],
                "interval_count": price.interval_count,
            },
            "tenure_type": "REGULAR",
            "sequence": len(cycles) + 1,
            "total_cycles": 0,
            "pricing_scheme": {"fixed_price": money(price.plan.amount, price.plan.currency)},
        }
    )
    return {
        "product_id": product_id,
        "name": f"{price.plan.name} ({price.key})"[:127],
        "description": price.key[:127],
        "status": "ACTIVE",
        "billing_cycles": cycles,
        "payment_preferences": {
            # A failed renewal is retried with the next cycle; three failures suspend it.
            "auto_bill_outstanding": True,
            "payment_failure_threshold": 3,
        },
    }


def plan_matches(plan: PayPalObject, price: RecurringPrice) -> bool:
    """Whether PayPal's plan is active and bills exactly ``price``."""
    if plan.get("status") != "ACTIVE":
        return False
    regular = [c for c in _objects(plan.get("billing_cycles")) if c.get("tenure_type") == "REGULAR"]
    if len(regular) != 1:
        return False
    frequency = _mapping(regular[0].get("frequency"))
    fixed = _mapping(_mapping(regular[0].get("pricing_scheme")).get("fixed_price"))
    return (
        frequency.get("interval_unit") == INTERVAL_UNIT[price.interval]
        and frequency.get("interval_count") == price.interval_count
        and fixed == money(price.plan.amount, price.plan.currency)
    )


def _with_query(url: str, query: str) -> str:
    parts = urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit(parts._replace(query=joined))


def subscription_request(request: SubscriptionRequest, *, plan_id: str) -> dict[str, Any]:
    """``custom_id`` carries our subscription id: PayPal returns it on the subscription and
    on its sales (``custom``), which is how events lead back to our record."""
    base = request.base_url.rstrip("/")
    query = f"provider=paypal&subscription_id={request.subscription_id}"
    return_url = request.return_url or f"{base}/"
    cancel_url = request.cancel_url or request.return_url or f"{base}/"
    body: dict[str, Any] = {
        "plan_id": plan_id,
        "custom_id": request.subscription_id,
        "application_context": {
            "user_action": "SUBSCRIBE_NOW",
            "shipping_preference": "NO_SHIPPING",
            "return_url": _with_query(return_url, f"{query}&status=approved"),
            "cancel_url": _with_query(cancel_url, f"{query}&status=canceled"),
        },
    }
    if request.customer_email:
        body["subscriber"] = {"email_address": request.customer_email}
    return body


def revise_request(plan_id: str, *, return_url: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"plan_id": plan_id}
    if return_url:
        body["application_context"] = {"return_url": return_url, "cancel_url": return_url}
    return body


def period_end_note(period_end: datetime) -> str:
    return f"{PERIOD_END_NOTE} {iso(period_end)}"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- responses -----------------------------------------------------------------------------


def _mapping(value: Any) -> PayPalObject:
    return value if isinstance(value, Mapping) else {}


def _objects(value: Any) -> list[PayPalObject]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def moment(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _money(value: Any) -> tuple[int, str] | None:
    """A v1/v2 money object (``{currency_code, value}``) in minor units."""
    obj = _mapping(value)
    currency = obj.get("currency_code")
    if not isinstance(currency, str):
        return None
    try:
        return from_paypal_value(obj.get("value"), currency), currency.upper()
    except ValueError:
        return None


def is_subscription_id(value: Any) -> bool:
    return isinstance(value, str) and SUBSCRIPTION_ID.fullmatch(value) is not None


def is_plan_id(value: Any) -> bool:
    return isinstance(value, str) and PLAN_ID.fullmatch(value) is not None


def approval_link(obj: PayPalObject) -> str | None:
    return link(obj, "approve")


def _period_end_of_note(subscription: PayPalObject) -> datetime | None:
    note = subscription.get("status_change_note")
    match = _NOTE.match(note) if isinstance(note, str) else None
    return moment(match.group(1)) if match else None


def suspended_by_us(subscription: PayPalObject) -> bool:
    """Suspended to emulate a cancel at period end (see the module's docstring)."""
    return (
        subscription.get("status") == PayPalSubscriptionStatus.SUSPENDED
        and _period_end_of_note(subscription) is not None
    )


def _in_trial(billing_info: PayPalObject) -> bool:
    for execution in _objects(billing_info.get("cycle_executions")):
        if execution.get("tenure_type") != "TRIAL":
            continue
        completed, total = execution.get("cycles_completed"), execution.get("total_cycles")
        if isinstance(completed, int) and isinstance(total, int) and completed < total:
            return True
    return False


def subscription_status(subscription: PayPalObject, *, now: datetime) -> SubscriptionStatus:
    billing_info = _mapping(subscription.get("billing_info"))
    failed = billing_info.get("failed_payments_count")
    failing = isinstance(failed, int) and failed > 0
    paid_before = bool(_mapping(billing_info.get("last_payment")))
    try:
        known = PayPalSubscriptionStatus(str(subscription.get("status")))
    except ValueError:
        return SubscriptionStatus.PAST_DUE if paid_before else SubscriptionStatus.INCOMPLETE
    match known:
        case PayPalSubscriptionStatus.APPROVAL_PENDING | PayPalSubscriptionStatus.APPROVED:
            # APPROVED: the buyer said yes, PayPal has not activated (billed) it yet.
            return SubscriptionStatus.INCOMPLETE
        case PayPalSubscriptionStatus.ACTIVE:
            if failing:
                return SubscriptionStatus.PAST_DUE
            return (
                SubscriptionStatus.TRIALING
                if _in_trial(billing_info)
                else SubscriptionStatus.ACTIVE
            )
        case PayPalSubscriptionStatus.SUSPENDED:
            period_end = _period_end_of_note(subscription)
            if period_end is not None:  # our cancel at period end
                if now >= period_end:
                    return SubscriptionStatus.CANCELED
                return SubscriptionStatus.PAST_DUE if failing else SubscriptionStatus.ACTIVE
            return SubscriptionStatus.PAST_DUE if failing else SubscriptionStatus.PAUSED
        case PayPalSubscriptionStatus.CANCELLED | PayPalSubscriptionStatus.EXPIRED:
            return SubscriptionStatus.CANCELED
        case _:
            assert_never(known)


def subscription_state(
    subscription: PayPalObject, *, now: datetime, latest_invoice: InvoicePayment | None = None
) -> SubscriptionState:
    """A subscription in our terms. Raises ValueError for one without a subscription id."""
    provider_id = subscription.get("id")
    if not is_subscription_id(provider_id):
        raise ValueError("a PayPal subscription has an I-... id")
    billing_info = _mapping(subscription.get("billing_info"))
    last_payment = _mapping(billing_info.get("last_payment"))
    ours = subscription.get("custom_id")
    period_end = _period_end_of_note(subscription) if suspended_by_us(subscription) else None
    status = subscription_status(subscription, now=now)
    return SubscriptionState(
        provider_subscription_id=str(provider_id),
        status=status,
        current_period_start=moment(last_payment.get("time") or subscription.get("start_time")),
        current_period_end=period_end or moment(billing_info.get("next_billing_time")),
        cancel_at_period_end=period_end is not None and status is not SubscriptionStatus.CANCELED,
        vendor_price_id=subscription.get("plan_id")
        if is_plan_id(subscription.get("plan_id"))
        else None,
        subscription_id=ours if isinstance(ours, str) and ours else None,
        latest_invoice=latest_invoice,
        vendor_status=str(subscription.get("status")),
        approval_url=approval_link(subscription)
        if subscription.get("status") == PayPalSubscriptionStatus.APPROVAL_PENDING
        else None,
    )


def latest_transaction(transactions: PayPalObject) -> InvoicePayment | None:
    """The latest of a subscription's transactions (``GET .../transactions``), as an
    invoice: its id is the sale's, as ``PAYMENT.SALE.COMPLETED`` names it, and its payment
    ``pp_sale_<sale id>`` (refunded through Payments v1, see ``sales``)."""
    found: list[tuple[datetime, InvoicePayment]] = []
    for transaction in _objects(transactions.get("transactions")):
        amounts = _mapping(transaction.get("amount_with_breakdown"))
        gross = _money(amounts.get("gross_amount"))
        when = moment(transaction.get("time"))
        transaction_id = transaction.get("id")
        if gross is None or when is None or not isinstance(transaction_id, str):
            continue
        paid = transaction.get("status") == "COMPLETED"
        found.append(
            (
                when,
                InvoicePayment(
                    provider_invoice_id=transaction_id,
                    amount=gross[0],
                    currency=gross[1],
                    paid=paid,
                    period_start=when,
                    payment_id=payment_id_of_sale(transaction_id)
                    if is_paypal_id(transaction_id)
                    else None,
                ),
            )
        )
    # Latest by time; of two in the same second, the one PayPal lists last.
    latest = max(enumerate(found), key=lambda pair: (pair[1][0], pair[0]), default=None)
    return latest[1][1] if latest is not None else None


def failed_payment(subscription: PayPalObject) -> InvoicePayment | None:
    """What BILLING.SUBSCRIPTION.PAYMENT.FAILED failed to collect, from the subscription's
    ``last_failed_payment`` (PayPal names no transaction for it: the id is made of the
    subscription's and the attempt's time, stable across redeliveries)."""
    billing_info = _mapping(subscription.get("billing_info"))
    failed = _mapping(billing_info.get("last_failed_payment"))
    amount = _money(failed.get("amount"))
    when = failed.get("time")
    if amount is None or not isinstance(when, str):
        return None
    return InvoicePayment(
        provider_invoice_id=f"{subscription.get('id')}:failed:{when}",
        amount=amount[0],
        currency=amount[1],
        paid=False,
        period_start=moment(when),
    )


def sale_invoice(sale: PayPalObject) -> InvoicePayment:
    """A completed sale (PAYMENT.SALE.COMPLETED, Payments v1 shape: ``amount.total`` and
    ``amount.currency``) as a paid invoice, whose payment is ``pp_sale_<sale id>``. Raises
    ValueError for one not shaped so."""
    amount = _mapping(sale.get("amount"))
    currency, total, sale_id = amount.get("currency"), amount.get("total"), sale.get("id")
    if not isinstance(currency, str) or not isinstance(sale_id, str) or not is_paypal_id(sale_id):
        raise ValueError("a PayPal sale has an id and an amount")
    return InvoicePayment(
        provider_invoice_id=sale_id,
        amount=from_paypal_value(total, currency),
        currency=currency.upper(),
        paid=sale.get("state") == "completed",
        period_start=moment(sale.get("create_time")),
        payment_id=payment_id_of_sale(sale_id),
    )


def subscription_of_sale(sale: PayPalObject) -> str | None:
    found = sale.get("billing_agreement_id")
    return found if is_subscription_id(found) else None
