"""The Stripe flow through the service's HTTP API, against the fake Stripe over real HTTP.

Create in both modes, pay, verify or webhook, receipt, capture, cancel, partial and full
refund, and the failures a client sees. Only the service's endpoints are called; the fake
stands in for Stripe and, through ``FakeStripe.pay``, for the customer on Stripe's page.
"""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from tests.conftest import assert_problem, bearer, create_payment
from tests.fakes.stripe_server import FakeStripe, FaultKind
from tests.providers.stripe.conftest import (
    PUBLISHABLE_KEY,
    SECRET_KEY,
    WEBHOOK_SECRET,
)

API = "/api/v1/payment"
WEBHOOK = f"{API}/webhook/stripe"
SESSIONS = "/v1/checkout/sessions"
INTENTS = "/v1/payment_intents"
WRONG_KEY = "sk_test_51WrongKeyNobodyIssued0000000000000"
# Stripe answers within milliseconds here; a short timeout keeps the hang cases quick.
TIMEOUT_S = 0.5
PRO_PRICE = 2900


def stripe_overrides(fake: FakeStripe, **extra: Any) -> dict[str, Any]:
    return {
        "stripe_secret_key": SECRET_KEY,
        "stripe_publishable_key": PUBLISHABLE_KEY,
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "stripe_api_base": fake.url,
        "provider_timeout_seconds": TIMEOUT_S,
        **extra,
    }


@pytest.fixture
def settings_overrides(fake_stripe: FakeStripe) -> dict[str, Any]:
    return stripe_overrides(fake_stripe)


@pytest.fixture(autouse=True)
def no_secret_in_any_response(client: httpx.AsyncClient) -> None:
    """Whatever a test does, no answer of the service carries a Stripe secret."""

    async def check(response: httpx.Response) -> None:
        await response.aread()
        for secret in (SECRET_KEY, WRONG_KEY, WEBHOOK_SECRET):
            assert secret.encode() not in response.content, f"{response.url} leaked a secret"

    client.event_hooks["response"].append(check)


# -- helpers -------------------------------------------------------------------------------


async def create_stripe(
    client: httpx.AsyncClient, *, token: str | None = None, **body: Any
) -> dict[str, Any]:
    return await create_payment(client, token=token, provider="stripe", **body)


async def verify(
    client: httpx.AsyncClient, payment_id: str, *, token: str | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/verify", json={"payment_id": payment_id}, headers=bearer(token) if token else {}
    )


async def deliver(
    client: httpx.AsyncClient,
    event: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
) -> httpx.Response:
    body, headers = FakeStripe.signed_delivery(event, secret, timestamp=timestamp)
    return await client.post(WEBHOOK, content=body, headers=headers)


async def stored_status(app: Any, payment_id: str) -> str:
    """What the service holds now, read without asking Stripe (verify would)."""
    record = await app.state.store.get(payment_id)
    return str(record.status)


async def paid_by_verify(
    client: httpx.AsyncClient, fake: FakeStripe, token: str, **body: Any
) -> str:
    payment = await create_stripe(client, token=token, **body)
    fake.pay(payment["payment_id"])
    response = await verify(client, payment["payment_id"], token=token)
    assert response.json()["status"] == "succeeded", response.text
    return str(payment["payment_id"])


async def refund(
    client: httpx.AsyncClient, payment_id: str, token: str, amount: int | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/{payment_id}/refund",
        json={"amount": amount} if amount is not None else None,
        headers=bearer(token),
    )


async def refund_in_dashboard(fake: FakeStripe, intent_id: str, amount: int) -> None:
    """Someone refunds in Stripe's dashboard: the service learns of it by webhook only."""
    async with httpx.AsyncClient(base_url=fake.url) as stripe_api:
        response = await stripe_api.post(
            "/v1/refunds",
            data={"payment_intent": intent_id, "amount": str(amount)},
            headers={"Authorization": f"Bearer {SECRET_KEY}"},
        )
    assert response.status_code == 200, response.text


