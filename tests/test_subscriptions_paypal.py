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


# -- refunds of a subscription's payments (Payments v1 sales) ----------------------------------


@pytest.fixture
def admin(token: Any) -> dict[str, str]:
    return bearer(token("ops", admin=True))


async def _renewal(client: httpx.AsyncClient, fake: FakePayPal, token: Any) -> str:
    """A subscription approved, billed and renewed at PayPal: the renewal's payment id."""
    alice = bearer(token("alice", email="alice@example.com"))
    created = await client.post(
        "/api/v1/subscriptions",
        json={"plan": "pro-monthly", "provider": "paypal"},
        headers={**alice, "Idempotency-Key": "sub-paypal-refund"},
    )
    assert created.status_code == 201, created.text
    vendor_id = next(iter(fake.subscriptions))
    fake.approve_subscription(vendor_id)
    for event_type in ("BILLING.SUBSCRIPTION.ACTIVATED", "PAYMENT.SALE.COMPLETED"):
        await _deliver(client, fake, event_type)
    fake.renew(vendor_id)
    await _deliver(client, fake, "PAYMENT.SALE.COMPLETED")
    shown = await client.get(
        f"/api/v1/subscriptions/{created.json()['subscription_id']}", headers=alice
    )
    sale_id = fake.last_event("PAYMENT.SALE.COMPLETED")["resource"]["id"]
    payment_id = f"pp_sale_{sale_id}"
    assert payment_id in str(shown.json()["payments"]), shown.json()
    return payment_id


async def _refund(
    client: httpx.AsyncClient, payment_id: str, admin: dict[str, str], key: str, **body: Any
) -> httpx.Response:
    return await client.post(
        f"/api/v1/payment/{payment_id}/refund",
        json=body,
        headers={**admin, "Idempotency-Key": key},
    )


class TestRefundARenewal:
    async def test_in_full_with_a_credit_note(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any, admin: Any, app: Any
    ) -> None:
        payment_id = await _renewal(client, fake, token)
        alice = bearer(token("alice", email="alice@example.com"))
        receipt = await client.get(f"/api/v1/payment/receipt/{payment_id}", headers=alice)
        assert receipt.status_code == 200, receipt.text
        refunded = await _refund(client, payment_id, admin, "full-1", reason="unused month")
        assert refunded.status_code == 200, refunded.text
        assert refunded.json()["refund"]["status"] == "succeeded"
        assert refunded.json()["refund"]["amount"] == 2900
        assert refunded.json()["status"] == "refunded"
        [call] = fake.calls(
            "POST", f"/v1/payments/sale/{payment_id.removeprefix('pp_sale_')}/refund"
        )
        assert call.body == {
            "amount": {"total": "29.00", "currency": "EUR"},
            "invoice_number": refunded.json()["refund"]["refund_id"],
            "reason": "unused month",
        }
        assert call.request_id == refunded.json()["refund"]["refund_id"]
        # PayPal's own event about it finds the refund we hold: nothing is counted twice.
        await _deliver(client, fake, "PAYMENT.SALE.REFUNDED")
        await app.state.receipts.drain()
        meta = (await client.get(f"/api/v1/payment/receipt/{payment_id}", headers=alice)).json()
        [note] = meta["credit_notes"]
        assert note["amount"] == 2900
        listing = (await client.get(f"/api/v1/payment/{payment_id}/refunds", headers=admin)).json()
        assert listing["amount_refunded"] == 2900 and len(listing["refunds"]) == 1

    async def test_in_parts_and_a_retry_refunds_once(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any, admin: Any
    ) -> None:
        payment_id = await _renewal(client, fake, token)
        first = await _refund(client, payment_id, admin, "part-1", amount=1000)
        assert first.status_code == 200, first.text
        again = await _refund(client, payment_id, admin, "part-1", amount=1000)
        assert again.status_code == 200, again.text
        assert again.json()["refund"]["refund_id"] == first.json()["refund"]["refund_id"]
        second = await _refund(client, payment_id, admin, "part-2", amount=900)
        assert second.status_code == 200, second.text
        assert second.json()["status"] == "partially_refunded"
        assert second.json()["amount_refunded"] == 1900
        assert len(fake.sale_refunds) == 2
        sale = fake.sales[payment_id.removeprefix("pp_sale_")]
        assert sale["state"] == "partially_refunded"

    async def test_above_the_balance_is_refused_before_paypal_is_asked(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any, admin: Any
    ) -> None:
        payment_id = await _renewal(client, fake, token)
        assert (await _refund(client, payment_id, admin, "a", amount=2000)).status_code == 200
        refused = await _refund(client, payment_id, admin, "b", amount=1000)
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "refund_exceeds_balance"
        assert refused.json()["left"] == 900
        sale_id = payment_id.removeprefix("pp_sale_")
        assert len(fake.calls("POST", f"/v1/payments/sale/{sale_id}/refund")) == 1

    async def test_paypal_refusing_more_than_is_left_is_refund_exceeds_balance(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any, admin: Any
    ) -> None:
        # PayPal's view ahead of ours (a refund made at PayPal whose event has not come).
        payment_id = await _renewal(client, fake, token)
        fake.refund_sale_at_paypal(payment_id.removeprefix("pp_sale_"), "20.00")
        refused = await _refund(client, payment_id, admin, "c", amount=1000)
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "refund_exceeds_balance"
        listing = (await client.get(f"/api/v1/payment/{payment_id}/refunds", headers=admin)).json()
        assert listing["refunds"] == [] and listing["amount_pending_refund"] == 0

    async def test_pending_stays_pending_until_paypal_settles_it(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any, admin: Any
    ) -> None:
        payment_id = await _renewal(client, fake, token)
        fake.pend_next_sale_refund()
        pending = await _refund(client, payment_id, admin, "slow", amount=1500)
        assert pending.status_code == 202, pending.text
        assert pending.json()["refund"]["status"] == "pending"
        shown = (await client.get(f"/api/v1/payment/{payment_id}/refunds", headers=admin)).json()
        assert shown["amount_pending_refund"] == 1500 and shown["amount_refunded"] == 0
        [paypal_refund] = fake.sale_refunds
        fake.settle_sale_refund(paypal_refund)
        await _deliver(client, fake, "PAYMENT.SALE.REFUNDED")
        settled = (await client.get(f"/api/v1/payment/{payment_id}/refunds", headers=admin)).json()
        assert settled["amount_refunded"] == 1500 and settled["amount_pending_refund"] == 0
        assert [r["status"] for r in settled["refunds"]] == ["succeeded"]

    async def test_a_refund_made_at_paypal_is_adopted(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any, admin: Any
    ) -> None:
        payment_id = await _renewal(client, fake, token)
        sale_id = payment_id.removeprefix("pp_sale_")
        fake.refund_sale_at_paypal(sale_id, "5.00")
        await _deliver(client, fake, "PAYMENT.SALE.REFUNDED")
        listing = (await client.get(f"/api/v1/payment/{payment_id}/refunds", headers=admin)).json()
        assert listing["amount_refunded"] == 500
        [adopted] = listing["refunds"]
        assert adopted["reason"] == "made at the provider"
