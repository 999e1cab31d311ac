"""Paddle through the service's HTTP API: the real app, Redis and WeasyPrint, and the real
Paddle provider talking over loopback to the fake Paddle.

Only Paddle's side is played by hand: the customer pays on Paddle Checkout (the fake's
control endpoint), Paddle approves or rejects refunds, and Paddle's webhook deliveries are
signed by the fake. Everything of ours goes through our endpoints."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from tests.conftest import assert_problem, bearer
from tests.fakes.paddle_server import PADDLE_WORDING, FakePaddle
from tests.providers.paddle.conftest import (
    API,
    API_KEY,
    WEBHOOK_SECRET,
    create,
    deliver,
    paddle_payment,
    pay_at_paddle,
    refund,
    verify,
)


def assert_nothing_from_paddle(response: httpx.Response) -> None:
    """Neither our Paddle secrets nor Paddle's own codes and messages reach a client."""
    for secret in (API_KEY, WEBHOOK_SECRET):
        assert secret not in response.text
    for wording in PADDLE_WORDING:
        assert wording not in response.text, f"Paddle's {wording!r} reached the client"


async def paid(client: httpx.AsyncClient, fake: FakePaddle, token: str) -> str:
    payment_id = await paddle_payment(client, token=token)
    await pay_at_paddle(fake, payment_id)
    verified = await verify(client, payment_id, token=token)
    assert verified.json()["status"] == "succeeded", verified.text
    return payment_id


class TestCreatePayVerifyReceipt:
    async def test_the_whole_way_to_a_receipt(
        self, client: httpx.AsyncClient, fake: FakePaddle, app: Any, token: Any
    ) -> None:
        alice = token("alice")
        response = await create(client, token=alice, amount=1, price=1)  # ignored: prices are ours
        assert response.status_code == 201, response.text
        body = response.json()
        payment_id = body["payment_id"]
        assert payment_id.startswith("txn_")
        assert (body["provider"], body["status"]) == ("paddle", "pending")
        assert (body["amount"], body["currency"]) == (2900, "EUR")  # the catalogue's
        assert body["redirect_url"] == f"https://shop.example/pay?_ptxn={payment_id}"

        [call] = fake.calls("POST", "/transactions")
        assert call.body is not None
        [item] = call.body["items"]
        assert item["price"]["unit_price"] == {"amount": "2900", "currency_code": "EUR"}
        assert item["price"]["tax_mode"] == "internal"
        record = await app.state.store.get(payment_id)
        assert call.body["custom_data"] == {
            "payment_reference": record.reference,
            "plan": "pro",
            "user_id": "alice",
        }

        waiting = await verify(client, payment_id, token=alice)
        assert waiting.json()["status"] == "pending"

        await pay_at_paddle(fake, payment_id)
        verified = await verify(client, payment_id, token=alice)
        assert verified.status_code == 200, verified.text
        assert verified.json()["status"] == "succeeded"
        assert verified.json()["receipt_url"]

        receipt = await client.get(f"{API}/receipt/{payment_id}", headers=bearer(alice))
        assert receipt.status_code == 200, receipt.text
        assert (receipt.json()["amount"], receipt.json()["currency"]) == (2900, "EUR")
        assert receipt.json()["payment_method"].lower() == "card"
        pdf = await client.get(f"{API}/receipt/{payment_id}/pdf", headers=bearer(alice))
        assert pdf.status_code == 200
        text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
        assert "29.00" in text
        # Paddle sold as merchant of record: ours is a payment confirmation, not a tax receipt.
        assert (receipt.json()["document"], receipt.json()["merchant_of_record"]) == (
            "payment_confirmation",
            "Paddle.com",
        )
        assert "Payment confirmation" in text and "Paddle.com" in text

    async def test_a_plan_mapped_to_a_paddle_price_is_sold_at_that_price(
        self, client: httpx.AsyncClient, fake: FakePaddle, app: Any
    ) -> None:
        price_id = fake.add_price(2900, "EUR", name="Pro")
        await app.state.store.link("paddle", "plan", "pro", price_id)
        response = await create(client)
        assert response.status_code == 201, response.text
        [call] = fake.calls("POST", "/transactions")
        assert call.body is not None
        assert call.body["items"] == [{"quantity": 1, "price_id": price_id}]

    async def test_a_plan_mapped_to_another_amount_is_refused(
        self, client: httpx.AsyncClient, fake: FakePaddle, app: Any
    ) -> None:
        price_id = fake.add_price(3900, "EUR", name="Pro, dearer")
        await app.state.store.link("paddle", "plan", "pro", price_id)
        response = await create(client)
        assert_problem(response, 503, "provider_misconfigured")
        assert_nothing_from_paddle(response)


