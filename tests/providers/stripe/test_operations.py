"""Capture, cancel and refund, for payments made both ways (cs_ and pi_ IDs)."""

from __future__ import annotations

from typing import Any

import pytest

from models.payment import PaymentStatus, RefundStatus
from services.errors import (
    CaptureExceedsAmount,
    InvalidStateTransition,
    NotFound,
    ProviderUpstreamError,
    RefundExceedsBalance,
)
from services.payment_providers.stripe import StripeProvider
from tests.fakes.stripe_server import FakeStripe
from tests.providers.stripe.conftest import intent_request, refund_id

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


def _intent(fake: FakeStripe, payment_id: str) -> dict[str, Any]:
    """The fake's PaymentIntent behind ``payment_id`` (a session or an intent)."""
    if payment_id.startswith("cs_"):
        return fake.payment_intents[fake.sessions[payment_id]["payment_intent"]]
    return fake.payment_intents[payment_id]


@pytest.mark.parametrize("mode", MODES)
class TestPartialCapture:
    async def test_part_is_taken_and_the_rest_released(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode, capture_method="manual")

        captured = await provider.capture(payment_id, idempotency_key="capture-1", amount=1200)

        assert (captured.status, captured.amount, captured.amount_captured) == (
            PaymentStatus.SUCCEEDED,
            1900,
            1200,
        )
        assert captured.capture_id is not None
        intent = _intent(fake_stripe, payment_id)
        [call] = fake_stripe.calls("POST", f"/v1/payment_intents/{intent['id']}/capture")
        assert call.body["amount_to_capture"] == 1200
        assert (intent["amount_received"], intent["amount_capturable"]) == (1200, 0)
        # Stripe's word afterwards says the same, for a session as for an intent.
        verified = await provider.verify_payment(payment_id)
        assert (verified.status, verified.amount_captured) == (PaymentStatus.SUCCEEDED, 1200)

    async def test_all_of_it_reports_no_partial_capture(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode, capture_method="manual")
        captured = await provider.capture(payment_id, idempotency_key="capture-1")
        assert (captured.status, captured.amount_captured) == (PaymentStatus.SUCCEEDED, None)
        intent = _intent(fake_stripe, payment_id)
        [call] = fake_stripe.calls("POST", f"/v1/payment_intents/{intent['id']}/capture")
        assert "amount_to_capture" not in call.body

    async def test_asking_again_answers_the_capture_and_another_amount_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode, capture_method="manual")
        await provider.capture(payment_id, idempotency_key="capture-1", amount=1200)

        replay = await provider.capture(payment_id, idempotency_key="capture-1", amount=1200)
        other_key = await provider.capture(payment_id, idempotency_key="capture-2", amount=1200)
        all_of_it = await provider.capture(payment_id, idempotency_key="capture-1")
        with pytest.raises(InvalidStateTransition, match="for 1200 minor units"):
            await provider.capture(payment_id, idempotency_key="capture-1", amount=1500)
        with pytest.raises(InvalidStateTransition, match="for 1200 minor units"):
            await provider.capture(payment_id, idempotency_key="capture-3", amount=1900)

        for state in (replay, other_key, all_of_it):
            assert (state.status, state.amount_captured) == (PaymentStatus.SUCCEEDED, 1200)
        intent = _intent(fake_stripe, payment_id)
        calls = fake_stripe.calls("POST", f"/v1/payment_intents/{intent['id']}/capture")
        assert [c.replayed for c in calls[:2]] == [False, True]
        assert intent["amount_received"] == 1200
        assert len(fake_stripe.events_of("payment_intent.succeeded")) == 1

    async def test_more_than_stripe_holds_is_refused_and_the_hold_stays(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode, capture_method="manual")
        with pytest.raises(CaptureExceedsAmount):
            await provider.capture(payment_id, idempotency_key="capture-1", amount=1901)
        intent = _intent(fake_stripe, payment_id)
        [call] = fake_stripe.calls("POST", f"/v1/payment_intents/{intent['id']}/capture")
        assert call.status == 400
        assert (intent["status"], intent["amount_capturable"]) == ("requires_capture", 1900)
        assert (await provider.verify_payment(payment_id)).status is PaymentStatus.REQUIRES_CAPTURE


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
        # A released authorization paid nothing back: nothing was captured (the charge shows
        # as refunded at Stripe, but verify no longer reads refunds off the charge).
        assert state.capture_id is None
        assert state.refunds is None
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


def _charge(fake: FakeStripe, payment_id: str) -> dict[str, Any]:
    """The fake's charge behind ``payment_id`` (a session or an intent)."""
    if payment_id.startswith("cs_"):
        intent_id = fake.sessions[payment_id]["payment_intent"]
    else:
        intent_id = payment_id
    return fake.charges[fake.payment_intents[intent_id]["latest_charge"]]


