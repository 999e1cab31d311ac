"""Subscriptions on Stripe: the provider (real SDK, real HTTP) against the fake Stripe, whose
Billing follows the API version the SDK pins and whose requests are checked against Stripe's
description. Plan sync, Checkout in subscription mode, reads, cancel and resume, price
changes, the customer portal, and the events that drive a subscription."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from models.subscription import BillingInterval, SubscriptionStatus
from services.errors import (
    InvalidStateTransition,
    InvalidWebhookSignature,
    NotFound,
    PaymentDeclined,
)
from services.payment_providers.base import (
    RecurringPrice,
    SubscriptionRequest,
    SubscriptionState,
    WebhookEvent,
)
from services.payment_providers.stripe import StripeProvider
from services.payment_providers.stripe.billing import subscription_status
from tests.fakes.stripe_server import FakeStripe
from tests.providers.stripe.conftest import BASIC, PRO, WEBHOOK_SECRET

BASIC_MONTHLY = RecurringPrice(plan=BASIC, interval=BillingInterval.MONTH)
PRO_MONTHLY = RecurringPrice(plan=PRO, interval=BillingInterval.MONTH)
BASIC_TRIAL = RecurringPrice(plan=BASIC, interval=BillingInterval.MONTH, trial_days=14)


def _request(
    price: RecurringPrice, vendor_price_id: str | None, **fields: Any
) -> SubscriptionRequest:
    return SubscriptionRequest(
        subscription_id=fields.pop("subscription_id", "sub_ours_0001"),
        price=price,
        idempotency_key=fields.pop("idempotency_key", "start-sub_ours_0001"),
        base_url="https://payments.example.com",
        vendor_price_id=vendor_price_id,
        **fields,
    )


async def _started(
    provider: StripeProvider, fake: FakeStripe, price: RecurringPrice = BASIC_MONTHLY
) -> tuple[str, str]:
    """A subscription the customer completed on Checkout: (session id, subscription id)."""
    vendor_price = await provider.sync_price(price, existing=None)
    started = await provider.create_subscription(_request(price, vendor_price))
    subscription = fake.complete_subscription_checkout(started.provider_subscription_id)
    return started.provider_subscription_id, subscription["id"]


async def _deliver(provider: StripeProvider, event: dict[str, Any]) -> WebhookEvent:
    body, headers = FakeStripe.signed_delivery(event, WEBHOOK_SECRET)
    return await provider.parse_webhook(body, headers)


def _writes(fake: FakeStripe) -> list[Any]:
    return [r for r in fake.requests if r.method in ("POST", "DELETE")]


class TestSyncPrice:
    async def test_makes_the_plans_product_and_a_recurring_price(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        price_id = await provider.sync_price(BASIC_MONTHLY, existing=None)

        price = fake_stripe.prices[price_id]
        assert (price["unit_amount"], price["currency"], price["type"]) == (
            1900,
            "eur",
            "recurring",
        )
        assert (price["recurring"]["interval"], price["recurring"]["interval_count"]) == (
            "month",
            1,
        )
        assert price["lookup_key"] == BASIC_MONTHLY.key
        assert price["metadata"] == {"plan": "basic", "price_key": BASIC_MONTHLY.key}
        assert fake_stripe.products[price["product"]]["metadata"] == {"plan": "basic"}
        # Every write carried an idempotency key.
        assert all(r.idempotency_key for r in _writes(fake_stripe))

    async def test_an_existing_active_price_is_kept_without_a_write(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        price_id = await provider.sync_price(BASIC_MONTHLY, existing=None)
        writes = len(_writes(fake_stripe))
        assert await provider.sync_price(BASIC_MONTHLY, existing=price_id) == price_id
        # Without our mapping (another instance, a lost answer) the lookup key finds it.
        assert await provider.sync_price(BASIC_MONTHLY, existing=None) == price_id
        assert len(_writes(fake_stripe)) == writes
        assert len(fake_stripe.prices) == 1

    async def test_a_price_change_makes_a_new_price_of_the_same_product(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        old = await provider.sync_price(BASIC_MONTHLY, existing=None)
        dearer = RecurringPrice(
            plan=BASIC.model_copy(update={"amount": 2400}), interval=BillingInterval.MONTH
        )
        new = await provider.sync_price(dearer, existing=old)
        assert new != old
        assert fake_stripe.prices[old]["unit_amount"] == 1900  # never edited
        assert fake_stripe.prices[new]["unit_amount"] == 2400
        assert len(fake_stripe.products) == 1

    async def test_an_archived_price_is_replaced(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        old = await provider.sync_price(BASIC_MONTHLY, existing=None)
        fake_stripe.archive_price(old)
        new = await provider.sync_price(BASIC_MONTHLY, existing=old)
        assert new != old
        # The lookup key moved to the new price, so the next lookup finds it.
        assert fake_stripe.prices[new]["lookup_key"] == BASIC_MONTHLY.key
        assert fake_stripe.prices[old]["lookup_key"] is None


class TestCreateSubscription:
    async def test_a_checkout_session_in_subscription_mode(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        price_id = await provider.sync_price(BASIC_TRIAL, existing=None)
        started = await provider.create_subscription(
            _request(
                BASIC_TRIAL,
                price_id,
                user_id="usr_1",
                customer_email="jenny@example.com",
                return_url="https://shop.example.com/done",
                cancel_url="https://shop.example.com/cart",
            )
        )

        assert started.provider_subscription_id.startswith("cs_")
        assert started.status is SubscriptionStatus.INCOMPLETE
        assert started.redirect_url == fake_stripe.sessions[started.provider_subscription_id]["url"]
        (call,) = fake_stripe.calls("POST", "/v1/checkout/sessions")
        assert call.idempotency_key == "start-sub_ours_0001"
        metadata = {"subscription_id": "sub_ours_0001", "plan": "basic", "user_id": "usr_1"}
        assert call.body["mode"] == "subscription"
        assert call.body["line_items"] == [{"price": price_id, "quantity": 1}]
        assert call.body["subscription_data"] == {"metadata": metadata, "trial_period_days": 14}
        assert call.body["metadata"] == metadata
        assert call.body["customer_email"] == "jenny@example.com"
        assert (
            call.body["success_url"]
            == "https://shop.example.com/done?subscription_id=sub_ours_0001"
        )
        assert call.body["cancel_url"] == "https://shop.example.com/cart"

    async def test_without_a_synced_price_it_syncs_first(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        started = await provider.create_subscription(_request(BASIC_MONTHLY, None))
        (price,) = fake_stripe.prices.values()
        session = fake_stripe.sessions[started.provider_subscription_id]
        assert session["amount_total"] == 1900
        assert price["lookup_key"] == BASIC_MONTHLY.key


class TestGetSubscription:
    async def test_before_checkout_is_complete_it_is_incomplete(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        started = await provider.create_subscription(_request(BASIC_MONTHLY, None))
        state = await provider.get_subscription(started.provider_subscription_id)
        assert state.status is SubscriptionStatus.INCOMPLETE
        assert state.subscription_id == "sub_ours_0001"

    async def test_an_expired_checkout_never_was(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        started = await provider.create_subscription(_request(BASIC_MONTHLY, None))
        fake_stripe.expire_session(started.provider_subscription_id)
        state = await provider.get_subscription(started.provider_subscription_id)
        assert state.status is SubscriptionStatus.INCOMPLETE_EXPIRED

    async def test_after_checkout_the_session_leads_to_the_paid_subscription(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, subscription_id = await _started(provider, fake_stripe)

        state = await provider.get_subscription(session_id)

        item = fake_stripe.subscriptions[subscription_id]["items"]["data"][0]
        assert state.provider_subscription_id == subscription_id
        assert state.status is SubscriptionStatus.ACTIVE
        assert state.subscription_id == "sub_ours_0001"
        assert state.vendor_price_id == item["price"]["id"]
        assert state.current_period_start == datetime.fromtimestamp(
            item["current_period_start"], UTC
        )
        assert state.current_period_end == datetime.fromtimestamp(item["current_period_end"], UTC)
        assert state.cancel_at_period_end is False
        invoice = state.latest_invoice
        assert invoice is not None
        assert (invoice.amount, invoice.currency, invoice.paid) == (1900, "EUR", True)
        assert invoice.payment_id is not None
        assert fake_stripe.payment_intents[invoice.payment_id]["status"] == "succeeded"
        assert await provider.get_subscription(subscription_id) == state

    async def test_a_trial_is_trialing(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe, BASIC_TRIAL)
        state = await provider.get_subscription(subscription_id)
        assert state.status is SubscriptionStatus.TRIALING
        assert state.latest_invoice is not None and state.latest_invoice.amount == 0

    async def test_an_unknown_id_is_not_found(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        with pytest.raises(NotFound):
            await provider.get_subscription("sub_1NoSuchThing000000000000")
        with pytest.raises(NotFound):
            await provider.get_subscription("pi_3NotASubscription")

    async def test_a_failed_renewal_is_past_due(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe)
        fake_stripe.renew(subscription_id, succeed=False)
        state = await provider.get_subscription(subscription_id)
        assert state.status is SubscriptionStatus.PAST_DUE
        assert state.latest_invoice is not None and state.latest_invoice.paid is False


class TestStatusMap:
    @pytest.mark.parametrize(
        ("vendor", "ours"),
        [
            ("incomplete", SubscriptionStatus.INCOMPLETE),
            ("incomplete_expired", SubscriptionStatus.INCOMPLETE_EXPIRED),
            ("trialing", SubscriptionStatus.TRIALING),
            ("active", SubscriptionStatus.ACTIVE),
            ("past_due", SubscriptionStatus.PAST_DUE),
            ("unpaid", SubscriptionStatus.PAST_DUE),
            ("canceled", SubscriptionStatus.CANCELED),
            ("paused", SubscriptionStatus.PAUSED),
        ],
    )
    def test_known(self, vendor: str, ours: SubscriptionStatus) -> None:
        assert subscription_status(vendor, paid_before=True) is ours

    def test_unknown_is_never_active(self) -> None:
        assert subscription_status("frozen", paid_before=False) is SubscriptionStatus.INCOMPLETE
        assert subscription_status("frozen", paid_before=True) is SubscriptionStatus.PAST_DUE


class TestCancelAndResume:
    async def test_cancel_at_period_end_then_resume(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, subscription_id = await _started(provider, fake_stripe)

        canceling = await provider.cancel_subscription(
            session_id, at_period_end=True, idempotency_key="cancel-1"
        )
        assert (canceling.status, canceling.cancel_at_period_end) == (
            SubscriptionStatus.ACTIVE,
            True,
        )
        resumed = await provider.resume_subscription(subscription_id, idempotency_key="resume-1")
        assert (resumed.status, resumed.cancel_at_period_end) == (SubscriptionStatus.ACTIVE, False)
        keys = [
            r.idempotency_key
            for r in fake_stripe.calls("POST", f"/v1/subscriptions/{subscription_id}")
        ]
        assert keys == ["cancel-1", "resume-1"]

    async def test_cancelled_at_period_end_it_ends_at_renewal(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe)
        await provider.cancel_subscription(
            subscription_id, at_period_end=True, idempotency_key="cancel-1"
        )
        fake_stripe.renew(subscription_id)
        state = await provider.get_subscription(subscription_id)
        assert state.status is SubscriptionStatus.CANCELED
        with pytest.raises(InvalidStateTransition):
            await provider.resume_subscription(subscription_id, idempotency_key="resume-late")

    async def test_cancel_now_and_again(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe)
        canceled = await provider.cancel_subscription(
            subscription_id, at_period_end=False, idempotency_key="cancel-now"
        )
        assert canceled.status is SubscriptionStatus.CANCELED
        (call,) = fake_stripe.calls("DELETE", f"/v1/subscriptions/{subscription_id}")
        assert call.idempotency_key == "cancel-now"
        again = await provider.cancel_subscription(
            subscription_id, at_period_end=False, idempotency_key="cancel-again"
        )
        assert again.status is SubscriptionStatus.CANCELED
        assert len(fake_stripe.calls("DELETE", f"/v1/subscriptions/{subscription_id}")) == 1

    async def test_cancelling_an_unfinished_checkout_expires_it(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        started = await provider.create_subscription(_request(BASIC_MONTHLY, None))
        state = await provider.cancel_subscription(
            started.provider_subscription_id, at_period_end=True, idempotency_key="cancel-cs"
        )
        assert state.status is SubscriptionStatus.INCOMPLETE_EXPIRED
        assert fake_stripe.sessions[started.provider_subscription_id]["status"] == "expired"
        with pytest.raises(InvalidStateTransition):
            await provider.resume_subscription(
                started.provider_subscription_id, idempotency_key="resume-cs"
            )


class TestChangePrice:
    async def test_an_upgrade_now_is_charged_in_full_and_restarts_the_period(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe)
        pro = await provider.sync_price(PRO_MONTHLY, existing=None)

        state = await provider.change_subscription_price(
            subscription_id, vendor_price_id=pro, now=True, prorate=False, idempotency_key="up-1"
        )

        assert state.vendor_price_id == pro
        assert state.latest_invoice is not None
        assert (state.latest_invoice.amount, state.latest_invoice.paid) == (2900, True)
        (call,) = fake_stripe.calls("POST", f"/v1/subscriptions/{subscription_id}")
        assert call.idempotency_key == "up-1"
        assert call.body["proration_behavior"] == "none"
        assert call.body["billing_cycle_anchor"] == {"type": "now"}
        assert call.body["payment_behavior"] == "error_if_incomplete"

    async def test_an_upgrade_with_proration_uses_stripes_arithmetic(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe)
        pro = await provider.sync_price(PRO_MONTHLY, existing=None)
        state = await provider.change_subscription_price(
            subscription_id, vendor_price_id=pro, now=True, prorate=True, idempotency_key="up-2"
        )
        assert state.latest_invoice is not None
        assert 0 < state.latest_invoice.amount <= 1000  # the difference, for what is left
        (call,) = fake_stripe.calls("POST", f"/v1/subscriptions/{subscription_id}")
        assert call.body["proration_behavior"] == "always_invoice"
        assert "billing_cycle_anchor" not in call.body

    async def test_a_downgrade_bills_the_new_price_from_the_renewal(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe, PRO_MONTHLY)
        before = await provider.get_subscription(subscription_id)
        basic = await provider.sync_price(BASIC_MONTHLY, existing=None)

        state = await provider.change_subscription_price(
            subscription_id, vendor_price_id=basic, now=False, prorate=False, idempotency_key="down"
        )

        assert state.latest_invoice == before.latest_invoice  # nothing charged or credited
        assert state.current_period_end == before.current_period_end
        fake_stripe.renew(subscription_id)
        renewed = await provider.get_subscription(subscription_id)
        assert renewed.latest_invoice is not None
        assert (renewed.latest_invoice.amount, renewed.latest_invoice.paid) == (1900, True)

    async def test_a_declined_upgrade_changes_nothing(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe)
        pro = await provider.sync_price(PRO_MONTHLY, existing=None)
        fake_stripe.fail_next("decline", path_prefix=f"/v1/subscriptions/{subscription_id}")
        with pytest.raises(PaymentDeclined):
            await provider.change_subscription_price(
                subscription_id,
                vendor_price_id=pro,
                now=True,
                prorate=False,
                idempotency_key="up-3",
            )
        assert (await provider.get_subscription(subscription_id)).vendor_price_id != pro


class TestPortal:
    async def test_the_customers_portal(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, subscription_id = await _started(provider, fake_stripe)
        url = await provider.customer_portal_url(
            session_id, return_url="https://shop.example.com/account"
        )
        (portal,) = fake_stripe.portal_sessions.values()
        assert url == portal["url"]
        assert portal["customer"] == fake_stripe.subscriptions[subscription_id]["customer"]
        assert portal["return_url"] == "https://shop.example.com/account"


class TestEvents:
    async def test_subscription_created_updated_deleted(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe)
        created = await _deliver(provider, fake_stripe.last_event("customer.subscription.created"))
        assert created.verified and created.payment_id is None and created.status is None
        assert created.subscription is not None
        assert (created.subscription.provider_subscription_id, created.subscription.status) == (
            subscription_id,
            SubscriptionStatus.ACTIVE,
        )
        assert created.subscription.subscription_id == "sub_ours_0001"

        await provider.cancel_subscription(subscription_id, at_period_end=True, idempotency_key="c")
        updated = await _deliver(provider, fake_stripe.last_event("customer.subscription.updated"))
        assert updated.subscription is not None and updated.subscription.cancel_at_period_end

        fake_stripe.renew(subscription_id)
        deleted = await _deliver(provider, fake_stripe.last_event("customer.subscription.deleted"))
        assert deleted.subscription is not None
        assert deleted.subscription.status is SubscriptionStatus.CANCELED

    async def test_invoice_paid_carries_the_invoice_and_the_subscription_now(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe)
        fake_stripe.renew(subscription_id)
        event = fake_stripe.last_event("invoice.paid")

        parsed = await _deliver(provider, event)

        assert parsed.event_type == "invoice.paid" and parsed.verified
        assert parsed.invoice is not None
        assert parsed.invoice.provider_invoice_id == event["data"]["object"]["id"]
        assert (parsed.invoice.amount, parsed.invoice.currency, parsed.invoice.paid) == (
            1900,
            "EUR",
            True,
        )
        assert parsed.invoice.period_start is not None and parsed.invoice.period_end is not None
        assert parsed.invoice.payment_id is not None and parsed.invoice.payment_id.startswith("pi_")
        assert isinstance(parsed.subscription, SubscriptionState)
        assert parsed.subscription.provider_subscription_id == subscription_id
        assert parsed.subscription.subscription_id == "sub_ours_0001"
        assert parsed.subscription.status is SubscriptionStatus.ACTIVE

    async def test_invoice_payment_failed_then_recovered(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe)
        fake_stripe.renew(subscription_id, succeed=False)
        failed = await _deliver(provider, fake_stripe.last_event("invoice.payment_failed"))
        assert failed.invoice is not None and failed.invoice.paid is False
        assert failed.invoice.amount == 1900
        assert failed.subscription is not None
        assert failed.subscription.status is SubscriptionStatus.PAST_DUE

        fake_stripe.renew(subscription_id, succeed=True)
        recovered = await _deliver(provider, fake_stripe.last_event("invoice.paid"))
        assert recovered.subscription is not None
        assert recovered.subscription.status is SubscriptionStatus.ACTIVE

    async def test_checkout_completed_in_subscription_mode_is_about_the_subscription(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        _, subscription_id = await _started(provider, fake_stripe)
        parsed = await _deliver(provider, fake_stripe.last_event("checkout.session.completed"))
        # Not a payment of ours: the service must not look for a payment cs_...
        assert (parsed.payment_id, parsed.status) == (None, None)
        assert parsed.subscription is not None
        assert parsed.subscription.provider_subscription_id == subscription_id
        assert parsed.subscription.subscription_id == "sub_ours_0001"

    async def test_checkout_expired_in_subscription_mode(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        started = await provider.create_subscription(_request(BASIC_MONTHLY, None))
        fake_stripe.expire_session(started.provider_subscription_id)
        parsed = await _deliver(provider, fake_stripe.last_event("checkout.session.expired"))
        assert parsed.payment_id is None
        assert parsed.subscription is not None
        assert parsed.subscription.status is SubscriptionStatus.INCOMPLETE_EXPIRED
        assert parsed.subscription.subscription_id == "sub_ours_0001"

    async def test_a_forged_subscription_event_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        await _started(provider, fake_stripe)
        event = fake_stripe.last_event("customer.subscription.created")
        body, headers = FakeStripe.signed_delivery(event, "whsec_not_the_right_secret")
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(body, headers)


def test_a_price_key_names_everything_a_vendor_price_fixes() -> None:
    assert BASIC_MONTHLY.key == "basic:EUR:1900:1month:0"
    assert BASIC_TRIAL.key == "basic:EUR:1900:1month:14"
