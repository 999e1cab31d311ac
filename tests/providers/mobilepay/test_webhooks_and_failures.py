"""Vipps MobilePay webhooks (the vendor's worked example as a test vector, then deliveries
through the HTTP API: valid, forged, stale, duplicated, out of order), the access token's
reuse, outages and misconfiguration."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.payment_providers.mobilepay.provider import content_hash, signature
from tests.conftest import assert_problem
from tests.fakes.mobilepay_server import FakeMobilePay

from .conftest import (
    ATTEMPTS,
    ROUTE,
    WEBHOOK_SECRET,
    WEBHOOK_URL,
    authorized,
    capture,
    create,
    new_payment,
    reference,
    verify,
)


class TestVendorWorkedExample:
    """developer.vippsmobilepay.com, Webhooks API, "Request authentication": sample values."""

    SECRET = (
        "A0+AeKBRG2KRGvnNwJpQlb6IJFk48CKXCIcrLoHncVJKDILsQSxS6NWCccwWm6r6FhGKhiHTBsG2wo/xU6FY/A=="
    )
    CONTENT = b'{"some-unique-content":"ee6e441b-cc4a-46f8-895d-a5af79bcc233/hello-world"}'
    DATE = "Thu, 30 Mar 2023 08:38:32 GMT"

    def test_content_hash(self) -> None:
        assert content_hash(self.CONTENT) == "lNlsp1XA03N34HrQsVzPgJKtC+r7l/RBF4V3JQUWMj4="

    def test_signature(self) -> None:
        # url = https://webhook.site/e2cee29b-012e-4f1d-8ef4-e95fd74a7a63
        assert (
            signature(
                self.SECRET,
                path_and_query="/e2cee29b-012e-4f1d-8ef4-e95fd74a7a63",
                date=self.DATE,
                host="webhook.site",
                content_hash="lNlsp1XA03N34HrQsVzPgJKtC+r7l/RBF4V3JQUWMj4=",
            )
            == "agAiSyogQbDHpeucoNwYz+yAr5nJ+v+zasdkSbqzv+U="
        )


async def deliver(
    client: httpx.AsyncClient,
    fake: FakeMobilePay,
    event: dict[str, Any] | bytes,
    *,
    secret: str = WEBHOOK_SECRET,
    url: str = WEBHOOK_URL,
    date: datetime | None = None,
) -> httpx.Response:
    body = event if isinstance(event, bytes) else fake.webhook_body(event)
    raw, headers = fake.signed_delivery(body, secret=secret, url=url, date=date)
    # The proxy in front of us changes Host; the signature is over the public URL.
    headers["Host"] = "internal:8000"
    return await client.post(ROUTE, content=raw, headers=headers)


def last_event(fake: FakeMobilePay, payment_id: str, name: str) -> dict[str, Any]:
    return [e for e in fake.events(reference(payment_id)) if e["name"] == name][-1]


class TestWebhooks:
    async def test_authorized_event_captures_an_automatic_payment(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, app: Any
    ) -> None:
        payment_id = await new_payment(client, capture_method="automatic")
        fake.authorize(reference(payment_id))
        response = await deliver(client, fake, last_event(fake, payment_id, "AUTHORIZED"))
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "applied"
        assert (await app.state.store.get(payment_id)).status == "succeeded"
        assert fake.payment(reference(payment_id))["aggregate"]["capturedAmount"]["value"] == 29900

    async def test_authorized_event_for_a_manual_payment_waits_for_capture(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, app: Any
    ) -> None:
        payment_id = await new_payment(client)
        fake.authorize(reference(payment_id))
        response = await deliver(client, fake, last_event(fake, payment_id, "AUTHORIZED"))
        assert response.status_code == 200, response.text
        assert (await app.state.store.get(payment_id)).status == "requires_capture"

    async def test_a_duplicate_delivery_changes_nothing(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, app: Any
    ) -> None:
        payment_id = await new_payment(client)
        fake.abort(reference(payment_id))
        event = last_event(fake, payment_id, "ABORTED")
        assert (await deliver(client, fake, event)).json()["outcome"] == "applied"
        assert (await deliver(client, fake, event)).json()["outcome"] == "duplicate"
        assert (await app.state.store.get(payment_id)).status == "canceled"

    async def test_events_out_of_order_never_move_a_payment_back(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, app: Any
    ) -> None:
        payment_id = await authorized(client, fake)
        await capture(client, payment_id, amount=1000)
        # The release of the rest (CANCELLED) and the late AUTHORIZED and CREATED arrive
        # after the capture: the payment stays paid.
        for name in ("CANCELLED", "AUTHORIZED", "CREATED"):
            response = await deliver(client, fake, last_event(fake, payment_id, name))
            assert response.status_code == 200, response.text
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_captured) == ("succeeded", 1000)

    async def test_a_refund_event_from_the_portal_is_recorded_once(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, app: Any
    ) -> None:
        payment_id = await authorized(client, fake)
        await capture(client, payment_id)
        event = fake.refund_in_portal(reference(payment_id), 900)
        assert (await deliver(client, fake, event)).json()["outcome"] == "applied"
        assert (await deliver(client, fake, event)).json()["outcome"] == "duplicate"
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_refunded) == ("partially_refunded", 900)

    @pytest.mark.parametrize("how", ["secret", "url", "body"])
    async def test_a_forged_delivery_is_refused(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, app: Any, how: str
    ) -> None:
        payment_id = await new_payment(client)
        fake.abort(reference(payment_id))
        event = fake.webhook_body(last_event(fake, payment_id, "ABORTED"))
        if how == "body":
            raw, headers = fake.signed_delivery(event, secret=WEBHOOK_SECRET, url=WEBHOOK_URL)
            response = await client.post(
                ROUTE, content=raw.replace(b"ABORTED", b"EXPIRED"), headers=headers
            )
        else:
            forged = {"secret": {"secret": "not-the-secret"}, "url": {"url": "https://x.example/h"}}
            response = await deliver(client, fake, event, **forged[how])
        assert_problem(response, 400, "invalid_signature")
        assert (await app.state.store.get(payment_id)).status == "pending"

    async def test_an_unsigned_delivery_is_refused(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        response = await client.post(ROUTE, json={"reference": "ord-12345678"})
        assert_problem(response, 400, "invalid_signature")

    @pytest.mark.parametrize("minutes", [-6, 6])
    async def test_a_stale_or_future_delivery_is_refused(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, app: Any, minutes: int
    ) -> None:
        payment_id = await new_payment(client)
        fake.abort(reference(payment_id))
        event = last_event(fake, payment_id, "ABORTED")
        when = datetime.now(UTC) + timedelta(minutes=minutes)
        assert_problem(await deliver(client, fake, event, date=when), 400, "invalid_signature")
        assert (await app.state.store.get(payment_id)).status == "pending"

    async def test_a_signed_body_that_is_not_an_event_is_refused(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        assert_problem(await deliver(client, fake, b"[1, 2]"), 400, "invalid_payload")


class TestWebhookHostWithoutPublicUrl:
    @pytest.fixture
    def mobilepay_env(self) -> dict[str, str]:
        return {"MOBILEPAY_WEBHOOK_URL": ""}

    async def test_the_host_header_and_our_route_are_signed_over(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, app: Any
    ) -> None:
        payment_id = await new_payment(client)
        fake.expire(reference(payment_id))
        body = fake.webhook_body(last_event(fake, payment_id, "EXPIRED"))
        raw, headers = fake.signed_delivery(
            body, secret=WEBHOOK_SECRET, url=f"http://testserver{ROUTE}"
        )
        response = await client.post(ROUTE, content=raw, headers=headers)
        assert response.status_code == 200, response.text
        assert (await app.state.store.get(payment_id)).status == "expired"


class TestAccessToken:
    async def test_one_token_serves_many_calls_even_at_once(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        payment_ids = await asyncio.gather(*(new_payment(client) for _ in range(4)))
        for payment_id in payment_ids:
            await verify(client, payment_id)
        assert fake.token_fetches == 1
        [call] = fake.calls("POST", "/accesstoken/get")
        assert call.headers["client_id"] and call.headers["ocp-apim-subscription-key"]

    async def test_a_refused_token_is_renewed_once(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        payment_id = await new_payment(client)
        fake.expire_tokens()
        assert (await verify(client, payment_id)).status_code == 200
        assert fake.token_fetches == 2


class TestOutages:
    async def test_a_5xx_is_retried(self, client: httpx.AsyncClient, fake: FakeMobilePay) -> None:
        payment_id = await new_payment(client)
        fake.fail_next("unavailable", times=ATTEMPTS - 1, path_prefix="/epayment/v1/payments/")
        assert (await verify(client, payment_id)).status_code == 200

    async def test_the_vendor_down_is_503_and_nothing_of_it_reaches_the_client(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        fake.fail_next("server_error", times=ATTEMPTS, path_prefix="/epayment/")
        response = await create(client)
        body = assert_problem(response, 503, "provider_unavailable")
        assert "injected" not in response.text and "traceId" not in body

    async def test_a_lost_capture_answer_is_captured_once_on_retry(
        self, client: httpx.AsyncClient, fake: FakeMobilePay, app: Any
    ) -> None:
        payment_id = await authorized(client, fake)
        path = f"/epayment/v1/payments/{reference(payment_id)}/capture"
        fake.fail_next("hang_after", path_prefix=path)
        fake.fail_next("unavailable", times=ATTEMPTS - 1, path_prefix=path)
        assert_problem(await capture(client, payment_id), 503, "provider_unavailable")
        fake.release_hangs()
        retried = await capture(client, payment_id)
        assert retried.json()["status"] == "succeeded"
        assert fake.payment(reference(payment_id))["aggregate"]["capturedAmount"]["value"] == 29900


class TestMisconfiguration:
    @pytest.fixture
    def mobilepay_env(self) -> dict[str, str]:
        return {"MOBILEPAY_CLIENT_SECRET": "wrong-secret"}

    async def test_wrong_credentials_are_an_operators_problem(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        response = await create(client)
        assert_problem(response, 503, "provider_misconfigured")
        assert "wrong-secret" not in response.text


class TestNotConfigured:
    @pytest.fixture
    def mobilepay_env(self) -> dict[str, str]:
        return {"MOBILEPAY_CLIENT_ID": "", "MOBILEPAY_CLIENT_SECRET": ""}

    async def test_refused_as_not_configured(
        self, client: httpx.AsyncClient, fake: FakeMobilePay
    ) -> None:
        assert_problem(await create(client), 503, "provider_not_configured")
        assert not fake.requests
