"""Creating PayPal orders and reading their truth back, against the fake over loopback."""

from __future__ import annotations

import httpx
import pytest

from models.payment import PaymentStatus, Plan
from services.errors import OperationNotSupported, PaymentNotFound, ProviderNotConfigured
from services.payment_providers.base import Capability, ProviderDeps
from services.payment_providers.factory import discover_provider_classes
from services.payment_providers.paypal import PayPalProvider
from tests.fakes.paypal_server import FakePayPal
from tests.providers.paypal.conftest import (
    MakeProvider,
    build_provider,
    intent_request,
    order_id,
    paypal_settings,
)


class TestMetadata:
    def test_registered_under_its_name_and_prefix(self) -> None:
        assert discover_provider_classes()["paypal"] is PayPalProvider
        assert PayPalProvider.id_prefixes == ("pp_",)
        assert Capability.CANCEL not in PayPalProvider.capabilities
        assert {Capability.CAPTURE, Capability.PARTIAL_REFUND, Capability.WEBHOOKS} <= (
            PayPalProvider.capabilities
        )

    @pytest.mark.parametrize(
        ("mode", "base"),
        [("sandbox", "https://api-m.sandbox.paypal.com"), ("live", "https://api-m.paypal.com")],
    )
    def test_api_base_follows_the_mode(
        self, fake_paypal: FakePayPal, deps: ProviderDeps, mode: str, base: str
    ) -> None:
        settings = paypal_settings(fake_paypal, paypal_api_base=None, paypal_mode=mode)
        assert build_provider(settings, deps).api_base == base

    def test_api_base_setting_wins(self, provider: PayPalProvider, fake_paypal: FakePayPal) -> None:
        assert provider.api_base == fake_paypal.url


class TestNotConfigured:
    @pytest.mark.parametrize(
        "missing", [{"paypal_client_id": None}, {"paypal_client_secret": None}]
    )
    async def test_every_call_is_refused(
        self, make_provider: MakeProvider, fake_paypal: FakePayPal, missing: dict[str, None]
    ) -> None:
        provider = make_provider(**missing)
        assert not provider.is_configured()
        calls = [
            provider.create_payment_intent(intent_request()),
            provider.verify_payment("pp_5O190127TN364715T"),
            provider.capture("pp_5O190127TN364715T", idempotency_key="k"),
            provider.refund(
                "pp_5O190127TN364715T",
                refund_id="rf_" + "0" * 24,
                amount=100,
                currency="EUR",
                capture_id=None,
            ),
            provider.get_refund("pp_5O190127TN364715T", "1JU08902781691411"),
            provider.parse_webhook(b"{}", {}),
        ]
        for call in calls:
            with pytest.raises(ProviderNotConfigured):
                await call
        health = await provider.health_check()
        assert not health.healthy
        assert fake_paypal.requests == []


