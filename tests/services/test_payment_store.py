"""The transition table, once-only events, history, create's batch and refunds, on a real
standalone Redis and on a real 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from itertools import pairwise

import pytest

from models.payment import PaymentRecord, PaymentStatus, RefundRecord, RefundStatus
from services.errors import StoreUnavailable
from services.payment_store import (
    TRANSITIONS,
    IdempotencyAnswer,
    IdempotencyState,
    PaymentStore,
    RedisClient,
    RefundBegin,
    RefundBeginOutcome,
    TransitionOutcome,
    redis_client,
)
from tests.conftest import RedisClusterNodes, RedisServer
from tests.fakes.server import free_port

S = PaymentStatus


@pytest.fixture(params=["standalone", "cluster"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[RedisClient]:
    """The app's own kind of client, on a standalone Redis and on a Redis Cluster."""
    cluster = request.param == "cluster"
    server: RedisServer | RedisClusterNodes = request.getfixturevalue(
        "redis_cluster" if cluster else "redis_server"
    )
    server.flush()
    client = redis_client(server.url, cluster=cluster, timeout_s=2.0)
    yield client
    await client.aclose()


@pytest.fixture
def store(redis: RedisClient) -> PaymentStore:
    return PaymentStore(redis, prefix="unit:")


def _record(payment_id: str, status: PaymentStatus = S.PENDING) -> PaymentRecord:
    now = datetime.now(UTC)
    return PaymentRecord(
        payment_id=payment_id,
        provider="sandbox",
        reference=f"ord_{payment_id}",
        plan="pro",
        amount=2900,
        currency="EUR",
        status=status,
        created_at=now,
        updated_at=now,
    )


class TestTransitions:
    @pytest.mark.parametrize("source", list(S))
    @pytest.mark.parametrize("target", list(S))
    async def test_table_is_enforced(
        self, store: PaymentStore, source: PaymentStatus, target: PaymentStatus
    ) -> None:
        await store.create(_record("sb_t", source))
        result = await store.transition(
            "sb_t", target, cause="test", fields={"amount_refunded": 100}
        )
        record = await store.get("sb_t")
        assert record is not None
        if target in TRANSITIONS[source]:
            assert result.outcome in {TransitionOutcome.APPLIED, TransitionOutcome.UNCHANGED}
            assert record.status == target
        elif target == source:
            assert result.outcome is TransitionOutcome.UNCHANGED
        else:
            assert result.outcome is TransitionOutcome.REJECTED
            assert record.status == source

    async def test_paid_never_goes_back(self, store: PaymentStore) -> None:
        await store.create(_record("sb_p"))
        await store.transition("sb_p", S.SUCCEEDED, cause="verify")
        for late in (S.PENDING, S.FAILED, S.CANCELED, S.EXPIRED, S.PROCESSING, S.CREATED):
            result = await store.transition("sb_p", late, cause="late webhook")
            assert result.outcome is TransitionOutcome.REJECTED
        record = await store.get("sb_p")
        assert record is not None and record.status is S.SUCCEEDED and record.paid_at

    async def test_an_event_applies_once(self, store: PaymentStore) -> None:
        await store.create(_record("sb_e"))
        first = await store.transition("sb_e", S.SUCCEEDED, cause="webhook", event_id="evt_1")
        again = await store.transition("sb_e", S.SUCCEEDED, cause="webhook", event_id="evt_1")
        assert (first.outcome, again.outcome) == (
            TransitionOutcome.APPLIED,
            TransitionOutcome.DUPLICATE,
        )
        assert len(await store.history("sb_e")) == 2

    async def test_concurrent_transitions_have_one_winner(self, store: PaymentStore) -> None:
        await store.create(_record("sb_c"))
        targets = [S.SUCCEEDED, S.FAILED, S.CANCELED, S.EXPIRED] * 10
        results = await asyncio.gather(
            *(store.transition("sb_c", t, cause="race") for t in targets)
        )
        applied = [r for r in results if r.outcome is TransitionOutcome.APPLIED]
        history = await store.history("sb_c")
        # Each applied move, and only those, is in the history, as one legal chain: at most
        # pending -> failed/canceled/expired -> succeeded.
        assert len(history) == 1 + len(applied)
        assert 1 <= len(applied) <= 2
        for before, after in pairwise(history):
            assert after.previous == before.status
            assert after.status in TRANSITIONS[before.status]

    async def test_missing_payment(self, store: PaymentStore) -> None:
        result = await store.transition("sb_none", S.SUCCEEDED, cause="x")
        assert result.outcome is TransitionOutcome.MISSING

    async def test_create_is_once(self, store: PaymentStore) -> None:
        assert await store.create(_record("sb_once"))
        assert not await store.create(_record("sb_once", S.SUCCEEDED))
        record = await store.get("sb_once")
        assert record is not None and record.status is S.PENDING
        assert (await store.find_by_reference("sandbox", "ord_sb_once")) == record
        mapping = await store.lookup_mapping("sandbox", "payment", external_id="sb_once")
        assert mapping is not None and mapping.local_id == "ord_sb_once"

    async def test_fields_round_trip_whatever_their_characters(self, store: PaymentStore) -> None:
        record = _record("sb_utf8").model_copy(
            update={
                "customer_email": "zoë@exämple.org",
                "return_url": 'https://shop.example/ok?q="x"&r=\\u00e9 ☃ 🎉',
            }
        )
        assert await store.create(record)
        assert await store.get("sb_utf8") == record


