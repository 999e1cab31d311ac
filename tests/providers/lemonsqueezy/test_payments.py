"""LemonSqueezy through the service's HTTP API: the real app, Redis and WeasyPrint, and the
real provider talking over loopback to the fake LemonSqueezy. Only LemonSqueezy's side is played
by hand: the customer pays with the fake's ``pay``, the merchant may refund in its dashboard,
and LemonSqueezy's webhook deliveries are the fake's events, signed as LemonSqueezy signs them."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from tests.conftest import assert_problem, bearer
from tests.fakes.lemonsqueezy_server import FakeLemonSqueezy
from tests.providers.lemonsqueezy.conftest import (
    API,
    API_KEY,
    BASIC_VARIANT,
    PRO_VARIANT,
    STORE_ID,
    WEBHOOK_SECRET,
    checkout_id,
    create,
    deliver,
    refund,
    verify,
)


async def created(client: httpx.AsyncClient, token: str, **body: Any) -> dict[str, Any]:
    response = await create(client, token=token, **body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def paid(
    client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: str, **pay: Any
) -> tuple[str, str]:
    """A LemonSqueezy payment the customer paid, its order_created delivered: (payment id,
    order id)."""
    body = await created(client, token)
    order = fake.pay(checkout_id(fake, body["redirect_url"]), **pay)
    [event] = fake.events_of("order_created")
    delivered = await deliver(client, fake, event)
    assert delivered.status_code == 200, delivered.text
    assert delivered.json()["outcome"] == "applied"
    return body["payment_id"], order["id"]


class TestCreate:
    async def test_a_checkout_at_the_catalogue_price(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any, app: Any
    ) -> None:
        body = await created(
            client, token("alice"), amount=1, return_url="https://shop.example/paid"
        )
        assert body["payment_id"].startswith("ls_")
        assert (body["provider"], body["status"]) == ("lemonsqueezy", "pending")
        assert (body["amount"], body["currency"]) == (2900, "EUR")
        [checkout] = fake.checkouts.values()
        assert body["redirect_url"] == checkout["attributes"]["url"]
        [call] = fake.calls("POST", "/v1/checkouts")
        assert call.headers["accept"] == call.headers["content-type"] == "application/vnd.api+json"
        assert call.headers["authorization"] == f"Bearer {API_KEY}"
        data = call.body["data"] if call.body else {}
        attributes = data["attributes"]
        assert attributes["custom_price"] == 2900  # ours, not the variant's 2500
        record = await app.state.store.get(body["payment_id"])
        assert attributes["checkout_data"]["custom"] == {
            "payment_id": body["payment_id"],
            "reference": record.reference,
            "user": "alice",
        }
        assert attributes["product_options"]["redirect_url"] == "https://shop.example/paid"
        assert attributes["checkout_options"] == {"discount": False}
        assert data["relationships"] == {
            "store": {"data": {"type": "stores", "id": STORE_ID}},
            "variant": {"data": {"type": "variants", "id": PRO_VARIANT}},
        }

    async def test_an_idempotency_key_makes_one_checkout(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        key = {"Idempotency-Key": "lemon-1"}
        alice = bearer(token("alice"))
        # The checkout is made but its answer is lost: the client hears 503.
        fake.fail_next("hang_after", path_prefix="/v1/checkouts")
        fake.fail_next("unavailable", times=2, path_prefix="/v1/checkouts")
        url = f"{API}/create-intent"
        body = {"plan": "pro", "provider": "lemonsqueezy"}
        lost = await client.post(url, json=body, headers={**alice, **key})
        assert_problem(lost, 503, "provider_unavailable")
        fake.release_hangs()
        assert len(fake.checkouts) == 1
        retried = await client.post(url, json=body, headers={**alice, **key})
        assert retried.status_code == 201, retried.text
        # The lost checkout was never recorded: the retry makes a second one (no money moves;
        # the customer gets one page), under the same payment id.
        assert len(fake.checkouts) == 2
        again = await client.post(url, json=body, headers={**alice, **key})
        assert again.json() == retried.json()
        assert len(fake.checkouts) == 2

    async def test_a_plan_without_a_variant_is_refused(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any, app: Any
    ) -> None:
        refused = await create(client, plan="basic", token=token("alice"))
        problem = assert_problem(refused, 422, "provider_mapping_missing")
        assert "basic" in problem["detail"] and "LEMON_VARIANTS" in problem["detail"]
        assert fake.checkouts == {}
        # A provider mapping (entity plan) maps it.
        await app.state.store.link("lemonsqueezy", "plan", "basic", BASIC_VARIANT)
        mapped = await created(client, token("alice"), plan="basic")
        [checkout] = fake.checkouts.values()
        assert checkout["attributes"]["variant_id"] == int(BASIC_VARIANT)
        assert mapped["amount"] == checkout["attributes"]["custom_price"] == 1900


class TestPayVerifyReceiptRefund:
    async def test_the_whole_way(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        alice, admin = token("alice"), token("ops", admin=True)
        body = await created(client, alice)
        payment_id = body["payment_id"]
        assert (await verify(client, payment_id, alice)).json()["status"] == "pending"

        order = fake.pay(checkout_id(fake, body["redirect_url"]))
        # No webhook yet: LemonSqueezy's API cannot tell which order the checkout made.
        assert (await verify(client, payment_id, alice)).json()["status"] == "pending"
        [event] = fake.events_of("order_created")
        assert (await deliver(client, fake, event)).json()["outcome"] == "applied"
        verified = await verify(client, payment_id, alice)
        assert verified.status_code == 200, verified.text
        assert (verified.json()["status"], verified.json()["amount"]) == ("succeeded", 2900)
        assert fake.calls("GET", f"/v1/orders/{order['id']}")

        pdf = await client.get(f"{API}/receipt/{payment_id}/pdf", headers=bearer(alice))
        assert pdf.status_code == 200, pdf.text
        text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
        assert "29.00" in text
        # Lemon Squeezy sold as merchant of record: a payment confirmation naming it.
        assert "Payment confirmation" in text and "Lemon Squeezy" in text

        partial = await refund(client, payment_id, admin, 1000)
        assert partial.status_code == 200, partial.text
        assert partial.json()["refund"]["status"] == "succeeded"
        assert partial.json()["status"] == "partially_refunded"
        assert fake.orders[order["id"]]["attributes"]["refunded_amount"] == 1000
        rest = await refund(client, payment_id, admin)
        assert rest.status_code == 200, rest.text
        assert rest.json()["status"] == "refunded"
        attributes = fake.orders[order["id"]]["attributes"]
        assert (attributes["refunded_amount"], attributes["status"]) == (2900, "refunded")
        [first, second] = fake.calls("POST", f"/v1/orders/{order['id']}/refund")
        assert [c.body["data"]["attributes"]["amount"] for c in (first, second) if c.body] == [
            1000,
            1900,
        ]
        # LemonSqueezy's order_refunded events for our own refunds change nothing.
        for event in fake.events_of("order_refunded"):
            assert (await deliver(client, fake, event)).json()["outcome"] == "unchanged"
        refunds = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(admin))
        assert refunds.json()["amount_refunded"] == 2900
        assert len(refunds.json()["refunds"]) == 2

    async def test_tax_added_on_top_is_refunded_with_the_price(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        alice, admin = token("alice"), token("ops", admin=True)
        payment_id, order_id = await paid(
            client, fake, alice, tax_rate_percent=20, tax_inclusive=False
        )
        verified = await verify(client, payment_id, alice)
        assert (verified.json()["status"], verified.json()["amount"]) == ("succeeded", 2900)
        assert fake.orders[order_id]["attributes"]["total"] == 3480
        half = await refund(client, payment_id, admin, 1450)
        assert half.json()["refund"]["amount"] == 1450
        assert fake.orders[order_id]["attributes"]["refunded_amount"] == 1740
        rest = await refund(client, payment_id, admin)
        assert rest.json()["status"] == "refunded"
        assert fake.orders[order_id]["attributes"]["refunded_amount"] == 3480

    async def test_a_discounted_order_is_never_called_paid(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        alice = token("alice")
        body = await created(client, alice)
        fake.pay(checkout_id(fake, body["redirect_url"]), discount=900)
        [event] = fake.events_of("order_created")
        assert (await deliver(client, fake, event)).json()["outcome"] == "ignored"
        assert_problem(await verify(client, body["payment_id"], alice), 502, "provider_error")

    async def test_a_refund_whose_answer_was_lost_is_made_once(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        alice, admin = token("alice"), token("ops", admin=True)
        payment_id, order_id = await paid(client, fake, alice)
        fake.fail_next("hang_after", path_prefix=f"/v1/orders/{order_id}/refund")
        lost = await refund(client, payment_id, admin, 500)
        assert_problem(lost, 503, "provider_unavailable")
        fake.release_hangs()
        listed = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(admin))
        assert listed.json()["amount_pending_refund"] == 500
        # verify finds the refund by the rise of the order's refunded total, and never asks
        # LemonSqueezy again.
        verified = await verify(client, payment_id, alice)
        assert verified.json()["status"] == "partially_refunded", verified.text
        assert fake.orders[order_id]["attributes"]["refunded_amount"] == 500
        assert len(fake.calls("POST", f"/v1/orders/{order_id}/refund")) == 1
        listed = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(admin))
        assert (listed.json()["amount_refunded"], listed.json()["amount_pending_refund"]) == (
            500,
            0,
        )

    async def test_a_refund_in_the_dashboard_is_adopted(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        alice, admin = token("alice"), token("ops", admin=True)
        payment_id, order_id = await paid(client, fake, alice)
        fake.refund_in_dashboard(order_id, 900)
        [event] = fake.events_of("order_refunded")
        assert (await deliver(client, fake, event)).json()["outcome"] == "applied"
        listed = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(admin))
        [adopted] = listed.json()["refunds"]
        assert (adopted["amount"], adopted["status"]) == (900, "succeeded")
        # A second dashboard refund, learned by verify alone (its webhook lost).
        fake.refund_in_dashboard(order_id)
        assert (await verify(client, payment_id, alice)).json()["status"] == "refunded"
        listed = await client.get(f"{API}/{payment_id}/refunds", headers=bearer(admin))
        assert sorted(r["amount"] for r in listed.json()["refunds"]) == [900, 2000]

    @pytest.mark.parametrize("status", ["failed", "fraudulent"])
    async def test_a_declined_or_fraudulent_order_fails(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any, status: str
    ) -> None:
        alice = token("alice")
        body = await created(client, alice)
        fake.pay(checkout_id(fake, body["redirect_url"]), status=status)
        [event] = fake.events_of("order_created")
        assert (await deliver(client, fake, event)).json()["outcome"] == "applied"
        assert (await verify(client, body["payment_id"], alice)).json()["status"] == "failed"
        receipt = await client.get(f"{API}/receipt/{body['payment_id']}/pdf", headers=bearer(alice))
        assert receipt.status_code == 409


class TestWebhooks:
    async def test_forged_and_unsigned_deliveries_are_refused(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any, app: Any
    ) -> None:
        alice = token("alice")
        body = await created(client, alice)
        fake.pay(checkout_id(fake, body["redirect_url"]))
        [event] = fake.events_of("order_created")
        forged = await deliver(client, fake, event, secret="not-the-signing-secret")
        assert_problem(forged, 400, "invalid_signature")
        unsigned = await client.post(
            f"{API}/webhook/lemonsqueezy",
            content=fake.signed_delivery(event)[0],
            headers={"Content-Type": "application/json", "X-Event-Name": "order_created"},
        )
        assert_problem(unsigned, 400, "invalid_signature")
        # Signed, then altered on the way.
        signed_body, headers = fake.signed_delivery(event)
        altered = signed_body.replace(b'"paid"', b'"PAID"')
        tampered = await client.post(
            f"{API}/webhook/lemonsqueezy", content=altered, headers=headers
        )
        assert_problem(tampered, 400, "invalid_signature")
        record = await app.state.store.get(body["payment_id"])
        assert record.status == "pending"
        assert (await verify(client, body["payment_id"], alice)).json()["status"] == "pending"

    async def test_a_duplicate_changes_nothing(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        await paid(client, fake, token("alice"))
        [event] = fake.events_of("order_created")
        again = await deliver(client, fake, event)
        assert again.status_code == 200
        assert again.json()["outcome"] == "duplicate"

    async def test_out_of_order_events_never_move_a_payment_back(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any, app: Any
    ) -> None:
        alice = token("alice")
        body = await created(client, alice)
        order = fake.pay(checkout_id(fake, body["redirect_url"]))
        fake.refund_in_dashboard(order["id"], 400)
        fake.refund_in_dashboard(order["id"], 600)
        created_event = fake.events_of("order_created")[0]
        first, second = fake.events_of("order_refunded")
        # The later refund first, then the earlier one, then the order's creation. The later
        # event carries the order's refunded total (1000): one refund of 1000 is recorded,
        # and the earlier event (400, below what is recorded) adds nothing: the total is exact,
        # though two dashboard refunds read as one.
        assert (await deliver(client, fake, second)).json()["outcome"] == "applied"
        assert (await deliver(client, fake, first)).json()["outcome"] == "ignored"
        assert (await deliver(client, fake, created_event)).json()["outcome"] == "unchanged"
        record = await app.state.store.get(body["payment_id"])
        assert (record.status, record.amount_refunded) == ("partially_refunded", 1000)

    async def test_other_events_are_acknowledged_and_ignored(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy
    ) -> None:
        event = {
            "meta": {"event_name": "subscription_created"},
            "data": {"type": "subscriptions", "id": "1", "attributes": {}},
        }
        answer = await deliver(client, fake, event)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outcome"] == "ignored"

    async def test_a_body_that_is_not_an_event(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy
    ) -> None:
        answer = await deliver(client, fake, b'{"meta": []}')
        assert_problem(answer, 400, "invalid_payload")
        mismatched = await deliver(
            client,
            fake,
            {"meta": {"event_name": "order_created"}, "data": None},
            headers={"X-Event-Name": "order_refunded"},
        )
        assert_problem(mismatched, 400, "invalid_payload")


class TestFailures:
    async def test_an_outage_is_503_with_retry_after(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        fake.fail_next("unavailable", times=3, path_prefix="/v1/checkouts")
        answer = await create(client, token=token("alice"))
        assert_problem(answer, 503, "provider_unavailable")
        assert int(answer.headers["Retry-After"]) >= 1
        assert len(fake.calls("POST", "/v1/checkouts")) == 3

    async def test_rate_limited_passes_retry_after_on(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        fake.fail_next("rate_limit", path_prefix="/v1/checkouts", retry_after=30)
        answer = await create(client, token=token("alice"))
        assert_problem(answer, 503, "provider_unavailable")
        assert answer.headers["Retry-After"] == "30"
        assert len(fake.calls("POST", "/v1/checkouts")) == 1

    async def test_a_timeout_is_503(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        fake.fail_next("hang", times=3, path_prefix="/v1/checkouts")
        try:
            answer = await create(client, token=token("alice"))
        finally:
            fake.release_hangs()
        assert_problem(answer, 503, "provider_unavailable")

    async def test_a_refused_key_is_misconfiguration(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        fake.fail_next("unauthorized", path_prefix="/v1/checkouts")
        answer = await create(client, token=token("alice"))
        problem = assert_problem(answer, 503, "provider_misconfigured")
        assert API_KEY not in answer.text and "Unauthenticated" not in answer.text
        assert problem["detail"]

    async def test_health_makes_one_authenticated_call(
        self, client: httpx.AsyncClient, fake: FakeLemonSqueezy, token: Any
    ) -> None:
        admin = bearer(token("ops", admin=True))
        health = await client.get("/admin/health", headers=admin)
        assert health.status_code == 200, health.text
        assert health.json()["providers"]["lemonsqueezy"]["status"] == "connected"
        [call] = fake.calls("GET", f"/v1/stores/{STORE_ID}")
        assert call.headers["authorization"] == f"Bearer {API_KEY}"
        fake.fail_next("unauthorized", path_prefix="/v1/stores")
        health = await client.get("/admin/health", headers=admin)
        assert health.json()["providers"]["lemonsqueezy"]["status"] == "error"
        assert API_KEY not in health.text


class TestSettings:
    @pytest.fixture
    def lemon_env(self, fake: FakeLemonSqueezy) -> dict[str, str]:
        # The key without the signing secret: webhooks could never be verified.
        return {"LEMON_API_KEY": API_KEY, "LEMON_STORE_ID": STORE_ID, "LEMON_API_BASE": fake.url}

    def test_the_signing_secret_is_required_with_the_key(
        self, settings: Any, render_pool: Any
    ) -> None:
        from pydantic import ValidationError

        from app.provider_settings import ProviderSettings
        from services.payment_providers.lemonsqueezy import LemonSqueezyProvider

        with pytest.raises(ValidationError) as raised:
            ProviderSettings(settings, {"lemonsqueezy": LemonSqueezyProvider})
        assert "LEMON_WEBHOOK_SECRET" in str(raised.value)
        assert API_KEY not in str(raised.value)
        assert WEBHOOK_SECRET not in str(raised.value)