async def capture_at_stripe(
    fake: FakeStripe, intent_id: str, amount: int, *, idempotency_key: str | None = None
) -> None:
    """A capture of part of an intent that reaches Stripe without the service hearing the
    answer: made in the Dashboard or, under the service's own key and with its parameters,
    one of the service's whose answer was lost."""
    headers = {"Authorization": f"Bearer {SECRET_KEY}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    async with httpx.AsyncClient(base_url=fake.url) as stripe_api:
        response = await stripe_api.post(
            f"{INTENTS}/{intent_id}/capture",
            data={"amount_to_capture": str(amount), "expand[0]": "latest_charge"},
            headers=headers,
        )
    assert response.status_code == 200, response.text


async def authorized(
    client: httpx.AsyncClient, fake: FakeStripe, *, ui_mode: str = "embedded"
) -> tuple[str, str]:
    """A manual-capture payment the customer has authorized and the service knows so: its
    ID and its PaymentIntent's."""
    payment = await create_stripe(client, ui_mode=ui_mode, capture_method="manual")
    payment_id = payment["payment_id"]
    intent = fake.pay(payment_id)
    assert (await verify(client, payment_id)).json()["status"] == "requires_capture"
    return payment_id, str(intent["id"])


async def capture(
    client: httpx.AsyncClient, payment_id: str, amount: int | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/{payment_id}/capture", json={"amount": amount} if amount is not None else None
    )


# -- create ---------------------------------------------------------------------------------


class TestCreateIntent:
    async def test_hosted_is_a_checkout_session_at_the_catalogue_price(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, token: Any
    ) -> None:
        body = await create_stripe(
            client,
            token=token("alice"),
            amount=1,  # ignored: the price is the catalogue's
            customer_email="alice@example.com",
        )
        assert body["payment_id"].startswith("cs_")
        assert (body["amount"], body["currency"], body["plan"]) == (PRO_PRICE, "EUR", "pro")
        assert (body["status"], body["provider"]) == ("pending", "stripe")
        session = fake_stripe.sessions[body["payment_id"]]
        assert body["redirect_url"] == session["url"]
        assert body["client_secret"] is None
        assert (session["amount_total"], session["currency"]) == (PRO_PRICE, "eur")
        assert session["customer_email"] == "alice@example.com"
        assert session["metadata"]["plan"] == "pro"
        assert session["metadata"]["user_id"] == "alice"

    async def test_embedded_is_a_payment_intent_with_client_secret_and_publishable_key(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe
    ) -> None:
        body = await create_stripe(client, ui_mode="embedded", amount=1)
        assert body["payment_id"].startswith("pi_")
        intent = fake_stripe.payment_intents[body["payment_id"]]
        assert body["client_secret"] == intent["client_secret"]
        assert body["publishable_key"] == PUBLISHABLE_KEY
        assert body["redirect_url"] is None
        assert (body["amount"], body["currency"]) == (PRO_PRICE, "EUR")
        assert (intent["amount"], intent["currency"]) == (PRO_PRICE, "eur")

    @pytest.mark.parametrize(("ui_mode", "path"), [("hosted", SESSIONS), ("embedded", INTENTS)])
    async def test_idempotency_key_replays_without_a_second_creation(
        self,
        client: httpx.AsyncClient,
        fake_stripe: FakeStripe,
        token: Any,
        ui_mode: str,
        path: str,
    ) -> None:
        headers = {**bearer(token("alice")), "Idempotency-Key": "order-42"}
        body = {"plan": "pro", "provider": "stripe", "ui_mode": ui_mode}
        first = await client.post(f"{API}/create-intent", json=body, headers=headers)
        again = await client.post(f"{API}/create-intent", json=body, headers=headers)
        assert first.status_code == again.status_code == 201, again.text
        assert again.json() == first.json()
        assert len(fake_stripe.calls("POST", path)) == 1

        other = await client.post(
            f"{API}/create-intent", json={**body, "plan": "basic"}, headers=headers
        )
        assert_problem(other, 422, "idempotency_key_reused")
        assert len(fake_stripe.calls("POST", path)) == 1


# -- pay, verify, receipt --------------------------------------------------------------------


class TestPayVerifyAndReceipt:
    @pytest.mark.parametrize("ui_mode", ["hosted", "embedded"])
    async def test_paid_payment_has_a_receipt_for_its_owner_only(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, token: Any, ui_mode: str
    ) -> None:
        alice = token("alice")
        payment = await create_stripe(client, token=alice, ui_mode=ui_mode)
        payment_id = payment["payment_id"]
        fake_stripe.pay(payment_id)

        verified = await verify(client, payment_id, token=alice)
        assert verified.status_code == 200, verified.text
        body = verified.json()
        assert (body["status"], body["amount"], body["currency"]) == ("succeeded", PRO_PRICE, "EUR")
        assert body["receipt_url"] == f"{API}/receipt/{payment_id}/pdf"

        meta = await client.get(f"{API}/receipt/{payment_id}", headers=bearer(alice))
        assert meta.status_code == 200, meta.text
        receipt = meta.json()
        assert (receipt["plan"], receipt["plan_name"]) == ("pro", "Pro")
        assert (receipt["amount_formatted"], receipt["status"]) == ("€29.00", "succeeded")
        assert receipt["pdf_url"] == body["receipt_url"]

        pdf = await client.get(body["receipt_url"], headers=bearer(alice))
        assert pdf.status_code == 200, pdf.text
        assert pdf.headers["content-type"] == "application/pdf"
        text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        for expected in ("Pro", "€29.00", receipt["receipt_number"]):
            assert expected in text, f"{expected!r} missing from the receipt"

        for url in (f"{API}/receipt/{payment_id}", body["receipt_url"]):
            assert_problem(
                await client.get(url, headers=bearer(token("bob"))), 404, "payment_not_found"
            )
            assert_problem(await client.get(url), 401, "not_authenticated")
        admin = await client.get(
            f"{API}/receipt/{payment_id}", headers=bearer(token("ops", admin=True))
        )
        assert admin.status_code == 200

    async def test_unpaid_is_pending_without_receipt(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, token: Any
    ) -> None:
        alice = token("alice")
        payment = await create_stripe(client, token=alice)
        body = (await verify(client, payment["payment_id"], token=alice)).json()
        assert (body["status"], body["receipt_url"]) == ("pending", None)
        response = await client.get(f"{API}/receipt/{payment['payment_id']}", headers=bearer(alice))
        assert_problem(response, 409, "receipt_not_available")

    async def test_a_declined_card_leaves_it_pending_for_another_try(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe
    ) -> None:
        payment = await create_stripe(client, ui_mode="embedded")
        fake_stripe.pay(payment["payment_id"], "pm_card_chargeDeclined")
        assert (await verify(client, payment["payment_id"])).json()["status"] == "pending"
        fake_stripe.pay(payment["payment_id"])
        assert (await verify(client, payment["payment_id"])).json()["status"] == "succeeded"


# -- webhooks -------------------------------------------------------------------------------


class TestWebhooks:
    async def test_checkout_session_completed_pays_and_renders_the_receipt(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any, token: Any
    ) -> None:
        alice = token("alice")
        payment = await create_stripe(client, token=alice)
        payment_id = payment["payment_id"]
        fake_stripe.pay(payment_id)
        event = fake_stripe.last_event("checkout.session.completed")
        reads_before = len(fake_stripe.requests)

        response = await deliver(client, event)

        assert response.status_code == 200, response.text
        assert response.json() == {"received": True, "event_id": event["id"], "outcome": "applied"}
        assert await stored_status(app, payment_id) == "succeeded"
        assert len(fake_stripe.requests) == reads_before  # a verified event is taken as is
        await app.state.receipts.drain()
        assert app.state.receipts.renderer.path_for(payment_id).exists()
        meta = await client.get(f"{API}/receipt/{payment_id}", headers=bearer(alice))
        assert meta.status_code == 200, meta.text
        history = await app.state.store.history(payment_id)
        assert history[-1].cause == f"webhook:{event['id']}"

    async def test_payment_intent_succeeded_pays_an_embedded_payment(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment = await create_stripe(client, ui_mode="embedded")
        fake_stripe.pay(payment["payment_id"])
        response = await deliver(client, fake_stripe.last_event("payment_intent.succeeded"))
        assert response.json()["outcome"] == "applied"
        assert await stored_status(app, payment["payment_id"]) == "succeeded"

    async def test_authorization_by_webhook_then_capture(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment = await create_stripe(client, capture_method="manual")
        payment_id = payment["payment_id"]
        fake_stripe.pay(payment_id)
        completed = fake_stripe.last_event("checkout.session.completed")  # paid: not yet
        authorized = fake_stripe.last_event("payment_intent.amount_capturable_updated")

        assert (await deliver(client, authorized)).json()["outcome"] == "applied"
        assert await stored_status(app, payment_id) == "requires_capture"
        assert (await deliver(client, completed)).json()["outcome"] == "rejected"
        assert await stored_status(app, payment_id) == "requires_capture"

        captured = await client.post(f"{API}/{payment_id}/capture")
        assert captured.json()["status"] == "succeeded", captured.text

    async def test_checkout_session_expired(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment = await create_stripe(client)
        fake_stripe.expire_session(payment["payment_id"])
        response = await deliver(client, fake_stripe.last_event("checkout.session.expired"))
        assert response.json()["outcome"] == "applied"
        assert await stored_status(app, payment["payment_id"]) == "expired"
        assert (await verify(client, payment["payment_id"])).json()["status"] == "expired"

    async def test_a_refund_made_in_stripe_reaches_a_hosted_payment(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any, token: Any
    ) -> None:
        payment_id = await paid_by_verify(client, fake_stripe, token("alice"))
        intent_id = fake_stripe.sessions[payment_id]["payment_intent"]
        await refund_in_dashboard(fake_stripe, intent_id, 500)

        # The refund names only the intent; the service finds its session by our reference,
        # and keeps the refund as a record of its own.
        response = await deliver(client, fake_stripe.last_event("refund.created"))

        assert response.json()["outcome"] == "applied", response.text
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_refunded) == ("partially_refunded", 500)
        [adopted] = await app.state.store.refunds(payment_id)
        assert (adopted.amount, adopted.status) == (500, "succeeded")
        assert (
            adopted.provider_refund_id
            == fake_stripe.last_event("refund.created")["data"]["object"]["id"]
        )
        # charge.refunded says nothing the refund events do not: acknowledged, not applied.
        charge_event = await deliver(client, fake_stripe.last_event("charge.refunded"))
        assert charge_event.json()["outcome"] == "ignored"

    async def test_a_duplicate_delivery_applies_once(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment = await create_stripe(client)
        fake_stripe.pay(payment["payment_id"])
        event = fake_stripe.last_event("checkout.session.completed")
        outcomes = [(await deliver(client, event)).json()["outcome"] for _ in range(3)]
        assert outcomes == ["applied", "duplicate", "duplicate"]
        assert len(await app.state.store.history(payment["payment_id"])) == 2

    async def test_a_late_failure_does_not_move_a_paid_payment_back(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment = await create_stripe(client)
        payment_id = payment["payment_id"]
        fake_stripe.pay(payment_id, "pm_card_chargeDeclined")  # first try on Stripe's page
        failed = fake_stripe.last_event("payment_intent.payment_failed")
        fake_stripe.pay(payment_id)  # second try
        completed = fake_stripe.last_event("checkout.session.completed")

        assert (await deliver(client, completed)).json()["outcome"] == "applied"
        late = await deliver(client, failed)

        assert late.status_code == 200, late.text
        assert late.json()["outcome"] == "rejected"
        assert await stored_status(app, payment_id) == "succeeded"

    async def test_an_expiry_after_our_cancel_keeps_it_canceled(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment = await create_stripe(client)
        canceled = await client.post(f"{API}/{payment['payment_id']}/cancel")
        assert canceled.json()["status"] == "canceled", canceled.text
        expired = await deliver(client, fake_stripe.last_event("checkout.session.expired"))
        assert expired.json()["outcome"] == "rejected"
        assert await stored_status(app, payment["payment_id"]) == "canceled"

    async def test_unhandled_types_are_acknowledged(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment = await create_stripe(client, ui_mode="embedded")
        response = await deliver(client, fake_stripe.last_event("payment_intent.created"))
        assert response.json()["outcome"] == "ignored"
        assert await stored_status(app, payment["payment_id"]) == "pending"

    @pytest.mark.parametrize(
        "forgery", ["wrong_secret", "stale", "missing", "garbage", "body_changed"]
    )
    async def test_a_forged_delivery_is_400_and_changes_nothing(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any, forgery: str
    ) -> None:
        payment = await create_stripe(client)
        fake_stripe.pay(payment["payment_id"])
        event = fake_stripe.last_event("checkout.session.completed")
        now = int(time.time())
        body, headers = FakeStripe.signed_delivery(
            event,
            "whsec_guessed_0123456789" if forgery == "wrong_secret" else WEBHOOK_SECRET,
            timestamp=now - 301 if forgery == "stale" else None,
        )
        if forgery == "garbage":
            headers["Stripe-Signature"] = "t=abc,v1=zz"
        if forgery == "missing":
            del headers["Stripe-Signature"]
        if forgery == "body_changed":
            body = body.replace(b'"livemode": false', b'"livemode": true')
            assert b'"livemode": true' in body

        response = await client.post(WEBHOOK, content=body, headers=headers)

        assert_problem(response, 400, "invalid_signature")
        assert await stored_status(app, payment["payment_id"]) == "pending"
        # The forgery did not use up the event id: the genuine delivery still applies.
        assert (await deliver(client, event)).json()["outcome"] == "applied"


# -- refunds --------------------------------------------------------------------------------


class TestRefunds:
    async def test_partial_then_the_rest(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, token: Any
    ) -> None:
        alice, admin = token("alice"), token("ops", admin=True)
        payment_id = await paid_by_verify(client, fake_stripe, alice)

        partial = await refund(client, payment_id, admin, 900)
        assert partial.status_code == 200, partial.text
        assert (partial.json()["status"], partial.json()["amount_refunded"]) == (
            "partially_refunded",
            900,
        )
        # Stripe agrees when asked again.
        again = (await verify(client, payment_id, token=alice)).json()
        assert (again["status"], again["amount_refunded"]) == ("partially_refunded", 900)

        rest = await refund(client, payment_id, admin)
        assert rest.status_code == 200, rest.text
        assert (rest.json()["status"], rest.json()["amount_refunded"]) == ("refunded", PRO_PRICE)
        assert sorted(r["amount"] for r in fake_stripe.refunds.values()) == [900, 2000]
        (charge,) = fake_stripe.charges.values()
        assert (charge["amount_refunded"], charge["refunded"]) == (PRO_PRICE, True)

    async def test_more_than_is_left_is_422(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid_by_verify(client, fake_stripe, token("alice"))
        assert (await refund(client, payment_id, admin, 900)).status_code == 200
        too_much = await refund(client, payment_id, admin, PRO_PRICE - 900 + 1)
        assert_problem(too_much, 422, "refund_exceeds_balance")
        assert len(fake_stripe.refunds) == 1
        assert (await refund(client, payment_id, admin)).json()["status"] == "refunded"
        assert_problem(await refund(client, payment_id, admin, 1), 422, "refund_exceeds_balance")
        assert len(fake_stripe.refunds) == 2

    async def test_only_admins_refund(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, token: Any
    ) -> None:
        alice = token("alice")
        payment_id = await paid_by_verify(client, fake_stripe, alice)
        assert_problem(await refund(client, payment_id, alice, 900), 403, "forbidden")
        no_token = await client.post(f"{API}/{payment_id}/refund", json={"amount": 900})
        assert_problem(no_token, 401, "not_authenticated")
        assert fake_stripe.refunds == {}

    async def test_refund_events_out_of_order_never_undo_the_full_refund(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid_by_verify(client, fake_stripe, token("alice"))
        await refund(client, payment_id, admin, 900)
        await refund(client, payment_id, admin)
        partial_event, full_event = fake_stripe.events_of("refund.created")

        # Each event names its own refund, already known from the API's answer.
        assert (await deliver(client, full_event)).json()["outcome"] == "unchanged"
        late = await deliver(client, partial_event)

        assert late.json()["outcome"] == "unchanged"
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_refunded) == ("refunded", PRO_PRICE)
        assert len(await app.state.store.refunds(payment_id)) == 2

    async def test_an_older_partial_refund_event_never_lowers_the_refunded_sum(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid_by_verify(client, fake_stripe, token("alice"))
        await refund(client, payment_id, admin, 500)
        await refund(client, payment_id, admin, 900)
        older, _ = fake_stripe.events_of("refund.created")

        late = await deliver(client, older)

        assert late.status_code == 200, late.text
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_refunded) == ("partially_refunded", 1400)

    async def test_a_webhook_paid_payment_is_refunded_in_full(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, token: Any
    ) -> None:
        payment = await create_stripe(client, ui_mode="embedded")
        fake_stripe.pay(payment["payment_id"])
        await deliver(client, fake_stripe.last_event("payment_intent.succeeded"))
        response = await refund(client, payment["payment_id"], token("ops", admin=True))
        assert response.status_code == 200, response.text
        assert (response.json()["status"], response.json()["amount_refunded"]) == (
            "refunded",
            PRO_PRICE,
        )


# -- capture and cancel ---------------------------------------------------------------------


class TestCaptureAndCancel:
    @pytest.mark.parametrize("ui_mode", ["hosted", "embedded"])
    async def test_manual_capture(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, token: Any, ui_mode: str
    ) -> None:
        alice = token("alice")
        payment = await create_stripe(client, token=alice, ui_mode=ui_mode, capture_method="manual")
        payment_id = payment["payment_id"]
        intent = fake_stripe.pay(payment_id)
        assert intent["capture_method"] == "manual"

        authorized = (await verify(client, payment_id, token=alice)).json()
        assert (authorized["status"], authorized["receipt_url"]) == ("requires_capture", None)

        captured = await client.post(f"{API}/{payment_id}/capture", headers=bearer(alice))
        assert captured.status_code == 200, captured.text
        assert captured.json()["status"] == "succeeded"
        assert captured.json()["receipt_url"] == f"{API}/receipt/{payment_id}/pdf"
        held = fake_stripe.payment_intents[intent["id"]]
        assert (held["status"], held["amount_received"]) == ("succeeded", PRO_PRICE)

        twice = await client.post(f"{API}/{payment_id}/capture", headers=bearer(alice))
        assert twice.json()["status"] == "succeeded"
        assert len(fake_stripe.calls("POST", f"{INTENTS}/{intent['id']}/capture")) == 1

    async def test_capture_before_the_customer_paid_is_409(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe
    ) -> None:
        payment = await create_stripe(client, ui_mode="embedded", capture_method="manual")
        response = await client.post(f"{API}/{payment['payment_id']}/capture")
        assert_problem(response, 409, "invalid_payment_state")

    @pytest.mark.parametrize("ui_mode", ["hosted", "embedded"])
    async def test_cancel_an_unpaid_payment(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, ui_mode: str
    ) -> None:
        payment = await create_stripe(client, ui_mode=ui_mode)
        payment_id = payment["payment_id"]

        response = await client.post(f"{API}/{payment_id}/cancel")

        assert response.status_code == 200, response.text
        assert (response.json()["status"], response.json()["receipt_url"]) == ("canceled", None)
        if ui_mode == "hosted":
            assert fake_stripe.sessions[payment_id]["status"] == "expired"
        else:
            assert fake_stripe.payment_intents[payment_id]["status"] == "canceled"
        # Asking Stripe again, or cancelling again, leaves it canceled.
        assert (await verify(client, payment_id)).json()["status"] == "canceled"
        assert (await client.post(f"{API}/{payment_id}/cancel")).json()["status"] == "canceled"

    async def test_cancel_releases_an_authorization(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe
    ) -> None:
        payment = await create_stripe(client, ui_mode="embedded", capture_method="manual")
        payment_id = payment["payment_id"]
        fake_stripe.pay(payment_id)
        assert (await verify(client, payment_id)).json()["status"] == "requires_capture"
        response = await client.post(f"{API}/{payment_id}/cancel")
        assert response.status_code == 200, response.text
        assert (response.json()["status"], response.json()["amount_refunded"]) == ("canceled", 0)
        assert fake_stripe.payment_intents[payment_id]["status"] == "canceled"

    async def test_a_paid_payment_cannot_be_canceled(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment = await create_stripe(client)
        fake_stripe.pay(payment["payment_id"])  # paid on Stripe; the service has not heard yet
        response = await client.post(f"{API}/{payment['payment_id']}/cancel")
        assert_problem(response, 409, "invalid_payment_state")
        assert await stored_status(app, payment["payment_id"]) == "pending"
        assert fake_stripe.sessions[payment["payment_id"]]["status"] == "complete"


class TestPartialCapture:
    @pytest.mark.parametrize("ui_mode", ["hosted", "embedded"])
    async def test_part_is_captured_the_rest_released_and_refunds_stop_at_it(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, token: Any, ui_mode: str
    ) -> None:
        payment_id, intent_id = await authorized(client, fake_stripe, ui_mode=ui_mode)

        captured = await capture(client, payment_id, 1000)

        assert captured.status_code == 200, captured.text
        assert (captured.json()["status"], captured.json()["amount_captured"]) == (
            "succeeded",
            1000,
        )
        assert captured.json()["amount"] == PRO_PRICE  # what was asked for stays as it was
        [call] = fake_stripe.calls("POST", f"{INTENTS}/{intent_id}/capture")
        assert (call.body["amount_to_capture"], call.idempotency_key) == (
            1000,
            f"capture-{payment_id}",
        )
        held = fake_stripe.payment_intents[intent_id]
        assert (held["amount_received"], held["amount_capturable"]) == (1000, 0)
        again = (await verify(client, payment_id)).json()  # Stripe's word says the same
        assert (again["status"], again["amount_captured"]) == ("succeeded", 1000)

        admin = token("ops", admin=True)
        too_much = await refund(client, payment_id, admin, amount=1001)
        assert assert_problem(too_much, 422, "refund_exceeds_balance")["left"] == 1000
        assert fake_stripe.calls("POST", "/v1/refunds") == []
        part = await refund(client, payment_id, admin, amount=400)
        assert part.json()["status"] == "partially_refunded", part.text
        rest = await refund(client, payment_id, admin)
        assert rest.status_code == 200, rest.text
        assert rest.json()["refund"]["amount"] == 600
        assert (rest.json()["status"], rest.json()["amount_refunded"]) == ("refunded", 1000)
        assert fake_stripe.charges[held["latest_charge"]]["amount_refunded"] == 1000

    async def test_asking_again_answers_the_capture_and_another_amount_conflicts(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe
    ) -> None:
        payment_id, intent_id = await authorized(client, fake_stripe)
        first = await capture(client, payment_id, 1000)
        assert first.status_code == 200, first.text

        replay = await capture(client, payment_id, 1000)
        all_of_it = await capture(client, payment_id)
        other = await capture(client, payment_id, 1500)

        for response in (replay, all_of_it):
            assert response.status_code == 200, response.text
            assert response.json()["amount_captured"] == 1000
        assert_problem(other, 409, "invalid_payment_state")
        assert len(fake_stripe.calls("POST", f"{INTENTS}/{intent_id}/capture")) == 1

    @pytest.mark.parametrize("retry", [1000, None], ids=["same-amount", "all-of-it"])
    async def test_a_capture_whose_answer_was_lost_is_answered_when_asked_again(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any, retry: int | None
    ) -> None:
        payment_id, intent_id = await authorized(client, fake_stripe)
        # Our capture of 1000 reached Stripe; its answer never came back.
        await capture_at_stripe(
            fake_stripe, intent_id, 1000, idempotency_key=f"capture-{payment_id}"
        )
        assert await stored_status(app, payment_id) == "requires_capture"

        response = await capture(client, payment_id, retry)

        # The same request is replayed; asking for all of it under the same key is refused by
        # Stripe as another request, and answered by reading the intent: 1000 was taken.
        assert response.status_code == 200, response.text
        assert (response.json()["status"], response.json()["amount_captured"]) == (
            "succeeded",
            1000,
        )
        assert fake_stripe.payment_intents[intent_id]["amount_received"] == 1000
        assert len(fake_stripe.events_of("payment_intent.succeeded")) == 1
        assert_problem(await capture(client, payment_id, 1500), 409, "invalid_payment_state")

    async def test_another_amount_than_stripe_took_conflicts_and_the_same_is_answered(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment_id, intent_id = await authorized(client, fake_stripe)
        await capture_at_stripe(fake_stripe, intent_id, 1000)  # in the Dashboard

        assert_problem(await capture(client, payment_id, 1500), 409, "invalid_payment_state")
        answered = await capture(client, payment_id, 1000)
        assert (answered.json()["status"], answered.json()["amount_captured"]) == (
            "succeeded",
            1000,
        )
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_captured) == ("succeeded", 1000)

    async def test_more_than_authorized_is_refused_before_stripe_is_asked(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment_id, intent_id = await authorized(client, fake_stripe)

        over = await capture(client, payment_id, PRO_PRICE + 1)

        body = assert_problem(over, 422, "capture_exceeds_amount")
        assert body["amount"] == PRO_PRICE
        assert fake_stripe.calls("POST", f"{INTENTS}/{intent_id}/capture") == []
        assert await stored_status(app, payment_id) == "requires_capture"
        whole = await capture(client, payment_id, PRO_PRICE)  # all of it, named
        assert (whole.json()["status"], whole.json()["amount_captured"]) == ("succeeded", None)
        [call] = fake_stripe.calls("POST", f"{INTENTS}/{intent_id}/capture")
        assert "amount_to_capture" not in call.body

    async def test_a_partial_capture_made_at_stripe_arrives_by_webhook(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any, token: Any
    ) -> None:
        payment_id, intent_id = await authorized(client, fake_stripe)
        await capture_at_stripe(fake_stripe, intent_id, 1000)  # in the Dashboard
        reads_before = len(fake_stripe.requests)

        response = await deliver(client, fake_stripe.last_event("payment_intent.succeeded"))

        assert response.json()["outcome"] == "applied", response.text
        assert len(fake_stripe.requests) == reads_before  # a verified event is taken as is
        record = await app.state.store.get(payment_id)
        assert (record.status, record.amount_captured) == ("succeeded", 1000)
        over = await refund(client, payment_id, token("ops", admin=True), amount=1001)
        assert_problem(over, 422, "refund_exceeds_balance")


# -- failures -------------------------------------------------------------------------------


class TestProviderFailures:
    async def test_decline_is_402_with_the_decline_code_only(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe
    ) -> None:
        fake_stripe.fail_next("decline", decline_code="insufficient_funds", path_prefix=INTENTS)
        response = await client.post(
            f"{API}/create-intent",
            json={"plan": "pro", "provider": "stripe", "ui_mode": "embedded"},
        )
        body = assert_problem(response, 402, "payment_declined")
        assert (body["decline_code"], body["provider"]) == ("insufficient_funds", "stripe")
        assert "insufficient funds" not in response.text.lower()  # Stripe's own message
        assert "req_" not in response.text
        assert len(fake_stripe.calls("POST", INTENTS)) == 1  # an answer: never retried

    @pytest.mark.parametrize("kind", ["server_error", "hang", "rate_limit"])
    async def test_outage_is_503_with_retry_after_and_a_retry_is_safe(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, kind: FaultKind
    ) -> None:
        fake_stripe.fail_next(kind, times=3, path_prefix=SESSIONS)
        headers = {"Idempotency-Key": f"outage-{kind}"}
        body = {"plan": "pro", "provider": "stripe"}

        response = await client.post(f"{API}/create-intent", json=body, headers=headers)

        assert_problem(response, 503, "provider_unavailable")
        assert int(response.headers["Retry-After"]) >= 1
        attempts = fake_stripe.calls("POST", SESSIONS)
        assert len(attempts) == 3
        assert len({a.idempotency_key for a in attempts}) == 1
        assert fake_stripe.sessions == {}

        fake_stripe.release_hangs()
        retried = await client.post(f"{API}/create-intent", json=body, headers=headers)
        assert retried.status_code == 201, retried.text
        assert list(fake_stripe.sessions) == [retried.json()["payment_id"]]

    async def test_a_short_rate_limit_is_waited_out(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe
    ) -> None:
        fake_stripe.fail_next("rate_limit", retry_after=0, path_prefix=SESSIONS)
        payment = await create_stripe(client)
        assert [c.status for c in fake_stripe.calls("POST", SESSIONS)] == [429, 200]
        assert list(fake_stripe.sessions) == [payment["payment_id"]]

    async def test_a_long_retry_after_is_passed_on_to_the_client(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe
    ) -> None:
        fake_stripe.fail_next("rate_limit", retry_after=30, path_prefix=SESSIONS)
        response = await client.post(
            f"{API}/create-intent", json={"plan": "pro", "provider": "stripe"}
        )
        assert_problem(response, 503, "provider_unavailable")
        assert response.headers["Retry-After"] == "30"
        assert len(fake_stripe.calls("POST", SESSIONS)) == 1  # not waited out here

    async def test_verify_during_an_outage_is_503_and_changes_nothing(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment = await create_stripe(client)
        fake_stripe.pay(payment["payment_id"])
        fake_stripe.fail_next("server_error", times=3)
        response = await verify(client, payment["payment_id"])
        assert_problem(response, 503, "provider_unavailable")
        assert "Retry-After" in response.headers
        assert await stored_status(app, payment["payment_id"]) == "pending"


class TestWrongKey:
    @pytest.fixture
    def settings_overrides(self, fake_stripe: FakeStripe) -> dict[str, Any]:
        return stripe_overrides(fake_stripe, stripe_secret_key=WRONG_KEY)

    async def test_refused_credentials_are_503_misconfigured_without_the_key(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe
    ) -> None:
        response = await client.post(
            f"{API}/create-intent", json={"plan": "pro", "provider": "stripe"}
        )
        assert_problem(response, 503, "provider_misconfigured")
        assert len(fake_stripe.calls("POST", SESSIONS)) == 1  # not retried: it cannot help
        assert fake_stripe.calls("POST", SESSIONS)[0].status == 401
        for leaked in (WRONG_KEY, WRONG_KEY[-4:], "Invalid API Key", "sk_test_"):
            assert leaked not in response.text


class TestNoWebhookSecret:
    @pytest.fixture
    def settings_overrides(self, fake_stripe: FakeStripe) -> dict[str, Any]:
        return stripe_overrides(fake_stripe, stripe_webhook_secret=None)

    async def test_every_event_is_refused(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any
    ) -> None:
        payment = await create_stripe(client)
        fake_stripe.pay(payment["payment_id"])
        event = fake_stripe.last_event("checkout.session.completed")
        for secret in (WEBHOOK_SECRET, ""):
            body, headers = FakeStripe.signed_delivery(event, secret)
            response = await client.post(WEBHOOK, content=body, headers=headers)
            assert_problem(response, 400, "invalid_signature")
        assert await stored_status(app, payment["payment_id"]) == "pending"


class TestPendingRefunds:
    """Refunds Stripe makes asynchronously: pending first, refund.updated or refund.failed
    later."""

    @pytest.mark.parametrize("succeed", [True, False])
    async def test_a_pending_refund_waits_for_its_event(
        self,
        client: httpx.AsyncClient,
        fake_stripe: FakeStripe,
        app: Any,
        token: Any,
        succeed: bool,
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid_by_verify(client, fake_stripe, token("alice"))
        fake_stripe.refunds_pending = True
        answer = await refund(client, payment_id, admin, 2000)
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert (body["status"], body["amount_refunded"], body["amount_pending_refund"]) == (
            "succeeded",
            0,
            2000,
        )
        stripe_refund_id = body["refund"]["provider_refund_id"]
        assert (
            fake_stripe.refunds[stripe_refund_id]["metadata"]["refund_id"]
            == (body["refund"]["refund_id"])
        )
        # While it is pending, only what is left after it may be refunded.
        assert_problem(await refund(client, payment_id, admin, 1000), 422, "refund_exceeds_balance")

        fake_stripe.settle_refund(stripe_refund_id, succeed=succeed)
        event = fake_stripe.last_event("refund.updated" if succeed else "refund.failed")
        assert (await deliver(client, event)).json()["outcome"] == "applied"
        assert (await deliver(client, event)).json()["outcome"] == "duplicate"
        record = await app.state.store.get(payment_id)
        if succeed:
            assert (record.status, record.amount_refunded) == ("partially_refunded", 2000)
        else:
            assert (record.status, record.amount_refunded) == ("succeeded", 0)
            [failed] = await app.state.store.refunds(payment_id)
            assert failed.failure_code == "expired_or_canceled_card"
        assert record.amount_pending_refund == 0

    async def test_verify_follows_a_pending_refund(
        self, client: httpx.AsyncClient, fake_stripe: FakeStripe, app: Any, token: Any
    ) -> None:
        admin = token("ops", admin=True)
        payment_id = await paid_by_verify(client, fake_stripe, token("alice"))
        fake_stripe.refunds_pending = True
        answer = await refund(client, payment_id, admin)
        fake_stripe.settle_refund(answer.json()["refund"]["provider_refund_id"], succeed=True)
        # No webhook: verify asks Stripe about the refund that is still pending.
        verified = await verify(client, payment_id, token=token("alice"))
        assert (verified.json()["status"], verified.json()["amount_refunded"]) == (
            "refunded",
            PRO_PRICE,
        )
