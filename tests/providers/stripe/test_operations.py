"""Capture, cancel and refund, for payments made both ways (cs_ and pi_ IDs)."""

from __future__ import annotations

import pytest

from app.errors import InvalidStateTransition, ProviderUpstreamError, RefundExceedsBalance
from models.payment import PaymentStatus
from services.payment_providers.stripe import StripeProvider
from tests.fakes.stripe_server import FakeStripe
from tests.providers.stripe.conftest import intent_request

MODES = ["hosted", "embedded"]


async def _paid(
    provider: StripeProvider, fake: FakeStripe, mode: str, *, capture_method: str = "automatic"
) -> str:
    result = await provider.create_payment_intent(
        intent_request(options={"ui_mode": mode, "capture_method": capture_method})
    )
    fake.pay(result.payment_id)
    return result.payment_id


@pytest.mark.parametrize("mode", MODES)
class TestCapture:
    async def test_authorized_then_captured(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode, capture_method="manual")
        state = await provider.verify_payment(payment_id)
        assert state.status is PaymentStatus.REQUIRES_CAPTURE
        assert state.capture_id is None

        captured = await provider.capture(payment_id, idempotency_key=f"capture-{payment_id}")

        assert captured.payment_id == payment_id
        assert captured.status is PaymentStatus.SUCCEEDED
        assert captured.amount == 1900
        assert captured.capture_id is not None
        assert (await provider.verify_payment(payment_id)).status is PaymentStatus.SUCCEEDED

    async def test_capturing_twice_answers_the_first_result(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode, capture_method="manual")
        first = await provider.capture(payment_id, idempotency_key="capture-1")
        same_key = await provider.capture(payment_id, idempotency_key="capture-1")
        other_key = await provider.capture(payment_id, idempotency_key="capture-2")
        assert first.status is same_key.status is other_key.status is PaymentStatus.SUCCEEDED
        assert len(fake_stripe.events_of("payment_intent.succeeded")) == 1

    async def test_nothing_to_capture_before_the_customer_pays(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        result = await provider.create_payment_intent(
            intent_request(options={"ui_mode": mode, "capture_method": "manual"})
        )
        with pytest.raises(InvalidStateTransition):
            await provider.capture(result.payment_id, idempotency_key="capture-early")


@pytest.mark.parametrize("mode", MODES)
class TestCancel:
    async def test_an_unpaid_payment_is_canceled(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        result = await provider.create_payment_intent(intent_request(options={"ui_mode": mode}))
        state = await provider.cancel(result.payment_id, idempotency_key="cancel-1")
        assert state.status is PaymentStatus.CANCELED
        # Stripe's own word afterwards: an expired session, or a canceled intent.
        after = await provider.verify_payment(result.payment_id)
        expected = PaymentStatus.EXPIRED if mode == "hosted" else PaymentStatus.CANCELED
        assert after.status is expected

    async def test_an_authorized_payment_is_released(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode, capture_method="manual")
        state = await provider.cancel(payment_id, idempotency_key="cancel-auth")
        assert state.status is PaymentStatus.CANCELED
        assert state.amount_refunded == 0  # a released authorization paid nothing back
        assert (await provider.verify_payment(payment_id)).status is PaymentStatus.CANCELED

    async def test_cancelling_twice_answers_the_same(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode, capture_method="manual")
        await provider.cancel(payment_id, idempotency_key="cancel-a")
        again = await provider.cancel(payment_id, idempotency_key="cancel-b")
        assert again.status is PaymentStatus.CANCELED

    async def test_a_captured_payment_cannot_be_canceled(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        with pytest.raises(InvalidStateTransition):
            await provider.cancel(payment_id, idempotency_key="cancel-paid")
        assert (await provider.verify_payment(payment_id)).status is PaymentStatus.SUCCEEDED


@pytest.mark.parametrize("mode", MODES)
class TestRefund:
    async def test_partial_then_full(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)

        partial = await provider.refund(
            payment_id, amount=500, currency="EUR", capture_id=None, idempotency_key="refund-1"
        )
        assert partial.refund_id.startswith("re_")
        assert (partial.amount, partial.status, partial.amount_refunded_total) == (
            500,
            "succeeded",
            500,
        )
        state = await provider.verify_payment(payment_id)
        assert (state.status, state.amount_refunded, state.amount) == (
            PaymentStatus.PARTIALLY_REFUNDED,
            500,
            1900,
        )

        rest = await provider.refund(
            payment_id, amount=1400, currency="EUR", capture_id=None, idempotency_key="refund-2"
        )
        assert rest.amount_refunded_total == 1900
        state = await provider.verify_payment(payment_id)
        assert (state.status, state.amount_refunded) == (PaymentStatus.REFUNDED, 1900)

    async def test_more_than_is_left_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        await provider.refund(
            payment_id, amount=1000, currency="EUR", capture_id=None, idempotency_key="r-1"
        )
        with pytest.raises(RefundExceedsBalance) as caught:
            await provider.refund(
                payment_id, amount=1000, currency="EUR", capture_id=None, idempotency_key="r-2"
            )
        assert caught.value.status == 422
        assert "unrefunded" not in caught.value.detail  # Stripe's words stay in the logs
        assert len(fake_stripe.refunds) == 1

    async def test_nothing_is_left_after_a_full_refund(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        await provider.refund(
            payment_id, amount=1900, currency="EUR", capture_id=None, idempotency_key="r-all"
        )
        with pytest.raises(RefundExceedsBalance):
            await provider.refund(
                payment_id, amount=1, currency="EUR", capture_id=None, idempotency_key="r-more"
            )

    async def test_a_retried_refund_refunds_once(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        first = await provider.refund(
            payment_id, amount=700, currency="EUR", capture_id=None, idempotency_key="r-same"
        )
        second = await provider.refund(
            payment_id, amount=700, currency="EUR", capture_id=None, idempotency_key="r-same"
        )
        assert first == second
        assert len(fake_stripe.refunds) == 1
        assert (await provider.verify_payment(payment_id)).amount_refunded == 700

    async def test_an_unpaid_payment_has_nothing_to_refund(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        result = await provider.create_payment_intent(intent_request(options={"ui_mode": mode}))
        with pytest.raises(InvalidStateTransition):
            await provider.refund(
                result.payment_id,
                amount=100,
                currency="EUR",
                capture_id=None,
                idempotency_key="r-unpaid",
            )
        assert fake_stripe.refunds == {}
        assert fake_stripe.calls("POST", "/v1/refunds") == []

    async def test_a_refund_in_another_currency_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        with pytest.raises(ProviderUpstreamError):
            await provider.refund(
                payment_id, amount=100, currency="USD", capture_id=None, idempotency_key="r-usd"
            )
        assert fake_stripe.calls("POST", "/v1/refunds") == []
