"""PayPal through the service's HTTP API: the real app, Redis and WeasyPrint, and the real
PayPal provider talking over loopback to the fake PayPal.

Only PayPal's side is played by hand: the buyer approves with the fake's ``approve`` (or a GET
of the approval link), the merchant may refund in PayPal's dashboard, and the fake's controls
make PayPal fail. Everything of ours goes through our endpoints; the store is only read, to
see what a webhook did."""

from __future__ import annotations

import asyncio
import copy
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from tests.conftest import assert_problem, bearer
from tests.fakes.paypal_server import FakePayPal, WebhookSigner, running_fake_paypal
from tests.paypal_api_support import (
    API,
    ORDERS,
    VERIFY_SIGNATURE,
    WEBHOOK_URL,
    assert_nothing_from_paypal,
    capture,
    create_paypal_payment,
    deliver,
    events_for,
    lose_answers,
    order_id,
    paid_payment,
    paypal_overrides,
    paypal_payment,
    refund,
    refund_in_paypal,
    verify,
)
from tests.providers.paypal.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    WEBHOOK_ID,
    assert_no_violations,
)

# The provider's own retries: three attempts, each cut off after provider_timeout_seconds.
ATTEMPTS = 3
WRONG_SECRET = "EFwrongSecret0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="session")
def paypal_for_api() -> Iterator[FakePayPal]:
    with running_fake_paypal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as fake:
        yield fake


@pytest.fixture
def fake(paypal_for_api: FakePayPal) -> Iterator[FakePayPal]:
    """The fake PayPal, fresh for each test, and checked after it against PayPal's API
    descriptions (every request the app sent, every answer the fake gave)."""
    paypal_for_api.reset()
    yield paypal_for_api
    try:
        assert_no_violations(paypal_for_api)
    finally:
        paypal_for_api.reset()


@pytest.fixture
def settings_overrides(fake: FakePayPal) -> dict[str, Any]:
    return paypal_overrides(fake)


async def stored(app: Any, payment_id: str) -> Any:
    record = await app.state.store.get(payment_id)
    assert record is not None
    return record


