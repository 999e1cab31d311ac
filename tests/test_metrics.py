"""Metrics and request ids, through the real app: what an operator's Prometheus scrapes."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.logging import JsonFormatter
from tests.conftest import assert_problem, bearer, create_payment, pay_in_sandbox
from tests.fakes.server import free_port


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _scrape(client: httpx.AsyncClient, token: Any) -> dict[Any, float]:
    response = await client.get("/metrics", headers=bearer(token("ops", admin=True)))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _samples(response.text)


class TestAccess:
    async def test_admins_only_on_the_api_port(self, client: httpx.AsyncClient, token: Any) -> None:
        assert_problem(await client.get("/metrics"), 401, "not_authenticated")
        assert_problem(
            await client.get("/metrics", headers=bearer(token("alice"))), 403, "forbidden"
        )


class TestWhatIsCounted:
    async def test_requests_by_route_template_and_status(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        before = await _scrape(client, token)
        created = await create_payment(client)
        await client.get(f"/api/v1/payment/{created['payment_id']}/history")  # 401: no token
        after = await _scrape(client, token)
        route = "/api/v1/payment/create-intent"
        labels = {"route": route, "method": "POST", "status": "201"}
        assert (
            _value(after, "payments_http_requests_total", **labels)
            - _value(before, "payments_http_requests_total", **labels)
            == 1
        )
        history = {"route": "/api/v1/payment/{payment_id}/history", "method": "GET"}
        assert _value(after, "payments_http_requests_total", **history, status="401") >= 1
        latency = {"route": route, "method": "POST"}
        assert _value(after, "payments_http_request_duration_seconds_count", **latency) >= 1
        # Route templates only: no payment id ever becomes a label.
        assert not any(created["payment_id"] in str(key) for key in after)

    async def test_provider_calls_by_operation_and_outcome(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        before = await _scrape(client, token)
        created = await create_payment(client)
        await pay_in_sandbox(client, created["payment_id"])
        await client.post("/api/v1/payment/verify", json={"payment_id": created["payment_id"]})
        response = await client.post(
            "/api/v1/payment/create-intent",
            json={"plan": "pro", "sandbox": {"fail": "decline"}},
        )
        assert response.status_code == 402
        after = await _scrape(client, token)

        def delta(name: str, **labels: str) -> float:
            return _value(after, name, **labels) - _value(before, name, **labels)

        calls = "payments_provider_calls_total"
        ok = {"provider": "sandbox", "outcome": "ok"}
        assert delta(calls, operation="create_payment_intent", **ok) == 1
        assert delta(calls, operation="verify_payment", **ok) >= 1
        declined = {"provider": "sandbox", "operation": "create_payment_intent"}
        assert delta(calls, outcome="payment_declined", **declined) == 1
        timed = {"provider": "sandbox", "operation": "create_payment_intent"}
        assert delta("payments_provider_call_duration_seconds_count", **timed) == 2

    async def test_webhooks_received_by_outcome(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        before = await _scrape(client, token)
        forged = await client.post(
            "/api/v1/payment/webhook/sandbox",
            content=b'{"id": "evt_x"}',
            headers={"Sandbox-Signature": "t=1,v1=00"},
        )
        assert forged.status_code == 400
        unknown = await client.post("/api/v1/payment/webhook/no-such-provider", content=b"{}")
        assert unknown.status_code in (404, 422)
        after = await _scrape(client, token)
        name = "payments_webhooks_received_total"
        labels = {"provider": "sandbox", "outcome": "invalid_signature"}
        assert _value(after, name, **labels) - _value(before, name, **labels) == 1
        assert not any("no-such-provider" in str(key) for key in after)

    async def test_breakers_and_backlog_from_redis(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        after = await _scrape(client, token)
        assert _value(after, "payments_breaker_state", provider="sandbox") == 0
        assert ("payments_reconciler_backlog", (("kind", "queued"),)) in after


class TestRequestIds:
    async def test_ours_or_the_callers(self, client: httpx.AsyncClient) -> None:
        ours = await client.get("/health")
        assert len(ours.headers["x-request-id"]) == 16
        given = await client.get("/health", headers={"X-Request-ID": "shop-4711"})
        assert given.headers["x-request-id"] == "shop-4711"
        hostile = await client.get("/health", headers={"X-Request-ID": "a b\\n{}" * 20})
        assert hostile.headers["x-request-id"] != "a b\\n{}" * 20

    async def test_every_log_line_of_a_request_carries_its_id(
        self, client: httpx.AsyncClient
    ) -> None:
        lines: list[dict[str, Any]] = []
        # The request runs in this task (ASGITransport awaits the app here); lines from the
        # app's background loops (the events sweep, the reconciler) belong to no request.
        request_task = asyncio.current_task()

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if asyncio.current_task() is request_task:
                    lines.append(json.loads(JsonFormatter().format(record)))

        keep = Keep()
        logging.getLogger("payments").addHandler(keep)
        try:
            response = await client.post(
                "/api/v1/payment/create-intent",
                json={"plan": "pro"},
                headers={"X-Request-ID": "req-created-1"},
            )
        finally:
            logging.getLogger("payments").removeHandler(keep)
        assert response.status_code == 201
        created = [line for line in lines if line["event"] == "payment.created"]
        assert created and created[-1]["request_id"] == "req-created-1"
        assert all(line.get("request_id") == "req-created-1" for line in lines)


class TestMetricsPort:
    @pytest.fixture
    def port(self) -> int:
        return free_port()

    @pytest.fixture
    def settings_overrides(self, port: int) -> dict[str, Any]:
        return {"metrics_port": port}

    async def test_served_without_a_token(self, app: Any, port: int) -> None:
        async with httpx.AsyncClient(trust_env=False) as plain:
            response = await plain.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        assert "payments_breaker_state" in response.text
