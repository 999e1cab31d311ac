"""Capture, refunds and cancel, against the fake over loopback."""

from __future__ import annotations

import pytest

from models.payment import PaymentStatus, Plan, RefundStatus
from services.errors import (
    InvalidStateTransition,
    NotFound,
    OperationNotSupported,
    PaymentDeclined,
    PaymentNotFound,
    RefundExceedsBalance,
)
from services.payment_providers.paypal import PayPalProvider
from tests.fakes.paypal_server import FakePayPal
from tests.providers.paypal.conftest import intent_request, order_id, refund_id


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
        assert state.capture_id is not None

        first = await provider.refund(
            payment_id,
            refund_id=refund_id(1),
            amount=500,
            currency="EUR",
            capture_id=state.capture_id,
        )
        assert (first.amount, first.status, first.currency, first.refund_id) == (
            500,
            RefundStatus.SUCCEEDED,
            "EUR",
            refund_id(1),
        )
        assert first.provider_refund_id in fake_paypal.refunds
        partial = await provider.verify_payment(payment_id)
        assert partial.status is PaymentStatus.PARTIALLY_REFUNDED  # PayPal's word on the capture
        assert partial.refunds == (first,)
        capture = fake_paypal.captures[state.capture_id]
        assert capture["status"] == "PARTIALLY_REFUNDED"

        rest = await provider.refund(
            payment_id,
            refund_id=refund_id(2),
            amount=1400,
            currency="EUR",
            capture_id=state.capture_id,
        )
        assert (rest.amount, rest.status, rest.refund_id) == (
            1400,
            RefundStatus.SUCCEEDED,
            refund_id(2),
        )
        assert rest.provider_refund_id != first.provider_refund_id
        full = await provider.verify_payment(payment_id)
        assert full.status is PaymentStatus.REFUNDED
        assert full.refunds == (first, rest)
        # The capture at PayPal shows the total: all of it went back.
        assert capture["status"] == "REFUNDED"
        [last] = [r for r in fake_paypal.refunds.values() if r["id"] == rest.provider_refund_id]
        breakdown = last["seller_payable_breakdown"]
        assert breakdown["total_refunded_amount"] == {"currency_code": "EUR", "value": "19.00"}
        assert [c.body for c in fake_paypal.calls("POST") if c.path.endswith("/refund")] == [
            {"amount": {"currency_code": "EUR", "value": "5.00"}, "custom_id": refund_id(1)},
            {"amount": {"currency_code": "EUR", "value": "14.00"}, "custom_id": refund_id(2)},
        ]

    async def test_without_a_capture_id_the_order_names_it(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        result = await provider.refund(
            payment_id, refund_id=refund_id(1), amount=1900, currency="EUR", capture_id=None
        )
        assert (result.amount, result.status) == (1900, RefundStatus.SUCCEEDED)
        state = await provider.verify_payment(payment_id)
        assert state.status is PaymentStatus.REFUNDED
        assert state.capture_id is not None
        [call] = [c for c in fake_paypal.calls("POST") if c.path.endswith("/refund")]
        assert call.path == f"/v2/payments/captures/{state.capture_id}/refund"

    async def test_the_refund_carries_our_refund_id(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        result = await provider.refund(
            payment_id,
            refund_id=refund_id(7),
            amount=300,
            currency="EUR",
            capture_id=None,
            reason="Damaged in transit",
        )
        assert result.refund_id == refund_id(7)
        stored = fake_paypal.refunds[result.provider_refund_id]
        # Our id is the refund's custom_id (not the order reference the capture carries)...
        assert stored["custom_id"] == refund_id(7)
        assert stored["note_to_payer"] == "Damaged in transit"
        # ...and the PayPal-Request-Id, so that asking again never refunds twice.
        [call] = [c for c in fake_paypal.calls("POST") if c.path.endswith("/refund")]
        assert call.request_id == refund_id(7)

    async def test_get_refund_reads_it_back(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
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
        assert fake_paypal.calls("GET", f"/v2/payments/refunds/{made.provider_refund_id}")

    async def test_get_refund_of_an_unknown_refund(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        with pytest.raises(NotFound):
            await provider.get_refund(payment_id, "1JU08902781691411")
        count = len(fake_paypal.requests)
        with pytest.raises(NotFound):  # not shaped like a PayPal id: PayPal is not asked
            await provider.get_refund(payment_id, "../captures/x")
        assert len(fake_paypal.requests) == count

    async def test_more_than_is_left(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        first = await provider.refund(
            payment_id, refund_id=refund_id(1), amount=1500, currency="EUR", capture_id=None
        )
        with pytest.raises(RefundExceedsBalance):
            await provider.refund(
                payment_id, refund_id=refund_id(2), amount=500, currency="EUR", capture_id=None
            )
        state = await provider.verify_payment(payment_id)
        assert state.refunds == (first,)
        assert len(fake_paypal.refunds) == 1

    async def test_after_a_full_refund(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        state = await provider.verify_payment(payment_id)
        await provider.refund(
            payment_id,
            refund_id=refund_id(1),
            amount=1900,
            currency="EUR",
            capture_id=state.capture_id,
        )
        with pytest.raises(RefundExceedsBalance):
            await provider.refund(
                payment_id,
                refund_id=refund_id(2),
                amount=1,
                currency="EUR",
                capture_id=state.capture_id,
            )
        assert len(fake_paypal.refunds) == 1

    async def test_a_retry_with_the_same_refund_id_refunds_once(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await captured(provider, fake_paypal)
        first = await provider.refund(
            payment_id, refund_id=refund_id(1), amount=700, currency="EUR", capture_id=None
        )
        again = await provider.refund(
            payment_id, refund_id=refund_id(1), amount=700, currency="EUR", capture_id=None
        )
        assert again == first
        assert again.provider_refund_id == first.provider_refund_id
        assert list(fake_paypal.refunds) == [first.provider_refund_id]
        assert (await provider.verify_payment(payment_id)).refunds == (first,)

    async def test_yen(self, provider: PayPalProvider, fake_paypal: FakePayPal) -> None:
        plan = Plan(code="jp", name="Basic JP", amount=1900, currency="JPY")
        payment_id = await captured(provider, fake_paypal, plan)
        result = await provider.refund(
            payment_id, refund_id=refund_id(1), amount=900, currency="JPY", capture_id=None
        )
        assert (result.amount, result.currency) == (900, "JPY")
        [call] = [c for c in fake_paypal.calls("POST") if c.path.endswith("/refund")]
        assert call.body == {
            "amount": {"currency_code": "JPY", "value": "900"},
            "custom_id": refund_id(1),
        }

    async def test_nothing_to_refund_before_capture(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await approved(provider, fake_paypal)
        with pytest.raises(InvalidStateTransition):
            await provider.refund(
                payment_id, refund_id=refund_id(1), amount=100, currency="EUR", capture_id=None
            )
        assert fake_paypal.refunds == {}

    async def test_unknown_capture(self, provider: PayPalProvider, fake_paypal: FakePayPal) -> None:
        with pytest.raises(PaymentNotFound):
            await provider.refund(
                "pp_5O190127TN364715T",
                refund_id=refund_id(1),
                amount=100,
                currency="EUR",
                capture_id="3C679366HH908993F",
            )


class TestCancel:
    async def test_not_offered_by_orders_v2(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        result = await provider.create_payment_intent(intent_request())
        with pytest.raises(OperationNotSupported, match="cannot be canceled"):
            await provider.cancel(result.payment_id, idempotency_key="cancel-1")
        assert fake_paypal.orders[order_id(result.payment_id)]["status"] == "PAYER_ACTION_REQUIRED"
