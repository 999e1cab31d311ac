"""Receipts and credit notes an accountant accepts: every field read back from the real PDF
(WeasyPrint, pypdf), numbers and the hash chain in the suite's real Redis, signatures made and
checked with pyHanko, and `payments receipts verify` run as the operator runs it."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from pypdf import PdfReader
from redis.asyncio import Redis

from app.main import receipt_config
from app.settings import Settings
from models.payment import PaymentRecord, PaymentStatus, Plan, TaxTreatment
from services.receipt_document import ProviderFacts, receipt_context
from services.receipt_ledger import ReceiptLedger, Series, verify
from services.receipt_service import ReceiptService
from services.tax import TaxPolicy, refunded_tax, tax_included, tax_on_top
from tests.conftest import (
    JWT_SECRET,
    RedisServer,
    assert_problem,
    bearer,
    create_payment,
    make_settings,
    pay_in_sandbox,
)

API = "/api/v1/payment"
ROOT = Path(__file__).resolve().parents[2]
YEAR = dt.datetime.now(dt.UTC).year
MINUS = "\u2212"  # the credit note's minus sign (&minus;)


def pdf_pages(data: bytes) -> list[str]:
    # NBSP (babel puts one between amount and symbol in German) reads as a plain space.
    return [
        (page.extract_text() or "").replace("\xa0", " ").replace("\u202f", " ")
        for page in PdfReader(io.BytesIO(data)).pages
    ]


def pdf_text(data: bytes) -> str:
    return "\n".join(pdf_pages(data))


async def paid(client: httpx.AsyncClient, owner: str, plan: str = "pro", **body: Any) -> str:
    payment = await create_payment(client, plan=plan, token=owner, **body)
    response = await pay_in_sandbox(client, payment["payment_id"])
    assert response.status_code in (200, 303), response.text
    return str(payment["payment_id"])


async def receipt_of(client: httpx.AsyncClient, payment_id: str, owner: str) -> dict[str, Any]:
    response = await client.get(f"{API}/receipt/{payment_id}", headers=bearer(owner))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def pdf_of(client: httpx.AsyncClient, url: str, owner: str) -> bytes:
    response = await client.get(url, headers=bearer(owner))
    assert response.status_code == 200, response.text
    return response.content


class TestNumbers:
    async def test_sequential_per_year_and_the_same_for_ever(
        self, client: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        alice = token("alice")
        first, second = [await paid(client, alice) for _ in range(2)]
        await app.state.receipts.drain()
        one = await receipt_of(client, first, alice)
        two = await receipt_of(client, second, alice)
        assert (one["receipt_number"], two["receipt_number"]) == (
            f"R-{YEAR}-000001",
            f"R-{YEAR}-000002",
        )
        data = await pdf_of(client, one["pdf_url"], alice)
        assert one["receipt_number"] in pdf_text(data)

        # Lose the stored file and the memory copy: the receipt comes back with its number
        # and, the output being deterministic, the same bytes (no new version in the chain).
        renderer = app.state.receipts.renderer
        renderer.path_for(first).unlink()
        renderer._cache = type(renderer._cache)(1 << 20)
        again = await receipt_of(client, first, alice)
        assert again["receipt_number"] == one["receipt_number"]
        assert again["pdf_sha256"] == one["pdf_sha256"]
        assert await pdf_of(client, one["pdf_url"], alice) == data
        chain = await renderer.ledger.chain()
        assert [(e.number, e.version) for e in chain] == [
            (f"R-{YEAR}-000001", 1),
            (f"R-{YEAR}-000002", 1),
        ]

    async def test_concurrent_allocations_from_many_workers_leave_no_gap(
        self, redis_server: RedisServer
    ) -> None:
        redis_server.flush()
        clients = [Redis.from_url(redis_server.url, decode_responses=True) for _ in range(4)]
        try:
            ledgers = [ReceiptLedger(client, prefix="test:") for client in clients]
            ids = [f"sb_{n:04d}" for n in range(40)]
            # Each payment asked for three times, from different workers, all at once.
            asks = [
                ledgers[(n + k) % 4].number(
                    doc_id,
                    series=Series.RECEIPT,
                    year=2026,
                    template="R-{year}-{seq:06d}",
                    kind="receipt",
                )
                for n, doc_id in enumerate(ids)
                for k in range(3)
            ]
            documents = await asyncio.gather(*asks)
            by_id: dict[str, set[str]] = {}
            for document in documents:
                by_id.setdefault(document.doc_id, set()).add(document.number)
            assert all(len(numbers) == 1 for numbers in by_id.values())
            assert sorted(next(iter(n)) for n in by_id.values()) == [
                f"R-2026-{n:06d}" for n in range(1, 41)
            ]
            next_year = await ledgers[0].number(
                "sb_new",
                series=Series.RECEIPT,
                year=2027,
                template="R-{year}-{seq:06d}",
                kind="receipt",
            )
            assert next_year.number == "R-2027-000001"
        finally:
            for client in clients:
                await client.aclose()

    def test_a_format_without_the_sequence_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="seq"):
            make_settings("redis://127.0.0.1:1/0", tmp_path, receipt_number_format="R-{year}")


def _sold_at_19_percent(amount: int) -> tuple[TaxPolicy, Plan, PaymentRecord]:
    """A plan of ``amount`` (tax included) sold at 19 %, as checkout records it."""
    policy = TaxPolicy(default_rate=Decimal(19))
    plan = Plan(code="pro", name="Pro", amount=amount, currency="EUR")
    sale = policy.sale(plan, None)
    now = dt.datetime.now(dt.UTC)
    record = PaymentRecord(
        payment_id="sb_x",
        provider="sandbox",
        reference="r",
        plan="pro",
        amount=amount,
        currency="EUR",
        status=PaymentStatus.SUCCEEDED,
        created_at=now,
        updated_at=now,
        tax_rate=sale.rate,
        tax_amount=sale.tax,
        tax_treatment=sale.treatment,
    )
    return policy, plan, record


class TestTaxArithmetic:
    def test_half_up_on_the_tax_amount(self) -> None:
        assert tax_included(2900, Decimal(19)) == 463  # 463.03
        assert tax_included(119, Decimal(19)) == 19
        assert tax_on_top(2450, Decimal(19)) == 466  # 465.5 rounds up
        assert tax_on_top(2900, Decimal(0)) == 0

    def test_credit_notes_of_a_full_refund_give_back_exactly_the_tax(self) -> None:
        policy, plan, record = _sold_at_19_percent(1000)
        lines = policy.lines(record, plan)
        parts = [333, 333, 334]
        before, taxes = 0, []
        for amount in parts:
            taxes.append(refunded_tax(lines, before, amount).tax)
            before += amount
        assert sum(taxes) == lines.tax == 160

    def test_a_partial_capture_is_a_sale_of_the_part_captured(self) -> None:
        policy, plan, record = _sold_at_19_percent(2900)
        whole = policy.lines(record, plan)
        assert (whole.net, whole.tax, whole.gross) == (2437, 463, 2900)
        part = policy.lines(record.model_copy(update={"amount_captured": 2000}), plan)
        # 2000 * 463 / 2900 = 319.31: half up on the tax, the net what is left.
        assert (part.net, part.tax, part.gross) == (1681, 319, 2000)
        # Refunding what was captured gives back exactly its tax.
        assert refunded_tax(part, 0, 1500).tax + refunded_tax(part, 1500, 500).tax == 319


class TestWhatTheReceiptSays:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {
            "tax_rate": "19",
            "merchant_name": "Nordlicht Software GmbH",
            "merchant_address": "Torstraße 1\n10119 Berlin\nGermany",
            "merchant_vat_id": "DE123456789",
            "merchant_email": "billing@nordlicht.example",
            "merchant_website": "https://nordlicht.example",
            "payment_plans": {
                "pro": {"name": "Pro", "amount": 2900, "currency": "EUR"},
                "book": {"name": "Book", "amount": 2140, "currency": "EUR", "tax_rate": "7"},
            },
        }

    async def test_every_field(self, client: httpx.AsyncClient, app: Any, token: Any) -> None:
        alice = token("alice")
        payment_id = await paid(
            client,
            alice,
            customer_email="ada@example.com",
            buyer={
                "name": "Ada Lovelace",
                "address": "12 St James's Square\nLondon SW1Y 4JH",
                "country": "GB",
                "vat_id": "gb 123 4567 89",
            },
        )
        receipt = await receipt_of(client, payment_id, alice)
        assert receipt["tax"] == {
            "name": "VAT",
            "rate": "19",
            "treatment": "standard",
            "net": 2437,
            "tax": 463,
            "gross": 2900,
        }
        assert (receipt["document"], receipt["test"], receipt["signed"]) == (
            "receipt",
            True,
            False,
        )
        data = await pdf_of(client, receipt["pdf_url"], alice)
        text = pdf_text(data)
        for expected in (
            "Receipt",
            receipt["receipt_number"],
            # seller
            "Nordlicht Software GmbH",
            "Torstraße 1",
            "10119 Berlin",
            "VAT ID: DE123456789",
            "billing@nordlicht.example",
            "https://nordlicht.example",
            # buyer
            "Ada Lovelace",
            "London SW1Y 4JH",
            "ada@example.com",
            "VAT ID: GB123456789",
            # line: plan, quantity, unit price; tax lines
            "Plan: Pro",
            "Unit price",
            "€29.00",
            "Net",
            "€24.37",
            "VAT 19 %",
            "€4.63",
            "Total paid (EUR)",
            # payment
            "Sandbox test payment (Visa ending in 4242)",
            "Paid:",
            payment_id,
            "TEST",
        ):
            assert expected in text, f"{expected!r} missing from the receipt"
        assert " 1 " in text.replace("\n", " ")  # the quantity

    async def test_a_plans_own_rate(self, client: httpx.AsyncClient, token: Any) -> None:
        alice = token("alice")
        payment_id = await paid(client, alice, plan="book")
        receipt = await receipt_of(client, payment_id, alice)
        assert (receipt["tax"]["rate"], receipt["tax"]["tax"]) == ("7", 140)
        text = pdf_text(await pdf_of(client, receipt["pdf_url"], alice))
        assert "VAT 7 %" in text and "€1.40" in text and "€20.00" in text

    def test_amounts_align_right(self, settings: Settings) -> None:
        """Laid out by WeasyPrint itself: each amount ends at its cell's right edge, each
        label starts at its cell's left edge (the cell rule once outranked .amount)."""
        from weasyprint import HTML
        from weasyprint.formatting_structure import boxes

        from services import receipt_render

        now = dt.datetime(2026, 3, 5, tzinfo=dt.UTC)
        plan = Plan(code="pro", name="Pro", amount=2900, currency="EUR")
        config = receipt_config(settings)
        record = _record("sb_align", provider="sandbox").model_copy(
            update={
                "tax_amount": 463,
                "tax_rate": Decimal(19),
                "paid_at": now,
                "tax_treatment": TaxTreatment.STANDARD,
            }
        )
        context = receipt_context(
            record,
            plan,
            number="R-2026-000001",
            tax=config.tax.lines(record, plan),
            seller=config.seller,
            provider=ProviderFacts(display_name="Sandbox"),
            locale="en",
        )
        receipt_render.init_worker()
        renderer = receipt_render._renderer
        assert renderer is not None
        html = renderer.environment.get_template("receipt.html").render(**context)
        document = HTML(string=html, base_url=renderer.base_url).render(
            stylesheets=[renderer.stylesheet], font_config=renderer.font_config
        )

        def texts(box: Any, cell: Any = None) -> Any:
            if isinstance(box, boxes.TableCellBox):
                cell = box
            if isinstance(box, boxes.TextBox) and cell is not None:
                yield box.text, box, cell
            for child in getattr(box, "children", []):
                yield from texts(child, cell)

        placed = {text: (box, cell) for text, box, cell in texts(document.pages[0]._page_box)}
        for amount in ("€29.00", "€24.37", "€4.63"):
            box, cell = placed[amount]
            right = cell.content_box_x() + cell.width
            assert abs(box.position_x + box.width - right) < 1, amount
        box, cell = placed["Net"]
        assert abs(box.position_x - cell.content_box_x()) < 1