class TestCreate:
    async def test_order_for_the_plan_with_a_page_to_approve_it(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        request = intent_request(
            return_url="https://shop.example/paid", cancel_url="https://shop.example/cart"
        )
        result = await provider.create_payment_intent(request)

        assert result.status is PaymentStatus.PENDING
        order = fake_paypal.orders[order_id(result.payment_id)]
        assert order["status"] == "PAYER_ACTION_REQUIRED"
        assert result.redirect_url == f"{fake_paypal.url}/checkoutnow?token={order['id']}"
        [call] = fake_paypal.calls("POST", "/v2/checkout/orders")
        assert call.request_id == request.idempotency_key
        assert call.body is not None
        assert call.body["intent"] == "CAPTURE"
        [unit] = call.body["purchase_units"]
        assert unit["amount"] == {"currency_code": "EUR", "value": "19.00"}
        assert unit["custom_id"] == unit["reference_id"] == request.reference
        assert unit["description"] == "Basic"
        context = call.body["payment_source"]["paypal"]["experience_context"]
        assert context["return_url"] == "https://shop.example/paid"
        assert context["cancel_url"] == "https://shop.example/cart"
        assert context["user_action"] == "PAY_NOW"

    async def test_return_urls_fall_back_to_the_service(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        await provider.create_payment_intent(intent_request())
        [call] = fake_paypal.calls("POST", "/v2/checkout/orders")
        assert call.body is not None
        context = call.body["payment_source"]["paypal"]["experience_context"]
        assert context["return_url"].startswith("https://payments.example.com/?provider=paypal")
        assert context["cancel_url"].startswith("https://payments.example.com/?provider=paypal")
        assert context["return_url"] != context["cancel_url"]

    async def test_customer_email_prefills_paypal(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        await provider.create_payment_intent(intent_request(customer_email="ann@example.com"))
        [call] = fake_paypal.calls("POST", "/v2/checkout/orders")
        assert call.body is not None
        assert call.body["payment_source"]["paypal"]["email_address"] == "ann@example.com"

    async def test_yen_without_decimals(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        plan = Plan(code="jp", name="Basic JP", amount=1900, currency="JPY")
        result = await provider.create_payment_intent(intent_request(plan=plan))
        order = fake_paypal.orders[order_id(result.payment_id)]
        assert order["purchase_units"][0]["amount"] == {"currency_code": "JPY", "value": "1900"}
        state = await provider.verify_payment(result.payment_id)
        assert (state.amount, state.currency) == (1900, "JPY")

    async def test_forint_cents_are_refused_before_calling_paypal(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        plan = Plan(code="hu", name="Basic HU", amount=150050, currency="HUF")
        with pytest.raises(OperationNotSupported):
            await provider.create_payment_intent(intent_request(plan=plan))
        assert fake_paypal.requests == []

    async def test_a_retry_with_the_same_key_makes_one_order(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        request = intent_request()
        first = await provider.create_payment_intent(request)
        again = await provider.create_payment_intent(request)
        assert again.payment_id == first.payment_id
        assert len(fake_paypal.orders) == 1
        assert [c.replayed for c in fake_paypal.calls("POST", "/v2/checkout/orders")] == [
            False,
            True,
        ]

    async def test_another_key_makes_another_order(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        first = await provider.create_payment_intent(intent_request())
        second = await provider.create_payment_intent(intent_request())
        assert first.payment_id != second.payment_id
        assert len(fake_paypal.orders) == 2

    async def test_an_overlong_key_is_sent_as_a_stable_digest(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        request = intent_request(idempotency_key="k" * 300)
        first = await provider.create_payment_intent(request)
        again = await provider.create_payment_intent(request)
        assert again.payment_id == first.payment_id
        ids = {c.request_id for c in fake_paypal.calls("POST", "/v2/checkout/orders")}
        [sent] = ids
        assert sent is not None and len(sent) <= 108


class TestVerify:
    async def test_the_whole_way_to_succeeded(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        result = await provider.create_payment_intent(intent_request())
        state = await provider.verify_payment(result.payment_id)
        assert state.status is PaymentStatus.PENDING
        assert (state.amount, state.currency, state.capture_id) == (1900, "EUR", None)

        fake_paypal.approve(order_id(result.payment_id))
        state = await provider.verify_payment(result.payment_id)
        assert state.status is PaymentStatus.REQUIRES_CAPTURE
        assert state.payment_method == "paypal"

        captured = await provider.capture(result.payment_id, idempotency_key="capture-1")
        assert captured.status is PaymentStatus.SUCCEEDED
        state = await provider.verify_payment(result.payment_id)
        assert state.status is PaymentStatus.SUCCEEDED
        assert state.capture_id == captured.capture_id
        assert state.capture_id in fake_paypal.captures
        assert state.refunds == ()  # PayPal lists the order's refunds: none yet
        assert state.payment_id == result.payment_id

    async def test_approval_through_the_buyer_page(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        request = intent_request(return_url="https://shop.example/done?x=1")
        result = await provider.create_payment_intent(request)
        assert result.redirect_url is not None
        async with httpx.AsyncClient() as buyer:
            page = await buyer.get(result.redirect_url)
        assert page.status_code == 302
        oid = order_id(result.payment_id)
        assert page.headers["location"].startswith(f"https://shop.example/done?x=1&token={oid}")
        state = await provider.verify_payment(result.payment_id)
        assert state.status is PaymentStatus.REQUIRES_CAPTURE

    async def test_voided_order_is_canceled(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        result = await provider.create_payment_intent(intent_request())
        fake_paypal.void(order_id(result.payment_id))
        state = await provider.verify_payment(result.payment_id)
        assert state.status is PaymentStatus.CANCELED

    async def test_unknown_order(self, provider: PayPalProvider, fake_paypal: FakePayPal) -> None:
        with pytest.raises(PaymentNotFound):
            await provider.verify_payment("pp_5O190127TN364715T")
        assert len(fake_paypal.calls("GET")) == 1

    @pytest.mark.parametrize(
        "payment_id",
        ["pp_", "pp_abc", "pp_../v1/oauth2/token", "pp_A/B", "sb_ABC", "pp_" + "A" * 37],
    )
    async def test_ids_that_cannot_be_paypal_orders_never_reach_paypal(
        self, provider: PayPalProvider, fake_paypal: FakePayPal, payment_id: str
    ) -> None:
        with pytest.raises(PaymentNotFound):
            await provider.verify_payment(payment_id)
        assert fake_paypal.requests == []


class TestHealth:
    async def test_healthy_when_paypal_takes_our_credentials(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        health = await provider.health_check()
        assert health.healthy
        assert health.latency_ms is not None
        assert fake_paypal.token_calls == 1

    async def test_unhealthy_with_wrong_credentials(
        self, make_provider: MakeProvider, fake_paypal: FakePayPal
    ) -> None:
        health = await make_provider(paypal_client_secret="wrong-secret-0123").health_check()
        assert not health.healthy
        assert health.message == "Payment provider misconfigured"

    async def test_unhealthy_when_paypal_is_down(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        fake_paypal.fail_next("unavailable")
        health = await provider.health_check()
        assert not health.healthy
        assert fake_paypal.token_calls == 1  # a health check reports, it does not insist
