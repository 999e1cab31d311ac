"""Paystack through the service's HTTP API: the real app, Redis and WeasyPrint, and the real
``PaystackProvider`` talking over loopback to the fake Paystack, which checks every request
(and its own answers) against Paystack's OpenAPI description.

The provider is configured as an operator would: ``PAYSTACK_*`` in the environment. The plans
are priced in naira with today's one-currency ``PAYMENT_PLANS`` form. Only Paystack's side is
played by hand: the customer pays on the fake's checkout page (``fake.pay``), Paystack's
webhook deliveries are posted with its signature, and the fake's controls make it fail."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from jose import jwt

from app.settings import Settings
from tests.conftest import bearer
from tests.fakes.paystack_server import FakePaystack, running_fake_paystack

SECRET_KEY = "sk_test_4b1f0c9e2d7a6358f1e0c2b9a8d7e6f5c4b3a291"
PUBLIC_KEY = "pk_test_9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b"
TIMEOUT_S = 0.5
# A plan is priced in kobo: 4 500 000 kobo is ₦45,000.00.
PLANS = {
    "pro": {"name": "Pro", "amount": 4500000, "currency": "NGN"},
    "basic": {"name": "Basic", "amount": 1500000, "currency": "NGN"},
}
API = "/api/v1/payment"
WEBHOOK_URL = f"{API}/webhook/paystack"


@pytest.fixture(scope="session")
def paystack_server() -> Iterator[FakePaystack]:
    with running_fake_paystack(secret_key=SECRET_KEY) as fake:
        yield fake


@pytest.fixture
def fake(paystack_server: FakePaystack) -> Iterator[FakePaystack]:
    """The fake Paystack, fresh for each test, and checked after it against Paystack's
    OpenAPI description (every request the app sent, every answer the fake gave)."""
    paystack_server.reset()
    yield paystack_server
    try:
        violations = list(paystack_server.violations)
        assert not violations, "departures from Paystack's API description:\n" + "\n".join(
            str(v) for v in violations
        )
    finally:
        paystack_server.reset()


@pytest.fixture
def paystack_env(fake: FakePaystack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What an operator sets to turn Paystack on (the API base only for the fake)."""
    env = {
        "PAYSTACK_SECRET_KEY": SECRET_KEY,
        "PAYSTACK_PUBLIC_KEY": PUBLIC_KEY,
        "PAYSTACK_API_BASE": fake.url,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def settings_overrides(paystack_env: dict[str, str]) -> dict[str, Any]:
    return {"payment_plans": PLANS, "provider_timeout_seconds": TIMEOUT_S}


@pytest.fixture
def provider_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Records of the ``payments`` loggers, at INFO, straight from that logger (the app's
    logging setup stops it propagating to the root, where caplog listens)."""
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


@pytest.fixture
def email_token(settings: Settings) -> Any:
    """A token as the merchant's identity provider issues it, with an ``email`` claim."""

    def make(sub: str = "ada", email: str | None = "ada@example.ng") -> str:
        now = datetime.now(UTC)
        claims: dict[str, Any] = {
            "sub": sub,
            "iat": int(now.timestamp()),
            "exp": int((now + timedelta(minutes=30)).timestamp()),
        }
        if email is not None:
            claims["email"] = email
        return str(
            jwt.encode(
                claims, settings.jwt_secret_key.get_secret_value(), algorithm=settings.jwt_algorithm
            )
        )

    return make


def reference(payment_id: str) -> str:
    assert payment_id.startswith("ps_"), payment_id
    return payment_id.removeprefix("ps_")


async def create(
    client: httpx.AsyncClient,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    body = {"plan": "pro", "provider": "paystack", **body}
    return await client.post(
        f"{API}/create-intent",
        json=body,
        headers={**(bearer(token) if token else {}), **(headers or {})},
    )


async def new_payment(client: httpx.AsyncClient, *, token: str | None = None, **body: Any) -> str:
    if token is None and "customer_email" not in body:
        body["customer_email"] = "ada@example.ng"
    response = await create(client, token=token, **body)
    assert response.status_code == 201, response.text
    payment_id: str = response.json()["payment_id"]
    return payment_id


async def verify(
    client: httpx.AsyncClient, payment_id: str, *, token: str | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/verify", json={"payment_id": payment_id}, headers=bearer(token) if token else {}
    )


async def paid_payment(
    client: httpx.AsyncClient, fake: FakePaystack, *, token: str | None = None, **body: Any
) -> str:
    """A payment the customer paid at Paystack, verified by the service."""
    payment_id = await new_payment(client, token=token, **body)
    fake.pay(reference(payment_id))
    verified = await verify(client, payment_id, token=token)
    assert verified.status_code == 200, verified.text
    assert verified.json()["status"] == "succeeded", verified.text
    return payment_id


async def refund(
    client: httpx.AsyncClient,
    payment_id: str,
    token: str,
    amount: int | None = None,
    *,
    key: str | None = None,
) -> httpx.Response:
    return await client.post(
        f"{API}/{payment_id}/refund",
        json={} if amount is None else {"amount": amount},
        headers={**bearer(token), **({"Idempotency-Key": key} if key else {})},
    )


async def deliver(
    client: httpx.AsyncClient, fake: FakePaystack, event: dict[str, Any] | bytes, **kwargs: Any
) -> httpx.Response:
    """Paystack's POST of ``event`` to our webhook, signed with our secret key (or
    ``key=``, to forge one)."""
    body, headers = fake.signed_delivery(event, **kwargs)
    return await client.post(WEBHOOK_URL, content=body, headers=headers)


def assert_nothing_from_paystack(response: httpx.Response) -> None:
    """Neither our secret key nor Paystack's own wording reaches a client."""
    for secret in (SECRET_KEY, "Invalid key", "Transaction reference not found", "Declined"):
        assert secret not in response.text, f"{secret!r} reached the client"
