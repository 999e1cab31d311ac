"""Receipt and credit-note numbers are allocated when the money moves and kept on the payment
(the refund) in Redis, the same for ever; a first render then needs the ledger once, for its
chain entry. Counted on the suite's own redis-server (INFO stats and commandstats), through the
real app.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.main import create_app
from app.settings import Settings
from models.payment import PaymentStatus, RefundStatus
from services.payment_providers.sandbox_webhooks import sign_webhook
from services.payment_store import TransitionOutcome
from tests.conftest import RedisServer, assert_problem, bearer, create_payment
from tests.services.test_receipt_documents import YEAR, paid, pdf_of, pdf_text, receipt_of

API = "/api/v1/payment"
# Nothing but what a test does talks to Redis: no rate-limit counters, no reconciler, no events
# worker (its relay is waited out before counting).
QUIET = {"rate_limits_enabled": False, "reconcile_enabled": False, "webhook_worker_enabled": False}


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client of the suite's Redis, to look at what the app stored."""
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def held_number(raw: Redis, payment_id: str) -> str | None:
    """The receipt number kept in the payment's own hash."""
    held: str | None = await raw.hget(f"test:pay:{{{payment_id}}}", "receipt_number")
    return held


async def held_credit_note_number(raw: Redis, payment_id: str, refund_id: str) -> str | None:
    """The credit-note number kept in the refund's record (in the payment's slot)."""
    record = await raw.hget(f"test:pay:{{{payment_id}}}:refunds", refund_id)
    number: str | None = json.loads(record)["credit_note_number"]
    return number


async def paid_without_follow_up(client: httpx.AsyncClient, app: Any, owner: str) -> str:
    """A payment made paid as when the process dies right after the transition: the store's
    transition alone, without the follow-up that numbers and renders its receipt."""
    payment_id = str((await create_payment(client, token=owner))["payment_id"])
    moved = await app.state.store.transition(payment_id, PaymentStatus.SUCCEEDED, cause="test")
    assert moved.outcome is TransitionOutcome.APPLIED
    return payment_id


@dataclass(frozen=True)
class Traffic:
    """What Redis saw from the app since the last CONFIG RESETSTAT."""

    round_trips: int  # requests read from clients
    calls: Counter[str]  # commands run, a script's own commands included


async def traffic(raw: Redis) -> Traffic:
    """Left out: this client's own INFO, and the provider manager's watch, which reads the
    stored configurations' versions all along (four times a second, one pipeline of two GETs;
    nothing else measured here sends a GET)."""
    info = await raw.info("stats", "commandstats")
    calls = Counter(
        {
            name.removeprefix("cmdstat_"): int(stat["calls"])
            for name, stat in info.items()
            if name.startswith("cmdstat_")
        }
    )
    for own in ("info", "config|resetstat"):
        calls.pop(own, None)
    watch = calls.pop("get", 0) // 2
    return Traffic(round_trips=int(info["total_reads_processed"]) - 1 - watch, calls=calls)


async def counting_from_quiet(raw: Redis, within_s: float = 5.0) -> None:
    """Wait until the app has stopped talking to Redis (an event relay, a background render
    finishing), then start counting from zero."""
    deadline = time.monotonic() + within_s
    while True:
        await raw.config_resetstat()
        await asyncio.sleep(0.05)
        seen = await traffic(raw)
        if seen.round_trips == 0:
            await raw.config_resetstat()
            return
        if time.monotonic() > deadline:
            pytest.fail(f"Redis still busy after {within_s} s: {seen}")


async def pdf_counted(client: httpx.AsyncClient, raw: Redis, url: str, owner: str) -> Traffic:
    """Download the PDF at ``url`` as ``owner`` from a quiet Redis: what Redis saw meanwhile."""
    await counting_from_quiet(raw)
    pdf = await client.get(url, headers=bearer(owner))
    seen = await traffic(raw)
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-"), pdf.text
    return seen


def _event(event_id: str, payment_id: str) -> bytes:
    body = {
        "id": event_id,
        "type": "payment.succeeded",
        "created": int(time.time()),
        "data": {"payment_id": payment_id},
    }
    return json.dumps(body).encode()


