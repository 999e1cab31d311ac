"""Per-endpoint limits, counted in Redis so that every worker sees the same counters."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Any

import httpx

from app.main import create_app
from app.settings import Settings
from tests.conftest import assert_problem, bearer, create_payment, pay_in_sandbox

URL = "/api/v1/payment/create-intent"


class TestRateLimits:
    async def test_eleventh_create_intent_in_a_minute_is_429(
        self, client: httpx.AsyncClient
    ) -> None:
        for _ in range(10):
            response = await client.post(URL, json={"plan": "basic"})
            assert response.status_code == 201
        assert response.headers["RateLimit-Remaining"] == "0"
        limited = await client.post(URL, json={"plan": "basic"})
        assert_problem(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["Retry-After"]) <= 60

    async def test_every_answer_says_how_much_is_left(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        """JSON answers and the PDF download alike carry the RateLimit-* headers."""
        alice = bearer(token("alice"))
        created = await create_payment(client, token=token("alice"))
        await pay_in_sandbox(client, created["payment_id"])
        receipt = f"/api/v1/payment/receipt/{created['payment_id']}"
        answers = {
            "verify": await client.post(
                "/api/v1/payment/verify", json={"payment_id": created["payment_id"]}, headers=alice
            ),
            "receipt": await client.get(receipt, headers=alice),
            "pdf": await client.get(f"{receipt}/pdf", headers=alice),
            "history": await client.get(
                f"/api/v1/payment/{created['payment_id']}/history", headers=alice
            ),
        }
        limits = {"verify": 30, "receipt": 30, "pdf": 10, "history": 30}
        for name, answer in answers.items():
            assert answer.status_code == 200, (name, answer.text)
            assert answer.headers["RateLimit-Limit"] == str(limits[name]), name
            assert int(answer.headers["RateLimit-Remaining"]) < limits[name], name
            assert 1 <= int(answer.headers["RateLimit-Reset"]) <= 60, name

    async def test_limits_are_per_user(self, client: httpx.AsyncClient, token: Any) -> None:
        alice, bob = bearer(token("alice")), bearer(token("bob"))
        for _ in range(10):
            await client.post(URL, json={"plan": "basic"}, headers=alice)
        assert_problem(
            await client.post(URL, json={"plan": "basic"}, headers=alice), 429, "rate_limited"
        )
        assert (await client.post(URL, json={"plan": "basic"}, headers=bob)).status_code == 201

    async def test_limits_are_per_endpoint(self, client: httpx.AsyncClient) -> None:
        for _ in range(11):
            await client.post(URL, json={"plan": "basic"})
        verify = await client.post("/api/v1/payment/verify", json={"payment_id": "sb_unknown00"})
        assert_problem(verify, 404, "payment_not_found")

    async def test_two_workers_share_the_counters(
        self, settings: Settings, render_pool: ProcessPoolExecutor
    ) -> None:
        # Two app instances on one Redis stand in for two worker processes.
        first, second = (
            create_app(settings, receipt_executor=render_pool),
            create_app(settings, receipt_executor=render_pool),
        )
        async with first.router.lifespan_context(first), second.router.lifespan_context(second):
            transports = [
                httpx.ASGITransport(app=a, client=("198.51.100.9", 1)) for a in (first, second)
            ]
            clients = [
                httpx.AsyncClient(transport=t, base_url="http://testserver") for t in transports
            ]
            try:
                statuses = [
                    (
                        await clients[i % 2].post(
                            "/api/v1/payment/verify", json={"payment_id": "sb_x00"}
                        )
                    ).status_code
                    for i in range(31)
                ]
            finally:
                for http in clients:
                    await http.aclose()
        assert statuses[:30] == [404] * 30
        assert statuses[30] == 429
