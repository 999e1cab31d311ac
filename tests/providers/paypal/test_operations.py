"""Capture, refunds and cancel, against the fake over loopback."""

from __future__ import annotations

import pytest

from app.errors import (
    InvalidStateTransition,
    OperationNotSupported,
    PaymentDeclined,
    PaymentNotFound,
    RefundExceedsBalance,
)
from models.payment import PaymentStatus, Plan
from services.payment_providers.paypal import PayPalProvider
from tests.fakes.paypal_server import FakePayPal
from tests.providers.paypal.conftest import intent_request, order_id


async def approved(provider: PayPalProvider, fake: FakePayPal, plan: Plan | None = None) -> str:
    """A payment the buyer has approved: its payment ID."""
    request = intent_request(plan=plan) if plan else intent_request()
    result = await provider.create_payment_intent(request)
    fake.approve(order_id(result.payment_id))
    return result.payment_id


async def captured(provider: PayPalProvider, fake: FakePayPal, plan: Plan | None = None) -> str:
    payment_id = await approved(provider, fake, plan)
    await provider.capture(payment_id, idempotency_key=f"capture-{payment_id}")
    return payment_id


class TestCapture:
    async def test_capture_completes_the_order(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await approved(provider, fake_paypal)
        state = await provider.capture(payment_id, idempotency_key="capture-1")
        assert state.status is PaymentStatus.SUCCEEDED
        assert state.payment_id == payment_id
        assert (state.amount, state.currency) == (1900, "EUR")
        assert state.capture_id is not None
        assert fake_paypal.orders[order_id(payment_id)]["status"] == "COMPLETED"
        [call] = fake_paypal.calls("POST", f"/v2/checkout/orders/{order_id(payment_id)}/capture")
        assert call.request_id == "capture-1"

    async def test_capturing_twice_with_the_same_key_replays(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await approved(provider, fake_paypal)
        first = await provider.capture(payment_id, idempotency_key="capture-1")
        again = await provider.capture(payment_id, idempotency_key="capture-1")
        assert again == first
        assert len(fake_paypal.captures) == 1

    async def test_capturing_twice_with_another_key_answers_the_first_result(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await approved(provider, fake_paypal)
        first = await provider.capture(payment_id, idempotency_key="capture-1")
        again = await provider.capture(payment_id, idempotency_key="capture-2")
        assert again.status is PaymentStatus.SUCCEEDED
        assert again.capture_id == first.capture_id
        assert len(fake_paypal.captures) == 1
        # PayPal refused the second capture (ORDER_ALREADY_CAPTURED); we read the order.
        assert fake_paypal.calls("GET", f"/v2/checkout/orders/{order_id(payment_id)}")

    async def test_an_order_the_buyer_has_not_approved(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        result = await provider.create_payment_intent(intent_request())
        with pytest.raises(InvalidStateTransition) as raised:
            await provider.capture(result.payment_id, idempotency_key="capture-1")
        assert raised.value.status == 409
        assert "not approved" in raised.value.detail
        assert fake_paypal.captures == {}

    async def test_instrument_declined(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await approved(provider, fake_paypal)
        fake_paypal.decline_next_capture("instrument_declined")
        with pytest.raises(PaymentDeclined) as raised:
            await provider.capture(payment_id, idempotency_key="capture-1")
        assert raised.value.status == 402
        assert raised.value.decline_code == "instrument_declined"
        # The order stays approved: the buyer may pay with something else.
        state = await provider.verify_payment(payment_id)
        assert state.status is PaymentStatus.REQUIRES_CAPTURE

    async def test_capture_declined_by_paypal(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await approved(provider, fake_paypal)
        fake_paypal.decline_next_capture("capture_declined")
        with pytest.raises(PaymentDeclined) as raised:
            await provider.capture(payment_id, idempotency_key="capture-1")
        assert raised.value.decline_code == "capture_declined"
        state = await provider.verify_payment(payment_id)
        assert state.status is PaymentStatus.FAILED
        assert state.capture_id is None
        assert state.vendor_status == "order COMPLETED, capture DECLINED"
        # Capturing again, under any key, answers the same decline.
        for key in ("capture-1", "capture-2"):
            with pytest.raises(PaymentDeclined):
                await provider.capture(payment_id, idempotency_key=key)

    async def test_unknown_order(self, provider: PayPalProvider, fake_paypal: FakePayPal) -> None:
        with pytest.raises(PaymentNotFound):
            await provider.capture("pp_5O190127TN364715T", idempotency_key="capture-1")


class TestRefund:
    async def test_partial_then_the_rest(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        state = await provider.verify_payment(payment_id)

        first = await provider.refund(
            payment_id,
            amount=500,
            currency="EUR",
            capture_id=state.capture_id,
            idempotency_key="r1",
        )
        assert (first.amount, first.status, first.amount_refunded_total) == (500, "succeeded", 500)
        partial = await provider.verify_payment(payment_id)
        assert partial.status is PaymentStatus.PARTIALLY_REFUNDED
        assert partial.amount_refunded == 500

        rest = await provider.refund(
            payment_id,
            amount=1400,
            currency="EUR",
            capture_id=state.capture_id,
            idempotency_key="r2",
        )
        assert (rest.amount, rest.amount_refunded_total) == (1400, 1900)
        full = await provider.verify_payment(payment_id)
        assert full.status is PaymentStatus.REFUNDED
        assert full.amount_refunded == 1900
        assert [c.body for c in fake_paypal.calls("POST") if c.path.endswith("/refund")] == [
            {"amount": {"currency_code": "EUR", "value": "5.00"}},
            {"amount": {"currency_code": "EUR", "value": "14.00"}},
        ]

    async def test_without_a_capture_id_the_order_names_it(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        result = await provider.refund(
            payment_id, amount=1900, currency="EUR", capture_id=None, idempotency_key="r1"
        )
        assert result.amount_refunded_total == 1900
        assert (await provider.verify_payment(payment_id)).status is PaymentStatus.REFUNDED

    async def test_more_than_is_left(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        await provider.refund(
            payment_id, amount=1500, currency="EUR", capture_id=None, idempotency_key="r1"
        )
        with pytest.raises(RefundExceedsBalance):
            await provider.refund(
                payment_id, amount=500, currency="EUR", capture_id=None, idempotency_key="r2"
            )
        state = await provider.verify_payment(payment_id)
        assert state.amount_refunded == 1500

    async def test_after_a_full_refund(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        state = await provider.verify_payment(payment_id)
        await provider.refund(
            payment_id,
            amount=1900,
            currency="EUR",
            capture_id=state.capture_id,
            idempotency_key="r1",
        )
        with pytest.raises(RefundExceedsBalance):
            await provider.refund(
                payment_id,
                amount=1,
                currency="EUR",
                capture_id=state.capture_id,
                idempotency_key="r2",
            )

    async def test_a_retry_with_the_same_key_refunds_once(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        first = await provider.refund(
            payment_id, amount=700, currency="EUR", capture_id=None, idempotency_key="r1"
        )
        again = await provider.refund(
            payment_id, amount=700, currency="EUR", capture_id=None, idempotency_key="r1"
        )
        assert again == first
        assert (await provider.verify_payment(payment_id)).amount_refunded == 700

    async def test_yen(self, provider: PayPalProvider, fake_paypal: FakePayPal) -> None:
        plan = Plan(code="jp", name="Basic JP", amount=1900, currency="JPY")
        payment_id = await captured(provider, fake_paypal, plan)
        result = await provider.refund(
            payment_id, amount=900, currency="JPY", capture_id=None, idempotency_key="r1"
        )
        assert result.amount_refunded_total == 900
        [call] = [c for c in fake_paypal.calls("POST") if c.path.endswith("/refund")]
        assert call.body == {"amount": {"currency_code": "JPY", "value": "900"}}

    async def test_nothing_to_refund_before_capture(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await approved(provider, fake_paypal)
        with pytest.raises(InvalidStateTransition):
            await provider.refund(
                payment_id, amount=100, currency="EUR", capture_id=None, idempotency_key="r1"
            )

    async def test_unknown_capture(self, provider: PayPalProvider, fake_paypal: FakePayPal) -> None:
        with pytest.raises(PaymentNotFound):
            await provider.refund(
                "pp_5O190127TN364715T",
                amount=100,
                currency="EUR",
                capture_id="3C679366HH908993F",
                idempotency_key="r1",
            )


class TestCancel:
    async def test_not_offered_by_orders_v2(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        result = await provider.create_payment_intent(intent_request())
        with pytest.raises(OperationNotSupported, match="cannot be canceled"):
            await provider.cancel(result.payment_id, idempotency_key="cancel-1")
        assert fake_paypal.orders[order_id(result.payment_id)]["status"] == "PAYER_ACTION_REQUIRED"