async def _deliver(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    return await client.post(
        f"{API}/webhook/sandbox",
        content=body,
        headers={
            "Sandbox-Signature": sign_webhook("sandbox-webhook-secret", body),
            "content-type": "application/json",
        },
    )


class TestNumberedWhenPaid:
    async def test_held_by_the_payment_before_any_download(
        self, client: httpx.AsyncClient, app: Any, token: Any, raw: Redis
    ) -> None:
        alice = token("alice")
        payment_id = await paid(client, alice)  # the sandbox's checkout page, as a customer
        await app.state.receipts.drain()
        number = await held_number(raw, payment_id)
        assert number == f"R-{YEAR}-000001"
        receipt = await receipt_of(client, payment_id, alice)
        assert receipt["receipt_number"] == number
        assert number in pdf_text(await pdf_of(client, receipt["pdf_url"], alice))

    async def test_a_success_told_again_never_changes_it(
        self, client: httpx.AsyncClient, app: Any, token: Any, raw: Redis
    ) -> None:
        alice = token("alice")
        payment_id = await paid(client, alice)
        await app.state.receipts.drain()
        number = await held_number(raw, payment_id)
        assert number == f"R-{YEAR}-000001"

        # The success again, every way it comes: the provider's webhook and its replay, a
        # verify, and the follow-up run again with the payment as the transition left it.
        body = _event("evt_told_again", payment_id)
        outcomes = [(await _deliver(client, body)).json()["outcome"] for _ in range(2)]
        assert outcomes == ["unchanged", "duplicate"]
        verify = await client.post(
            f"{API}/verify", json={"payment_id": payment_id}, headers=bearer(alice)
        )
        assert verify.json()["status"] == "succeeded", verify.text
        stale = await app.state.store.get(payment_id)
        app.state.receipts.render_soon(stale.model_copy(update={"receipt_number": None}))
        await app.state.receipts.drain()

        assert await held_number(raw, payment_id) == number
        assert (await receipt_of(client, payment_id, alice))["receipt_number"] == number
        # Nothing was allocated meanwhile: the next payment has the next number.
        following = await paid(client, alice)
        await app.state.receipts.drain()
        assert await held_number(raw, following) == f"R-{YEAR}-000002"

    async def test_a_succeeded_refund_holds_its_credit_note_number(
        self, client: httpx.AsyncClient, app: Any, token: Any, raw: Redis
    ) -> None:
        alice, admin = token("alice"), token("root", admin=True)
        payment_id = await paid(client, alice)
        refund = await client.post(
            f"{API}/{payment_id}/refund", json={"amount": 900}, headers=bearer(admin)
        )
        assert refund.status_code == 200, refund.text
        refund_id = refund.json()["refund"]["refund_id"]
        await app.state.receipts.drain()
        number = await held_credit_note_number(raw, payment_id, refund_id)
        assert number == f"CN-{YEAR}-000001"
        [note] = (await receipt_of(client, payment_id, alice))["credit_notes"]
        assert note["number"] == number
        # A later change of the refund's record keeps the number.
        again = await app.state.store.apply_refund(
            payment_id, status=RefundStatus.SUCCEEDED, cause="test", refund_id=refund_id
        )
        assert again.refund is not None and again.refund.credit_note_number == number


class TestNumberedOnFirstDownload:
    """The process died between the payment becoming paid and its number being kept: the
    first download numbers it, and keeps the number on the payment."""

    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return QUIET

    async def test_numbered_and_kept(
        self, client: httpx.AsyncClient, app: Any, token: Any, raw: Redis
    ) -> None:
        alice = token("alice")
        payment_id = await paid_without_follow_up(client, app, alice)
        assert await held_number(raw, payment_id) is None
        receipt = await receipt_of(client, payment_id, alice)
        assert receipt["receipt_number"] == f"R-{YEAR}-000001"
        assert await held_number(raw, payment_id) == receipt["receipt_number"]
        data = await pdf_of(client, receipt["pdf_url"], alice)
        assert receipt["receipt_number"] in pdf_text(data)

    async def test_concurrent_first_downloads_on_two_workers_leave_no_gap(
        self,
        client: httpx.AsyncClient,
        app: Any,
        token: Any,
        raw: Redis,
        settings: Settings,
        render_pool: ProcessPoolExecutor,
    ) -> None:
        alice = token("alice")
        ids = [await paid_without_follow_up(client, app, alice) for _ in range(8)]
        other = create_app(settings, receipt_executor=render_pool)
        async with (
            other.router.lifespan_context(other),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=other), base_url="http://testserver"
            ) as second,
        ):
            # Each payment asked for three times at once, on both workers.
            responses = await asyncio.gather(
                *(
                    http.get(f"{API}/receipt/{payment_id}", headers=bearer(alice))
                    for payment_id in ids
                    for http in (client, second, client)
                )
            )
        assert [r.status_code for r in responses] == [200] * len(responses)
        by_id: dict[str, set[str]] = {}
        for response in responses:
            body = response.json()
            by_id.setdefault(body["payment_id"], set()).add(body["receipt_number"])
        assert all(len(numbers) == 1 for numbers in by_id.values())
        assert sorted(number for numbers in by_id.values() for number in numbers) == [
            f"R-{YEAR}-{n:06d}" for n in range(1, 9)
        ]
        for payment_id, numbers in by_id.items():
            assert {await held_number(raw, payment_id)} == numbers


