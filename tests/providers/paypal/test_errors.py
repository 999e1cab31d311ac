"""The OAuth token's life, and PayPal's failures mapped to the service's errors: rate limits,
outages, timeouts, refused credentials. Against the fake over loopback."""

from __future__ import annotations

import asyncio

import pytest

from models.payment import PaymentStatus
from services.errors import PaymentDeclined, ProviderMisconfigured, ProviderUnavailable
from services.payment_providers.paypal import PayPalProvider
from services.payment_providers.resilience import NO_RETRY
from tests.fakes.paypal_server import FakePayPal
from tests.fakes.server import free_port
from tests.providers.paypal.conftest import (
    CLIENT_SECRET,
    MakeProvider,
    intent_request,
    logged,
    order_id,
)

TOKEN = "/v1/oauth2/token"


async def new_order(provider: PayPalProvider) -> str:
    return (await provider.create_payment_intent(intent_request())).payment_id


class TestToken:
    async def test_one_token_for_many_calls(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await new_order(provider)
        for _ in range(5):
            await provider.verify_payment(payment_id)
        assert fake_paypal.token_calls == 1
        [token_call] = fake_paypal.calls("POST", TOKEN)
        assert token_call.body == {"grant_type": "client_credentials"}

    async def test_concurrent_calls_on_a_cold_cache_fetch_one_token(
        self, make_provider: MakeProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await new_order(make_provider())
        assert fake_paypal.token_calls == 1
        cold = make_provider()
        states = await asyncio.gather(*(cold.verify_payment(payment_id) for _ in range(50)))
        assert {state.status for state in states} == {PaymentStatus.PENDING}
        assert fake_paypal.token_calls == 2  # the first provider's, and one for all 50

    async def test_a_refused_token_is_renewed_once(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await new_order(provider)
        fake_paypal.expire_tokens()
        state = await provider.verify_payment(payment_id)
        assert state.status is PaymentStatus.PENDING
        assert fake_paypal.token_calls == 2
        statuses = [c.status for c in fake_paypal.calls("GET")]
        assert statuses == [401, 200]

    async def test_renewed_shortly_before_it_expires(
        self, make_provider: MakeProvider, fake_paypal: FakePayPal
    ) -> None:
        fake_paypal.token_ttl_s = 3600
        now = [1000.0]
        provider = make_provider(clock=lambda: now[0])
        payment_id = await new_order(provider)
        now[0] += 3200  # 400 s left: still good
        await provider.verify_payment(payment_id)
        assert fake_paypal.token_calls == 1
        now[0] += 150  # 250 s left: inside the renewal margin
        await provider.verify_payment(payment_id)
        assert fake_paypal.token_calls == 2
        assert [c.status for c in fake_paypal.calls("GET")] == [200, 200]  # never a 401

    async def test_refused_even_when_fresh_is_misconfiguration(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await new_order(provider)
        fake_paypal.tokens_refused = True
        with pytest.raises(ProviderMisconfigured):
            await provider.verify_payment(payment_id)
        assert fake_paypal.token_calls == 2  # the first token, and one renewal: no loop
        assert len(fake_paypal.calls("GET")) == 2

    async def test_wrong_credentials(
        self,
        make_provider: MakeProvider,
        fake_paypal: FakePayPal,
        provider_logs: pytest.LogCaptureFixture,
    ) -> None:
        secret = "EFwrongSecret0123456789abcdef"
        provider = make_provider(paypal_client_secret=secret)
        with pytest.raises(ProviderMisconfigured) as raised:
            await provider.create_payment_intent(intent_request())
        assert raised.value.status == 503
        assert fake_paypal.token_calls == 1  # not retried: waiting will not fix it
        assert fake_paypal.orders == {}
        [record] = logged(provider_logs, "paypal.oauth.token_failed")
        assert record.levelname == "ERROR"
        for logged_record in provider_logs.records:
            text = repr(logged_record.__dict__)
            assert secret not in text
            assert CLIENT_SECRET not in text

    async def test_rate_limited_token_call_is_retried(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        fake_paypal.fail_next("rate_limit", path_prefix=TOKEN, retry_after=0)
        await new_order(provider)
        assert [c.status for c in fake_paypal.calls("POST", TOKEN)] == [429, 200]


class TestRateLimits:
    async def test_retried_after_what_paypal_asks(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await new_order(provider)
        fake_paypal.fail_next("rate_limit", path_prefix="/v2/", retry_after=0)
        state = await provider.verify_payment(payment_id)
        assert state.status is PaymentStatus.PENDING
        assert [c.status for c in fake_paypal.calls("GET")] == [429, 200]

    async def test_rate_limited_throughout(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await new_order(provider)
        fake_paypal.fail_next("rate_limit", times=3, path_prefix="/v2/", retry_after=0)
        with pytest.raises(ProviderUnavailable) as raised:
            await provider.verify_payment(payment_id)
        assert raised.value.retry_after_hint == 0
        assert raised.value.outcome_unknown is False  # a 429 did nothing: safe to go elsewhere
        assert [c.status for c in fake_paypal.calls("GET")] == [429, 429, 429]

    async def test_a_long_retry_after_is_not_waited_out(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await new_order(provider)
        fake_paypal.fail_next("rate_limit", path_prefix="/v2/", retry_after=120)
        with pytest.raises(ProviderUnavailable) as raised:
            await provider.verify_payment(payment_id)
        assert raised.value.retry_after == 120
        assert raised.value.headers["Retry-After"] == "120"
        assert len(fake_paypal.calls("GET")) == 1

    async def test_a_rate_limited_create_still_makes_one_order(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        fake_paypal.fail_next("rate_limit", path_prefix="/v2/", retry_after=0)
        await new_order(provider)
        assert len(fake_paypal.orders) == 1


class TestOutages:
    @pytest.mark.parametrize("kind", ["server_error", "unavailable"])
    async def test_a_5xx_is_retried(
        self, provider: PayPalProvider, fake_paypal: FakePayPal, kind: str
    ) -> None:
        fake_paypal.fail_next(kind, path_prefix="/v2/")  # type: ignore[arg-type]
        result = await provider.create_payment_intent(intent_request())
        assert len(fake_paypal.orders) == 1
        assert order_id(result.payment_id) in fake_paypal.orders

    async def test_down_throughout(self, provider: PayPalProvider, fake_paypal: FakePayPal) -> None:
        fake_paypal.fail_next("unavailable", times=3, path_prefix="/v2/")
        with pytest.raises(ProviderUnavailable) as raised:
            await provider.create_payment_intent(intent_request())
        assert raised.value.status == 503
        assert raised.value.outcome_unknown is True  # a 5xx may have done the work
        assert len(fake_paypal.calls("POST", "/v2/checkout/orders")) == 3

    async def test_a_hung_call_times_out_and_the_retry_answers(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        payment_id = await new_order(provider)
        fake_paypal.fail_next("hang", path_prefix="/v2/")
        state = await provider.verify_payment(payment_id)
        assert state.status is PaymentStatus.PENDING
        assert len(fake_paypal.calls("GET")) == 2

    async def test_hung_throughout(
        self, make_provider: MakeProvider, fake_paypal: FakePayPal
    ) -> None:
        provider = make_provider(retry_policy=NO_RETRY)
        payment_id = await new_order(provider)
        fake_paypal.fail_next("hang", path_prefix="/v2/")
        with pytest.raises(ProviderUnavailable) as raised:
            await provider.verify_payment(payment_id)
        assert raised.value.outcome_unknown is True

    async def test_an_answer_lost_after_paypal_made_the_order(
        self, provider: PayPalProvider, fake_paypal: FakePayPal
    ) -> None:
        # PayPal makes the order, then the answer never arrives; the retry carries the same
        # PayPal-Request-Id and gets that order back instead of making a second one.
        fake_paypal.fail_next("hang_after", path_prefix="/v2/checkout/orders")
        result = await provider.create_payment_intent(intent_request())
        assert list(fake_paypal.orders) == [order_id(result.payment_id)]
        calls = fake_paypal.calls("POST", "/v2/checkout/orders")
        assert [c.replayed for c in calls] == [False, True]
        assert calls[0].request_id == calls[1].request_id

    async def test_nobody_listening(self, make_provider: MakeProvider) -> None:
        provider = make_provider(paypal_api_base=f"http://127.0.0.1:{free_port()}")
        with pytest.raises(ProviderUnavailable) as raised:
            await provider.verify_payment("pp_5O190127TN364715T")
        assert raised.value.outcome_unknown is False  # nothing was sent


class TestWhatIsLogged:
    async def test_failures_carry_paypals_debug_id(
        self,
        provider: PayPalProvider,
        fake_paypal: FakePayPal,
        provider_logs: pytest.LogCaptureFixture,
    ) -> None:
        payment_id = await new_order(provider)
        fake_paypal.approve(order_id(payment_id))
        fake_paypal.decline_next_capture("instrument_declined")
        with pytest.raises(PaymentDeclined) as raised:
            await provider.capture(payment_id, idempotency_key="capture-1")
        [call] = fake_paypal.calls("POST", f"/v2/checkout/orders/{order_id(payment_id)}/capture")
        [record] = logged(provider_logs, "paypal.order.capture_declined")
        assert record.__dict__["paypal_debug_id"] == call.debug_id
        assert record.__dict__["paypal_issue"] == "INSTRUMENT_DECLINED"
        assert record.__dict__["payment_id"] == payment_id
        # PayPal's own words stay in the logs; the client reads ours.
        assert "instrument presented" in record.__dict__["paypal_description"]
        assert "instrument presented" not in raised.value.detail

    async def test_an_unknown_order_is_logged_with_its_debug_id(
        self,
        provider: PayPalProvider,
        fake_paypal: FakePayPal,
        provider_logs: pytest.LogCaptureFixture,
    ) -> None:
        with pytest.raises(Exception, match="No payment"):
            await provider.verify_payment("pp_5O190127TN364715T")
        [call] = fake_paypal.calls("GET")
        [record] = logged(provider_logs, "paypal.order.get_failed")
        assert (record.__dict__["http_status"], record.__dict__["paypal_debug_id"]) == (
            404,
            call.debug_id,
        )
        assert record.__dict__["paypal_name"] == "RESOURCE_NOT_FOUND"
