"""Fixtures: one fake Flutterwave for the session (reset before each test, and checked after
it for requests that depart from Flutterwave's v3 reference), and the app configured for it as
a merchant would, through ``FLUTTERWAVE_*`` environment variables (they are not ``Settings``
fields: ``app.provider_settings`` reads them by the provider's prefix). Plans are priced in
NGN."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jose import jwt

from tests.conftest import JWT_SECRET, bearer
from tests.fakes.flutterwave_server import FakeFlutterwave, running_fake_flutterwave

SECRET_KEY = "FLWSECK_TEST-0123456789abcdef0123456789abcdef-X"
SECRET_HASH = "a-long-random-secret-hash-0123456789"
API = "/api/v1/payment"
WEBHOOK_URL = f"{API}/webhook/flutterwave"
TIMEOUT_S = 0.5
PRO_NGN = 4_500_000  # ₦45,000.00 in kobo
NGN_PLANS = {
    "pro": {"name": "Pro", "amount": PRO_NGN, "currency": "NGN"},
    "basic": {"name": "Basic", "amount": 1_250_050, "currency": "NGN"},
}


@pytest.fixture(scope="session")
def flutterwave_server() -> Iterator[FakeFlutterwave]:
    with running_fake_flutterwave(secret_key=SECRET_KEY, secret_hash=SECRET_HASH) as fake:
        yield fake


@pytest.fixture
def fake(flutterwave_server: FakeFlutterwave) -> Iterator[FakeFlutterwave]:
    flutterwave_server.reset()
    yield flutterwave_server
    try:
        violations = list(flutterwave_server.violations)
        assert not violations, "departures from Flutterwave's v3 reference:\n" + "\n".join(
            str(v) for v in violations
        )
    finally:
        flutterwave_server.reset()


@pytest.fixture
def flutterwave_environment(
    fake: FakeFlutterwave, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """What a merchant sets (with the API base pointed at the fake). Tests change it before
    the app starts."""
    values = {
        "FLUTTERWAVE_SECRET_KEY": SECRET_KEY,
        "FLUTTERWAVE_SECRET_HASH": SECRET_HASH,
        "FLUTTERWAVE_PUBLIC_KEY": "FLWPUBK_TEST-0123456789abcdef0123456789abcdef-X",
        "FLUTTERWAVE_API_BASE": fake.url,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def settings_overrides(flutterwave_environment: dict[str, str]) -> dict[str, Any]:
    return {"payment_plans": NGN_PLANS, "provider_timeout_seconds": TIMEOUT_S}


def token_with_email(sub: str, email: str | None) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + 600}
    if email is not None:
        claims["email"] = email
    return str(jwt.encode(claims, JWT_SECRET, algorithm="HS256"))


async def create(
    client: httpx.AsyncClient, *, token: str | None = None, plan: str = "pro", **body: Any
) -> httpx.Response:
    return await client.post(
        f"{API}/create-intent",
        json={
            "plan": plan,
            "provider": "flutterwave",
            "return_url": "https://shop.example/thanks",
            **body,
        },
        headers=bearer(token) if token else {},
    )


async def created(client: httpx.AsyncClient, **kwargs: Any) -> str:
    kwargs.setdefault("customer_email", "ada@example.com")
    response = await create(client, **kwargs)
    assert response.status_code == 201, response.text
    payment_id: str = response.json()["payment_id"]
    return payment_id


def tx_ref(payment_id: str) -> str:
    assert payment_id.startswith("flw_"), payment_id
    return payment_id.removeprefix("flw_")


async def verify(
    client: httpx.AsyncClient, payment_id: str, *, token: str | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/verify", json={"payment_id": payment_id}, headers=bearer(token) if token else {}
    )


async def paid(client: httpx.AsyncClient, fake: FakeFlutterwave, **kwargs: Any) -> str:
    payment_id = await created(client, **kwargs)
    fake.pay(tx_ref(payment_id))
    response = await verify(client, payment_id, token=kwargs.get("token"))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    return payment_id


async def refund(
    client: httpx.AsyncClient, payment_id: str, token: str, amount: int | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/{payment_id}/refund",
        json={} if amount is None else {"amount": amount},
        headers=bearer(token),
    )
