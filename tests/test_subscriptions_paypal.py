"""A PayPal subscription through the service's HTTP API: PayPal's approval link, its signed
events (verified with PayPal's verify-webhook-signature call), entitlements, a renewal, and a
cancel at period end (which PayPal has not: emulated by a suspension)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import bearer
from tests.fakes.paypal_server import FakePayPal, running_fake_paypal
from tests.paypal_api_support import paypal_overrides
from tests.providers.paypal.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    WEBHOOK_ID,
    assert_no_violations,
)

PLANS = {"pro-monthly": {"name": "Pro", "amount": 2900, "currency": "EUR", "interval": "month"}}


@pytest.fixture(scope="module")
def paypal_billing() -> Iterator[FakePayPal]:
    with running_fake_paypal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as fake:
        yield fake


@pytest.fixture
def fake(paypal_billing: FakePayPal) -> Iterator[FakePayPal]:
    paypal_billing.reset()
    yield paypal_billing
    try:
        assert_no_violations(paypal_billing)
    finally:
        paypal_billing.reset()


@pytest.fixture
def settings_overrides(fake: FakePayPal) -> dict[str, Any]:
    return paypal_overrides(
        fake,
        payment_plans=PLANS,
        plan_sync_on_start=False,
        provider_timeout_seconds=2.0,
        return_url_hosts=["shop.example"],
    )


async def _deliver(client: httpx.AsyncClient, fake: FakePayPal, event_type: str) -> None:
    body, headers = fake.signed_delivery(fake.last_event(event_type), WEBHOOK_ID)
    response = await client.post("/api/v1/payment/webhook/paypal", content=body, headers=headers)
    assert response.status_code == 200, response.text


async def test_approve_renew_and_cancel_at_period_end(
    client: httpx.AsyncClient, fake: FakePayPal, token: Any
) -> None:
    alice = bearer(token("alice", email="alice@example.com"))
    created = await client.post(
        "/api/v1/subscriptions",
        json={
            "plan": "pro-monthly",
            "provider": "paypal",
            "return_url": "https://shop.example/welcome",
            "cancel_url": "https://shop.example/plans",
        },
        headers={**alice, "Idempotency-Key": "sub-paypal-1"},
    )
    assert created.status_code == 201, created.text
    sub_id = created.json()["subscription_id"]
    assert created.json()["status"] == "incomplete"
    vendor_id = next(
        s["id"]
        for s in fake.subscriptions.values()
        if any(link["href"] == created.json()["redirect_url"] for link in s.get("links", []))
    )

    # The buyer approves on PayPal; PayPal activates it and bills the first cycle.
    fake.approve_subscription(vendor_id)
    for event_type in ("BILLING.SUBSCRIPTION.ACTIVATED", "PAYMENT.SALE.COMPLETED"):
        await _deliver(client, fake, event_type)
    shown = (await client.get(f"/api/v1/subscriptions/{sub_id}", headers=alice)).json()
    assert shown["status"] == "active", shown
    assert "pro-monthly" in str((await client.get("/api/v1/entitlements", headers=alice)).json())

    # A renewal, paid.
    fake.renew(vendor_id)
    await _deliver(client, fake, "PAYMENT.SALE.COMPLETED")
    renewed = (await client.get(f"/api/v1/subscriptions/{sub_id}", headers=alice)).json()
    assert renewed["status"] == "active"
    assert len(renewed["payments"]) == 2

    # Cancel at period end: still entitled until then.
    canceled = await client.post(f"/api/v1/subscriptions/{sub_id}/cancel", json={}, headers=alice)
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["cancel_at_period_end"] is True
    assert canceled.json()["status"] == "active"
    assert "pro-monthly" in str((await client.get("/api/v1/entitlements", headers=alice)).json())
