"""Redis going away: 503 with a stable code, never a 500, and recovery without a restart."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from tests.conftest import RedisServer, assert_problem, bearer, make_settings, pay_in_sandbox
from tests.fakes.server import free_port


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, so stopping it disturbs nothing else."""
    directory = Path(tempfile.mkdtemp(prefix="payments-outage-"))
    server = RedisServer(port=free_port(), directory=directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def outage_client(
    own_redis: RedisServer, tmp_path: Path, render_pool: ProcessPoolExecutor
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(own_redis.url, tmp_path / "receipts", redis_timeout_seconds=0.5)
    application = create_app(settings, receipt_executor=render_pool)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


class TestRedisOutage:
    async def test_down_then_back(
        self, outage_client: httpx.AsyncClient, own_redis: RedisServer, token: Any
    ) -> None:
        http = outage_client
        created = await http.post("/api/v1/payment/create-intent", json={"plan": "pro"})
        payment_id = created.json()["payment_id"]
        assert (await http.get("/ready")).status_code == 200

        own_redis.stop()
        for method, url, body in [
            ("POST", "/api/v1/payment/create-intent", {"plan": "pro"}),
            ("POST", "/api/v1/payment/verify", {"payment_id": payment_id}),
            ("GET", f"/api/v1/payment/receipt/{payment_id}", None),
            ("GET", "/ready", None),
        ]:
            response = await http.request(method, url, json=body, headers=bearer(token("alice")))
            assert_problem(response, 503, "store_unavailable")
            assert response.headers["Retry-After"]
        page = await pay_in_sandbox(http, payment_id)
        assert_problem(page, 503, "store_unavailable")
        assert (await http.get("/health")).status_code == 200  # the process itself is fine

        own_redis.start()  # same port, empty: a restarted Redis without persistence
        assert (await http.get("/ready")).status_code == 200
        again = await http.post("/api/v1/payment/create-intent", json={"plan": "pro"})
        assert again.status_code == 201
