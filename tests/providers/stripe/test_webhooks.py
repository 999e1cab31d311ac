"""Webhook deliveries: the signature decides whether an event is read at all; handled events
are normalized to the payment they are about. The events come from the fake's own state
changes, so they are shaped as the API version the SDK pins would send them."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import httpx
import pytest

from models.payment import PaymentStatus, RefundStatus
from services.errors import InvalidWebhookPayload, InvalidWebhookSignature
from services.payment_providers.base import RefundResult, WebhookEvent
from services.payment_providers.stripe import StripeProvider
from tests.fakes.stripe_server import FakeStripe
from tests.providers.stripe.conftest import (
    SECRET_KEY,
    WEBHOOK_SECRET,
    MakeProvider,
    intent_request,
    logged,
    refund_id,
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

    async def test_payment_intent_succeeded_says_what_a_partial_capture_took(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, reference = await _hosted(provider, capture_method="manual")
        fake_stripe.pay(session_id)
        await provider.capture(session_id, idempotency_key="capture-1", amount=700)
        parsed = await _deliver(provider, fake_stripe.last_event("payment_intent.succeeded"))
        assert (parsed.status, parsed.reference, parsed.amount_captured) == (
            PaymentStatus.SUCCEEDED,
            reference,
            700,
        )

    async def test_payment_intent_succeeded_in_full_claims_no_partial_capture(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, _ = await _hosted(provider, capture_method="manual")
        fake_stripe.pay(session_id)
        await provider.capture(session_id, idempotency_key="capture-1")
        parsed = await _deliver(provider, fake_stripe.last_event("payment_intent.succeeded"))
        assert (parsed.status, parsed.amount_captured) == (PaymentStatus.SUCCEEDED, None)

    async def test_refund_created_partly_then_fully(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, _ = await _hosted(provider)
        fake_stripe.pay(session_id)
        first = await provider.refund(
            session_id, refund_id=refund_id(1), amount=400, currency="EUR", capture_id=None
        )
        event = fake_stripe.last_event("refund.created")
        partly = await _deliver(provider, event)
        # A refund event claims no payment status: it carries the refund, found by the
        # payment_id we put in its metadata.
        assert partly == WebhookEvent(
            event_id=event["id"],
            event_type="refund.created",
            verified=True,
            payment_id=session_id,
            refund=RefundResult(
                provider_refund_id=first.provider_refund_id,
                amount=400,
                status=RefundStatus.SUCCEEDED,
                currency="EUR",
                refund_id=refund_id(1),
            ),
            occurred_at=datetime.fromtimestamp(event["created"], UTC),
        )

        rest = await provider.refund(
            session_id, refund_id=refund_id(2), amount=1500, currency="EUR", capture_id=None
        )
        fully = await _deliver(provider, fake_stripe.last_event("refund.created"))
        assert (fully.payment_id, fully.status) == (session_id, None)
        assert fully.refund is not None
        assert (fully.refund.provider_refund_id, fully.refund.amount, fully.refund.refund_id) == (
            rest.provider_refund_id,
            1500,
            refund_id(2),
        )
        # The charge at Stripe shows the total.
        charge = fake_stripe.last_event("charge.refunded")["data"]["object"]
        assert (charge["amount_refunded"], charge["refunded"]) == (1900, True)

    async def test_refund_with_our_metadata_needs_no_lookup(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, _ = await _hosted(provider)
        fake_stripe.pay(session_id)
        await provider.refund(
            session_id, refund_id=refund_id(1), amount=400, currency="EUR", capture_id=None
        )
        count = len(fake_stripe.requests)
        parsed = await _deliver(provider, fake_stripe.last_event("refund.created"))
        assert parsed.payment_id == session_id  # metadata.payment_id, not the refund's intent
        assert len(fake_stripe.requests) == count

    async def test_refund_of_an_embedded_payment(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        request = intent_request(options={"ui_mode": "embedded"})
        result = await provider.create_payment_intent(request)
        fake_stripe.pay(result.payment_id)
        await provider.refund(
            result.payment_id, refund_id=refund_id(1), amount=400, currency="EUR", capture_id=None
        )
        before = len(fake_stripe.requests)
        parsed = await _deliver(provider, fake_stripe.last_event("refund.created"))
        assert parsed.payment_id == result.payment_id
        assert parsed.refund is not None and parsed.refund.refund_id == refund_id(1)
        # Our refund names our payment: no read of the intent for a reference is needed.
        assert parsed.reference is None
        assert len(fake_stripe.requests) == before

    async def test_refund_made_at_stripe_directly_reads_the_reference_off_the_intent(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        session_id, reference = await _hosted(provider)
        intent = fake_stripe.pay(session_id)
        # Made in Stripe's dashboard, not by us: no metadata of ours on the refund.
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{fake_stripe.url}/v1/refunds",
                data={"payment_intent": intent["id"], "amount": "400"},
                headers={"Authorization": f"Bearer {SECRET_KEY}"},
            )
        assert answer.status_code == 200, answer.text
        event = fake_stripe.last_event("refund.created")
        assert event["data"]["object"]["metadata"] == {}
        path = f"/v1/payment_intents/{intent['id']}"
        before = len(fake_stripe.calls("GET", path))
        parsed = await _deliver(provider, event)
        assert len(fake_stripe.calls("GET", path)) == before + 1
        # Found by the refund's intent and our reference read off it, as the service knows
        # this payment by its session ID.
        assert (parsed.payment_id, parsed.reference) == (intent["id"], reference)
        assert parsed.refund == RefundResult(
            provider_refund_id=answer.json()["id"],
            amount=400,
            status=RefundStatus.SUCCEEDED,
            currency="EUR",
        )

    @pytest.mark.parametrize(
        ("event_type", "status", "failure"),
        [
            ("refund.updated", "pending", None),
            ("refund.failed", "failed", "expired_or_canceled_card"),
            ("charge.refund.updated", "canceled", None),
            ("refund.updated", "requires_action", None),
        ],
    )
    async def test_later_refund_events_carry_the_refund_as_it_is_now(
        self,
        provider: StripeProvider,
        fake_stripe: FakeStripe,
        event_type: str,
        status: str,
        failure: str | None,
    ) -> None:
        session_id, _ = await _hosted(provider)
        fake_stripe.pay(session_id)
        made = await provider.refund(
            session_id, refund_id=refund_id(1), amount=400, currency="EUR", capture_id=None
        )
        refund = dict(fake_stripe.refunds[made.provider_refund_id])
        refund.update({"status": status, "failure_reason": failure})
        parsed = await _deliver(provider, fake_stripe.build_event(event_type, refund))
        assert (parsed.event_type, parsed.payment_id, parsed.status) == (
            event_type,
            session_id,
            None,
        )
        assert parsed.refund == RefundResult(
            provider_refund_id=made.provider_refund_id,
            amount=400,
            status={
                "pending": RefundStatus.PENDING,
                "requires_action": RefundStatus.PENDING,
                "failed": RefundStatus.FAILED,
                "canceled": RefundStatus.CANCELED,
            }[status],
            currency="EUR",
            refund_id=refund_id(1),
            failure_code=failure,
        )

    async def test_charge_refunded_is_no_longer_handled(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        # Each refund comes with its own refund.* event; charge.refunded only says the total.
        session_id, _ = await _hosted(provider)
        fake_stripe.pay(session_id)
        await provider.refund(
            session_id, refund_id=refund_id(1), amount=400, currency="EUR", capture_id=None
        )
        event = fake_stripe.last_event("charge.refunded")
        count = len(fake_stripe.requests)
        parsed = await _deliver(provider, event)
        assert (parsed.event_id, parsed.event_type, parsed.verified) == (
            event["id"],
            "charge.refunded",
            True,
        )
        assert (parsed.status, parsed.refund, parsed.payment_id) == (None, None, None)
        assert len(fake_stripe.requests) == count

    @pytest.mark.parametrize(
        "change",
        [{"amount": None}, {"amount": 0}, {"amount": "400"}, {"amount": True}, {"id": None}],
    )
    async def test_a_refund_event_whose_object_is_not_a_refund(
        self, provider: StripeProvider, fake_stripe: FakeStripe, change: dict[str, object]
    ) -> None:
        session_id, _ = await _hosted(provider)
        fake_stripe.pay(session_id)
        made = await provider.refund(
            session_id, refund_id=refund_id(1), amount=400, currency="EUR", capture_id=None
        )
        refund = {**fake_stripe.refunds[made.provider_refund_id], **change}
        with pytest.raises(InvalidWebhookPayload):
            await _deliver(provider, fake_stripe.build_event("refund.created", refund))

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
