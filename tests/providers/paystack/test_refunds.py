"""Refunds of Paystack payments through the service's API: they start pending at Paystack
and are processed (or fail) later; the service's refund records follow."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import assert_problem, bearer
from tests.fakes.paystack_server import FakePaystack

from .conftest import API, paid_payment, reference, refund, verify


def refund_ids(fake: FakePaystack) -> list[int]:
    return sorted(fake.refunds)


async def refunds_of(client: httpx.AsyncClient, payment_id: str, token: str) -> dict[str, Any]:
    response = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


class TestPartialRefund:
    async def test_pending_then_processed(
        self, client: httpx.AsyncClient, fake: FakePaystack, token: Any
    ) -> None:
        admin = token("admin", admin=True)
        payment_id = await paid_payment(client, fake, token=admin, customer_email="a@example.ng")
        asked = await refund(client, payment_id, admin, 1000000)
        assert asked.status_code == 202, asked.text
        ours = asked.json()["refund"]
        assert (ours["status"], ours["amount"]) == ("pending", 1000000)

        [paystack_id] = refund_ids(fake)
        sent = fake.calls("POST", "/refund")[0].body
        assert sent == {
            "transaction": reference(payment_id),
            "amount": 1000000,
            "currency": "NGN",
            "merchant_note": ours["refund_id"],
            "customer_note": "Refund",
        }
        listed = await refunds_of(client, payment_id, admin)
        assert (listed["amount_refunded"], listed["amount_pending_refund"]) == (0, 1000000)

        fake.process_refund(paystack_id)
        verified = await verify(client, payment_id, token=admin)
        assert verified.json()["status"] == "partially_refunded"
        listed = await refunds_of(client, payment_id, admin)
        [record] = listed["refunds"]
        assert (record["refund_id"], record["status"]) == (ours["refund_id"], "succeeded")
        assert (listed["amount_refunded"], listed["amount_pending_refund"]) == (1000000, 0)

    async def test_a_failed_refund_gives_the_amount_back(
        self, client: httpx.AsyncClient, fake: FakePaystack, token: Any
    ) -> None:
        admin = token("admin", admin=True)
        payment_id = await paid_payment(client, fake, token=admin, customer_email="a@example.ng")
        assert (await refund(client, payment_id, admin, 500000)).status_code == 202
        [paystack_id] = refund_ids(fake)
        fake.fail_refund(paystack_id)
        verified = await verify(client, payment_id, token=admin)
        assert verified.json()["status"] == "succeeded"
        listed = await refunds_of(client, payment_id, admin)
        assert [r["status"] for r in listed["refunds"]] == ["failed"]
        assert (listed["amount_refunded"], listed["amount_pending_refund"]) == (0, 0)


class TestFullRefund:
    async def test_everything_back_and_the_transaction_reversed(
        self, client: httpx.AsyncClient, fake: FakePaystack, token: Any
    ) -> None:
        admin = token("admin", admin=True)
        payment_id = await paid_payment(client, fake, token=admin, customer_email="a@example.ng")
        assert (await refund(client, payment_id, admin)).status_code == 202
        [paystack_id] = refund_ids(fake)
        assert fake.refunds[paystack_id]["amount"] == 4500000
        fake.process_refund(paystack_id)
        assert fake.transactions[reference(payment_id)]["status"] == "reversed"
        verified = await verify(client, payment_id, token=admin)
        assert verified.json()["status"] == "refunded"

    async def test_more_than_is_left_is_refused_before_paystack_is_asked(
        self, client: httpx.AsyncClient, fake: FakePaystack, token: Any
    ) -> None:
        admin = token("admin", admin=True)
        payment_id = await paid_payment(client, fake, token=admin, customer_email="a@example.ng")
        assert (await refund(client, payment_id, admin, 4000000)).status_code == 202
        response = await refund(client, payment_id, admin, 600000)
        assert_problem(response, 422, "refund_exceeds_balance")
        assert len(fake.calls("POST", "/refund")) == 1


class TestLostAnswers:
    async def test_a_lost_answer_is_found_again_never_refunded_twice(
        self, client: httpx.AsyncClient, fake: FakePaystack, token: Any
    ) -> None:
        admin = token("admin", admin=True)
        payment_id = await paid_payment(client, fake, token=admin, customer_email="a@example.ng")
        # Paystack makes the refund, but its answer never arrives.
        fake.fail_next("hang_after", path_prefix="/refund", method="POST")
        lost = await refund(client, payment_id, admin, 1000000, key="refund-1")
        assert_problem(lost, 503, "provider_unavailable")
        assert len(fake.refunds) == 1
        assert len(fake.calls("POST", "/refund")) == 1  # a write that may have landed: once
        fake.release_hangs()

        # The client asks again with its key: the refund Paystack made is found by our id.
        again = await refund(client, payment_id, admin, 1000000, key="refund-1")
        assert again.status_code == 202, again.text
        assert len(fake.refunds) == 1
        assert len(fake.calls("POST", "/refund")) == 1
        [paystack_id] = refund_ids(fake)
        assert fake.refunds[paystack_id]["merchant_note"] == again.json()["refund"]["refund_id"]

    async def test_paystack_down_before_the_ask_keeps_it_pending_until_paystack_is_back(
        self, client: httpx.AsyncClient, fake: FakePaystack, token: Any
    ) -> None:
        admin = token("admin", admin=True)
        payment_id = await paid_payment(client, fake, token=admin, customer_email="a@example.ng")
        # The transaction cannot be read: whether an earlier ask under the same refund id
        # reached Paystack is unknown, so the refund stays pending (reserved), not forgotten.
        fake.fail_next("unavailable", times=3, path_prefix="/transaction/verify")
        response = await refund(client, payment_id, admin, 1000000)
        assert_problem(response, 503, "provider_unavailable")
        assert fake.refunds == {}
        listed = await refunds_of(client, payment_id, admin)
        [pending] = listed["refunds"]
        assert (pending["status"], listed["amount_pending_refund"]) == ("pending", 1000000)

        # Paystack is back: the next verify follows the pending refund and asks once.
        verified = await verify(client, payment_id, token=admin)
        assert verified.status_code == 200, verified.text
        [paystack_id] = refund_ids(fake)
        assert fake.refunds[paystack_id]["merchant_note"] == pending["refund_id"]
        await verify(client, payment_id, token=admin)
        assert len(fake.calls("POST", "/refund")) == 1
