"""Subscriptions on the sandbox, through the HTTP API: the lifecycle, renewals by the test
clock, invoices as payments, plan changes, events, entitlements, ownership and bad input."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import httpx
import pytest

from services.payment_providers.base import WebhookEvent
from tests.conftest import assert_problem, bearer

PLANS = {
    "pro": {"name": "Pro", "amount": 2900, "currency": "EUR"},
    "basic-monthly": {"name": "Basic", "prices": {"EUR": 900, "USD": 1000}, "interval": "month"},
    "pro-monthly": {"name": "Pro", "amount": 2900, "currency": "EUR", "interval": "month"},
    "pro-trial": {
        "name": "Pro with a trial",
        "amount": 2900,
        "currency": "EUR",
        "interval": "month",
        "trial_days": 14,
    },
}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"payment_plans": PLANS, "rate_limits_enabled": False}


@pytest.fixture
def alice(token: Any) -> dict[str, str]:
    return bearer(token("alice"))


@pytest.fixture
def admin(token: Any) -> dict[str, str]:
    return bearer(token("ops", admin=True))


async def subscribe(
    client: httpx.AsyncClient, headers: dict[str, str], plan: str = "basic-monthly", **body: Any
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/subscriptions", json={"plan": plan, **body}, headers=headers
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def sandbox_id(created: dict[str, Any]) -> str:
    return str(created["redirect_url"]).rsplit("/", 2)[-2]


async def start(
    client: httpx.AsyncClient, created: dict[str, Any], outcome: str = "succeeded"
) -> None:
    response = await client.post(
        f"/sandbox/subscriptions/{sandbox_id(created)}/checkout", data={"outcome": outcome}
    )
    assert response.status_code == 200, response.text


async def advance(client: httpx.AsyncClient, created: dict[str, Any], outcome: str) -> None:
    response = await client.post(
        f"/sandbox/subscriptions/{sandbox_id(created)}/advance", json={"outcome": outcome}
    )
    assert response.status_code == 200, response.text


async def get(
    client: httpx.AsyncClient, created: dict[str, Any], headers: dict[str, str]
) -> dict[str, Any]:
    response = await client.get(
        f"/api/v1/subscriptions/{created['subscription_id']}", headers=headers
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def entitled(client: httpx.AsyncClient, headers: dict[str, str]) -> list[str]:
    response = await client.get("/api/v1/entitlements", headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json()["plans"])


class TestCatalogue:
    async def test_plans_show_the_interval(self, client: httpx.AsyncClient) -> None:
        plans = {p["code"]: p for p in (await client.get("/api/v1/payment/plans")).json()["plans"]}
        assert plans["pro-trial"]["interval"] == "month"
        assert plans["pro-trial"]["trial_days"] == 14
        assert plans["pro"]["interval"] is None


class TestSubscribe:
    async def test_incomplete_until_the_checkout_then_active_with_a_paid_invoice(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice)
        assert created["subscription_id"].startswith("sub_")
        assert created["status"] == "incomplete"
        assert created["redirect_url"].startswith("http://testserver/sandbox/subscriptions/sbsub_")
        assert await entitled(client, alice) == []
        page = await client.get(created["redirect_url"])
        assert page.status_code == 200 and "€9.00 / month" in page.text
        await start(client, created)
        now = await get(client, created, alice)
        assert now["status"] == "active"
        assert now["redirect_url"] is None
        assert now["current_period_end"] > now["current_period_start"]
        assert len(now["payments"]) == 1
        assert await entitled(client, alice) == ["basic-monthly"]
        # The first invoice is a payment of alice's, with a receipt naming the period.
        payment_id = now["payments"][0]
        receipt = await client.get(f"/api/v1/payment/receipt/{payment_id}", headers=alice)
        assert receipt.status_code == 200, receipt.text
        listed = (await client.get("/api/v1/subscriptions", headers=alice)).json()
        assert [s["subscription_id"] for s in listed["subscriptions"]] == [
            created["subscription_id"]
        ]

    async def test_a_trial_entitles_without_a_payment(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice, plan="pro-trial")
        await start(client, created)
        now = await get(client, created, alice)
        assert (now["status"], now["payments"]) == ("trialing", [])
        assert await entitled(client, alice) == ["pro-trial"]
        await advance(client, created, "succeeded")
        now = await get(client, created, alice)
        assert now["status"] == "active" and len(now["payments"]) == 1

    async def test_declined_at_checkout_never_starts(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice)
        await start(client, created, "failed")
        assert (await get(client, created, alice))["status"] == "incomplete_expired"
        assert await entitled(client, alice) == []

    async def test_idempotency_key_replays_the_first_answer(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        headers = {**alice, "Idempotency-Key": "sub-1"}
        first = await client.post(
            "/api/v1/subscriptions", json={"plan": "basic-monthly"}, headers=headers
        )
        again = await client.post(
            "/api/v1/subscriptions", json={"plan": "basic-monthly"}, headers=headers
        )
        assert first.status_code == again.status_code == 201
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["subscription_id"] == first.json()["subscription_id"]
        other = await client.post(
            "/api/v1/subscriptions", json={"plan": "pro-monthly"}, headers=headers
        )
        assert_problem(other, 422, "idempotency_key_reused")
        listed = (await client.get("/api/v1/subscriptions", headers=alice)).json()
        assert len(listed["subscriptions"]) == 1


class TestRenewals:
    async def test_renewals_failure_recovery_and_grace(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice)
        await start(client, created)
        first = await get(client, created, alice)
        await advance(client, created, "succeeded")
        renewed = await get(client, created, alice)
        assert renewed["status"] == "active"
        assert renewed["current_period_start"] == first["current_period_end"]
        assert len(renewed["payments"]) == 2
        # A failed renewal: past_due, still entitled within the grace period.
        await advance(client, created, "failed")
        failed = await get(client, created, alice)
        assert failed["status"] == "past_due" and len(failed["payments"]) == 2
        assert await entitled(client, alice) == ["basic-monthly"]
        # Recovery.
        await advance(client, created, "succeeded")
        recovered = await get(client, created, alice)
        assert recovered["status"] == "active" and len(recovered["payments"]) == 3
        # Failed twice: a month past the first failure, beyond the 7 days of grace.
        await advance(client, created, "failed")
        assert await entitled(client, alice) == ["basic-monthly"]
        await advance(client, created, "failed")
        assert (await get(client, created, alice))["status"] == "past_due"
        assert await entitled(client, alice) == []
        history = (
            await client.get(
                f"/api/v1/subscriptions/{created['subscription_id']}/history", headers=alice
            )
        ).json()["transitions"]
        assert [entry["status"] for entry in history][:3] == ["incomplete", "active", "active"]

    async def test_an_invoice_payment_is_refundable(
        self, client: httpx.AsyncClient, alice: dict[str, str], admin: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice)
        await start(client, created)
        payment_id = (await get(client, created, alice))["payments"][0]
        refund = await client.post(f"/api/v1/payment/{payment_id}/refund", headers=admin)
        assert refund.status_code == 200, refund.text
        assert refund.json()["status"] == "refunded"  # the payment, refunded in full


class TestCancelAndResume:
    async def test_cancel_at_period_end_then_resume_then_cancel_for_good(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice)
        await start(client, created)
        url = f"/api/v1/subscriptions/{created['subscription_id']}"
        canceled = (await client.post(f"{url}/cancel", headers=alice)).json()
        assert (canceled["status"], canceled["cancel_at_period_end"]) == ("active", True)
        assert await entitled(client, alice) == ["basic-monthly"]
        resumed = (await client.post(f"{url}/resume", headers=alice)).json()
        assert resumed["cancel_at_period_end"] is False
        assert_problem(
            await client.post(f"{url}/resume", headers=alice), 409, "invalid_subscription_state"
        )
        await client.post(f"{url}/cancel", headers=alice)
        await advance(client, created, "succeeded")
        assert (await get(client, created, alice))["status"] == "canceled"
        assert await entitled(client, alice) == []

    async def test_cancel_now(self, client: httpx.AsyncClient, alice: dict[str, str]) -> None:
        created = await subscribe(client, alice)
        await start(client, created)
        url = f"/api/v1/subscriptions/{created['subscription_id']}/cancel"
        now = (await client.post(url, json={"at_period_end": False}, headers=alice)).json()
        assert now["status"] == "canceled"
        assert await entitled(client, alice) == []


class TestChangePlan:
    async def test_upgrade_now_charged_in_full(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice)
        await start(client, created)
        url = f"/api/v1/subscriptions/{created['subscription_id']}/change-plan"
        changed = await client.post(url, json={"plan": "pro-monthly"}, headers=alice)
        assert changed.status_code == 200, changed.text
        body = changed.json()
        assert (body["plan"], body["amount"], body["pending_plan"]) == ("pro-monthly", 2900, None)
        assert len(body["payments"]) == 2
        amounts = []
        for payment_id in body["payments"]:
            receipt = await client.get(f"/api/v1/payment/receipt/{payment_id}", headers=alice)
            amounts.append(receipt.json()["amount"])
        assert sorted(amounts) == [900, 2900]
        assert await entitled(client, alice) == ["pro-monthly"]

    async def test_downgrade_at_renewal(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice, plan="pro-monthly")
        await start(client, created)
        url = f"/api/v1/subscriptions/{created['subscription_id']}/change-plan"
        body = (await client.post(url, json={"plan": "basic-monthly"}, headers=alice)).json()
        assert (body["plan"], body["pending_plan"], len(body["payments"])) == (
            "pro-monthly",
            "basic-monthly",
            1,
        )
        await advance(client, created, "succeeded")
        after = await get(client, created, alice)
        assert (after["plan"], after["amount"], after["pending_plan"]) == (
            "basic-monthly",
            900,
            None,
        )

    async def test_refused_changes(self, client: httpx.AsyncClient, alice: dict[str, str]) -> None:
        created = await subscribe(client, alice)
        url = f"/api/v1/subscriptions/{created['subscription_id']}/change-plan"
        assert_problem(
            await client.post(url, json={"plan": "pro-monthly"}, headers=alice),
            409,
            "invalid_subscription_state",
        )
        await start(client, created)
        assert_problem(
            await client.post(url, json={"plan": "pro"}, headers=alice), 422, "plan_not_recurring"
        )
        assert_problem(
            await client.post(url, json={"plan": "basic-monthly"}, headers=alice),
            422,
            "plan_change_not_allowed",
        )


class TestEvents:
    async def test_duplicated_and_reordered_events_change_nothing(
        self, app: Any, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice)
        await start(client, created)
        sandbox = app.state.sandbox_checkout.sandbox()
        sid = sandbox_id(created)
        before = await sandbox.get_subscription(sid)
        await advance(client, created, "failed")
        state = app.state.payment_state
        # The renewal's older word (active, earlier period) arrives late: refused as stale.
        late = WebhookEvent(
            event_id="evt_late",
            event_type="subscription.renewal",
            verified=True,
            subscription=before,
            occurred_at=before.current_period_start,
        )
        ack = await state._subscriptions.apply_event(sandbox, late)
        assert ack.outcome == "stale"
        assert (await get(client, created, alice))["status"] == "past_due"
        # The same event twice: applied once.
        now = await sandbox.get_subscription(sid)
        event = WebhookEvent(
            event_id="evt_twice",
            event_type="subscription.renewal",
            verified=True,
            subscription=dataclasses.replace(now, status=now.status),
            occurred_at=now.current_period_start + timedelta(hours=1)
            if now.current_period_start
            else None,
        )
        first = await state._subscriptions.apply_event(sandbox, event)
        second = await state._subscriptions.apply_event(sandbox, event)
        assert (first.outcome, second.outcome) == ("unchanged", "duplicate")

    async def test_an_unverified_event_is_read_again_from_the_provider(
        self, app: Any, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice)
        await start(client, created)
        sandbox = app.state.sandbox_checkout.sandbox()
        now = await sandbox.get_subscription(sandbox_id(created))
        forged = WebhookEvent(
            event_id="evt_forged",
            event_type="subscription.canceled",
            verified=False,
            subscription=dataclasses.replace(now, status=now.status.CANCELED),
        )
        ack = await app.state.payment_state._subscriptions.apply_event(sandbox, forged)
        assert ack.outcome == "unchanged"
        assert (await get(client, created, alice))["status"] == "active"


class TestReconciler:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {
            "payment_plans": PLANS,
            "rate_limits_enabled": False,
            "reconcile_schedule": [0.01, 0.02],
            "reconcile_interval_seconds": 3600,
        }

    async def test_follows_a_subscription_it_did_not_hear_of(
        self, app: Any, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice)
        # Started at the sandbox without telling the service (as if the event were lost).
        sandbox = app.state.sandbox_checkout.sandbox()
        sandbox._subscriptions._events = None
        await start(client, created)
        assert (await get(client, created, alice))["status"] == "incomplete"
        import asyncio

        await asyncio.sleep(0.05)
        run = await app.state.reconciler.run_once()
        assert run.payments[created["subscription_id"]] == "active"
        assert len((await get(client, created, alice))["payments"]) == 1


class TestAccessAndBadInput:
    async def test_others_get_404_admins_see_it(
        self, client: httpx.AsyncClient, alice: dict[str, str], admin: dict[str, str], token: Any
    ) -> None:
        created = await subscribe(client, alice)
        await start(client, created)
        bob = bearer(token("bob"))
        url = f"/api/v1/subscriptions/{created['subscription_id']}"
        assert_problem(await client.get(url, headers=bob), 404, "subscription_not_found")
        assert_problem(
            await client.post(f"{url}/cancel", headers=bob), 404, "subscription_not_found"
        )
        assert (await client.get(url, headers=admin)).status_code == 200
        assert await entitled(client, bob) == []
        theirs = await client.get("/api/v1/entitlements", params={"user": "alice"}, headers=admin)
        assert theirs.json()["plans"] == ["basic-monthly"]
        mine = await client.get("/api/v1/entitlements", params={"user": "alice"}, headers=bob)
        assert_problem(mine, 403, "forbidden")

    async def test_signed_in_only(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/api/v1/subscriptions", json={"plan": "basic-monthly"})
        assert_problem(response, 401, "not_authenticated")

    @pytest.mark.parametrize(
        ("body", "status", "code"),
        [
            ({"plan": "pro"}, 422, "plan_not_recurring"),
            ({"plan": "gold"}, 422, "unknown_plan"),
            ({"plan": "basic-monthly", "currency": "JPY"}, 422, "currency_not_offered"),
            ({"plan": "basic-monthly", "provider": "stripe"}, 503, "provider_not_configured"),
            (
                {"plan": "basic-monthly", "return_url": "https://evil.example/"},
                422,
                "redirect_not_allowed",
            ),
            ({"plan": "basic-monthly", "amount": 1}, 422, "validation_error"),
            ({"plan": "../etc"}, 422, "validation_error"),
        ],
    )
    async def test_bad_requests(
        self,
        client: httpx.AsyncClient,
        alice: dict[str, str],
        body: dict[str, Any],
        status: int,
        code: str,
    ) -> None:
        response = await client.post("/api/v1/subscriptions", json=body, headers=alice)
        assert_problem(response, status, code)

    async def test_hostile_ids(self, client: httpx.AsyncClient, alice: dict[str, str]) -> None:
        for some_id in ("sub_" + "x" * 200, "sb_123", "sub_<script>"):
            response = await client.get(f"/api/v1/subscriptions/{some_id}", headers=alice)
            assert_problem(response, 404, "subscription_not_found")
        advance = await client.post(
            "/sandbox/subscriptions/sbsub_nope/advance", json={"outcome": "x"}
        )
        assert_problem(advance, 422, "validation_error")
        missing = await client.post(
            "/sandbox/subscriptions/sbsub_nope/advance", json={"outcome": "failed"}
        )
        assert_problem(missing, 404, "subscription_not_found")

    async def test_portal_not_offered_by_the_sandbox(
        self, client: httpx.AsyncClient, alice: dict[str, str]
    ) -> None:
        created = await subscribe(client, alice)
        url = f"/api/v1/subscriptions/{created['subscription_id']}/portal"
        assert_problem(await client.post(url, headers=alice), 422, "operation_not_supported")


class TestPlanSync:
    async def test_admin_sync_records_price_and_plan_mappings(
        self, app: Any, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        response = await client.post("/api/v1/providers/plans/sync", headers=admin)
        assert response.status_code == 200, response.text
        prices = response.json()["prices"]
        keys = {item["price_key"] for item in prices if item["provider"] == "sandbox"}
        assert "basic-monthly:USD:1000:1month:0" in keys and len(keys) == 4
        store = app.state.store
        synced = {item["price_key"]: item["vendor_price_id"] for item in prices}
        assert (
            await store.external_id("sandbox", "plan", "basic-monthly:EUR")
            == synced["basic-monthly:EUR:900:1month:0"]
        )
        again = (await client.post("/api/v1/providers/plans/sync", headers=admin)).json()
        assert {i["price_key"]: i["vendor_price_id"] for i in again["prices"]} == synced

    async def test_admins_only(self, client: httpx.AsyncClient, alice: dict[str, str]) -> None:
        response = await client.post("/api/v1/providers/plans/sync", headers=alice)
        assert_problem(response, 403, "forbidden")
