"""PayPal webhooks: each delivery verified through PayPal's verify-webhook-signature (the fake
checks the RSA signature for real), normalized, and never trusted when it cannot be
verified."""

from __future__ import annotations

import json
from typing import Any

import pytest

from models.payment import PaymentStatus, Plan, RefundStatus
from services.errors import InvalidWebhookPayload, ProviderUnavailable
from services.payment_providers.base import RefundResult
from services.payment_providers.paypal import PayPalProvider
from tests.fakes.paypal_server import FakePayPal, WebhookSigner
from tests.providers.paypal.conftest import (
    WEBHOOK_ID,
    MakeProvider,
    intent_request,
    order_id,
    refund_id,
)

VERIFY = "/v1/notifications/verify-webhook-signature"


@pytest.fixture(scope="module")
def forger() -> WebhookSigner:
    """Someone else's key and certificate."""
    return WebhookSigner()


async def paid(provider: PayPalProvider, fake: FakePayPal, plan: Plan | None = None) -> str:
    request = intent_request(plan=plan) if plan else intent_request()
    result = await provider.create_payment_intent(request)
    fake.approve(order_id(result.payment_id))
    await provider.capture(result.payment_id, idempotency_key=f"capture-{result.payment_id}")
    return result.payment_id


async def deliver(
    provider: PayPalProvider, fake: FakePayPal, event: dict[str, Any] | bytes, **signing: Any
) -> Any:
    body, headers = fake.signed_delivery(event, signing.pop("webhook_id", WEBHOOK_ID), **signing)
    return await provider.parse_webhook(body, headers)


