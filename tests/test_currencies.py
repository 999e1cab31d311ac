"""A catalogue priced in several currencies: create-intent chooses among a plan's prices, the
plans endpoint lists them, and settings refuse prices that are not money."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from pypdf import PdfReader

from tests.conftest import (
    assert_problem,
    bearer,
    create_payment,
    make_settings,
    pay_in_sandbox,
)

PLANS = {
    "pro": {"name": "Pro", "prices": {"EUR": 2900, "USD": 3100, "NGN": 4500000}},
    "basic": {"name": "Basic", "amount": 1900, "currency": "EUR"},  # the one-currency form
}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"payment_plans": PLANS}


class TestCreateIntent:
    async def test_the_first_price_without_a_currency(self, client: httpx.AsyncClient) -> None:
        created = await create_payment(client, plan="pro")
        assert (created["amount"], created["currency"]) == (2900, "EUR")

    @pytest.mark.parametrize(
        ("asked", "amount", "currency"), [("usd", 3100, "USD"), ("NGN", 4500000, "NGN")]
    )
    async def test_the_price_in_the_currency_asked_for(
        self, client: httpx.AsyncClient, asked: str, amount: int, currency: str
    ) -> None:
        created = await create_payment(client, plan="pro", currency=asked)
        assert (created["amount"], created["currency"]) == (amount, currency)

    async def test_a_currency_the_plan_is_not_priced_in(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent", json={"plan": "basic", "currency": "USD"}
        )
        body = assert_problem(response, 422, "currency_not_offered")
        assert (body["currency"], body["offered"]) == ("USD", ["EUR"])

    @pytest.mark.parametrize("currency", ["EURO", "€", "", 978, ["EUR"], "E1R", " EUR"])
    async def test_not_a_currency_code(self, client: httpx.AsyncClient, currency: Any) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent", json={"plan": "pro", "currency": currency}
        )
        assert_problem(response, 422, "validation_error")

    async def test_a_retry_in_another_currency_is_another_request(
        self, client: httpx.AsyncClient
    ) -> None:
        headers = {"Idempotency-Key": "order-77"}
        first = await client.post(
            "/api/v1/payment/create-intent",
            json={"plan": "pro", "currency": "USD"},
            headers=headers,
        )
        again = await client.post(
            "/api/v1/payment/create-intent",
            json={"plan": "pro", "currency": "usd"},
            headers=headers,
        )
        assert first.status_code == 201 and again.json() == first.json()
        other = await client.post(
            "/api/v1/payment/create-intent",
            json={"plan": "pro", "currency": "NGN"},
            headers=headers,
        )
        assert_problem(other, 422, "idempotency_key_reused")

    async def test_a_receipt_in_naira(self, client: httpx.AsyncClient, token: Any) -> None:
        user = token("ada")
        created = await create_payment(client, plan="pro", currency="NGN", token=user)
        assert (await pay_in_sandbox(client, created["payment_id"])).status_code in (200, 303)
        receipt = await client.get(
            f"/api/v1/payment/receipt/{created['payment_id']}", headers=bearer(user)
        )
        assert receipt.status_code == 200, receipt.text
        assert receipt.json()["amount_formatted"] == "NGN45,000.00"
        pdf = await client.get(
            f"/api/v1/payment/receipt/{created['payment_id']}/pdf", headers=bearer(user)
        )
        text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
        assert "NGN45,000.00" in text


class TestPlansEndpoint:
    async def test_every_plan_with_its_prices(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/api/v1/payment/plans")
        assert response.status_code == 200
        assert response.headers["cache-control"] == "public, max-age=60"
        plans = {plan["code"]: plan for plan in response.json()["plans"]}
        assert plans["pro"]["default_currency"] == "EUR"
        assert plans["pro"]["prices"] == [
            {
                "currency": "EUR",
                "amount": 2900,
                "amount_formatted": "€29.00",
                "providers": ["sandbox"],
            },
            {
                "currency": "USD",
                "amount": 3100,
                "amount_formatted": "$31.00",
                "providers": ["sandbox"],
            },
            {
                "currency": "NGN",
                "amount": 4500000,
                "amount_formatted": "NGN45,000.00",
                "providers": ["sandbox"],
            },
        ]
        assert plans["basic"]["prices"][0]["amount"] == 1900

    async def test_public(self, client: httpx.AsyncClient) -> None:
        # No token needed, and a bad one does not matter: nothing here is anyone's.
        response = await client.get("/api/v1/payment/plans", headers=bearer("not-a-token"))
        assert response.status_code == 200


class TestEmailFromTheToken:
    async def test_the_tokens_email_claim_is_the_buyers(
        self, app: Any, client: httpx.AsyncClient, token: Any
    ) -> None:
        user = token("ada", email="ada@example.com")
        created = await create_payment(client, token=user)
        stored = await app.state.store.get(created["payment_id"])
        assert stored.customer_email == "ada@example.com"

    async def test_the_clients_email_wins(
        self, app: Any, client: httpx.AsyncClient, token: Any
    ) -> None:
        user = token("ada", email="ada@example.com")
        created = await create_payment(client, token=user, customer_email="billing@example.org")
        stored = await app.state.store.get(created["payment_id"])
        assert stored.customer_email == "billing@example.org"


class TestSettings:
    @pytest.mark.parametrize(
        "plans",
        [
            {"x": {"name": "X", "prices": {}}},
            {"x": {"name": "X", "prices": {"EURO": 100}}},
            {"x": {"name": "X", "prices": {"XYZ": 100}}},
            {"x": {"name": "X", "prices": {"EUR": 0}}},
            {"x": {"name": "X", "prices": {"EUR": 1.5}}},
            {"x": {"name": "X", "prices": {"EUR": "100"}}},
            {"x": {"name": "X", "prices": {"EUR": 100}, "amount": 100, "currency": "EUR"}},
            {"x": {"name": "X", "amount": 100, "currency": "eur"}},
        ],
    )
    def test_refused(self, plans: dict[str, Any], tmp_path: Any) -> None:
        with pytest.raises(ValidationError):
            make_settings("redis://127.0.0.1:1", tmp_path, payment_plans=plans)

    def test_lower_case_price_currencies_are_read_as_upper_case(self, tmp_path: Any) -> None:
        settings = make_settings(
            "redis://127.0.0.1:1",
            tmp_path,
            payment_plans={"x": {"name": "X", "prices": {"ngn": 5}}},
        )
        assert settings.plans["x"].prices == {"NGN": 5}
