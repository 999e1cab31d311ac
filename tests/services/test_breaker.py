"""The circuit breaker on a real redis-server: its half-open probe always resolves, it trips on
a failure rate (not a count), and two workers on the same key see one breaker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.errors import (
    InvalidStateTransition,
    InvalidWebhookSignature,
    OperationNotSupported,
    PaymentDeclined,
    PaymentNotFound,
    ProviderMisconfigured,
    ProviderUnavailable,
    ProviderUpstreamError,
)
from services.payment_providers.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from tests.conftest import RedisServer, make_settings
from tests.fakes.server import free_port

KEY = "unit:breaker:{sandbox}"
# Opens after four calls that mostly fail; half-open 50 ms later. The probe timeout is long on
# purpose: a test that passes never waits for it.
QUICK = BreakerPolicy(
    min_calls=4, failure_ratio=0.5, window_s=30.0, cooldown_s=0.05, probe_timeout_s=30.0
)

Operation = Callable[[], Awaitable[str]]


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis_server.flush()
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


def worker(redis: Redis, policy: BreakerPolicy = QUICK) -> CircuitBreaker:
    """One worker's breaker for the sandbox; every worker built here shares the same key."""
    return CircuitBreaker(redis, key=KEY, provider="sandbox", policy=policy)


async def answer() -> str:
    return "answered"


def raising(error: BaseException) -> Operation:
    async def operation() -> str:
        raise error

    return operation


def outage() -> ProviderUnavailable:
    return ProviderUnavailable("the vendor is down", provider="sandbox")


async def refused(breaker: CircuitBreaker) -> bool:
    """Whether the breaker refuses a call without running it."""
    ran = False

    async def operation() -> str:
        nonlocal ran
        ran = True
        return "answered"

    try:
        await breaker.call(operation)
    except ProviderUnavailable as error:
        assert not ran and "circuit is open" in error.detail
        assert error.outcome_unknown is False
        return True
    assert ran
    return False


async def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.policy.min_calls):
        with pytest.raises(ProviderUnavailable, match="the vendor is down"):
            await breaker.call(raising(outage()))
    assert await refused(breaker)


async def calls_until_open(
    breaker: CircuitBreaker, operation: Callable[[int], Operation], *, pause_s: float = 0.0
) -> int:
    """Make calls (the n-th runs ``operation(n)``) until the breaker refuses one; how many
    calls it let through."""
    n = 0
    while True:
        try:
            await breaker.call(operation(n))
        except ProviderUnavailable as error:
            if "circuit is open" in error.detail:
                return n
        n += 1
        await asyncio.sleep(pause_s)


async def half_open(breaker: CircuitBreaker) -> None:
    await trip(breaker)
    await asyncio.sleep(breaker.policy.cooldown_s + 0.02)
    assert await breaker.state() is BreakerState.HALF_OPEN