class TestNoTax:
    async def test_rate_zero_says_no_tax_charged(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        alice = token("alice")
        receipt = await receipt_of(client, await paid(client, alice), alice)
        assert receipt["tax"]["treatment"] == "no_tax" and receipt["tax"]["tax"] == 0
        text = pdf_text(await pdf_of(client, receipt["pdf_url"], alice))
        assert "No VAT charged." in text and "VAT 0 %" not in text


class TestReverseCharge:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {
            "tax_rate": "19",
            "merchant_vat_id": "DE123456789",
            "reverse_charge_enabled": True,
        }

    async def test_a_buyer_vat_id_of_another_country(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        alice = token("alice")
        foreign = await paid(client, alice, buyer={"name": "Acme SARL", "vat_id": "FR12345678901"})
        domestic = await paid(client, alice, buyer={"vat_id": "DE999999999"})
        receipt = await receipt_of(client, foreign, alice)
        assert receipt["tax"] == {
            "name": "VAT",
            "rate": "19",
            "treatment": "reverse_charge",
            "net": 2900,
            "tax": 0,
            "gross": 2900,
        }
        text = pdf_text(await pdf_of(client, receipt["pdf_url"], alice))
        assert "Reverse charge: no VAT charged" in text and "FR12345678901" in text
        assert (await receipt_of(client, domestic, alice))["tax"]["tax"] == 463


class TestPricesExcludeTax:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"tax_rate": "19", "prices_include_tax": False}

    async def test_tax_is_added_to_the_price_charged(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        alice = token("alice")
        payment = await create_payment(client, plan="pro", token=alice)
        assert payment["amount"] == 2900 + 551
        await pay_in_sandbox(client, payment["payment_id"])
        receipt = await receipt_of(client, payment["payment_id"], alice)
        assert (receipt["tax"]["net"], receipt["tax"]["tax"]) == (2900, 551)


class TestBuyerInput:
    @pytest.mark.parametrize(
        "buyer",
        [
            {"vat_id": "not a vat id!"},
            {"country": "Germany"},
            {"name": "x" * 201},
            {"name": "Eve\x07"},
            {"unexpected": "field"},
            {"address": ""},
        ],
    )
    async def test_bad_buyer_fields_are_422(
        self, client: httpx.AsyncClient, token: Any, buyer: dict[str, Any]
    ) -> None:
        response = await client.post(
            f"{API}/create-intent",
            json={"plan": "pro", "buyer": buyer},
            headers=bearer(token("alice")),
        )
        assert_problem(response, 422, "validation_error")


class TestTestMark:
    async def test_on_every_page_of_a_sandbox_receipt(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        alice = token("alice")
        # An address long enough to run over several pages.
        address = "\n".join(f"L{n}" for n in range(60))
        payment_id = await paid(client, alice, buyer={"address": address})
        receipt = await receipt_of(client, payment_id, alice)
        pages = pdf_pages(await pdf_of(client, receipt["pdf_url"], alice))
        assert len(pages) >= 2
        assert all("TEST" in page for page in pages)


def _record(payment_id: str, **fields: Any) -> PaymentRecord:
    paid_at = dt.datetime(2026, 3, 5, 14, 7, tzinfo=dt.UTC)
    values: dict[str, Any] = {
        "payment_id": payment_id,
        "provider": "lemonsqueezy",
        "reference": "ord_1",
        "plan": "pro",
        "amount": 2900,
        "currency": "EUR",
        "status": PaymentStatus.SUCCEEDED,
        "payment_method": "card",
        "card_brand": "mastercard",
        "card_last4": "4444",
        "wallet": "apple_pay",
        "created_at": paid_at,
        "updated_at": paid_at,
        "paid_at": paid_at,
        "tax_rate": Decimal(0),
        "tax_amount": 0,
        "tax_treatment": TaxTreatment.NO_TAX,
        **fields,
    }
    return PaymentRecord(**values)


@pytest.fixture
async def renderer(
    redis_server: RedisServer, tmp_path: Path, render_pool: ProcessPoolExecutor
) -> Any:
    redis_server.flush()
    settings = make_settings(redis_server.url, tmp_path / "receipts")
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    yield ReceiptService(
        receipt_config(settings), ReceiptLedger(redis, prefix="test:"), executor=render_pool
    )
    await redis.aclose()


class TestMerchantOfRecord:
    async def test_a_payment_confirmation_naming_who_sold(self, renderer: ReceiptService) -> None:
        plan = Plan(code="pro", name="Pro", amount=2900, currency="EUR")
        facts = ProviderFacts(display_name="Lemon Squeezy", merchant_of_record="Lemon Squeezy LLC")
        document = await renderer.receipt(_record("ls_1"), plan, facts)
        text = pdf_text(document.data)
        assert "Payment confirmation" in text and "Receipt" not in text
        assert "Sold by Lemon Squeezy LLC as merchant of record" in " ".join(text.split())
        assert "is not a tax receipt" in " ".join(text.split())
        # Live money: no TEST mark. A card through a wallet.
        assert "TEST" not in text
        assert "Card: Mastercard ending in 4444 via Apple Pay" in text
        assert document.number == "R-2026-000001"

    async def test_a_seller_of_its_own_issues_a_receipt(self, renderer: ReceiptService) -> None:
        plan = Plan(code="pro", name="Pro", amount=2900, currency="EUR")
        document = await renderer.receipt(
            _record("pi_1", provider="stripe"), plan, ProviderFacts(display_name="Stripe")
        )
        text = pdf_text(document.data)
        assert "Receipt" in text and "merchant of record" not in text


class TestGerman:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"receipt_locale": "de", "tax_rate": "19"}

    async def test_words_amounts_and_dates(self, client: httpx.AsyncClient, token: Any) -> None:
        alice = token("alice")
        receipt = await receipt_of(client, await paid(client, alice), alice)
        assert receipt["amount_formatted"].replace("\xa0", " ") == "29,00 €"
        text = pdf_text(await pdf_of(client, receipt["pdf_url"], alice))
        for expected in (
            "Rechnung",
            "Nr. R-",
            "29,00 €",
            "4,63 €",
            "VAT 19 %",
            "Bezahlt",
            "Zahlungsart",
            "Sandbox-Testzahlung",
        ):
            assert expected in text, f"{expected!r} missing from the German receipt"
        month = dt.datetime.now(dt.UTC).month
        german_months = [
            "Januar",
            "Februar",
            "März",
            "April",
            "Mai",
            "Juni",
            "Juli",
            "August",
            "September",
            "Oktober",
            "November",
            "Dezember",
        ]
        assert german_months[month - 1] in text


class TestCreditNotes:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {
            "tax_rate": "19",
            "payment_plans": {"expert": {"name": "Expert", "amount": 14900, "currency": "EUR"}},
        }

    async def test_a_refund_gets_a_numbered_credit_note(
        self, client: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        alice, admin = token("alice"), token("root", admin=True)
        payment_id = await paid(client, alice, plan="expert")
        refund = await client.post(
            f"{API}/{payment_id}/refund", json={"amount": 4900}, headers=bearer(admin)
        )
        assert refund.status_code == 200, refund.text
        refund_id = refund.json()["refund"]["refund_id"]
        await app.state.receipts.drain()

        receipt = await receipt_of(client, payment_id, alice)
        [note] = receipt["credit_notes"]
        assert note["number"] == f"CN-{YEAR}-000001"
        assert (note["refund_id"], note["amount"]) == (refund_id, 4900)
        # 4900 of 14900: tax back in proportion, 2379 * 4900 / 14900 = 782.4 -> 782.
        assert (note["tax"]["tax"], note["tax"]["net"]) == (782, 4118)
        assert note["pdf_url"] == f"{API}/{payment_id}/refunds/{refund_id}/pdf"

        data = await pdf_of(client, note["pdf_url"], alice)
        text = pdf_text(data)
        for expected in (
            "Credit note",
            note["number"],
            f"Corrects receipt: {receipt['receipt_number']}",
            f"{MINUS}€49.00",
            f"{MINUS}€41.18",
            f"{MINUS}€7.82",
            "VAT 19 %",
            payment_id,
            "TEST",
        ):
            assert expected in text, f"{expected!r} missing from the credit note"
        # The receipt itself is not changed by the refund.
        assert "Total paid (EUR)" in pdf_text(await pdf_of(client, receipt["pdf_url"], alice))
        assert (await pdf_of(client, note["pdf_url"], token("root", admin=True))) == data
        assert_problem(
            await client.get(note["pdf_url"], headers=bearer(token("bob"))),
            404,
            "payment_not_found",
        )
        unknown = f"{API}/{payment_id}/refunds/rf_000000000000000000000000/pdf"
        assert_problem(await client.get(unknown, headers=bearer(alice)), 404, "payment_not_found")
        kinds = [
            (entry.kind, entry.number) for entry in await app.state.receipts.renderer.ledger.chain()
        ]
        assert ("credit_note", note["number"]) in kinds


class TestPartialCapture:
    """Only part of an authorization captured: the receipt is for that part."""

    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"tax_rate": "19"}

    async def test_the_receipt_and_its_credit_note_are_for_what_was_captured(
        self, client: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        alice, admin = token("alice"), token("root", admin=True)
        payment = await create_payment(client, token=alice, capture_method="manual")
        payment_id = payment["payment_id"]
        await pay_in_sandbox(client, payment_id)
        captured = await client.post(
            f"{API}/{payment_id}/capture", json={"amount": 2000}, headers=bearer(alice)
        )
        assert captured.json()["amount_captured"] == 2000, captured.text
        await app.state.receipts.drain()

        receipt = await receipt_of(client, payment_id, alice)
        assert receipt["amount"] == 2000 and receipt["amount_formatted"] == "€20.00"
        # 2000 of 2900 with 463 tax in it: 319.31 -> 319, the net what is left.
        assert (receipt["tax"]["net"], receipt["tax"]["tax"], receipt["tax"]["gross"]) == (
            1681,
            319,
            2000,
        )
        text = pdf_text(await pdf_of(client, receipt["pdf_url"], alice))
        for expected in ("Captured €20.00 of €29.00 authorized", "€16.81", "€3.19"):
            assert expected in text, f"{expected!r} missing from the receipt"
        assert "€29.00" in text and "€4.63" not in text
        total = text[text.index("Total paid") :].split("\n")[0]
        assert "€20.00" in total, total

        refunded = await client.post(f"{API}/{payment_id}/refund", json={}, headers=bearer(admin))
        assert refunded.json()["refund"]["amount"] == 2000, refunded.text
        await app.state.receipts.drain()
        [note] = (await receipt_of(client, payment_id, alice))["credit_notes"]
        assert (note["amount"], note["tax"]["tax"]) == (2000, 319)


class TestHashChain:
    async def test_verify_finds_a_tampered_pdf(
        self,
        client: httpx.AsyncClient,
        app: Any,
        token: Any,
        settings: Settings,
        redis_server: RedisServer,
    ) -> None:
        alice, admin = token("alice"), token("root", admin=True)
        first = await paid(client, alice)
        second = await paid(client, alice)
        await client.post(f"{API}/{second}/refund", json={"amount": 900}, headers=bearer(admin))
        await app.state.receipts.drain()
        for payment_id in (first, second):
            await receipt_of(client, payment_id, alice)
        renderer = app.state.receipts.renderer

        def cli() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "app.cli", "receipts", "verify"],
                cwd=settings.receipts_dir.parent,
                env={
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "REDIS_URL": redis_server.url,
                    "REDIS_KEY_PREFIX": "test:",
                    "JWT_SECRET_KEY": JWT_SECRET,
                    "RECEIPTS_DIR": str(settings.receipts_dir),
                },
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        done = cli()
        assert done.returncode == 0, done.stdout + done.stderr
        assert "3 chain entries, 3 documents match" in done.stdout

        # Someone edits the second receipt on disk: verify names it.
        number = (await renderer.ledger.document(second)).number
        path = renderer.path_for(second)
        data = path.read_bytes()
        path.write_bytes(data.replace(b"29.00", b"19.00", 1) if b"29.00" in data else data + b"%")
        done = cli()
        assert done.returncode == 1
        assert f"({number} v1): the stored PDF does not match its hash" in done.stdout

        # The service never serves it: it keeps the edited file aside and renders a new
        # version, entered in the chain as such.
        renderer._cache = type(renderer._cache)(1 << 20)
        served = await pdf_of(client, f"{API}/receipt/{second}/pdf", alice)
        assert served == data  # deterministic: the same bytes as the original
        assert list(path.parent.glob(f"{path.name}.tampered-*"))
        # Same bytes as recorded: no new version was needed, and the chain verifies again.
        done = cli()
        assert done.returncode == 0, done.stdout

    async def test_a_rewritten_entry_breaks_the_chain(
        self, client: httpx.AsyncClient, app: Any, token: Any, settings: Settings
    ) -> None:
        alice = token("alice")
        for _ in range(3):
            await paid(client, alice)
        await app.state.receipts.drain()
        ledger: ReceiptLedger = app.state.receipts.renderer.ledger

        def read(doc_id: str) -> bytes | None:
            return app.state.receipts.renderer.path_for(doc_id).read_bytes()

        assert (await verify(ledger, read)).ok
        chain_key = ledger._chain
        raw = await ledger._redis.lindex(chain_key, 1)
        await ledger._redis.lset(
            chain_key, 1, raw.replace('"pdf_sha256":"', '"pdf_sha256":"0', 1)[:-1] + "}"
        )
        report = await verify(ledger, read)
        assert report.mismatch is not None and report.mismatch.startswith("entry 1 ")


class TestSigning:
    @pytest.fixture
    def settings_overrides(self, tmp_path: Path) -> dict[str, Any]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Receipts test signer")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        cert_path = tmp_path / "signer.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return {"receipt_signing_key": key_pem, "receipt_signing_cert": str(cert_path)}

    async def test_signed_and_valid(
        self, client: httpx.AsyncClient, token: Any, settings: Settings
    ) -> None:
        from pyhanko.keys import load_cert_from_pemder
        from pyhanko.pdf_utils.reader import PdfFileReader
        from pyhanko.sign.validation import async_validate_pdf_signature
        from pyhanko_certvalidator import ValidationContext

        alice, admin = token("alice"), token("root", admin=True)
        receipt = await receipt_of(client, await paid(client, alice), alice)
        assert receipt["signed"] is True
        data = await pdf_of(client, receipt["pdf_url"], alice)
        assert receipt["receipt_number"] in pdf_text(data)
        [signature] = PdfFileReader(io.BytesIO(data)).embedded_signatures
        trust = load_cert_from_pemder(str(settings.receipt_signing_cert))
        status = await async_validate_pdf_signature(
            signature, ValidationContext(trust_roots=[trust])
        )
        assert status.intact and status.valid and status.trusted, status.pretty_print_details()
        assert status.coverage.name == "ENTIRE_FILE"

        health = await client.get("/admin/health", headers=bearer(admin))
        assert health.json()["receipts"]["signing"] == "signed"


class TestUnsignedHealth:
    async def test_said_in_admin_health(self, client: httpx.AsyncClient, token: Any) -> None:
        health = await client.get("/admin/health", headers=bearer(token("root", admin=True)))
        assert health.json()["receipts"]["signing"] == "unsigned"


def test_replace_keeps_config_fields(tmp_path: Path) -> None:
    # The bench builds its ReceiptService from receipt_config with another directory.
    settings = make_settings("redis://127.0.0.1:1/0", tmp_path)
    config = replace(receipt_config(settings), directory=tmp_path / "x", render_workers=2)
    assert config.render_workers == 2 and config.locale == "en"


class TestStripeCardDetails:
    def test_brand_last4_and_wallet_from_the_charge(self) -> None:
        # The shape of Stripe's Charge.payment_method_details.card (API reference, Charges).
        from services.payment_providers.base import CardDetails
        from services.payment_providers.stripe.transformers import state_from_payment_intent

        intent = {
            "id": "pi_1",
            "status": "succeeded",
            "amount": 2900,
            "currency": "eur",
            "latest_charge": {
                "id": "ch_1",
                "captured": True,
                "payment_method_details": {
                    "type": "card",
                    "card": {"brand": "visa", "last4": "4242", "wallet": {"type": "apple_pay"}},
                },
            },
        }
        state = state_from_payment_intent(intent)
        assert state.card == CardDetails(brand="visa", last4="4242", wallet="apple_pay")
        assert state.payment_method == "card"
