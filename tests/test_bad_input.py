"""No input, however malformed, may produce a 500: every error is a 4xx problem+json."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest

from tests.conftest import assert_problem, bearer


class TestMalformedBodies:
    @pytest.mark.parametrize(
        "content",
        [b"{bad", b"", b"null", b"[]", b'"plan"', b"\xff\xfe\x00", b'{"plan": "pro"', b"{}" * 100],
    )
    async def test_create_intent(self, client: httpx.AsyncClient, content: bytes) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent",
            content=content,
            headers={"content-type": "application/json"},
        )
        assert 400 <= response.status_code < 500, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] in {"invalid_json", "invalid_body", "validation_error"}

    @pytest.mark.parametrize(
        "body",
        [
            {"plan": 5},
            {"plan": None},
            {"plan": ["pro"]},
            {"plan": "pro", "provider": {"x": 1}},
            {"plan": "pro", "return_url": "javascript:alert(1)"},
            {"plan": "pro", "return_url": "https://x.example/" + "a" * 3000},
            {"plan": "pro", "customer_email": "not-an-email"},
            {"plan": "PRO"},
            {"plan": "../../etc/passwd"},
            {"plan": "pro", "ui_mode": "iframe"},
        ],
    )
    async def test_wrong_types_and_values(
        self, client: httpx.AsyncClient, body: dict[str, Any]
    ) -> None:
        response = await client.post("/api/v1/payment/create-intent", json=body)
        assert_problem(response, 422, "validation_error")

    @pytest.mark.parametrize(
        "payment_id",
        ["", "a", "sb_" + "x" * 300, "sb_../../etc/passwd", "sb_\u0000null", "sb_é", 12, None],
    )
    async def test_verify_odd_ids(self, client: httpx.AsyncClient, payment_id: Any) -> None:
        response = await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        assert_problem(response, 422, "validation_error")

    @pytest.mark.parametrize(
        "path_id", ["x" * 300, "sb_..%2F..%2Fetc", "sb_%00", "sb_%C3%A9", "%FF%FE", "sb_a.b"]
    )
    async def test_odd_ids_in_paths(
        self, client: httpx.AsyncClient, token: Any, path_id: str
    ) -> None:
        headers = bearer(token("alice"))
        for url in (f"/api/v1/payment/receipt/{path_id}", f"/api/v1/payment/receipt/{path_id}/pdf"):
            response = await client.get(url, headers=headers)
            assert response.status_code in {404, 422}, response.text
            assert response.headers["content-type"].startswith("application/problem+json")

    async def test_huge_body_is_413(self, client: httpx.AsyncClient) -> None:
        body = json.dumps({"plan": "pro", "pad": "x" * 200_000})
        response = await client.post(
            "/api/v1/payment/create-intent",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert_problem(response, 413, "payload_too_large")

    async def test_streamed_huge_body_is_413(self, client: httpx.AsyncClient) -> None:
        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(100):
                yield b"x" * 4096

        response = await client.post(
            "/api/v1/payment/create-intent",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert_problem(response, 413, "payload_too_large")


class TestRouting:
    async def test_unknown_route_is_problem_404(self, client: httpx.AsyncClient) -> None:
        assert_problem(await client.get("/api/v1/nothing-here"), 404, "not_found")

    async def test_wrong_method_is_problem_405(self, client: httpx.AsyncClient) -> None:
        assert_problem(await client.get("/api/v1/payment/create-intent"), 405, "method_not_allowed")

    async def test_unknown_webhook_provider(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/api/v1/payment/webhook/bitcoin", content=b"{}")
        assert_problem(response, 422, "unknown_provider")

    async def test_bad_webhook_provider_name(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/api/v1/payment/webhook/..%2Fadmin", content=b"{}")
        assert response.status_code in {404, 422}


class TestRandomInput:
    """A seeded shower of junk at every endpoint: nothing may answer 500."""

    async def test_no_500_anywhere(self, client: httpx.AsyncClient, token: Any) -> None:
        rng = random.Random(20261123)
        atoms: list[Any] = [
            None,
            True,
            0,
            -1,
            10**30,
            1.5,
            "",
            "pro",
            "sb_x",
            "\u0000",
            "é" * 50,
            [],
            {},
            ["pro"],
            {"a": {"b": []}},
            "x" * 1000,
        ]
        keys = [
            "plan",
            "provider",
            "payment_method",
            "payment_id",
            "return_url",
            "cancel_url",
            "customer_email",
            "amount",
            "ui_mode",
            "capture_method",
            "junk",
        ]
        targets = [
            ("POST", "/api/v1/payment/create-intent"),
            ("POST", "/api/v1/payment/verify"),
            ("POST", "/api/v1/payment/sb_abc123/refund"),
            ("POST", "/api/v1/payment/sb_abc123/capture"),
            ("POST", "/api/v1/payment/sb_abc123/cancel"),
            ("POST", "/api/v1/payment/capture/paypal/pp_abc123"),
            ("POST", "/api/v1/payment/webhook/sandbox"),
            ("POST", "/sandbox/checkout/sb_abc123"),
            ("GET", "/api/v1/payment/receipt/sb_abc123"),
        ]
        headers_choices = [
            {},
            bearer(token("fuzz")),
            bearer(token("admin", admin=True)),
            {"Authorization": "Bearer"},
            {"Idempotency-Key": "k"},
        ]
        for _ in range(250):
            method, url = rng.choice(targets)
            body = {rng.choice(keys): rng.choice(atoms) for _ in range(rng.randint(0, 4))}
            content = (
                json.dumps(body).encode()
                if rng.random() < 0.85
                else bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
            )
            headers = {"content-type": "application/json", **rng.choice(headers_choices)}
            response = await client.request(method, url, content=content, headers=headers)
            assert response.status_code < 500 or response.status_code == 503, (
                method,
                url,
                content,
                response.status_code,
                response.text,
            )
            if response.status_code >= 400:
                assert response.headers["content-type"].startswith("application/problem+json")
