"""The sandbox pushes its own signed webhooks to the service over real HTTP, with delivery
faults on demand. The app is served by a real uvicorn on a loopback port (the ASGI test client
listens on none), so the sandbox's deliveries travel over TCP like a vendor's."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from services.payment_providers.sandbox import SandboxProvider
from services.payment_providers.sandbox_webhooks import REORDER_HOLD_S, sign_webhook
from tests.conftest import JWT_SECRET, assert_problem, bearer
from tests.fakes.server import free_port

CREATE = "/api/v1/payment/create-intent"
WAIT_S = 10.0  # every wait in this file ends by then, or fails


@asynccontextmanager
async def serving(app: Any, port: int) -> AsyncIterator[str]:
    """Serve ``app`` (its lifespan already running) with uvicorn on 127.0.0.1:``port``, in this
    event loop, so the test can look at the app's own store while it serves."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_config=None, log_level="warning"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: _started(server, task), what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=WAIT_S)


async def _started(server: uvicorn.Server, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()  # raises what stopped it
        raise RuntimeError("uvicorn stopped before it started")
    return server.started


async def until(check: Callable[[], Awaitable[Any]], *, what: str, within_s: float = WAIT_S) -> Any:
    """Poll ``check`` until it answers something truthy; fail after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        answer = await check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def live(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app served over real HTTP on a free loopback port."""
    async with (
        serving(app, free_port()) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=WAIT_S, trust_env=False) as http,
    ):
        yield http


def sandbox_of(app: Any) -> SandboxProvider:
    provider: SandboxProvider = app.state.sandbox_checkout.sandbox()
    return provider


async def create(http: httpx.AsyncClient, sandbox: dict[str, Any], **body: Any) -> str:
    response = await http.post(CREATE, json={"plan": "pro", "sandbox": sandbox, **body})
    assert response.status_code == 201, response.text
    payment_id: str = response.json()["payment_id"]
    return payment_id


async def settle(http: httpx.AsyncClient, payment_id: str, outcome: str = "succeeded") -> None:
    response = await http.post(f"/sandbox/checkout/{payment_id}", data={"outcome": outcome})
    assert response.status_code == 200, response.text


async def status_of(app: Any, payment_id: str) -> str:
    record = await app.state.store.get(payment_id)
    return str(record.status)


async def reaches(app: Any, payment_id: str, status: str, *, within_s: float = WAIT_S) -> None:
    async def there() -> bool:
        return await status_of(app, payment_id) == status

    await until(there, what=f"{payment_id} to be {status}", within_s=within_s)


async def deliveries(app: Any, payment_id: str, count: int) -> list[dict[str, Any]]:
    """The payment's delivery log, once it has at least ``count`` entries."""

    async def logged() -> list[dict[str, Any]]:
        entries = await sandbox_of(app).webhook_deliveries(payment_id)
        return entries if len(entries) >= count else []

    result: list[dict[str, Any]] = await until(logged, what=f"{count} webhook deliveries")
    return result


async def settled_log(app: Any, payment_id: str) -> list[dict[str, Any]]:
    """The delivery log once every delivery under way has ended."""
    assert await sandbox_of(app).wait_for_deliveries(grace_s=WAIT_S)
    return await sandbox_of(app).webhook_deliveries(payment_id)


