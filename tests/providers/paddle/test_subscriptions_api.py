"""A Paddle subscription through the service's HTTP API: Paddle's checkout transaction, its
signed events, entitlements, a renewal and a cancel at period end; the fake Paddle checks every
request against Paddle's description."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import bearer
from tests.fakes.paddle_server import FakePaddle

from .conftest import TIMEOUT_S, paddle_environment

PLANS = {"pro-monthly": {"name": "Pro", "amount": 2900, "currency": "EUR", "interval": "month"}}


@pytest.fixture
def settings_overrides(fake: FakePaddle, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    for name, value in paddle_environment(fake).items():
        if value is not None:
            monkeypatch.setenv(name, value)
    return {
        "provider_timeout_seconds": TIMEOUT_S,
        "payment_plans": PLANS,
        "plan_sync_on_start": False,
    }


async def _deliver(client: httpx.AsyncClient, fake: FakePaddle, event_type: str) -> None:
    body, headers = fake.signed_delivery(fake.last_event(event_type))
    response = await client.post("/api/v1/payment/webhook/paddle", content=body, headers=headers)
    assert response.status_code == 200, response.text


async def test_subscribe_renew_and_cancel_at_period_end(
    client: httpx.AsyncClient, fake: FakePaddle, token: Any
) -> None:
    alice = bearer(token("alice", email="alice@example.com"))
    created = await client.post(
        "/api/v1/subscriptions",
        json={"plan": "pro-monthly", "provider": "paddle"},
        headers={**alice, "Idempotency-Key": "sub-paddle-1"},
    )
    assert created.status_code == 201, created.text
    sub_id = created.json()["subscription_id"]
    assert created.json()["status"] == "incomplete"
    checkout = next(
        t
        for t in fake.transactions.values()
        if t["checkout"]["url"] == created.json()["redirect_url"]
    )

    # The customer pays on Paddle Checkout; Paddle makes the subscription and tells us.
    paid = fake.pay(checkout["id"])
    for event_type in ("subscription.created", "subscription.activated", "transaction.completed"):
        await _deliver(client, fake, event_type)
    shown = (await client.get(f"/api/v1/subscriptions/{sub_id}", headers=alice)).json()
    assert shown["status"] == "active", shown
    assert "pro-monthly" in str((await client.get("/api/v1/entitlements", headers=alice)).json())

    # A renewal: Paddle bills the next period.
    fake.renew(str(paid["subscription_id"]))
    await _deliver(client, fake, "transaction.completed")
    renewed = (await client.get(f"/api/v1/subscriptions/{sub_id}", headers=alice)).json()
    assert renewed["status"] == "active"
    assert len(renewed["payments"]) == 2

    # Cancel at period end: a scheduled change at Paddle, entitled until it takes effect.
    canceled = await client.post(f"/api/v1/subscriptions/{sub_id}/cancel", json={}, headers=alice)
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["cancel_at_period_end"] is True
    assert "pro-monthly" in str((await client.get("/api/v1/entitlements", headers=alice)).json())
