"""What the service answers when Paystack charges another sum, is down, slow, rate-limits us
or refuses our key: clear problems, nothing of Paystack's own wording, no double writes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import assert_problem, bearer
from tests.fakes.paystack_server import FakePaystack
from tests.fakes.server import free_port

from .conftest import (
    assert_nothing_from_paystack,
    create,
    new_payment,
    paid_payment,
    reference,
    verify,
)

ATTEMPTS = 3  # the provider's own retries of a read


class TestTampering:
    @pytest.mark.parametrize("change", [{"amount": 100}, {"amount": 9000000}, {"currency": "GHS"}])
    async def test_a_success_for_another_sum_or_currency_is_failed(
        self,
        client: httpx.AsyncClient,
        fake: FakePaystack,
        change: dict[str, Any],
        provider_logs: Any,
    ) -> None:
        payment_id = await new_payment(client)
        fake.tamper(reference(payment_id), **change)
        fake.pay(reference(payment_id))
        verified = await verify(client, payment_id)
        assert verified.status_code == 200, verified.text
        assert (verified.json()["status"], verified.json()["receipt_url"]) == ("failed", None)
        [logged] = [
            r
            for r in provider_logs.records
            if r.getMessage() == "paystack.transaction.amount_mismatch"
        ]
        assert logged.levelname == "ERROR"
        assert logged.__dict__["expected"] == "4500000 NGN"


class TestOutages:
    async def test_paystack_down_at_initialize_is_503_and_not_repeated(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        fake.fail_next("server_error", path_prefix="/transaction/initialize")
        response = await create(client, customer_email="ada@example.ng")
        assert_problem(response, 503, "provider_unavailable")
        assert int(response.headers["Retry-After"]) >= 1
        assert_nothing_from_paystack(response)
        # It may have been made: Paystack takes no idempotency key, so it is never repeated.
        assert len(fake.calls("POST", "/transaction/initialize")) == 1

    async def test_a_lost_initialize_answer_is_503(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        fake.fail_next("hang_after", path_prefix="/transaction/initialize")
        response = await create(client, customer_email="ada@example.ng")
        fake.release_hangs()
        assert_problem(response, 503, "provider_unavailable")
        assert len(fake.calls("POST", "/transaction/initialize")) == 1
        # The client's retry starts a new checkout; the lost one has no link anyone holds.
        again = await create(client, customer_email="ada@example.ng")
        assert again.status_code == 201, again.text

    async def test_reads_are_retried(self, client: httpx.AsyncClient, fake: FakePaystack) -> None:
        payment_id = await new_payment(client)
        fake.pay(reference(payment_id))
        fake.fail_next("unavailable", times=ATTEMPTS - 1, path_prefix="/transaction/verify")
        verified = await verify(client, payment_id)
        assert verified.json()["status"] == "succeeded", verified.text
        assert len(fake.calls("GET", f"/transaction/verify/{reference(payment_id)}")) == ATTEMPTS

    async def test_a_slow_paystack_is_503_after_the_retries(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        payment_id = await new_payment(client)
        fake.fail_next("hang", times=ATTEMPTS, path_prefix="/transaction/verify")
        response = await verify(client, payment_id)
        fake.release_hangs()
        assert_problem(response, 503, "provider_unavailable")

    async def test_rate_limited_carries_retry_after(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        payment_id = await new_payment(client)
        fake.fail_next(
            "rate_limit", times=ATTEMPTS, path_prefix="/transaction/verify", retry_after=30
        )
        response = await verify(client, payment_id)
        assert_problem(response, 503, "provider_unavailable")
        assert response.headers["Retry-After"] == "30"
        # 30 s is longer than the retries wait: the client is told when to come back.
        assert len(fake.calls("GET", f"/transaction/verify/{reference(payment_id)}")) == 1


class TestMisconfigured:
    async def test_a_refused_key_is_for_the_operator(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        fake.fail_next("unauthorized", path_prefix="/transaction/initialize")
        response = await create(client, customer_email="ada@example.ng")
        assert_problem(response, 503, "provider_misconfigured")
        assert_nothing_from_paystack(response)

    async def test_health_says_what_is_wrong(
        self, client: httpx.AsyncClient, fake: FakePaystack, token: Any
    ) -> None:
        admin = bearer(token("admin", admin=True))
        healthy = await client.get("/admin/health", headers=admin)
        fake.fail_next("unauthorized", path_prefix="/balance")
        broken = await client.get("/admin/health", headers=admin)
        assert len(fake.calls("GET", "/balance")) == 2
        assert paystack_health(healthy)["status"] == "connected", healthy.text
        assert paystack_health(broken)["status"] == "error", broken.text
        assert paystack_health(broken)["message"] == "Payment provider misconfigured"
        assert "Invalid key" not in broken.text


def paystack_health(response: httpx.Response) -> dict[str, Any]:
    found: dict[str, Any] = response.json()["providers"]["paystack"]
    return found


class TestUnreachable:
    @pytest.fixture
    def settings_overrides(self, paystack_env: dict[str, str], monkeypatch: Any) -> dict[str, Any]:
        # Nothing listens there: every connection is refused.
        monkeypatch.setenv("PAYSTACK_API_BASE", f"http://127.0.0.1:{free_port()}")
        from .conftest import PLANS, TIMEOUT_S

        return {"payment_plans": PLANS, "provider_timeout_seconds": TIMEOUT_S}

    async def test_refused_connections_are_503(self, client: httpx.AsyncClient) -> None:
        response = await create(client, customer_email="ada@example.ng")
        assert_problem(response, 503, "provider_unavailable")


class TestNotConfigured:
    @pytest.fixture
    def settings_overrides(self, fake: FakePaystack, monkeypatch: Any) -> dict[str, Any]:
        from .conftest import PLANS

        monkeypatch.setenv("PAYSTACK_API_BASE", fake.url)
        return {"payment_plans": PLANS}

    async def test_without_a_secret_key_paystack_is_not_offered(
        self, client: httpx.AsyncClient, fake: FakePaystack
    ) -> None:
        response = await create(client, customer_email="ada@example.ng")
        assert_problem(response, 503, "provider_not_configured")
        assert fake.requests == []


async def test_refunds_of_a_paid_payment_are_listed_on_verify(
    client: httpx.AsyncClient, fake: FakePaystack, token: Any
) -> None:
    admin = token("admin", admin=True)
    await paid_payment(client, fake, token=admin, customer_email="a@example.ng")
    calls = fake.calls("GET", "/refund")
    assert calls and all("transaction=" in c.query for c in calls)
