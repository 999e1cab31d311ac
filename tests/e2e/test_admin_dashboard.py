"""An operator in headless Chromium runs the service from the admin dashboard of a real uvicorn
process: signs in with an admin token, stores a Stripe configuration (Stripe being our fake
on loopback, checked against Stripe's API description), routes new payments to Stripe and
sees the next payment go there, finds a customer's payment and refunds it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.fernet import Fernet
from playwright.sync_api import sync_playwright

from tests.conftest import STRIPE_SECRET_KEY, RedisServer, assert_no_violations
from tests.e2e.conftest import ServiceProcess, bearer, running_service
from tests.e2e.test_browser_checkout import CHROMIUM, CHROMIUM_ARGS, NO_CHROMIUM, TIMEOUT_MS
from tests.fakes.stripe_server import FakeStripe

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)]

STRIPE_WEBHOOK_SECRET = "whsec_dashboard_e2e_0123456789"


@pytest.fixture(scope="module")
def dashboard_service(
    redis_server: RedisServer, stripe_server: FakeStripe
) -> Iterator[ServiceProcess]:
    """The service with Stripe's API at the fake (an environment-only setting) but no Stripe
    key: the operator stores that in the dashboard."""
    with running_service(
        redis_server,
        key_prefix="e2e-admin:",
        extra_env={
            "STRIPE_API_BASE": stripe_server.url,
            "PROVIDER_SECRETS_KEY": Fernet.generate_key().decode(),
            "RATE_LIMITS_ENABLED": "false",
        },
    ) as service:
        yield service


@pytest.fixture
def fake_stripe(stripe_server: FakeStripe) -> Iterator[FakeStripe]:
    stripe_server.reset()
    yield stripe_server
    assert_no_violations(stripe_server)


@pytest.fixture(scope="module")
def admin_token(dashboard_service: ServiceProcess) -> str:
    made = dashboard_service.cli("token", "--sub", "ops", "--admin")
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


@pytest.fixture(scope="module")
def alice(dashboard_service: ServiceProcess) -> dict[str, str]:
    made = dashboard_service.cli("token", "--sub", "alice")
    assert made.returncode == 0, made.stderr
    return bearer(made.stdout.strip())


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, dashboard_service: ServiceProcess) -> Iterator[Page]:
    """A fresh browser profile whose requests may go to the service only (nothing from a
    CDN), and that records any page error or console message (there is no script)."""
    context = browser.new_context(base_url=dashboard_service.base_url)
    context.set_default_timeout(TIMEOUT_MS)
    own = dashboard_service.base_url
    elsewhere: list[str] = []

    def only_our_own(route: Any) -> None:
        if route.request.url.startswith(own):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_our_own)
    try:
        yield context.new_page()
    finally:
        context.close()
    assert elsewhere == []


def sign_in(page: Page, token: str) -> None:
    page.goto("/admin")
    assert page.url.endswith("/admin/login")  # no session yet: the sign-in page, no data
    page.fill("#token", token)
    page.click("#sign-in-button")
    page.wait_for_url(re.compile(r"/admin$"))
    assert page.locator("#signed-in-as").inner_text() == "ops"


def create_payment(service: ServiceProcess, who: dict[str, str]) -> dict[str, Any]:
    with service.client() as http:
        created = http.post(
            "/api/v1/payment/create-intent",
            json={"plan": "pro", "return_url": "https://shop.example/thanks"},
            headers=who,
        )
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


def test_sign_in_and_out(page: Page, dashboard_service: ServiceProcess, admin_token: str) -> None:
    sign_in(page, admin_token)
    assert page.locator("#provider-sandbox").is_visible()
    cookies = {cookie["name"]: cookie for cookie in page.context.cookies()}
    session = cookies["payments_admin_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    page.click("#sign-out")
    page.wait_for_url(re.compile(r"/admin/login$"))
    page.goto("/admin/payments")
    assert page.url.endswith("/admin/login")


def test_routing_to_a_newly_stored_provider_takes_the_next_payment(
    page: Page,
    dashboard_service: ServiceProcess,
    admin_token: str,
    alice: dict[str, str],
    fake_stripe: FakeStripe,
) -> None:
    sign_in(page, admin_token)
    assert page.locator("#provider-stripe td").nth(1).inner_text() == "no"

    # Store Stripe's keys: secrets go in password fields and never come back.
    page.goto("/admin/configs")
    page.select_option("#provider", "stripe")
    page.click("#new-config button")
    page.fill("[id='secret:secret_key']", STRIPE_SECRET_KEY)
    page.fill("[id='secret:webhook_secret']", STRIPE_WEBHOOK_SECRET)
    page.click("#save-config")
    assert page.locator("#saved").is_visible()
    assert STRIPE_SECRET_KEY not in page.content()
    page.goto("/admin")
    assert page.locator("#provider-stripe td").nth(1).inner_text() == "yes"
    assert page.locator("#provider-stripe td.health").inner_text().startswith("connected")

    # Route new payments to Stripe.
    assert create_payment(dashboard_service, alice)["provider"] == "sandbox"
    page.goto("/admin/routing")
    page.select_option("#default", "stripe")
    page.click("#save-routing")
    assert page.locator("#saved").is_visible()
    payment = create_payment(dashboard_service, alice)
    assert payment["provider"] == "stripe"
    assert payment["payment_id"].startswith("cs_")
    assert any(request.path == "/v1/checkout/sessions" for request in fake_stripe.requests)

    # The dashboard shows it as Stripe's, found by the customer.
    page.goto("/admin/payments")
    page.fill("#q-user", "alice")
    page.fill("#q-provider", "stripe")
    page.click("#search-button")
    assert page.locator("#results tbody tr").count() == 1
    page.click(f"text={payment['payment_id']}")
    assert page.locator("#payment-provider").inner_text() == "stripe"

    # And back, through the same form.
    page.goto("/admin/routing")
    page.select_option("#default", "sandbox")
    page.click("#save-routing")
    assert page.locator("#saved").is_visible()
    assert create_payment(dashboard_service, alice)["provider"] == "sandbox"


def test_find_a_customers_payment_and_refund_it(
    page: Page, dashboard_service: ServiceProcess, admin_token: str, alice: dict[str, str]
) -> None:
    paid = create_payment(dashboard_service, alice)
    with dashboard_service.client() as http:
        settled = http.post(
            f"/sandbox/checkout/{paid['payment_id']}", data={"outcome": "succeeded"}
        )
    assert settled.status_code in (200, 303), settled.text

    sign_in(page, admin_token)
    page.goto("/admin/payments")
    page.fill("#q-user", "alice")
    page.fill("#q-status", "succeeded")
    page.click("#search-button")
    page.click(f"text={paid['payment_id']}")
    assert page.locator("#payment-status").inner_text() == "succeeded"

    page.fill("#amount", "900")
    page.fill("#reason", "customer asked")
    page.click("#refund-button")
    page.wait_for_url(re.compile(r"\?refund=rf_"))
    refund = page.locator("#refunds tr.new")
    assert refund.locator("td.status").inner_text() == "succeeded"
    assert "customer asked" in refund.inner_text()
    assert page.locator("#amount-refunded").inner_text() == "€9.00"
    assert page.locator("#payment-status").inner_text() == "partially_refunded"

    # The API tells the same story.
    with dashboard_service.client() as http:
        admin = bearer(admin_token)
        refunds = http.get(f"/api/v1/payment/{paid['payment_id']}/refunds", headers=admin)
    assert [r["amount"] for r in refunds.json()["refunds"]] == [900]