class TestVerifiedEvents:
    async def test_order_approved(self, provider: PayPalProvider, fake_paypal: FakePayPal) -> None:
        request = intent_request()
        result = await provider.create_payment_intent(request)
        fake_paypal.approve(order_id(result.payment_id))
        sent = fake_paypal.last_event("CHECKOUT.ORDER.APPROVED")

        event = await deliver(provider, fake_paypal, sent)

        assert event.verified is True
        assert (event.event_id, event.event_type) == (sent["id"], "CHECKOUT.ORDER.APPROVED")
        assert event.status is PaymentStatus.REQUIRES_CAPTURE
        assert event.payment_id == result.payment_id
        assert event.reference == request.reference
        assert event.occurred_at is not None
        [check] = fake_paypal.calls("POST", VERIFY)
        assert check.body is not None
        assert check.body["webhook_id"] == WEBHOOK_ID
        assert check.body["webhook_event"] == sent

    async def test_capture_completed(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await paid(provider, fake_paypal)
        sent = fake_paypal.last_event("PAYMENT.CAPTURE.COMPLETED")
        event = await deliver(provider, fake_paypal, sent)
        assert event.verified is True
        assert event.status is PaymentStatus.SUCCEEDED
        assert event.payment_id == payment_id
        assert event.capture_id == sent["resource"]["id"]
        assert event.reference == sent["resource"]["custom_id"]

    async def test_capture_denied(self, provider: PayPalProvider, fake_paypal: FakePayPal) -> None:
        result = await provider.create_payment_intent(intent_request())
        fake_paypal.approve(order_id(result.payment_id))
        fake_paypal.decline_next_capture("capture_declined")
        with pytest.raises(Exception, match="declined"):
            await provider.capture(result.payment_id, idempotency_key="capture-1")
        event = await deliver(
            provider, fake_paypal, fake_paypal.last_event("PAYMENT.CAPTURE.DENIED")
        )
        assert event.verified is True
        assert event.status is PaymentStatus.FAILED
        assert event.payment_id == result.payment_id
        assert event.capture_id is None  # nothing was captured that could be refunded

    async def test_partial_then_full_refund(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await paid(provider, fake_paypal)
        reference = fake_paypal.orders[order_id(payment_id)]["purchase_units"][0]["custom_id"]
        first = await provider.refund(
            payment_id, refund_id=refund_id(1), amount=500, currency="EUR", capture_id=None
        )
        sent = fake_paypal.last_event("PAYMENT.CAPTURE.REFUNDED")
        partial = await deliver(provider, fake_paypal, sent)
        assert partial.verified is True
        # A refund event claims no payment status: it carries the refund, followed on its own.
        assert partial.status is None
        assert partial.refund == RefundResult(
            provider_refund_id=first.provider_refund_id,
            amount=500,
            status=RefundStatus.SUCCEEDED,
            currency="EUR",
            refund_id=refund_id(1),
        )
        assert partial.payment_id == payment_id  # found through the refunded capture
        assert partial.capture_id == (await provider.verify_payment(payment_id)).capture_id
        # The refund's custom_id is our refund id; the reference comes off the capture.
        assert sent["resource"]["custom_id"] == refund_id(1)
        assert partial.reference == reference

        rest = await provider.refund(
            payment_id, refund_id=refund_id(2), amount=1400, currency="EUR", capture_id=None
        )
        full = await deliver(
            provider, fake_paypal, fake_paypal.last_event("PAYMENT.CAPTURE.REFUNDED")
        )
        assert full.status is None
        assert full.refund is not None
        assert (full.refund.provider_refund_id, full.refund.amount, full.refund.refund_id) == (
            rest.provider_refund_id,
            1400,
            refund_id(2),
        )
        assert full.refund.status is RefundStatus.SUCCEEDED
        assert full.payment_id == payment_id
        assert full.reference == reference

    async def test_a_refund_made_at_paypal_directly(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        # Made on paypal.com, not by us: the refund keeps the capture's custom_id (our order
        # reference), so it carries no refund id of ours.
        payment_id = await paid(provider, fake_paypal)
        reference = fake_paypal.orders[order_id(payment_id)]["purchase_units"][0]["custom_id"]
        await provider.refund(
            payment_id, refund_id=refund_id(1), amount=500, currency="EUR", capture_id=None
        )
        resource = fake_paypal.last_event("PAYMENT.CAPTURE.REFUNDED")["resource"]
        resource["custom_id"] = reference
        sent = fake_paypal.build_event("PAYMENT.CAPTURE.REFUNDED", resource, resource_type="refund")
        event = await deliver(provider, fake_paypal, sent)
        assert event.refund is not None
        assert event.refund.refund_id is None
        assert event.refund.provider_refund_id == resource["id"]
        assert (event.payment_id, event.reference) == (payment_id, reference)

    async def test_a_reversal_is_a_refund_we_did_not_ask_for(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await paid(provider, fake_paypal)
        reference = fake_paypal.orders[order_id(payment_id)]["purchase_units"][0]["custom_id"]
        await provider.refund(
            payment_id, refund_id=refund_id(1), amount=1900, currency="EUR", capture_id=None
        )
        resource = fake_paypal.last_event("PAYMENT.CAPTURE.REFUNDED")["resource"]
        resource["id"] = "8MC585209K746392H"
        resource["custom_id"] = reference
        sent = fake_paypal.build_event("PAYMENT.CAPTURE.REVERSED", resource, resource_type="refund")
        event = await deliver(provider, fake_paypal, sent)
        assert (event.event_type, event.verified, event.status) == (
            "PAYMENT.CAPTURE.REVERSED",
            True,
            None,
        )
        assert event.refund == RefundResult(
            provider_refund_id="8MC585209K746392H",
            amount=1900,
            status=RefundStatus.SUCCEEDED,
            currency="EUR",
        )
        assert (event.payment_id, event.reference) == (payment_id, reference)

    @pytest.mark.parametrize(
        "resource",
        [
            {"status": "COMPLETED", "amount": {"currency_code": "EUR", "value": "5.00"}},
            {"id": "../v1/oauth2/token", "status": "COMPLETED"},
            {"id": "1JU08902781691411", "status": "COMPLETED"},
            {"id": "1JU08902781691411", "amount": {"currency_code": "EUR", "value": "five"}},
        ],
    )
    async def test_a_refund_event_whose_resource_is_not_a_refund(
        self, provider: PayPalProvider, fake_paypal: FakePayPal, resource: dict[str, Any]
    ) -> None:
        sent = fake_paypal.build_event("PAYMENT.CAPTURE.REFUNDED", resource, resource_type="refund")
        with pytest.raises(InvalidWebhookPayload):
            await deliver(provider, fake_paypal, sent)

    async def test_an_event_type_we_do_not_handle(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        sent = fake_paypal.build_event(
            "CUSTOMER.DISPUTE.CREATED", {"dispute_id": "PP-D-12345"}, resource_type="dispute"
        )
        event = await deliver(provider, fake_paypal, sent)
        assert event.verified is True
        assert event.event_type == "CUSTOMER.DISPUTE.CREATED"
        assert event.status is None
        assert event.payment_id is None

    async def test_the_event_goes_back_byte_for_byte(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        # Non-ASCII text and PayPal's own spacing: a client that re-serialized the event
        # would send other bytes, and PayPal's CRC32 would not match.
        plan = Plan(
            code="pro", name="Pro \u2013 Jahresabo f\u00fcr B\u00fcros", amount=2900, currency="EUR"
        )
        result = await provider.create_payment_intent(intent_request(plan=plan))
        fake_paypal.approve(order_id(result.payment_id))
        sent = fake_paypal.last_event("CHECKOUT.ORDER.APPROVED")
        for body in (
            json.dumps(sent, ensure_ascii=False, separators=(",", ":")).encode(),
            json.dumps(sent, indent=2).encode(),
        ):
            event = await deliver(provider, fake_paypal, body)
            assert event.verified is True


class TestUntrustedEvents:
    async def _approved_event(self, provider: PayPalProvider, fake: FakePayPal) -> dict[str, Any]:
        result = await provider.create_payment_intent(intent_request())
        fake.approve(order_id(result.payment_id))
        return fake.last_event("CHECKOUT.ORDER.APPROVED")

    async def test_signed_with_another_key(
        self, provider: PayPalProvider, fake_paypal: FakePayPal, forger: WebhookSigner
    ) -> None:
        sent = await self._approved_event(provider, fake_paypal)
        # The forger names PayPal's certificate but signs with their own key.
        event = await deliver(
            provider, fake_paypal, sent, signer=forger, cert_url=fake_paypal.cert_url()
        )
        assert event.verified is False
        # Still normalized, so that the service can read the payment from PayPal itself.
        assert event.payment_id == f"pp_{sent['resource']['id']}"

    async def test_signed_with_a_certificate_that_is_not_paypals(
        self, provider: PayPalProvider, fake_paypal: FakePayPal, forger: WebhookSigner
    ) -> None:
        sent = await self._approved_event(provider, fake_paypal)
        event = await deliver(
            provider,
            fake_paypal,
            sent,
            signer=forger,
            cert_url=f"https://certs.example.net/{forger.cert_id}",
        )
        assert event.verified is False

    async def test_body_changed_after_signing(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        sent = await self._approved_event(provider, fake_paypal)
        body, headers = fake_paypal.signed_delivery(sent, WEBHOOK_ID)
        tampered = body.replace(b'"19.00"', b'"0.01"')
        assert tampered != body
        event = await provider.parse_webhook(tampered, headers)
        assert event.verified is False

    async def test_signed_for_another_webhook(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        sent = await self._approved_event(provider, fake_paypal)
        event = await deliver(provider, fake_paypal, sent, webhook_id="8PT597110X687430L")
        assert event.verified is False

    async def test_headers_of_another_delivery(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        first = await self._approved_event(provider, fake_paypal)
        second = await self._approved_event(provider, fake_paypal)
        _, headers = fake_paypal.signed_delivery(first, WEBHOOK_ID)
        body, _ = fake_paypal.signed_delivery(second, WEBHOOK_ID)
        event = await provider.parse_webhook(body, headers)
        assert event.verified is False

    async def test_without_a_webhook_id_nothing_can_be_verified(
        self, make_provider: MakeProvider, fake_paypal: FakePayPal
    ) -> None:
        provider = make_provider(paypal_webhook_id=None)
        sent = await self._approved_event(provider, fake_paypal)
        event = await deliver(provider, fake_paypal, sent)
        assert event.verified is False
        assert event.status is PaymentStatus.REQUIRES_CAPTURE  # what it claims, untrusted
        assert fake_paypal.calls("POST", VERIFY) == []

    @pytest.mark.parametrize(
        ("header", "value"),
        [
            ("PAYPAL-TRANSMISSION-SIG", None),
            ("PAYPAL-CERT-URL", None),
            ("PAYPAL-TRANSMISSION-ID", None),
            ("PAYPAL-CERT-URL", "http://api.paypal.com/v1/notifications/certs/CERT-1"),
            ("PAYPAL-TRANSMISSION-SIG", "not base64!"),
            ("PAYPAL-AUTH-ALGO", "SHA256 with RSA"),
        ],
    )
    async def test_missing_or_malformed_headers_are_not_sent_on(
        self, provider: PayPalProvider, fake_paypal: FakePayPal, header: str, value: str | None
    ) -> None:
        sent = await self._approved_event(provider, fake_paypal)
        body, headers = fake_paypal.signed_delivery(sent, WEBHOOK_ID)
        if value is None:
            del headers[header]
        else:
            headers[header] = value
        event = await provider.parse_webhook(body, headers)
        assert event.verified is False
        assert fake_paypal.calls("POST", VERIFY) == []

    async def test_headers_in_any_case(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        sent = await self._approved_event(provider, fake_paypal)
        body, headers = fake_paypal.signed_delivery(sent, WEBHOOK_ID)
        event = await provider.parse_webhook(body, {k.lower(): v for k, v in headers.items()})
        assert event.verified is True

    async def test_paypal_unable_to_verify_means_unverified(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        sent = await self._approved_event(provider, fake_paypal)
        fake_paypal.fail_next("unavailable", times=3, path_prefix=VERIFY)
        event = await deliver(provider, fake_paypal, sent)
        assert event.verified is False
        assert [c.status for c in fake_paypal.calls("POST", VERIFY)] == [503, 503, 503]

    async def test_unverified_refund_whose_capture_cannot_be_read(
        self, provider: PayPalProvider, fake_paypal: FakePayPal, forger: WebhookSigner
    ) -> None:
        payment_id = await paid(provider, fake_paypal)
        await provider.refund(
            payment_id, refund_id=refund_id(1), amount=500, currency="EUR", capture_id=None
        )
        sent = fake_paypal.last_event("PAYMENT.CAPTURE.REFUNDED")
        fake_paypal.fail_next("unavailable", times=3, path_prefix="/v2/payments/captures/")
        event = await deliver(provider, fake_paypal, sent, signer=forger)
        assert event.verified is False
        assert event.payment_id is None
        # The refund's custom_id is our refund id, not an order reference: it is what the
        # event still carries back to our record.
        assert event.reference is None
        assert event.refund is not None
        assert event.refund.refund_id == refund_id(1)

    async def test_unverified_direct_refund_whose_capture_cannot_be_read(
        self, provider: PayPalProvider, fake_paypal: FakePayPal, forger: WebhookSigner
    ) -> None:
        # A refund made at PayPal directly keeps the capture's custom_id: our order reference.
        payment_id = await paid(provider, fake_paypal)
        reference = fake_paypal.orders[order_id(payment_id)]["purchase_units"][0]["custom_id"]
        await provider.refund(
            payment_id, refund_id=refund_id(1), amount=500, currency="EUR", capture_id=None
        )
        resource = fake_paypal.last_event("PAYMENT.CAPTURE.REFUNDED")["resource"]
        resource["custom_id"] = reference
        sent = fake_paypal.build_event("PAYMENT.CAPTURE.REFUNDED", resource, resource_type="refund")
        fake_paypal.fail_next("unavailable", times=3, path_prefix="/v2/payments/captures/")
        event = await deliver(provider, fake_paypal, sent, signer=forger)
        assert event.verified is False
        assert event.payment_id is None
        assert event.reference == reference
        assert event.refund is not None and event.refund.refund_id is None

    async def test_verified_refund_whose_capture_cannot_be_read_is_delivered_again(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await paid(provider, fake_paypal)
        await provider.refund(
            payment_id, refund_id=refund_id(1), amount=500, currency="EUR", capture_id=None
        )
        sent = fake_paypal.last_event("PAYMENT.CAPTURE.REFUNDED")
        fake_paypal.fail_next("unavailable", times=3, path_prefix="/v2/payments/captures/")
        # A 503 to PayPal: it delivers the event again later.
        with pytest.raises(ProviderUnavailable):
            await deliver(provider, fake_paypal, sent)


class TestNotEvents:
    @pytest.mark.parametrize(
        "body",
        [
            b"not json",
            b"\xff\xfe",
            b"[]",
            b'{"foo": 1}',
            b'{"id": "WH-1"}',
            b'{"id": "WH-1", "event_type": ""}',
            b'{"id": 1, "event_type": "PAYMENT.CAPTURE.COMPLETED"}',
            b'{"id": "WH-1", "event_type": "PAYMENT.CAPTURE.COMPLETED", "resource": []}',
        ],
    )
    async def test_refused(
        self, provider: PayPalProvider, fake_paypal: FakePayPal, body: bytes
    ) -> None:
        with pytest.raises(InvalidWebhookPayload):
            await provider.parse_webhook(body, {})
        assert fake_paypal.requests == []
