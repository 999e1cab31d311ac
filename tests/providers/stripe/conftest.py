"""Fixtures: one fake Stripe for the session (reset before each test, and checked after it
for requests that Stripe's API description does not allow), and the real ``StripeProvider``
built as the app builds it (settings become its config and secret models in
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
from services.payment_providers.resilience import RetryPolicy
from services.payment_providers.stripe import StripeProvider
from services.payment_providers.stripe.provider import StripeConfig, StripeSecrets
from services.payment_store import key_values
from services.provider_configs import StoredProvider
from tests.conftest import STRIPE_SECRET_KEY
from tests.fakes.stripe_server import FakeStripe

SECRET_KEY = STRIPE_SECRET_KEY
PUBLISHABLE_KEY = "pk_test_51FakeKeyForTheFakeStripe0123456789"
WEBHOOK_SECRET = "whsec_test_0123456789abcdef"
# Short waits keep the suite fast; attempts stay at 3 so that retries are exercised.
FAST_RETRIES = RetryPolicy(attempts=3, base_delay=0.01, max_delay=2.0)
TIMEOUT_S = 0.5

BASIC = Plan(code="basic", name="Basic", amount=1900, currency="EUR")
PRO = Plan(code="pro", name="Pro", amount=2900, currency="EUR")

MakeProvider = Callable[..., StripeProvider]


def stripe_settings(fake: FakeStripe, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "stripe_secret_key": SECRET_KEY,
        "stripe_publishable_key": PUBLISHABLE_KEY,
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "stripe_api_base": fake.url,
        "provider_timeout_seconds": TIMEOUT_S,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def build_provider(
    settings: Settings,
    deps: ProviderDeps,
    stored: StoredProvider | None = None,
    *,
    retry_policy: RetryPolicy | None = None,
) -> StripeProvider:
    """The provider as the app builds it: ``settings`` (and ``stored`` over them) become its
    config and secret models in ``app.provider_settings``, then ``from_config``."""
    models = ProviderSettings(settings, {StripeProvider.name: StripeProvider}).configure(
        StripeProvider, stored
    )
    return StripeProvider.from_config(
        cast(StripeConfig | None, models.config),
        cast(StripeSecrets | None, models.secrets),
        dataclasses.replace(deps, timeout_s=settings.provider_timeout_seconds),
        retry_policy=retry_policy,
    )


@pytest.fixture
def provider_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of the ``payments`` loggers, at INFO, captured straight from that logger: the
    app's logging setup stops it propagating to the root, where caplog listens."""
    logger = logging.getLogger("payments")
    saved = (logger.level, logger.propagate)
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # or a record would be captured twice when it does propagate
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.level, logger.propagate = saved


def logged(logs: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [record for record in logs.records if record.getMessage() == event]


@pytest.fixture
async def deps() -> AsyncIterator[ProviderDeps]:
    # A Redis client for a port where nothing listens: the Stripe provider must not use it.
    redis = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    async with httpx2.AsyncClient() as http:
        yield ProviderDeps(key_value=key_values(redis, "test:"), http=http)
    await redis.aclose()


@pytest.fixture
async def make_provider(fake_stripe: FakeStripe, deps: ProviderDeps) -> AsyncIterator[MakeProvider]:
    """Builds providers the way the factory does; each is closed after the test."""
    built: list[StripeProvider] = []

    def make(retry_policy: RetryPolicy = FAST_RETRIES, **overrides: Any) -> StripeProvider:
        provider = build_provider(
            stripe_settings(fake_stripe, **overrides), deps, retry_policy=retry_policy
        )
        built.append(provider)
        return provider

    yield make
    for provider in built:
        await provider.aclose()


@pytest.fixture
def provider(make_provider: MakeProvider) -> StripeProvider:
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


def refund_id(n: int) -> str:
    """One of our refund ids (``rf_`` + 24 hex characters), the n-th of a test."""
    return f"rf_{n:024x}"