class TestLedgerLost:
    """The ledger lost a document its payment holds a number for (Redis restored from an
    older copy): no PDF is served and no number handed out again, but a 503 that names the
    problem, never a 500."""

    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return QUIET

    async def test_first_render_refused(
        self, client: httpx.AsyncClient, app: Any, token: Any, raw: Redis
    ) -> None:
        alice = token("alice")
        payment_id = await paid_without_follow_up(client, app, alice)
        await app.state.receipts.numbered(await app.state.store.get(payment_id))
        assert await raw.hdel("test:ledger:{receipts}:docs", payment_id) == 1

        response = await client.get(f"{API}/receipt/{payment_id}/pdf", headers=bearer(alice))
        assert_problem(response, 503, "receipt_ledger_inconsistent")
        assert not await raw.hexists("test:ledger:{receipts}:docs", payment_id)

    async def test_stored_pdf_not_served(
        self,
        client: httpx.AsyncClient,
        app: Any,
        token: Any,
        raw: Redis,
        settings: Settings,
        render_pool: ProcessPoolExecutor,
    ) -> None:
        alice = token("alice")
        payment_id = await paid_without_follow_up(client, app, alice)
        receipt = await receipt_of(client, payment_id, alice)
        assert app.state.receipts.renderer.path_for(payment_id).exists()
        assert await raw.hdel("test:ledger:{receipts}:docs", payment_id) == 1

        # Another worker (nothing in its memory) finds the PDF on disk and no ledger entry.
        other = create_app(settings, receipt_executor=render_pool)
        async with (
            other.router.lifespan_context(other),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=other), base_url="http://testserver"
            ) as second,
        ):
            response = await second.get(receipt["pdf_url"], headers=bearer(alice))
        assert_problem(response, 503, "receipt_ledger_inconsistent")


class TestFirstRenderRoundTrips:
    """A first render of a document numbered when the money moved: the ledger once, after
    rendering, for the chain entry; the payment's own reads (who may see it, and its numbers)
    are the only other round trips."""

    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return QUIET

    async def test_a_receipt(
        self, client: httpx.AsyncClient, app: Any, token: Any, raw: Redis
    ) -> None:
        alice = token("alice")
        await paid(client, alice)  # Redis learns every script the receipts use
        await app.state.receipts.drain()
        payment_id = await paid_without_follow_up(client, app, alice)
        # What a payment becoming paid runs first; its render has not happened yet.
        await app.state.receipts.numbered(await app.state.store.get(payment_id))
        assert await held_number(raw, payment_id) == f"R-{YEAR}-000002"
        assert not app.state.receipts.renderer.path_for(payment_id).exists()
        ledger = app.state.receipts.renderer.ledger
        entries = len(await ledger.chain())

        seen = await pdf_counted(client, raw, f"{API}/receipt/{payment_id}/pdf", alice)
        # The payment's read, then one script: the chain entry (no other script ran, and the
        # chain gained this receipt's first version).
        assert seen.round_trips == 2, seen
        assert (seen.calls["hgetall"], seen.calls["evalsha"]) == (1, 1), seen
        chain = await ledger.chain()
        assert len(chain) == entries + 1
        assert (chain[-1].doc_id, chain[-1].number, chain[-1].version) == (
            payment_id,
            f"R-{YEAR}-000002",
            1,
        )

    async def test_a_credit_note(
        self, client: httpx.AsyncClient, app: Any, token: Any, raw: Redis
    ) -> None:
        alice, admin = token("alice"), token("root", admin=True)
        payment_id = await paid(client, alice)
        refunded = await client.post(
            f"{API}/{payment_id}/refund", json={"amount": 900}, headers=bearer(admin)
        )
        assert refunded.status_code == 200, refunded.text
        await app.state.receipts.drain()  # Redis learns every script the credit notes use

        # A second refund that succeeded and whose credit note the follow-up has numbered,
        # not rendered: the store's refund steps, then what a refund succeeding runs first.
        store, refund_id = app.state.store, f"rf_{secrets.token_hex(12)}"
        await store.begin_refund(
            payment_id,
            refund_id=refund_id,
            provider="sandbox",
            amount=500,
            currency="EUR",
            reason=None,
            cause="test",
        )
        moved = await store.apply_refund(
            payment_id, status=RefundStatus.SUCCEEDED, cause="test", refund_id=refund_id
        )
        await app.state.receipts.numbered_refund(moved.refund)
        assert await held_credit_note_number(raw, payment_id, refund_id) == f"CN-{YEAR}-000002"
        ledger = app.state.receipts.renderer.ledger
        entries = len(await ledger.chain())

        seen = await pdf_counted(client, raw, f"{API}/{payment_id}/refunds/{refund_id}/pdf", alice)
        # The payment, its refunds, then the chain entry.
        assert seen.round_trips == 3, seen
        assert (seen.calls["hgetall"], seen.calls["hvals"], seen.calls["evalsha"]) == (1, 1, 1)
        chain = await ledger.chain()
        assert len(chain) == entries + 1
        assert (chain[-1].doc_id, chain[-1].number, chain[-1].version) == (
            refund_id,
            f"CN-{YEAR}-000002",
            1,
        )