class TestDeclinesAndCancels:
    async def test_a_declined_card_leaves_the_payment_open(
        self, client: httpx.AsyncClient, fake: FakePaddle
    ) -> None:
        payment_id = await paddle_payment(client)
        await pay_at_paddle(fake, payment_id, "declined")
        delivered = await deliver(client, fake, fake.last_event("transaction.payment_failed"))
        assert delivered.status_code == 200, delivered.text
        assert (await verify(client, payment_id)).json()["status"] == "pending"
        # The customer tries another card on the same checkout.
        await pay_at_paddle(fake, payment_id)
        assert (await verify(client, payment_id)).json()["status"] == "succeeded"

    async def test_a_canceled_transaction_cancels_the_payment(
        self, client: httpx.AsyncClient, fake: FakePaddle
    ) -> None:
        payment_id = await paddle_payment(client)
        await pay_at_paddle(fake, payment_id, "canceled")
        assert (await verify(client, payment_id)).json()["status"] == "canceled"


class TestRefunds:
    async def test_pending_until_paddle_approves(
        self, client: httpx.AsyncClient, fake: FakePaddle, token: Any
    ) -> None:
        alice, admin = token("alice"), token("ops", admin=True)
        payment_id = await paid(client, fake, alice)

        asked = await refund(client, payment_id, admin, 1000, reason="customer asked")
        assert asked.status_code == 202, asked.text
        pending = asked.json()["refund"]
        assert pending["status"] == "pending"
        assert asked.json()["amount_pending_refund"] == 1000
        [adjustment] = fake.adjustments.values()
        assert adjustment["type"] == "partial"
        assert adjustment["reason"] == f"customer asked [{pending['refund_id']}]"
        assert pending["provider_refund_id"] == adjustment["id"]

        # While Paddle has not decided, asking for more is refused in our words.
        second = await refund(client, payment_id, admin, 500)
        assert_problem(second, 409, "invalid_payment_state")
        assert_nothing_from_paddle(second)

        fake.approve_adjustment(adjustment["id"])
        delivered = await deliver(client, fake, fake.last_event("adjustment.updated"))
        assert delivered.status_code == 200, delivered.text
        listed = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(alice))
        assert listed.json()["amount_refunded"] == 1000
        assert listed.json()["amount_pending_refund"] == 0
        [done] = listed.json()["refunds"]
        assert (done["refund_id"], done["status"]) == (pending["refund_id"], "succeeded")
        status = (await verify(client, payment_id, token=alice)).json()["status"]
        assert status == "partially_refunded"

    async def test_rejected_gives_the_amount_back(
        self, client: httpx.AsyncClient, fake: FakePaddle, token: Any
    ) -> None:
        alice, admin = token("alice"), token("ops", admin=True)
        payment_id = await paid(client, fake, alice)
        asked = await refund(client, payment_id, admin)  # all of it: a full adjustment
        assert asked.status_code == 202, asked.text
        [adjustment] = fake.adjustments.values()
        assert adjustment["type"] == "full"

        fake.reject_adjustment(adjustment["id"])
        # No webhook this time: verify asks Paddle about the pending refund.
        verified = await verify(client, payment_id, token=alice)
        assert verified.json()["status"] == "succeeded"
        assert verified.json()["amount_pending_refund"] == 0
        listed = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(alice))
        [rejected] = listed.json()["refunds"]
        assert rejected["status"] == "failed"
        again = await refund(client, payment_id, admin, 2900)
        assert again.status_code == 202, again.text

    async def test_a_lost_answer_never_refunds_twice(
        self, client: httpx.AsyncClient, fake: FakePaddle, token: Any
    ) -> None:
        alice, admin = token("alice"), token("ops", admin=True)
        payment_id = await paid(client, fake, alice)
        fake.fail_next("hang_after", path_prefix="/adjustments", method="POST")
        key = {"Idempotency-Key": "refund-1"}
        lost = await client.post(
            f"{API}/{payment_id}/refund", json={"amount": 700}, headers={**bearer(admin), **key}
        )
        assert_problem(lost, 503, "provider_unavailable")
        fake.release_hangs()
        retried = await client.post(
            f"{API}/{payment_id}/refund", json={"amount": 700}, headers={**bearer(admin), **key}
        )
        assert retried.status_code == 202, retried.text
        assert len(fake.adjustments) == 1
        assert len(fake.calls("POST", "/adjustments")) == 1