class TestCreateIntent:
    async def test_creates_an_order_at_the_catalogue_price(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        response = await create_paypal_payment(
            client,
            amount=1,  # ignored: the price is the catalogue's
            return_url="https://shop.example/paid",
            cancel_url="https://shop.example/cart",
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["payment_id"].startswith("pp_")
        assert (body["provider"], body["status"]) == ("paypal", "pending")
        assert (body["plan"], body["amount"], body["currency"]) == ("pro", 2900, "EUR")

        order = fake.orders[order_id(body["payment_id"])]
        [unit] = order["purchase_units"]
        assert unit["amount"] == {"currency_code": "EUR", "value": "29.00"}
        assert unit["custom_id"] == (await stored(app, body["payment_id"])).reference
        approval = {link["rel"]: link["href"] for link in order["links"]}
        assert body["redirect_url"] == approval.get("payer-action", approval.get("approve"))
        assert body["redirect_url"].startswith(f"{fake.url}/checkoutnow?token=")
        [call] = fake.calls("POST", ORDERS)
        assert call.request_id  # PayPal-Request-Id on every create

    async def test_the_approval_link_takes_the_buyer_back_to_the_shop(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        response = await create_paypal_payment(client, return_url="https://shop.example/paid")
        payment_id = response.json()["payment_id"]
        async with httpx.AsyncClient() as browser:
            page = await browser.get(response.json()["redirect_url"])
        assert page.status_code == 302
        assert page.headers["location"].startswith(
            f"https://shop.example/paid?token={order_id(payment_id)}&PayerID="
        )
        verified = await verify(client, payment_id)
        assert verified.json()["status"] == "requires_capture"

    async def test_idempotency_key_replays_one_payment_and_one_order(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any
    ) -> None:
        alice = token("alice")
        key = {"Idempotency-Key": "checkout-7f3a"}
        # PayPal makes the order but its answer is lost: the client hears 503.
        lose_answers(fake, ORDERS, ATTEMPTS)
        lost = await create_paypal_payment(client, token=alice, headers=key)
        assert_problem(lost, 503, "provider_unavailable")
        assert int(lost.headers["Retry-After"]) >= 1
        assert len(fake.orders) == 1

        # The client retries with its key: PayPal answers with the order it made.
        retried = await create_paypal_payment(client, token=alice, headers=key)
        assert retried.status_code == 201, retried.text
        again = await create_paypal_payment(client, token=alice, headers=key)
        assert again.status_code == 201, again.text
        assert again.json() == retried.json()
        assert order_id(retried.json()["payment_id"]) in fake.orders
        assert len(fake.orders) == 1
        calls = fake.calls("POST", ORDERS)
        assert len(calls) == ATTEMPTS + 1  # the replay was answered from our own store
        assert len({c.request_id for c in calls}) == 1
        assert [calls[0].status, calls[1].status, calls[-1].status] == [503, 503, 200]
        assert [c.replayed for c in calls] == [False, False, False, True]

        reused = await create_paypal_payment(client, plan="basic", token=alice, headers=key)
        assert_problem(reused, 422, "idempotency_key_reused")
        assert len(fake.orders) == 1

        other = await create_paypal_payment(
            client, token=alice, headers={"Idempotency-Key": "checkout-8e2b"}
        )
        assert other.json()["payment_id"] != retried.json()["payment_id"]
        assert len(fake.orders) == 2


class TestCapture:
    async def test_approve_capture_and_verify(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        assert (await verify(client, payment_id)).json()["status"] == "requires_capture"

        captured = await capture(client, payment_id)
        assert captured.status_code == 200, captured.text
        body = captured.json()
        assert (body["status"], body["amount"], body["currency"]) == ("succeeded", 2900, "EUR")
        assert body["receipt_url"] == f"{API}/receipt/{payment_id}/pdf"
        [capture_id] = fake.captures
        assert fake.captures[capture_id]["amount"] == {"currency_code": "EUR", "value": "29.00"}
        assert (await stored(app, payment_id)).capture_id == capture_id

        verified = await verify(client, payment_id)
        assert verified.status_code == 200, verified.text
        assert verified.json() == body

    async def test_part_of_the_amount_is_refused_as_paypal_captures_it_all_here(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        part = await client.post(f"{API}/{payment_id}/capture", json={"amount": 100})
        assert_problem(part, 422, "operation_not_supported")
        assert fake.captures == {}

    async def test_capturing_twice_answers_the_first_result(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        first = await capture(client, payment_id)
        second = await capture(client, payment_id)
        assert second.status_code == 200, second.text
        assert second.json() == first.json()
        assert len(fake.captures) == 1

    async def test_a_double_click_captures_once(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        responses = await asyncio.gather(*(capture(client, payment_id) for _ in range(3)))
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert {r.json()["status"] for r in responses} == {"succeeded"}
        assert len(fake.captures) == 1

    async def test_only_the_owner_captures(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any
    ) -> None:
        alice = token("alice")
        payment_id = await paypal_payment(client, token=alice)
        fake.approve(order_id(payment_id))
        for other in (token("bob"), None):
            assert_problem(await capture(client, payment_id, token=other), 404, "payment_not_found")
        assert fake.calls("POST", f"{ORDERS}/{order_id(payment_id)}/capture") == []
        assert (await capture(client, payment_id, token=alice)).json()["status"] == "succeeded"

    async def test_capture_whose_answer_was_lost_is_captured_once(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        lose_answers(fake, f"{ORDERS}/", ATTEMPTS)
        lost = await capture(client, payment_id)
        assert_problem(lost, 503, "provider_unavailable")
        assert "Retry-After" in lost.headers

        again = await capture(client, payment_id)
        assert again.status_code == 200, again.text
        assert again.json()["status"] == "succeeded"
        [capture_id] = fake.captures
        assert (await stored(app, payment_id)).capture_id == capture_id

    async def test_an_unapproved_order_cannot_be_captured(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        payment_id = await paypal_payment(client)
        response = await capture(client, payment_id)
        body = assert_problem(response, 409, "invalid_payment_state")
        assert "not approved" in body["detail"]
        assert_nothing_from_paypal(response, fake)
        assert fake.captures == {}
        assert (await verify(client, payment_id)).json()["status"] == "pending"

    async def test_instrument_declined_then_another_way_to_pay(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        fake.decline_next_capture("instrument_declined")
        response = await capture(client, payment_id)
        body = assert_problem(response, 402, "payment_declined")
        assert (body["decline_code"], body["provider"]) == ("instrument_declined", "paypal")
        assert_nothing_from_paypal(response, fake)
        # The order stays approved: the buyer may pick another funding source and pay.
        assert (await verify(client, payment_id)).json()["status"] == "requires_capture"
        retried = await capture(client, payment_id)
        assert retried.json()["status"] == "succeeded"

    async def test_a_declined_capture_fails_the_payment(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        fake.decline_next_capture("capture_declined")
        response = await capture(client, payment_id)
        assert assert_problem(response, 402, "payment_declined")["decline_code"] == (
            "capture_declined"
        )
        verified = await verify(client, payment_id)
        assert (verified.json()["status"], verified.json()["receipt_url"]) == ("failed", None)
        assert_problem(await capture(client, payment_id), 409, "invalid_payment_state")

    async def test_an_order_cannot_be_canceled_through_the_api(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        payment_id = await paypal_payment(client)
        response = await client.post(f"{API}/{payment_id}/cancel")
        assert_problem(response, 422, "operation_not_supported")
        assert (await verify(client, payment_id)).json()["status"] == "pending"

    async def test_only_paypal_payments_on_the_paypal_route(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        for payment_id in ("pp_5O190127TN364715T", "sb_000000000000000000000000"):
            response = await capture(client, payment_id)
            assert_problem(response, 404, "payment_not_found")
        assert fake.calls("POST") == []


class TestReceipt:
    async def test_owner_reads_and_downloads_it(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any
    ) -> None:
        alice = token("alice")
        payment_id = await paid_payment(
            client, fake, token=alice, customer_email="alice@example.com"
        )
        verified = await verify(client, payment_id, token=alice)
        receipt_url = verified.json()["receipt_url"]
        assert receipt_url == f"{API}/receipt/{payment_id}/pdf"

        meta = await client.get(f"{API}/receipt/{payment_id}", headers=bearer(alice))
        assert meta.status_code == 200, meta.text
        receipt = meta.json()
        assert (receipt["plan"], receipt["plan_name"], receipt["amount"]) == ("pro", "Pro", 2900)
        assert (receipt["amount_formatted"], receipt["payment_method"]) == ("€29.00", "PayPal")
        assert receipt["status"] == "succeeded"

        pdf = await client.get(receipt_url, headers=bearer(alice))
        assert pdf.status_code == 200
        assert pdf.headers["content-type"] == "application/pdf"
        text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        for expected in (receipt["receipt_number"], "Pro", "€29.00", "PayPal", payment_id):
            assert expected in text, f"{expected!r} missing from the receipt"

    async def test_nobody_else_reads_it(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any
    ) -> None:
        payment_id = await paid_payment(client, fake, token=token("alice"))
        for url in (f"{API}/receipt/{payment_id}", f"{API}/receipt/{payment_id}/pdf"):
            assert_problem(
                await client.get(url, headers=bearer(token("bob"))), 404, "payment_not_found"
            )
            assert_problem(await client.get(url), 401, "not_authenticated")

    async def test_no_receipt_before_the_capture(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any
    ) -> None:
        alice = token("alice")
        payment_id = await paypal_payment(client, token=alice)
        fake.approve(order_id(payment_id))
        response = await client.get(f"{API}/receipt/{payment_id}/pdf", headers=bearer(alice))
        assert_problem(response, 409, "receipt_not_available")


class TestWebhooks:
    async def test_verified_capture_completed_pays_and_renders_the_receipt(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any, token: Any
    ) -> None:
        alice = token("alice")
        payment_id = await paypal_payment(client, token=alice)
        fake.approve(order_id(payment_id))
        # PayPal captures, but every answer to us is lost: only its webhook tells us.
        lose_answers(fake, f"{ORDERS}/", ATTEMPTS)
        assert_problem(await capture(client, payment_id, token=alice), 503, "provider_unavailable")
        assert (await stored(app, payment_id)).status == "pending"

        [event] = events_for(fake, "PAYMENT.CAPTURE.COMPLETED", payment_id)
        response = await deliver(client, fake, event)
        assert response.status_code == 200, response.text
        assert response.json() == {"received": True, "event_id": event["id"], "outcome": "applied"}
        record = await stored(app, payment_id)
        assert (record.status, record.capture_id) == ("succeeded", event["resource"]["id"])
        [check] = fake.calls("POST", VERIFY_SIGNATURE)
        assert check.status == 200

        await app.state.receipts.drain()
        assert app.state.receipts.renderer.path_for(payment_id).exists()
        meta = await client.get(f"{API}/receipt/{payment_id}", headers=bearer(alice))
        assert meta.status_code == 200, meta.text
        assert meta.json()["amount_formatted"] == "€29.00"

    async def test_each_event_applies_once(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        [event] = events_for(fake, "CHECKOUT.ORDER.APPROVED", payment_id)
        # PayPal delivers again with a new transmission (and signature) each time.
        outcomes = [(await deliver(client, fake, event)).json()["outcome"] for _ in range(3)]
        assert outcomes == ["applied", "duplicate", "duplicate"]
        assert (await stored(app, payment_id)).status == "requires_capture"
        history = await app.state.store.history(payment_id)
        assert [h.cause for h in history] == ["api:create-intent", f"webhook:{event['id']}"]

    @pytest.mark.parametrize("forgery", ["another_key", "altered_body", "unsigned"])
    async def test_a_forged_completion_leaves_the_payment_pending(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any, forgery: str
    ) -> None:
        victim = await paypal_payment(client)
        other = await paid_payment(client, fake)
        [genuine] = events_for(fake, "PAYMENT.CAPTURE.COMPLETED", other)
        victim_order = order_id(victim)
        reference = (await stored(app, victim)).reference
        if forgery == "altered_body":
            # PayPal's own signed delivery about another order, with the order ID changed.
            body, headers = fake.signed_delivery(genuine, WEBHOOK_ID)
            body = body.replace(order_id(other).encode(), victim_order.encode())
            assert victim_order.encode() in body
            response = await client.post(WEBHOOK_URL, content=body, headers=headers)
        else:
            forged = copy.deepcopy(genuine)
            forged["resource"]["supplementary_data"]["related_ids"]["order_id"] = victim_order
            forged["resource"]["custom_id"] = reference
            response = await deliver(
                client,
                fake,
                forged,
                signer=WebhookSigner(),
                cert_url=fake.cert_url(),  # names PayPal's certificate, signs with its own key
                signed=forgery != "unsigned",
            )
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "unchanged"
        assert (await stored(app, victim)).status == "pending"
        # The service asked PayPal itself about the order instead.
        assert fake.calls("GET", f"{ORDERS}/{victim_order}")
        assert (await verify(client, victim)).json()["status"] == "pending"

    async def test_late_events_never_move_a_payment_backwards(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any, token: Any
    ) -> None:
        payment_id = await paid_payment(client, fake)
        [approved] = events_for(fake, "CHECKOUT.ORDER.APPROVED", payment_id)
        [completed] = events_for(fake, "PAYMENT.CAPTURE.COMPLETED", payment_id)
        assert (await deliver(client, fake, approved)).json()["outcome"] == "rejected"
        assert (await stored(app, payment_id)).status == "succeeded"

        admin = token("ops", admin=True)
        assert (await refund(client, payment_id, admin, amount=1000)).status_code == 200
        partial = fake.last_event("PAYMENT.CAPTURE.REFUNDED")
        assert (await refund(client, payment_id, admin)).json()["status"] == "refunded"
        # Delivered only now, after the full refund: it must not undo it.
        assert (await deliver(client, fake, partial)).json()["outcome"] != "applied"
        # "Paid" is what a refunded payment still is: nothing new, and nothing undone.
        assert (await deliver(client, fake, completed)).json()["outcome"] == "unchanged"
        assert (await deliver(client, fake, approved)).json()["outcome"] == "duplicate"
        record = await stored(app, payment_id)
        assert (record.status, record.amount_refunded) == ("refunded", 2900)

    async def test_capture_refunded_whose_answer_we_lost(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid_payment(client, fake)
        lose_answers(fake, "/v2/payments/captures/", ATTEMPTS)
        lost = await refund(client, payment_id, admin, amount=1000)
        assert_problem(lost, 503, "provider_unavailable")
        assert (await stored(app, payment_id)).status == "succeeded"

        first = fake.last_event("PAYMENT.CAPTURE.REFUNDED")
        # The refund names its capture, not the order: while PayPal cannot tell us the
        # capture's order, the event is refused with a 503, so that PayPal delivers it again.
        fake.fail_next("unavailable", times=ATTEMPTS, path_prefix="/v2/payments/captures/")
        assert_problem(await deliver(client, fake, first), 503, "provider_unavailable")
        response = await deliver(client, fake, first)
        assert response.json()["outcome"] == "applied"
        record = await stored(app, payment_id)
        assert (record.status, record.amount_refunded) == ("partially_refunded", 1000)

        rest = await refund(client, payment_id, admin)
        assert rest.status_code == 200, rest.text
        assert (rest.json()["status"], rest.json()["amount_refunded"]) == ("refunded", 2900)
        final = fake.last_event("PAYMENT.CAPTURE.REFUNDED")
        assert final["id"] != first["id"]
        assert (await deliver(client, fake, final)).json()["outcome"] == "unchanged"
        assert (await deliver(client, fake, first)).json()["outcome"] == "duplicate"
        record = await stored(app, payment_id)
        assert (record.status, record.amount_refunded) == ("refunded", 2900)

    async def test_capture_denied_fails_the_payment(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        fake.decline_next_capture("capture_declined")
        assert_problem(await capture(client, payment_id), 402, "payment_declined")
        [denied] = events_for(fake, "PAYMENT.CAPTURE.DENIED", payment_id)
        assert (await deliver(client, fake, denied)).json()["outcome"] == "applied"
        assert (await stored(app, payment_id)).status == "failed"

    async def test_other_events_are_acknowledged_and_ignored(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        event = fake.build_event(
            "CUSTOMER.DISPUTE.CREATED", {"dispute_id": "PP-D-12345"}, resource_type="dispute"
        )
        response = await deliver(client, fake, event)
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "ignored"

    async def test_a_body_that_is_not_an_event(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        response = await client.post(
            WEBHOOK_URL, content=b'{"id": "WH-1"}', headers={"Content-Type": "application/json"}
        )
        assert_problem(response, 400, "invalid_payload")
        assert fake.requests == []


class TestRefundedBehindOurBack:
    """PayPal captured, our answer was lost, and the merchant then refunded part of it in
    PayPal's dashboard: the service must still end up where PayPal is."""

    async def _captured_then_refunded_at_paypal(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> str:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        lose_answers(fake, f"{ORDERS}/", ATTEMPTS)
        assert_problem(await capture(client, payment_id), 503, "provider_unavailable")
        [capture_id] = fake.captures
        await refund_in_paypal(fake, capture_id, "10.00")
        assert (await stored(app, payment_id)).status == "pending"
        return payment_id

    async def test_verify_catches_up(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        payment_id = await self._captured_then_refunded_at_paypal(client, fake, app)
        verified = await verify(client, payment_id)
        assert verified.status_code == 200, verified.text
        body = verified.json()
        assert (body["status"], body["amount_refunded"]) == ("partially_refunded", 1000)
        assert body["receipt_url"] == f"{API}/receipt/{payment_id}/pdf"

    async def test_the_refund_event_before_the_capture_event(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        payment_id = await self._captured_then_refunded_at_paypal(client, fake, app)
        [completed] = events_for(fake, "PAYMENT.CAPTURE.COMPLETED", payment_id)
        refunded = fake.last_event("PAYMENT.CAPTURE.REFUNDED")
        for event in (refunded, completed):  # PayPal does not promise any order
            assert (await deliver(client, fake, event)).status_code == 200
        record = await stored(app, payment_id)
        assert (record.status, record.amount_refunded) == ("partially_refunded", 1000)


class TestUnverifiedEventsAreNeverDuplicates:
    async def test_an_unsigned_delivery_does_not_swallow_the_signed_one(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        [approved] = events_for(fake, "CHECKOUT.ORDER.APPROVED", payment_id)
        # Unsigned: re-read from PayPal and applied, but it proves nothing about the event id.
        unsigned = await deliver(client, fake, approved, signed=False)
        assert unsigned.json()["outcome"] == "applied", unsigned.text
        signed = await deliver(client, fake, approved)
        assert signed.json()["outcome"] != "duplicate", signed.text
        again = await deliver(client, fake, approved)
        assert again.json()["outcome"] == "duplicate"


class TestWebhooksPayPalCannotVouchFor:
    """PayPal's verification API is down: no event is trusted, each one only makes the
    service read the order from PayPal."""

    async def test_verification_down_means_asking_paypal(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        approved = await paypal_payment(client)
        fake.approve(order_id(approved))
        [event] = events_for(fake, "CHECKOUT.ORDER.APPROVED", approved)
        victim = await paypal_payment(client)
        forged = copy.deepcopy(event)
        forged["resource"]["id"] = order_id(victim)
        for sent in (event, forged):
            fake.fail_next("unavailable", times=ATTEMPTS, path_prefix=VERIFY_SIGNATURE)
            assert (await deliver(client, fake, sent)).status_code == 200
        assert (await stored(app, approved)).status == "requires_capture"
        assert (await stored(app, victim)).status == "pending"
        assert fake.calls("GET", f"{ORDERS}/{order_id(victim)}")


class TestWebhooksWithoutWebhookId:
    """Without PAYPAL_WEBHOOK_ID nothing can be verified: every event only makes the service
    read the order from PayPal."""

    @pytest.fixture
    def settings_overrides(self, fake: FakePayPal) -> dict[str, Any]:
        return paypal_overrides(fake, paypal_webhook_id=None)

    async def test_a_genuine_event_applies_what_paypal_says(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        payment_id = await paypal_payment(client)
        fake.approve(order_id(payment_id))
        [event] = events_for(fake, "CHECKOUT.ORDER.APPROVED", payment_id)
        assert (await deliver(client, fake, event)).json()["outcome"] == "applied"
        assert (await stored(app, payment_id)).status == "requires_capture"
        assert fake.calls("POST", VERIFY_SIGNATURE) == []

    async def test_a_claim_paypal_does_not_back_changes_nothing(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any
    ) -> None:
        approved = await paypal_payment(client)
        fake.approve(order_id(approved))
        [event] = events_for(fake, "CHECKOUT.ORDER.APPROVED", approved)
        victim = await paypal_payment(client)
        forged = copy.deepcopy(event)
        forged["id"] = "WH-FORGED0000000000-000000000000000"
        forged["resource"]["id"] = order_id(victim)
        assert (await deliver(client, fake, forged)).json()["outcome"] == "unchanged"
        assert (await stored(app, victim)).status == "pending"

    async def test_a_refund_is_read_from_paypal(
        self, client: httpx.AsyncClient, fake: FakePayPal, app: Any, token: Any
    ) -> None:
        payment_id = await paid_payment(client, fake)
        lose_answers(fake, "/v2/payments/captures/", ATTEMPTS)
        lost = await refund(client, payment_id, token("ops", admin=True), amount=1000)
        assert_problem(lost, 503, "provider_unavailable")
        event = fake.last_event("PAYMENT.CAPTURE.REFUNDED")
        assert (await deliver(client, fake, event)).json()["outcome"] == "applied"
        record = await stored(app, payment_id)
        assert (record.status, record.amount_refunded) == ("partially_refunded", 1000)


class TestRefunds:
    async def test_partial_then_the_rest(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid_payment(client, fake)
        [capture_id] = fake.captures

        partial = await refund(client, payment_id, admin, amount=900)
        assert partial.status_code == 200, partial.text
        assert (partial.json()["status"], partial.json()["amount_refunded"]) == (
            "partially_refunded",
            900,
        )
        assert fake.captures[capture_id]["status"] == "PARTIALLY_REFUNDED"
        verified = await verify(client, payment_id)  # PayPal's view agrees with ours
        assert (verified.json()["status"], verified.json()["amount_refunded"]) == (
            "partially_refunded",
            900,
        )

        too_much = await refund(client, payment_id, admin, amount=2001)
        assert "2000" in assert_problem(too_much, 422, "refund_exceeds_balance")["detail"]

        rest = await refund(client, payment_id, admin)
        assert rest.status_code == 200, rest.text
        assert (rest.json()["status"], rest.json()["amount_refunded"]) == ("refunded", 2900)
        assert fake.captures[capture_id]["status"] == "REFUNDED"
        assert [r["amount"]["value"] for r in fake.refunds.values()] == ["9.00", "20.00"]

        assert_problem(await refund(client, payment_id, admin), 422, "refund_exceeds_balance")
        assert len(fake.calls("POST", f"/v2/payments/captures/{capture_id}/refund")) == 2

    async def test_paypal_knows_of_more_refunds_than_we_do(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid_payment(client, fake)
        [capture_id] = fake.captures
        await refund_in_paypal(fake, capture_id, "10.00")
        too_much = await refund(client, payment_id, admin)  # 2900 by our books, 1900 at PayPal
        assert_problem(too_much, 422, "refund_exceeds_balance")
        assert_nothing_from_paypal(too_much, fake)

        verified = await verify(client, payment_id)
        assert (verified.json()["status"], verified.json()["amount_refunded"]) == (
            "partially_refunded",
            1000,
        )
        rest = await refund(client, payment_id, admin)
        assert (rest.json()["status"], rest.json()["amount_refunded"]) == ("refunded", 2900)

    async def test_admins_only(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any
    ) -> None:
        alice = token("alice")
        payment_id = await paid_payment(client, fake, token=alice)
        assert_problem(await refund(client, payment_id, alice), 403, "forbidden")
        response = await client.post(f"{API}/{payment_id}/refund", json={})
        assert_problem(response, 401, "not_authenticated")
        assert fake.refunds == {}

    async def test_an_unpaid_payment_is_not_refunded(
        self, client: httpx.AsyncClient, fake: FakePayPal, token: Any
    ) -> None:
        payment_id = await paypal_payment(client)
        response = await refund(client, payment_id, token("ops", admin=True))
        assert_problem(response, 409, "invalid_payment_state")
        assert fake.refunds == {}


class TestPayPalFailures:
    @pytest.mark.parametrize("kind", ["server_error", "unavailable"])
    async def test_paypal_down(
        self, client: httpx.AsyncClient, fake: FakePayPal, kind: str
    ) -> None:
        fake.fail_next(kind, times=ATTEMPTS, path_prefix=ORDERS)
        response = await create_paypal_payment(client)
        assert_problem(response, 503, "provider_unavailable")
        assert int(response.headers["Retry-After"]) >= 1
        assert_nothing_from_paypal(response, fake)
        assert len(fake.calls("POST", ORDERS)) == ATTEMPTS
        assert fake.orders == {}

    async def test_paypal_slows_us_down(self, client: httpx.AsyncClient, fake: FakePayPal) -> None:
        fake.fail_next("rate_limit", path_prefix=ORDERS, retry_after=30)
        response = await create_paypal_payment(client)
        assert_problem(response, 503, "provider_unavailable")
        assert response.headers["Retry-After"] == "30"
        assert_nothing_from_paypal(response, fake)

    async def test_paypal_hangs(self, client: httpx.AsyncClient, fake: FakePayPal) -> None:
        payment_id = await paypal_payment(client)
        fake.fail_next("hang", times=ATTEMPTS, path_prefix=f"{ORDERS}/")
        response = await verify(client, payment_id)
        assert_problem(response, 503, "provider_unavailable")
        assert int(response.headers["Retry-After"]) >= 1
        assert_nothing_from_paypal(response, fake)


class TestWrongCredentials:
    @pytest.fixture
    def settings_overrides(self, fake: FakePayPal) -> dict[str, Any]:
        return paypal_overrides(fake, paypal_client_secret=WRONG_SECRET)

    async def test_misconfigured_and_no_secret_shown(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        response = await create_paypal_payment(client)
        body = assert_problem(response, 503, "provider_misconfigured")
        assert body["provider"] == "paypal"
        assert_nothing_from_paypal(response, fake, WRONG_SECRET)
        assert fake.orders == {}
        assert [c.status for c in fake.calls("POST", "/v1/oauth2/token")] == [401]


class TestTokensRefused:
    async def test_a_refused_fresh_token_is_misconfigured(
        self, client: httpx.AsyncClient, fake: FakePayPal
    ) -> None:
        fake.tokens_refused = True
        response = await create_paypal_payment(client)
        assert_problem(response, 503, "provider_misconfigured")
        assert_nothing_from_paypal(response, fake)
        assert fake.token_calls == 2  # one fresh token after the first was refused
