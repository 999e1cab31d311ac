"""Stripe's failures become the service's errors: declines, rate limits, outages, timeouts,
bad credentials; retried only as far as it is safe and the policy allows."""

from __future__ import annotations

import logging

import pytest

from models.payment import PaymentStatus
from services.errors import (
    IdempotencyKeyReused,
    PaymentDeclined,
    ProviderMisconfigured,
    ProviderUnavailable,
)
from services.payment_providers.resilience import RetryPolicy
from services.payment_providers.stripe import StripeProvider
from tests.fakes.server import free_port
from tests.fakes.stripe_server import FakeStripe
from tests.providers.stripe.conftest import (
    FAST_RETRIES,
    PRO,
    SECRET_KEY,
    MakeProvider,
    intent_request,
    logged,
)

SESSIONS = "/v1/checkout/sessions"


class TestDecline:
    async def test_a_card_error_is_a_decline_with_its_code(
        self,
        provider: StripeProvider,
        fake_stripe: FakeStripe,
        provider_logs: pytest.LogCaptureFixture,
    ) -> None:
        fake_stripe.fail_next("decline", decline_code="insufficient_funds")
        with pytest.raises(PaymentDeclined) as caught:
            await provider.create_payment_intent(intent_request(options={"ui_mode": "embedded"}))
        error = caught.value
        assert (error.status, error.code, error.decline_code) == (
            402,
            "payment_declined",
            "insufficient_funds",
        )
        assert "Your card" not in error.detail  # Stripe's own message is not shown
        assert len(fake_stripe.requests) == 1  # a decline is an answer: never retried
        (record,) = logged(provider_logs, "stripe.payment_intent.create_declined")
        assert record.stripe_request_id.startswith("req_")  # type: ignore[attr-defined]