class TestWebhooks:
    async def test_a_valid_event_pays_and_a_duplicate_changes_nothing(
        self, client: httpx.AsyncClient, fake: FakePaddle, app: Any
    ) -> None:
        payment_id = await paddle_payment(client)
        fake.pay(payment_id)
        event = fake.last_event("transaction.completed")
        first = await deliver(client, fake, event)
        assert first.status_code == 200, first.text
        record = await app.state.store.get(payment_id)
        assert record.status == "succeeded"
        history = await app.state.store.history(payment_id)
        again = await deliver(client, fake, event)
        assert again.status_code == 200, again.text
        assert await app.state.store.history(payment_id) == history

    async def test_out_of_order_events_never_move_a_payment_back(
        self, client: httpx.AsyncClient, fake: FakePaddle, app: Any, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paddle_payment(client)
        fake.pay(payment_id)
        assert (await deliver(client, fake, fake.last_event("transaction.completed"))).is_success
        assert (await deliver(client, fake, fake.last_event("transaction.paid"))).is_success
        assert (await app.state.store.get(payment_id)).status == "succeeded"

        asked = await refund(client, payment_id, admin, 900)
        [adjustment] = fake.adjustments.values()
        fake.approve_adjustment(adjustment["id"])
        # Paddle's "approved" arrives before its "created".
        assert (await deliver(client, fake, fake.last_event("adjustment.updated"))).is_success
        assert (await deliver(client, fake, fake.last_event("adjustment.created"))).is_success
        listed = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(admin))
        [done] = listed.json()["refunds"]
        assert done["refund_id"] == asked.json()["refund"]["refund_id"]
        assert done["status"] == "succeeded"

    async def test_a_rotated_secret_is_accepted_beside_the_old_one(
        self, client: httpx.AsyncClient, fake: FakePaddle, app: Any
    ) -> None:
        payment_id = await paddle_payment(client)
        fake.pay(payment_id)
        event = fake.last_event("transaction.completed")
        delivered = await deliver(
            client, fake, event, secrets=["pdl_ntfset_the_new_secret_0123456789", WEBHOOK_SECRET]
        )
        assert delivered.status_code == 200, delivered.text
        assert (await app.state.store.get(payment_id)).status == "succeeded"

    @pytest.mark.parametrize(
        "how",
        ["forged", "stale", "ahead", "unsigned", "altered", "malformed"],
    )
    async def test_refused_deliveries_change_nothing(
        self, client: httpx.AsyncClient, fake: FakePaddle, app: Any, how: str
    ) -> None:
        payment_id = await paddle_payment(client)
        fake.pay(payment_id)
        event = fake.last_event("transaction.completed")
        body, headers = fake.signed_delivery(event)
        if how == "forged":
            body, headers = fake.signed_delivery(event, secrets=["pdl_ntfset_not_the_secret"])
        elif how == "stale":
            body, headers = fake.signed_delivery(event, timestamp=int(time.time()) - 60)
        elif how == "ahead":
            body, headers = fake.signed_delivery(event, timestamp=int(time.time()) + 60)
        elif how == "unsigned":
            headers = {"Content-Type": "application/json"}
        elif how == "altered":
            body = body.replace(b'"completed"', b'"canceled"', 1)
        else:
            headers = {**headers, "Paddle-Signature": "ts=abc;h1=zz"}
        answer = await client.post(f"{API}/webhook/paddle", content=body, headers=headers)
        assert_problem(answer, 400, "invalid_signature")
        assert (await app.state.store.get(payment_id)).status == "pending"

    async def test_other_events_are_acknowledged_and_ignored(
        self, client: httpx.AsyncClient, fake: FakePaddle
    ) -> None:
        payment_id = await paddle_payment(client)
        answer = await deliver(client, fake, fake.last_event("transaction.created"))
        assert answer.status_code == 200, answer.text
        assert answer.json()["outcome"] == "ignored"
        assert (await verify(client, payment_id)).json()["status"] == "pending"

    async def test_a_signed_body_that_is_no_event_is_refused(
        self, client: httpx.AsyncClient, fake: FakePaddle
    ) -> None:
        answer = await deliver(client, fake, b'{"hello": "world"}')
        assert_problem(answer, 400, "invalid_payload")


