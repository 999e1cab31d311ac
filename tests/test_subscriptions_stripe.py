"""A subscription on Stripe through the service's HTTP API: the real app, Redis and Stripe
SDK, the fake Stripe (checked against Stripe's API description) delivering signed events."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import bearer
from tests.fakes.stripe_server import FakeStripe
from tests.providers.stripe.conftest import PUBLISHABLE_KEY, SECRET_KEY, WEBHOOK_SECRET

PLANS = {
    "pro-monthly": {"name": "Pro", "amount": 2900, "currency": "EUR", "interval": "month"},
}


@pytest.fixture
def settings_overrides(fake_stripe: FakeStripe) -> dict[str, Any]:
    return {
        "payment_plans": PLANS,
        "stripe_secret_key": SECRET_KEY,
        "stripe_publishable_key": PUBLISHABLE_KEY,
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "stripe_api_base": fake_stripe.url,
        "provider_timeout_seconds": 2.0,
        "plan_sync_on_start": False,
        "return_url_hosts": ["shop.example"],
    }


async def _deliver(client: httpx.AsyncClient, fake: FakeStripe, event_type: str) -> None:
    """Stripe's delivery of the last ``event_type`` event, signed."""
    body, headers = FakeStripe.signed_delivery(fake.last_event(event_type), WEBHOOK_SECRET)
    response = await client.post("/api/v1/payment/webhook/stripe", content=body, headers=headers)
    assert response.status_code == 200, response.text


async def test_subscribe_pay_renew_and_cancel_at_period_end(
    client: httpx.AsyncClient, fake_stripe: FakeStripe, token: Any
) -> None:
    alice = bearer(token("alice", email="alice@example.com"))
    created = await client.post(
        "/api/v1/subscriptions",
        json={
            "plan": "pro-monthly",
            "provider": "stripe",
            "return_url": "https://shop.example/welcome",
            "cancel_url": "https://shop.example/plans",
        },
        headers={**alice, "Idempotency-Key": "sub-stripe-1"},
    )
    assert created.status_code == 201, created.text
    subscription = created.json()
    sub_id = subscription["subscription_id"]
    assert subscription["status"] == "incomplete"
    session = next(
        s for s in fake_stripe.sessions.values() if s["url"] == subscription["redirect_url"]
    )
    assert session["mode"] == "subscription"

    entitled = await client.get("/api/v1/entitlements", headers=alice)
    assert "pro-monthly" not in str(entitled.json())

    # The customer subscribes on Stripe's page; Stripe tells us.
    fake_stripe.complete_subscription_checkout(session["id"])
    for event_type in (
        "customer.subscription.created",
        "invoice.paid",
        "checkout.session.completed",
    ):
        await _deliver(client, fake_stripe, event_type)
    shown = (await client.get(f"/api/v1/subscriptions/{sub_id}", headers=alice)).json()
    assert shown["status"] == "active", shown
    entitled = await client.get("/api/v1/entitlements", headers=alice)
    assert "pro-monthly" in str(entitled.json())

    # A renewal, paid: a second period, and a payment for it with its receipt.
    stripe_sub = fake_stripe.renew(
        fake_stripe.last_event("customer.subscription.created")["data"]["object"]["id"]
    )
    await _deliver(client, fake_stripe, "invoice.paid")
    await _deliver(client, fake_stripe, "customer.subscription.updated")
    renewed = (await client.get(f"/api/v1/subscriptions/{sub_id}", headers=alice)).json()
    assert renewed["status"] == "active"
    assert renewed["current_period_end"] > shown["current_period_end"]
    # Each paid invoice is a payment of ours, with its receipt, in the subscription's name.
    assert len(renewed["payments"]) == 2 and all(p.startswith("pi_") for p in renewed["payments"])
    receipt = await client.get(f"/api/v1/payment/receipt/{renewed['payments'][-1]}", headers=alice)
    assert receipt.status_code == 200, receipt.text
    assert (receipt.json()["amount"], receipt.json()["currency"]) == (2900, "EUR")

    # Cancel at period end: still entitled until then, then canceled by Stripe's event.
    canceled = await client.post(f"/api/v1/subscriptions/{sub_id}/cancel", json={}, headers=alice)
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["cancel_at_period_end"] is True
    assert "pro-monthly" in str((await client.get("/api/v1/entitlements", headers=alice)).json())
    fake_stripe.renew(stripe_sub["id"])
    await _deliver(client, fake_stripe, "customer.subscription.deleted")
    ended = (await client.get(f"/api/v1/subscriptions/{sub_id}", headers=alice)).json()
    assert ended["status"] == "canceled"
    assert "pro-monthly" not in str(
        (await client.get("/api/v1/entitlements", headers=alice)).json()
    )