@pytest.mark.parametrize("mode", MODES)
class TestRefund:
    async def test_partial_then_full(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)

        partial = await provider.refund(
            payment_id, refund_id=refund_id(1), amount=500, currency="EUR", capture_id=None
        )
        assert partial.provider_refund_id.startswith("re_")
        assert (partial.amount, partial.status, partial.currency, partial.refund_id) == (
            500,
            RefundStatus.SUCCEEDED,
            "EUR",
            refund_id(1),
        )
        charge = _charge(fake_stripe, payment_id)
        assert (charge["amount_refunded"], charge["refunded"]) == (500, False)
        state = await provider.verify_payment(payment_id)
        # verify no longer turns a refunded charge into (partially) refunded: the service
        # follows each refund on its own, and the payment stays paid.
        assert (state.status, state.amount, state.refunds) == (PaymentStatus.SUCCEEDED, 1900, None)

        rest = await provider.refund(
            payment_id, refund_id=refund_id(2), amount=1400, currency="EUR", capture_id=None
        )
        assert (rest.amount, rest.status, rest.refund_id) == (
            1400,
            RefundStatus.SUCCEEDED,
            refund_id(2),
        )
        assert rest.provider_refund_id != partial.provider_refund_id
        assert (charge["amount_refunded"], charge["refunded"]) == (1900, True)
        state = await provider.verify_payment(payment_id)
        assert state.status is PaymentStatus.SUCCEEDED  # as above: refunds are not its business

    async def test_the_refund_carries_our_ids(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        result = await provider.refund(
            payment_id,
            refund_id=refund_id(3),
            amount=300,
            currency="EUR",
            capture_id=None,
            reason="Damaged in transit",
        )
        [call] = fake_stripe.calls("POST", "/v1/refunds")
        # Our refund id is Stripe's idempotency key, so that asking again never refunds twice.
        assert call.idempotency_key == refund_id(3)
        assert call.body["metadata"] == {
            "refund_id": refund_id(3),
            "payment_id": payment_id,
            "reason": "Damaged in transit",
        }
        assert fake_stripe.refunds[result.provider_refund_id]["metadata"]["refund_id"] == (
            refund_id(3)
        )
        assert result.refund_id == refund_id(3)

    async def test_get_refund_reads_it_back(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        made = await provider.refund(
            payment_id, refund_id=refund_id(1), amount=800, currency="EUR", capture_id=None
        )
        found = await provider.get_refund(payment_id, made.provider_refund_id)
        assert found == made
        assert (found.amount, found.currency, found.status, found.refund_id) == (
            800,
            "EUR",
            RefundStatus.SUCCEEDED,
            refund_id(1),
        )
        assert fake_stripe.calls("GET", f"/v1/refunds/{made.provider_refund_id}")

    async def test_get_refund_of_an_unknown_refund(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        with pytest.raises(NotFound):
            await provider.get_refund(payment_id, "re_3DoesNotExist0000000000")

    async def test_more_than_is_left_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        await provider.refund(
            payment_id, refund_id=refund_id(1), amount=1000, currency="EUR", capture_id=None
        )
        with pytest.raises(RefundExceedsBalance) as caught:
            await provider.refund(
                payment_id, refund_id=refund_id(2), amount=1000, currency="EUR", capture_id=None
            )
        assert caught.value.status == 422
        assert "unrefunded" not in caught.value.detail  # Stripe's words stay in the logs
        assert len(fake_stripe.refunds) == 1

    async def test_nothing_is_left_after_a_full_refund(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        await provider.refund(
            payment_id, refund_id=refund_id(1), amount=1900, currency="EUR", capture_id=None
        )
        with pytest.raises(RefundExceedsBalance):
            await provider.refund(
                payment_id, refund_id=refund_id(2), amount=1, currency="EUR", capture_id=None
            )
        assert len(fake_stripe.refunds) == 1

    async def test_a_retried_refund_refunds_once(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        first = await provider.refund(
            payment_id, refund_id=refund_id(1), amount=700, currency="EUR", capture_id=None
        )
        second = await provider.refund(
            payment_id, refund_id=refund_id(1), amount=700, currency="EUR", capture_id=None
        )
        assert first == second
        assert second.provider_refund_id == first.provider_refund_id
        assert list(fake_stripe.refunds) == [first.provider_refund_id]
        assert _charge(fake_stripe, payment_id)["amount_refunded"] == 700

    async def test_an_unpaid_payment_has_nothing_to_refund(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        result = await provider.create_payment_intent(intent_request(options={"ui_mode": mode}))
        with pytest.raises(InvalidStateTransition):
            await provider.refund(
                result.payment_id,
                refund_id=refund_id(1),
                amount=100,
                currency="EUR",
                capture_id=None,
            )
        assert fake_stripe.refunds == {}
        assert fake_stripe.calls("POST", "/v1/refunds") == []

    async def test_a_refund_in_another_currency_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe, mode: str
    ) -> None:
        payment_id = await _paid(provider, fake_stripe, mode)
        with pytest.raises(ProviderUpstreamError):
            await provider.refund(
                payment_id, refund_id=refund_id(1), amount=100, currency="USD", capture_id=None
            )
        assert fake_stripe.calls("POST", "/v1/refunds") == []
