"""Vipps MobilePay through the service's HTTP API: the real app, Redis and WeasyPrint, and the
real provider talking over loopback to the fake ePayment API. Only the vendor's side is played
by hand (the customer approves, aborts or lets the payment expire in the app)."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from tests.conftest import assert_problem, bearer
from tests.fakes.mobilepay_server import FakeMobilePay

from .conftest import (
    API,
    MSN,
    SUBSCRIPTION_KEY,
    authorized,
    capture,
    create,
    new_payment,
    reference,
    refund,
    verify,
)


class TestCreate:
    async def test_a_wallet_payment_in_nok_with_the_vendors_page(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        response = await create(client, capture_method="manual")
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["provider"], body["amount"], body["currency"]) == ("mobilepay", 29900, "NOK")
        assert body["status"] == "pending"
        assert body["payment_id"].startswith("mp_ord-")
        assert body["redirect_url"].startswith("https://landing.vipps.no/?token=")
        [call] = fake.calls("POST", "/epayment/v1/payments")
        assert call.body["amount"] == {"currency": "NOK", "value": 29900}
        assert call.body["paymentMethod"] == {"type": "WALLET"}
        assert call.body["userFlow"] == "WEB_REDIRECT"
        assert call.body["reference"] == reference(body["payment_id"])
        assert call.body["metadata"] == {"captureMethod": "manual"}
        assert call.headers["idempotency-key"]
        assert call.headers["ocp-apim-subscription-key"] == SUBSCRIPTION_KEY
        assert call.headers["merchant-serial-number"] == MSN

    async def test_a_currency_the_vendor_does_not_take_is_refused(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, app: Any
    ) -> None:
        response = await create(client, plan="dollars")
        assert response.status_code == 422, response.text
        assert not fake.calls("POST", "/epayment/v1/payments")


class TestAuthorizeThenCapture:
    async def test_authorized_waits_for_capture_then_captures_all(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        payment_id = await new_payment(client)
        assert (await verify(client, payment_id)).json()["status"] == "pending"
        fake.authorize(reference(payment_id))
        verified = await verify(client, payment_id)
        assert verified.json()["status"] == "requires_capture"
        assert not fake.calls("POST", f"/epayment/v1/payments/{reference(payment_id)}/capture")

        captured = await capture(client, payment_id)
        assert captured.status_code == 200, captured.text
        assert captured.json()["status"] == "succeeded"
        assert captured.json()["amount_captured"] is None  # all of it
        payment = fake.payment(reference(payment_id))
        assert payment["aggregate"]["capturedAmount"]["value"] == 29900
        [call] = fake.calls("POST", f"/epayment/v1/payments/{reference(payment_id)}/capture")
        assert call.body == {"modificationAmount": {"currency": "NOK", "value": 29900}}
        assert call.headers["idempotency-key"] == f"capture-{payment_id}"

        again = await capture(client, payment_id)
        assert again.json()["status"] == "succeeded"
        assert (
            len(fake.calls("POST", f"/epayment/v1/payments/{reference(payment_id)}/capture")) == 1
        )

    async def test_automatic_capture_happens_at_verify_and_history_says_so(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, token: Any
    ) -> None:
        alice = token("alice")
        payment_id = await new_payment(client, token=alice, capture_method="automatic")
        fake.authorize(reference(payment_id))
        verified = await verify(client, payment_id, alice)
        assert verified.json()["status"] == "succeeded"
        assert fake.payment(reference(payment_id))["aggregate"]["capturedAmount"]["value"] == 29900
        # A second verify finds it captured: nothing is captured twice.
        assert (await verify(client, payment_id, alice)).json()["status"] == "succeeded"
        assert (
            len(fake.calls("POST", f"/epayment/v1/payments/{reference(payment_id)}/capture")) == 1
        )
        history = await client.get(f"{API}/{payment_id}/history", headers=bearer(alice))
        moves = [(t["previous"], t["status"], t["cause"]) for t in history.json()["transitions"]]
        assert moves[-1] == ("pending", "succeeded", "verify")

    async def test_capture_before_approval_is_a_conflict(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        payment_id = await new_payment(client)
        assert_problem(await capture(client, payment_id), 409, "invalid_payment_state")


class TestPartialCapture:
    async def test_part_is_captured_the_rest_released_and_refunds_stop_at_it(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, token: Any
    ) -> None:
        admin = token("root", admin=True)
        payment_id = await authorized(client, fake)
        captured = await capture(client, payment_id, amount=10000)
        assert captured.status_code == 200, captured.text
        assert (captured.json()["status"], captured.json()["amount_captured"]) == (
            "succeeded",
            10000,
        )
        aggregate = fake.payment(reference(payment_id))["aggregate"]
        assert aggregate["capturedAmount"]["value"] == 10000
        assert aggregate["cancelledAmount"]["value"] == 19900  # released at once

        too_much = await refund(client, payment_id, admin, amount=10001)
        body = assert_problem(too_much, 422, "refund_exceeds_balance")
        assert body["left"] == 10000
        first = await refund(client, payment_id, admin, amount=4000)
        assert first.status_code == 200, first.text
        assert (first.json()["status"], first.json()["refund"]["status"]) == (
            "partially_refunded",
            "succeeded",
        )
        rest = await refund(client, payment_id, admin)
        assert rest.status_code == 200, rest.text
        assert rest.json()["refund"]["amount"] == 6000
        assert (rest.json()["status"], rest.json()["amount_refunded"]) == ("refunded", 10000)
        assert fake.payment(reference(payment_id))["aggregate"]["refundedAmount"]["value"] == 10000

    async def test_replaying_the_same_partial_capture_answers_it_and_another_amount_conflicts(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        payment_id = await authorized(client, fake)
        assert (await capture(client, payment_id, amount=5000)).status_code == 200
        replay = await capture(client, payment_id, amount=5000)
        assert replay.json()["amount_captured"] == 5000
        assert_problem(await capture(client, payment_id, amount=6000), 409, "invalid_payment_state")
        assert (
            len(fake.calls("POST", f"/epayment/v1/payments/{reference(payment_id)}/capture")) == 1
        )

    @pytest.mark.parametrize("amount", [0, -5, "100", 1.5, True])
    async def test_an_amount_that_is_not_a_positive_integer_is_refused(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, amount: Any
    ) -> None:
        payment_id = await authorized(client, fake)
        response = await client.post(f"{API}/{payment_id}/capture", json={"amount": amount})
        assert response.status_code == 422, response.text
        assert not fake.calls("POST", f"/epayment/v1/payments/{reference(payment_id)}/capture")

    async def test_more_than_the_payment_is_refused(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        payment_id = await authorized(client, fake)
        assert_problem(
            await capture(client, payment_id, amount=29901), 422, "capture_exceeds_amount"
        )

    async def test_the_whole_amount_named_is_an_ordinary_capture(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        payment_id = await authorized(client, fake)
        response = await capture(client, payment_id, amount=29900)
        assert (response.json()["status"], response.json()["amount_captured"]) == (
            "succeeded",
            None,
        )
        assert fake.payment(reference(payment_id))["aggregate"]["cancelledAmount"]["value"] == 0


class TestCancel:
    async def test_an_authorized_payment_is_cancelled_and_its_reservation_freed(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        payment_id = await authorized(client, fake)
        response = await client.post(f"{API}/{payment_id}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "canceled"
        payment = fake.payment(reference(payment_id))
        assert (payment["state"], payment["aggregate"]["cancelledAmount"]["value"]) == (
            "TERMINATED",
            29900,
        )
        [call] = fake.calls("POST", f"/epayment/v1/payments/{reference(payment_id)}/cancel")
        assert call.headers["idempotency-key"] == f"cancel-{payment_id}"
        assert_problem(await capture(client, payment_id), 409, "invalid_payment_state")

    async def test_a_captured_payment_cannot_be_cancelled(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        payment_id = await authorized(client, fake)
        await capture(client, payment_id)
        response = await client.post(f"{API}/{payment_id}/cancel")
        assert_problem(response, 409, "invalid_payment_state")


class TestCustomerOutcomes:
    @pytest.mark.parametrize(("act", "status"), [("abort", "canceled"), ("expire", "expired")])
    async def test_aborted_and_expired(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, act: str, status: str
    ) -> None:
        payment_id = await new_payment(client)
        getattr(fake, act)(reference(payment_id))
        verified = await verify(client, payment_id)
        assert (verified.json()["status"], verified.json()["receipt_url"]) == (status, None)
        assert_problem(await capture(client, payment_id), 409, "invalid_payment_state")


class TestRefunds:
    async def test_full_refund_with_our_refund_id_as_the_key(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, token: Any
    ) -> None:
        admin = token("root", admin=True)
        payment_id = await authorized(client, fake)
        await capture(client, payment_id)
        response = await refund(client, payment_id, admin)
        assert response.status_code == 200, response.text
        refund_body = response.json()["refund"]
        assert (refund_body["status"], refund_body["amount"]) == ("succeeded", 29900)
        assert response.json()["status"] == "refunded"
        [call] = fake.calls("POST", f"/epayment/v1/payments/{reference(payment_id)}/refund")
        assert call.headers["idempotency-key"] == refund_body["refund_id"]
        # The event log names the refund by our id: a verify counts it once, not twice.
        verified = await verify(client, payment_id)
        assert verified.json()["amount_refunded"] == 29900
        listed = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(admin))
        assert len(listed.json()["refunds"]) == 1

    async def test_a_refund_made_in_the_portal_is_adopted_at_verify(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, token: Any
    ) -> None:
        admin = token("root", admin=True)
        payment_id = await authorized(client, fake)
        await capture(client, payment_id)
        fake.refund_in_portal(reference(payment_id), 2500)
        verified = await verify(client, payment_id)
        assert (verified.json()["status"], verified.json()["amount_refunded"]) == (
            "partially_refunded",
            2500,
        )
        left = await refund(client, payment_id, admin, amount=27401)
        assert_problem(left, 422, "refund_exceeds_balance")

    async def test_an_idempotent_retry_refunds_once(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, token: Any
    ) -> None:
        admin = token("root", admin=True)
        payment_id = await authorized(client, fake)
        await capture(client, payment_id)
        first = await refund(client, payment_id, admin, amount=1000, **{"Idempotency-Key": "r-1"})
        again = await refund(client, payment_id, admin, amount=1000, **{"Idempotency-Key": "r-1"})
        assert first.json() == again.json()
        assert fake.payment(reference(payment_id))["aggregate"]["refundedAmount"]["value"] == 1000


class TestReceipt:
    async def test_a_nok_receipt(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, token: Any, app: Any
    ) -> None:
        alice = token("alice")
        payment_id = await authorized(client, fake, token=alice)
        await capture(client, payment_id, token=alice)
        meta = await client.get(f"{API}/receipt/{payment_id}", headers=bearer(alice))
        assert meta.status_code == 200, meta.text
        receipt = meta.json()
        assert (receipt["amount"], receipt["currency"]) == (29900, "NOK")
        assert "299.00" in receipt["amount_formatted"]
        pdf = await client.get(f"{API}/receipt/{payment_id}/pdf", headers=bearer(alice))
        assert pdf.status_code == 200, pdf.text
        text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
        assert "299.00" in text and "NOK" in text
