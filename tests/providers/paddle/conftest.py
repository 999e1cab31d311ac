"""Fixtures: one fake Paddle for the session (reset before each test, and checked after it for
requests or answers that Paddle's OpenAPI description does not allow); the app started with
its Paddle settings pointed at the fake (PADDLE_* are read from the environment, as the
provider's settings are); and the real ``PaddleProvider`` built as the app builds it, for the
tests that call it directly."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import httpx
import httpx2
import pytest
from redis.asyncio import Redis

from app.provider_settings import ProviderSettings
from app.settings import Settings
from models.payment import Plan
from services.payment_providers.base import IntentRequest, ProviderDeps
from services.payment_providers.paddle import PaddleProvider
from services.payment_providers.paddle.provider import PaddleConfig, PaddleSecrets
from services.payment_providers.resilience import RetryPolicy
from services.payment_store import key_values
from tests.conftest import bearer
from tests.fakes.paddle_server import FakePaddle, running_fake_paddle

API_KEY = "pdl_sdbx_apikey_01fakekeyforthefakepaddle0123456789"
WEBHOOK_SECRET = "pdl_ntfset_01hs0t3tw21j988db1pam5xg8m_FakeSecretOfTheFakePaddle"
TIMEOUT_S = 0.5
FAST_RETRIES = RetryPolicy(attempts=3, base_delay=0.01, max_delay=2.0)
API = "/api/v1/payment"
WEBHOOK_URL = f"{API}/webhook/paddle"

BASIC = Plan(code="basic", name="Basic", amount=1900, currency="EUR")


@pytest.fixture(scope="session")
def paddle_server() -> Iterator[FakePaddle]:
    with running_fake_paddle(api_key=API_KEY, webhook_secret=WEBHOOK_SECRET) as fake:
        yield fake


@pytest.fixture
def fake(paddle_server: FakePaddle) -> Iterator[FakePaddle]:
    paddle_server.reset()
    yield paddle_server
    try:
        assert_no_violations(paddle_server)
    finally:
        paddle_server.reset()


def assert_no_violations(fake: FakePaddle) -> None:
    violations = list(fake.violations)
    assert not violations, "departures from Paddle's API description:\n" + "\n".join(
        str(v) for v in violations
    )


def paddle_environment(fake: FakePaddle, **overrides: str | None) -> dict[str, str | None]:
    values: dict[str, str | None] = {
        "PADDLE_API_KEY": API_KEY,
        "PADDLE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PADDLE_VENDOR_ID": "12345",
        "PADDLE_API_BASE": fake.url,
    }
    values.update(overrides)
    return values


@pytest.fixture
def paddle_env() -> dict[str, str | None]:
    """Override in a test (or a class) to change the PADDLE_* settings: values over the
    defaults of ``paddle_environment``; None unsets one."""
    return {}


@pytest.fixture
def settings_overrides(
    fake: FakePaddle, paddle_env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    for name, value in paddle_environment(fake, **paddle_env).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return {"provider_timeout_seconds": TIMEOUT_S}


# -- the provider on its own ------------------------------------------------------------------


@pytest.fixture
async def deps() -> AsyncIterator[ProviderDeps]:
    # A Redis client for a port where nothing listens: the Paddle provider must not use it.
    redis = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    async with httpx2.AsyncClient() as http:
        yield ProviderDeps(key_value=key_values(redis, "test:"), http=http, timeout_s=TIMEOUT_S)
    await redis.aclose()


def build_provider(
    fake: FakePaddle,
    deps: ProviderDeps,
    monkeypatch: pytest.MonkeyPatch,
    *,
    retry_policy: RetryPolicy = FAST_RETRIES,
    **environment: str | None,
) -> PaddleProvider:
    """The provider as the app builds it: PADDLE_* become its config and secret models in
    ``app.provider_settings``, then ``from_config``."""
    for name, value in paddle_environment(fake, **environment).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None, environment="test")  # type: ignore[call-arg]
    models = ProviderSettings(settings, {PaddleProvider.name: PaddleProvider}).configure(
        PaddleProvider, None
    )
    return PaddleProvider.from_config(
        cast(PaddleConfig | None, models.config),
        cast(PaddleSecrets | None, models.secrets),
        dataclasses.replace(deps),
        retry_policy=retry_policy,
    )


@pytest.fixture
def provider(
    fake: FakePaddle, deps: ProviderDeps, monkeypatch: pytest.MonkeyPatch
) -> PaddleProvider:
    return build_provider(fake, deps, monkeypatch)


def intent_request(*, plan: Plan = BASIC, **fields: Any) -> IntentRequest:
    reference = f"ord_{secrets.token_hex(12)}"
    return IntentRequest(
        reference=reference,
        plan=plan,
        idempotency_key=f"create-{reference}",
        base_url="https://payments.example.com",
        **fields,
    )


# -- through the HTTP API ---------------------------------------------------------------------


async def create(
    client: httpx.AsyncClient, *, plan: str = "pro", token: str | None = None, **body: Any
) -> httpx.Response:
    return await client.post(
        f"{API}/create-intent",
        json={"plan": plan, "provider": "paddle", **body},
        headers=bearer(token) if token else {},
    )


async def paddle_payment(client: httpx.AsyncClient, *, token: str | None = None) -> str:
    response = await create(client, token=token)
    assert response.status_code == 201, response.text
    payment_id: str = response.json()["payment_id"]
    return payment_id


async def pay_at_paddle(fake: FakePaddle, payment_id: str, outcome: str = "paid") -> None:
    """The customer on Paddle Checkout (the fake's test-only control endpoint)."""
    async with httpx.AsyncClient(base_url=fake.url) as browser:
        answer = await browser.post(
            f"/__fake/transactions/{payment_id}/pay", data={"outcome": outcome}
        )
    assert answer.status_code == 204, answer.text


async def verify(
    client: httpx.AsyncClient, payment_id: str, *, token: str | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/verify", json={"payment_id": payment_id}, headers=bearer(token) if token else {}
    )


async def refund(
    client: httpx.AsyncClient, payment_id: str, token: str, amount: int | None = None, **extra: Any
) -> httpx.Response:
    return await client.post(
        f"{API}/{payment_id}/refund",
        json={"amount": amount, **extra} if amount is not None else extra,
        headers=bearer(token),
    )


async def deliver(
    client: httpx.AsyncClient,
    fake: FakePaddle,
    event: dict[str, Any] | bytes,
    *,
    secrets: list[str] | None = None,
    timestamp: int | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body, signed = fake.signed_delivery(event, secrets=secrets, timestamp=timestamp)
    return await client.post(WEBHOOK_URL, content=body, headers=headers or signed)
