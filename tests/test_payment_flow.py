"""The main flow on the sandbox provider, through the real app, Redis and WeasyPrint."""

from __future__ import annotations

import html
import io
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from tests.conftest import assert_problem, bearer, create_payment, pay_in_sandbox


class TestCreateIntent:
    async def test_price_comes_from_the_catalogue_not_the_client(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent",
            json={"plan": "pro", "amount": 1, "currency": "eur", "provider": "sandbox"},
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["amount"], body["currency"], body["plan"]) == (2900, "EUR", "pro")
        assert body["status"] == "pending"
        assert body["payment_id"].startswith("sb_")
        assert body["redirect_url"] == f"http://testserver/sandbox/checkout/{body['payment_id']}"

    @pytest.mark.parametrize(
        ("plan", "amount"), [("basic", 1900), ("pro", 2900), ("expert", 14900)]
    )
    async def test_default_catalogue(
        self, client: httpx.AsyncClient, plan: str, amount: int
    ) -> None:
        body = await create_payment(client, plan=plan)
        assert body["amount"] == amount

    async def test_payment_method_is_an_alias_of_provider(self, client: httpx.AsyncClient) -> None:
        body = await create_payment(client, payment_method="sandbox")
        assert body["provider"] == "sandbox"

    async def test_unknown_plan(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/api/v1/payment/create-intent", json={"plan": "gold"})
        assert "basic" in assert_problem(response, 422, "unknown_plan")["detail"]

    async def test_unknown_provider(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent", json={"plan": "pro", "provider": "bitcoin"}
        )
        assert_problem(response, 422, "unknown_provider")

    @pytest.mark.parametrize("provider", ["mobilepay", "googlepay", "applepay", "stripe", "paypal"])
    async def test_unconfigured_providers_refuse(
        self, client: httpx.AsyncClient, provider: str
    ) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent", json={"plan": "pro", "provider": provider}
        )
        assert assert_problem(response, 503, "provider_not_configured")["provider"] == provider

    async def test_missing_plan(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/api/v1/payment/create-intent", json={"provider": "sandbox"})
        body = assert_problem(response, 422, "validation_error")
        assert "plan" in body["detail"]


class TestCatalogueFromSettings:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"payment_plans": {"starter": {"name": "Starter", "amount": 500, "currency": "JPY"}}}

    async def test_payment_plans_replaces_the_catalogue(self, client: httpx.AsyncClient) -> None:
        body = await create_payment(client, plan="starter")
        assert (body["amount"], body["currency"]) == (500, "JPY")
        response = await client.post("/api/v1/payment/create-intent", json={"plan": "pro"})
        assert_problem(response, 422, "unknown_plan")


