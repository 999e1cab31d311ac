"""Reconciliation: payments whose webhook was lost, or whose last operation's outcome is
unknown, are verified again with their provider on a growing schedule, by one leader."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from app.main import create_app
from services.reconciler import Reconciler, ReconcileRun
from tests.conftest import (
    STRIPE_SECRET_KEY,
    RedisServer,
    assert_problem,
    bearer,
    create_payment,
    make_settings,
)
from tests.fakes.stripe_server import FakeStripe

# Short delays, so that each step comes due within a test; a long interval, so that only the
# test's own calls to run_once do the work and each can be asserted on.
FAST = {"reconcile_schedule": [0.05, 0.1], "reconcile_interval_seconds": 3600}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return dict(FAST)


async def run_until(app: Any, payment_id: str, *, timeout_s: float = 5.0) -> ReconcileRun:
    """Run the reconciler until it has looked at ``payment_id`` (it is due within 0.1 s)."""
    async with asyncio.timeout(timeout_s):
        while True:
            run: ReconcileRun = await app.state.reconciler.run_once()
            if payment_id in run.payments:
                return run
            await asyncio.sleep(0.02)


async def stats(client: httpx.AsyncClient, token: Any) -> dict[str, Any]:
    response = await client.get(
        "/api/v1/providers/reconciliation", headers=bearer(token("ops", admin=True))
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


class TestLostWebhook:
    async def test_a_payment_paid_at_the_provider_is_found_and_gets_its_receipt(
        self, client: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        alice = token("alice")
        payment = await create_payment(client, token=alice)
        payment_id = payment["payment_id"]
        # The customer pays at the provider; its notice to us never arrives.
        await app.state.sandbox_checkout.sandbox().settle(payment_id, "succeeded")
        assert (await app.state.store.get(payment_id)).status == "pending"

        run = await run_until(app, payment_id)

        assert run.leader and run.payments[payment_id] == "succeeded"
        assert (run.changed, run.settled) == (1, 1)
        record = await app.state.store.get(payment_id)
        assert record.status == "succeeded"
        history = await app.state.store.history(payment_id)
        assert [(h.previous, h.status, h.cause) for h in history][-1] == (
            "pending",
            "succeeded",
            "reconcile",
        )
        await app.state.receipts.drain()
        pdf = await client.get(f"/api/v1/payment/receipt/{payment_id}/pdf", headers=bearer(alice))
        assert pdf.status_code == 200
        text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
        assert "29.00" in text
        seen = await stats(client, token)
        assert seen["queued"] == 0
        assert seen["checked"] >= 1 and seen["changed"] == 1 and seen["settled"] == 1
        assert seen["leader"] == seen["this_worker"]

    async def test_a_declined_payment_is_found_too(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = (await create_payment(client))["payment_id"]
        await app.state.sandbox_checkout.sandbox().settle(payment_id, "failed")
        run = await run_until(app, payment_id)
        assert run.payments[payment_id] == "failed"
        assert (await app.state.store.get(payment_id)).status == "failed"


class TestSchedule:
    async def test_an_open_payment_is_checked_at_each_step_then_given_up(
        self, client: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        payment_id = (await create_payment(client))["payment_id"]
        first = await run_until(app, payment_id)
        assert first.payments[payment_id] == "pending" and first.gave_up == 0
        assert (await stats(client, token))["queued"] == 1  # the next step is queued

        second = await run_until(app, payment_id)
        assert second.gave_up == 1
        seen = await stats(client, token)
        assert seen["queued"] == 0 and seen["gave_up"] == 1 and seen["checked"] == 2
        # Giving up changes nothing: the payment stays as the provider last said.
        assert (await app.state.store.get(payment_id)).status == "pending"


class TestNotYetDue:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {**FAST, "reconcile_schedule": [3600]}

    async def test_nothing_is_due_before_its_time(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = (await create_payment(client))["payment_id"]
        run = await app.state.reconciler.run_once()
        assert run.leader and payment_id not in run.payments
        assert (await app.state.reconciler.stats())["queued"] == 1


class TestLongSteps:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        # The second step is longer than the lease a checked payment is held under (four
        # intervals, at least 60 s: 4 h with FAST's interval).
        return {**FAST, "reconcile_schedule": [0.05, 20_000]}

    async def test_the_next_step_waits_its_own_delay_not_the_lease(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = (await create_payment(client))["payment_id"]
        await run_until(app, payment_id)
        due = await app.state.store.reconcile_due_at(payment_id)
        assert due is not None and due - time.time() > 19_990


class TestSettledMeanwhile:
    async def test_a_payment_settled_in_the_meantime_is_dropped_without_asking_twice(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = (await create_payment(client))["payment_id"]
        await client.post(f"/sandbox/checkout/{payment_id}", data={"outcome": "canceled"})
        run = await run_until(app, payment_id)
        assert run.payments[payment_id] == "canceled" and run.changed == 0
        assert (await app.state.reconciler.stats())["queued"] == 0


class TestLeader:
    async def test_one_worker_leads_and_another_takes_over_when_it_stops(
        self, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        settings = make_settings(redis_server.url, tmp_path / "receipts", **FAST)
        apps = [create_app(settings), create_app(settings)]
        stacks = [contextlib.AsyncExitStack(), contextlib.AsyncExitStack()]
        try:
            for app, stack in zip(apps, stacks, strict=True):
                await stack.enter_async_context(app.router.lifespan_context(app))
            runs = [await app.state.reconciler.run_once() for app in apps * 2]
            leads = [run.leader for run in runs]
            assert leads in ([True, False, True, False], [False, True, False, True])
            index = leads.index(True)
            leader, other = apps[index], apps[1 - index]

            transport = httpx.ASGITransport(app=other)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                payment_id = (await create_payment(http))["payment_id"]
            await asyncio.sleep(0.06)
            # Due, but only the leader works on it.
            assert payment_id not in (await other.state.reconciler.run_once()).payments
            assert payment_id in (await run_until(leader, payment_id)).payments

            # The leader stops and lets go of the lock: the other one leads from now on.
            await stacks[index].aclose()
            assert (await other.state.reconciler.run_once()).leader is True
        finally:
            for stack in stacks:
                await stack.aclose()

    async def test_a_dead_leaders_lock_expires(
        self, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        settings = make_settings(redis_server.url, tmp_path / "receipts", **FAST)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            redis = app.state.store._redis
            leader_key = app.state.store.reconcile_leader_key
            # A worker that led and then died without letting go: its lock lives on only
            # for the rest of its lease.
            await redis.set(leader_key, "a-worker-that-died", px=150)
            assert (await app.state.reconciler.run_once()).leader is False
            await asyncio.sleep(0.2)
            assert (await app.state.reconciler.run_once()).leader is True
            assert await redis.get(leader_key) == app.state.reconciler.worker_id


def worker_reconciler(app: Any, *, lease_s: float) -> Reconciler:
    """One more worker's reconciler on the app's Redis, with a leader lease this short."""
    settings = app.state.settings
    return Reconciler(
        app.state.payment_state,
        app.state.store,
        app.state.store._redis,
        schedule_s=settings.reconcile_schedule,
        interval_s=settings.reconcile_interval_seconds,
        batch=settings.reconcile_batch,
        lease_s=lease_s,
    )


class TestLeaderLockDuringABatch:
    """A batch of slow provider calls lasts longer than the leader's lease: Stripe hangs on
    every verification until the deadline (0.4 s each), and the lease is 0.3 s."""

    LEASE_S = 0.3

    @pytest.fixture
    def settings_overrides(self, stripe_server: FakeStripe) -> dict[str, Any]:
        stripe_server.reset()
        return {
            **FAST,
            # Only the reconcilers the tests build run, each with the short lease.
            "reconcile_enabled": False,
            "stripe_secret_key": STRIPE_SECRET_KEY,
            "stripe_publishable_key": "pk_test_reconcile",
            "stripe_api_base": stripe_server.url,
            "provider_timeout_seconds": 0.2,
            "provider_deadline_seconds": 0.4,
        }

    @pytest.fixture
    async def due(
        self, app: Any, client: httpx.AsyncClient, stripe_server: FakeStripe
    ) -> AsyncIterator[list[str]]:
        """Three Stripe payments due for a check, and a Stripe that hangs on each one."""
        payments = [
            (await create_payment(client, provider="stripe", ui_mode="embedded"))["payment_id"]
            for _ in range(3)
        ]
        for payment_id in payments:
            await app.state.store.schedule_reconcile(payment_id, after_s=0)
        stripe_server.fail_next("hang", times=100, path_prefix="/v1/payment_intents/")
        try:
            yield payments
        finally:
            stripe_server.release_hangs()

    @staticmethod
    def verified(stripe_server: FakeStripe) -> set[str]:
        """The payments Stripe was asked about (an embedded payment's ID is its intent's)."""
        return {
            r.path.rsplit("/", 1)[1]
            for r in list(stripe_server.requests)
            if r.method.upper() == "GET" and r.path.startswith("/v1/payment_intents/")
        }

    async def test_the_leader_keeps_its_lock_for_the_whole_batch(
        self, app: Any, due: list[str]
    ) -> None:
        leader = worker_reconciler(app, lease_s=self.LEASE_S)
        other = worker_reconciler(app, lease_s=self.LEASE_S)
        batch = asyncio.create_task(leader.run_once())
        await asyncio.sleep(0.01)
        others_turns = []
        while not batch.done():
            others_turns.append((await other.run_once()).leader)
            await asyncio.sleep(0.05)
        run = await batch

        assert run.leader and sorted(run.payments) == sorted(due)
        assert len(others_turns) > 10 and not any(others_turns)
        assert await app.state.store._redis.get(app.state.store.reconcile_leader_key) == (
            leader.worker_id
        )

    async def test_a_leader_that_lost_its_lock_stops_after_the_current_payment(
        self, app: Any, due: list[str], stripe_server: FakeStripe
    ) -> None:
        leader = worker_reconciler(app, lease_s=self.LEASE_S)
        batch = asyncio.create_task(leader.run_once())
        async with asyncio.timeout(2):
            while True:  # until the first verification reaches Stripe (and hangs there)
                if self.verified(stripe_server):
                    break
                await asyncio.sleep(0.01)
        # Mid-call, another worker holds the lock (the leader's renewals did not reach Redis
        # in time, say).
        await app.state.store._redis.set(
            app.state.store.reconcile_leader_key, "another-worker", px=60_000
        )
        run = await batch

        assert run.leader and run.lost_lead
        assert len(run.payments) == 1
        assert self.verified(stripe_server) == set(run.payments)
        # The two left are still leased to the batch: they come due again after the lease.
        for payment_id in set(due) - set(run.payments):
            due_at = await app.state.store.reconcile_due_at(payment_id)
            assert due_at is not None and due_at - time.time() > 30


class TestUnknownOutcome:
    @pytest.fixture
    def settings_overrides(self, stripe_server: FakeStripe) -> dict[str, Any]:
        stripe_server.reset()
        return {
            **FAST,
            "stripe_secret_key": STRIPE_SECRET_KEY,
            "stripe_publishable_key": "pk_test_reconcile",
            "stripe_api_base": stripe_server.url,
            "provider_timeout_seconds": 0.3,
            "provider_deadline_seconds": 1.0,
        }

    async def test_a_refund_that_timed_out_queues_the_payment_for_checking(
        self, client: httpx.AsyncClient, app: Any, token: Any, stripe_server: FakeStripe
    ) -> None:
        alice, admin = token("alice"), token("ops", admin=True)
        created = await create_payment(
            client, token=alice, provider="stripe", ui_mode="embedded", plan="basic"
        )
        payment_id = created["payment_id"]
        stripe_server.pay(payment_id)
        verified = await client.post(
            "/api/v1/payment/verify", json={"payment_id": payment_id}, headers=bearer(alice)
        )
        assert verified.json()["status"] == "succeeded"
        # A paid payment is not open: nothing is queued for it any more.
        await run_until(app, payment_id)
        assert (await app.state.reconciler.stats())["queued"] == 0

        stripe_server.fail_next("hang", times=10, path_prefix="/v1/refunds")
        try:
            refused = await client.post(
                f"/api/v1/payment/{payment_id}/refund", headers=bearer(admin)
            )
        finally:
            stripe_server.release_hangs()
        assert_problem(refused, 503, "provider_unavailable")
        assert (await app.state.reconciler.stats())["queued"] == 1
        # Nobody knows whether Stripe made it: the refund stays pending, its amount reserved.
        refunds = await client.get(f"/api/v1/payment/{payment_id}/refunds", headers=bearer(admin))
        assert refunds.json()["amount_pending_refund"] == 1900
        assert refunds.json()["refunds"][0]["status"] == "pending"

        stripe_server.clear_faults()
        run = await run_until(app, payment_id)
        # The reconciler asked Stripe again under the same refund id: refunded, once.
        assert run.payments[payment_id] == "refunded" and run.settled == 1
        assert (await app.state.reconciler.stats())["queued"] == 0
        assert len(stripe_server.refunds) == 1

    async def test_a_provider_outage_keeps_the_payment_queued(
        self, client: httpx.AsyncClient, app: Any, stripe_server: FakeStripe
    ) -> None:
        created = await create_payment(client, provider="stripe", ui_mode="embedded")
        payment_id = created["payment_id"]
        stripe_server.fail_next("server_error", times=10)
        run = await run_until(app, payment_id)
        assert run.errors == 1 and run.payments[payment_id] == "error:provider_unavailable"
        assert (await app.state.reconciler.stats())["queued"] == 1


class TestHistory:
    async def test_owner_sees_attempts_and_transitions(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        alice = token("alice")
        payment_id = (await create_payment(client, token=alice))["payment_id"]
        await client.post(f"/sandbox/checkout/{payment_id}", data={"outcome": "succeeded"})
        response = await client.get(f"/api/v1/payment/{payment_id}/history", headers=bearer(alice))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["attempts"] == [
            {
                "provider": "sandbox",
                "outcome": "succeeded",
                "code": None,
                "latency_ms": body["attempts"][0]["latency_ms"],
                "at": body["attempts"][0]["at"],
            }
        ]
        assert body["attempts"][0]["at"] <= body["transitions"][0]["at"]
        assert body["attempts"][0]["latency_ms"] >= 0
        assert [(t["previous"], t["status"]) for t in body["transitions"]] == [
            (None, "pending"),
            ("pending", "succeeded"),
        ]


class TestFailoverHistory:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {**FAST, "payment_provider": "stripe", "payment_fallback": ["sandbox"]}

    async def test_failover_attempts_are_shown(self, client: httpx.AsyncClient, token: Any) -> None:
        alice = token("alice")
        payment_id = (await create_payment(client, token=alice))["payment_id"]
        body = (
            await client.get(f"/api/v1/payment/{payment_id}/history", headers=bearer(alice))
        ).json()
        assert [(a["provider"], a["outcome"], a["code"]) for a in body["attempts"]] == [
            ("stripe", "skipped", "provider_not_configured"),
            ("sandbox", "succeeded", None),
        ]


class TestHistoryAccess:
    async def test_nobody_else_sees_it(self, client: httpx.AsyncClient, token: Any) -> None:
        payment_id = (await create_payment(client, token=token("alice")))["payment_id"]
        url = f"/api/v1/payment/{payment_id}/history"
        assert_problem(await client.get(url), 401, "not_authenticated")
        assert_problem(
            await client.get(url, headers=bearer(token("mallory"))), 404, "payment_not_found"
        )
        admin = await client.get(url, headers=bearer(token("ops", admin=True)))
        assert admin.status_code == 200
        assert_problem(
            await client.get("/api/v1/payment/sb_nothing/history", headers=bearer(token("a"))),
            404,
            "payment_not_found",
        )


class TestBadSettings:
    @pytest.mark.parametrize("schedule", ["[]", "[0]", "-5,60", "soon"])
    def test_a_bad_schedule_is_refused_at_start(
        self, schedule: str, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        with pytest.raises(ValueError, match="reconcile_schedule"):
            make_settings(redis_server.url, tmp_path, reconcile_schedule=schedule)
