"""Events on a 3-master Redis Cluster: the change scripts write the outbox and its per-slot
index in the payment's slot, the relay and the sweep find them there, deliveries keep their
order, and a dead worker's delivery is taken over, as on a standalone Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from app.settings import Settings
from services.events.outbox import OutboxKeys
from services.events.service import GROUP, WebhookEvents
from tests.conftest import RedisClusterNodes, bearer, make_settings
from tests.test_webhook_events import (
    URL,
    add_endpoint,
    another_app,
    dead_leader_is_replaced,
    eventually,
    fast_events,
    paid,
    verified,
)
from tests.webhook_receiver import Receiver, running_receiver


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return fast_events(redis_cluster=True)


@pytest.fixture
def settings(
    redis_cluster: RedisClusterNodes, tmp_path: Path, settings_overrides: dict[str, Any]
) -> Settings:
    redis_cluster.flush()
    return make_settings(redis_cluster.url, tmp_path / "receipts", **settings_overrides)


@pytest.fixture
def admin(token: Any) -> dict[str, str]:
    return bearer(token("ops", admin=True))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


def test_each_outbox_index_is_in_its_payments_slot() -> None:
    keys = OutboxKeys("test:", cluster=True)
    for payment_id in ("sb_1", "pi_3Pq", "PAYID-XYZ", "x" * 128):
        outbox, index = keys.keys(payment_id)
        assert key_slot(outbox.encode()) == key_slot(index.encode())
        assert key_slot(outbox.encode()) == key_slot(f"test:pay:{{{payment_id}}}".encode())
    assert len(set(keys.all_indexes())) == 16384


class TestOnACluster:
    async def test_payment_and_refund_events_in_order(
        self, client: httpx.AsyncClient, admin: dict[str, str], receiver: Receiver
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        receiver.fail_next = 2
        payment_id = await paid(client)
        response = await client.post(
            f"/api/v1/payment/{payment_id}/refund", json={"amount": 100}, headers=admin
        )
        assert response.status_code in (200, 202), response.text
        await eventually(lambda: len(receiver.accepted()) == 3, within_s=15)
        types = [body["type"] for body in verified(receiver, created["secret"])]
        assert types == ["payment.succeeded", "refund.succeeded", "payment.partially_refunded"]
        log = (await client.get(f"{URL}/{created['id']}/deliveries", headers=admin)).json()
        assert [entry["status"] for entry in log] == ["succeeded"] * 3

    async def test_an_outbox_left_by_a_dead_process_is_swept(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        receiver: Receiver,
        app: Any,
        settings: Settings,
        render_pool: ProcessPoolExecutor,
        redis_cluster: RedisClusterNodes,
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        await app.state.webhook_events.aclose()  # this process relays and delivers nothing
        app.state.store.outbox_listener = None
        payment_ids = [await paid(client) for _ in range(4)]
        await asyncio.sleep(0.2)
        assert receiver.all() == []
        # The outboxes wait in their own slots, spread over the masters.
        holding = set()
        for port in redis_cluster.ports:
            node = redis.Redis(port=port, decode_responses=True)
            try:
                if node.keys("test:pay:*:outbox"):
                    holding.add(port)
            finally:
                node.close()
        assert holding
        async with another_app(settings, render_pool):
            await eventually(lambda: len(receiver.accepted()) == 4, within_s=15)
        delivered = {body["data"]["payment_id"] for body in verified(receiver, created["secret"])}
        assert delivered == set(payment_ids)

    async def test_a_dead_sweep_leaders_lease_lapses_and_another_takes_over(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        receiver: Receiver,
        app: Any,
        settings: Settings,
        render_pool: ProcessPoolExecutor,
    ) -> None:
        raw = RedisCluster.from_url(settings.redis_url, decode_responses=True)
        try:
            await dead_leader_is_replaced(client, admin, receiver, app, settings, render_pool, raw)
        finally:
            await raw.aclose()


class TestTakeoverOnACluster:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return fast_events(redis_cluster=True, webhook_worker_enabled=False)

    async def test_a_dead_workers_delivery_is_claimed_by_another(
        self,
        client: httpx.AsyncClient,
        admin: dict[str, str],
        receiver: Receiver,
        app: Any,
        settings: Settings,
        render_pool: ProcessPoolExecutor,
    ) -> None:
        created = await add_endpoint(client, admin, receiver.url)
        await paid(client)
        events: WebhookEvents = app.state.webhook_events
        await eventually(lambda: _logged(client, created["id"], admin))
        await events.ensure_group()
        assert await events.schedule_once() == 1
        raw = RedisCluster.from_url(settings.redis_url, decode_responses=True)
        try:
            stream = "test:wh:{stream}"
            ((_, [(_, fields)]),) = await raw.xreadgroup(
                GROUP, "dead-worker", {stream: ">"}, count=10
            )
            begun = await events.deliveries.begin(
                fields["endpoint"], fields["delivery"], lease_s=1.5
            )
            assert begun.outcome == "go"
            async with another_app(settings, render_pool, webhook_worker_enabled=True):
                await eventually(lambda: len(receiver.accepted()) == 1, within_s=10)

                async def acknowledged() -> bool:
                    # The taker acknowledges after the receiver answered: wait for it too.
                    return int((await raw.xpending(stream, GROUP))["pending"]) == 0

                await eventually(acknowledged, within_s=10)
        finally:
            await raw.aclose()
        assert len(verified(receiver, created["secret"])) == 1


async def _logged(client: httpx.AsyncClient, endpoint_id: str, admin: dict[str, str]) -> bool:
    return bool((await client.get(f"{URL}/{endpoint_id}/deliveries", headers=admin)).json())