class InFlight:
    """A call that has reached the provider and waits there until the test lets it end."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.reached = asyncio.Event()
        self._answer = asyncio.Event()
        self.task = asyncio.create_task(breaker.call(self._operation))

    async def _operation(self) -> str:
        self.reached.set()
        await self._answer.wait()
        return "answered"

    async def started(self) -> InFlight:
        await asyncio.wait_for(self.reached.wait(), timeout=2)
        return self

    async def finish(self) -> str:
        self._answer.set()
        return await self.task


class TestAProbeThatIsAnsweredCloses:
    @pytest.mark.parametrize(
        "error",
        [
            PaymentDeclined("card declined", provider="sandbox", decline_code="card_declined"),
            InvalidStateTransition("already captured"),
            OperationNotSupported("no refunds here"),
            PaymentNotFound("no such payment at the vendor"),
            InvalidWebhookSignature("bad signature"),
            ProviderMisconfigured("the vendor said 401", provider="sandbox"),
        ],
        ids=lambda error: type(error).__name__,
    )
    async def test_an_error_that_is_an_answer_closes(self, redis: Redis, error: Exception) -> None:
        breaker = worker(redis)
        await half_open(breaker)
        with pytest.raises(type(error)):
            await breaker.call(raising(error))
        assert await breaker.state() is BreakerState.CLOSED
        assert await breaker.call(answer) == "answered"

    async def test_a_result_closes(self, redis: Redis) -> None:
        breaker = worker(redis)
        await half_open(breaker)
        assert await breaker.call(answer) == "answered"
        assert await breaker.state() is BreakerState.CLOSED

    async def test_the_failures_before_it_opened_are_forgotten(self, redis: Redis) -> None:
        breaker = worker(redis)
        await half_open(breaker)
        with pytest.raises(PaymentDeclined):
            await breaker.call(raising(PaymentDeclined(provider="sandbox")))
        # One failure after a recovery is one failure in one call, not the fifth of five.
        with pytest.raises(ProviderUnavailable, match="the vendor is down"):
            await breaker.call(raising(outage()))
        assert await breaker.state() is BreakerState.CLOSED


class TestAProbeThatFailsReopens:
    @pytest.mark.parametrize(
        "error",
        [
            outage(),
            ProviderUpstreamError("502 from the vendor", provider="sandbox"),
            TimeoutError(),
        ],
        ids=lambda error: type(error).__name__,
    )
    async def test_a_technical_failure_opens_it_again(self, redis: Redis, error: Exception) -> None:
        breaker = worker(redis)
        await half_open(breaker)
        with pytest.raises(type(error)):
            await breaker.call(raising(error))
        assert await breaker.state() is BreakerState.OPEN
        assert await refused(breaker)
        # A new cool-down from the failed probe, then a new probe.
        await asyncio.sleep(QUICK.cooldown_s + 0.02)
        assert await breaker.call(answer) == "answered"
        assert await breaker.state() is BreakerState.CLOSED


class TestAProbeWithoutAnAnswerFreesItsSlot:
    async def test_a_cancelled_probe_lets_the_next_call_probe_at_once(self, redis: Redis) -> None:
        breaker = worker(redis)
        await half_open(breaker)
        probe = await InFlight(breaker).started()
        assert await refused(breaker)  # one probe at a time
        probe.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe.task

        # Not closed: nobody heard from the provider. But the next call probes at once, not
        # after the probe timeout (30 s).
        assert await breaker.state() is BreakerState.HALF_OPEN
        second = await InFlight(breaker).started()
        assert await refused(breaker)  # it is the probe, not a call through a closed breaker
        assert await second.finish() == "answered"
        assert await breaker.state() is BreakerState.CLOSED

    async def test_a_probe_ending_in_a_bug_frees_the_slot_too(self, redis: Redis) -> None:
        breaker = worker(redis)
        await half_open(breaker)
        with pytest.raises(KeyError):
            await breaker.call(raising(KeyError("not an answer from the provider")))
        assert await breaker.state() is BreakerState.HALF_OPEN
        assert await breaker.call(answer) == "answered"
        assert await breaker.state() is BreakerState.CLOSED

    async def test_a_stale_probe_cannot_free_a_newer_one(self, redis: Redis) -> None:
        # The first probe outlives the probe timeout; a second probe starts; the first one is
        # cancelled at last. The second still holds the slot.
        breaker = worker(redis, replace(QUICK, probe_timeout_s=0.05))
        await half_open(breaker)
        first = await InFlight(breaker).started()
        await asyncio.sleep(0.07)
        second = await InFlight(breaker).started()
        first.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first.task
        assert await refused(breaker)
        await second.finish()
        assert await breaker.state() is BreakerState.CLOSED


class TestARareFailureNeverOpens:
    async def test_a_busy_provider_failing_one_call_in_a_thousand(self, redis: Redis) -> None:
        policy = BreakerPolicy(min_calls=20, failure_ratio=0.5, window_s=30.0, cooldown_s=0.05)
        # Two workers: one sends its tally with every call, one every cache_s, as in service.
        workers = [worker(redis, replace(policy, cache_s=0.0)), worker(redis, policy)]
        calls = 0
        for n in range(6000):
            # The very first call fails: a window that starts with a failure is no outage.
            operation = raising(outage()) if n % 1000 == 0 else answer
            try:
                await workers[n % 2].call(operation)
            except ProviderUnavailable as error:
                assert "circuit is open" not in error.detail, f"cut off after {n} calls"
            calls += 1
        assert calls == 6000
        assert await workers[0].state() is BreakerState.CLOSED


class TestAHighFailureRateOpens:
    async def test_most_calls_failing_opens_once_there_are_enough_calls(self, redis: Redis) -> None:
        breaker = worker(redis, replace(QUICK, min_calls=20))
        # Two of every three calls fail: well above the ratio.
        opened_after = await calls_until_open(
            breaker, lambda n: answer if n % 3 == 0 else raising(outage())
        )
        assert 20 <= opened_after <= 21
        assert await breaker.state() is BreakerState.OPEN

    async def test_a_busy_provider_that_starts_failing_opens(self, redis: Redis) -> None:
        breaker = worker(redis, replace(QUICK, min_calls=20, window_s=0.3, cache_s=0.0))
        for _ in range(300):
            await breaker.call(answer)
        # The outage: every call fails. The old successes leave the window, and it opens.
        async with asyncio.timeout(2):
            await calls_until_open(breaker, lambda n: raising(outage()), pause_s=0.005)
        assert await breaker.state() is BreakerState.OPEN


class TestFewerThanMinCallsNeverOpens:
    async def test_every_call_failing_but_too_few_calls(self, redis: Redis) -> None:
        breaker = worker(redis, replace(QUICK, min_calls=20))
        for _ in range(19):
            with pytest.raises(ProviderUnavailable, match="the vendor is down"):
                await breaker.call(raising(outage()))
        assert await breaker.state() is BreakerState.CLOSED
        assert await breaker.call(answer) == "answered"

    async def test_failures_that_left_the_window_do_not_count(self, redis: Redis) -> None:
        breaker = worker(redis, replace(QUICK, window_s=0.2))
        for _ in range(QUICK.min_calls - 1):
            with pytest.raises(ProviderUnavailable):
                await breaker.call(raising(outage()))
        await asyncio.sleep(0.25)
        with pytest.raises(ProviderUnavailable, match="the vendor is down"):
            await breaker.call(raising(outage()))
        assert await breaker.state() is BreakerState.CLOSED


class TestTwoWorkersAgree:
    async def test_failures_on_both_add_up_and_both_see_it_open(self, redis: Redis) -> None:
        policy = replace(QUICK, cache_s=0.05, cooldown_s=5.0)
        first, second = worker(redis, policy), worker(redis, policy)
        for n in range(QUICK.min_calls):
            with pytest.raises(ProviderUnavailable, match="the vendor is down"):
                await (first, second)[n % 2].call(raising(outage()))
        assert await refused(second)  # its failure opened it
        # The other one trusts its last look at a closed breaker for cache_s, no longer.
        await asyncio.sleep(policy.cache_s)
        assert await refused(first)

    async def test_successes_on_one_keep_the_others_failures_below_the_ratio(
        self, redis: Redis
    ) -> None:
        policy = replace(QUICK, min_calls=10, cache_s=0.0)
        healthy, failing = worker(redis, policy), worker(redis, policy)
        # Each look at Redis carries the tally since the last: 30 of these 31 are sent.
        for _ in range(31):
            await healthy.call(answer)
        for _ in range(25):
            with pytest.raises(ProviderUnavailable, match="the vendor is down"):
                await failing.call(raising(outage()))
        assert await failing.state() is BreakerState.CLOSED  # 25 failures in 55 calls
        for _ in range(10):
            with pytest.raises(ProviderUnavailable):
                await failing.call(raising(outage()))
        assert await refused(healthy)  # past half: open for both

    async def test_one_probe_for_all_and_its_answer_closes_it_for_all(self, redis: Redis) -> None:
        first, second = worker(redis), worker(redis)
        await half_open(first)
        probe = await InFlight(second).started()
        assert await refused(first)
        await probe.finish()
        assert await first.call(answer) == "answered"


class TestRedisAwayAfterTheCall:
    async def test_the_providers_answer_still_reaches_the_caller(self, tmp_path: Path) -> None:
        # A redis-server of the test's own, stopped while the call is at the provider.
        server = RedisServer(port=free_port(), directory=tmp_path)
        server.start()
        client = Redis.from_url(server.url, decode_responses=True, socket_connect_timeout=0.5)
        try:
            breaker = worker(client)
            await half_open(breaker)

            async def answer_as_redis_goes() -> str:
                server.stop()
                return "answered"

            # The payment exists at the provider: that is what the caller must hear.
            assert await breaker.call(answer_as_redis_goes) == "answered"

            async def fail_as_redis_goes() -> str:
                server.stop()
                raise outage()

            server.start()
            with pytest.raises(ProviderUnavailable, match="the vendor is down"):
                await breaker.call(fail_as_redis_goes)
        finally:
            server.stop()
            await client.aclose()


class TestSettings:
    def test_defaults(self, redis_server: RedisServer, tmp_path: Path) -> None:
        settings = make_settings(redis_server.url, tmp_path)
        assert (settings.breaker_min_calls, settings.breaker_failure_ratio) == (20, 0.5)

    @pytest.mark.parametrize(
        "values",
        [
            {"breaker_min_calls": 0},
            {"breaker_failure_ratio": 0},
            {"breaker_failure_ratio": 1.5},
            {"breaker_failure_ratio": -0.5},
        ],
    )
    def test_bad_values_are_refused_at_start(
        self, values: dict[str, float], redis_server: RedisServer, tmp_path: Path
    ) -> None:
        with pytest.raises(ValueError, match="breaker_"):
            make_settings(redis_server.url, tmp_path, **values)

    def test_the_old_threshold_variable_still_sets_the_minimum_of_calls(
        self, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("BREAKER_FAILURE_THRESHOLD", "5")
        assert make_settings(redis_server.url, tmp_path).breaker_min_calls == 5
        monkeypatch.setenv("BREAKER_MIN_CALLS", "8")
        assert make_settings(redis_server.url, tmp_path).breaker_min_calls == 8
