"""Tokens and who may see what."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import pytest
from jose import jwt
from pydantic import SecretStr

from app.security import create_access_token, decode_access_token
from app.settings import Settings
from services.errors import InvalidToken
from tests.conftest import JWT_SECRET, assert_problem, bearer, create_payment, pay_in_sandbox


def _unsigned_token(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


BAD_TOKENS = {
    "expired": lambda: jwt.encode({"sub": "alice", "exp": int(time.time()) - 60}, JWT_SECRET),
    "forged": lambda: jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, "not-the-key"),
    "alg_none": lambda: _unsigned_token({"sub": "alice", "exp": int(time.time()) + 600}),
    "no_exp": lambda: jwt.encode({"sub": "alice"}, JWT_SECRET),
    "no_sub": lambda: jwt.encode({"exp": int(time.time()) + 600}, JWT_SECRET),
    "garbage": lambda: "not.a.token",
    "huge": lambda: "a" * 5000,
}


async def _paid_payment(client: httpx.AsyncClient, token: str | None) -> str:
    payment = await create_payment(client, token=token)
    await pay_in_sandbox(client, payment["payment_id"])
    return str(payment["payment_id"])


class TestTokens:
    @pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
    async def test_bad_tokens_are_401(self, client: httpx.AsyncClient, kind: str) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent",
            json={"plan": "pro"},
            headers=bearer(BAD_TOKENS[kind]()),
        )
        assert_problem(response, 401, "invalid_token")
        assert response.headers["www-authenticate"] == "Bearer"

    async def test_wrong_scheme_is_401(self, client: httpx.AsyncClient, token: Any) -> None:
        response = await client.post(
            "/api/v1/payment/create-intent",
            json={"plan": "pro"},
            headers={"Authorization": f"Basic {token()}"},
        )
        assert_problem(response, 401, "invalid_token")

    async def test_receipt_needs_a_token(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/api/v1/payment/receipt/sb_abcdef")
        assert_problem(response, 401, "not_authenticated")


class TestOwnership:
    async def test_only_the_owner_or_an_admin_reads_a_receipt(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        payment_id = await _paid_payment(client, token("alice"))
        url = f"/api/v1/payment/receipt/{payment_id}"
        assert (await client.get(url, headers=bearer(token("alice")))).status_code == 200
        assert (await client.get(url, headers=bearer(token("root", admin=True)))).status_code == 200
        assert_problem(
            await client.get(url, headers=bearer(token("bob"))), 404, "payment_not_found"
        )
        pdf = await client.get(f"{url}/pdf", headers=bearer(token("bob")))
        assert_problem(pdf, 404, "payment_not_found")

    async def test_a_receipt_served_from_memory_is_still_only_the_owners(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        payment_id = await _paid_payment(client, token("alice"))
        url = f"/api/v1/payment/receipt/{payment_id}/pdf"
        first = await client.get(url, headers=bearer(token("alice")))
        assert first.status_code == 200
        again = await client.get(url, headers=bearer(token("alice")))
        assert again.content == first.content
        assert again.headers["content-disposition"] == first.headers["content-disposition"]
        assert_problem(
            await client.get(url, headers=bearer(token("bob"))), 404, "payment_not_found"
        )
        assert_problem(await client.get(url), 401, "not_authenticated")
        admin = await client.get(url, headers=bearer(token("root", admin=True)))
        assert admin.content == first.content

    async def test_an_owned_payment_is_invisible_to_others(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        payment = await create_payment(client, token=token("alice"))
        body = {"payment_id": payment["payment_id"]}
        for headers in ({}, bearer(token("bob"))):
            response = await client.post("/api/v1/payment/verify", json=body, headers=headers)
            assert_problem(response, 404, "payment_not_found")
        mine = await client.post(
            "/api/v1/payment/verify", json=body, headers=bearer(token("alice"))
        )
        assert mine.status_code == 200

    async def test_anonymous_payment_is_verified_by_id_but_receipt_is_admin_only(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        payment_id = await _paid_payment(client, None)
        verify = await client.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        assert verify.json()["status"] == "succeeded"
        url = f"/api/v1/payment/receipt/{payment_id}"
        assert_problem(
            await client.get(url, headers=bearer(token("bob"))), 404, "payment_not_found"
        )
        assert (await client.get(url, headers=bearer(token("ops", admin=True)))).status_code == 200

    async def test_unpaid_payment_has_no_receipt(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        payment = await create_payment(client, token=token("alice"))
        url = f"/api/v1/payment/receipt/{payment['payment_id']}"
        assert_problem(
            await client.get(url, headers=bearer(token("alice"))), 409, "receipt_not_available"
        )
        assert_problem(
            await client.get(f"{url}/pdf", headers=bearer(token("alice"))),
            409,
            "receipt_not_available",
        )


class TestVerifiedTokens:
    """Verified tokens are remembered until they expire, and only under their own secret."""

    async def test_a_remembered_token_still_expires(
        self, client: httpx.AsyncClient, settings: Settings
    ) -> None:
        payment = await create_payment(client, token=create_access_token(settings, "alice"))
        short = jwt.encode({"sub": "alice", "exp": int(time.time()) + 1}, JWT_SECRET)
        url = f"/api/v1/payment/{payment['payment_id']}/history"
        assert (await client.get(url, headers=bearer(short))).status_code == 200
        await asyncio.sleep(max(0.0, 1.05 - (time.time() % 1)) + 1)
        assert_problem(await client.get(url, headers=bearer(short)), 401, "invalid_token")

    def test_a_token_checked_under_one_secret_is_checked_again_under_another(
        self, settings: Settings
    ) -> None:
        token = create_access_token(settings, "alice")
        assert decode_access_token(settings, token).sub == "alice"
        rotated = settings.model_copy(
            update={"jwt_secret_key": SecretStr("another-secret-0123456789-abcdefghijklmnop")}
        )
        with pytest.raises(InvalidToken):
            decode_access_token(rotated, token)

    def test_a_tampered_copy_of_a_remembered_token_is_refused(self, settings: Settings) -> None:
        token = create_access_token(settings, "alice")
        assert decode_access_token(settings, token).sub == "alice"
        header, _claims, signature = token.split(".")
        forged_claims = base64.urlsafe_b64encode(
            json.dumps({"sub": "mallory", "exp": int(time.time()) + 600}).encode()
        ).rstrip(b"=")
        with pytest.raises(InvalidToken):
            decode_access_token(settings, f"{header}.{forged_claims.decode()}.{signature}")
