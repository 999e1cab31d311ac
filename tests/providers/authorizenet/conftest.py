"""Fixtures: one fake Authorize.Net for the session (reset before each test, checked after it
for requests that depart from the API reference), the app configured for it through the
environment (AUTHORIZENET_*, as an operator would), and helpers that play the buyer and
Authorize.Net's webhook deliveries."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import bearer
from tests.fakes.authorizenet_server import FakeAuthorizeNet, running_fake_authorizenet

LOGIN_ID = "5KP3u95bQpv"
TRANSACTION_KEY = "346HZ32z3fP4hTG2"
# As the merchant interface shows a Signature Key: 128 hex characters.
SIGNATURE_KEY = "A1B2C3D4E5F60718293A4B5C6D7E8F90" * 4
API = "/api/v1/payment"
WEBHOOK_URL = f"{API}/webhook/authorizenet"
TIMEOUT_S = 0.5


@pytest.fixture(scope="session")
def anet_server() -> Iterator[FakeAuthorizeNet]:
    with running_fake_authorizenet(
        login_id=LOGIN_ID, transaction_key=TRANSACTION_KEY, signature_key=SIGNATURE_KEY
    ) as fake:
        yield fake


@pytest.fixture
def fake(anet_server: FakeAuthorizeNet) -> Iterator[FakeAuthorizeNet]:
    anet_server.reset()
    yield anet_server
    try:
        assert not anet_server.violations, "\n".join(map(str, anet_server.violations))
    finally:
        anet_server.reset()


def anet_environment(fake: FakeAuthorizeNet, **overrides: str) -> dict[str, str]:
    return {
        "AUTHORIZENET_API_LOGIN_ID": LOGIN_ID,
        "AUTHORIZENET_TRANSACTION_KEY": TRANSACTION_KEY,
        "AUTHORIZENET_SIGNATURE_KEY": SIGNATURE_KEY,
        "AUTHORIZENET_ENVIRONMENT": "sandbox",
        "AUTHORIZENET_API_BASE": f"{fake.url}/xml/v1/request.api",
        "AUTHORIZENET_HOSTED_FORM_URL": f"{fake.url}/payment/payment",
        **overrides,
    }


@pytest.fixture
def anet_env_overrides() -> dict[str, str]:
    """Override in a test module (or parametrize) to change the Authorize.Net settings."""
    return {}


@pytest.fixture
def settings_overrides(
    fake: FakeAuthorizeNet, monkeypatch: pytest.MonkeyPatch, anet_env_overrides: dict[str, str]
) -> dict[str, Any]:
    for name, value in anet_environment(fake, **anet_env_overrides).items():
        monkeypatch.setenv(name, value)
    return {"provider_timeout_seconds": TIMEOUT_S, "reconcile_enabled": False}


async def create(
    client: httpx.AsyncClient, *, token: str | None = None, **body: Any
) -> httpx.Response:
    return await client.post(
        f"{API}/create-intent",
        json={"plan": "pro", "provider": "authorizenet", **body},
        headers=bearer(token) if token else {},
    )


async def new_payment(
    client: httpx.AsyncClient, *, token: str | None = None, **body: Any
) -> dict[str, Any]:
    response = await create(client, token=token, **body)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def hidden_token(html: str) -> str:
    match = re.search(r'name="token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


async def open_form(client: httpx.AsyncClient, payment: dict[str, Any]) -> str:
    """The buyer's browser follows redirect_url; the token our page posts."""
    path = httpx.URL(payment["redirect_url"]).path
    page = await client.get(path)
    assert page.status_code == 200, page.text
    return hidden_token(page.text)


async def pay(
    client: httpx.AsyncClient,
    fake: FakeAuthorizeNet,
    payment: dict[str, Any],
    outcome: str = "approved",
) -> str:
    """The buyer pays on Authorize.Net's form; the transaction's id."""
    token = await open_form(client, payment)
    return fake.pay(token, outcome).trans_id  # type: ignore[arg-type]


async def deliver(
    client: httpx.AsyncClient,
    fake: FakeAuthorizeNet,
    event: dict[str, Any],
    *,
    key: str | None = None,
) -> httpx.Response:
    body, headers = fake.signed_delivery(event, key=key)
    return await client.post(WEBHOOK_URL, content=body, headers=headers)


async def deliver_all(client: httpx.AsyncClient, fake: FakeAuthorizeNet) -> list[httpx.Response]:
    return [await deliver(client, fake, event) for event in list(fake.events)]


async def verify(
    client: httpx.AsyncClient, payment_id: str, *, token: str | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/verify", json={"payment_id": payment_id}, headers=bearer(token) if token else {}
    )
