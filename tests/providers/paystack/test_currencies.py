"""A catalogue priced in euros and naira, with Paystack beside the sandbox: the currency
decides which providers may take a payment, and a currency Paystack does not charge is
refused, never charged in another one."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import assert_problem
from tests.fakes.paystack_server import FakePaystack

from .conftest import API

PLANS = {"pro": {"name": "Pro", "prices": {"EUR": 2900, "NGN": 4500000}}}


@pytest.fixture
def settings_overrides(paystack_env: dict[str, str]) -> dict[str, Any]:
    return {
        "payment_plans": PLANS,
        "payment_provider": "paystack",
        "payment_fallback": ["sandbox"],
        "provider_timeout_seconds": 0.5,
    }


async def _create(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post(
        f"{API}/create-intent",
        json={"plan": "pro", "customer_email": "ada@example.ng", **body},
    )


class TestRoutingByCurrency:
    async def test_naira_goes_to_paystack(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        created = await _create(client, currency="ngn")
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["provider"], body["amount"], body["currency"]) == ("paystack", 4500000, "NGN")
        assert body["payment_id"].startswith("ps_")

    async def test_euros_skip_paystack_for_the_fallback(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        created = await _create(client, currency="EUR")
        assert created.status_code == 201, created.text
        assert (created.json()["provider"], created.json()["currency"]) == ("sandbox", "EUR")
        assert fake.calls("POST") == []  # Paystack was never asked

    async def test_euros_asked_of_paystack_are_refused(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        response = await _create(client, currency="EUR", provider="paystack")
        body = assert_problem(response, 422, "currency_not_supported")
        assert (body["currency"], body["provider"]) == ("EUR", "paystack")

    async def test_the_plans_say_who_takes_naira(self, client: httpx.AsyncClient) -> None:
        plans = (await client.get(f"{API}/plans")).json()["plans"]
        prices = {price["currency"]: price for price in plans[0]["prices"]}
        assert prices["NGN"]["providers"] == ["paystack", "sandbox"]
        assert prices["NGN"]["amount_formatted"] == "NGN45,000.00"
        assert prices["EUR"]["providers"] == ["sandbox"]