class TestFailures:
    async def test_an_outage_is_503_with_retry_after(
        self, client: httpx.AsyncClient, fake: FakePaddle
    ) -> None:
        fake.fail_next("unavailable", path_prefix="/transactions")
        response = await create(client)
        assert_problem(response, 503, "provider_unavailable")
        assert int(response.headers["Retry-After"]) >= 1
        assert_nothing_from_paddle(response)

    async def test_a_lost_create_is_not_retried(
        self, client: httpx.AsyncClient, fake: FakePaddle
    ) -> None:
        fake.fail_next("hang", path_prefix="/transactions")
        response = await create(client)
        assert_problem(response, 503, "provider_unavailable")
        # Sent once: Paddle takes no idempotency key, so a write is never repeated blindly.
        assert len(fake.calls("POST", "/transactions")) == 1

    async def test_rate_limited_reads_are_retried(
        self, client: httpx.AsyncClient, fake: FakePaddle
    ) -> None:
        payment_id = await paddle_payment(client)
        fake.fail_next("rate_limit", path_prefix="/transactions/", retry_after=1)
        response = await verify(client, payment_id)
        assert response.status_code == 200, response.text
        assert len(fake.calls("GET", f"/transactions/{payment_id}")) == 2

    async def test_no_default_payment_link_is_misconfigured(
        self, client: httpx.AsyncClient, fake: FakePaddle
    ) -> None:
        fake.default_payment_link = None
        response = await create(client)
        assert_problem(response, 503, "provider_misconfigured")
        assert_nothing_from_paddle(response)

    async def test_health_reports_paddle(
        self, client: httpx.AsyncClient, fake: FakePaddle, token: Any
    ) -> None:
        health = await client.get("/admin/health", headers=bearer(token("ops", admin=True)))
        assert health.status_code == 200, health.text
        assert "paddle" in health.text
        assert fake.calls("GET", "/transactions")


class TestMisconfigured:
    @pytest.fixture
    def paddle_env(self) -> dict[str, str | None]:
        return {"PADDLE_API_KEY": "pdl_sdbx_apikey_01revokedkey0000000000000000"}

    async def test_a_wrong_key_is_503_provider_misconfigured(
        self, client: httpx.AsyncClient, fake: FakePaddle
    ) -> None:
        response = await create(client)
        assert_problem(response, 503, "provider_misconfigured")
        assert_nothing_from_paddle(response)
        assert "pdl_sdbx_apikey_01revokedkey" not in response.text