class TestPushedWebhooks:
    async def test_a_settled_payment_reaches_the_service_by_webhook(
        self, live: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = await create(live, {"webhooks": True})
        await settle(live, payment_id)
        await reaches(app, payment_id, "succeeded")
        history = await app.state.store.history(payment_id)
        assert history[-1].cause.startswith("webhook:evt_sb_")
        [delivery] = await settled_log(app, payment_id)
        assert delivery["type"] == "payment.succeeded"
        assert (delivery["status"], delivery["outcome"], delivery["attempt"]) == (
            200,
            "applied",
            1,
        )

    @pytest.mark.parametrize("outcome", ["failed", "canceled"])
    async def test_decline_and_cancel_are_pushed(
        self, live: httpx.AsyncClient, app: Any, outcome: str
    ) -> None:
        payment_id = await create(live, {"webhooks": {}})
        await settle(live, payment_id, outcome)
        await reaches(app, payment_id, outcome)
        [delivery] = await settled_log(app, payment_id)
        assert (delivery["type"], delivery["outcome"]) == (f"payment.{outcome}", "applied")

    async def test_capture_and_refund_are_pushed_too(
        self, live: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        payment_id = await create(live, {"webhooks": True}, capture_method="manual")
        await settle(live, payment_id)
        await reaches(app, payment_id, "requires_capture")
        captured = await live.post(f"/api/v1/payment/{payment_id}/capture")
        assert captured.json()["status"] == "succeeded", captured.text
        refunded = await live.post(
            f"/api/v1/payment/{payment_id}/refund",
            json={"amount": 900},
            headers=bearer(token("root", admin=True)),
        )
        assert refunded.json()["status"] == "partially_refunded", refunded.text
        log = await deliveries(app, payment_id, 3)
        assert [(d["type"], d["status"]) for d in log] == [
            ("payment.authorized", 200),
            ("payment.succeeded", 200),
            ("refund.succeeded", 200),
        ]
        # Capture and refund are applied by whichever comes first, the API call or its event
        # (the push races the answer); the other finds nothing left to change, and a capture
        # event arriving after the refund is late and refused. Whatever the order, the
        # history is the same.
        assert log[0]["outcome"] == "applied"
        assert {d["outcome"] for d in log[1:]} <= {"applied", "unchanged", "rejected"}
        history = await app.state.store.history(payment_id)
        assert [h.status for h in history] == [
            "pending",
            "requires_capture",
            "succeeded",
            "partially_refunded",
        ]

    async def test_a_partial_capture_is_pushed_with_what_it_took(
        self, live: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        payment_id = await create(live, {"webhooks": True}, capture_method="manual")
        await settle(live, payment_id)
        await reaches(app, payment_id, "requires_capture")
        # Captured at the sandbox, the API's answer lost: the service learns it by the push.
        await sandbox_of(app).capture(payment_id, idempotency_key="lost", amount=1000)

        await reaches(app, payment_id, "succeeded")

        record = await app.state.store.get(payment_id)
        assert record.amount_captured == 1000
        [_, delivery] = await settled_log(app, payment_id)
        assert (delivery["type"], delivery["outcome"]) == ("payment.succeeded", "applied")
        over = await live.post(
            f"/api/v1/payment/{payment_id}/refund",
            json={"amount": 1001},
            headers=bearer(token("root", admin=True)),
        )
        assert_problem(over, 422, "refund_exceeds_balance")

    @pytest.mark.parametrize("ending", ["succeeded", "failed"])
    async def test_a_pending_refund_settles_by_webhook(
        self, live: httpx.AsyncClient, app: Any, token: Any, ending: str
    ) -> None:
        payment_id = await create(
            live,
            {"webhooks": True, "refund": f"pending_then_{ending}", "refund_settle_ms": 200},
        )
        await settle(live, payment_id)
        await reaches(app, payment_id, "succeeded")
        refunded = await live.post(
            f"/api/v1/payment/{payment_id}/refund",
            json={"amount": 2900},
            headers=bearer(token("root", admin=True)),
        )
        assert refunded.status_code == 202, refunded.text
        log = await deliveries(app, payment_id, 3)
        assert [d["type"] for d in log] == [
            "payment.succeeded",
            "refund.pending",
            f"refund.{ending}",
        ]
        assert log[2]["outcome"] == "applied"
        record = await app.state.store.get(payment_id)
        assert record.amount_pending_refund == 0
        if ending == "succeeded":
            assert (record.status, record.amount_refunded) == ("refunded", 2900)
        else:
            assert (record.status, record.amount_refunded) == ("succeeded", 0)

    async def test_without_webhooks_the_checkout_tells_the_service_directly(
        self, live: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = await create(live, {})
        await settle(live, payment_id)
        assert await status_of(app, payment_id) == "succeeded"
        history = await app.state.store.history(payment_id)
        assert history[-1].cause == "sandbox:checkout"
        assert await settled_log(app, payment_id) == []


class TestDeliveryFaults:
    async def test_duplicates_apply_once(self, live: httpx.AsyncClient, app: Any) -> None:
        payment_id = await create(live, {"webhooks": {"duplicate": 3}})
        await settle(live, payment_id)
        log = await settled_log(app, payment_id)
        assert [d["outcome"] for d in log] == ["applied", "duplicate", "duplicate"]
        assert len({d["event_id"] for d in log}) == 1
        assert await status_of(app, payment_id) == "succeeded"
        history = await app.state.store.history(payment_id)
        assert [entry.status for entry in history].count("succeeded") == 1

    async def test_delay(self, live: httpx.AsyncClient, app: Any) -> None:
        # A delay long enough that a settle on a loaded machine still ends well inside it.
        payment_id = await create(live, {"webhooks": {"delay_ms": 1500}})
        started = time.monotonic()
        await settle(live, payment_id)
        # The settle does not wait for the delivery: the payment is still pending after it.
        assert await status_of(app, payment_id) == "pending"
        await reaches(app, payment_id, "succeeded")
        assert time.monotonic() - started >= 1.5

    async def test_reordered_events_never_move_a_payment_backwards(
        self, live: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = await create(live, {"webhooks": {"reorder": True}}, capture_method="manual")
        await settle(live, payment_id)  # payment.authorized is held back
        assert await sandbox_of(app).webhook_deliveries(payment_id) == []
        assert await status_of(app, payment_id) == "pending"
        captured = await live.post(f"/api/v1/payment/{payment_id}/capture")
        assert captured.json()["status"] == "succeeded", captured.text
        log = await deliveries(app, payment_id, 2)
        # The later event overtook the earlier one, which arrived late and was refused.
        assert [(d["type"], d["outcome"]) for d in log] == [
            ("payment.succeeded", "unchanged"),
            ("payment.authorized", "rejected"),
        ]
        assert await status_of(app, payment_id) == "succeeded"
        history = await app.state.store.history(payment_id)
        assert [entry.status for entry in history][-1] == "succeeded"
        assert "requires_capture" not in [entry.status for entry in history]

    async def test_a_held_event_with_no_successor_still_arrives(
        self, live: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = await create(live, {"webhooks": {"reorder": True}})
        await settle(live, payment_id)
        assert await status_of(app, payment_id) == "pending"
        await reaches(app, payment_id, "succeeded", within_s=REORDER_HOLD_S + WAIT_S)
        [delivery] = await settled_log(app, payment_id)
        assert delivery["outcome"] == "applied"

    async def test_a_bad_signature_is_refused_and_changes_nothing(
        self, live: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = await create(live, {"webhooks": {"bad_signature": True}})
        await settle(live, payment_id)
        # A refusal is the receiver's final word: delivered once, not retried.
        [delivery] = await settled_log(app, payment_id)
        assert (delivery["status"], delivery["outcome"]) == (400, "invalid_signature")
        assert await status_of(app, payment_id) == "pending"
        assert len(await app.state.store.history(payment_id)) == 1
        # The sandbox's own record moved; the service learns it only when it asks.
        verified = await live.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        assert verified.json()["status"] == "succeeded", verified.text


class TestRetries:
    @pytest.fixture
    def port(self) -> int:
        return free_port()

    @pytest.fixture
    def settings_overrides(self, port: int) -> dict[str, Any]:
        return {"public_base_url": f"http://127.0.0.1:{port}"}

    async def test_a_delivery_retries_until_the_service_answers(
        self, app: Any, client: httpx.AsyncClient, port: int
    ) -> None:
        # Created and settled over ASGI while nothing listens at the public address yet.
        payment_id = await create(client, {"webhooks": True})
        await settle(client, payment_id)
        first = await deliveries(app, payment_id, 1)
        assert first[0]["status"] is None  # connection refused
        async with serving(app, port):
            await reaches(app, payment_id, "succeeded")
        log = await settled_log(app, payment_id)
        assert log[-1]["status"] == 200 and log[-1]["attempt"] > 1


class TestValidation:
    @pytest.mark.parametrize(
        ("webhooks", "field"),
        [
            ({"duplicat": 2}, "sandbox.webhooks.duplicat"),
            ({"duplicate": 0}, "sandbox.webhooks.duplicate"),
            ({"duplicate": 11}, "sandbox.webhooks.duplicate"),
            ({"delay_ms": -1}, "sandbox.webhooks.delay_ms"),
            ({"reorder": "sometimes"}, "sandbox.webhooks.reorder"),
            ({"url": "http://example.com/"}, "sandbox.webhooks.url"),
            ("yes", "sandbox.webhooks"),
        ],
    )
    async def test_bad_options(self, client: httpx.AsyncClient, webhooks: Any, field: str) -> None:
        response = await client.post(
            CREATE, json={"plan": "pro", "sandbox": {"webhooks": webhooks}}
        )
        assert field in assert_problem(response, 422, "validation_error")["detail"]


class TestProduction:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {
            "environment": "production",
            "jwt_secret_key": JWT_SECRET,
            "payment_provider": "stripe",
        }

    async def test_production_has_no_sandbox_to_push_from(
        self, live: httpx.AsyncClient, app: Any
    ) -> None:
        response = await live.post(
            CREATE, json={"plan": "pro", "provider": "sandbox", "sandbox": {"webhooks": True}}
        )
        assert_problem(response, 503, "provider_not_configured")
        checkout = await live.post("/sandbox/checkout/sb_abc123", data={"outcome": "succeeded"})
        assert_problem(checkout, 503, "provider_not_configured")
        body = json.dumps({"id": "evt_1", "type": "payment.succeeded", "data": {}}).encode()
        webhook = await live.post(
            "/api/v1/payment/webhook/sandbox",
            content=body,
            headers={"Sandbox-Signature": sign_webhook("sandbox-webhook-secret", body)},
        )
        assert_problem(webhook, 503, "provider_not_configured")
