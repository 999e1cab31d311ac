"""A short path to Redis for the requests on the hot path.

redis-py spends about two hundred Python calls on each command it sends (argument encoding,
the pipeline's command stack, retry and observability wrappers, reply callbacks): a third of
a create-intent's CPU went there. Here a batch of commands is packed into one RESP buffer by
a few lines of code, sent on a connection borrowed from redis-py's own pool, and the replies
are read by redis-py's parser (hiredis). Connecting, authentication, TLS, timeouts, health
checks and the decoding of replies stay redis-py's.

A connection is handed back to the pool only after every reply of its batch has been read;
any other outcome (a timeout, a dropped connection, a cancelled request) disconnects it, so
that no later batch can read a reply meant for this one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

Arg = str | bytes | int
Command = Sequence[Arg]


def eval_command(script: str, keys: Sequence[str], *args: Arg) -> Command:
    """EVAL of ``script`` with ``keys`` and ``args``. EVAL, not EVALSHA: Redis caches scripts
    by their digest anyway, and an EVALSHA that met an empty script cache would fail in the
    middle of a batch whose later commands still ran."""
    return ["EVAL", script, len(keys), *keys, *args]


def pack(commands: Sequence[Command]) -> bytes:
    """``commands`` as one RESP buffer: each an array of bulk strings (UTF-8)."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):  # enum members too: their values
                data = arg.encode()
            elif isinstance(arg, bytes):
                data = arg
            elif isinstance(arg, int) and not isinstance(arg, bool):
                data = b"%d" % arg
            else:
                raise TypeError(f"cannot send {type(arg).__name__} to Redis")
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class RedisWire:
    """Batches of commands on ``redis``'s connection pool.

    Meant for a client of its own created with ``socket_timeout=None`` and a ``timeout_s``:
    each batch (taking a connection, the send and every reply) then has one deadline, where
    redis-py starts a task for every send and a timer for every reply. With a client that has
    a ``socket_timeout``, its limits apply as well.
    """

    def __init__(self, redis: Redis, *, timeout_s: float | None = None) -> None:
        self.redis = redis
        self.timeout_s = timeout_s

    async def execute(self, *commands: Command) -> list[Any]:
        """Send ``commands`` in one write and return their replies, in order.

        Redis runs them in order on one connection, but not atomically (a script does that).
        An error reply raises ``ResponseError`` once every reply has been read: the commands
        after it ran all the same, as in a redis-py pipeline. Connection trouble raises
        redis-py's ``ConnectionError``, the deadline ``TimeoutError``. Nothing is retried: a
        command that reached Redis before the connection broke may have run.
        """
        packed = pack(commands)
        pool = self.redis.connection_pool
        replies: list[Any] = []
        error: ResponseError | None = None
        async with asyncio.timeout(self.timeout_s):
            # get_connection gives the connection back itself if connecting fails.
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.send_packed_command(packed)
                for _ in commands:
                    try:
                        replies.append(await connection.read_response())
                    except ResponseError as exc:  # read whole: the connection is in step
                        replies.append(exc)
                        error = error or exc
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            finally:
                await pool.release(connection)
        if error is not None:
            raise error
        return replies

    async def aclose(self) -> None:
        await self.redis.aclose()


def as_dict(reply: Any) -> dict[str, Any]:
    """An HGETALL reply as a dict: RESP2 answers a flat list of fields and values, RESP3 a
    map."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))
