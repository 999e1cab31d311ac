"""Flutterwave through the service's HTTP API: the real app, Redis and WeasyPrint, and the real
Flutterwave provider talking over loopback to the fake Flutterwave.

Only Flutterwave's side is played by hand: the customer pays with the fake's ``pay``, its back
office completes or fails refunds, it sends webhooks, and its controls make it fail. Everything
of ours goes through our endpoints; the store is only read, to see what a webhook did."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from app.main import create_app
from app.settings import Settings
from tests.conftest import assert_problem, bearer
from tests.fakes.flutterwave_server import FakeFlutterwave
from tests.providers.flutterwave.conftest import (
    API,
    PRO_NGN,
    SECRET_HASH,
    SECRET_KEY,
    WEBHOOK_URL,
    create,
    created,
    paid,
    refund,
    token_with_email,
    tx_ref,
    verify,
)

ATTEMPTS = 3  # the provider's own retries of a read


async def stored(app: Any, payment_id: str) -> Any:
    record = await app.state.store.get(payment_id)
    assert record is not None
    return record


async def deliver(
    client: httpx.AsyncClient, fake: FakeFlutterwave, payment_id: str, **kwargs: Any
) -> httpx.Response:
    body, headers = fake.delivery(tx_ref(payment_id), **kwargs)
    return await client.post(WEBHOOK_URL, content=body, headers=headers)


class TestCreate:
    async def test_a_payment_link_in_ngn(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        response = await create(client, customer_email="ada@example.com")
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["payment_id"].startswith("flw_ord_")
        assert body["redirect_url"].startswith(f"{fake.url}/v3/hosted/pay/")
        [sent] = fake.seen("POST", "/v3/payments")
        assert sent.authorization == f"Bearer {SECRET_KEY}"
        assert sent.body["tx_ref"] == tx_ref(body["payment_id"])
        # Major units, exactly, as a JSON number: ₦45,000.00.
        assert sent.body["amount"] == Decimal("45000.00")
        assert isinstance(sent.body["amount"], Decimal)
        assert sent.body["currency"] == "NGN"
        assert sent.body["redirect_url"] == "https://shop.example/thanks"
        assert sent.body["customer"] == {"email": "ada@example.com"}
        assert sent.body["meta"] == {"payment_id": body["payment_id"]}

    async def test_the_email_comes_from_the_token(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        token = token_with_email("ada", "ada@example.ng")
        response = await create(client, token=token)
        assert response.status_code == 201, response.text
        [sent] = fake.seen("POST", "/v3/payments")
        assert sent.body["customer"] == {"email": "ada@example.ng"}

    async def test_no_email_no_payment(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        response = await create(client, token=token_with_email("ada", None))
        assert_problem(response, 422, "customer_email_required")
        assert fake.seen("POST", "/v3/payments") == []

    async def test_an_outage_is_a_503_and_the_link_is_asked_for_again(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        fake.fail_next("unavailable", times=ATTEMPTS, path_prefix="/v3/payments")
        response = await create(client, customer_email="ada@example.com")
        assert_problem(response, 503, "provider_unavailable")
        assert len(fake.seen("POST", "/v3/payments")) == ATTEMPTS
        assert SECRET_KEY not in response.text

        fake.fail_next("server_error", path_prefix="/v3/payments")
        assert (await create(client, customer_email="ada@example.com")).status_code == 201

    async def test_rate_limited_says_when_to_come_back(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        fake.fail_next("rate_limit", times=ATTEMPTS, path_prefix="/v3/payments")
        response = await create(client, customer_email="ada@example.com")
        assert_problem(response, 503, "provider_unavailable")
        assert response.headers["Retry-After"] == "1"

    async def test_a_timeout_is_a_503(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        fake.fail_next("hang", times=ATTEMPTS, path_prefix="/v3/payments")
        response = await create(client, customer_email="ada@example.com")
        assert_problem(response, 503, "provider_unavailable")


class TestMisconfiguration:
    async def test_a_wrong_secret_key(
        self,
        client: httpx.AsyncClient,
        fake: FakeFlutterwave,
        settings: Settings,
        render_pool: Any,
        monkeypatch: pytest.MonkeyPatch,
        token: Any,
    ) -> None:
        monkeypatch.setenv("FLUTTERWAVE_SECRET_KEY", "FLWSECK_TEST-wrongwrongwrongwrong-X")
        application = create_app(settings, receipt_executor=render_pool)
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application, client=("203.0.113.8", 1))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as other:
                response = await create(other, customer_email="ada@example.com")
                assert_problem(response, 503, "provider_misconfigured")
                assert "Invalid authorization key" not in response.text
                assert "wrongwrong" not in response.text
                admin = bearer(token("ops", admin=True))
                health = (await other.get("/admin/health", headers=admin)).json()
                assert health["providers"]["flutterwave"]["status"] != "connected"
                assert "wrongwrong" not in json.dumps(health)

    async def test_health_is_one_authenticated_read(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, token: Any
    ) -> None:
        admin = bearer(token("ops", admin=True))
        health = (await client.get("/admin/health", headers=admin)).json()
        assert health["providers"]["flutterwave"]["status"] == "connected", health
        [read] = fake.seen("GET", "/v3/balances")
        assert read.authorization == f"Bearer {SECRET_KEY}"

    async def test_no_secret_hash_stops_the_start(
        self, settings: Settings, render_pool: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("FLUTTERWAVE_SECRET_HASH")
        with pytest.raises(Exception, match="FLUTTERWAVE_SECRET_HASH") as raised:
            application = create_app(settings, receipt_executor=render_pool)
            async with application.router.lifespan_context(application):
                pass
        assert SECRET_KEY not in str(raised.value)


class TestVerify:
    async def test_not_paid_yet_is_pending(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        payment_id = await created(client)
        response = await verify(client, payment_id)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "pending"

    async def test_paid_then_the_receipt_in_naira(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        alice = token_with_email("alice", "alice@example.ng")
        payment_id = await paid(client, fake, token=alice)
        [read] = fake.seen("GET", "/v3/transactions/verify_by_reference")
        assert read.query == {"tx_ref": tx_ref(payment_id)}

        meta = await client.get(f"{API}/receipt/{payment_id}", headers=bearer(alice))
        assert meta.status_code == 200, meta.text
        receipt = meta.json()
        assert (receipt["amount"], receipt["currency"]) == (PRO_NGN, "NGN")
        assert receipt["amount_formatted"] == "NGN45,000.00"
        pdf = await client.get(f"{API}/receipt/{payment_id}/pdf", headers=bearer(alice))
        assert pdf.status_code == 200
        text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        for expected in ("NGN45,000.00", "Pro", payment_id):
            assert expected in text, f"{expected!r} missing from the receipt"

    async def test_a_declined_card_fails_the_payment(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        payment_id = await created(client)
        fake.pay(tx_ref(payment_id), "failed")
        response = await verify(client, payment_id)
        assert (response.json()["status"], response.json()["receipt_url"]) == ("failed", None)
        # The customer tries again on the same link, and pays.
        fake.pay(tx_ref(payment_id))
        assert (await verify(client, payment_id)).json()["status"] == "succeeded"

    async def test_pending_then_successful(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        payment_id = await created(client)
        transaction = fake.pay(tx_ref(payment_id), "pending")
        assert (await verify(client, payment_id)).json()["status"] == "pending"
        fake.settle(transaction, "successful")
        assert (await verify(client, payment_id)).json()["status"] == "succeeded"

    @pytest.mark.parametrize(
        "tamper",
        [
            {"amount": Decimal("450.00")},  # a hundredth of the price
            {"amount": Decimal("45000.01")},
            {"currency": "GHS"},  # the same number, in another currency
        ],
    )
    async def test_another_amount_or_currency_is_never_paid(
        self,
        client: httpx.AsyncClient,
        fake: FakeFlutterwave,
        tamper: dict[str, Any],
    ) -> None:
        payment_id = await created(client)
        fake.pay(tx_ref(payment_id), **tamper)
        response = await verify(client, payment_id)
        assert response.status_code == 200, response.text
        assert (response.json()["status"], response.json()["receipt_url"]) == ("failed", None)

    async def test_the_redirect_query_string_is_never_believed(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        # What Flutterwave appends to the return URL is the customer's to forge; only a verify
        # of the tx_ref counts, and there is no transaction.
        payment_id = await created(client)
        response = await client.post(
            f"{API}/verify?status=successful&tx_ref={tx_ref(payment_id)}&transaction_id=1",
            json={"payment_id": payment_id},
        )
        assert response.json()["status"] == "pending"

    async def test_an_outage_on_verify(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        payment_id = await created(client)
        fake.pay(tx_ref(payment_id))
        fake.fail_next("server_error", times=ATTEMPTS, path_prefix="/v3/transactions/")
        assert_problem(await verify(client, payment_id), 503, "provider_unavailable")
        assert (await verify(client, payment_id)).json()["status"] == "succeeded"

    async def test_someone_elses_id(self, client: httpx.AsyncClient, fake: FakeFlutterwave) -> None:
        response = await verify(client, "flw_ord_000000000000000000000000")
        assert_problem(response, 404, "payment_not_found")


class TestRefunds:
    async def test_pending_then_completed(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, app: Any, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid(client, fake)
        response = await refund(client, payment_id, admin, amount=1_000_050)
        assert response.status_code == 202, response.text
        body = response.json()
        assert (body["refund"]["status"], body["amount_pending_refund"]) == ("pending", 1_000_050)
        [sent] = fake.seen("POST", "/v3/transactions/")
        assert sent.body == {"amount": Decimal("10000.50"), "comments": body["refund"]["refund_id"]}

        fake.complete_refund(int(body["refund"]["provider_refund_id"]))
        verified = await verify(client, payment_id)
        assert verified.status_code == 200, verified.text
        record = await stored(app, payment_id)
        assert (record.status, record.amount_refunded) == ("partially_refunded", 1_000_050)
        assert record.amount_pending_refund == 0

        rest = await refund(client, payment_id, admin)
        assert rest.status_code == 202, rest.text
        fake.complete_refund(int(rest.json()["refund"]["provider_refund_id"]))
        await verify(client, payment_id)
        record = await stored(app, payment_id)
        assert (record.status, record.amount_refunded) == ("refunded", PRO_NGN)

    async def test_pending_then_failed_gives_the_balance_back(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, app: Any, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid(client, fake)
        response = await refund(client, payment_id, admin)
        assert response.status_code == 202, response.text
        fake.fail_refund(int(response.json()["refund"]["provider_refund_id"]))
        await verify(client, payment_id)
        record = await stored(app, payment_id)
        assert (record.status, record.amount_refunded, record.amount_pending_refund) == (
            "succeeded",
            0,
            0,
        )
        listing = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(admin))
        assert [r["status"] for r in listing.json()["refunds"]] == ["failed"]

    async def test_a_lost_answer_never_refunds_twice(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, app: Any, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid(client, fake)
        fake.fail_next("hang_after", path_prefix="/v3/transactions/")
        lost = await refund(client, payment_id, admin, amount=500_000)
        assert_problem(lost, 503, "provider_unavailable")
        assert len(fake.refunds) == 1  # Flutterwave made it; we did not hear

        # The service asks again under the same refund id: found, not made again.
        await verify(client, payment_id)
        assert len(fake.refunds) == 1
        record = await stored(app, payment_id)
        assert record.amount_pending_refund == 500_000
        [made] = fake.refunds.values()
        fake.complete_refund(made.id)
        await verify(client, payment_id)
        record = await stored(app, payment_id)
        assert (record.amount_refunded, record.amount_pending_refund) == (500_000, 0)
        assert len(fake.seen("POST", "/v3/transactions/")) == 1

    async def test_more_than_is_left(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid(client, fake)
        assert_problem(
            await refund(client, payment_id, admin, amount=PRO_NGN + 1),
            422,
            "refund_exceeds_balance",
        )
        assert fake.refunds == {}

    async def test_an_outage_leaves_no_refund(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, app: Any, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid(client, fake)
        fake.fail_next("unavailable", path_prefix="/v3/transactions/")
        assert_problem(await refund(client, payment_id, admin), 503, "provider_unavailable")
        assert fake.refunds == {}
        # Not known to be refused, so held pending and asked again: made once, exactly.
        await verify(client, payment_id)
        assert len(fake.refunds) == 1


class TestWebhooks:
    async def test_a_valid_delivery_makes_the_service_read_the_transaction(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, app: Any
    ) -> None:
        payment_id = await created(client)
        fake.pay(tx_ref(payment_id))
        response = await deliver(client, fake, payment_id)
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "applied"
        assert (await stored(app, payment_id)).status == "succeeded"
        assert len(fake.seen("GET", "/v3/transactions/verify_by_reference")) == 1

    async def test_a_wrong_or_missing_hash_is_refused(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, app: Any
    ) -> None:
        payment_id = await created(client)
        fake.pay(tx_ref(payment_id))
        for forged in ("not-the-hash", SECRET_HASH + "x", SECRET_HASH[:-1], ""):
            response = await deliver(client, fake, payment_id, secret_hash=forged)
            assert_problem(response, 400, "invalid_signature")
        body, _ = fake.delivery(tx_ref(payment_id))
        response = await client.post(
            WEBHOOK_URL, content=body, headers={"Content-Type": "application/json"}
        )
        assert_problem(response, 400, "invalid_signature")
        assert (await stored(app, payment_id)).status == "pending"
        assert fake.seen("GET", "/v3/transactions/") == []

    async def test_what_it_claims_is_never_believed(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, app: Any
    ) -> None:
        # The hash is right, the body claims a success Flutterwave never saw.
        payment_id = await created(client)
        fake.pay(tx_ref(payment_id), "failed")
        body, headers = fake.delivery(tx_ref(payment_id))
        claimed = json.loads(body)
        claimed["data"]["status"] = "successful"
        response = await client.post(
            WEBHOOK_URL, content=json.dumps(claimed).encode(), headers=headers
        )
        assert response.status_code == 200, response.text
        assert (await stored(app, payment_id)).status == "failed"

    async def test_duplicates_and_late_events_change_nothing(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, app: Any
    ) -> None:
        payment_id = await created(client)
        transaction = fake.pay(tx_ref(payment_id), "pending")
        early = fake.delivery(tx_ref(payment_id))
        fake.settle(transaction, "successful")
        late = fake.delivery(tx_ref(payment_id))
        first = await client.post(WEBHOOK_URL, content=late[0], headers=late[1])
        assert first.json()["outcome"] == "applied"
        again = await client.post(WEBHOOK_URL, content=late[0], headers=late[1])
        assert again.json()["outcome"] == "unchanged"
        # The pending event arrives last: it only makes us read, and the truth is paid.
        out_of_order = await client.post(WEBHOOK_URL, content=early[0], headers=early[1])
        assert out_of_order.status_code == 200
        assert (await stored(app, payment_id)).status == "succeeded"

    async def test_other_events_are_acknowledged_and_ignored(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave
    ) -> None:
        payment_id = await created(client)
        fake.pay(tx_ref(payment_id))
        response = await deliver(client, fake, payment_id, event="transfer.completed")
        assert (response.status_code, response.json()["outcome"]) == (200, "ignored")
        assert fake.seen("GET", "/v3/transactions/") == []

    @pytest.mark.parametrize(
        "body",
        [
            b"not json",
            b"[]",
            b'{"event": "charge.completed"}',
            b'{"data": {}}',
            b"[" * 100_000,
            b'{"event": "charge.completed", "data": {"amount": 1e999999}}',
            b'{"event": "a", "event": "b", "data": {}}',
            b"\xff\xfe{}",
        ],
    )
    async def test_what_is_not_an_event(
        self, client: httpx.AsyncClient, fake: FakeFlutterwave, body: bytes
    ) -> None:
        response = await client.post(
            WEBHOOK_URL,
            content=body,
            headers={"Content-Type": "application/json", "verif-hash": SECRET_HASH},
        )
        assert_problem(response, 400, "invalid_payload")
