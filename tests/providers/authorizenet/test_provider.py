"""The provider on its own, against the fake: partial capture (what it takes and reports, what
it refuses before asking; test_api.py drives it through the HTTP API), the webhook signature's
keying, amounts and ids."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx2
import pytest
from redis.asyncio import Redis

from models.payment import PaymentStatus, Plan
from services.errors import CaptureExceedsAmount, InvalidStateTransition, InvalidWebhookSignature
from services.payment_providers.authorizenet import AuthorizeNetProvider
from services.payment_providers.authorizenet import transformers as tx
from services.payment_providers.authorizenet.provider import (
    AuthorizeNetConfig,
    AuthorizeNetSecrets,
)
from services.payment_providers.base import IntentRequest, ProviderDeps
from services.payment_providers.resilience import RetryPolicy
from services.payment_store import key_values
from tests.conftest import RedisServer
from tests.fakes.authorizenet_server import FakeAuthorizeNet

from .conftest import LOGIN_ID, SIGNATURE_KEY, TRANSACTION_KEY

USD = Plan(code="basic", name="Basic", amount=1999, currency="USD")


@pytest.fixture
async def provider(
    fake: FakeAuthorizeNet, redis_server: RedisServer
) -> AsyncIterator[AuthorizeNetProvider]:
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    async with httpx2.AsyncClient() as http:
        yield AuthorizeNetProvider.from_config(
            AuthorizeNetConfig(
                api_login_id=LOGIN_ID,
                api_base=f"{fake.url}/xml/v1/request.api",
                hosted_form_url=f"{fake.url}/payment/payment",
            ),
            AuthorizeNetSecrets(transaction_key=TRANSACTION_KEY, signature_key=SIGNATURE_KEY),
            ProviderDeps(key_value=key_values(redis, "test:"), http=http, timeout_s=0.5),
            retry_policy=RetryPolicy(attempts=2, base_delay=0.01),
        )
    await redis.aclose()


def intent(**options: str) -> IntentRequest:
    reference = f"ord_{secrets.token_hex(12)}"
    return IntentRequest(
        reference=reference,
        plan=USD,
        idempotency_key=reference,
        base_url="https://payments.example.com",
        options=options,
    )


async def authorized(provider: AuthorizeNetProvider, fake: FakeAuthorizeNet) -> str:
    created = await provider.create_payment_intent(intent(capture_method="manual"))
    fake.pay(fake.token_for(created.payment_id))
    return created.payment_id


def capture_requests(fake: FakeAuthorizeNet) -> list[dict[str, object]]:
    return [
        inner["transactionRequest"]
        for name, inner in fake.requests
        if name == "createTransactionRequest"
        and inner["transactionRequest"]["transactionType"] == "priorAuthCaptureTransaction"
    ]


class TestPartialCapture:
    async def test_a_part_is_captured_and_the_rest_released(
        self, provider: AuthorizeNetProvider, fake: FakeAuthorizeNet
    ) -> None:
        payment_id = await authorized(provider, fake)
        state = await provider.capture(payment_id, idempotency_key="capture-1", amount=1500)
        assert state.status is PaymentStatus.SUCCEEDED
        assert (state.amount, state.amount_captured) == (1999, 1500)
        [trans] = fake.transactions.values()
        assert trans.settle_amount == Decimal("15.00") and trans.auth_amount == Decimal("19.99")
        # Authorize.Net's word says the same: settleAmount below authAmount.
        verified = await provider.verify_payment(payment_id)
        assert (verified.status, verified.amount_captured) == (PaymentStatus.SUCCEEDED, 1500)
        again = await provider.capture(payment_id, idempotency_key="capture-2", amount=1500)
        all_of_it = await provider.capture(payment_id, idempotency_key="capture-3")
        for answer in (again, all_of_it):
            assert (answer.status, answer.amount_captured) == (PaymentStatus.SUCCEEDED, 1500)
        [asked] = capture_requests(fake)
        assert asked["amount"] == "15.00"

    async def test_all_of_it_reports_no_partial_capture(
        self, provider: AuthorizeNetProvider, fake: FakeAuthorizeNet
    ) -> None:
        payment_id = await authorized(provider, fake)
        state = await provider.capture(payment_id, idempotency_key="capture-1")
        assert (state.status, state.amount, state.amount_captured) == (
            PaymentStatus.SUCCEEDED,
            1999,
            None,
        )
        [asked] = capture_requests(fake)
        assert "amount" not in asked

    async def test_another_amount_than_was_taken_is_refused_before_asking(
        self, provider: AuthorizeNetProvider, fake: FakeAuthorizeNet
    ) -> None:
        payment_id = await authorized(provider, fake)
        [trans] = fake.transactions.values()
        fake.capture_in_interface(trans.trans_id, Decimal("10.00"))

        with pytest.raises(InvalidStateTransition, match="1000"):
            await provider.capture(payment_id, idempotency_key="capture-1", amount=1500)
        with pytest.raises(InvalidStateTransition):
            await provider.capture(payment_id, idempotency_key="capture-1", amount=1999)
        same = await provider.capture(payment_id, idempotency_key="capture-1", amount=1000)

        assert same.amount_captured == 1000
        assert capture_requests(fake) == []
        assert trans.settle_amount == Decimal("10.00")

    async def test_a_capture_made_meanwhile_is_read_and_compared(
        self, provider: AuthorizeNetProvider, fake: FakeAuthorizeNet
    ) -> None:
        # Our read says authorized; by the time we ask, another request has captured 10.00
        # (Authorize.Net answers reason 311): the transaction is read, and 15.00 was not taken.
        payment_id = await authorized(provider, fake)
        [trans] = fake.transactions.values()
        fake.before_next(
            "createTransactionRequest",
            lambda: fake.capture_in_interface(trans.trans_id, Decimal("10.00")),
        )

        with pytest.raises(InvalidStateTransition, match="1000"):
            await provider.capture(payment_id, idempotency_key="capture-1", amount=1500)

        [asked] = capture_requests(fake)
        assert asked["amount"] == "15.00"  # asked, and refused as captured already (311)
        assert trans.settle_amount == Decimal("10.00")
        same = await provider.capture(payment_id, idempotency_key="capture-1", amount=1000)
        assert same.amount_captured == 1000 and len(capture_requests(fake)) == 1

    async def test_more_than_was_authorized_is_refused_before_asking(
        self, provider: AuthorizeNetProvider, fake: FakeAuthorizeNet
    ) -> None:
        payment_id = await authorized(provider, fake)
        with pytest.raises(CaptureExceedsAmount) as refused:
            await provider.capture(payment_id, idempotency_key="capture-1", amount=2000)
        assert refused.value.extra == {"amount": 1999}
        assert capture_requests(fake) == []
        state = await provider.capture(payment_id, idempotency_key="capture-2")
        assert state.status is PaymentStatus.SUCCEEDED and state.amount == 1999

    async def test_a_partial_capture_webhook_says_what_was_taken(
        self, provider: AuthorizeNetProvider, fake: FakeAuthorizeNet
    ) -> None:
        payment_id = await authorized(provider, fake)
        [trans] = fake.transactions.values()
        fake.capture_in_interface(trans.trans_id, Decimal("12.34"))
        [event] = fake.events_of("net.authorize.payment.priorAuthCapture.created")

        parsed = await provider.parse_webhook(*fake.signed_delivery(event))

        assert (parsed.payment_id, parsed.status, parsed.amount_captured) == (
            payment_id,
            PaymentStatus.SUCCEEDED,
            1234,
        )
        assert parsed.capture_id == trans.trans_id


class TestWebhookSignature:
    async def test_the_key_is_the_signature_keys_text_not_its_hex_bytes(
        self, provider: AuthorizeNetProvider, fake: FakeAuthorizeNet
    ) -> None:
        body = b'{"notificationId":"x","eventType":"net.authorize.customer.created","payload":{}}'
        as_text = hmac.new(SIGNATURE_KEY.encode(), body, hashlib.sha512).hexdigest().upper()
        event = await provider.parse_webhook(body, {"X-ANET-Signature": f"sha512={as_text}"})
        assert event.verified and event.status is None
        as_bytes = hmac.new(bytes.fromhex(SIGNATURE_KEY), body, hashlib.sha512).hexdigest()
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(body, {"X-ANET-Signature": f"sha512={as_bytes}"})
        with pytest.raises(InvalidWebhookSignature):
            await provider.parse_webhook(body, {"X-ANET-Signature": as_text})  # no sha512=


class TestAmountsAndIds:
    @pytest.mark.parametrize(
        ("minor", "currency", "text"),
        [(1999, "USD", "19.99"), (1, "EUR", "0.01"), (100000, "SEK", "1000.00")],
    )
    def test_amounts_convert_exactly(self, minor: int, currency: str, text: str) -> None:
        assert tx.to_anet_amount(minor, currency) == text
        assert tx.from_anet_amount(float(text), currency) == minor
        assert tx.from_anet_amount(text, currency) == minor

    def test_a_payment_id_fits_the_invoice_number_and_is_stable(self) -> None:
        payment_id = tx.payment_id_for("key-1")
        assert len(payment_id) == tx.INVOICE_MAX and tx.is_payment_id(payment_id)
        assert payment_id == tx.payment_id_for("key-1") != tx.payment_id_for("key-2")
        assert len(tx.refund_invoice_for("rf_" + "0" * 24)) == tx.INVOICE_MAX

    async def test_an_unknown_status_is_pending(self) -> None:
        assert tx.payment_status(None) is PaymentStatus.PENDING
