"""Per-endpoint limits, counted in Redis so that every worker sees the same counters."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from app.main import create_app
from app.settings import Settings
from tests.conftest import assert_problem, bearer, create_payment, pay_in_sandbox

URL = "/api/v1/payment/create-intent"


class TestRateLimits:
    async def test_eleventh_create_intent_in_a_minute_is_429(
        self, client: httpx.AsyncClient
    ) -> None:
        for _ in range(10):
            response = await client.post(URL, json={"plan": "basic"})
            assert response.status_code == 201
        assert response.headers["RateLimit-Remaining"] == "0"
        limited = await client.post(URL, json={"plan": "basic"})
        assert_problem(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["Retry-After"]) <= 60

    async def test_every_answer_says_how_much_is_left(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        """JSON answers and the PDF download alike carry the RateLimit-* headers."""
        alice = bearer(token("alice"))
        created = await create_payment(client, token=token("alice"))
        await pay_in_sandbox(client, created["payment_id"])
        receipt = f"/api/v1/payment/receipt/{created['payment_id']}"
        answers = {
            "verify": await client.post(
                "/api/v1/payment/verify", json={"payment_id": created["payment_id"]}, headers=alice
            ),
            "receipt": await client.get(receipt, headers=alice),
            "pdf": await client.get(f"{receipt}/pdf", headers=alice),
            "history": await client.get(
                f"/api/v1/payment/{created['payment_id']}/history", headers=alice
            ),
        }
        limits = {"verify": 30, "receipt": 30, "pdf": 10, "history": 30}
        for name, answer in answers.items():
            assert answer.status_code == 200, (name, answer.text)
            assert answer.headers["RateLimit-Limit"] == str(limits[name]), name
            assert int(answer.headers["RateLimit-Remaining"]) < limits[name], name
            assert 1 <= int(answer.headers["RateLimit-Reset"]) <= 60, name

    async def test_limits_are_per_user(self, client: httpx.AsyncClient, token: Any) -> None:
        alice, bob = bearer(token("alice")), bearer(token("bob"))
        for _ in range(10):
            await client.post(URL, json={"plan": "basic"}, headers=alice)
        assert_problem(
            await client.post(URL, json={"plan": "basic"}, headers=alice), 429, "rate_limited"
        )
        assert (await client.post(URL, json={"plan": "basic"}, headers=bob)).status_code == 201

    async def test_limits_are_per_endpoint(self, client: httpx.AsyncClient) -> None:
        for _ in range(11):
            await client.post(URL, json={"plan": "basic"})
        verify = await client.post("/api/v1/payment/verify", json={"payment_id": "sb_unknown00"})
        assert_problem(verify, 404, "payment_not_found")

    async def test_two_workers_share_the_counters(
        self, settings: Settings, render_pool: ProcessPoolExecutor
    ) -> None:
        # Two app instances on one Redis stand in for two worker processes.
        first, second = (
            create_app(settings, receipt_executor=render_pool),
            create_app(settings, receipt_executor=render_pool),
        )
        async with first.router.lifespan_context(first), second.router.lifespan_context(second):
            transports = [
                httpx.ASGITransport(app=a, client=("198.51.100.9", 1)) for a in (first, second)
            ]
            clients = [
                httpx.AsyncClient(transport=t, base_url="http://testserver") for t in transports
            ]
            try:
                statuses = [
                    (
                        await clients[i % 2].post(
                            "/api/v1/payment/verify", json={"payment_id": "sb_x00"}
                        )
                    ).status_code
                    for i in range(31)
                ]
            finally:
                for http in clients:
                    await http.aclose()
        assert statuses[:30] == [404] * 30
        assert statuses[30] == 429


PROXIES = "10.0.0.0/8,2001:db8:a::/48"


def _via(app: Any, peer: str) -> httpx.AsyncClient:
    """A client whose connection comes from ``peer``."""
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def _payment_id(client: httpx.AsyncClient, forwarded_for: str | None) -> str:
    """The payment an anonymous create-intent with one Idempotency-Key lands on: the key's
    scope is the caller's address, so the same ID means the same caller."""
    headers = {"Idempotency-Key": "order-1"}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    response = await client.post(URL, json={"plan": "basic"}, headers=headers)
    assert response.status_code == 201, response.text
    payment_id: str = response.json()["payment_id"]
    return payment_id


