"""Paystack's webhooks at /api/v1/payment/webhook/paystack: the signature (hex HMAC-SHA512 of
the raw body keyed with the secret key) checked before anything is read; forged deliveries
refused; duplicates applied once; no timestamp, so a late event never moves anything back."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import httpx

from tests.conftest import assert_problem, bearer
from tests.fakes.paystack_server import FakePaystack

from .conftest import (
    API,
    SECRET_KEY,
    WEBHOOK_URL,
    deliver,
    new_payment,
    paid_payment,
    reference,
    refund,
    verify,
)


async def stored_status(app: Any, payment_id: str) -> str:
    record = await app.state.store.get(payment_id)
    assert record is not None
    return str(record.status)


class TestSignature:
    def test_the_fake_signs_as_paystack_documents(self, fake: FakePaystack) -> None:
        # Paystack's own recipe (payments/webhooks, "Verify event origin"), written out
        # independently of the fake and the provider.
        body, headers = fake.signed_delivery({"event": "charge.success", "data": {}})
        expected = hmac.new(SECRET_KEY.encode(), body, hashlib.sha512).hexdigest()
        assert headers["x-paystack-signature"] == expected
        assert len(expected) == 128

    async def test_charge_success_pays_the_payment(
        self, client: httpx.AsyncClient, fake: FakePaystack, app: Any
    ) -> None:
        payment_id = await new_payment(client)
        fake.pay(reference(payment_id))
        [event] = fake.events_of("charge.success", reference(payment_id))
        response = await deliver(client, fake, event)
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "applied"
        assert await stored_status(app, payment_id) == "succeeded"
        # Taken at its word: the webhook made no call to Paystack.
        assert fake.calls("GET", f"/transaction/verify/{reference(payment_id)}") == []

    async def test_a_forged_signature_is_refused_and_changes_nothing(
        self, client: httpx.AsyncClient, fake: FakePaystack, app: Any
    ) -> None:
        payment_id = await new_payment(client)
        fake.pay(reference(payment_id))
        [event] = fake.events_of("charge.success", reference(payment_id))
        forged = await deliver(client, fake, event, key="sk_test_someoneelse0123456789")
        assert_problem(forged, 400, "invalid_signature")
        assert await stored_status(app, payment_id) == "pending"

    async def test_an_altered_body_is_refused(
        self, client: httpx.AsyncClient, fake: FakePaystack, app: Any
    ) -> None:
        payment_id = await new_payment(client)
        event = {
            "event": "charge.success",
            "data": {"id": 1, "reference": reference(payment_id), "status": "success"},
        }
        body, headers = fake.signed_delivery(event)
        altered = body.replace(b'"id": 1', b'"id": 2')
        response = await client.post(WEBHOOK_URL, content=altered, headers=headers)
        assert_problem(response, 400, "invalid_signature")
        unsigned = await client.post(
            WEBHOOK_URL, content=body, headers={"Content-Type": "application/json"}
        )
        assert_problem(unsigned, 400, "invalid_signature")
        assert await stored_status(app, payment_id) == "pending"

    async def test_a_signed_body_that_is_not_an_event_is_refused(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        for body in (b"[1, 2", b'{"event": "charge.success"}', b'"hello"'):
            response = await deliver(client, fake, body)
            assert_problem(response, 400, "invalid_payload")

    async def test_other_events_are_acknowledged_and_ignored(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        event = {"event": "transfer.success", "data": {"id": 5, "reference": "TRF_1"}}
        response = await deliver(client, fake, event)
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "ignored"


class TestOnce:
    async def test_a_duplicated_delivery_applies_once(
        self, client: httpx.AsyncClient, fake: FakePaystack, app: Any
    ) -> None:
        payment_id = await new_payment(client)
        fake.pay(reference(payment_id))
        [event] = fake.events_of("charge.success", reference(payment_id))
        first = await deliver(client, fake, event)
        second = await deliver(client, fake, event)
        assert (first.json()["outcome"], second.json()["outcome"]) == ("applied", "duplicate")
        assert first.json()["event_id"] == second.json()["event_id"]
        history = await app.state.store.history(payment_id)
        assert [h.status for h in history].count("succeeded") == 1

    async def test_refund_events_follow_paystack_and_a_late_one_moves_nothing_back(
        self, client: httpx.AsyncClient, fake: FakePaystack, token: Any
    ) -> None:
        admin = token("admin", admin=True)
        payment_id = await paid_payment(client, fake, token=admin, customer_email="a@example.ng")
        asked = await refund(client, payment_id, admin, 1000000)
        assert asked.status_code == 202, asked.text
        [paystack_id] = fake.refunds
        fake.process_refund(paystack_id)
        [pending] = fake.events_of("refund.pending", reference(payment_id))
        [processed] = fake.events_of("refund.processed", reference(payment_id))

        applied = await deliver(client, fake, processed)
        assert applied.json()["outcome"] == "applied", applied.text
        again = await deliver(client, fake, processed)
        assert again.json()["outcome"] == "duplicate"
        # refund.pending arrives last: Paystack's word now is processed, and stays so.
        late = await deliver(client, fake, pending)
        assert late.status_code == 200, late.text
        assert late.json()["outcome"] in ("unchanged", "duplicate")

        listed = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(admin))
        [record] = listed.json()["refunds"]
        assert record["status"] == "succeeded"
        assert listed.json()["amount_refunded"] == 1000000
        assert (await verify(client, payment_id, token=admin)).json()["status"] == (
            "partially_refunded"
        )

    async def test_a_failed_refund_event(
        self, client: httpx.AsyncClient, fake: FakePaystack, token: Any
    ) -> None:
        admin = token("admin", admin=True)
        payment_id = await paid_payment(client, fake, token=admin, customer_email="a@example.ng")
        assert (await refund(client, payment_id, admin, 1000000)).status_code == 202
        [paystack_id] = fake.refunds
        fake.fail_refund(paystack_id)
        [failed] = fake.events_of("refund.failed", reference(payment_id))
        response = await deliver(client, fake, failed)
        assert response.json()["outcome"] == "applied", response.text
        listed = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(admin))
        assert [r["status"] for r in listed.json()["refunds"]] == ["failed"]
        assert listed.json()["amount_pending_refund"] == 0

    async def test_a_late_charge_success_never_undoes_a_refund(
        self, client: httpx.AsyncClient, fake: FakePaystack, token: Any, app: Any
    ) -> None:
        admin = token("admin", admin=True)
        payment_id = await paid_payment(client, fake, token=admin, customer_email="a@example.ng")
        assert (await refund(client, payment_id, admin)).status_code == 202
        [paystack_id] = fake.refunds
        fake.process_refund(paystack_id)
        assert (await verify(client, payment_id, token=admin)).json()["status"] == "refunded"
        [charge] = fake.events_of("charge.success", reference(payment_id))
        response = await deliver(client, fake, charge)
        assert response.status_code == 200, response.text
        assert await stored_status(app, payment_id) == "refunded"


class TestTamperedCharge:
    async def test_a_signed_success_for_another_sum_is_reread_and_failed(
        self, client: httpx.AsyncClient, fake: FakePaystack, app: Any
    ) -> None:
        payment_id = await new_payment(client)
        fake.tamper(reference(payment_id), amount=100)
        fake.pay(reference(payment_id))
        [event] = fake.events_of("charge.success", reference(payment_id))
        assert event["data"]["amount"] == 100
        response = await deliver(client, fake, event)
        assert response.status_code == 200, response.text
        assert await stored_status(app, payment_id) == "failed"
        # Not taken at its word: the transaction was read from Paystack.
        assert len(fake.calls("GET", f"/transaction/verify/{reference(payment_id)}")) == 1

    async def test_the_event_body_is_what_the_signature_covers(
        self, client: httpx.AsyncClient, fake: FakePaystack, app: Any
    ) -> None:
        payment_id = await new_payment(client)
        fake.pay(reference(payment_id))
        [event] = fake.events_of("charge.success", reference(payment_id))
        # Re-serialized differently but signed over these very bytes: accepted.
        body = json.dumps(event, indent=2, sort_keys=True).encode()
        response = await deliver(client, fake, body)
        assert response.json()["outcome"] == "applied", response.text
