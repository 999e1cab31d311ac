"""Webhook deliveries: the signature decides whether an event is read at all; handled events
are normalized to the payment they are about. The events come from the fake's own state
changes, so they are shaped as the API version the SDK pins would send them."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from app.errors import InvalidWebhookPayload, InvalidWebhookSignature
from models.payment import PaymentStatus
from services.payment_providers.base import WebhookEvent
from services.payment_providers.stripe import StripeProvider
from tests.fakes.stripe_server import FakeStripe
from tests.providers.stripe.conftest import (
    WEBHOOK_SECRET,
    MakeProvider,
    intent_request,
    logged,
)


async def _deliver(provider: StripeProvider, event: dict[str, object]) -> WebhookEvent:
    body, headers = FakeStripe.signed_delivery(event, WEBHOOK_SECRET)
    return await provider.parse_webhook(body, headers)


async def _hosted(provider: StripeProvider, **options: str) -> tuple[str, str]:
    request = intent_request(options=options)
    result = await provider.create_payment_intent(request)
    return result.payment_id, request.reference


class TestHandledEvents:
    async def test_checkout_session_completed_and_paid(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, reference = await _hosted(provider)
        fake_stripe.pay(session_id)
        event = fake_stripe.last_event("checkout.session.completed")

        parsed = await _deliver(provider, event)

        assert parsed == WebhookEvent(
            event_id=event["id"],
            event_type="checkout.session.completed",
            verified=True,
            payment_id=session_id,
            status=PaymentStatus.SUCCEEDED,
            reference=reference,
            occurred_at=datetime.fromtimestamp(event["created"], UTC),
        )

    async def test_checkout_session_completed_but_unpaid_is_pending(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, _ = await _hosted(provider, capture_method="manual")
        fake_stripe.pay(session_id)
        parsed = await _deliver(provider, fake_stripe.last_event("checkout.session.completed"))
        assert (parsed.payment_id, parsed.status) == (session_id, PaymentStatus.PENDING)

    async def test_checkout_session_expired(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, reference = await _hosted(provider)
        fake_stripe.expire_session(session_id)
        parsed = await _deliver(provider, fake_stripe.last_event("checkout.session.expired"))
        assert (parsed.payment_id, parsed.status, parsed.reference) == (
            session_id,
            PaymentStatus.EXPIRED,
            reference,
        )

    async def test_payment_intent_succeeded_of_a_session_carries_our_reference(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, reference = await _hosted(provider)
        intent = fake_stripe.pay(session_id)
        parsed = await _deliver(provider, fake_stripe.last_event("payment_intent.succeeded"))
        assert (parsed.payment_id, parsed.status, parsed.reference) == (
            intent["id"],
            PaymentStatus.SUCCEEDED,
            reference,
        )

    async def test_payment_intent_succeeded_embedded(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        request = intent_request(options={"ui_mode": "embedded"})
        result = await provider.create_payment_intent(request)
        fake_stripe.pay(result.payment_id)
        parsed = await _deliver(provider, fake_stripe.last_event("payment_intent.succeeded"))
        assert (parsed.payment_id, parsed.status, parsed.reference) == (
            result.payment_id,
            PaymentStatus.SUCCEEDED,
            request.reference,
        )

    async def test_payment_failed_is_pending_because_the_customer_may_retry(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        result = await provider.create_payment_intent(
            intent_request(options={"ui_mode": "embedded"})
        )
        fake_stripe.pay(result.payment_id, "pm_card_chargeDeclined")
        event = fake_stripe.last_event("payment_intent.payment_failed")
        assert event["data"]["object"]["status"] == "requires_payment_method"
        parsed = await _deliver(provider, event)
        assert (parsed.payment_id, parsed.status) == (result.payment_id, PaymentStatus.PENDING)

    async def test_payment_intent_canceled(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        result = await provider.create_payment_intent(
            intent_request(options={"ui_mode": "embedded"})
        )
        await provider.cancel(result.payment_id, idempotency_key="cancel-1")
        parsed = await _deliver(provider, fake_stripe.last_event("payment_intent.canceled"))
        assert (parsed.payment_id, parsed.status) == (result.payment_id, PaymentStatus.CANCELED)

    async def test_amount_capturable_updated_is_requires_capture(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, reference = await _hosted(provider, capture_method="manual")
        fake_stripe.pay(session_id)
        parsed = await _deliver(
            provider, fake_stripe.last_event("payment_intent.amount_capturable_updated")
        )
        assert (parsed.status, parsed.reference) == (PaymentStatus.REQUIRES_CAPTURE, reference)

    async def test_charge_refunded_partly_then_fully(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, reference = await _hosted(provider)
        intent = fake_stripe.pay(session_id)
        await provider.refund(
            session_id, amount=400, currency="EUR", capture_id=None, idempotency_key="r-1"
        )
        partly = await _deliver(provider, fake_stripe.last_event("charge.refunded"))
        assert (partly.status, partly.amount_refunded, partly.payment_id, partly.reference) == (
            PaymentStatus.PARTIALLY_REFUNDED,
            400,
            intent["id"],
            reference,
        )
        await provider.refund(
            session_id, amount=1500, currency="EUR", capture_id=None, idempotency_key="r-2"
        )
        fully = await _deliver(provider, fake_stripe.last_event("charge.refunded"))
        assert (fully.status, fully.amount_refunded, fully.reference) == (
            PaymentStatus.REFUNDED,
            1900,
            reference,
        )

    async def test_charge_refunded_reads_the_reference_off_the_intent(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, reference = await _hosted(provider)
        intent = fake_stripe.pay(session_id)
        await provider.refund(
            session_id, amount=400, currency="EUR", capture_id=None, idempotency_key="r-1"
        )
        event = fake_stripe.last_event("charge.refunded")
        assert event["data"]["object"]["metadata"] == {}  # charges lack the intent's metadata
        before = len(fake_stripe.calls("GET", f"/v1/payment_intents/{intent['id']}"))
        assert (await _deliver(provider, event)).reference == reference
        after = len(fake_stripe.calls("GET", f"/v1/payment_intents/{intent['id']}"))
        assert after == before + 1

    async def test_charge_refunded_with_its_own_metadata_needs_no_lookup(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, _ = await _hosted(provider)
        fake_stripe.pay(session_id)
        fake_stripe.set_charge_metadata(session_id, {"reference": "ord_on_the_charge"})
        await provider.refund(
            session_id, amount=400, currency="EUR", capture_id=None, idempotency_key="r-1"
        )
        count = len(fake_stripe.requests)
        parsed = await _deliver(provider, fake_stripe.last_event("charge.refunded"))
        assert parsed.reference == "ord_on_the_charge"
        assert len(fake_stripe.requests) == count

    async def test_other_event_types_carry_no_status(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        result = await provider.create_payment_intent(
            intent_request(options={"ui_mode": "embedded"})
        )
        event = fake_stripe.last_event("payment_intent.created")
        parsed = await _deliver(provider, event)
        assert (parsed.event_id, parsed.event_type, parsed.status, parsed.verified) == (
            event["id"],
            "payment_intent.created",
            None,
            True,
        )
        assert result.payment_id in fake_stripe.payment_intents
        customer = fake_stripe.build_event(
            "customer.created", {"id": "cus_1", "object": "customer"}
        )
        assert (await _deliver(provider, customer)).status is None


class TestSignature:
    async def _event(self, provider: StripeProvider, fake: FakeStripe) -> dict[str, object]:
        session_id, _ = await _hosted(provider)
        fake.pay(session_id)
        return fake.last_event("checkout.session.completed")

    async def test_a_missing_signature_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        body, headers = FakeStripe.signed_delivery(
            await self._event(provider, fake_stripe), WEBHOOK_SECRET
        )
        del headers["Stripe-Signature"]
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(body, headers)

    async def test_another_secret_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        body, headers = FakeStripe.signed_delivery(
            await self._event(provider, fake_stripe), "whsec_somebody_else"
        )
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(body, headers)

    async def test_a_changed_body_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        body, headers = FakeStripe.signed_delivery(
            await self._event(provider, fake_stripe), WEBHOOK_SECRET
        )
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(body.replace(b'"paid"', b'"unpaid"'), headers)

    async def test_a_stale_signature_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        event = await self._event(provider, fake_stripe)
        body, headers = FakeStripe.signed_delivery(
            event, WEBHOOK_SECRET, timestamp=int(time.time()) - 301
        )
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(body, headers)
        body, headers = FakeStripe.signed_delivery(
            event, WEBHOOK_SECRET, timestamp=int(time.time()) - 240
        )
        assert (await provider.parse_webhook(body, headers)).verified

    async def test_a_signature_dated_ahead_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        event = await self._event(provider, fake_stripe)
        body, headers = FakeStripe.signed_delivery(
            event, WEBHOOK_SECRET, timestamp=int(time.time()) + 301
        )
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(body, headers)
        body, headers = FakeStripe.signed_delivery(
            event, WEBHOOK_SECRET, timestamp=int(time.time()) + 60
        )
        assert (await provider.parse_webhook(body, headers)).verified

    async def test_header_names_in_any_case(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        body, headers = FakeStripe.signed_delivery(
            await self._event(provider, fake_stripe), WEBHOOK_SECRET
        )
        lower = {key.lower(): value for key, value in headers.items()}
        assert (await provider.parse_webhook(body, lower)).verified

    @pytest.mark.parametrize("secret", [None, ""])
    async def test_no_webhook_secret_refuses_every_event(
        self,
        make_provider: MakeProvider,
        fake_stripe: FakeStripe,
        provider_logs: pytest.LogCaptureFixture,
        secret: str | None,
    ) -> None:
        provider = make_provider(stripe_webhook_secret=secret)
        event = fake_stripe.build_event("payment_intent.succeeded", {"id": "pi_3x", "metadata": {}})
        # Signed with the secret Stripe holds, or with an empty one, which is what a check
        # that went ahead with the missing secret would accept.
        for signing_secret in (WEBHOOK_SECRET, ""):
            body, headers = FakeStripe.signed_delivery(event, signing_secret)
            with pytest.raises(InvalidWebhookSignature):
                await provider.parse_webhook(body, headers)
        assert logged(provider_logs, "stripe.webhook.no_secret")


class TestPayload:
    async def _signed(self, body: bytes) -> dict[str, str]:
        import stripe

        header = stripe.WebhookSignature.generate_signature_header(body.decode(), WEBHOOK_SECRET)
        return {"Stripe-Signature": header}

    async def test_signed_but_not_json(self, provider: StripeProvider) -> None:
        body = b"this is not json"
        with pytest.raises(InvalidWebhookPayload):
            await provider.parse_webhook(body, await self._signed(body))

    @pytest.mark.parametrize(
        "payload",
        [
            [],
            {"object": "event"},
            {"object": "customer", "id": "cus_1", "type": "x", "data": {"object": {}}},
            {"object": "event", "id": "evt_1", "type": "charge.refunded", "data": {}},
        ],
    )
    async def test_signed_json_that_is_not_an_event(
        self, provider: StripeProvider, payload: object
    ) -> None:
        body = json.dumps(payload).encode()
        with pytest.raises(InvalidWebhookPayload):
            await provider.parse_webhook(body, await self._signed(body))

    async def test_unsigned_garbage_is_a_signature_problem_first(
        self, provider: StripeProvider
    ) -> None:
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(b"not json", {"Stripe-Signature": "t=1,v1=00"})

    async def test_not_text_cannot_be_verified(self, provider: StripeProvider) -> None:
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(b"\xff\xfe", {"Stripe-Signature": "t=1,v1=00"})
