"""Creating payments in both modes and verifying them through the customer's journey."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from app.settings import Settings
from models.payment import PaymentStatus
from services.errors import OperationNotSupported, PaymentNotFound, ProviderNotConfigured
from services.payment_providers.base import Capability, ProviderDeps, environment_only_fields
from services.payment_providers.stripe import StripeProvider
from services.provider_configs import StoredProvider
from tests.fakes.stripe_server import FakeStripe
from tests.providers.stripe.conftest import (
    PRO,
    PUBLISHABLE_KEY,
    SECRET_KEY,
    MakeProvider,
    build_provider,
    intent_request,
    stripe_settings,
)


class TestHostedCheckout:
    async def test_creates_a_checkout_session_for_the_plan(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        request = intent_request(
            plan=PRO,
            user_id="alice",
            customer_email="alice@example.com",
            return_url="https://shop.example.com/done?x=1",
            cancel_url="https://shop.example.com/cancelled",
        )
        result = await provider.create_payment_intent(request)

        assert result.payment_id.startswith("cs_")
        assert result.status is PaymentStatus.PENDING
        assert result.redirect_url == fake_stripe.sessions[result.payment_id]["url"]
        assert result.client_secret is None
        (call,) = fake_stripe.calls("POST", "/v1/checkout/sessions")
        metadata = {"reference": request.reference, "plan": "pro", "user_id": "alice"}
        assert call.body["mode"] == "payment"
        assert call.body["line_items"] == [
            {
                "quantity": 1,
                "price_data": {
                    "currency": "eur",
                    "unit_amount": 2900,
                    "product_data": {"name": "Pro"},
                },
            }
        ]
        assert call.body["metadata"] == metadata
        assert call.body["payment_intent_data"] == {"metadata": metadata}
        assert call.body["customer_email"] == "alice@example.com"
        assert call.body["client_reference_id"] == request.reference
        assert call.body["success_url"] == (
            "https://shop.example.com/done?x=1&payment_id={CHECKOUT_SESSION_ID}&status=succeeded"
        )
        assert call.body["cancel_url"] == "https://shop.example.com/cancelled"
        assert call.idempotency_key == request.idempotency_key

    async def test_urls_fall_back_to_the_service(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        await provider.create_payment_intent(intent_request())
        (call,) = fake_stripe.calls("POST", "/v1/checkout/sessions")
        assert call.body["success_url"].startswith("https://payments.example.com/?payment_id=")
        assert call.body["cancel_url"] == "https://payments.example.com/"
        assert "customer_email" not in call.body
        assert "user_id" not in call.body["metadata"]

    async def test_customer_pays_then_verify_says_succeeded(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        result = await provider.create_payment_intent(intent_request())
        assert (await provider.verify_payment(result.payment_id)).status is PaymentStatus.PENDING

        fake_stripe.pay(result.payment_id, "pm_card_visa")
        state = await provider.verify_payment(result.payment_id)

        assert state.payment_id == result.payment_id
        assert state.status is PaymentStatus.SUCCEEDED
        assert (state.amount, state.currency) == (1900, "EUR")
        assert state.payment_method == "card"
        assert state.refunds is None  # Stripe's verify does not list refunds
        assert state.capture_id is not None and state.capture_id.startswith("ch_")

    async def test_three_d_secure_keeps_it_pending_until_done(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        result = await provider.create_payment_intent(intent_request())
        fake_stripe.pay(result.payment_id, "pm_card_threeDSecure2Required")
        state = await provider.verify_payment(result.payment_id)
        assert state.status is PaymentStatus.PENDING
        assert state.vendor_status is not None and "requires_action" in state.vendor_status

        fake_stripe.complete_action(result.payment_id)
        assert (await provider.verify_payment(result.payment_id)).status is PaymentStatus.SUCCEEDED

    async def test_a_declined_card_leaves_it_pending_for_another_try(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        result = await provider.create_payment_intent(intent_request())
        fake_stripe.pay(result.payment_id, "pm_card_chargeDeclinedInsufficientFunds")
        assert (await provider.verify_payment(result.payment_id)).status is PaymentStatus.PENDING

        fake_stripe.pay(result.payment_id, "pm_card_visa")
        assert (await provider.verify_payment(result.payment_id)).status is PaymentStatus.SUCCEEDED

    async def test_an_expired_session_is_expired(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        result = await provider.create_payment_intent(intent_request())
        fake_stripe.expire_session(result.payment_id)
        assert (await provider.verify_payment(result.payment_id)).status is PaymentStatus.EXPIRED

    async def test_expired_after_a_declined_try_is_still_expired(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        result = await provider.create_payment_intent(intent_request())
        fake_stripe.pay(result.payment_id, "pm_card_chargeDeclined")
        fake_stripe.expire_session(result.payment_id)  # Stripe cancels the intent too
        assert (await provider.verify_payment(result.payment_id)).status is PaymentStatus.EXPIRED


class TestEmbedded:
    async def test_creates_a_payment_intent_with_a_client_secret(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        request = intent_request(options={"ui_mode": "embedded"}, user_id="bob")
        result = await provider.create_payment_intent(request)

        assert result.payment_id.startswith("pi_")
        assert result.status is PaymentStatus.PENDING
        assert (
            result.client_secret == fake_stripe.payment_intents[result.payment_id]["client_secret"]
        )
        assert result.publishable_key == PUBLISHABLE_KEY
        assert result.redirect_url is None
        (call,) = fake_stripe.calls("POST", "/v1/payment_intents")
        assert call.body["amount"] == 1900
        assert call.body["currency"] == "eur"
        assert call.body["automatic_payment_methods"] == {"enabled": True}
        assert call.body["metadata"] == {
            "reference": request.reference,
            "plan": "basic",
            "user_id": "bob",
        }
        assert "capture_method" not in call.body
        assert call.idempotency_key == request.idempotency_key

    async def test_customer_pays_then_verify_says_succeeded(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        result = await provider.create_payment_intent(
            intent_request(options={"ui_mode": "embedded"})
        )
        fake_stripe.pay(result.payment_id)
        state = await provider.verify_payment(result.payment_id)
        assert (state.status, state.amount, state.currency, state.payment_method) == (
            PaymentStatus.SUCCEEDED,
            1900,
            "EUR",
            "card",
        )

    async def test_requires_action_is_pending(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        result = await provider.create_payment_intent(
            intent_request(options={"ui_mode": "embedded"})
        )
        fake_stripe.pay(result.payment_id, "pm_card_authenticationRequired")
        state = await provider.verify_payment(result.payment_id)
        assert (state.status, state.vendor_status) == (PaymentStatus.PENDING, "requires_action")

    async def test_manual_capture_is_asked_for(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        await provider.create_payment_intent(
            intent_request(options={"ui_mode": "embedded", "capture_method": "manual"})
        )
        (call,) = fake_stripe.calls("POST", "/v1/payment_intents")
        assert call.body["capture_method"] == "manual"

    async def test_unknown_modes_are_refused_before_calling_stripe(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        with pytest.raises(OperationNotSupported):
            await provider.create_payment_intent(intent_request(options={"ui_mode": "popup"}))
        with pytest.raises(OperationNotSupported):
            await provider.create_payment_intent(
                intent_request(options={"capture_method": "later"})
            )
        assert fake_stripe.requests == []


class TestIdempotency:
    async def test_the_same_key_twice_makes_one_session(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        request = intent_request(idempotency_key="create-once")
        first = await provider.create_payment_intent(request)
        second = await provider.create_payment_intent(request)
        assert first == second
        assert len(fake_stripe.sessions) == 1
        assert [call.replayed for call in fake_stripe.calls("POST", "/v1/checkout/sessions")] == [
            False,
            True,
        ]

    async def test_the_same_key_twice_makes_one_payment_intent(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        request = intent_request(idempotency_key="embed-once", options={"ui_mode": "embedded"})
        first = await provider.create_payment_intent(request)
        second = await provider.create_payment_intent(request)
        assert first.payment_id == second.payment_id
        assert len(fake_stripe.payment_intents) == 1


class TestVerifyUnknown:
    @pytest.mark.parametrize("payment_id", ["pi_3DoesNotExist000000000000", "cs_test_missing"])
    async def test_unknown_ids_are_not_found(
        self, provider: StripeProvider, fake_stripe: FakeStripe, payment_id: str
    ) -> None:
        with pytest.raises(PaymentNotFound):
            await provider.verify_payment(payment_id)
        assert len(fake_stripe.requests) == 1  # a 404 is an answer, not worth a retry

    async def test_an_id_of_another_provider_is_not_sent_to_stripe(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        with pytest.raises(PaymentNotFound):
            await provider.verify_payment("sb_0123456789")
        assert fake_stripe.requests == []


class TestNotConfigured:
    async def test_every_call_is_refused_without_a_secret_key(
        self, make_provider: MakeProvider, fake_stripe: FakeStripe
    ) -> None:
        provider = make_provider(stripe_secret_key=None)
        assert not provider.is_configured()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: provider.create_payment_intent(intent_request()),
            lambda: provider.verify_payment("pi_3abc"),
            lambda: provider.capture("pi_3abc", idempotency_key="k1"),
            lambda: provider.cancel("pi_3abc", idempotency_key="k2"),
            lambda: provider.refund(
                "pi_3abc", refund_id="rf_" + "0" * 24, amount=100, currency="EUR", capture_id=None
            ),
            lambda: provider.get_refund("pi_3abc", "re_3abc"),
            lambda: provider.parse_webhook(b"{}", {}),
        ]
        for call in calls:
            with pytest.raises(ProviderNotConfigured):
                await call()
        health = await provider.health_check()
        assert not health.healthy
        assert fake_stripe.requests == []

    async def test_an_empty_secret_key_is_not_configured(self, make_provider: MakeProvider) -> None:
        assert not make_provider(stripe_secret_key="").is_configured()


class TestMetadata:
    def test_declares_what_it_can_do(self) -> None:
        assert StripeProvider.name == "stripe"
        assert StripeProvider.id_prefixes == ("cs_", "pi_")
        assert StripeProvider.capabilities == frozenset(Capability)

    def test_config_models_match_the_environment_names(self) -> None:
        config_fields = set(StripeProvider.config_model.model_fields)
        secret_fields = set(StripeProvider.secrets_model.model_fields)
        assert config_fields == {"publishable_key", "api_base"}
        assert secret_fields == {"secret_key", "webhook_secret"}
        for field in config_fields | secret_fields:
            assert f"{StripeProvider.settings_prefix}{field}" in Settings.model_fields
        # A stored api_base would let an admin redirect our key: the environment's only.
        assert environment_only_fields(StripeProvider.config_model) == {"api_base"}

    async def test_built_from_settings_that_a_stored_config_overrides(
        self, fake_stripe: FakeStripe, deps: ProviderDeps
    ) -> None:
        settings = stripe_settings(fake_stripe, stripe_secret_key=None)
        assert not build_provider(settings, deps).is_configured()
        stored = StoredProvider(
            active=True,
            # The stored api_base is never taken: calls still go to the environment's.
            config={"api_base": "http://127.0.0.1:1"},
            secrets={"secret_key": SECRET_KEY},
        )
        provider = build_provider(settings, deps, stored)
        try:
            assert provider.is_configured()
            assert (await provider.health_check()).healthy
        finally:
            await provider.aclose()
