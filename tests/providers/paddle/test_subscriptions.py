"""Subscriptions on Paddle Billing: the provider (real HTTP client) against the fake Paddle,
every request and answer checked against Paddle's published description. Plan sync, the
checkout transaction that starts a subscription, reads, cancel (scheduled or now), resume,
price changes, the customer portal, and the events, delivered signed."""

from __future__ import annotations

from typing import Any

import pytest

from models.subscription import BillingInterval, SubscriptionStatus
from services.errors import InvalidStateTransition, InvalidWebhookSignature, NotFound
from services.payment_providers.base import RecurringPrice, SubscriptionRequest, WebhookEvent
from services.payment_providers.paddle import PaddleProvider
from services.payment_providers.paddle.billing import subscription_status
from tests.fakes.paddle_server import FakePaddle
from tests.providers.paddle.conftest import BASIC

PRO = BASIC.model_copy(update={"code": "pro", "name": "Pro", "amount": BASIC.amount + 1000})
BASIC_MONTHLY = RecurringPrice(plan=BASIC, interval=BillingInterval.MONTH)
PRO_MONTHLY = RecurringPrice(plan=PRO, interval=BillingInterval.MONTH)
BASIC_TRIAL = RecurringPrice(plan=BASIC, interval=BillingInterval.MONTH, trial_days=14)
OURS = "sub_ours_0001"


def _request(price: RecurringPrice, price_id: str | None, **fields: Any) -> SubscriptionRequest:
    return SubscriptionRequest(
        subscription_id=OURS,
        price=price,
        idempotency_key=f"start-{OURS}",
        base_url="https://payments.example.com",
        vendor_price_id=price_id,
        **fields,
    )


async def _subscribed(
    provider: PaddleProvider, fake: FakePaddle, price: RecurringPrice = BASIC_MONTHLY
) -> tuple[str, str]:
    """(checkout transaction, subscription) once the customer paid on Paddle Checkout."""
    price_id = await provider.sync_price(price, existing=None)
    started = await provider.create_subscription(_request(price, price_id))
    paid = fake.pay(started.provider_subscription_id)
    return started.provider_subscription_id, str(paid["subscription_id"])


async def _deliver(
    provider: PaddleProvider, fake: FakePaddle, event: dict[str, Any]
) -> WebhookEvent:
    body, headers = fake.signed_delivery(event)
    return await provider.parse_webhook(body, headers)


def _writes(fake: FakePaddle) -> list[Any]:
    return [*fake.calls("POST"), *fake.calls("PATCH")]


