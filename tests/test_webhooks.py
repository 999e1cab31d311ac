"""The service's webhook promises, proven with the sandbox's own signed events: each event
applies once, late events never move a payment backwards, forgeries change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import pytest

from services.errors import ProviderUnavailable
from services.payment_providers.breaker import BreakerState
from services.payment_providers.sandbox_webhooks import sign_webhook
from tests.conftest import assert_problem, create_payment

URL = "/api/v1/payment/webhook/sandbox"
SECRET = "sandbox-webhook-secret"


def _event(event_id: str, event_type: str, payment_id: str | None, **data: Any) -> bytes:
    body = {
        "id": event_id,
        "type": event_type,
        "created": int(time.time()),
        "data": {"payment_id": payment_id, **data},
    }
    return json.dumps(body).encode()


async def _deliver(
    client: httpx.AsyncClient, body: bytes, *, secret: str = SECRET, timestamp: int | None = None
) -> httpx.Response:
    signature = sign_webhook(secret, body, timestamp=timestamp)
    return await client.post(
        URL,
        content=body,
        headers={"Sandbox-Signature": signature, "content-type": "application/json"},
    )


async def _status(client: httpx.AsyncClient, app: Any, payment_id: str) -> str:
    record = await app.state.store.get(payment_id)
    return str(record.status)


class TestSignedEvents:
    async def test_event_applies_and_renders_the_receipt(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment = await create_payment(client)
        response = await _deliver(
            client, _event("evt_1", "payment.succeeded", payment["payment_id"])
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"received": True, "event_id": "evt_1", "outcome": "applied"}
        assert await _status(client, app, payment["payment_id"]) == "succeeded"
        await app.state.receipts.drain()
        assert app.state.receipts.renderer.path_for(payment["payment_id"]).exists()
        history = await app.state.store.history(payment["payment_id"])
        assert history[-1].cause == "webhook:evt_1"

    async def test_each_event_applies_once(self, client: httpx.AsyncClient, app: Any) -> None:
        payment = await create_payment(client)
        body = _event("evt_dup", "payment.succeeded", payment["payment_id"])
        outcomes = [(await _deliver(client, body)).json()["outcome"] for _ in range(3)]
        assert outcomes == ["applied", "duplicate", "duplicate"]
        assert len(await app.state.store.history(payment["payment_id"])) == 2

    async def test_concurrent_deliveries_apply_once(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment = await create_payment(client)
        body = _event("evt_race", "payment.succeeded", payment["payment_id"])
        responses = await asyncio.gather(*(_deliver(client, body) for _ in range(10)))
        assert {r.status_code for r in responses} == {200}
        assert [r.json()["outcome"] for r in responses].count("applied") == 1
        assert len(await app.state.store.history(payment["payment_id"])) == 2

    async def test_late_events_never_move_a_payment_backwards(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment = await create_payment(client)
        payment_id = payment["payment_id"]
        await _deliver(client, _event("evt_b", "payment.succeeded", payment_id))
        for late_id, late_type in (("evt_a", "payment.failed"), ("evt_c", "payment.canceled")):
            response = await _deliver(client, _event(late_id, late_type, payment_id))
            assert response.status_code == 200
            assert response.json()["outcome"] == "rejected"
        assert await _status(client, app, payment_id) == "succeeded"

    async def test_refund_events_in_any_order(self, client: httpx.AsyncClient, app: Any) -> None:
        payment = await create_payment(client)
        payment_id = payment["payment_id"]
        await _deliver(client, _event("evt_paid", "payment.succeeded", payment_id))

        def refund(status: str, amount: int = 2900) -> dict[str, Any]:
            # A refund made at the sandbox directly: no refund id of ours in it.
            return {
                "id": "sbre_made_elsewhere",
                "amount": amount,
                "currency": "EUR",
                "status": status,
            }

        done = await _deliver(
            client, _event("evt_done", "refund.succeeded", payment_id, refund=refund("succeeded"))
        )
        assert done.json()["outcome"] == "applied"
        late = await _deliver(
            client, _event("evt_late", "refund.pending", payment_id, refund=refund("pending"))
        )
        assert late.json()["outcome"] == "rejected"
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_refunded, record.amount_pending_refund) == (
            "refunded",
            2900,
            0,
        )
        [adopted] = await app.state.store.refunds(payment_id)
        assert (adopted.status, adopted.provider_refund_id) == ("succeeded", "sbre_made_elsewhere")
        # A refund the provider fails after calling it succeeded gives the money back to the
        # balance; the payment itself never moves backwards.
        failed = await _deliver(
            client, _event("evt_fail", "refund.failed", payment_id, refund=refund("failed"))
        )
        assert failed.json()["outcome"] == "applied"
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_refunded) == ("refunded", 0)

    async def test_a_refund_event_with_a_bad_refund_is_refused(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment = await create_payment(client)
        for bad in ({"id": "sbre_x", "amount": "lots", "status": "succeeded"}, {"id": "x"}, []):
            response = await _deliver(
                client, _event("evt_bad", "refund.succeeded", payment["payment_id"], refund=bad)
            )
            assert_problem(response, 400, "invalid_payload")
        assert await app.state.store.refunds(payment["payment_id"]) == []

    async def test_unknown_payment_and_type_are_acknowledged(
        self, client: httpx.AsyncClient
    ) -> None:
        payment = await create_payment(client)
        for body in (
            _event("evt_x", "payment.succeeded", "sb_000000000000000000000000"),
            _event("evt_y", "payment.disputed", payment["payment_id"]),
            _event("evt_z", "payment.succeeded", None),
        ):
            response = await _deliver(client, body)
            assert response.json()["outcome"] == "ignored"


class TestForgeries:
    @pytest.mark.parametrize(
        "tamper",
        ["wrong_secret", "stale", "future", "missing", "garbage", "body_changed"],
    )
    async def test_refused_and_change_nothing(
        self, client: httpx.AsyncClient, app: Any, tamper: str
    ) -> None:
        payment = await create_payment(client)
        body = _event("evt_forged", "payment.succeeded", payment["payment_id"])
        signature = sign_webhook(SECRET, body)
        now = int(time.time())
        headers = {
            "wrong_secret": {"Sandbox-Signature": sign_webhook("guess", body)},
            "stale": {"Sandbox-Signature": sign_webhook(SECRET, body, timestamp=now - 301)},
            "future": {"Sandbox-Signature": sign_webhook(SECRET, body, timestamp=now + 301)},
            "missing": {},
            "garbage": {"Sandbox-Signature": "t=abc,v1=zz"},
            "body_changed": {"Sandbox-Signature": signature},
        }[tamper]
        content = body.replace(b"succeeded", b"succeeded ") if tamper == "body_changed" else body
        response = await client.post(URL, content=content, headers=headers)
        assert_problem(response, 400, "invalid_signature")
        assert await _status(client, app, payment["payment_id"]) == "pending"
        # The forged event id was not used up: the genuine delivery still applies.
        genuine = await _deliver(client, body)
        assert genuine.json()["outcome"] == "applied"

    @pytest.mark.parametrize(
        "body",
        [
            b"not json",
            b"{}",
            b'{"id": "", "type": "x"}',
            b"[1]",
            b'{"id": "e", "type": "t", "data": {"payment_id": 5}}',
        ],
    )
    async def test_signed_junk_is_400(self, client: httpx.AsyncClient, body: bytes) -> None:
        response = await _deliver(client, body)
        assert_problem(response, 400, "invalid_payload")


class TestWebhooksAndTheBreaker:
    """Checking a signature is our own work: an open circuit never refuses a webhook, and a
    webhook never counts for or against the provider."""

    async def test_an_open_circuit_does_not_refuse_webhooks(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment = await create_payment(client)
        breaker = app.state.guard.breaker("sandbox")

        async def unreachable() -> None:
            raise ProviderUnavailable("down", provider="sandbox", outcome_unknown=False)

        for _ in range(200):
            if await breaker.state() == BreakerState.OPEN:
                break
            with contextlib.suppress(ProviderUnavailable):
                await breaker.call(unreachable)
        assert await breaker.state() == BreakerState.OPEN
        response = await _deliver(
            client, _event("evt_open", "payment.succeeded", payment["payment_id"])
        )
        assert response.json()["outcome"] == "applied", response.text
        forged = await _deliver(
            client, _event("evt_f", "payment.failed", payment["payment_id"]), secret="x" * 20
        )
        assert_problem(forged, 400, "invalid_signature")
        assert await breaker.state() == BreakerState.OPEN  # neither closed nor reopened by them
