"""Fixtures: one fake Vipps MobilePay for the session (reset before each test, and checked
after it for requests or answers that the ePayment description does not allow), and the app
configured for it through the environment (MOBILEPAY_* are read as a provider's settings,
not declared in ``Settings``), with plans priced in NOK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import bearer
from tests.fakes.mobilepay_server import FakeMobilePay, running_fake_mobilepay

CLIENT_ID = "fake-client-id-0123456789"
CLIENT_SECRET = "fake-client-secret-0123456789"
SUBSCRIPTION_KEY = "da7d5b0e18a84aeda961c0c31b75c2a9"
MSN = "123456"
WEBHOOK_SECRET = "090a478d-37ff-4e77-970e-d457aeb26a3a"
# The URL registered with the Webhooks API: the public one, in front of a proxy.
WEBHOOK_URL = "https://payments.example.com/hooks/mobilepay"
TIMEOUT_S = 0.5
ATTEMPTS = 3  # the provider's retries
API = "/api/v1/payment"
ROUTE = f"{API}/webhook/mobilepay"

NOK_PLANS = {
    "basic": {"name": "Basic", "amount": 19900, "currency": "NOK"},
    "pro": {"name": "Pro", "amount": 29900, "currency": "NOK"},
    "dollars": {"name": "Dollars", "amount": 2900, "currency": "USD"},
}


@pytest.fixture(scope="session")
def mobilepay_server() -> Iterator[FakeMobilePay]:
    with running_fake_mobilepay(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, subscription_key=SUBSCRIPTION_KEY, msn=MSN
    ) as fake:
        yield fake


@pytest.fixture
def fake(mobilepay_server: FakeMobilePay) -> Iterator[FakeMobilePay]:
    mobilepay_server.reset()
    yield mobilepay_server
    try:
        violations = list(mobilepay_server.violations)
        assert not violations, "departures from the ePayment description:\n" + "\n".join(
            str(v) for v in violations
        )
    finally:
        mobilepay_server.reset()


@pytest.fixture
def mobilepay_env() -> dict[str, str]:
    """Override in a test class to configure the provider otherwise."""
    return {}


@pytest.fixture
def settings_overrides(
    fake: FakeMobilePay, mobilepay_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    env = {
        "MOBILEPAY_CLIENT_ID": CLIENT_ID,
        "MOBILEPAY_CLIENT_SECRET": CLIENT_SECRET,
        "MOBILEPAY_SUBSCRIPTION_KEY": SUBSCRIPTION_KEY,
        "MOBILEPAY_MERCHANT_SALES_NUMBER": MSN,
        "MOBILEPAY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "MOBILEPAY_WEBHOOK_URL": WEBHOOK_URL,
        "MOBILEPAY_API_BASE": fake.url,
        **mobilepay_env,
    }
    for name, value in env.items():
        if value == "":
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return {"provider_timeout_seconds": TIMEOUT_S, "payment_plans": NOK_PLANS}


def reference(payment_id: str) -> str:
    assert payment_id.startswith("mp_"), payment_id
    return payment_id.removeprefix("mp_")


async def create(
    client: httpx.AsyncClient, *, token: str | None = None, plan: str = "pro", **body: Any
) -> httpx.Response:
    return await client.post(
        f"{API}/create-intent",
        json={"plan": plan, "provider": "mobilepay", **body},
        headers=bearer(token) if token else {},
    )


async def new_payment(
    client: httpx.AsyncClient, *, token: str | None = None, capture_method: str = "manual"
) -> str:
    response = await create(client, token=token, capture_method=capture_method)
    assert response.status_code == 201, response.text
    payment_id: str = response.json()["payment_id"]
    return payment_id


async def verify(
    client: httpx.AsyncClient, payment_id: str, token: str | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/verify", json={"payment_id": payment_id}, headers=bearer(token) if token else {}
    )


async def capture(
    client: httpx.AsyncClient, payment_id: str, amount: int | None = None, token: str | None = None
) -> httpx.Response:
    kwargs: dict[str, Any] = {} if amount is None else {"json": {"amount": amount}}
    return await client.post(
        f"{API}/{payment_id}/capture", headers=bearer(token) if token else {}, **kwargs
    )


async def refund(
    client: httpx.AsyncClient,
    payment_id: str,
    admin: str,
    amount: int | None = None,
    **headers: str,
) -> httpx.Response:
    return await client.post(
        f"{API}/{payment_id}/refund",
        json={} if amount is None else {"amount": amount},
        headers={**bearer(admin), **headers},
    )


async def authorized(client: httpx.AsyncClient, fake: FakeMobilePay, **kwargs: Any) -> str:
    """A payment the customer approved in the app, verified by the service."""
    payment_id = await new_payment(client, **kwargs)
    fake.authorize(reference(payment_id))
    response = await verify(client, payment_id, kwargs.get("token"))
    assert response.status_code == 200, response.text
    return payment_id
