"""Fixtures: one fake PayPal for the session (reset before each test, and checked after it
for requests or answers that PayPal's API descriptions do not allow), and the real
``PayPalProvider`` built as the app builds it (settings become its config and secret models in
``app.provider_settings``) to talk to it over loopback."""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import httpx2
import pytest
from redis.asyncio import Redis

from app.provider_settings import ProviderSettings
from app.settings import Settings
from models.payment import Plan
from services.payment_providers.base import IntentRequest, ProviderDeps
from services.payment_providers.paypal import PayPalProvider
from services.payment_providers.paypal.provider import PayPalConfig, PayPalSecrets
from services.payment_providers.resilience import RetryPolicy
from services.payment_store import key_values
from tests.fakes.paypal_server import FakePayPal, running_fake_paypal

CLIENT_ID = "AYfakeClientId0123456789abcdefghijklmnopqrstuvwxyz"
CLIENT_SECRET = "EFfakeClientSecret0123456789abcdefghijklmnopqrstuv"
WEBHOOK_ID = "1JE4291016473214C"
# Short waits keep the suite fast; attempts stay at 3 so that retries are exercised.
FAST_RETRIES = RetryPolicy(attempts=3, base_delay=0.01, max_delay=2.0)
TIMEOUT_S = 0.5

BASIC = Plan(code="basic", name="Basic", amount=1900, currency="EUR")
PRO = Plan(code="pro", name="Pro", amount=2900, currency="EUR")

MakeProvider = Callable[..., PayPalProvider]


@pytest.fixture(scope="session")
def paypal_server() -> Iterator[FakePayPal]:
    with running_fake_paypal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as fake:
        yield fake


@pytest.fixture
def fake_paypal(paypal_server: FakePayPal) -> Iterator[FakePayPal]:
    paypal_server.reset()
    yield paypal_server
    try:
        assert_no_violations(paypal_server)
    finally:
        paypal_server.reset()


def assert_no_violations(fake: FakePayPal) -> None:
    violations = list(fake.violations)
    assert not violations, "departures from PayPal's API descriptions:\n" + "\n".join(
        str(v) for v in violations
    )


def paypal_settings(fake: FakePayPal, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "paypal_client_id": CLIENT_ID,
        "paypal_client_secret": CLIENT_SECRET,
        "paypal_webhook_id": WEBHOOK_ID,
        "paypal_api_base": fake.url,
        "provider_timeout_seconds": TIMEOUT_S,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def build_provider(settings: Settings, deps: ProviderDeps, **options: Any) -> PayPalProvider:
    """The provider as the app builds it: ``settings`` become its config and secret models
    in ``app.provider_settings``, then ``from_config``."""
    models = ProviderSettings(settings, {PayPalProvider.name: PayPalProvider}).configure(
        PayPalProvider, None
    )
    return PayPalProvider.from_config(
        cast(PayPalConfig | None, models.config),
        cast(PayPalSecrets | None, models.secrets),
        dataclasses.replace(deps, timeout_s=settings.provider_timeout_seconds),
        **options,
    )


@pytest.fixture
def provider_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of the ``payments`` loggers, at INFO, captured straight from that logger: the
    app's logging setup stops it propagating to the root, where caplog listens."""
    logger = logging.getLogger("payments")
    saved = (logger.level, logger.propagate)
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.level, logger.propagate = saved


def logged(logs: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [record for record in logs.records if record.getMessage() == event]


@pytest.fixture
async def deps() -> AsyncIterator[ProviderDeps]:
    # A Redis client for a port where nothing listens: the PayPal provider must not use it.
    redis = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    async with httpx2.AsyncClient() as http:
        yield ProviderDeps(key_value=key_values(redis, "test:"), http=http)
    await redis.aclose()


@pytest.fixture
def make_provider(fake_paypal: FakePayPal, deps: ProviderDeps) -> MakeProvider:
    """Builds providers the way the factory does (the shared HTTP client is the app's)."""

    def make(
        retry_policy: RetryPolicy = FAST_RETRIES,
        clock: Callable[[], float] | None = None,
        **overrides: Any,
    ) -> PayPalProvider:
        extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
        return build_provider(
            paypal_settings(fake_paypal, **overrides), deps, retry_policy=retry_policy, **extra
        )

    return make


@pytest.fixture
def provider(make_provider: MakeProvider) -> PayPalProvider:
    return make_provider()


def intent_request(
    *,
    plan: Plan = BASIC,
    idempotency_key: str | None = None,
    reference: str | None = None,
    **fields: Any,
) -> IntentRequest:
    reference = reference or f"ord_{secrets.token_hex(12)}"
    return IntentRequest(
        reference=reference,
        plan=plan,
        idempotency_key=idempotency_key or f"create-{reference}",
        base_url="https://payments.example.com",
        **fields,
    )


def order_id(payment_id: str) -> str:
    assert payment_id.startswith("pp_")
    return payment_id[3:]


def refund_id(n: int) -> str:
    """One of our refund ids (``rf_`` + 24 hex characters), the n-th of a test."""
    return f"rf_{n:024x}"
