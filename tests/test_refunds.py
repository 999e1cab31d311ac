"""Refunds as records of their own, on the sandbox provider, through the API.

A pending refund moves no money in our books: it holds its amount against the balance until
the provider says how it ended. The sandbox rehearses refunds that stay pending and then
succeed or fail, telling the service directly or by pushed webhooks.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from tests.conftest import assert_problem, bearer, create_payment, pay_in_sandbox

SETTLE_MS = 300


async def _paid(client: httpx.AsyncClient, **sandbox: Any) -> str:
    body: dict[str, Any] = {"sandbox": sandbox} if sandbox else {}
    payment = await create_payment(client, plan="pro", **body)  # 2900 EUR
    await pay_in_sandbox(client, payment["payment_id"])
    return str(payment["payment_id"])


@pytest.fixture
def admin(token: Any) -> dict[str, str]:
    return bearer(token("ops", admin=True))


async def _refund(
    client: httpx.AsyncClient, payment_id: str, headers: dict[str, str], **body: Any
) -> httpx.Response:
    return await client.post(f"/api/v1/payment/{payment_id}/refund", json=body, headers=headers)


async def _refunds(
    client: httpx.AsyncClient, payment_id: str, headers: dict[str, str]
) -> dict[str, Any]:
    response = await client.get(f"/api/v1/payment/{payment_id}/refunds", headers=headers)
    assert response.status_code == 200, response.text
    listing: dict[str, Any] = response.json()
    return listing


async def _until_settled(
    client: httpx.AsyncClient, payment_id: str, headers: dict[str, str]
) -> dict[str, Any]:
    for _ in range(100):
        listing = await _refunds(client, payment_id, headers)
        if listing["amount_pending_refund"] == 0:
            return listing
        await asyncio.sleep(0.05)
    raise AssertionError(f"the refunds of {payment_id} stayed pending: {listing}")


class TestImmediateRefund:
    async def test_answers_the_payment_with_the_refund(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        payment_id = await _paid(client)
        response = await _refund(client, payment_id, admin, amount=900, reason="damaged")
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["status"], body["amount_refunded"], body["amount_pending_refund"]) == (
            "partially_refunded",
            900,
            0,
        )
        refund = body["refund"]
        assert refund["refund_id"].startswith("rf_")
        assert (refund["amount"], refund["currency"], refund["status"], refund["reason"]) == (
            900,
            "EUR",
            "succeeded",
            "damaged",
        )
        assert refund["provider_refund_id"].startswith("sbre_")
        assert [entry["status"] for entry in refund["history"]] == ["pending", "succeeded"]
        listing = await _refunds(client, payment_id, admin)
        assert [r["refund_id"] for r in listing["refunds"]] == [refund["refund_id"]]
        assert (listing["amount_refunded"], listing["amount_pending_refund"]) == (900, 0)

    async def test_owner_sees_refunds_and_others_do_not(
        self, client: httpx.AsyncClient, admin: dict[str, str], token: Any
    ) -> None:
        payment = await create_payment(client, token=token("alice"))
        await pay_in_sandbox(client, payment["payment_id"])
        await _refund(client, payment["payment_id"], admin, amount=100)
        url = f"/api/v1/payment/{payment['payment_id']}/refunds"
        mine = await client.get(url, headers=bearer(token("alice")))
        assert mine.status_code == 200 and len(mine.json()["refunds"]) == 1
        assert_problem(
            await client.get(url, headers=bearer(token("mallory"))), 404, "payment_not_found"
        )
        assert_problem(await client.get(url), 401, "not_authenticated")

    @pytest.mark.parametrize("amount", [True, "100", 1.0, 0, -1, 10**30])
    async def test_amount_is_a_strict_positive_integer(
        self, client: httpx.AsyncClient, admin: dict[str, str], amount: object
    ) -> None:
        payment_id = await _paid(client)
        response = await _refund(client, payment_id, admin, amount=amount)
        assert response.status_code == 422, response.text
        assert response.json()["code"] in ("validation_error", "refund_exceeds_balance")
        assert (await _refunds(client, payment_id, admin))["refunds"] == []


class TestPendingRefunds:
    async def test_pending_moves_no_money_until_it_succeeds(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        payment_id = await _paid(
            client, refund="pending_then_succeeded", refund_settle_ms=SETTLE_MS
        )
        response = await _refund(client, payment_id, admin, amount=2000)
        assert response.status_code == 202, response.text
        body = response.json()
        assert (body["status"], body["amount_refunded"], body["amount_pending_refund"]) == (
            "succeeded",
            0,
            2000,
        )
        assert body["refund"]["status"] == "pending"
        # Pending refunds count against the balance: 900 is left, not 2900.
        too_much = await _refund(client, payment_id, admin, amount=1000)
        assert_problem(too_much, 422, "refund_exceeds_balance")
        listing = await _until_settled(client, payment_id, admin)
        assert (listing["amount_refunded"], listing["refunds"][0]["status"]) == (2000, "succeeded")
        verify = await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        assert (verify.json()["status"], verify.json()["amount_refunded"]) == (
            "partially_refunded",
            2000,
        )

    async def test_a_failed_refund_gives_the_balance_back(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        payment_id = await _paid(client, refund="pending_then_failed", refund_settle_ms=SETTLE_MS)
        response = await _refund(client, payment_id, admin)
        assert response.status_code == 202, response.text
        assert response.json()["amount_pending_refund"] == 2900
        listing = await _until_settled(client, payment_id, admin)
        refund = listing["refunds"][0]
        assert (refund["status"], refund["failure_code"]) == ("failed", "sandbox_refund_failed")
        assert [entry["status"] for entry in refund["history"]] == ["pending", "failed"]
        verify = await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        # Never refunded, never moved backwards: paid, with all of it refundable again.
        assert (verify.json()["status"], verify.json()["amount_refunded"]) == ("succeeded", 0)
        again = await _refund(client, payment_id, admin, amount=2900)
        assert again.status_code == 202, again.text

    async def test_the_reconciler_follows_a_pending_refund(
        self, app: Any, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        payment_id = await _paid(
            client, refund="pending_then_succeeded", refund_settle_ms=SETTLE_MS
        )
        sandbox = app.state.sandbox_checkout.sandbox()
        response = await _refund(client, payment_id, admin, amount=2900)
        assert response.status_code == 202
        # The sandbox's worker goes away before its timer fires: nobody tells the service.
        await sandbox.aclose()
        await asyncio.sleep(SETTLE_MS / 1000 + 0.2)
        assert (await _refunds(client, payment_id, admin))["amount_pending_refund"] == 2900
        store = app.state.store
        assert await store.reconcile_due_at(payment_id) is not None  # queued when it stayed pending
        await store.schedule_reconcile(payment_id, after_s=-1, sooner_only=False)
        run = await app.state.reconciler.run_once()
        assert run.leader and run.checked == 1 and run.settled == 1
        listing = await _refunds(client, payment_id, admin)
        assert (listing["amount_refunded"], listing["amount_pending_refund"]) == (2900, 0)
        verify = await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        assert verify.json()["status"] == "refunded"


class TestRefundIdempotency:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"rate_limits_enabled": False}  # 20 refunds at once: more than 10 a minute

    async def test_same_key_refunds_once(
        self, app: Any, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        payment_id = await _paid(client)
        headers = {**admin, "Idempotency-Key": "refund-once-1"}
        first = await _refund(client, payment_id, headers, amount=1000)
        second = await _refund(client, payment_id, headers, amount=1000)
        assert first.status_code == second.status_code == 200
        assert first.json() == second.json()
        assert "idempotent-replayed" not in first.headers
        assert second.headers["idempotent-replayed"] == "true"
        listing = await _refunds(client, payment_id, admin)
        assert len(listing["refunds"]) == 1 and listing["amount_refunded"] == 1000
        # The provider refunded once too.
        sandbox = app.state.sandbox_checkout.sandbox()
        state = await sandbox.verify_payment(payment_id)
        assert state.status == "partially_refunded"
        session = await sandbox.session(payment_id)
        assert session["refunded"] == "1000"

    async def test_same_key_other_body_is_refused(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        payment_id = await _paid(client)
        headers = {**admin, "Idempotency-Key": "refund-once-2"}
        assert (await _refund(client, payment_id, headers, amount=1000)).status_code == 200
        other = await _refund(client, payment_id, headers, amount=1500)
        assert_problem(other, 422, "idempotency_key_reused")

    async def test_concurrent_refunds_never_exceed_the_payment(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        payment_id = await _paid(client)
        answers = await asyncio.gather(
            *(_refund(client, payment_id, admin, amount=1000) for _ in range(20))
        )
        codes = sorted(answer.status_code for answer in answers)
        assert codes == [200, 200] + [422] * 18, [a.text for a in answers]
        for answer in answers:
            if answer.status_code == 200:
                assert answer.json()["refund"]["status"] == "succeeded"
            else:
                assert answer.json()["code"] == "refund_exceeds_balance"
        listing = await _refunds(client, payment_id, admin)
        assert (len(listing["refunds"]), listing["amount_refunded"]) == (2, 2000)

    async def test_concurrent_same_key_refunds_once(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        payment_id = await _paid(client)
        headers = {**admin, "Idempotency-Key": "refund-race"}
        answers = await asyncio.gather(
            *(_refund(client, payment_id, headers, amount=700) for _ in range(10))
        )
        ids = {a.json()["refund"]["refund_id"] for a in answers if a.status_code == 200}
        assert len(ids) == 1, [a.text for a in answers]
        assert all(a.status_code in (200, 409) for a in answers)
        assert (await _refunds(client, payment_id, admin))["amount_refunded"] == 700


class TestCreateIdempotencyOutlivesItsLease:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"idempotency_lease_seconds": 0.3}

    async def test_a_retry_during_a_slow_create_starts_nothing(
        self, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        body = {"plan": "pro", "sandbox": {"delay_ms": 1500}}
        headers = {"Idempotency-Key": "slow-create-1"}

        async def create() -> httpx.Response:
            return await client.post("/api/v1/payment/create-intent", json=body, headers=headers)

        caplog.set_level(logging.INFO, logger="payments.service")
        first = asyncio.create_task(create())
        await asyncio.sleep(0.9)  # three leases later: the claim must still be held
        retry = await create()
        answer = await first
        assert answer.status_code == retry.status_code == 201, (answer.text, retry.text)
        assert answer.json() == retry.json()
        created = [r for r in caplog.records if r.getMessage() == "payment.created"]
        assert len(created) == 1, "the retry started a second create"


class TestCreditNotesForSucceededRefunds:
    async def test_pending_refunds_get_none_succeeded_ones_do(
        self, client: httpx.AsyncClient, app: Any, admin: dict[str, str], token: Any
    ) -> None:
        # The receipt never changes after it is issued: what went back is on a credit note.
        alice = bearer(token("alice"))
        payment = await create_payment(
            client,
            token=token("alice"),
            sandbox={"refund": "pending_then_succeeded", "refund_settle_ms": SETTLE_MS},
        )
        payment_id = payment["payment_id"]
        await pay_in_sandbox(client, payment_id)
        url = f"/api/v1/payment/receipt/{payment_id}"
        receipt = (await client.get(f"{url}/pdf", headers=alice)).content
        assert (await _refund(client, payment_id, admin, amount=900)).status_code == 202
        # Pending: nothing went back yet, so there is no credit note.
        assert (await client.get(url, headers=alice)).json()["credit_notes"] == []
        await _until_settled(client, payment_id, admin)
        await app.state.receipts.drain()
        meta = (await client.get(url, headers=alice)).json()
        [note] = meta["credit_notes"]
        assert note["amount"] == 900
        text = _pdf_text((await client.get(note["pdf_url"], headers=alice)).content)
        assert "Credit note" in text and "9.00" in text and meta["receipt_number"] in text
        assert (await client.get(f"{url}/pdf", headers=alice)).content == receipt


def _pdf_text(data: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)