class TestCreate:
    """The payment, its mapping, the idempotency answer and the reconciliation entry: one
    round trip on a standalone Redis, the payment first on a cluster."""

    async def test_stores_all_four(self, store: PaymentStore) -> None:
        record = _record("sb_all")
        assert (await store.idempotency_begin("create", "k1", "fp")).state is IdempotencyState.NEW
        answer = IdempotencyAnswer("create", "k1", {"payment_id": "sb_all"})
        assert await store.create(record, idempotency=answer, reconcile_after_s=60)
        assert await store.get("sb_all") == record
        assert await store.find_by_reference("sandbox", "ord_sb_all") == record
        replay = await store.idempotency_begin("create", "k1", "fp")
        assert (replay.state, replay.response) == (IdempotencyState.DONE, {"payment_id": "sb_all"})
        due = await store.reconcile_due_at("sb_all")
        assert due == pytest.approx(record.created_at.timestamp() + 60)

    async def test_after_redis_lost_its_scripts(
        self, store: PaymentStore, redis: RedisClient
    ) -> None:
        """A restart or a failover empties Redis's script cache: the scripts sent by digest
        are loaded again, and nothing of the batch is lost or stored twice."""
        await store.create(_record("sb_before"))
        await store.idempotency_begin("create", "k2", "fp")
        await redis.script_flush()
        answer = IdempotencyAnswer("create", "k2", {"payment_id": "sb_after"})
        assert await store.create(_record("sb_after"), idempotency=answer, reconcile_after_s=5)
        assert (await store.get("sb_after")) is not None
        assert (await store.idempotency_begin("create", "k2", "fp")).response == {
            "payment_id": "sb_after"
        }
        assert await store.find_by_reference("sandbox", "ord_sb_after") is not None
        assert await store.reconcile_due_at("sb_after") is not None
        assert len(await store.history("sb_after")) == 1
        await redis.script_flush()
        assert not await store.create(_record("sb_after"))  # still once

    async def test_by_digest_with_nothing_else_on_a_standalone_redis(
        self, redis_server: RedisServer
    ) -> None:
        """No SCRIPT EXISTS before the batch (redis-py's pipelines ask it, a round trip of
        its own) and no script source: once the scripts are cached, the batch is all."""
        redis_server.flush()
        client = redis_client(redis_server.url, cluster=False, timeout_s=2.0)
        store = PaymentStore(client, prefix="unit:")
        try:
            await store.create(_record("sb_warm"))  # Redis learns the scripts
            await store.idempotency_begin("create", "k3", "fp")
            await client.config_resetstat()
            answer = IdempotencyAnswer("create", "k3", {"payment_id": "sb_one"})
            await store.create(_record("sb_one"), idempotency=answer, reconcile_after_s=60)
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        calls = {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in stats.items()}
        assert calls["evalsha"] == 3  # the payment, its mapping, the answer
        # The reconciliation queue, then the search indexes of every payment and the
        # provider's (this payment has no owner).
        assert calls["zadd"] == 3
        assert not {"eval", "script|exists", "script|load"} & set(calls)

    async def test_an_open_payment_only_is_queued(self, store: PaymentStore) -> None:
        await store.create(_record("sb_paid", S.SUCCEEDED), reconcile_after_s=60)
        assert await store.reconcile_due_at("sb_paid") is None


class TestOutOfReach:
    @pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
    async def test_is_store_unavailable(self, cluster: bool) -> None:
        """A Redis (or every node of a cluster) that does not answer is a 503, not a 500."""
        client = redis_client(f"redis://127.0.0.1:{free_port()}/0", cluster=cluster, timeout_s=0.2)
        store = PaymentStore(client, prefix="unit:")
        try:
            with pytest.raises(StoreUnavailable):
                await store.get("sb_x")
            with pytest.raises(StoreUnavailable):
                await store.create(_record("sb_x"), reconcile_after_s=60)
        finally:
            await client.aclose()


