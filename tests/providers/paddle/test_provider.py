"""The Paddle provider on its own: its settings, the Paddle-Signature check against Paddle's
own worked example, its error mapping, and the fake's own checks against the description."""

from __future__ import annotations

import hashlib
import hmac
import json

import httpx
import pytest
from pydantic import ValidationError

from models.payment import PaymentStatus, RefundStatus
from services.errors import (
    NotFound,
    PaymentNotFound,
    ProviderMisconfigured,
    ProviderNotConfigured,
    ProviderUnavailable,
)
from services.payment_providers.base import Capability, ProviderDeps
from services.payment_providers.factory import discover_provider_classes
from services.payment_providers.paddle import PaddleProvider
from services.payment_providers.paddle import transformers as tx
from services.payment_providers.paddle.provider import PaddleSecrets
from tests.fakes.paddle_server import FakePaddle
from tests.providers.paddle.conftest import API_KEY, build_provider, intent_request

# Paddle's own worked example, from the test suite of its Python SDK (PaddleHQ/
# paddle-python-sdk, tests/Unit/Notification/test_Verifier.py): the body "hello-world" signed
# at ts 1696195954 during a rotation (a dummy h1 and a real one), with three candidate
# secrets of which the third is the destination's.
EXAMPLE_HEADER = (
    "ts=1696195954;h1=dummy;h1=d96299976a6eb066f484d7fde011ac56fc32b38fc9940bc419d6e537fdc6ef02"
)
EXAMPLE_BODY = b"hello-world"
EXAMPLE_SECRETS = [
    "pdl_ntf_01hbpjmytsa32fhr36nqgc3kgb_TjIG2BXbm83HPXqNfziwe506sBEdqL/4",
    "pdl_ntf_01hbpjmytsa32fhr36nqgc3kgb_vB/yIOnTOCWIvpBadM5jzBZPHc7OmdSo",
    "pdl_ntf_01hbpjmytsa32fhr36nqgc3kgb_WvRO0eL4Bj9rgYYIBZY6wZhG4EHy9jzh",
]


