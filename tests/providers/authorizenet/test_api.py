"""Authorize.Net through the service's HTTP API: the real app, Redis and provider, talking over
loopback to the fake Authorize.Net. Only Authorize.Net's side is played by hand: the buyer
pays on the fake's form (``fake.pay``), the day's batch settles (``fake.settle``), the fake's
webhooks are delivered signed, and its faults make it fail."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.conftest import assert_problem, bearer
from tests.fakes.authorizenet_server import FakeAuthorizeNet

from .conftest import (
    API,
    SIGNATURE_KEY,
    TRANSACTION_KEY,
    WEBHOOK_URL,
    create,
    deliver,
    deliver_all,
    new_payment,
    open_form,
    pay,
    verify,
)


@pytest.fixture
def all_logs() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("payments")
    handler = Keep(level=logging.DEBUG)
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(saved)


def requests_named(fake: FakeAuthorizeNet, name: str) -> list[dict[str, Any]]:
    return [inner for request_name, inner in fake.requests if request_name == name]


def transactions_of(fake: FakeAuthorizeNet, kind: str) -> list[dict[str, Any]]:
    return [
        inner["transactionRequest"]
        for inner in requests_named(fake, "createTransactionRequest")
        if inner["transactionRequest"]["transactionType"] == kind
    ]


class TestCreateAndRedirectPage:
    async def test_the_form_is_asked_for_the_catalogue_amount_with_our_id_as_invoice(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment = await new_payment(client)
        payment_id = payment["payment_id"]
        assert payment["status"] == "pending" and payment["provider"] == "authorizenet"
        assert payment_id.startswith("an_") and len(payment_id) == 20
        [asked] = requests_named(fake, "getHostedPaymentPageRequest")
        transaction = asked["transactionRequest"]
        assert transaction["transactionType"] == "authCaptureTransaction"
        assert transaction["amount"] == "29.00" and transaction["currencyCode"] == "EUR"
        assert transaction["order"]["invoiceNumber"] == payment_id

    async def test_manual_capture_asks_for_an_authorization_only(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        await new_payment(client, capture_method="manual")
        [asked] = requests_named(fake, "getHostedPaymentPageRequest")
        assert asked["transactionRequest"]["transactionType"] == "authOnlyTransaction"

    async def test_the_page_posts_the_token_to_the_hosted_form_and_never_shows_it_in_a_url(
        self,
        client: httpx.AsyncClient,
        fake: FakeAuthorizeNet,
        all_logs: list[logging.LogRecord],
    ) -> None:
        payment = await new_payment(client)
        page = await client.get(httpx.URL(payment["redirect_url"]).path)
        assert page.status_code == 200
        token = fake.token_for(payment["payment_id"])
        assert token not in payment["redirect_url"]
        assert f'action="{fake.url}/payment/payment"' in page.text
        assert f'name="token" value="{token}"' in page.text
        assert "<noscript>" in page.text and 'type="submit"' in page.text
        policy = page.headers["content-security-policy"]
        assert f"form-action {fake.url}" in policy and "default-src 'none'" in policy
        nonce = policy.split("'nonce-")[1].split("'")[0]
        assert f'<script nonce="{nonce}">' in page.text  # the only script the page may run
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["referrer-policy"] == "no-referrer"
        # What the browser's auto-submit does: Authorize.Net's form takes the token.
        async with httpx.AsyncClient() as browser:
            form = await browser.post(f"{fake.url}/payment/payment", data={"token": token})
        assert form.status_code == 200 and "29.00" in form.text
        for record in all_logs:
            assert token not in record.getMessage()
            assert token not in repr(record.__dict__)

    async def test_a_used_form_is_not_posted_again(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment = await new_payment(client)
        await pay(client, fake, payment)
        await deliver_all(client, fake)
        again = await client.get(httpx.URL(payment["redirect_url"]).path)
        assert_problem(again, 409, "invalid_payment_state")
        unknown = await client.get(f"{API}/authorizenet/an_aaaaaaaaaaaaaaaaa/pay")
        assert_problem(unknown, 404, "payment_not_found")


class TestAuthorizeThenCapture:
    async def test_authorized_then_captured(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, token: Any
    ) -> None:
        alice = token("alice")
        payment = await new_payment(client, capture_method="manual", token=alice)
        payment_id = payment["payment_id"]
        trans_id = await pay(client, fake, payment)
        verified = await verify(client, payment_id, token=alice)
        assert verified.json()["status"] == "requires_capture"
        captured = await client.post(f"{API}/{payment_id}/capture", headers=bearer(alice))
        assert captured.status_code == 200, captured.text
        assert captured.json()["status"] == "succeeded"
        assert fake.transactions[trans_id].status == "capturedPendingSettlement"
        [capture] = transactions_of(fake, "priorAuthCaptureTransaction")
        assert capture["refTransId"] == trans_id
        # Capturing again answers the first result, and Authorize.Net is not asked again.
        again = await client.post(f"{API}/{payment_id}/capture", headers=bearer(alice))
        assert again.json()["status"] == "succeeded"
        assert len(transactions_of(fake, "priorAuthCaptureTransaction")) == 1
        receipt = await client.get(f"{API}/receipt/{payment_id}", headers=bearer(alice))
        assert receipt.status_code == 200, receipt.text

    async def test_an_authorization_is_voided_by_cancel(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment = await new_payment(client, capture_method="manual")
        trans_id = await pay(client, fake, payment)
        await deliver_all(client, fake)
        canceled = await client.post(f"{API}/{payment['payment_id']}/cancel")
        assert canceled.status_code == 200, canceled.text
        assert canceled.json()["status"] == "canceled"
        assert fake.transactions[trans_id].status == "voided"

    async def test_a_sale_is_paid_by_its_webhook(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment = await new_payment(client)
        await pay(client, fake, payment)
        [answer] = await deliver_all(client, fake)
        assert answer.status_code == 200 and answer.json()["outcome"] == "applied"
        assert (await verify(client, payment["payment_id"])).json()["status"] == "succeeded"


class TestRefunds:
    async def paid_and_settled(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, *, settle: bool = True
    ) -> tuple[str, str]:
        payment = await new_payment(client)
        trans_id = await pay(client, fake, payment)
        assert (await verify(client, payment["payment_id"])).json()["status"] == "succeeded"
        if settle:
            fake.settle()
        return payment["payment_id"], trans_id

    async def test_partial_then_full_refunds_after_settlement(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, token: Any
    ) -> None:
        admin = bearer(token("root", admin=True))
        payment_id, trans_id = await self.paid_and_settled(client, fake)
        first = await client.post(f"{API}/{payment_id}/refund", json={"amount": 900}, headers=admin)
        assert first.status_code == 202, first.text  # approved, paid out at settlement
        [asked] = transactions_of(fake, "refundTransaction")
        assert asked["refTransId"] == trans_id and asked["amount"] == "9.00"
        assert asked["payment"]["creditCard"] == {"cardNumber": "1111", "expirationDate": "XXXX"}
        rest = await client.post(f"{API}/{payment_id}/refund", json={}, headers=admin)
        assert rest.status_code == 202 and rest.json()["refund"]["amount"] == 2000
        fake.settle()
        after = (await verify(client, payment_id)).json()
        assert after["status"] == "refunded" and after["amount_refunded"] == 2900

    async def test_a_full_refund_before_settlement_voids_and_says_so(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, token: Any
    ) -> None:
        admin = bearer(token("root", admin=True))
        payment_id, trans_id = await self.paid_and_settled(client, fake, settle=False)
        refunded = await client.post(f"{API}/{payment_id}/refund", json={}, headers=admin)
        assert refunded.status_code == 200, refunded.text
        body = refunded.json()
        assert body["status"] == "refunded"
        assert body["refund"]["provider_refund_id"] == f"void-{trans_id}"
        assert fake.transactions[trans_id].status == "voided"
        assert not transactions_of(fake, "refundTransaction")
        # Its void webhook, and a verify, leave the refunded payment as it is.
        answers = await deliver_all(client, fake)
        assert all(answer.status_code == 200 for answer in answers)
        after = (await verify(client, payment_id)).json()
        assert after["status"] == "refunded" and after["amount_refunded"] == 2900

    async def test_a_partial_refund_before_settlement_is_refused_clearly(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, token: Any
    ) -> None:
        admin = bearer(token("root", admin=True))
        payment_id, trans_id = await self.paid_and_settled(client, fake, settle=False)
        refused = await client.post(
            f"{API}/{payment_id}/refund", json={"amount": 100}, headers=admin
        )
        body = assert_problem(refused, 409, "invalid_payment_state")
        assert "settled" in body["detail"]
        assert fake.transactions[trans_id].status == "capturedPendingSettlement"

    async def test_a_repeated_refund_is_made_once(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, token: Any
    ) -> None:
        admin = {**bearer(token("root", admin=True)), "Idempotency-Key": "refund-1"}
        payment_id, _ = await self.paid_and_settled(client, fake)
        # The first answer is lost after Authorize.Net made the refund.
        fake.fail_next("hang_after", request="createTransactionRequest")
        lost = await client.post(f"{API}/{payment_id}/refund", json={"amount": 500}, headers=admin)
        assert_problem(lost, 503, "provider_unavailable")
        again = await client.post(f"{API}/{payment_id}/refund", json={"amount": 500}, headers=admin)
        assert again.status_code == 202, again.text
        assert (
            len(
                [t for t in fake.transactions.values() if t.transaction_type == "refundTransaction"]
            )
            == 1
        )


async def capture(
    client: httpx.AsyncClient, payment_id: str, amount: int | None = None
) -> httpx.Response:
    body = {} if amount is None else {"amount": amount}
    return await client.post(f"{API}/{payment_id}/capture", json=body)


async def refund(
    client: httpx.AsyncClient, payment_id: str, admin: dict[str, str], amount: int | None = None
) -> httpx.Response:
    body = {} if amount is None else {"amount": amount}
    return await client.post(f"{API}/{payment_id}/refund", json=body, headers=admin)


class TestPartialCapture:
    async def authorized(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> tuple[str, str]:
        payment = await new_payment(client, capture_method="manual")
        trans_id = await pay(client, fake, payment)
        assert (await verify(client, payment["payment_id"])).json()["status"] == "requires_capture"
        return payment["payment_id"], trans_id

    @pytest.mark.parametrize("settled", [True, False], ids=["settled", "before-settlement"])
    async def test_part_is_captured_the_rest_released_and_refunds_stop_at_it(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, token: Any, settled: bool
    ) -> None:
        admin = bearer(token("root", admin=True))
        payment_id, trans_id = await self.authorized(client, fake)

        captured = await capture(client, payment_id, 1500)

        assert captured.status_code == 200, captured.text
        body = captured.json()
        assert (body["status"], body["amount"], body["amount_captured"]) == (
            "succeeded",
            2900,
            1500,
        )
        [asked] = transactions_of(fake, "priorAuthCaptureTransaction")
        assert (asked["amount"], asked["refTransId"]) == ("15.00", trans_id)
        held = fake.transactions[trans_id]
        assert (held.auth_amount, held.settle_amount) == (Decimal("29.00"), Decimal("15.00"))
        again = (await verify(client, payment_id)).json()  # Authorize.Net's word says the same
        assert (again["status"], again["amount_captured"]) == ("succeeded", 1500)

        too_much = await refund(client, payment_id, admin, 1501)
        assert assert_problem(too_much, 422, "refund_exceeds_balance")["left"] == 1500
        assert transactions_of(fake, "refundTransaction") == []
        if settled:
            fake.settle()
            part = await refund(client, payment_id, admin, 400)
            assert part.status_code == 202, part.text
            rest = await refund(client, payment_id, admin)
            assert rest.status_code == 202, rest.text
            assert rest.json()["refund"]["amount"] == 1100
            asked_refunds = transactions_of(fake, "refundTransaction")
            assert [r["amount"] for r in asked_refunds] == ["4.00", "11.00"]
            fake.settle()
            after = (await verify(client, payment_id)).json()
        else:
            # Unsettled: all that was taken comes back by voiding the transaction.
            rest = await refund(client, payment_id, admin)
            assert rest.status_code == 200, rest.text
            assert rest.json()["refund"]["amount"] == 1500
            assert held.status == "voided"
            after = (await verify(client, payment_id)).json()
        assert (after["status"], after["amount_refunded"], after["amount_captured"]) == (
            "refunded",
            1500,
            1500,
        )
        assert_problem(await refund(client, payment_id, admin, 1), 422, "refund_exceeds_balance")

    async def test_asking_again_answers_the_capture_and_another_amount_conflicts(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment_id, _ = await self.authorized(client, fake)
        first = await capture(client, payment_id, 1500)
        assert first.status_code == 200, first.text

        replay = await capture(client, payment_id, 1500)
        all_of_it = await capture(client, payment_id)
        other = await capture(client, payment_id, 2000)

        for response in (replay, all_of_it):
            assert response.status_code == 200, response.text
            assert response.json()["amount_captured"] == 1500
        assert_problem(other, 409, "invalid_payment_state")
        assert len(transactions_of(fake, "priorAuthCaptureTransaction")) == 1

    async def test_a_capture_whose_answer_was_lost_is_answered_by_reading_it(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, app: Any
    ) -> None:
        payment_id, trans_id = await self.authorized(client, fake)
        # Authorize.Net captures, and its answer never comes back: asked again, it refuses
        # (reason 311, no idempotency keys), and the transaction is read instead.
        fake.fail_next("hang_after", request="createTransactionRequest")

        response = await capture(client, payment_id, 1500)

        assert response.status_code == 200, response.text
        assert (response.json()["status"], response.json()["amount_captured"]) == (
            "succeeded",
            1500,
        )
        assert len(transactions_of(fake, "priorAuthCaptureTransaction")) == 2
        assert len(fake.events_of("net.authorize.payment.priorAuthCapture.created")) == 1
        assert fake.transactions[trans_id].settle_amount == Decimal("15.00")
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_captured) == ("succeeded", 1500)
        assert_problem(await capture(client, payment_id, 2000), 409, "invalid_payment_state")

    async def test_another_amount_than_was_taken_conflicts_before_authorizenet_is_asked(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, app: Any
    ) -> None:
        payment_id, trans_id = await self.authorized(client, fake)
        fake.capture_in_interface(trans_id, Decimal("10.00"))  # its webhook not yet here

        assert_problem(await capture(client, payment_id, 1500), 409, "invalid_payment_state")
        assert transactions_of(fake, "priorAuthCaptureTransaction") == []
        answered = await capture(client, payment_id, 1000)
        assert (answered.json()["status"], answered.json()["amount_captured"]) == (
            "succeeded",
            1000,
        )
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_captured) == ("succeeded", 1000)
        assert fake.transactions[trans_id].settle_amount == Decimal("10.00")

    async def test_more_than_authorized_is_refused_before_authorizenet_is_asked(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment_id, trans_id = await self.authorized(client, fake)

        over = await capture(client, payment_id, 2901)

        assert assert_problem(over, 422, "capture_exceeds_amount")["amount"] == 2900
        assert transactions_of(fake, "priorAuthCaptureTransaction") == []
        assert fake.transactions[trans_id].status == "authorizedPendingCapture"
        whole = await capture(client, payment_id, 2900)  # all of it, named
        assert (whole.json()["status"], whole.json()["amount_captured"]) == ("succeeded", None)
        [asked] = transactions_of(fake, "priorAuthCaptureTransaction")
        assert "amount" not in asked

    async def test_a_partial_capture_made_at_authorizenet_arrives_by_webhook(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, app: Any, token: Any
    ) -> None:
        payment_id, trans_id = await self.authorized(client, fake)
        fake.capture_in_interface(trans_id, Decimal("12.00"))  # in the Merchant Interface

        response = await deliver(
            client, fake, fake.events_of("net.authorize.payment.priorAuthCapture.created")[0]
        )

        assert response.json()["outcome"] == "applied", response.text
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_captured) == ("succeeded", 1200)
        over = await refund(client, payment_id, bearer(token("root", admin=True)), 1201)
        assert_problem(over, 422, "refund_exceeds_balance")


class TestDeclinesAndReview:
    async def test_a_decline_leaves_the_form_open_for_another_card(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment = await new_payment(client)
        token = await open_form(client, payment)
        fake.pay(token, "declined")
        [declined] = await deliver_all(client, fake)
        assert declined.status_code == 200
        assert (await verify(client, payment["payment_id"])).json()["status"] == "pending"
        fake.pay(token, "approved")
        assert (await verify(client, payment["payment_id"])).json()["status"] == "succeeded"

    async def test_held_for_review_is_pending_until_approved(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment = await new_payment(client)
        trans_id = await pay(client, fake, payment, "held")
        [held] = await deliver_all(client, fake)
        assert held.status_code == 200
        assert (await verify(client, payment["payment_id"])).json()["status"] == "pending"
        fake.approve_held(trans_id)
        approved = await deliver(client, fake, fake.events[-1])
        assert approved.json()["outcome"] == "applied"
        assert (await verify(client, payment["payment_id"])).json()["status"] == "succeeded"


class TestWebhooks:
    async def test_forged_and_unsigned_deliveries_are_refused(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment = await new_payment(client)
        await pay(client, fake, payment)
        event = fake.events[0]
        forged = await deliver(client, fake, event, key="0" * 128)
        assert_problem(forged, 400, "invalid_signature")
        body, headers = fake.signed_delivery(event)
        unsigned = await client.post(
            WEBHOOK_URL, content=body, headers={"Content-Type": "application/json"}
        )
        assert_problem(unsigned, 400, "invalid_signature")
        altered = await client.post(
            WEBHOOK_URL, content=body.replace(b"29.0", b"1.0"), headers=headers
        )
        assert_problem(altered, 400, "invalid_signature")
        assert (await verify(client, payment["payment_id"])).json()["status"] == "succeeded"

    async def test_lower_case_hex_is_accepted_and_a_duplicate_changes_nothing(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment = await new_payment(client)
        await pay(client, fake, payment)
        body, headers = fake.signed_delivery(fake.events[0])
        headers["X-ANET-Signature"] = headers["X-ANET-Signature"].lower()
        first = await client.post(WEBHOOK_URL, content=body, headers=headers)
        assert first.json()["outcome"] == "applied"
        again = await client.post(WEBHOOK_URL, content=body, headers=headers)
        assert again.status_code == 200 and again.json()["outcome"] == "duplicate"

    async def test_events_out_of_order_never_move_back(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        payment = await new_payment(client, capture_method="manual")
        await pay(client, fake, payment)
        authorized = fake.events[0]
        await client.post(f"{API}/{payment['payment_id']}/capture")
        captured = fake.events[-1]
        assert (await deliver(client, fake, captured)).status_code == 200
        late = await deliver(client, fake, authorized)
        assert late.status_code == 200 and late.json()["outcome"] != "applied"
        assert (await verify(client, payment["payment_id"])).json()["status"] == "succeeded"

    async def test_a_refunds_webhook_finds_our_record_not_a_new_one(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet, token: Any
    ) -> None:
        payment = await new_payment(client)
        await pay(client, fake, payment)
        await verify(client, payment["payment_id"])
        fake.settle()
        admin = bearer(token("root", admin=True))
        ours = await client.post(
            f"{API}/{payment['payment_id']}/refund", json={"amount": 100}, headers=admin
        )
        assert ours.status_code == 202
        refund_event = fake.events_of("net.authorize.payment.refund.created")[0]
        answer = await deliver(client, fake, refund_event)
        assert answer.status_code == 200
        listed = await client.get(f"{API}/{payment['payment_id']}/refunds", headers=admin)
        assert len(listed.json()["refunds"]) == 1  # the event found our record, not a new one


class TestOutagesAndMisconfiguration:
    async def test_server_errors_and_timeouts_are_503(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        fake.fail_next("server_error", times=3)
        assert_problem(await create(client), 503, "provider_unavailable")
        fake.fail_next("hang", times=3)
        assert_problem(await create(client), 503, "provider_unavailable")
        fake.fail_next("processing_error", times=3)
        assert_problem(await create(client), 503, "provider_unavailable")
        assert (await create(client)).status_code == 201

    async def test_bad_credentials_are_an_operators_problem(
        self, client: httpx.AsyncClient, fake: FakeAuthorizeNet
    ) -> None:
        fake.credentials_valid = False
        refused = await create(client)
        assert_problem(refused, 503, "provider_misconfigured")
        for secret in (TRANSACTION_KEY, SIGNATURE_KEY, "E00007", "authentication failed"):
            assert secret not in refused.text
        health = await client.get("/health")
        assert TRANSACTION_KEY not in health.text


@pytest.mark.parametrize("anet_env_overrides", [{"AUTHORIZENET_SIGNATURE_KEY": ""}])
async def test_without_a_signature_key_it_is_not_configured(
    client: httpx.AsyncClient, fake: FakeAuthorizeNet
) -> None:
    assert_problem(await create(client), 503, "provider_not_configured")
    assert not fake.requests
