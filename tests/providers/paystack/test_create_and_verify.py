"""Creating a Paystack payment in naira, the customer paying at Paystack, verifying it, and
its receipt in naira: through the service's HTTP API against the fake Paystack."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from tests.conftest import assert_problem, bearer
from tests.fakes.paystack_server import FakePaystack

from .conftest import (
    API,
    PUBLIC_KEY,
    assert_nothing_from_paystack,
    create,
    new_payment,
    paid_payment,
    reference,
    verify,
)


class TestCreateIntent:
    async def test_initializes_a_transaction_in_naira_at_the_catalogue_price(
        self, client: httpx.AsyncClient, fake: FakePaystack, app: Any
    ) -> None:
        response = await create(
            client,
            customer_email="ada@example.ng",
            amount=1,  # never taken from a client
            return_url="https://shop.example/paid",
            cancel_url="https://shop.example/cart",
        )
        assert response.status_code == 201, response.text
        body = response.json()
        payment_id = body["payment_id"]
        assert payment_id.startswith("ps_ord-")
        assert (body["provider"], body["status"]) == ("paystack", "pending")
        assert (body["amount"], body["currency"]) == (4500000, "NGN")

        [call] = fake.calls("POST", "/transaction/initialize")
        sent = call.body
        assert sent is not None
        record = await app.state.store.get(payment_id)
        assert sent["reference"] == reference(payment_id) == record.reference.replace("_", "-")
        # Kobo, as Paystack counts naira: 4 500 000 kobo is ₦45,000.00.
        assert (sent["amount"], sent["currency"]) == (4500000, "NGN")
        assert sent["email"] == "ada@example.ng"
        assert sent["callback_url"] == "https://shop.example/paid"
        assert sent["metadata"]["payment_id"] == payment_id
        assert sent["metadata"]["cancel_action"] == "https://shop.example/cart"

        transaction = fake.transactions[reference(payment_id)]
        assert body["redirect_url"] == f"{fake.url}/checkout/{transaction['_access_code']}"
        assert body["publishable_key"] == PUBLIC_KEY

    async def test_email_comes_from_the_tokens_claim(
        self, client: httpx.AsyncClient, fake: FakePaystack, email_token: Any
    ) -> None:
        response = await create(client, token=email_token("ada", "ada@example.ng"))
        assert response.status_code == 201, response.text
        [call] = fake.calls("POST", "/transaction/initialize")
        assert call.body is not None and call.body["email"] == "ada@example.ng"

    async def test_the_clients_email_wins_over_the_tokens(
        self, client: httpx.AsyncClient, fake: FakePaystack, email_token: Any
    ) -> None:
        response = await create(
            client, token=email_token("ada", "ada@example.ng"), customer_email="bo@example.gh"
        )
        assert response.status_code == 201, response.text
        [call] = fake.calls("POST", "/transaction/initialize")
        assert call.body is not None and call.body["email"] == "bo@example.gh"

    @pytest.mark.parametrize("signed_in", [False, True])
    async def test_without_an_email_nothing_is_initialized(
        self, client: httpx.AsyncClient, fake: FakePaystack, email_token: Any, signed_in: bool
    ) -> None:
        token = email_token("ada", None) if signed_in else None
        response = await create(client, token=token)
        assert_problem(response, 422, "customer_email_required")
        assert fake.calls("POST") == []

    async def test_a_currency_the_account_does_not_take_is_refused_clearly(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        fake.currencies = frozenset({"GHS"})
        response = await create(client, customer_email="ada@example.ng")
        assert_problem(response, 422, "operation_not_supported")
        assert_nothing_from_paystack(response)


class TestPayAndVerify:
    async def test_paid_at_paystack_and_verified(
        self, client: httpx.AsyncClient, fake: FakePaystack, email_token: Any
    ) -> None:
        ada = email_token()
        payment_id = await new_payment(client, token=ada)
        fake.pay(reference(payment_id))
        verified = await verify(client, payment_id, token=ada)
        assert verified.status_code == 200, verified.text
        body = verified.json()
        assert (body["status"], body["amount"], body["currency"]) == ("succeeded", 4500000, "NGN")
        assert body["receipt_url"] == f"{API}/receipt/{payment_id}/pdf"
        [call] = fake.calls("GET", f"/transaction/verify/{reference(payment_id)}")
        assert call.status == 200

    async def test_the_checkout_page_sends_the_customer_back_with_the_reference(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        response = await create(
            client, customer_email="ada@example.ng", return_url="https://shop.example/paid"
        )
        payment_id = response.json()["payment_id"]
        async with httpx.AsyncClient() as browser:
            page = await browser.post(response.json()["redirect_url"], data={"outcome": "success"})
        assert page.status_code == 302
        ref = reference(payment_id)
        assert page.headers["location"] == (
            f"https://shop.example/paid?trxref={ref}&reference={ref}"
        )
        # The redirect proves nothing: the status comes from Paystack's verify.
        assert (await verify(client, payment_id)).json()["status"] == "succeeded"

    async def test_a_declined_card_fails_the_payment(
        self, client: httpx.AsyncClient, fake: FakePaystack, email_token: Any
    ) -> None:
        ada = email_token()
        payment_id = await new_payment(client, token=ada)
        fake.pay(reference(payment_id), "failed")
        verified = await verify(client, payment_id, token=ada)
        assert (verified.json()["status"], verified.json()["receipt_url"]) == ("failed", None)
        assert_nothing_from_paystack(verified)
        pdf = await client.get(f"{API}/receipt/{payment_id}/pdf", headers=bearer(ada))
        assert_problem(pdf, 409, "receipt_not_available")

    async def test_abandoned_is_canceled_until_the_customer_comes_back_and_pays(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        payment_id = await new_payment(client)
        # Paystack calls a checkout nobody has finished "abandoned".
        assert (await verify(client, payment_id)).json()["status"] == "canceled"
        # Waiting for an OTP is pending at Paystack; a canceled payment never moves back to
        # pending, but money moving takes it to succeeded.
        fake.pay(reference(payment_id), "ongoing")
        assert (await verify(client, payment_id)).json()["status"] == "canceled"
        fake.pay(reference(payment_id))
        assert (await verify(client, payment_id)).json()["status"] == "succeeded"

    async def test_a_reference_paystack_does_not_know_is_not_found(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        payment_id = await new_payment(client)
        fake.transactions.clear()  # Paystack lost it (another account's key, say)
        response = await verify(client, payment_id)
        assert_problem(response, 404, "payment_not_found")
        assert_nothing_from_paystack(response)


class TestReceipt:
    async def test_receipt_in_naira(
        self, client: httpx.AsyncClient, fake: FakePaystack, email_token: Any
    ) -> None:
        ada = email_token()
        payment_id = await paid_payment(client, fake, token=ada)
        meta = await client.get(f"{API}/receipt/{payment_id}", headers=bearer(ada))
        assert meta.status_code == 200, meta.text
        receipt = meta.json()
        assert (receipt["plan"], receipt["amount"], receipt["currency"]) == ("pro", 4500000, "NGN")
        assert receipt["amount_formatted"] == "NGN45,000.00"
        assert receipt["status"] == "succeeded"

        pdf = await client.get(f"{API}/receipt/{payment_id}/pdf", headers=bearer(ada))
        assert pdf.status_code == 200
        assert pdf.headers["content-type"] == "application/pdf"
        text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        for expected in (receipt["receipt_number"], "Pro", "NGN45,000.00", payment_id):
            assert expected in text, f"{expected!r} missing from the receipt"
