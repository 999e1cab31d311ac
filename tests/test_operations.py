"""Capture, cancel and refund through the API, on the sandbox provider."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from services.errors import CaptureExceedsAmount, RefundExceedsBalance
from services.payment_providers.sandbox import SandboxProvider
from services.payment_providers.sandbox_webhooks import SIGNATURE_HEADER, sign_webhook
from tests.conftest import assert_problem, bearer, create_payment, pay_in_sandbox


async def _authorized(client: httpx.AsyncClient) -> str:
    payment = await create_payment(client, capture_method="manual")
    await pay_in_sandbox(client, payment["payment_id"])
    verified = await client.post(
        "/api/v1/payment/verify", json={"payment_id": payment["payment_id"]}
    )
    assert verified.json()["status"] == "requires_capture", verified.text
    return str(payment["payment_id"])


async def _capture(
    client: httpx.AsyncClient, payment_id: str, amount: int | None = None
) -> httpx.Response:
    body = {} if amount is None else {"amount": amount}
    return await client.post(f"/api/v1/payment/{payment_id}/capture", json=body)


async def _refund(
    client: httpx.AsyncClient, payment_id: str, admin: dict[str, str], amount: int | None = None
) -> httpx.Response:
    body = {} if amount is None else {"amount": amount}
    return await client.post(f"/api/v1/payment/{payment_id}/refund", json=body, headers=admin)


def _sandbox(app: Any) -> SandboxProvider:
    provider: SandboxProvider = app.state.sandbox_checkout.sandbox()
    return provider


async def _paid(client: httpx.AsyncClient, plan: str = "pro") -> str:
    payment = await create_payment(client, plan=plan)
    await pay_in_sandbox(client, payment["payment_id"])
    return str(payment["payment_id"])


class TestRefund:
    async def test_partial_then_full(self, client: httpx.AsyncClient, token: Any) -> None:
        admin = bearer(token("ops", admin=True))
        payment_id = await _paid(client)
        partial = await client.post(
            f"/api/v1/payment/{payment_id}/refund", json={"amount": 900}, headers=admin
        )
        assert partial.status_code == 200, partial.text
        assert (partial.json()["status"], partial.json()["amount_refunded"]) == (
            "partially_refunded",
            900,
        )
        too_much = await client.post(
            f"/api/v1/payment/{payment_id}/refund", json={"amount": 2001}, headers=admin
        )
        assert_problem(too_much, 422, "refund_exceeds_balance")
        rest = await client.post(f"/api/v1/payment/{payment_id}/refund", headers=admin)
        assert (rest.json()["status"], rest.json()["amount_refunded"]) == ("refunded", 2900)
        again = await client.post(f"/api/v1/payment/{payment_id}/refund", headers=admin)
        assert_problem(again, 422, "refund_exceeds_balance")
        # The provider agrees.
        verify = await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        assert verify.json()["status"] == "refunded"

    async def test_refund_is_for_admins(self, client: httpx.AsyncClient, token: Any) -> None:
        payment_id = await _paid(client)
        url = f"/api/v1/payment/{payment_id}/refund"
        assert_problem(await client.post(url), 401, "not_authenticated")
        assert_problem(await client.post(url, headers=bearer(token("alice"))), 403, "forbidden")

    async def test_unpaid_cannot_be_refunded(self, client: httpx.AsyncClient, token: Any) -> None:
        payment = await create_payment(client)
        response = await client.post(
            f"/api/v1/payment/{payment['payment_id']}/refund",
            headers=bearer(token("ops", admin=True)),
        )
        assert_problem(response, 409, "invalid_payment_state")

    async def test_bad_amounts(self, client: httpx.AsyncClient, token: Any) -> None:
        payment_id = await _paid(client)
        for amount in (0, -5, "ten", 1.5):
            response = await client.post(
                f"/api/v1/payment/{payment_id}/refund",
                json={"amount": amount},
                headers=bearer(token("ops", admin=True)),
            )
            assert_problem(response, 422, "validation_error")


class TestCaptureAndCancel:
    async def test_manual_capture(self, client: httpx.AsyncClient) -> None:
        payment = await create_payment(client, capture_method="manual")
        payment_id = payment["payment_id"]
        await pay_in_sandbox(client, payment_id)
        verify = await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        assert verify.json()["status"] == "requires_capture"
        captured = await client.post(f"/api/v1/payment/{payment_id}/capture")
        assert captured.json()["status"] == "succeeded"
        twice = await client.post(f"/api/v1/payment/{payment_id}/capture")
        assert twice.status_code == 200 and twice.json()["status"] == "succeeded"

    async def test_cancel_open_payment(self, client: httpx.AsyncClient) -> None:
        payment = await create_payment(client)
        canceled = await client.post(f"/api/v1/payment/{payment['payment_id']}/cancel")
        assert canceled.json()["status"] == "canceled"
        # The customer can no longer pay it.
        page = await pay_in_sandbox(client, payment["payment_id"])
        assert "already settled" in page.text

    async def test_paid_cannot_be_canceled(self, client: httpx.AsyncClient) -> None:
        payment_id = await _paid(client)
        response = await client.post(f"/api/v1/payment/{payment_id}/cancel")
        assert_problem(response, 409, "invalid_payment_state")

    async def test_paypal_capture_without_paypal(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/api/v1/payment/capture/paypal/pp_5O190127TN364715T")
        assert_problem(response, 503, "provider_not_configured")


class TestPartialCapture:
    """The sandbox captures part of an authorization as real providers do: the rest is
    released, the answer says what was taken, and refunds stop at it."""

    async def test_part_is_captured_the_rest_released_and_refunds_stop_at_it(
        self, client: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        admin = bearer(token("ops", admin=True))
        payment_id = await _authorized(client)

        captured = await _capture(client, payment_id, 1000)

        assert captured.status_code == 200, captured.text
        body = captured.json()
        assert (body["status"], body["amount"], body["amount_captured"]) == (
            "succeeded",
            2900,
            1000,
        )
        again = (
            await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        ).json()
        assert (again["status"], again["amount_captured"]) == ("succeeded", 1000)
        page = await client.get(f"/sandbox/checkout/{payment_id}")
        assert '<p id="captured">Captured €10.00 of it' in page.text, page.text

        too_much = await _refund(client, payment_id, admin, 1001)
        assert assert_problem(too_much, 422, "refund_exceeds_balance")["left"] == 1000
        # The sandbox's own books say the same, asked directly.
        with pytest.raises(RefundExceedsBalance):
            await _sandbox(app).refund(
                payment_id, refund_id="rf_direct", amount=1001, currency="EUR", capture_id=None
            )
        part = await _refund(client, payment_id, admin, 400)
        assert (part.json()["status"], part.json()["amount_refunded"]) == (
            "partially_refunded",
            400,
        )
        rest = await _refund(client, payment_id, admin)
        assert rest.status_code == 200, rest.text
        assert rest.json()["refund"]["amount"] == 600
        assert (rest.json()["status"], rest.json()["amount_refunded"]) == ("refunded", 1000)
        assert_problem(await _refund(client, payment_id, admin, 1), 422, "refund_exceeds_balance")
        after = (
            await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        ).json()
        assert (after["status"], after["amount_refunded"]) == ("refunded", 1000)

    async def test_asking_again_answers_the_capture_and_another_amount_conflicts(
        self, client: httpx.AsyncClient
    ) -> None:
        payment_id = await _authorized(client)
        first = await _capture(client, payment_id, 1000)
        assert first.status_code == 200, first.text

        replay = await _capture(client, payment_id, 1000)
        all_of_it = await _capture(client, payment_id)
        other = await _capture(client, payment_id, 1500)

        for response in (replay, all_of_it):
            assert response.status_code == 200, response.text
            assert response.json()["amount_captured"] == 1000
        assert_problem(other, 409, "invalid_payment_state")

    async def test_a_capture_whose_answer_was_lost_is_answered_by_the_sandbox(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = await _authorized(client)
        # Our capture of 1000 reached the sandbox; its answer never came back.
        first = await _sandbox(app).capture(
            payment_id, idempotency_key=f"capture-{payment_id}", amount=1000
        )
        assert first.amount_captured == 1000
        assert (await app.state.store.get(payment_id)).status == "requires_capture"

        # The sandbox refuses another amount than it took, before the service knows of it.
        assert_problem(await _capture(client, payment_id, 1500), 409, "invalid_payment_state")
        answered = await _capture(client, payment_id, 1000)

        assert (answered.json()["status"], answered.json()["amount_captured"]) == (
            "succeeded",
            1000,
        )
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_captured) == ("succeeded", 1000)
        session = await _sandbox(app).session(payment_id)
        assert (session["status"], session["captured"], session["amount"]) == (
            "succeeded",
            "1000",
            "2900",
        )

    async def test_more_than_authorized_is_refused_and_all_of_it_is_no_partial_capture(
        self, client: httpx.AsyncClient, app: Any
    ) -> None:
        payment_id = await _authorized(client)

        over = await _capture(client, payment_id, 2901)

        assert assert_problem(over, 422, "capture_exceeds_amount")["amount"] == 2900
        # The sandbox refuses it too, asked directly, and stays authorized.
        with pytest.raises(CaptureExceedsAmount) as refused:
            await _sandbox(app).capture(payment_id, idempotency_key="direct", amount=2901)
        assert refused.value.extra == {"amount": 2900}
        assert (await _sandbox(app).session(payment_id))["status"] == "authorized"
        whole = await _capture(client, payment_id, 2900)  # all of it, named
        assert (whole.json()["status"], whole.json()["amount_captured"]) == ("succeeded", None)
        page = await client.get(f"/sandbox/checkout/{payment_id}")
        assert 'id="captured"' not in page.text

    async def test_only_an_authorized_payment_is_captured(self, client: httpx.AsyncClient) -> None:
        payment = await create_payment(client, capture_method="manual")
        unpaid = await _capture(client, payment["payment_id"], 1000)
        assert_problem(unpaid, 409, "invalid_payment_state")

    async def test_a_signed_event_may_say_what_a_capture_took(
        self, client: httpx.AsyncClient, app: Any, settings: Any, token: Any
    ) -> None:
        payment_id = await _authorized(client)
        await _sandbox(app).capture(payment_id, idempotency_key="elsewhere", amount=1200)
        event = {
            "id": "evt_partial_1",
            "type": "payment.succeeded",
            "created": int(time.time()),
            "data": {"payment_id": payment_id, "amount_captured": 1200},
        }
        body = json.dumps(event).encode()
        secret = settings.sandbox_webhook_secret.get_secret_value()

        answer = await client.post(
            "/api/v1/payment/webhook/sandbox",
            content=body,
            headers={SIGNATURE_HEADER: sign_webhook(secret, body)},
        )

        assert answer.json()["outcome"] == "applied", answer.text
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_captured) == ("succeeded", 1200)
        over = await _refund(client, payment_id, bearer(token("ops", admin=True)), 1201)
        assert_problem(over, 422, "refund_exceeds_balance")
        bad = json.dumps(
            {
                **event,
                "id": "evt_partial_2",
                "data": {"payment_id": payment_id, "amount_captured": "1200"},
            }
        ).encode()
        refused = await client.post(
            "/api/v1/payment/webhook/sandbox",
            content=bad,
            headers={SIGNATURE_HEADER: sign_webhook(secret, bad)},
        )
        assert_problem(refused, 400, "invalid_payload")
