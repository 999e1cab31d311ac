"""Capture, cancel and refund through the API, on the sandbox provider."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import assert_problem, bearer, create_payment, pay_in_sandbox


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

    async def test_part_of_the_amount_needs_a_provider_that_captures_part(
        self, client: httpx.AsyncClient
    ) -> None:
        payment = await create_payment(client, capture_method="manual")
        payment_id = payment["payment_id"]
        await pay_in_sandbox(client, payment_id)
        await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        part = await client.post(f"/api/v1/payment/{payment_id}/capture", json={"amount": 100})
        assert_problem(part, 422, "operation_not_supported")
        too_much = payment["amount"] + 1
        over = await client.post(f"/api/v1/payment/{payment_id}/capture", json={"amount": too_much})
        assert_problem(over, 422, "capture_exceeds_amount")
        whole = payment["amount"]
        captured = await client.post(
            f"/api/v1/payment/{payment_id}/capture", json={"amount": whole}
        )
        assert captured.json()["status"] == "succeeded"

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
