"""A customer in headless Chromium pays on the sandbox checkout page of the real service and
lands back on the shop's return page."""

from __future__ import annotations

import html
import re
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from playwright.sync_api import sync_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests.e2e.conftest import ServiceProcess, bearer
from tests.fakes.server import serve_in_thread

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = (
    "Chromium is not installed: `apt-get install chromium` "
    "(`make test` installs it when run as root)"
)

# Skipped before any fixture starts a process when there is no browser to drive.
pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 10_000


async def _thanks(request: Request) -> HTMLResponse:
    payment_id = html.escape(request.query_params.get("payment_id", ""))
    status = html.escape(request.query_params.get("status", ""))
    order = html.escape(request.query_params.get("order", ""))
    return HTMLResponse(
        "<!doctype html><html><head><title>Shop: thank you</title></head><body>"
        f'<h1>Order <span id="order">{order}</span></h1>'
        f'<p>Payment <code id="payment-id">{payment_id}</code>: '
        f'<strong id="status">{status}</strong></p>'
        "</body></html>"
    )


SHOP = Starlette(routes=[Route("/thanks", _thanks)])


@pytest.fixture(scope="module")
def shop() -> Iterator[str]:
    """The merchant's site the sandbox sends the customer back to."""
    with serve_in_thread(SHOP) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def _checkout(service: ServiceProcess, token: str, plan: str, return_url: str) -> dict[str, Any]:
    with service.client() as http:
        created = http.post(
            "/api/v1/payment/create-intent",
            json={"plan": plan, "return_url": return_url},
            headers=bearer(token),
        )
    assert created.status_code == 201, created.text
    intent: dict[str, Any] = created.json()
    return intent


def _verified_status(service: ServiceProcess, token: str, payment_id: str) -> str:
    with service.client() as http:
        response = http.post(
            "/api/v1/payment/verify", json={"payment_id": payment_id}, headers=bearer(token)
        )
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


@pytest.mark.parametrize(
    ("plan", "plan_name", "amount", "button", "status"),
    [
        ("pro", "Pro", "€29.00", "#pay", "succeeded"),
        ("expert", "Expert", "€149.00", "#decline", "failed"),
    ],
    ids=["pay", "decline"],
)
def test_customer_settles_in_the_browser(
    service: ServiceProcess,
    alice_token: str,
    shop: str,
    page: Page,
    plan: str,
    plan_name: str,
    amount: str,
    button: str,
    status: str,
) -> None:
    intent = _checkout(service, alice_token, plan, f"{shop}/thanks?order=42")
    payment_id = intent["payment_id"]

    response = page.goto(intent["redirect_url"])
    assert response is not None and response.status == 200
    assert page.title() == f"Sandbox checkout · {plan_name}"
    assert page.locator("#plan").inner_text() == plan_name
    assert page.locator("#amount").inner_text() == amount
    for selector in ("#pay", "#decline", "#cancel"):
        assert page.locator(selector).is_visible(), selector

    page.click(button)
    # The form posts to the service, which answers 303 to the shop's return page.
    page.wait_for_url(re.compile(re.escape(f"{shop}/thanks?")))

    assert page.url == f"{shop}/thanks?order=42&payment_id={payment_id}&status={status}"
    assert page.locator("#order").inner_text() == "42"
    assert page.locator("#payment-id").inner_text() == payment_id
    assert page.locator("#status").inner_text() == status

    assert _verified_status(service, alice_token, payment_id) == status

    # Back on the checkout page, the payment shows as settled and offers no buttons.
    page.goto(intent["redirect_url"])
    assert page.locator("#status").inner_text() == status
    assert page.locator("#pay").count() == 0


@pytest.mark.parametrize(
    ("path", "rendered"),
    [("/docs", ".opblock-summary-path"), ("/redoc", "[data-section-id]")],
    ids=["swagger-ui", "redoc"],
)
def test_api_docs_render_offline(
    service: ServiceProcess, page: Page, path: str, rendered: str
) -> None:
    """The documentation pages render with every request to another host refused: nothing
    comes from a CDN."""
    own = service.base_url.rstrip("/")
    elsewhere: list[str] = []

    def only_our_own(route: Any) -> None:
        url = route.request.url
        if url.startswith(own):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    page.route("**/*", only_our_own)
    response = page.goto(f"{own}{path}")
    assert response is not None and response.status == 200
    page.wait_for_selector(rendered)
    assert page.locator(rendered).count() > 5
    assert elsewhere == []
