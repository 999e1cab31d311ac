"""Idempotency-Key on create-intent: replays, misuse, and the race."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import RedisServer, assert_problem, bearer

URL = "/api/v1/payment/create-intent"


class TestIdempotencyKey:
    async def test_replay_returns_the_first_answer(self, client: httpx.AsyncClient) -> None:
        headers = {"Idempotency-Key": "order-42"}
        first = await client.post(URL, json={"plan": "pro"}, headers=headers)
        second = await client.post(URL, json={"plan": "pro"}, headers=headers)
        assert first.status_code == second.status_code == 201
        assert first.json() == second.json()
        # The replay says it is one (Stripe's and PayPal's header name).
        assert "idempotent-replayed" not in first.headers
        assert second.headers["idempotent-replayed"] == "true"

    @pytest.mark.parametrize(
        ("key", "error"),
        [
            ("", "string_too_short"),
            ("k" * 256, "string_too_long"),
            ("two words", "string_pattern_mismatch"),
            ("tab\tkey", "string_pattern_mismatch"),
        ],
    )
    async def test_a_malformed_key_is_refused_before_anything_is_created(
        self, client: httpx.AsyncClient, redis_server: RedisServer, key: str, error: str
    ) -> None:
        response = await client.post(URL, json={"plan": "pro"}, headers={"Idempotency-Key": key})
        body = assert_problem(response, 422, "validation_error")
        assert body["errors"] == [
            {"loc": ["header", "Idempotency-Key"], "type": error, "msg": body["errors"][0]["msg"]}
        ]
        keys = redis.Redis.from_url(redis_server.url).keys("*pay:*")
        assert keys == []

    async def test_the_longest_key_is_taken(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            URL, json={"plan": "pro"}, headers={"Idempotency-Key": "~" * 255}
        )
        assert response.status_code == 201

    async def test_same_key_other_body_is_refused(self, client: httpx.AsyncClient) -> None:
        headers = {"Idempotency-Key": "order-43"}
        await client.post(URL, json={"plan": "pro"}, headers=headers)
        response = await client.post(URL, json={"plan": "expert"}, headers=headers)
        assert_problem(response, 422, "idempotency_key_reused")

    async def test_ignored_fields_do_not_make_another_request(
        self, client: httpx.AsyncClient
    ) -> None:
        headers = {"Idempotency-Key": "order-44"}
        first = await client.post(URL, json={"plan": "pro"}, headers=headers)
        second = await client.post(URL, json={"plan": "pro", "amount": 5}, headers=headers)
        assert first.json()["payment_id"] == second.json()["payment_id"]

    async def test_keys_are_scoped_to_the_caller(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        headers = {"Idempotency-Key": "same-key"}
        alice = await client.post(
            URL, json={"plan": "pro"}, headers={**headers, **bearer(token("alice"))}
        )
        bob = await client.post(
            URL, json={"plan": "expert"}, headers={**headers, **bearer(token("bob"))}
        )
        assert alice.status_code == bob.status_code == 201
        assert alice.json()["payment_id"] != bob.json()["payment_id"]

    async def test_concurrent_identical_requests_create_one_payment(
        self, client: httpx.AsyncClient, redis_server: RedisServer
    ) -> None:
        headers = {"Idempotency-Key": "race-1"}
        responses = await asyncio.gather(
            *(client.post(URL, json={"plan": "basic"}, headers=headers) for _ in range(8))
        )
        assert {r.status_code for r in responses} == {201}
        assert len({r.json()["payment_id"] for r in responses}) == 1
        direct = redis.Redis(port=redis_server.port)
        try:
            # One payment hash (test:pay:{id}); its :history and :events keys end otherwise.
            payments = [k for k in direct.scan_iter("test:pay:*") if k.endswith(b"}")]
            assert len(payments) == 1
        finally:
            direct.close()

    async def test_failed_attempt_can_be_retried(self, client: httpx.AsyncClient) -> None:
        headers = {"Idempotency-Key": "retry-after-error"}
        failed = await client.post(URL, json={"plan": "pro", "provider": "stripe"}, headers=headers)
        assert_problem(failed, 503, "provider_not_configured")
        # Nothing was created, so the key is free for the corrected request.
        ok = await client.post(URL, json={"plan": "pro", "provider": "sandbox"}, headers=headers)
        assert ok.status_code == 201

    async def test_bad_keys(self, client: httpx.AsyncClient) -> None:
        for key in ["", "x" * 256, "has space"]:
            response = await client.post(
                URL, json={"plan": "pro"}, headers={"Idempotency-Key": key}
            )
            assert_problem(response, 422, "validation_error")
