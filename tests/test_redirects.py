"""return_url / cancel_url only send customers to hosts the operator listed: otherwise the
sandbox checkout (and every provider's page) would be an open redirect."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import assert_problem, create_payment, pay_in_sandbox

CREATE = "/api/v1/payment/create-intent"


class TestListedHosts:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"return_url_hosts": ["shop.example", ".brand.example"]}

    @pytest.mark.parametrize(
        "url",
        [
            "http://evil.example/steal",
            "https://shop.example.evil.example/",
            "https://brand.example.evil.example/",
            "https://evilshop.example/",
        ],
    )
    @pytest.mark.parametrize("field", ["return_url", "cancel_url"])
    async def test_other_hosts_are_refused(
        self, client: httpx.AsyncClient, field: str, url: str
    ) -> None:
        response = await client.post(CREATE, json={"plan": "pro", field: url})
        body = assert_problem(response, 422, "redirect_not_allowed")
        assert body["field"] == field

    async def test_listed_hosts_and_subdomains_pass(self, client: httpx.AsyncClient) -> None:
        payment = await create_payment(
            client,
            return_url="https://SHOP.example/done",
            cancel_url="https://eu.brand.example/cart",
        )
        paid = await pay_in_sandbox(client, payment["payment_id"])
        assert paid.status_code == 303
        assert paid.headers["location"].lower().startswith("https://shop.example/done")


class TestDefaultIsTheServiceItself:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"return_url_hosts": [], "public_base_url": "https://pay.example"}

    async def test_only_the_public_host(self, client: httpx.AsyncClient) -> None:
        ok = await client.post(CREATE, json={"plan": "pro", "return_url": "https://pay.example/x"})
        assert ok.status_code == 201, ok.text
        refused = await client.post(
            CREATE, json={"plan": "pro", "return_url": "https://shop.example/x"}
        )
        assert_problem(refused, 422, "redirect_not_allowed")
