"""Subscriptions on a 3-master Redis Cluster: every script of the subscription store stays in
one slot, and the whole lifecycle works there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings
from tests.conftest import RedisClusterNodes, bearer, make_settings
from tests.test_redis_cluster import on_cluster
from tests.test_subscriptions import PLANS, advance, entitled, get, start, subscribe


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return on_cluster(rate_limits_enabled=False, payment_plans=PLANS)


@pytest.fixture
def settings(
    redis_cluster: RedisClusterNodes, tmp_path: Path, settings_overrides: dict[str, Any]
) -> Settings:
    redis_cluster.flush()
    return make_settings(redis_cluster.url, tmp_path / "receipts", **settings_overrides)


class TestOnACluster:
    async def test_lifecycle(self, app: Any, client: httpx.AsyncClient, token: Any) -> None:
        alice = bearer(token("alice"))
        created = await subscribe(client, alice)
        await start(client, created)
        await advance(client, created, "failed")
        await advance(client, created, "succeeded")
        now = await get(client, created, alice)
        assert now["status"] == "active" and len(now["payments"]) == 2
        url = f"/api/v1/subscriptions/{created['subscription_id']}"
        assert (await client.post(f"{url}/cancel", headers=alice)).status_code == 200
        assert await entitled(client, alice) == ["basic-monthly"]
        history = (await client.get(f"{url}/history", headers=alice)).json()["transitions"]
        assert [entry["status"] for entry in history] == [
            "incomplete",
            "active",
            "past_due",
            "active",
        ]
        run = await app.state.reconciler.run_once()
        assert run.errors == 0