class TestClientAddressBehindProxies:
    """X-Forwarded-For names the client only when the connection comes from a proxy listed
    in FORWARDED_ALLOW_IPS; anyone else could write any address there."""

    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"forwarded_allow_ips": PROXIES}

    async def test_a_forged_header_from_an_untrusted_peer_changes_nothing(self, app: Any) -> None:
        async with _via(app, "203.0.113.7") as client:
            for n in range(10):
                headers = {"X-Forwarded-For": f"198.51.100.{n}"}
                assert (await client.post(URL, json={"plan": "basic"}, headers=headers)).is_success
            limited = await client.post(
                URL, json={"plan": "basic"}, headers={"X-Forwarded-For": "198.51.100.99"}
            )
            assert_problem(limited, 429, "rate_limited")
        async with _via(app, "203.0.113.8") as client:
            first = await _payment_id(client, "198.51.100.1")
            assert await _payment_id(client, "198.51.100.2") == first

    async def test_a_trusted_proxy_names_the_client(self, app: Any) -> None:
        async with _via(app, "10.1.2.3") as proxy:
            for _ in range(10):
                headers = {"X-Forwarded-For": "198.51.100.1"}
                assert (await proxy.post(URL, json={"plan": "basic"}, headers=headers)).is_success
            again = await proxy.post(
                URL, json={"plan": "basic"}, headers={"X-Forwarded-For": "198.51.100.1"}
            )
            assert_problem(again, 429, "rate_limited")
            other = await proxy.post(
                URL, json={"plan": "basic"}, headers={"X-Forwarded-For": "198.51.100.2"}
            )
            assert other.status_code == 201
            assert await _payment_id(proxy, "198.51.100.3") != await _payment_id(
                proxy, "198.51.100.4"
            )

    async def test_the_client_is_the_right_most_address_that_is_not_a_proxy(self, app: Any) -> None:
        # 198.51.100.7 sent "1.2.3.4" itself; proxy 10.0.0.9 appended 198.51.100.7, and proxy
        # 10.0.0.1 (the peer) appended 10.0.0.9. Only 198.51.100.7 was written by a proxy.
        async with _via(app, "10.0.0.1") as proxy:
            chained = await _payment_id(proxy, "1.2.3.4, 198.51.100.7, 10.0.0.9")
            assert await _payment_id(proxy, "198.51.100.7") == chained
            assert await _payment_id(proxy, "1.2.3.4") != chained
            # Two headers are one list, in order; ports and IPv6 spellings are the address.
        async with _via(app, "2001:db8:a::1") as proxy:
            assert await _payment_id(proxy, "[2001:DB8:b:0::7]:4711") == await _payment_id(
                proxy, "2001:db8:b::7"
            )

    async def test_a_trusted_proxy_without_the_header_is_the_client(self, app: Any) -> None:
        async with _via(app, "10.0.0.1") as proxy, _via(app, "10.0.0.2") as other:
            assert await _payment_id(proxy, None) != await _payment_id(other, None)


class TestNoProxyTrustedByDefault:
    async def test_the_header_is_ignored_even_from_loopback(self, app: Any) -> None:
        # uvicorn's own default trusts 127.0.0.1; this service trusts no proxy unless told.
        async with _via(app, "127.0.0.1") as client:
            assert await _payment_id(client, "198.51.100.1") == await _payment_id(
                client, "198.51.100.2"
            )

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("", []),
            (" 10.0.0.0/8 , 192.0.2.7", ["10.0.0.0/8", "192.0.2.7/32"]),
            ('["::1"]', ["::1/128"]),
        ],
    )
    def test_the_setting_reads_ips_and_networks(
        self, raw: str, expected: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("FORWARDED_ALLOW_IPS", raw)
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert [str(network) for network in settings.forwarded_allow_ips] == expected

    @pytest.mark.parametrize("raw", ["*", "10.0.0.1/8", "proxy.internal"])
    def test_anything_else_is_refused_at_start(
        self, raw: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("FORWARDED_ALLOW_IPS", raw)
        with pytest.raises(ValidationError, match="forwarded_allow_ips"):
            Settings(_env_file=None)  # type: ignore[call-arg]
