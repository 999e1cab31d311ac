"""The sandbox's record beside the payment: what the store writes with the payment and reads
back with it must give the same truth as asking the sandbox, on a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from models.payment import PaymentRecord, PaymentStatus, Plan, RefundStatus
from services.errors import PaymentNotFound, ProviderNotConfigured
from services.payment_providers.base import IntentRequest, PaymentState
from services.payment_providers.sandbox import SandboxProvider
from services.payment_store import PaymentStore
from tests.conftest import RedisServer

PREFIX = "local:"


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis_server.flush()
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


def _request(key: str) -> IntentRequest:
    return IntentRequest(
        reference=f"ord_{key}",
        plan=Plan(code="pro", name="Pro", amount=2900, currency="EUR"),
        idempotency_key=key,
        base_url="http://testserver/",
    )


async def _created(sandbox: SandboxProvider, store: PaymentStore, key: str) -> str:
    result = await sandbox.create_payment_intent(_request(key))
    assert result.local_record is not None
    assert result.local_record.key == sandbox.local_record_key(result.payment_id)
    now = datetime.now(UTC)
    record = PaymentRecord(
        payment_id=result.payment_id,
        provider="sandbox",
        reference=f"ord_{key}",
        plan="pro",
        amount=2900,
        currency="EUR",
        status=result.status,
        created_at=now,
        updated_at=now,
    )
    assert await store.create(record, local_record=result.local_record)
    return result.payment_id


async def _local_state(
    sandbox: SandboxProvider, store: PaymentStore, payment_id: str
) -> PaymentState:
    key = sandbox.local_record_key(payment_id)
    _, fields = await store.get_with_local_record(payment_id, key)
    return sandbox.state_from_local_record(payment_id, fields)


async def test_the_record_read_with_the_payment_says_what_the_sandbox_says(redis: Redis) -> None:
    sandbox = SandboxProvider(redis, key_prefix=PREFIX, enabled=True)
    store = PaymentStore(redis, prefix=PREFIX)
    payment_id = await _created(sandbox, store, "k1")
    found, fields = await store.get_with_local_record(
        payment_id, sandbox.local_record_key(payment_id)
    )
    assert found is not None and found.payment_id == payment_id
    assert fields["status"] == "open"
    assert await _local_state(sandbox, store, payment_id) == await sandbox.verify_payment(
        payment_id
    )

    await sandbox.settle(payment_id, "succeeded")
    state = await _local_state(sandbox, store, payment_id)
    assert state == await sandbox.verify_payment(payment_id)
    assert state.status is PaymentStatus.SUCCEEDED

    refund = await sandbox.refund(
        payment_id, refund_id="rf_" + "0" * 24, amount=900, currency="EUR", capture_id=None
    )
    assert (refund.amount, refund.status, refund.refund_id) == (
        900,
        RefundStatus.SUCCEEDED,
        "rf_" + "0" * 24,
    )
    state = await _local_state(sandbox, store, payment_id)
    assert state == await sandbox.verify_payment(payment_id)
    # Still paid (PaymentState lets the status say partially refunded; the service takes any
    # paid status as paid): the refund itself lives in the sandbox's refunds hash, not in the
    # record, and is read back through get_refund.
    assert state.status.is_paid
    assert state.refunds is None
    assert await sandbox.get_refund(payment_id, refund.provider_refund_id) == refund


async def test_no_record_is_not_found_either_way(redis: Redis) -> None:
    sandbox = SandboxProvider(redis, key_prefix=PREFIX, enabled=True)
    store = PaymentStore(redis, prefix=PREFIX)
    with pytest.raises(PaymentNotFound):
        await _local_state(sandbox, store, "sb_000000000000000000000000")
    with pytest.raises(PaymentNotFound):
        await sandbox.verify_payment("sb_000000000000000000000000")


async def test_a_disabled_sandbox_answers_nothing_from_its_record(redis: Redis) -> None:
    sandbox = SandboxProvider(redis, key_prefix=PREFIX, enabled=True)
    store = PaymentStore(redis, prefix=PREFIX)
    payment_id = await _created(sandbox, store, "k2")
    production = SandboxProvider(redis, key_prefix=PREFIX, enabled=False)
    with pytest.raises(ProviderNotConfigured):
        await _local_state(production, store, payment_id)
    with pytest.raises(ProviderNotConfigured):
        await production.verify_payment(payment_id)
