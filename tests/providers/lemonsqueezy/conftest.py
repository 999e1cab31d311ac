"""Fixtures: one fake LemonSqueezy for the session (reset before each test, and checked after
it for requests that depart from LemonSqueezy's API reference), and the app configured for it
through the environment (``LEMON_*``, read by ``app.provider_settings`` as in production)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import bearer
from tests.fakes.lemonsqueezy_server import FakeLemonSqueezy, running_fake_lemonsqueezy

API_KEY = "lsk_test_0123456789abcdefghijklmnopqrstuvwxyz"
STORE_ID = "4242"
WEBHOOK_SECRET = "whsec-lemon-0123456789abcdef"
PRO_VARIANT = "101"
BASIC_VARIANT = "102"
TIMEOUT_S = 0.5

API = "/api/v1/payment"
WEBHOOK_URL = f"{API}/webhook/lemonsqueezy"


@pytest.fixture(scope="session")
def lemonsqueezy_server() -> Iterator[FakeLemonSqueezy]:
    with running_fake_lemonsqueezy(
        api_key=API_KEY,
        store_id=STORE_ID,
        variants={PRO_VARIANT: 2500, BASIC_VARIANT: 1500},
        webhook_secret=WEBHOOK_SECRET,
    ) as fake:
        yield fake


@pytest.fixture
def fake(lemonsqueezy_server: FakeLemonSqueezy) -> Iterator[FakeLemonSqueezy]:
    lemonsqueezy_server.reset()
    yield lemonsqueezy_server
    try:
        violations = list(lemonsqueezy_server.violations)
        assert not violations, "departures from LemonSqueezy's API reference:\n" + "\n".join(
            str(v) for v in violations
        )
    finally:
        lemonsqueezy_server.reset()


@pytest.fixture
def lemon_env(fake: FakeLemonSqueezy) -> dict[str, str]:
    """The LEMON_* settings that point the app at ``fake``; override in a test to change."""
    return {
        "LEMON_API_KEY": API_KEY,
        "LEMON_STORE_ID": STORE_ID,
        "LEMON_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "LEMON_VARIANTS": json.dumps({"pro": PRO_VARIANT}),
        "LEMON_API_BASE": fake.url,
    }


@pytest.fixture
def settings_overrides(
    monkeypatch: pytest.MonkeyPatch, lemon_env: dict[str, str]
) -> dict[str, Any]:
    # LemonSqueezy's settings are not declared in Settings: the app reads them from the
    # environment, as it would in production.
    for name in ("LEMON_API_KEY", "LEMON_STORE_ID", "LEMON_WEBHOOK_SECRET", "LEMON_VARIANTS",
                 "LEMON_API_BASE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in lemon_env.items():
        monkeypatch.setenv(name, value)
    return {"provider_timeout_seconds": TIMEOUT_S}


async def create(
    client: httpx.AsyncClient, *, plan: str = "pro", token: str | None = None, **body: Any
) -> httpx.Response:
    return await client.post(
        f"{API}/create-intent",
        json={"plan": plan, "provider": "lemonsqueezy", **body},
        headers=bearer(token) if token else {},
    )


async def verify(client: httpx.AsyncClient, payment_id: str, token: str) -> httpx.Response:
    return await client.post(
        f"{API}/verify", json={"payment_id": payment_id}, headers=bearer(token)
    )


async def refund(
    client: httpx.AsyncClient, payment_id: str, admin: str, amount: int | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/{payment_id}/refund",
        json={} if amount is None else {"amount": amount},
        headers=bearer(admin),
    )


async def deliver(
    client: httpx.AsyncClient,
    fake: FakeLemonSqueezy,
    event: dict[str, Any] | bytes,
    *,
    secret: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """LemonSqueezy's POST of ``event`` to our webhook, signed with the signing secret (or
    ``secret``, to forge one)."""
    body, signed = fake.signed_delivery(event, secret=secret)
    return await client.post(WEBHOOK_URL, content=body, headers={**signed, **(headers or {})})


def checkout_id(fake: FakeLemonSqueezy, redirect_url: str) -> str:
    [found] = [cid for cid, c in fake.checkouts.items() if c["attributes"]["url"] == redirect_url]
    return found
