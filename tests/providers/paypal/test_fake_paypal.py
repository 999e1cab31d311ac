"""The fake PayPal itself: it refuses what PayPal would refuse, and its checks against
PayPal's API descriptions catch requests and answers that depart from them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.fakes.paypal_server import FakePayPal, raw_member
from tests.fakes.paypal_spec import PayPalSpec
from tests.providers.paypal.conftest import CLIENT_ID, CLIENT_SECRET

ORDER: dict[str, Any] = {
    "intent": "CAPTURE",
    "purchase_units": [{"amount": {"currency_code": "EUR", "value": "19.00"}}],
}


@pytest.fixture
async def client(fake_paypal: FakePayPal) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake_paypal.url) as http:
        token = await http.post(
            "/v1/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=(CLIENT_ID, CLIENT_SECRET),
        )
        assert token.status_code == 200
        http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        yield http


def take_violations(fake: FakePayPal) -> list[str]:
    """The violations so far, cleared: these tests make them on purpose."""
    found = [str(v) for v in fake.violations]
    fake.violations.clear()
    return found


class TestRequestsPayPalRefuses:
    @pytest.mark.parametrize(
        ("body", "problem"),
        [
            ({**ORDER, "intent": "SALE"}, "'SALE' is not one of"),
            (
                {**ORDER, "purchase_units": [{"amount": {"currency_code": "EUR", "value": 19}}]},
                "19 is not of type 'string'",
            ),
            (
                {**ORDER, "purchase_units": [{**ORDER["purchase_units"][0], "custum_id": "x"}]},
                "/purchase_units/0/custum_id: field not in PayPal's description",
            ),
            ({"intent": "CAPTURE"}, "'purchase_units' is a required property"),
        ],
    )
    async def test_an_order_the_description_does_not_allow(
        self, client: httpx.AsyncClient, fake_paypal: FakePayPal, body: Any, problem: str
    ) -> None:
        response = await client.post("/v2/checkout/orders", json=body)
        assert response.status_code == 400
        assert response.json()["name"] == "INVALID_REQUEST"
        [violation] = take_violations(fake_paypal)
        assert problem in violation
        assert fake_paypal.orders == {}

    async def test_an_order_id_paypal_cannot_have(
        self, client: httpx.AsyncClient, fake_paypal: FakePayPal
    ) -> None:
        response = await client.get("/v2/checkout/orders/abc-1")
        assert response.status_code == 400
        assert "does not match" in take_violations(fake_paypal)[0]

    async def test_a_path_paypal_does_not_have(
        self, client: httpx.AsyncClient, fake_paypal: FakePayPal
    ) -> None:
        response = await client.post("/v2/checkout/orders/ABC/void", json={})
        assert response.status_code == 404
        assert "unknown path" in take_violations(fake_paypal)[0]

    async def test_a_payment_source_needs_a_request_id(
        self, client: httpx.AsyncClient, fake_paypal: FakePayPal
    ) -> None:
        body = {**ORDER, "payment_source": {"paypal": {}}}
        response = await client.post("/v2/checkout/orders", json=body)
        assert response.status_code == 400
        assert response.json()["details"][0]["issue"] == "PAYPAL_REQUEST_ID_REQUIRED"
        assert fake_paypal.violations == []  # allowed by the description, refused by PayPal

    @pytest.mark.parametrize(
        ("currency", "value"), [("EUR", "19.001"), ("JPY", "1900.00"), ("HUF", "10.5")]
    )
    async def test_more_decimals_than_the_currency_takes(
        self, client: httpx.AsyncClient, fake_paypal: FakePayPal, currency: str, value: str
    ) -> None:
        body = {
            **ORDER,
            "purchase_units": [{"amount": {"currency_code": currency, "value": value}}],
        }
        response = await client.post("/v2/checkout/orders", json=body)
        assert response.status_code == 422
        assert response.json()["details"][0]["issue"] == "DECIMAL_PRECISION"

    async def test_without_a_token(self, fake_paypal: FakePayPal) -> None:
        async with httpx.AsyncClient(base_url=fake_paypal.url) as http:
            response = await http.get("/v2/checkout/orders/ABC")
        assert response.status_code == 401
        assert response.json()["name"] == "AUTHENTICATION_FAILURE"
        assert response.headers["paypal-debug-id"]


class TestTokenEndpoint:
    async def test_wrong_secret(self, fake_paypal: FakePayPal) -> None:
        async with httpx.AsyncClient(base_url=fake_paypal.url) as http:
            response = await http.post(
                "/v1/oauth2/token",
                data={"grant_type": "client_credentials"},
                auth=(CLIENT_ID, "nope"),
            )
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"

    @pytest.mark.parametrize(
        ("kwargs", "problem"),
        [
            ({"data": {"grant_type": "password"}}, "grant_type must be client_credentials"),
            ({"json": {"grant_type": "client_credentials"}}, "must be a form"),
        ],
    )
    async def test_what_the_token_endpoint_refuses(
        self, fake_paypal: FakePayPal, kwargs: dict[str, Any], problem: str
    ) -> None:
        async with httpx.AsyncClient(base_url=fake_paypal.url) as http:
            response = await http.post(
                "/v1/oauth2/token", auth=(CLIENT_ID, CLIENT_SECRET), **kwargs
            )
        assert response.status_code == 400
        assert any(problem in v for v in take_violations(fake_paypal))


class TestAnswersAreChecked:
    def test_a_wrong_answer_is_a_violation(self) -> None:
        spec = PayPalSpec.load()
        wrong = json.dumps({"id": "ABC", "status": "PAID"}).encode()
        [violation] = spec.check_response("GET", "/v2/checkout/orders/ABC", "", {}, b"", 200, wrong)
        assert "'PAID' is not one of" in str(violation)

    def test_an_issue_worded_otherwise_is_a_violation(self) -> None:
        spec = PayPalSpec.load()
        body = {
            "name": "UNPROCESSABLE_ENTITY",
            "message": "The requested action could not be performed, semantically incorrect, "
            "or failed business validation.",
            "details": [{"issue": "ORDER_NOT_APPROVED", "description": "Not approved."}],
        }
        assert spec.check_response(
            "POST",
            "/v2/checkout/orders/ABC/capture",
            "",
            {"content-type": "application/json"},
            b"{}",
            422,
            json.dumps(body).encode(),
        )


class TestRawMember:
    def test_the_member_as_written(self) -> None:
        document = '{"a": 1, "webhook_event" : {"x": "\\u00e9",  "y": [1, 2]} , "z": null}'
        assert raw_member(document, "webhook_event") == '{"x": "\\u00e9",  "y": [1, 2]}'

    def test_missing_or_not_an_object(self) -> None:
        assert raw_member('{"a": 1}', "webhook_event") is None
        assert raw_member("[1]", "webhook_event") is None
        assert raw_member("{}", "webhook_event") is None
