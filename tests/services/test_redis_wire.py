"""The short path to Redis, on a real redis-server: what goes on the wire, what comes back,
and that a connection never goes back to the pool out of step with its replies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from enum import IntEnum

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from models.payment import PaymentStatus
from services.redis_wire import RedisWire, as_dict, pack
from tests.conftest import RedisServer


class Level(IntEnum):
    HIGH = 3


@pytest.fixture
async def wire(redis_server: RedisServer) -> AsyncIterator[RedisWire]:
    redis_server.flush()
    # As the app builds it: no per-read timeouts, one deadline a batch.
    client = Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=None)
    wire = RedisWire(client, timeout_s=0.5)
    yield wire
    await wire.aclose()


def test_pack_is_resp_arrays_of_bulk_strings() -> None:
    assert pack([("SET", "k", "é"), ("INCRBY", b"n", 42)]) == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\xc3\xa9\r\n"
        b"*3\r\n$6\r\nINCRBY\r\n$1\r\nn\r\n$2\r\n42\r\n"
    )
    assert pack([("SET", "k", "")]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
    # Enum members go as their values.
    assert pack([(PaymentStatus.PENDING, Level.HIGH)]) == pack([("pending", 3)])


@pytest.mark.parametrize("value", [True, 1.5, None, ["a"]])
def test_pack_refuses_what_it_would_have_to_guess(value: object) -> None:
    with pytest.raises(TypeError):
        pack([("SET", "k", value)])  # type: ignore[list-item]


async def test_replies_come_back_decoded_and_in_order(wire: RedisWire) -> None:
    replies = await wire.execute(
        ("HSET", "h", "name", "Zoë", "n", 7),
        ("HGETALL", "h"),
        ("EVAL", "return {KEYS[1], ARGV[1]}", 1, "key\r\nwith crlf", "x" * 100_000),
        ("GET", "missing"),
    )
    assert replies[0] == 2
    assert as_dict(replies[1]) == {"name": "Zoë", "n": "7"}
    assert replies[2] == ["key\r\nwith crlf", "x" * 100_000]
    assert replies[3] is None


async def test_an_error_reply_raises_after_every_reply_is_read(wire: RedisWire) -> None:
    with pytest.raises(ResponseError):
        await wire.execute(("SET", "a", "1"), ("INCR", "a-hash-not"), ("HSET", "a", "f", "v"))
    # The commands after the error ran (as in a pipeline) and the connection is in step.
    pool = wire.redis.connection_pool
    assert await wire.execute(("GET", "a"), ("ECHO", "next")) == ["1", "next"]
    assert len(pool._available_connections) == 1  # kept, not thrown away


async def test_a_timed_out_batch_does_not_leave_its_reply_for_the_next(wire: RedisWire) -> None:
    # BLPOP answers only when something is pushed, long after the wire has given up on it.
    with pytest.raises(TimeoutError):
        await wire.execute(("BLPOP", "queue", 2))
    await wire.redis.rpush("queue", "late")
    assert await wire.execute(("ECHO", "mine")) == ["mine"]
    assert wire.redis.connection_pool._in_use_connections == set()


async def test_a_cancelled_batch_does_not_leave_its_reply_for_the_next(wire: RedisWire) -> None:
    waiting = asyncio.create_task(wire.execute(("BLPOP", "jobs", 2)))
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await wire.redis.rpush("jobs", "late")
    assert await wire.execute(("ECHO", "mine"), ("ECHO", "too")) == ["mine", "too"]


async def test_concurrent_batches_each_get_their_own_replies(wire: RedisWire) -> None:
    async def one(n: int) -> list[object]:
        return await wire.execute(("ECHO", f"a{n}"), ("INCR", f"c{n}"), ("ECHO", f"b{n}"))

    results = await asyncio.gather(*(one(n) for n in range(50)))
    assert results == [[f"a{n}", 1, f"b{n}"] for n in range(50)]


async def test_redis_down_is_a_connection_error() -> None:
    wire = RedisWire(Redis.from_url("redis://127.0.0.1:1/0", decode_responses=True))
    with pytest.raises(RedisConnectionError):
        await wire.execute(("PING",))
    await wire.aclose()


async def test_a_server_that_never_answers_meets_the_deadline() -> None:
    # Accepts connections and reads, never answers: not even redis-py's handshake or a
    # health-check PING can outlast the batch's deadline.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Redis.from_url(
        f"redis://127.0.0.1:{port}/3", socket_timeout=None, health_check_interval=1
    )
    wire = RedisWire(client, timeout_s=0.3)
    try:
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await wire.execute(("PING",))
    finally:
        await wire.aclose()
        server.close()
