"""Helpers for the API tests against the fake PayPal: the settings that point the app at it,
what the buyer and PayPal's webhook deliveries do, and a check that nothing of PayPal's own
(secrets, tokens, raw messages, debug ids) reaches a client of the service."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.conftest import bearer
from tests.fakes.paypal_server import ERROR_NAMES, ISSUES, FakePayPal, WebhookSigner
from tests.providers.paypal.conftest import CLIENT_ID, CLIENT_SECRET, TIMEOUT_S, WEBHOOK_ID

API = "/api/v1/payment"
WEBHOOK_URL = f"{API}/webhook/paypal"
ORDERS = "/v2/checkout/orders"
VERIFY_SIGNATURE = "/v1/notifications/verify-webhook-signature"

# What PayPal may say that a client of ours must never read.
_PAYPAL_WORDING = (
    *(name for name, _ in ERROR_NAMES.values()),
    *(message for _, message in ERROR_NAMES.values()),
    *ISSUES,
    *ISSUES.values(),
    "invalid_client",
    "Client Authentication failed",
    "invalid_token",
    "debug_id",
    "A21AA",  # how PayPal's access tokens begin
)


def paypal_overrides(fake: FakePayPal, **extra: Any) -> dict[str, Any]:
    """Settings that make the app's PayPal provider talk to ``fake``."""
    return {
        "paypal_client_id": CLIENT_ID,
        "paypal_client_secret": CLIENT_SECRET,
        "paypal_webhook_id": WEBHOOK_ID,
        "paypal_api_base": fake.url,
        "provider_timeout_seconds": TIMEOUT_S,
        **extra,
    }


def lose_answers(fake: FakePayPal, path_prefix: str, attempts: int) -> None:
    """The next call under ``path_prefix`` fails however often the provider tries: PayPal
    is unavailable, then on the last attempt does the work but its answer never arrives."""
    fake.fail_next("unavailable", times=attempts - 1, path_prefix=path_prefix)
    fake.fail_next("hang_after", path_prefix=path_prefix)


def order_id(payment_id: str) -> str:
    assert payment_id.startswith("pp_"), payment_id
    return payment_id.removeprefix("pp_")


async def create_paypal_payment(
    client: httpx.AsyncClient,
    *,
    plan: str = "pro",
    token: str | None = None,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    return await client.post(
        f"{API}/create-intent",
        json={"plan": plan, "provider": "paypal", **body},
        headers={**(bearer(token) if token else {}), **(headers or {})},
    )


async def paypal_payment(
    client: httpx.AsyncClient, *, token: str | None = None, **body: Any
) -> str:
    """A new PayPal payment, waiting for the buyer; its payment ID."""
    response = await create_paypal_payment(client, token=token, **body)
    assert response.status_code == 201, response.text
    payment_id: str = response.json()["payment_id"]
    return payment_id


async def capture(
    client: httpx.AsyncClient, payment_id: str, *, token: str | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/capture/paypal/{payment_id}", headers=bearer(token) if token else {}
    )


async def verify(
    client: httpx.AsyncClient, payment_id: str, *, token: str | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/verify",
        json={"payment_id": payment_id},
        headers=bearer(token) if token else {},
    )


async def refund(
    client: httpx.AsyncClient, payment_id: str, token: str, amount: int | None = None
) -> httpx.Response:
    return await client.post(
        f"{API}/{payment_id}/refund",
        json={} if amount is None else {"amount": amount},
        headers=bearer(token),
    )


async def paid_payment(
    client: httpx.AsyncClient, fake: FakePayPal, *, token: str | None = None, **body: Any
) -> str:
    """A PayPal payment the buyer approved and the service captured."""
    payment_id = await paypal_payment(client, token=token, **body)
    fake.approve(order_id(payment_id))
    captured = await capture(client, payment_id, token=token)
    assert captured.status_code == 200, captured.text
    assert captured.json()["status"] == "succeeded"
    return payment_id


async def deliver(
    client: httpx.AsyncClient,
    fake: FakePayPal,
    event: dict[str, Any] | bytes,
    *,
    signer: WebhookSigner | None = None,
    cert_url: str | None = None,
    signed: bool = True,
) -> httpx.Response:
    """PayPal's POST of ``event`` to the service's webhook, signed with PayPal's key (or
    ``signer``'s, to forge one); ``signed=False`` sends it without PayPal's headers."""
    body, headers = fake.signed_delivery(event, WEBHOOK_ID, signer=signer, cert_url=cert_url)
    if not signed:
        headers = {"Content-Type": "application/json"}
    return await client.post(WEBHOOK_URL, content=body, headers=headers)


async def refund_in_paypal(fake: FakePayPal, capture_id: str, value: str) -> None:
    """The merchant refunds in PayPal's own dashboard: the service hears of it only from
    PayPal (its webhook, or the order when the service reads it)."""
    async with httpx.AsyncClient(base_url=fake.url) as paypal:
        token = await paypal.post(
            "/v1/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=(CLIENT_ID, CLIENT_SECRET),
            headers={"Accept": "application/json"},
        )
        assert token.status_code == 200, token.text
        refunded = await paypal.post(
            f"/v2/payments/captures/{capture_id}/refund",
            json={"amount": {"currency_code": "EUR", "value": value}},
            headers={
                "Authorization": f"Bearer {token.json()['access_token']}",
                "PayPal-Request-Id": str(uuid.uuid4()),
            },
        )
        assert refunded.status_code == 201, refunded.text


def events_for(fake: FakePayPal, event_type: str, payment_id: str) -> list[dict[str, Any]]:
    """The events of ``event_type`` the fake emitted about ``payment_id``'s order."""
    order = order_id(payment_id)
    found = []
    for event in fake.events_of(event_type):
        resource = event["resource"]
        related = resource.get("supplementary_data", {}).get("related_ids", {})
        if order in (resource.get("id"), related.get("order_id")):
            found.append(event)
    return found


def assert_nothing_from_paypal(response: httpx.Response, fake: FakePayPal, *secrets: str) -> None:
    """Neither our PayPal secret (nor ``secrets``), nor PayPal's tokens, raw messages or
    debug ids, are in the answer a client got."""
    text = response.text
    for secret in (CLIENT_SECRET, *secrets):
        assert secret not in text, "a PayPal secret reached the client"
    for wording in _PAYPAL_WORDING:
        assert wording not in text, f"PayPal's own {wording!r} reached the client"
    for request in fake.requests:
        if request.debug_id:
            assert request.debug_id not in text, "PayPal's debug id reached the client"
    assert "paypal-debug-id" not in {name.lower() for name in response.headers}