class TestSyncPrice:
    async def test_a_product_and_a_recurring_tax_inclusive_price(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        price_id = await provider.sync_price(BASIC_TRIAL, existing=None)

        price = fake.prices[price_id]
        assert price["unit_price"] == {"amount": str(BASIC.amount), "currency_code": BASIC.currency}
        assert price["billing_cycle"] == {"interval": "month", "frequency": 1}
        assert price["trial_period"] == {"interval": "day", "frequency": 14}
        assert price["tax_mode"] == "internal"
        assert price["custom_data"] == {"plan": BASIC.code, "price_key": BASIC_TRIAL.key}
        assert fake.products[price["product_id"]]["custom_data"] == {"plan": BASIC.code}

    async def test_kept_or_found_again_without_a_write(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        price_id = await provider.sync_price(BASIC_MONTHLY, existing=None)
        writes = len(_writes(fake))
        assert await provider.sync_price(BASIC_MONTHLY, existing=price_id) == price_id
        # Without our mapping (a lost answer, another instance): found by its price key.
        assert await provider.sync_price(BASIC_MONTHLY, existing=None) == price_id
        assert len(_writes(fake)) == writes

    async def test_a_new_amount_or_an_archived_price_makes_a_new_one_on_the_same_product(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        old = await provider.sync_price(BASIC_MONTHLY, existing=None)
        fake.archive_price(old)
        replaced = await provider.sync_price(BASIC_MONTHLY, existing=old)
        dearer = RecurringPrice(
            plan=BASIC.model_copy(update={"amount": BASIC.amount + 500}),
            interval=BillingInterval.MONTH,
        )
        new = await provider.sync_price(dearer, existing=replaced)
        assert len({old, replaced, new}) == 3
        assert len(fake.products) == 1
        assert fake.prices[old]["unit_price"]["amount"] == str(BASIC.amount)  # never edited


class TestStartAndRead:
    async def test_a_checkout_transaction_carries_our_subscription_id(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        price_id = await provider.sync_price(BASIC_MONTHLY, existing=None)
        started = await provider.create_subscription(
            _request(BASIC_MONTHLY, price_id, user_id="u1")
        )

        assert started.provider_subscription_id.startswith("txn_")
        assert started.status is SubscriptionStatus.INCOMPLETE
        transaction = fake.transactions[started.provider_subscription_id]
        assert started.redirect_url == transaction["checkout"]["url"]
        assert transaction["custom_data"] == {
            "subscription_id": OURS,
            "plan": BASIC.code,
            "user_id": "u1",
        }
        assert [i["price"]["id"] for i in transaction["items"]] == [price_id]
        state = await provider.get_subscription(started.provider_subscription_id)
        assert (state.status, state.subscription_id) == (SubscriptionStatus.INCOMPLETE, OURS)

    async def test_a_canceled_checkout_never_was(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        started = await provider.create_subscription(_request(BASIC_MONTHLY, None))
        fake.cancel(started.provider_subscription_id)
        state = await provider.get_subscription(started.provider_subscription_id)
        assert state.status is SubscriptionStatus.INCOMPLETE_EXPIRED

    async def test_paid_it_leads_to_the_subscription_and_its_invoice(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        checkout, subscription_id = await _subscribed(provider, fake)

        state = await provider.get_subscription(checkout)

        paddle = fake.subscriptions[subscription_id]
        assert state.provider_subscription_id == subscription_id
        assert (state.status, state.subscription_id) == (SubscriptionStatus.ACTIVE, OURS)
        assert state.vendor_price_id == paddle["items"][0]["price"]["id"]
        assert state.current_period_end is not None
        assert state.current_period_end.isoformat().startswith(
            paddle["current_billing_period"]["ends_at"][:19]
        )
        invoice = state.latest_invoice
        assert invoice is not None
        assert (invoice.provider_invoice_id, invoice.payment_id) == (checkout, checkout)
        assert (invoice.amount, invoice.currency, invoice.paid) == (
            BASIC.amount,
            BASIC.currency,
            True,
        )
        assert await provider.get_subscription(subscription_id) == state

    async def test_a_trial_then_its_first_renewal(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        _, subscription_id = await _subscribed(provider, fake, BASIC_TRIAL)
        trial = await provider.get_subscription(subscription_id)
        assert trial.status is SubscriptionStatus.TRIALING
        assert trial.latest_invoice is not None and trial.latest_invoice.amount == 0
        fake.renew(subscription_id)
        renewed = await provider.get_subscription(subscription_id)
        assert renewed.status is SubscriptionStatus.ACTIVE
        assert renewed.latest_invoice is not None
        assert (renewed.latest_invoice.amount, renewed.latest_invoice.paid) == (BASIC.amount, True)

    async def test_a_failed_renewal_is_past_due(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        _, subscription_id = await _subscribed(provider, fake)
        fake.renew(subscription_id, succeed=False)
        state = await provider.get_subscription(subscription_id)
        assert state.status is SubscriptionStatus.PAST_DUE
        assert state.latest_invoice is not None and state.latest_invoice.paid is False

    async def test_unknown_ids(self, provider: PaddleProvider, fake: FakePaddle) -> None:
        with pytest.raises(NotFound):
            await provider.get_subscription("sub_01aaaaaaaaaaaaaaaaaaaaaaaa")
        with pytest.raises(NotFound):
            await provider.get_subscription("I-NOTPADDLE")


class TestCancelAndResume:
    async def test_at_period_end_is_a_scheduled_change_that_resume_removes(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        checkout, subscription_id = await _subscribed(provider, fake)

        canceling = await provider.cancel_subscription(
            checkout, at_period_end=True, idempotency_key="c1"
        )
        assert (canceling.status, canceling.cancel_at_period_end) == (
            SubscriptionStatus.ACTIVE,
            True,
        )
        (call,) = fake.calls("POST", f"/subscriptions/{subscription_id}/cancel")
        assert call.body == {"effective_from": "next_billing_period"}
        again = await provider.cancel_subscription(
            checkout, at_period_end=True, idempotency_key="c2"
        )
        assert (
            again.cancel_at_period_end
            and len(fake.calls("POST", f"/subscriptions/{subscription_id}/cancel")) == 1
        )

        resumed = await provider.resume_subscription(subscription_id, idempotency_key="r1")
        assert (resumed.status, resumed.cancel_at_period_end) == (SubscriptionStatus.ACTIVE, False)
        (patch,) = fake.calls("PATCH", f"/subscriptions/{subscription_id}")
        assert patch.body == {"scheduled_change": None}

    async def test_it_ends_at_renewal(self, provider: PaddleProvider, fake: FakePaddle) -> None:
        _, subscription_id = await _subscribed(provider, fake)
        await provider.cancel_subscription(subscription_id, at_period_end=True, idempotency_key="c")
        fake.renew(subscription_id)
        assert (
            await provider.get_subscription(subscription_id)
        ).status is SubscriptionStatus.CANCELED
        with pytest.raises(InvalidStateTransition):
            await provider.resume_subscription(subscription_id, idempotency_key="r")

    async def test_now(self, provider: PaddleProvider, fake: FakePaddle) -> None:
        _, subscription_id = await _subscribed(provider, fake)
        state = await provider.cancel_subscription(
            subscription_id, at_period_end=False, idempotency_key="n"
        )
        assert state.status is SubscriptionStatus.CANCELED
        (call,) = fake.calls("POST", f"/subscriptions/{subscription_id}/cancel")
        assert call.body == {"effective_from": "immediately"}
        again = await provider.cancel_subscription(
            subscription_id, at_period_end=False, idempotency_key="m"
        )
        assert again.status is SubscriptionStatus.CANCELED

    async def test_before_checkout_there_is_nothing_to_cancel(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        started = await provider.create_subscription(_request(BASIC_MONTHLY, None))
        with pytest.raises(InvalidStateTransition):
            await provider.cancel_subscription(
                started.provider_subscription_id, at_period_end=False, idempotency_key="x"
            )


class TestChangePrice:
    async def test_an_upgrade_now_is_charged_in_full(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        _, subscription_id = await _subscribed(provider, fake)
        pro = await provider.sync_price(PRO_MONTHLY, existing=None)

        state = await provider.change_subscription_price(
            subscription_id, vendor_price_id=pro, now=True, prorate=False, idempotency_key="up"
        )

        assert state.vendor_price_id == pro
        assert state.latest_invoice is not None
        assert (state.latest_invoice.amount, state.latest_invoice.paid) == (PRO.amount, True)
        (call,) = fake.calls("PATCH", f"/subscriptions/{subscription_id}")
        assert call.body == {
            "items": [{"price_id": pro, "quantity": 1}],
            "proration_billing_mode": "full_immediately",
            "on_payment_failure": "prevent_change",
        }
        # Asked again (a lost answer): already done, nothing billed twice.
        await provider.change_subscription_price(
            subscription_id, vendor_price_id=pro, now=True, prorate=False, idempotency_key="up"
        )
        assert len(fake.calls("PATCH", f"/subscriptions/{subscription_id}")) == 1

    async def test_an_upgrade_with_proration(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        _, subscription_id = await _subscribed(provider, fake)
        pro = await provider.sync_price(PRO_MONTHLY, existing=None)
        state = await provider.change_subscription_price(
            subscription_id, vendor_price_id=pro, now=True, prorate=True, idempotency_key="up"
        )
        assert state.latest_invoice is not None
        assert 0 < state.latest_invoice.amount <= PRO.amount - BASIC.amount
        (call,) = fake.calls("PATCH", f"/subscriptions/{subscription_id}")
        assert (
            call.body is not None and call.body["proration_billing_mode"] == "prorated_immediately"
        )

    async def test_a_downgrade_bills_nothing_until_renewal(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        _, subscription_id = await _subscribed(provider, fake, PRO_MONTHLY)
        before = await provider.get_subscription(subscription_id)
        basic = await provider.sync_price(BASIC_MONTHLY, existing=None)
        state = await provider.change_subscription_price(
            subscription_id, vendor_price_id=basic, now=False, prorate=False, idempotency_key="d"
        )
        assert state.latest_invoice == before.latest_invoice
        (call,) = fake.calls("PATCH", f"/subscriptions/{subscription_id}")
        assert call.body is not None and call.body["proration_billing_mode"] == "do_not_bill"
        assert "on_payment_failure" not in call.body
        fake.renew(subscription_id)
        renewed = await provider.get_subscription(subscription_id)
        assert renewed.latest_invoice is not None and renewed.latest_invoice.amount == BASIC.amount


class TestPortal:
    async def test_the_customers_portal(self, provider: PaddleProvider, fake: FakePaddle) -> None:
        _, subscription_id = await _subscribed(provider, fake)
        url = await provider.customer_portal_url(subscription_id, return_url="https://x.example/")
        (session,) = fake.portal_sessions.values()
        assert url == session["urls"]["general"]["overview"]
        customer = fake.subscriptions[subscription_id]["customer_id"]
        (call,) = fake.calls("POST", f"/customers/{customer}/portal-sessions")
        assert call.body == {"subscription_ids": [subscription_id]}


class TestEvents:
    async def test_subscription_events_carry_the_subscription(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        _, subscription_id = await _subscribed(provider, fake)
        for event_type in ("subscription.created", "subscription.activated"):
            event = await _deliver(provider, fake, fake.last_event(event_type))
            assert event.verified and event.payment_id is None
            assert event.subscription is not None
            assert (
                event.subscription.provider_subscription_id,
                event.subscription.subscription_id,
            ) == (
                subscription_id,
                OURS,
            )
        await provider.cancel_subscription(
            subscription_id, at_period_end=False, idempotency_key="n"
        )
        canceled = await _deliver(provider, fake, fake.last_event("subscription.canceled"))
        assert canceled.subscription is not None
        assert canceled.subscription.status is SubscriptionStatus.CANCELED

    async def test_transaction_completed_of_a_renewal_is_an_invoice_not_a_payment(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        _, subscription_id = await _subscribed(provider, fake)
        fake.renew(subscription_id)
        sent = fake.last_event("transaction.completed")

        event = await _deliver(provider, fake, sent)

        assert (event.payment_id, event.status, event.reference) == (None, None, None)
        assert event.invoice is not None
        assert (event.invoice.provider_invoice_id, event.invoice.paid) == (sent["data"]["id"], True)
        assert event.invoice.amount == BASIC.amount
        assert event.subscription is not None
        assert (event.subscription.status, event.subscription.subscription_id) == (
            SubscriptionStatus.ACTIVE,
            OURS,
        )

    async def test_the_first_checkout_completed_names_the_new_subscription(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        checkout, subscription_id = await _subscribed(provider, fake)
        event = await _deliver(provider, fake, fake.last_event("transaction.completed"))
        assert event.invoice is not None and event.invoice.provider_invoice_id == checkout
        assert event.subscription is not None
        assert event.subscription.provider_subscription_id == subscription_id

    async def test_payment_failed_and_past_due(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        _, subscription_id = await _subscribed(provider, fake)
        fake.renew(subscription_id, succeed=False)
        failed = await _deliver(provider, fake, fake.last_event("transaction.payment_failed"))
        assert failed.invoice is not None and failed.invoice.paid is False
        assert failed.subscription is not None
        assert failed.subscription.status is SubscriptionStatus.PAST_DUE
        past_due = await _deliver(provider, fake, fake.last_event("subscription.past_due"))
        assert past_due.subscription is not None
        assert past_due.subscription.status is SubscriptionStatus.PAST_DUE

    async def test_one_off_payments_are_unchanged(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        from tests.providers.paddle.conftest import intent_request

        result = await provider.create_payment_intent(intent_request())
        fake.pay(result.payment_id)
        event = await _deliver(provider, fake, fake.last_event("transaction.completed"))
        assert event.payment_id == result.payment_id
        assert (event.subscription, event.invoice) == (None, None)

    async def test_a_forged_event_is_refused(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        await _subscribed(provider, fake)
        body, headers = fake.signed_delivery(
            fake.last_event("subscription.created"), secrets=["pdl_ntfset_not_the_secret_of_this"]
        )
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(body, headers)


class TestStatusMap:
    @pytest.mark.parametrize(
        ("paddle", "ours"),
        [
            ("active", SubscriptionStatus.ACTIVE),
            ("trialing", SubscriptionStatus.TRIALING),
            ("past_due", SubscriptionStatus.PAST_DUE),
            ("paused", SubscriptionStatus.PAUSED),
            ("canceled", SubscriptionStatus.CANCELED),
            ("frozen", SubscriptionStatus.PAST_DUE),  # unknown: never active
        ],
    )
    def test_statuses(self, paddle: str, ours: SubscriptionStatus) -> None:
        assert subscription_status(paddle) is ours
