"""Receipts: rendered by real WeasyPrint in the worker pool, once, atomically."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest
from pypdf import PdfReader

from services import receipt_render
from services.money import format_amount, to_major
from services.receipt_service import new_render_pool
from tests.conftest import bearer, create_payment, pay_in_sandbox


class _Renders(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.payment_ids: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "receipt.rendered":
            self.payment_ids.append(record.__dict__["payment_id"])


@pytest.fixture
def renders() -> Any:
    handler = _Renders()
    logger = logging.getLogger("payments.receipts")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def _paid(client: httpx.AsyncClient, owner: str, plan: str = "pro") -> str:
    payment = await create_payment(client, plan=plan, token=owner)
    await pay_in_sandbox(client, payment["payment_id"])
    return str(payment["payment_id"])


class TestReceiptRendering:
    async def test_rendered_when_the_payment_succeeds(
        self, client: httpx.AsyncClient, app: Any, token: Any, renders: _Renders
    ) -> None:
        payment_id = await _paid(client, token("alice"))
        await app.state.receipts.drain()
        path: Path = app.state.receipts.renderer.path_for(payment_id)
        assert path.exists() and path.read_bytes().startswith(b"%PDF-")
        assert renders.payment_ids == [payment_id]
        assert not list(path.parent.glob(".*.tmp")), "a temporary file was left behind"

    async def test_concurrent_first_requests_render_once(
        self, client: httpx.AsyncClient, app: Any, token: Any, renders: _Renders
    ) -> None:
        alice = token("alice")
        payment_id = await _paid(client, alice)
        await app.state.receipts.drain()
        # Lose the stored file and the memory copy: the next readers must render it again.
        renderer = app.state.receipts.renderer
        renderer.path_for(payment_id).unlink()
        renderer._cache = type(renderer._cache)(1 << 20)
        renders.payment_ids.clear()

        responses = await asyncio.gather(
            *(
                client.get(f"/api/v1/payment/receipt/{payment_id}/pdf", headers=bearer(alice))
                for _ in range(8)
            )
        )
        assert [r.status_code for r in responses] == [200] * 8
        assert len({r.content for r in responses}) == 1
        assert renders.payment_ids == [payment_id]

    async def test_text_of_the_pdf(self, client: httpx.AsyncClient, token: Any) -> None:
        alice = token("alice")
        payment_id = await _paid(client, alice, plan="basic")
        meta = (
            await client.get(f"/api/v1/payment/receipt/{payment_id}", headers=bearer(alice))
        ).json()
        pdf = await client.get(meta["pdf_url"], headers=bearer(alice))
        assert pdf.headers["content-disposition"] == (
            f'attachment; filename="receipt-{meta["receipt_number"]}.pdf"'
        )
        text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        paid_day = meta["paid_at"][:10]
        year, _month, day = paid_day.split("-")
        assert f" {int(day)}, {year}" in text  # e.g. "March 5, 2026", babel's long date (en)
        for expected in ("Receipt", meta["receipt_number"], "Basic", "€19.00", payment_id):
            assert expected in text


class TestWarmUp:
    """RECEIPT_WARM_UP: each render process renders one throwaway receipt at start, so the
    first customer does not wait for a process's first document. Nothing of it is kept."""

    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"receipt_warm_up": True}

    async def test_nothing_numbered_written_or_chained(
        self, client: httpx.AsyncClient, app: Any, token: Any
    ) -> None:
        renderer = app.state.receipts.renderer
        assert await renderer.ledger.chain() == []
        directory: Path = renderer.config.directory
        assert not directory.exists() or not any(directory.iterdir())
        alice = token("alice")
        payment_id = await _paid(client, alice)
        receipt = await client.get(f"/api/v1/payment/receipt/{payment_id}", headers=bearer(alice))
        assert receipt.json()["receipt_number"].endswith("-000001"), receipt.text

    def test_the_context_given_is_rendered(self) -> None:
        pool = new_render_pool(1)
        try:
            # Rendered, not only handed over: a template that does not exist is an error.
            with pytest.raises(jinja2.TemplateNotFound):
                pool.submit(receipt_render.warm_up, {"template": "nope.html"}).result(timeout=60)
        finally:
            pool.shutdown()


class TestReceiptTemplateEscaping:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"merchant_name": "<script>Evil & Co</script>", "merchant_vat_id": "DE123456789"}

    async def test_merchant_text_is_escaped_and_shown(
        self, client: httpx.AsyncClient, token: Any
    ) -> None:
        alice = token("alice")
        payment_id = await _paid(client, alice)
        pdf = await client.get(f"/api/v1/payment/receipt/{payment_id}/pdf", headers=bearer(alice))
        text = PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        assert "<script>Evil & Co</script>" in text  # printed literally, not interpreted
        assert "DE123456789" in text


class TestMoney:
    @pytest.mark.parametrize(
        ("amount", "currency", "text"),
        [
            (1900, "EUR", "€19.00"),
            (123456, "USD", "$1,234.56"),
            (1900, "JPY", "¥1,900"),
            (12345, "KWD", "KWD12.345"),
            (5, "SEK", "SEK0.05"),
        ],
    )
    def test_format_amount(self, amount: int, currency: str, text: str) -> None:
        assert format_amount(amount, currency) == text

    def test_to_major(self) -> None:
        assert str(to_major(1900, "EUR")) == "19.00"
        assert str(to_major(1900, "JPY")) == "1900"


class TestRenderPool:
    def test_a_ctrl_c_in_the_terminal_leaves_the_pool_to_the_service(self) -> None:
        # Ctrl-C signals the whole process group: `make run`'s render workers too. The
        # service shuts its pool down itself; a worker must not die of the signal first
        # (a traceback on every Ctrl-C, and a broken pool while the server still stops).
        pool = new_render_pool(1)
        try:
            pid = pool.submit(receipt_render.warm_up).result(timeout=60)
            os.kill(pid, signal.SIGINT)
            time.sleep(0.5)
            assert pool.submit(receipt_render.warm_up).result(timeout=60) == pid
        finally:
            pool.shutdown()