class TestSandboxCheckout:
    async def test_page_shows_plan_amount_and_buttons(self, client: httpx.AsyncClient) -> None:
        payment = await create_payment(client, plan="expert")
        page = await client.get(f"/sandbox/checkout/{payment['payment_id']}")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        for text in (
            "Expert",
            "€149.00",
            'value="succeeded"',
            'value="failed"',
            'value="canceled"',
        ):
            assert text in page.text

    async def test_pay_redirects_to_return_url(self, client: httpx.AsyncClient) -> None:
        payment = await create_payment(client, return_url="https://shop.example/done?order=7")
        response = await pay_in_sandbox(client, payment["payment_id"])
        assert response.status_code == 303
        assert response.headers["location"] == (
            f"https://shop.example/done?order=7&payment_id={payment['payment_id']}&status=succeeded"
        )

    async def test_cancel_goes_to_cancel_url(self, client: httpx.AsyncClient) -> None:
        payment = await create_payment(
            client, return_url="https://shop.example/ok", cancel_url="https://shop.example/no"
        )
        response = await pay_in_sandbox(client, payment["payment_id"], "canceled")
        assert response.headers["location"].startswith("https://shop.example/no?")

    async def test_settling_twice_changes_nothing(self, client: httpx.AsyncClient) -> None:
        payment = await create_payment(client)
        await pay_in_sandbox(client, payment["payment_id"], "succeeded")
        second = await pay_in_sandbox(client, payment["payment_id"], "failed")
        assert second.status_code == 200
        assert "already settled" in second.text
        verify = await client.post(
            "/api/v1/payment/verify", json={"payment_id": payment["payment_id"]}
        )
        assert verify.json()["status"] == "succeeded"

    async def test_bad_outcome(self, client: httpx.AsyncClient) -> None:
        payment = await create_payment(client)
        response = await pay_in_sandbox(client, payment["payment_id"], "refunded")
        assert_problem(response, 422, "validation_error")

    async def test_unknown_checkout(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/sandbox/checkout/sb_000000000000000000000000")
        assert_problem(response, 404, "payment_not_found")


class TestVerify:
    @pytest.mark.parametrize(
        ("outcome", "status"),
        [("succeeded", "succeeded"), ("failed", "failed"), ("canceled", "canceled")],
    )
    async def test_verify_reports_the_outcome(
        self, client: httpx.AsyncClient, outcome: str, status: str
    ) -> None:
        payment = await create_payment(client)
        await pay_in_sandbox(client, payment["payment_id"], outcome)
        response = await client.post(
            "/api/v1/payment/verify", json={"payment_id": payment["payment_id"]}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == status
        assert (body["plan"], body["amount"], body["currency"]) == ("pro", 2900, "EUR")
        expected_receipt = f"/api/v1/payment/receipt/{payment['payment_id']}/pdf"
        assert body["receipt_url"] == (expected_receipt if status == "succeeded" else None)

    async def test_unpaid_is_pending(self, client: httpx.AsyncClient) -> None:
        payment = await create_payment(client)
        response = await client.post(
            "/api/v1/payment/verify", json={"payment_id": payment["payment_id"]}
        )
        assert response.json()["status"] == "pending"

    @pytest.mark.parametrize(
        "payment_id", ["sb_doesnotexist000000", "xx_unknownprefix", "pi_3Mtw", "pp_5O190127TN"]
    )
    async def test_unknown_payment(self, client: httpx.AsyncClient, payment_id: str) -> None:
        response = await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        assert_problem(response, 404, "payment_not_found")

    async def test_history_records_each_move(self, client: httpx.AsyncClient, app: Any) -> None:
        payment = await create_payment(client)
        await pay_in_sandbox(client, payment["payment_id"])
        await client.post("/api/v1/payment/verify", json={"payment_id": payment["payment_id"]})
        history = await app.state.store.history(payment["payment_id"])
        assert [(h.previous, h.status, h.cause) for h in history] == [
            (None, "pending", "api:create-intent"),
            ("pending", "succeeded", "sandbox:checkout"),
        ]


class TestFullFlowToReceipt:
    async def test_create_pay_verify_and_download(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        alice = bearer(token("alice"))
        created = await client.post(
            "/api/v1/payment/create-intent",
            json={"plan": "expert", "customer_email": "alice@example.com"},
            headers=alice,
        )
        payment_id = created.json()["payment_id"]
        await pay_in_sandbox(client, payment_id)
        verified = await client.post(
            "/api/v1/payment/verify", json={"payment_id": payment_id}, headers=alice
        )
        assert verified.json()["status"] == "succeeded"

        meta = await client.get(f"/api/v1/payment/receipt/{payment_id}", headers=alice)
        assert meta.status_code == 200, meta.text
        receipt = meta.json()
        assert receipt["amount_formatted"] == "€149.00"
        assert receipt["receipt_number"].startswith("R-")

        pdf = await client.get(receipt["pdf_url"], headers=alice)
        assert pdf.status_code == 200
        assert pdf.headers["content-type"] == "application/pdf"
        assert pdf.content.startswith(b"%PDF-")
        text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        for expected in (
            "Example Merchant Ltd",
            receipt["receipt_number"],
            "Expert",
            "€149.00",
            "Sandbox test payment",
            payment_id,
            "alice@example.com",
        ):
            assert expected in text, f"{expected!r} missing from the receipt"


class TestSandboxSessionKeepsEveryCharacter:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {
            "payment_plans": {"pro": {"name": "Prämie ✓ «Pro»", "amount": 2900, "currency": "EUR"}}
        }

    async def test_the_checkout_page_shows_the_plan_as_named(
        self, client: httpx.AsyncClient
    ) -> None:
        payment = await create_payment(client)
        page = await client.get(f"/sandbox/checkout/{payment['payment_id']}")
        assert page.status_code == 200
        assert "Prämie ✓ «Pro»" in html.unescape(page.text)


class TestUnknownCheckout:
    @pytest.mark.parametrize(
        "payment_id", ["sb_000000000000000000000000", "sb_", "pi_123", "x%20y"]
    )
    async def test_a_browser_gets_a_page(self, client: httpx.AsyncClient, payment_id: str) -> None:
        response = await client.get(
            f"/sandbox/checkout/{payment_id}", headers={"Accept": "text/html,*/*;q=0.8"}
        )
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("text/html")
        assert "No such checkout" in response.text

    async def test_an_api_client_gets_a_problem(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/sandbox/checkout/sb_000000000000000000000000")
        assert_problem(response, 404, "payment_not_found")
