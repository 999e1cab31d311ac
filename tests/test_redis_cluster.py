"""The whole app on a 3-master Redis Cluster (REDIS_CLUSTER=true, REDIS_URL one node's): it
starts, and every part that keeps state in Redis works there, each script and transaction in
one slot. The store's own tests run on the cluster too (tests/services/test_payment_store.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cryptography.fernet import Fernet
from pypdf import PdfReader

from app.main import create_app
from app.settings import Settings
from services.payment_providers.sandbox_webhooks import sign_webhook
from services.reconciler import ReconcileRun
from tests.conftest import (
    RedisClusterNodes,
    RedisServer,
    assert_problem,
    bearer,
    create_payment,
    make_settings,
    pay_in_sandbox,
)

URL = "/api/v1/payment/create-intent"


def on_cluster(**overrides: Any) -> dict[str, Any]:
    return {
        "redis_cluster": True,
        "provider_secrets_key": Fernet.generate_key().decode(),
        "breaker_min_calls": 3,
        "breaker_cooldown_seconds": 30.0,
        # Due at once; only the tests' own run_once calls reconcile.
        "reconcile_schedule": [0.05, 0.1],
        "reconcile_interval_seconds": 3600,
        **overrides,
    }


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return on_cluster(rate_limits_enabled=False)


@pytest.fixture
def settings(
    redis_cluster: RedisClusterNodes, tmp_path: Path, settings_overrides: dict[str, Any]
) -> Settings:
    """The suite's settings with REDIS_URL one node's of the cluster, emptied first."""
    redis_cluster.flush()
    return make_settings(redis_cluster.url, tmp_path / "receipts", **settings_overrides)


@pytest.fixture
def admin(token: Any) -> dict[str, str]:
    return bearer(token("ops", admin=True))


@pytest.fixture
async def second_worker(settings: Settings, render_pool: ProcessPoolExecutor) -> AsyncIterator[Any]:
    """Another app on the same cluster, as another worker process would be."""
    other = create_app(settings, receipt_executor=render_pool)
    async with other.router.lifespan_context(other):
        yield other


def _nodes_holding_keys(cluster: RedisClusterNodes) -> list[int]:
    holding = []
    for port in cluster.ports:
        node = redis.Redis(port=port)
        try:
            if node.dbsize():
                holding.append(port)
        finally:
            node.close()
    return holding


async def _eventually(check: Any, within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {within_s} s")
        await asyncio.sleep(0.02)


class TestStartsOnACluster:
    async def test_ready_with_one_nodes_url_and_keys_spread_over_the_masters(
        self,
        client: httpx.AsyncClient,
        redis_cluster: RedisClusterNodes,
        redis_server: RedisServer,
        admin: dict[str, str],
    ) -> None:
        """A plain client used to fail at start-up with MOVED: now the app starts, answers
        ready, and its keys spread over the masters (none on the standalone server)."""
        assert (await client.get("/ready")).status_code == 200
        health = (await client.get("/admin/health", headers=admin)).json()
        assert health["redis"]["status"] == "connected"
        created = [(await create_payment(client))["payment_id"] for _ in range(6)]
        assert len(_nodes_holding_keys(redis_cluster)) >= 2
        # None of them on the suite's standalone server (which other tests' apps share, so
        # it may hold keys of theirs).
        standalone = redis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            there = standalone.keys("test:pay:*")
            assert not [key for key in there if any(pid in key for pid in created)]
        finally:
            standalone.close()


class TestFlowEndToEnd:
    async def test_create_pay_verify_refund_and_receipt(
        self, client: httpx.AsyncClient, app: Any, token: Any, admin: dict[str, str]
    ) -> None:
        alice = bearer(token("alice"))
        created = await client.post(
            URL,
            json={"plan": "pro", "customer_email": "alice@example.com"},
            headers={**alice, "Idempotency-Key": "cluster-order-1"},
        )
        assert created.status_code == 201, created.text
        payment_id = created.json()["payment_id"]

        page = await client.get(f"/sandbox/checkout/{payment_id}")
        assert page.status_code == 200 and "€29.00" in page.text
        paid = await pay_in_sandbox(client, payment_id)
        assert paid.status_code in (200, 303), paid.text

        verified = await client.post(
            "/api/v1/payment/verify", json={"payment_id": payment_id}, headers=alice
        )
        assert verified.json()["status"] == "succeeded", verified.text
        # Numbered in the ledger's slot, then kept in the payment's (another node, maybe).
        await app.state.receipts.drain()
        record = await app.state.store.get(payment_id)
        assert record.receipt_number is not None and record.receipt_number.startswith("R-")

        refund = await client.post(
            f"/api/v1/payment/{payment_id}/refund", json={"amount": 900}, headers=admin
        )
        assert refund.status_code == 200, refund.text
        assert (refund.json()["status"], refund.json()["amount_refunded"]) == (
            "partially_refunded",
            900,
        )
        await app.state.receipts.drain()
        [refunded] = await app.state.store.refunds(payment_id)
        assert refunded.credit_note_number is not None
        assert refunded.credit_note_number.startswith("CN-")

        meta = await client.get(f"/api/v1/payment/receipt/{payment_id}", headers=alice)
        assert meta.status_code == 200, meta.text
        assert meta.json()["receipt_number"] == record.receipt_number
        assert [note["number"] for note in meta.json()["credit_notes"]] == [
            refunded.credit_note_number
        ]
        pdf = await client.get(meta.json()["pdf_url"], headers=alice)
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
        text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        for expected in (payment_id, "€29.00", "alice@example.com"):
            assert expected in text, f"{expected!r} missing from the receipt"


class TestRateLimit:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return on_cluster(rate_limits_enabled=True)

    async def test_eleventh_create_intent_in_a_minute_is_429(
        self, client: httpx.AsyncClient
    ) -> None:
        for _ in range(10):
            assert (await client.post(URL, json={"plan": "basic"})).status_code == 201
        assert_problem(await client.post(URL, json={"plan": "basic"}), 429, "rate_limited")


class TestStateOnTheCluster:
    async def test_idempotency_claims(self, client: httpx.AsyncClient) -> None:
        headers = {"Idempotency-Key": "cluster-order-2"}
        first = await client.post(URL, json={"plan": "pro"}, headers=headers)
        second = await client.post(URL, json={"plan": "pro"}, headers=headers)
        assert first.status_code == second.status_code == 201
        assert first.json() == second.json()
        other = await client.post(URL, json={"plan": "expert"}, headers=headers)
        assert_problem(other, 422, "idempotency_key_reused")

    async def test_webhook_applies_once(self, client: httpx.AsyncClient, app: Any) -> None:
        payment = await create_payment(client)
        body = json.dumps(
            {
                "id": "evt_cluster",
                "type": "payment.succeeded",
                "created": int(time.time()),
                "data": {"payment_id": payment["payment_id"]},
            }
        ).encode()
        headers = {"Sandbox-Signature": sign_webhook("sandbox-webhook-secret", body)}
        outcomes = [
            (await client.post("/api/v1/payment/webhook/sandbox", content=body, headers=headers))
            .json()
            .get("outcome")
            for _ in range(3)
        ]
        assert outcomes == ["applied", "duplicate", "duplicate"]
        assert (await app.state.store.get(payment["payment_id"])).status == "succeeded"

    async def test_breaker_state_is_shared(
        self, client: httpx.AsyncClient, second_worker: Any, admin: dict[str, str]
    ) -> None:
        for _ in range(3):
            failing = await client.post(
                URL, json={"plan": "pro", "sandbox": {"fail": "unavailable"}}
            )
            assert_problem(failing, 503, "provider_unavailable")
        transport = httpx.ASGITransport(app=second_worker)
        async with httpx.AsyncClient(transport=transport, base_url="http://w2") as other:
            refused = await other.post(URL, json={"plan": "pro"})
        body = assert_problem(refused, 503, "provider_unavailable")
        assert "circuit is open" in body["detail"]
        health = (await client.get("/admin/health", headers=admin)).json()
        assert health["providers"]["sandbox"]["status"] == "circuit_open"

    async def test_reconciler_schedule_and_leader_lock(
        self, client: httpx.AsyncClient, app: Any, second_worker: Any, admin: dict[str, str]
    ) -> None:
        payment_id = (await create_payment(client))["payment_id"]
        # Paid at the provider; its notice never comes: the reconciler has to find it.
        await app.state.sandbox_checkout.sandbox().settle(payment_id, "succeeded")
        async with asyncio.timeout(5):
            while True:
                run: ReconcileRun = await app.state.reconciler.run_once()
                if payment_id in run.payments:
                    break
                await asyncio.sleep(0.02)
        assert run.leader and run.payments[payment_id] == "succeeded"
        assert (await second_worker.state.reconciler.run_once()).leader is False
        stats = (await client.get("/api/v1/providers/reconciliation", headers=admin)).json()
        assert stats["leader"] == app.state.reconciler.worker_id
        assert stats["runs"] >= 1 and stats["settled"] == 1 and stats["queued"] == 0

    async def test_stored_configs_and_routing_take_effect_on_every_worker(
        self, client: httpx.AsyncClient, second_worker: Any, admin: dict[str, str]
    ) -> None:
        """Each is written with its version bump in one MULTI, in its own slot."""
        transport = httpx.ASGITransport(app=second_worker)
        async with httpx.AsyncClient(transport=transport, base_url="http://w2") as other:
            workers = (client, other)

            async def everywhere(status: int) -> bool:
                answers = [await c.post(URL, json={"plan": "pro"}) for c in workers]
                return all(a.status_code == status for a in answers)

            stored = await client.post(
                "/api/v1/providers/configs",
                headers=admin,
                json={"provider_key": "sandbox", "config": {"behaviour": {"fail": "decline"}}},
            )
            assert stored.status_code == 201, stored.text
            await _eventually(lambda: everywhere(402))
            cleared = await client.patch(
                f"/api/v1/providers/configs/{stored.json()['id']}",
                headers=admin,
                json={"config": {}},
            )
            assert cleared.status_code == 200, cleared.text
            await _eventually(lambda: everywhere(201))

            routing = await client.put(
                "/api/v1/providers/routing",
                headers=admin,
                json={"default": "mobilepay", "fallback": ["sandbox"]},
                params={"force": "true"},  # MobilePay has no credentials here
            )
            assert routing.status_code == 200, routing.text

            async def routed_on_the_other_worker() -> bool:
                created = await other.post(URL, json={"plan": "pro"})
                record = await second_worker.state.store.get(created.json()["payment_id"])
                return [a.provider for a in record.attempts] == ["mobilepay", "sandbox"]

            await _eventually(routed_on_the_other_worker)

    async def test_mappings(
        self, client: httpx.AsyncClient, app: Any, admin: dict[str, str]
    ) -> None:
        payment = await create_payment(client)
        record = await app.state.store.get(payment["payment_id"])
        url = "/api/v1/providers/mappings"
        by_local = await client.get(
            url, headers=admin, params={"provider": "sandbox", "local_id": record.reference}
        )
        assert [item["external_id"] for item in by_local.json()["items"]] == [payment["payment_id"]]
        by_external = await client.get(
            url, headers=admin, params={"provider": "sandbox", "external_id": payment["payment_id"]}
        )
        assert by_external.json()["items"][0]["local_id"] == record.reference
