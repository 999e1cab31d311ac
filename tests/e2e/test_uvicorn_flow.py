"""The sandbox flow over real HTTP against `uvicorn app.main:app` in its own process."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser

import pytest
from pypdf import PdfReader

from tests.e2e.conftest import ServiceProcess, bearer

pytestmark = pytest.mark.e2e

RETURN_URL = "https://shop.example/thanks?order=42"


class _Buttons(HTMLParser):
    """Collects the checkout page's buttons: id -> (name, value)."""

    def __init__(self) -> None:
        super().__init__()
        self.buttons: dict[str, tuple[str | None, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "button":
            found = dict(attrs)
            self.buttons[found.get("id") or ""] = (found.get("name"), found.get("value"))


def test_cli_token_is_accepted_by_the_service(service: ServiceProcess, alice_token: str) -> None:
    with service.client() as http:
        # The receipt endpoint needs a user: a valid token gets past auth to "not found".
        response = http.get(
            "/api/v1/payment/receipt/sb_000000000000000000000000", headers=bearer(alice_token)
        )
        assert response.status_code == 404, response.text
        assert response.json()["code"] == "payment_not_found"
        anonymous = http.get("/api/v1/payment/receipt/sb_000000000000000000000000")
        assert anonymous.status_code == 401, anonymous.text


def test_sandbox_flow_to_receipt_pdf(service: ServiceProcess, alice_token: str) -> None:
    alice = bearer(alice_token)
    with service.client() as http:
        created = http.post(
            "/api/v1/payment/create-intent",
            json={"plan": "pro", "return_url": RETURN_URL},
            headers=alice,
        )
        assert created.status_code == 201, created.text
        intent = created.json()
        payment_id = intent["payment_id"]
        assert payment_id.startswith("sb_")
        assert (intent["plan"], intent["amount"], intent["currency"]) == ("pro", 2900, "EUR")
        assert intent["status"] == "pending"
        # The service builds the checkout URL from how it was reached.
        assert intent["redirect_url"] == f"{service.base_url}/sandbox/checkout/{payment_id}"

        page = http.get(intent["redirect_url"])
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-store"
        assert re.search(r'<h1 id="plan">\s*Pro\s*</h1>', page.text), page.text
        assert re.search(r'id="amount">\s*€29\.00\s*<', page.text), page.text
        assert payment_id in page.text
        parser = _Buttons()
        parser.feed(page.text)
        assert parser.buttons == {
            "pay": ("outcome", "succeeded"),
            "decline": ("outcome", "failed"),
            "cancel": ("outcome", "canceled"),
        }

        # Before the customer pays, verify says pending and there is no receipt. Alice's
        # payment is invisible to anyone else: same answer as an unknown one.
        hidden = http.post("/api/v1/payment/verify", json={"payment_id": payment_id})
        assert hidden.status_code == 404, hidden.text
        pending = http.post(
            "/api/v1/payment/verify", json={"payment_id": payment_id}, headers=alice
        )
        assert pending.json()["status"] == "pending", pending.text
        early = http.get(f"/api/v1/payment/receipt/{payment_id}", headers=alice)
        assert early.status_code == 409, early.text

        paid = http.post(intent["redirect_url"], data={"outcome": "succeeded"})
        assert paid.status_code == 303, paid.text
        assert paid.headers["location"] == (
            f"{RETURN_URL}&payment_id={payment_id}&status=succeeded"
        )

        verified = http.post(
            "/api/v1/payment/verify", json={"payment_id": payment_id}, headers=alice
        )
        assert verified.status_code == 200, verified.text
        payment = verified.json()
        assert payment["status"] == "succeeded"
        assert payment["provider"] == "sandbox"
        assert payment["receipt_url"] == f"/api/v1/payment/receipt/{payment_id}/pdf"

        meta = http.get(f"/api/v1/payment/receipt/{payment_id}", headers=alice)
        assert meta.status_code == 200, meta.text
        receipt = meta.json()
        assert receipt["payment_id"] == payment_id
        assert (receipt["plan"], receipt["plan_name"]) == ("pro", "Pro")
        assert (receipt["amount"], receipt["currency"]) == (2900, "EUR")
        assert receipt["amount_formatted"] == "€29.00"
        assert receipt["status"] == "succeeded"
        assert re.fullmatch(r"R-\d{4}-\d{6}", receipt["receipt_number"]), receipt
        assert receipt["pdf_url"] == payment["receipt_url"]

        pdf = http.get(receipt["pdf_url"], headers=alice)
        assert pdf.status_code == 200, pdf.text
        assert pdf.headers["content-type"] == "application/pdf"
        assert "attachment" in pdf.headers["content-disposition"]
        assert pdf.content.startswith(b"%PDF-")
        text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        for expected in (
            "Example Merchant Ltd",
            receipt["receipt_number"],
            "Pro",
            "€29.00",
            "Sandbox test payment",
            payment_id,
        ):
            assert expected in text, f"{expected!r} missing from the receipt:\n{text}"

        # Someone else's token sees nothing, and the page now shows the settled state.
        bob = service.cli("token", "--sub", "bob")
        assert bob.returncode == 0, bob.stderr
        other = http.get(receipt["pdf_url"], headers=bearer(bob.stdout.strip()))
        assert other.status_code in {403, 404}, other.text
        settled = http.get(intent["redirect_url"])
        assert re.search(r'id="status">\s*<strong>succeeded</strong>', settled.text), settled.text
        assert 'id="pay"' not in settled.text


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"plan": "pro"', "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b"null", "application/json"),
        (b"plan=pro", "application/x-www-form-urlencoded"),
    ],
    ids=["truncated-json", "not-utf8", "null", "form-encoded"],
)
def test_malformed_body_is_a_4xx_problem(
    service: ServiceProcess, content: bytes, content_type: str
) -> None:
    with service.client() as http:
        response = http.post(
            "/api/v1/payment/create-intent",
            content=content,
            headers={"content-type": content_type},
        )
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == response.status_code
    assert body["code"] in {"invalid_json", "invalid_body", "validation_error"}, body


def test_bad_checkout_outcome_over_http(service: ServiceProcess) -> None:
    with service.client() as http:
        created = http.post("/api/v1/payment/create-intent", json={"plan": "basic"})
        assert created.status_code == 201, created.text
        response = http.post(created.json()["redirect_url"], data={"outcome": "refunded"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "validation_error"


def test_return_url_with_fragment_keeps_the_query_before_it(
    service: ServiceProcess, alice_token: str
) -> None:
    with service.client() as http:
        created = http.post(
            "/api/v1/payment/create-intent",
            json={"plan": "basic", "return_url": "https://shop.example/thanks?order=7#summary"},
            headers=bearer(alice_token),
        )
        assert created.status_code == 201, created.text
        payment_id = created.json()["payment_id"]
        paid = http.post(created.json()["redirect_url"], data={"outcome": "succeeded"})
    assert paid.status_code == 303, paid.text
    assert paid.headers["location"] == (
        f"https://shop.example/thanks?order=7&payment_id={payment_id}&status=succeeded#summary"
    )