class TestRefundRecords:
    """A refund reserves its amount when asked for; only succeeded refunds count as refunded;
    the payment's status follows them forwards only."""

    async def _begin(self, store: PaymentStore, refund_id: str, amount: int | None) -> RefundBegin:
        return await store.begin_refund(
            "sb_f",
            refund_id=refund_id,
            provider="sandbox",
            amount=amount,
            currency="EUR",
            reason=None,
            cause="test",
        )

    async def test_pending_reserves_and_only_success_counts(self, store: PaymentStore) -> None:
        await store.create(_record("sb_f", S.SUCCEEDED))
        first = await self._begin(store, "rf_1", 2000)
        assert first.outcome is RefundBeginOutcome.CREATED
        over = await self._begin(store, "rf_2", 1000)
        assert (over.outcome, over.left) == (RefundBeginOutcome.EXCEEDS, 900)
        record = await store.get("sb_f")
        assert record is not None
        assert (record.status, record.amount_refunded, record.amount_pending_refund) == (
            S.SUCCEEDED,
            0,
            2000,
        )
        done = await store.apply_refund(
            "sb_f", status=RefundStatus.SUCCEEDED, cause="t", refund_id="rf_1"
        )
        assert done.outcome is TransitionOutcome.APPLIED
        record = await store.get("sb_f")
        assert record is not None
        assert (record.status, record.amount_refunded, record.amount_pending_refund) == (
            S.PARTIALLY_REFUNDED,
            2000,
            0,
        )
        rest = await self._begin(store, "rf_3", None)  # all that is left
        assert rest.refund is not None and rest.refund.amount == 900
        await store.apply_refund("sb_f", status=RefundStatus.SUCCEEDED, cause="t", refund_id="rf_3")
        record = await store.get("sb_f")
        assert record is not None and (record.status, record.amount_refunded) == (S.REFUNDED, 2900)
        assert [h.status for h in await store.history("sb_f")] == [
            S.SUCCEEDED,
            S.PARTIALLY_REFUNDED,
            S.REFUNDED,
        ]

    async def test_failed_gives_the_balance_back_and_never_regresses(
        self, store: PaymentStore
    ) -> None:
        await store.create(_record("sb_f", S.SUCCEEDED))
        await self._begin(store, "rf_1", 2900)
        failed = await store.apply_refund(
            "sb_f", status=RefundStatus.FAILED, cause="t", refund_id="rf_1", failure_code="x"
        )
        assert failed.refund is not None and failed.refund.failure_code == "x"
        late = await store.apply_refund(
            "sb_f", status=RefundStatus.SUCCEEDED, cause="late", refund_id="rf_1"
        )
        assert late.outcome is TransitionOutcome.REJECTED
        record = await store.get("sb_f")
        assert record is not None
        assert (record.status, record.amount_refunded, record.amount_pending_refund) == (
            S.SUCCEEDED,
            0,
            0,
        )
        assert [h.status for h in await store.refund_history("sb_f", "rf_1")] == [
            RefundStatus.PENDING,
            RefundStatus.FAILED,
        ]

    async def test_same_id_is_one_refund_and_events_apply_once(self, store: PaymentStore) -> None:
        await store.create(_record("sb_f", S.SUCCEEDED))
        assert (await self._begin(store, "rf_1", 500)).outcome is RefundBeginOutcome.CREATED
        assert (await self._begin(store, "rf_1", 500)).outcome is RefundBeginOutcome.EXISTS
        kwargs = {"status": RefundStatus.SUCCEEDED, "cause": "w", "event_id": "evt_1"}
        first = await store.apply_refund(
            "sb_f", refund_id="rf_1", provider_refund_id="re_1", **kwargs
        )  # type: ignore[arg-type]
        again = await store.apply_refund("sb_f", provider_refund_id="re_1", **kwargs)  # type: ignore[arg-type]
        assert (first.outcome, again.outcome) == (
            TransitionOutcome.APPLIED,
            TransitionOutcome.DUPLICATE,
        )
        record = await store.get("sb_f")
        assert record is not None and record.amount_refunded == 500

    async def test_concurrent_refunds_never_exceed_the_payment(self, store: PaymentStore) -> None:
        await store.create(_record("sb_f", S.SUCCEEDED))
        results = await asyncio.gather(*(self._begin(store, f"rf_{i}", 1000) for i in range(20)))
        created = [r for r in results if r.outcome is RefundBeginOutcome.CREATED]
        assert len(created) == 2
        record = await store.get("sb_f")
        assert record is not None and record.amount_pending_refund == 2000

    async def test_a_refund_never_sent_is_forgotten(self, store: PaymentStore) -> None:
        await store.create(_record("sb_f", S.SUCCEEDED))
        await self._begin(store, "rf_1", 2900)
        assert await store.discard_refund("sb_f", "rf_1")
        record = await store.get("sb_f")
        assert record is not None and record.amount_pending_refund == 0
        assert await store.refunds("sb_f") == []


