"""Circuit breakers, deadlines and fallback routing, driven by the sandbox's fault injection."""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.conftest import assert_problem, bearer

URL = "/api/v1/payment/create-intent"
BREAKER = {
    "breaker_min_calls": 3,
    "breaker_cooldown_seconds": 1.0,
    "rate_limits_enabled": False,
}


async def _create(
    client: httpx.AsyncClient, fail: str | None = None, **extra: Any
) -> httpx.Response:
    body: dict[str, Any] = {"plan": "pro", **extra}
    if fail:
        body["sandbox"] = {"fail": fail}
    return await client.post(URL, json=body)


class TestCircuitBreaker:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return BREAKER

    async def test_opens_refuses_then_probes_and_closes(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        for _ in range(3):
            assert_problem(await _create(client, "unavailable"), 503, "provider_unavailable")
        refused = await _create(client)  # a healthy request, refused without trying
        body = assert_problem(refused, 503, "provider_unavailable")
        assert "circuit is open" in body["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        health = await client.get("/admin/health", headers=bearer(token("ops", admin=True)))
        assert health.json()["providers"]["sandbox"]["status"] == "circuit_open"
        assert health.json()["status"] == "unhealthy"  # the default provider is out

        await asyncio.sleep(1.1)  # the cool-down
        probe = await _create(client)
        assert probe.status_code == 201, probe.text
        assert (await _create(client)).status_code == 201
        health = await client.get("/admin/health", headers=bearer(token("ops", admin=True)))
        assert health.json()["providers"]["sandbox"]["status"] == "connected"

    async def test_a_failed_probe_opens_it_again(self, client: httpx.AsyncClient) -> None:
        for _ in range(3):
            await _create(client, "error")
        await asyncio.sleep(1.1)
        assert_problem(await _create(client, "error"), 502, "provider_error")  # the probe
        assert "circuit is open" in (await _create(client)).json()["detail"]

    async def test_declines_are_not_failures(self, client: httpx.AsyncClient) -> None:
        for _ in range(5):
            body = assert_problem(await _create(client, "decline"), 402, "payment_declined")
            assert body["decline_code"] == "card_declined"
        assert (await _create(client)).status_code == 201

    async def test_all_workers_see_the_open_circuit(
        self, client: httpx.AsyncClient, settings: Settings, render_pool: ProcessPoolExecutor
    ) -> None:
        for _ in range(3):
            await _create(client, "unavailable")
        other = create_app(settings, receipt_executor=render_pool)  # a second worker
        async with other.router.lifespan_context(other):
            transport = httpx.ASGITransport(app=other)
            async with httpx.AsyncClient(transport=transport, base_url="http://w2") as second:
                response = await _create(second)
        assert "circuit is open" in response.json()["detail"]


class TestDeadline:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"provider_deadline_seconds": 0.2, "rate_limits_enabled": False}

    async def test_slow_provider_is_cut_off(self, client: httpx.AsyncClient) -> None:
        response = await client.post(URL, json={"plan": "pro", "sandbox": {"delay_ms": 1000}})
        body = assert_problem(response, 503, "provider_unavailable")
        assert "in time" in body["detail"]


class TestFallbackRouting:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"payment_provider": "stripe", "payment_fallback": ["paypal", "sandbox"]}

    async def test_unconfigured_default_falls_back(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        response = await client.post(URL, json={"plan": "pro"})
        assert response.status_code == 201, response.text
        assert response.json()["provider"] == "sandbox"
        record = await app.state.store.get(response.json()["payment_id"])
        assert [(a.provider, a.outcome, a.code) for a in record.attempts] == [
            ("stripe", "skipped", "provider_not_configured"),
            ("paypal", "skipped", "provider_not_configured"),
            ("sandbox", "succeeded", None),
        ]
        # Each attempt says when it started, in order.
        times = [attempt.at for attempt in record.attempts]
        assert all(times) and times == sorted(times)
        assert record.created_at >= times[-1]

    async def test_a_named_provider_is_never_swapped(self, client: httpx.AsyncClient) -> None:
        response = await client.post(URL, json={"plan": "pro", "provider": "stripe"})
        assert_problem(response, 503, "provider_not_configured")

    async def test_lost_answer_is_not_failed_over(self, client: httpx.AsyncClient) -> None:
        # The last candidate's outcome is unknown: the client must hear it, not a guess.
        response = await client.post(URL, json={"plan": "pro", "sandbox": {"fail": "lost_answer"}})
        assert_problem(response, 503, "provider_unavailable")


class TestProductionNeverFallsBackToSandbox:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        from tests.conftest import JWT_SECRET

        return {
            "environment": "production",
            "jwt_secret_key": JWT_SECRET,
            "payment_provider": "stripe",
            "payment_fallback": ["sandbox"],
        }

    async def test_no_sandbox_fallback(self, client: httpx.AsyncClient) -> None:
        response = await client.post(URL, json={"plan": "pro"})
        assert_problem(response, 503, "provider_not_configured")


class TestSandboxBehaviourValidation:
    @pytest.mark.parametrize(
        "behaviour", [{"fail": "explode"}, {"delay_ms": -1}, {"delay_ms": 10**9}, {"x": 1}, "slow"]
    )
    async def test_bad_behaviour(self, client: httpx.AsyncClient, behaviour: Any) -> None:
        response = await client.post(URL, json={"plan": "pro", "sandbox": behaviour})
        assert_problem(response, 422, "validation_error")
