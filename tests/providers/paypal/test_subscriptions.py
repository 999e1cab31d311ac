"""Subscriptions on PayPal: the provider (real HTTP client) against the fake PayPal, whose
Subscriptions v1 follows PayPal's API reference pages (no published description exists in
shared/specs). Plan sync, subscribing through PayPal's approval page, reads, cancel (now, or
at period end as emulated), resume, plan changes, and the events, delivered signed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from models.subscription import BillingInterval, SubscriptionStatus
from services.errors import (
    InvalidStateTransition,
    NotFound,
    OperationNotSupported,
    ProviderUnavailable,
)
from services.payment_providers.base import RecurringPrice, SubscriptionRequest
from services.payment_providers.paypal import PayPalProvider, billing
from tests.fakes.paypal_server import FakePayPal, WebhookSigner
from tests.providers.paypal.conftest import WEBHOOK_ID, intent_request

BASIC = intent_request().plan
PRO = BASIC.model_copy(update={"code": "pro", "name": "Pro", "amount": 2900})
BASIC_MONTHLY = RecurringPrice(plan=BASIC, interval=BillingInterval.MONTH)
PRO_MONTHLY = RecurringPrice(plan=PRO, interval=BillingInterval.MONTH)
BASIC_TRIAL = RecurringPrice(plan=BASIC, interval=BillingInterval.MONTH, trial_days=7)
OURS = "sub_ours_0001"


def _request(price: RecurringPrice, plan_id: str | None, **fields: Any) -> SubscriptionRequest:
    return SubscriptionRequest(
        subscription_id=OURS,
        price=price,
        idempotency_key=fields.pop("idempotency_key", f"start-{OURS}"),
        base_url="https://payments.example.com",
        vendor_price_id=plan_id,
        **fields,
    )


async def _active(
    provider: PayPalProvider, fake: FakePayPal, price: RecurringPrice = BASIC_MONTHLY
) -> str:
    plan_id = await provider.sync_price(price, existing=None)
    started = await provider.create_subscription(_request(price, plan_id))
    fake.approve_subscription(started.provider_subscription_id)
    return started.provider_subscription_id


async def _deliver(provider: PayPalProvider, fake: FakePayPal, event: dict[str, Any]) -> Any:
    body, headers = fake.signed_delivery(event, WEBHOOK_ID)
    return await provider.parse_webhook(body, headers)


def _posts(fake: FakePayPal) -> list[Any]:
    return [r for r in fake.calls("POST") if r.path.startswith(("/v1/billing", "/v1/catalogs"))]


class TestSyncPrice:
    async def test_a_product_and_a_monthly_plan(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        plan_id = await provider.sync_price(BASIC_MONTHLY, existing=None)

        plan = fake_paypal.plans[plan_id]
        assert plan["status"] == "ACTIVE"
        assert plan["description"] == BASIC_MONTHLY.key
        (cycle,) = plan["billing_cycles"]
        assert cycle["frequency"] == {"interval_unit": "MONTH", "interval_count": 1}
        assert cycle["pricing_scheme"]["fixed_price"] == {"currency_code": "EUR", "value": "19.00"}
        assert (cycle["tenure_type"], cycle["total_cycles"]) == ("REGULAR", 0)
        assert fake_paypal.products[plan["product_id"]]["id"] == "payments-subscriptions"
        assert all(r.request_id for r in _posts(fake_paypal))  # PayPal-Request-Id on writes

    async def test_a_trial_is_a_free_first_cycle(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        plan_id = await provider.sync_price(BASIC_TRIAL, existing=None)
        trial, regular = fake_paypal.plans[plan_id]["billing_cycles"]
        assert trial["frequency"] == {"interval_unit": "DAY", "interval_count": 7}
        assert (trial["tenure_type"], trial["total_cycles"], "pricing_scheme" in trial) == (
            "TRIAL",
            1,
            False,
        )
        assert (regular["sequence"], regular["tenure_type"]) == (2, "REGULAR")

    async def test_kept_or_found_again_without_a_write(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        plan_id = await provider.sync_price(BASIC_MONTHLY, existing=None)
        writes = len(_posts(fake_paypal))
        assert await provider.sync_price(BASIC_MONTHLY, existing=plan_id) == plan_id
        # Without our mapping, the product's plans are listed and ours found by its key.
        assert await provider.sync_price(BASIC_MONTHLY, existing=None) == plan_id
        assert len(_posts(fake_paypal)) == writes

    async def test_a_price_change_or_a_deactivated_plan_makes_a_new_plan(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        old = await provider.sync_price(BASIC_MONTHLY, existing=None)
        dearer = RecurringPrice(
            plan=BASIC.model_copy(update={"amount": 2400}), interval=BillingInterval.MONTH
        )
        new = await provider.sync_price(dearer, existing=old)
        assert new != old and len(fake_paypal.products) == 1
        fake_paypal.deactivate_plan(new)
        newer = await provider.sync_price(dearer, existing=new)
        assert newer not in (old, new)
        assert fake_paypal.plans[old]["billing_cycles"][0]["pricing_scheme"]["fixed_price"] == {
            "currency_code": "EUR",
            "value": "19.00",
        }

    async def test_a_currency_paypal_does_not_bill_is_refused(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        ngn = RecurringPrice(
            plan=BASIC.model_copy(update={"currency": "NGN"}), interval=BillingInterval.MONTH
        )
        with pytest.raises(OperationNotSupported):
            await provider.sync_price(ngn, existing=None)


class TestCreateAndGet:
    async def test_subscribe_through_paypals_approval_page(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        plan_id = await provider.sync_price(BASIC_MONTHLY, existing=None)
        started = await provider.create_subscription(
            _request(
                BASIC_MONTHLY,
                plan_id,
                customer_email="jenny@example.com",
                return_url="https://shop.example.com/done",
            )
        )

        assert started.provider_subscription_id.startswith("I-")
        assert started.status is SubscriptionStatus.INCOMPLETE
        assert started.redirect_url is not None and "ba_token=BA-" in started.redirect_url
        (call,) = fake_paypal.calls("POST", "/v1/billing/subscriptions")
        assert call.request_id == f"start-{OURS}"
        assert call.body is not None
        assert (call.body["plan_id"], call.body["custom_id"]) == (plan_id, OURS)
        assert call.body["subscriber"] == {"email_address": "jenny@example.com"}
        context = call.body["application_context"]
        assert context["return_url"] == (
            f"https://shop.example.com/done?provider=paypal&subscription_id={OURS}&status=approved"
        )
        assert context["user_action"] == "SUBSCRIBE_NOW"

        pending = await provider.get_subscription(started.provider_subscription_id)
        assert pending.status is SubscriptionStatus.INCOMPLETE
        assert pending.approval_url == started.redirect_url
        assert pending.latest_invoice is None

    async def test_once_approved_it_is_active_and_paid(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal)

        state = await provider.get_subscription(subscription_id)

        paypal = fake_paypal.subscriptions[subscription_id]
        assert state.status is SubscriptionStatus.ACTIVE
        assert (state.subscription_id, state.vendor_price_id) == (OURS, paypal["plan_id"])
        assert state.current_period_end == datetime.fromisoformat(
            paypal["billing_info"]["next_billing_time"]
        )
        assert state.cancel_at_period_end is False
        invoice = state.latest_invoice
        assert invoice is not None
        (transaction,) = fake_paypal.transactions[subscription_id]
        assert (invoice.provider_invoice_id, invoice.amount, invoice.currency, invoice.paid) == (
            transaction["id"],
            1900,
            "EUR",
            True,
        )

    async def test_a_trial_is_trialing_until_the_first_renewal(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal, BASIC_TRIAL)
        assert (await provider.get_subscription(subscription_id)).status is (
            SubscriptionStatus.TRIALING
        )
        fake_paypal.renew(subscription_id)
        assert (await provider.get_subscription(subscription_id)).status is (
            SubscriptionStatus.ACTIVE
        )

    async def test_failed_renewals_are_past_due_then_suspended(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal)
        fake_paypal.renew(subscription_id, succeed=False)
        state = await provider.get_subscription(subscription_id)
        assert state.status is SubscriptionStatus.PAST_DUE
        assert state.latest_invoice is not None and state.latest_invoice.paid is False
        fake_paypal.renew(subscription_id, succeed=False)
        fake_paypal.renew(subscription_id, succeed=False)  # the third: PayPal suspends it
        state = await provider.get_subscription(subscription_id)
        assert (state.vendor_status, state.status) == ("SUSPENDED", SubscriptionStatus.PAST_DUE)

    async def test_unknown_ids_are_not_found(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        with pytest.raises(NotFound):
            await provider.get_subscription("I-NOSUCHTHING1")
        with pytest.raises(NotFound):
            await provider.get_subscription("../v2/checkout/orders/X")


class TestCancelAndResume:
    async def test_cancel_at_period_end_is_a_suspension_until_then(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal)
        period_end = (await provider.get_subscription(subscription_id)).current_period_end

        state = await provider.cancel_subscription(
            subscription_id, at_period_end=True, idempotency_key="cancel-1"
        )

        assert (state.status, state.cancel_at_period_end) == (SubscriptionStatus.ACTIVE, True)
        assert state.current_period_end == period_end
        paypal = fake_paypal.subscriptions[subscription_id]
        assert paypal["status"] == "SUSPENDED"  # billing stopped
        (call,) = fake_paypal.calls("POST", f"/v1/billing/subscriptions/{subscription_id}/suspend")
        assert call.request_id == "cancel-1"
        # Asked again: nothing more to do.
        again = await provider.cancel_subscription(
            subscription_id, at_period_end=True, idempotency_key="cancel-2"
        )
        assert again.cancel_at_period_end is True
        assert len(_posts(fake_paypal)) == 4  # product, plan, subscription, suspend

        resumed = await provider.resume_subscription(subscription_id, idempotency_key="resume-1")
        assert (resumed.status, resumed.cancel_at_period_end) == (SubscriptionStatus.ACTIVE, False)
        assert fake_paypal.subscriptions[subscription_id]["status"] == "ACTIVE"

    def test_after_the_period_a_suspension_of_ours_reads_as_canceled(self) -> None:
        end = datetime(2026, 1, 31, tzinfo=UTC)
        subscription = {
            "id": "I-ABCDEF123456",
            "status": "SUSPENDED",
            "status_change_note": billing.period_end_note(end),
            "billing_info": {"last_payment": {"time": "2026-01-01T00:00:00Z"}},
        }
        before = billing.subscription_state(subscription, now=end - timedelta(seconds=1))
        after = billing.subscription_state(subscription, now=end)
        assert (before.status, before.cancel_at_period_end) == (SubscriptionStatus.ACTIVE, True)
        assert (after.status, after.cancel_at_period_end) == (SubscriptionStatus.CANCELED, False)
        # Set to cancel while a renewal had failed: past due until then, still ending.
        failing = {**subscription, "billing_info": {"failed_payments_count": 1}}
        still = billing.subscription_state(failing, now=end - timedelta(seconds=1))
        assert (still.status, still.cancel_at_period_end) == (SubscriptionStatus.PAST_DUE, True)
        # Suspended for another reason: paused, or past due after failed payments.
        paused = {**subscription, "status_change_note": "Customer asked for a break"}
        assert billing.subscription_state(paused, now=end).status is SubscriptionStatus.PAUSED

    async def test_cancel_now_is_final(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal)
        state = await provider.cancel_subscription(
            subscription_id, at_period_end=False, idempotency_key="cancel-now"
        )
        assert state.status is SubscriptionStatus.CANCELED
        assert fake_paypal.subscriptions[subscription_id]["status"] == "CANCELLED"
        again = await provider.cancel_subscription(
            subscription_id, at_period_end=False, idempotency_key="cancel-again"
        )
        assert again.status is SubscriptionStatus.CANCELED
        with pytest.raises(InvalidStateTransition):
            await provider.resume_subscription(subscription_id, idempotency_key="resume")

    async def test_an_unapproved_subscription_cannot_be_canceled(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        started = await provider.create_subscription(_request(BASIC_MONTHLY, None))
        with pytest.raises(InvalidStateTransition):
            await provider.cancel_subscription(
                started.provider_subscription_id, at_period_end=False, idempotency_key="c"
            )


class TestChangePlan:
    async def test_a_change_at_renewal_is_a_revision_the_buyer_approves(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal, PRO_MONTHLY)
        basic = await provider.sync_price(BASIC_MONTHLY, existing=None)

        state = await provider.change_subscription_price(
            subscription_id, vendor_price_id=basic, now=False, prorate=False, idempotency_key="down"
        )

        assert state.approval_url is not None and "ba_token=BA-" in state.approval_url
        assert state.vendor_price_id != basic  # not before the buyer consents
        (call,) = fake_paypal.calls("POST", f"/v1/billing/subscriptions/{subscription_id}/revise")
        assert (call.request_id, call.body) == ("down", {"plan_id": basic})
        fake_paypal.approve_revision(subscription_id)
        fake_paypal.renew(subscription_id)
        renewed = await provider.get_subscription(subscription_id)
        assert renewed.vendor_price_id == basic
        assert renewed.latest_invoice is not None and renewed.latest_invoice.amount == 1900

    async def test_a_change_now_is_not_something_paypal_does(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal)
        pro = await provider.sync_price(PRO_MONTHLY, existing=None)
        with pytest.raises(OperationNotSupported):
            await provider.change_subscription_price(
                subscription_id, vendor_price_id=pro, now=True, prorate=False, idempotency_key="u"
            )

    async def test_no_customer_portal(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        with pytest.raises(OperationNotSupported):
            await provider.customer_portal_url("I-ABCDEF123456", return_url="https://x.example")


class TestEvents:
    async def test_activated_carries_the_subscription(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal)
        event = await _deliver(
            provider, fake_paypal, fake_paypal.last_event("BILLING.SUBSCRIPTION.ACTIVATED")
        )
        assert event.verified is True
        assert (event.payment_id, event.status, event.reference) == (None, None, None)
        assert event.subscription is not None
        assert (
            event.subscription.provider_subscription_id,
            event.subscription.subscription_id,
        ) == (
            subscription_id,
            OURS,
        )

    async def test_sale_completed_is_a_paid_invoice_with_the_subscription_now(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal)
        fake_paypal.renew(subscription_id)
        sent = fake_paypal.last_event("PAYMENT.SALE.COMPLETED")

        event = await _deliver(provider, fake_paypal, sent)

        assert event.invoice is not None
        assert (event.invoice.provider_invoice_id, event.invoice.amount, event.invoice.paid) == (
            sent["resource"]["id"],
            1900,
            True,
        )
        assert event.subscription is not None
        assert event.subscription.status is SubscriptionStatus.ACTIVE
        assert event.subscription.subscription_id == OURS
        # The same payment, read through the subscription, has the same id.
        state = await provider.get_subscription(subscription_id)
        assert state.latest_invoice is not None
        assert state.latest_invoice.provider_invoice_id == event.invoice.provider_invoice_id

    async def test_payment_failed_suspended_cancelled(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal)
        fake_paypal.renew(subscription_id, succeed=False)
        failed = await _deliver(
            provider, fake_paypal, fake_paypal.last_event("BILLING.SUBSCRIPTION.PAYMENT.FAILED")
        )
        assert failed.subscription is not None
        assert failed.subscription.status is SubscriptionStatus.PAST_DUE
        assert failed.invoice is not None
        assert (failed.invoice.amount, failed.invoice.paid) == (1900, False)

        await provider.cancel_subscription(subscription_id, at_period_end=True, idempotency_key="c")
        suspended = await _deliver(
            provider, fake_paypal, fake_paypal.last_event("BILLING.SUBSCRIPTION.SUSPENDED")
        )
        assert suspended.subscription is not None
        assert suspended.subscription.cancel_at_period_end is True

        await provider.cancel_subscription(
            subscription_id, at_period_end=False, idempotency_key="n"
        )
        cancelled = await _deliver(
            provider, fake_paypal, fake_paypal.last_event("BILLING.SUBSCRIPTION.CANCELLED")
        )
        assert cancelled.subscription is not None
        assert cancelled.subscription.status is SubscriptionStatus.CANCELED

    async def test_a_forged_delivery_is_not_verified(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        await _active(provider, fake_paypal)
        sent = fake_paypal.last_event("BILLING.SUBSCRIPTION.ACTIVATED")
        body, headers = fake_paypal.signed_delivery(sent, WEBHOOK_ID, signer=WebhookSigner())
        event = await provider.parse_webhook(body, headers)
        assert event.verified is False  # the service re-reads the subscription instead


class TestSaleLookups:
    async def test_a_forged_sale_naming_no_subscription_says_nothing(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        subscription_id = await _active(provider, fake_paypal)
        sent = fake_paypal.last_event("PAYMENT.SALE.COMPLETED")
        sent["resource"]["billing_agreement_id"] = "I-NOSUCHTHING1"
        body, headers = fake_paypal.signed_delivery(sent, WEBHOOK_ID, signer=WebhookSigner())
        event = await provider.parse_webhook(body, headers)
        assert (event.verified, event.subscription, event.invoice) == (False, None, None)
        assert fake_paypal.subscriptions[subscription_id]["status"] == "ACTIVE"

    async def test_a_verified_sale_waits_for_paypal_to_answer(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        await _active(provider, fake_paypal)
        sent = fake_paypal.last_event("PAYMENT.SALE.COMPLETED")
        fake_paypal.fail_next("unavailable", times=5, path_prefix="/v1/billing/subscriptions")
        with pytest.raises(ProviderUnavailable):  # answered 503: PayPal delivers it again
            await _deliver(provider, fake_paypal, sent)


class TestStatusMap:
    @pytest.mark.parametrize(
        ("paypal", "ours"),
        [
            ("APPROVAL_PENDING", SubscriptionStatus.INCOMPLETE),
            ("APPROVED", SubscriptionStatus.INCOMPLETE),
            ("ACTIVE", SubscriptionStatus.ACTIVE),
            ("SUSPENDED", SubscriptionStatus.PAUSED),
            ("CANCELLED", SubscriptionStatus.CANCELED),
            ("EXPIRED", SubscriptionStatus.CANCELED),
        ],
    )
    def test_known(self, paypal: str, ours: SubscriptionStatus) -> None:
        assert billing.subscription_status({"status": paypal}, now=datetime.now(UTC)) is ours

    def test_unknown_is_never_active(self) -> None:
        now = datetime.now(UTC)
        assert billing.subscription_status({"status": "FROZEN"}, now=now) is (
            SubscriptionStatus.INCOMPLETE
        )
        paid = {
            "status": "FROZEN",
            "billing_info": {"last_payment": {"time": "2026-01-01T00:00:00Z"}},
        }
        assert billing.subscription_status(paid, now=now) is SubscriptionStatus.PAST_DUE


class TestTheFakesReferenceCheck:
    """The fake's own check of Subscriptions requests (PayPal publishes no description of
    them): it must refuse what PayPal's reference does not list."""

    def test_unknown_and_missing_fields_and_bad_enums_are_caught(
        self, fake_paypal: FakePayPal
    ) -> None:
        _, _, problems = fake_paypal.check_billing_request(
            "POST",
            "/v1/billing/plans",
            "",
            {"product_id": "P1", "name": "x", "billing_cycles": [{"tenure_type": "SOMETIMES"}]},
        )
        assert any("payment_preferences: required" in p for p in problems)
        assert any("tenure_type" in p for p in problems)
        _, _, problems = fake_paypal.check_billing_request(
            "POST", "/v1/billing/subscriptions", "", {"plan_id": "P-1", "customid": "x"}
        )
        assert problems == ["body/customid: field not in PayPal's reference"]
        template, _, problems = fake_paypal.check_billing_request(
            "GET", "/v1/billing/subscriptions/I-1/transactions", "start_time=a&when=b", None
        )
        assert template == "/v1/billing/subscriptions/{id}/transactions"
        assert problems == ["unknown query parameter 'when'"]
        assert fake_paypal.check_billing_request("DELETE", "/v1/billing/plans/P-1", "", None)[
            2
        ] == ["unknown path"]