class TestKeptDocumentNumbers:
    """A receipt's number kept on its payment, a credit note's on its refund: the first kept
    stays, the same again is harmless, and nothing is kept for what does not exist."""

    async def test_on_the_payment(self, store: PaymentStore) -> None:
        await store.create(_record("sb_n", S.SUCCEEDED))
        assert await store.keep_receipt_number("sb_n", "R-2026-000007") == "R-2026-000007"
        assert await store.keep_receipt_number("sb_n", "R-2026-000007") == "R-2026-000007"
        assert await store.keep_receipt_number("sb_n", "R-2026-000008") == "R-2026-000007"
        record = await store.get("sb_n")
        assert record is not None and record.receipt_number == "R-2026-000007"
        # A later transition leaves it alone.
        await store.transition("sb_n", S.PARTIALLY_REFUNDED, cause="test")
        record = await store.get("sb_n")
        assert record is not None and record.receipt_number == "R-2026-000007"
        # No stub of a payment that is not there.
        assert await store.keep_receipt_number("sb_gone", "R-2026-000009") is None
        assert await store.get("sb_gone") is None

    async def test_on_the_refund(self, store: PaymentStore) -> None:
        await store.create(_record("sb_n", S.SUCCEEDED))
        await store.begin_refund(
            "sb_n",
            refund_id="rf_1",
            provider="sandbox",
            amount=900,
            currency="EUR",
            reason=None,
            cause="test",
        )
        await store.apply_refund("sb_n", status=RefundStatus.SUCCEEDED, cause="t", refund_id="rf_1")
        assert await store.keep_credit_note_number("sb_n", "rf_1", "CN-2026-000003") == (
            "CN-2026-000003"
        )
        assert await store.keep_credit_note_number("sb_n", "rf_1", "CN-2026-000004") == (
            "CN-2026-000003"
        )
        # The refund's later changes keep it (a vendor failing a refund it called succeeded).
        failed = await store.apply_refund(
            "sb_n", status=RefundStatus.FAILED, cause="t", refund_id="rf_1"
        )
        assert failed.refund is not None and failed.refund.credit_note_number == "CN-2026-000003"
        [refund] = await store.refunds("sb_n")
        assert (refund.status, refund.amount, refund.credit_note_number) == (
            RefundStatus.FAILED,
            900,
            "CN-2026-000003",
        )
        assert await store.keep_credit_note_number("sb_n", "rf_none", "CN-2026-000005") is None
        assert [r.refund_id for r in await store.refunds("sb_n")] == ["rf_1"]

    async def test_on_a_refund_adopted_from_the_provider(self, store: PaymentStore) -> None:
        """An adopted refund's record is written whole, its number null until one is kept."""
        await store.create(_record("sb_n", S.SUCCEEDED))
        now = datetime.now(UTC)
        adopt = RefundRecord(
            refund_id="rf_adopted",
            payment_id="sb_n",
            provider="sandbox",
            provider_refund_id="re_9",
            amount=400,
            currency="EUR",
            status=RefundStatus.PENDING,
            created_at=now,
            updated_at=now,
        )
        await store.apply_refund(
            "sb_n",
            status=RefundStatus.SUCCEEDED,
            cause="t",
            provider_refund_id="re_9",
            adopt=adopt,
        )
        assert await store.keep_credit_note_number("sb_n", "rf_adopted", "CN-2026-000001") == (
            "CN-2026-000001"
        )
        [refund] = await store.refunds("sb_n")
        assert refund.credit_note_number == "CN-2026-000001"


class TestConnectionPool:
    async def test_more_concurrent_commands_than_connections_wait_their_turn(
        self, redis_server: RedisServer
    ) -> None:
        """redis-py's default pool fails the 101st concurrent command; ours waits."""
        client = redis_client(redis_server.url, cluster=False, timeout_s=2.0, max_connections=2)
        try:
            answers = await asyncio.gather(*(client.ping() for _ in range(50)))
        finally:
            await client.aclose()
        assert answers == [True] * 50