class TestRateLimit:
    async def test_retried_after_what_retry_after_says(
        self,
        provider: StripeProvider,
        fake_stripe: FakeStripe,
        provider_logs: pytest.LogCaptureFixture,
    ) -> None:
        fake_stripe.fail_next("rate_limit", retry_after=1)
        result = await provider.create_payment_intent(intent_request())
        assert result.payment_id in fake_stripe.sessions
        assert [c.status for c in fake_stripe.calls("POST", SESSIONS)] == [429, 200]
        assert len(fake_stripe.sessions) == 1
        # Both attempts carried the same idempotency key, so a retry can never pay twice.
        assert len({c.idempotency_key for c in fake_stripe.calls("POST", SESSIONS)}) == 1
        (retry,) = logged(provider_logs, "provider.retry")
        assert retry.wait_s == 1.0  # type: ignore[attr-defined]
        (failure,) = logged(provider_logs, "stripe.checkout_session.create_failed")
        assert failure.http_status == 429  # type: ignore[attr-defined]
        assert failure.stripe_request_id.startswith("req_")  # type: ignore[attr-defined]

    async def test_rate_limited_on_every_attempt_is_unavailable(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        fake_stripe.fail_next("rate_limit", times=FAST_RETRIES.attempts, retry_after=0)
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.create_payment_intent(intent_request())
        assert caught.value.status == 503
        assert caught.value.retry_after_hint == 0
        assert not caught.value.outcome_unknown  # Stripe did nothing: another provider may try
        assert len(fake_stripe.calls("POST", SESSIONS)) == FAST_RETRIES.attempts
        assert fake_stripe.sessions == {}

    async def test_a_long_retry_after_is_passed_on_not_waited(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        fake_stripe.fail_next("rate_limit", retry_after=30)
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.verify_payment("pi_3Whatever000000000000000")
        assert caught.value.retry_after_hint == 30
        assert caught.value.retry_after == 30
        assert caught.value.headers["Retry-After"] == "30"
        assert len(fake_stripe.requests) == 1

    async def test_without_retry_after_backoff_decides(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        fake_stripe.fail_next("rate_limit")
        result = await provider.create_payment_intent(intent_request())
        assert result.payment_id in fake_stripe.sessions


class TestOutage:
    async def test_a_server_error_then_success(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        fake_stripe.fail_next("server_error")
        result = await provider.create_payment_intent(intent_request())
        assert [c.status for c in fake_stripe.calls("POST", SESSIONS)] == [500, 200]
        assert len(fake_stripe.sessions) == 1
        assert result.payment_id in fake_stripe.sessions

    async def test_server_errors_on_every_attempt_are_unavailable(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        fake_stripe.fail_next("server_error", times=FAST_RETRIES.attempts)
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.create_payment_intent(intent_request())
        assert caught.value.status == 503
        assert caught.value.retry_after_hint is None
        assert caught.value.outcome_unknown
        assert len(fake_stripe.requests) == FAST_RETRIES.attempts

    async def test_a_hang_times_out_and_is_unavailable(
        self, make_provider: MakeProvider, fake_stripe: FakeStripe
    ) -> None:
        provider = make_provider(
            retry_policy=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05),
            provider_timeout_seconds=0.2,
        )
        fake_stripe.fail_next("hang", times=2)
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.verify_payment("pi_3Whatever000000000000000")
        assert caught.value.outcome_unknown  # the request may have been processed
        assert len(fake_stripe.requests) == 2
        fake_stripe.release_hangs()

    async def test_an_unknown_outcome_stays_unknown_after_a_plain_refusal(
        self, make_provider: MakeProvider, fake_stripe: FakeStripe
    ) -> None:
        provider = make_provider(provider_timeout_seconds=0.2)
        fake_stripe.fail_next("hang")
        fake_stripe.fail_next("rate_limit", times=FAST_RETRIES.attempts - 1, retry_after=0)
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.create_payment_intent(intent_request())
        assert caught.value.retry_after_hint == 0  # the last answer was a 429 ...
        assert caught.value.outcome_unknown  # ... but the first attempt may have gone through
        fake_stripe.release_hangs()

    async def test_a_hang_then_an_answer(
        self, make_provider: MakeProvider, fake_stripe: FakeStripe
    ) -> None:
        provider = make_provider(provider_timeout_seconds=0.2)
        fake_stripe.fail_next("hang")
        result = await provider.create_payment_intent(intent_request())
        fake_stripe.release_hangs()
        assert len(fake_stripe.sessions) == 1
        assert (await provider.verify_payment(result.payment_id)).status is PaymentStatus.PENDING

    async def test_nothing_listening_is_unavailable(
        self, make_provider: MakeProvider, fake_stripe: FakeStripe
    ) -> None:
        provider = make_provider(stripe_api_base=f"http://127.0.0.1:{free_port()}")
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.verify_payment("pi_3Whatever000000000000000")
        assert not caught.value.outcome_unknown  # nothing was sent


class TestCredentials:
    async def test_a_wrong_key_is_misconfigured_and_not_retried(
        self,
        make_provider: MakeProvider,
        fake_stripe: FakeStripe,
        provider_logs: pytest.LogCaptureFixture,
    ) -> None:
        # Its last four are letters: digits turn up in any log record (thread ids, times).
        wrong_key = "sk_test_51WrongKeyWrongKeyWrongKeyQzXv"
        provider = make_provider(stripe_secret_key=wrong_key)
        with pytest.raises(ProviderMisconfigured) as caught:
            await provider.create_payment_intent(intent_request())
        assert caught.value.status == 503
        assert len(fake_stripe.requests) == 1
        (record,) = logged(provider_logs, "stripe.checkout_session.create_failed")
        assert record.levelno == logging.ERROR
        assert record.stripe_request_id.startswith("req_")  # type: ignore[attr-defined]
        everything = " ".join(str(v) for r in provider_logs.records for v in vars(r).values())
        assert wrong_key[-4:] not in everything and "sk_test" not in everything
        assert SECRET_KEY not in everything

    async def test_health_reports_bad_credentials(
        self, make_provider: MakeProvider, fake_stripe: FakeStripe
    ) -> None:
        health = await make_provider(stripe_secret_key="sk_test_nope").health_check()
        assert not health.healthy
        assert health.message == ProviderMisconfigured.title


class TestIdempotencyConflict:
    async def test_one_key_for_two_different_requests_is_refused(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        await provider.create_payment_intent(intent_request(idempotency_key="k-shared"))
        with pytest.raises(IdempotencyKeyReused):
            await provider.create_payment_intent(
                intent_request(idempotency_key="k-shared", plan=PRO)
            )
        assert len(fake_stripe.sessions) == 1


class TestHealth:
    async def test_a_cheap_authenticated_call_timed(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        health = await provider.health_check()
        assert health.healthy
        assert health.latency_ms is not None and health.latency_ms >= 0
        (call,) = fake_stripe.requests
        assert (call.method, call.path) == ("GET", "/v1/balance")

    async def test_an_outage_is_unhealthy_without_retrying(
        self, provider: StripeProvider, fake_stripe: FakeStripe
    ) -> None:
        fake_stripe.fail_next("server_error")
        health = await provider.health_check()
        assert not health.healthy
        assert health.message == ProviderUnavailable.title
        assert len(fake_stripe.requests) == 1