class TestMetadata:
    def test_registered_as_a_merchant_of_record(self) -> None:
        assert discover_provider_classes()["paddle"] is PaddleProvider
        assert PaddleProvider.id_prefixes == ("txn_",)
        assert PaddleProvider.merchant_of_record == "Paddle.com"
        assert PaddleProvider.settings_prefix == "paddle_"
        assert Capability.CAPTURE not in PaddleProvider.capabilities
        assert {Capability.REFUND, Capability.PARTIAL_REFUND, Capability.WEBHOOKS} <= (
            PaddleProvider.capabilities
        )
        assert PaddleProvider.currencies is not None and "EUR" in PaddleProvider.currencies

    @pytest.mark.parametrize(
        ("environment", "base"),
        [("sandbox", "https://sandbox-api.paddle.com"), ("production", "https://api.paddle.com")],
    )
    def test_api_base_follows_the_environment(
        self,
        fake: FakePaddle,
        deps: ProviderDeps,
        monkeypatch: pytest.MonkeyPatch,
        environment: str,
        base: str,
    ) -> None:
        provider = build_provider(
            fake, deps, monkeypatch, PADDLE_API_BASE=None, PADDLE_ENVIRONMENT=environment
        )
        assert provider.api_base == base

    def test_the_webhook_secret_is_required_with_the_key(self) -> None:
        with pytest.raises(ValidationError, match="PADDLE_WEBHOOK_SECRET"):
            PaddleSecrets.model_validate({"api_key": API_KEY})

    async def test_not_configured_refuses_every_call(
        self, fake: FakePaddle, deps: ProviderDeps, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        provider = build_provider(
            fake, deps, monkeypatch, PADDLE_API_KEY=None, PADDLE_WEBHOOK_SECRET=None
        )
        assert not provider.is_configured()
        with pytest.raises(ProviderNotConfigured):
            await provider.create_payment_intent(intent_request())
        with pytest.raises(ProviderNotConfigured):
            await provider.verify_payment("txn_01hvcc93znj3mpqt1tenkjb04y")
        with pytest.raises(ProviderNotConfigured):
            await provider.parse_webhook(b"{}", {})
        assert not (await provider.health_check()).healthy
        assert fake.requests == []


class TestSignature:
    def test_paddles_worked_example_with_a_rotated_secret(self) -> None:
        assert (
            tx.verify_signature(
                EXAMPLE_BODY, EXAMPLE_HEADER, EXAMPLE_SECRETS, now=1696195954, tolerance_s=5
            )
            == 1696195954
        )

    def test_the_example_fails_with_the_other_secrets(self) -> None:
        with pytest.raises(tx.SignatureInvalid):
            tx.verify_signature(
                EXAMPLE_BODY, EXAMPLE_HEADER, EXAMPLE_SECRETS[:2], now=1696195954, tolerance_s=5
            )

    @pytest.mark.parametrize("drift", [-6, 6, -3600])
    def test_the_example_is_refused_out_of_tolerance(self, drift: int) -> None:
        with pytest.raises(tx.SignatureInvalid):
            tx.verify_signature(
                EXAMPLE_BODY,
                EXAMPLE_HEADER,
                EXAMPLE_SECRETS,
                now=1696195954 - drift,
                tolerance_s=5,
            )

    def test_one_altered_byte_fails(self) -> None:
        with pytest.raises(tx.SignatureInvalid):
            tx.verify_signature(
                b"hello-World", EXAMPLE_HEADER, EXAMPLE_SECRETS, now=1696195954, tolerance_s=5
            )

    @pytest.mark.parametrize(
        "header", [None, "", "ts=1696195954", "h1=" + "0" * 64, "ts=x;h1=ab", "ts=1;h1=é"]
    )
    def test_unusable_headers(self, header: str | None) -> None:
        with pytest.raises(tx.SignatureInvalid):
            tx.verify_signature(
                EXAMPLE_BODY, header, EXAMPLE_SECRETS, now=1696195954, tolerance_s=5
            )

    def test_the_fake_signs_as_paddle_does(self, fake: FakePaddle) -> None:
        body, headers = fake.signed_delivery(
            b"hello-world", secrets=[EXAMPLE_SECRETS[2]], timestamp=1696195954
        )
        assert headers["Paddle-Signature"] == (
            "ts=1696195954;h1=d96299976a6eb066f484d7fde011ac56fc32b38fc9940bc419d6e537fdc6ef02"
        )
        expected = hmac.new(
            EXAMPLE_SECRETS[2].encode(), b"1696195954:" + body, hashlib.sha256
        ).hexdigest()
        assert headers["Paddle-Signature"].endswith(expected)


class TestStatuses:
    @pytest.mark.parametrize(
        ("paddle", "ours"),
        [
            ("draft", PaymentStatus.PENDING),
            ("ready", PaymentStatus.PENDING),
            ("billed", PaymentStatus.PENDING),
            ("past_due", PaymentStatus.PENDING),
            ("paid", PaymentStatus.SUCCEEDED),
            ("completed", PaymentStatus.SUCCEEDED),
            ("canceled", PaymentStatus.CANCELED),
            ("something_new", PaymentStatus.PENDING),
            (None, PaymentStatus.PENDING),
        ],
    )
    def test_transaction_statuses(self, paddle: str | None, ours: PaymentStatus) -> None:
        assert tx.transaction_status(paddle) is ours

    @pytest.mark.parametrize(
        ("paddle", "ours"),
        [
            ("pending_approval", RefundStatus.PENDING),
            ("approved", RefundStatus.SUCCEEDED),
            ("rejected", RefundStatus.FAILED),
            ("reversed", RefundStatus.FAILED),
            ("under_review", RefundStatus.PENDING),
        ],
    )
    def test_adjustment_statuses(self, paddle: str, ours: RefundStatus) -> None:
        assert tx.adjustment_status(paddle) is ours


class TestErrors:
    async def test_an_unknown_transaction_is_not_found(self, provider: PaddleProvider) -> None:
        with pytest.raises(PaymentNotFound):
            await provider.verify_payment("txn_01hvcc93znj3mpqt1tenkjb04y")
        with pytest.raises(PaymentNotFound):
            await provider.verify_payment("txn_../../adjustments")

    async def test_an_unknown_refund_is_not_found(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        created = await provider.create_payment_intent(intent_request())
        with pytest.raises(NotFound):
            await provider.get_refund(created.payment_id, "adj_01hvgf2s84dr6reszzg29zbvcm")

    async def test_a_401_is_misconfigured(self, provider: PaddleProvider, fake: FakePaddle) -> None:
        fake.fail_next("unauthorized")
        with pytest.raises(ProviderMisconfigured):
            await provider.create_payment_intent(intent_request())

    async def test_5xx_on_reads_is_retried_then_unavailable(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        created = await provider.create_payment_intent(intent_request())
        fake.fail_next("server_error", times=3, path_prefix="/transactions/")
        with pytest.raises(ProviderUnavailable):
            await provider.verify_payment(created.payment_id)
        assert len(fake.calls("GET", f"/transactions/{created.payment_id}")) == 3

    async def test_429_says_when_to_come_back(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        fake.fail_next("rate_limit", path_prefix="/transactions", retry_after=30)
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.create_payment_intent(intent_request())
        assert caught.value.retry_after == 30
        assert not caught.value.outcome_unknown  # refused before anything was done

    async def test_a_timeout_on_create_leaves_the_outcome_unknown(
        self, provider: PaddleProvider, fake: FakePaddle
    ) -> None:
        fake.fail_next("hang_after", path_prefix="/transactions")
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.create_payment_intent(intent_request())
        assert caught.value.outcome_unknown
        fake.release_hangs()


class TestTheFake:
    async def test_a_field_paddle_does_not_name_is_a_violation(self, fake: FakePaddle) -> None:
        body = {
            "items": [
                {
                    "quantity": 1,
                    "price": {
                        "description": "A price",
                        "unit_price": {"amount": "100", "currency_code": "EUR"},
                        "taxmode": "internal",
                        "product": {"name": "A", "tax_category": "standard"},
                    },
                }
            ]
        }
        async with httpx.AsyncClient(base_url=fake.url) as paddle:
            answer = await paddle.post(
                "/transactions",
                content=json.dumps(body),
                headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            )
        assert answer.status_code == 400
        assert [str(v) for v in fake.violations] == [
            "POST /transactions: body /items/0/price/taxmode: field not in Paddle's description"
        ]
        fake.violations.clear()

    async def test_a_wrong_key_is_refused_as_paddle_does(self, fake: FakePaddle) -> None:
        async with httpx.AsyncClient(base_url=fake.url) as paddle:
            answer = await paddle.get("/transactions", headers={"Authorization": "Bearer nope"})
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "invalid_token"
