"""Provider mappings: our order reference and the provider's ID, both ways, API and CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import JWT_SECRET, RedisServer, assert_problem, bearer, create_payment

ROOT = Path(__file__).resolve().parent.parent


class TestMappings:
    async def test_created_payment_is_mapped_both_ways(
        self, client: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        admin = bearer(token("ops", admin=True))
        payment = await create_payment(client)
        record = await app.state.store.get(payment["payment_id"])
        url = "/api/v1/providers/mappings"
        by_local = await client.get(
            url, headers=admin, params={"provider": "sandbox", "local_id": record.reference}
        )
        assert by_local.json()["items"] == [
            {
                "provider": "sandbox",
                "entity": "payment",
                "local_id": record.reference,
                "external_id": payment["payment_id"],
            }
        ]
        by_external = await client.get(
            url, headers=admin, params={"provider": "sandbox", "external_id": payment["payment_id"]}
        )
        assert by_external.json()["items"][0]["local_id"] == record.reference
        listing = await client.get(url, headers=admin, params={"provider": "sandbox"})
        assert payment["payment_id"] in {item["external_id"] for item in listing.json()["items"]}

    async def test_unknown_and_bad_queries(self, client: httpx.AsyncClient, token: Any) -> None:
        admin = bearer(token("ops", admin=True))
        url = "/api/v1/providers/mappings"
        assert_problem(
            await client.get(
                url, headers=admin, params={"provider": "sandbox", "local_id": "ord_nothing"}
            ),
            404,
            "not_found",
        )
        assert_problem(
            await client.get(url, headers=admin, params={"provider": "bitcoin"}),
            422,
            "unknown_provider",
        )
        assert_problem(await client.get(url, headers=admin), 422, "validation_error")
        assert_problem(
            await client.get(url, params={"provider": "sandbox"}), 401, "not_authenticated"
        )

    async def test_cli_list_and_lookup(
        self, client: httpx.AsyncClient, app: Any, redis_server: RedisServer
    ) -> None:
        payment = await create_payment(client)
        record = await app.state.store.get(payment["payment_id"])
        env = {
            **os.environ,
            "REDIS_URL": redis_server.url,
            "REDIS_KEY_PREFIX": "test:",
            "JWT_SECRET_KEY": JWT_SECRET,
        }

        async def cli(*args: str) -> subprocess.CompletedProcess[str]:
            # In a thread, so the app under test keeps running its loop meanwhile.
            return await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "app.cli", *args],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        listing = await cli("provider-mappings", "list", "--provider", "sandbox")
        assert listing.returncode == 0, listing.stderr
        assert f"{record.reference}\t{payment['payment_id']}" in listing.stdout
        for some_id in (record.reference, payment["payment_id"]):
            found = await cli("provider-mappings", "lookup", "sandbox", "payment", some_id)
            assert found.returncode == 0, found.stderr
            assert f"external_id={payment['payment_id']}" in found.stdout
        missing = await cli("provider-mappings", "lookup", "sandbox", "payment", "ord_none")
        assert missing.returncode == 1

        linked = await cli("provider-mappings", "link", "paddle", "plan", "pro", "pri_01cli")
        assert linked.returncode == 0, linked.stderr
        assert await app.state.store.external_id("paddle", "plan", "pro") == "pri_01cli"


class TestLinking:
    async def test_an_admin_maps_a_plan_to_a_vendor_price(
        self, client: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        admin = bearer(token("ops", admin=True))
        url = "/api/v1/providers/mappings"
        body = {"provider": "paddle", "entity": "plan", "local_id": "pro", "external_id": "pri_1"}
        linked = await client.put(url, json=body, headers=admin)
        assert linked.status_code == 200, linked.text
        assert linked.json() == body
        # Linked again to another price: the old one no longer leads back to the plan.
        await client.put(url, json={**body, "external_id": "pri_2"}, headers=admin)
        store = app.state.store
        assert await store.external_id("paddle", "plan", "pro") == "pri_2"
        assert await store.local_id("paddle", "plan", "pri_2") == "pro"
        assert await store.local_id("paddle", "plan", "pri_1") is None

    async def test_refused(self, client: httpx.AsyncClient, token: Any) -> None:
        url = "/api/v1/providers/mappings"
        body = {"provider": "paddle", "entity": "plan", "local_id": "pro", "external_id": "pri_1"}
        assert_problem(await client.put(url, json=body), 401, "not_authenticated")
        user = bearer(token("alice"))
        assert_problem(await client.put(url, json=body, headers=user), 403, "forbidden")
        admin = bearer(token("ops", admin=True))
        for bad in (
            {**body, "provider": "nope"},
            {**body, "entity": "Plan!"},
            {**body, "external_id": ""},
            {**body, "extra": 1},
        ):
            response = await client.put(url, json=bad, headers=admin)
            assert response.status_code == 422, (bad, response.text)
