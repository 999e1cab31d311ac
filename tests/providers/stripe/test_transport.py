"""The provider's own HTTP client under the SDK: which broken connections leave a call's
outcome unknown, and that connections are kept for the next call. Against a loopback server
that speaks just enough HTTP/1.1 to break in the ways a real network does."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Literal

import pytest

from services.errors import ProviderUnavailable
from services.payment_providers.resilience import NO_RETRY
from services.payment_providers.stripe import StripeProvider
from tests.fakes.server import free_port
from tests.providers.stripe.conftest import MakeProvider, intent_request

Behaviour = Literal["answer", "drop_before_answer", "drop_mid_answer", "hang"]

BALANCE = json.dumps(
    {"object": "balance", "available": [], "pending": [], "livemode": False}
).encode()


class LoopbackServer:
    """Reads each request whole, then answers it with a balance, or drops the connection
    before or halfway through the answer, or never answers."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.requests: list[bytes] = []
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> LoopbackServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Connections the client keeps open are closed here, and their handlers awaited, so
        # that nothing is left running when the test's event loop ends.
        self._released.set()
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the connection was closed while kept for another request
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                self.requests.append(head + await reader.readexactly(length))
                if self.behaviour == "drop_before_answer":
                    return
                if self.behaviour == "hang":
                    await self._released.wait()
                    return
                head_out = (
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"request-id: req_loopback\r\ncontent-length: %d\r\n\r\n" % len(BALANCE)
                )
                if self.behaviour == "drop_mid_answer":
                    writer.write(head_out + BALANCE[: len(BALANCE) // 2])
                    await writer.drain()
                    return
                writer.write(head_out + BALANCE)
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def provider_for(make_provider: MakeProvider, server: LoopbackServer) -> StripeProvider:
    return make_provider(
        retry_policy=NO_RETRY, stripe_api_base=server.url, provider_timeout_seconds=0.3
    )


class TestConnectionLostMidRequest:
    @pytest.mark.parametrize("behaviour", ["drop_before_answer", "drop_mid_answer"])
    async def test_a_create_whose_answer_was_lost_has_an_unknown_outcome(
        self, make_provider: MakeProvider, behaviour: Behaviour
    ) -> None:
        async with LoopbackServer(behaviour) as server:
            provider = provider_for(make_provider, server)
            with pytest.raises(ProviderUnavailable) as caught:
                await provider.create_payment_intent(intent_request())
        assert caught.value.outcome_unknown  # Stripe got the whole request: it may have acted
        (request,) = server.requests
        assert request.startswith(b"POST /v1/checkout/sessions ")
        assert b"mode=payment" in request  # the SDK's form body went out whole


class TestReadTimeout:
    async def test_a_create_that_is_never_answered_has_an_unknown_outcome(
        self, make_provider: MakeProvider
    ) -> None:
        async with LoopbackServer("hang") as server:
            provider = provider_for(make_provider, server)
            with pytest.raises(ProviderUnavailable) as caught:
                await provider.create_payment_intent(intent_request())
        assert caught.value.outcome_unknown
        assert len(server.requests) == 1


class TestNothingSent:
    async def test_a_create_with_nothing_listening_is_known_not_sent(
        self, make_provider: MakeProvider
    ) -> None:
        provider = make_provider(stripe_api_base=f"http://127.0.0.1:{free_port()}")
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.create_payment_intent(intent_request())
        assert not caught.value.outcome_unknown  # refused before a byte was sent: safe elsewhere


class TestConnectionReuse:
    async def test_calls_in_turn_share_one_connection(self, make_provider: MakeProvider) -> None:
        async with LoopbackServer("answer") as server:
            provider = provider_for(make_provider, server)
            for _ in range(5):
                assert (await provider.health_check()).healthy
        assert len(server.requests) == 5
        assert server.connections == 1
