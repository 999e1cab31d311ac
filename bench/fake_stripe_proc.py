"""A canned Stripe for the provider-latency bench, as a server process of its own.

``python -m uvicorn bench.fake_stripe_proc:create_app --factory`` with the bench's server flags
(uvloop, httptools, no access log; see bench/procs.py), one worker. Started and stopped by
``providers.fake_stripe``.

It measures nothing of its own: ``POST /v1/checkout/sessions`` reads the request, waits
``BENCH_FAKE_STRIPE_LATENCY_MS`` and answers 200 with a canned Checkout Session (Stripe's own
sample object from ``fixtures3.json``, rendered once at start-up) under a fresh ``cs_test_``
ID, so that every payment the service stores is a new one. Nothing is checked against
Stripe's API description: that is the tests' job (tests/fakes/stripe_server.py, which the
test suite runs behind the same SDK client); here it would be the fake's CPU, on the same two
cores, that the bench measured. Any other path answers Stripe's 404 envelope at once.

Besides, without delay:

- ``GET /_bench/health``: 200;
- ``GET /_bench/session-body``: the raw body of the first Checkout Session create it received
  (404 before that), which the bench replays to load the fake directly (its ceiling).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import time
from typing import Any

LATENCY_ENV = "BENCH_FAKE_STRIPE_LATENCY_MS"
CONTROL = "/_bench/"
SESSIONS = "/v1/checkout/sessions"
_ID_MARK = "cs_test_BENCH_ID_MARK"
_NOT_FOUND = json.dumps(
    {
        "error": {
            "type": "invalid_request_error",
            "message": "Unrecognized request URL. The bench's fake Stripe answers only "
            "POST /v1/checkout/sessions.",
        }
    }
).encode()


def _canned_session() -> tuple[bytes, bytes]:
    """Stripe's sample Checkout Session, open and unpaid, split where its ID goes."""
    from tests.fakes.stripe_spec import load_fixtures

    session: dict[str, Any] = dict(load_fixtures()["checkout.session"])
    now = int(time.time())
    session.update(
        {
            "id": _ID_MARK,
            "amount_subtotal": 2900,
            "amount_total": 2900,
            "currency": "eur",
            "created": now,
            "expires_at": now + 24 * 3600,
            "metadata": {"reference": "ord_canned", "plan": "pro"},
            "mode": "payment",
            "payment_intent": None,
            "payment_status": "unpaid",
            "status": "open",
            "ui_mode": "hosted",
            "url": f"https://checkout.stripe.com/c/pay/{_ID_MARK}",
        }
    )
    before, after = json.dumps(session, indent=2).split(_ID_MARK, 1)
    # The ID appears twice (id, url): the second is filled in by the same join.
    return before.encode(), after.encode()


class CannedStripe:
    """ASGI app: every Checkout Session create answered ``latency_s`` after its request."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.session_body: bytes | None = None
        head, tail = _canned_session()
        self._head = head
        self._tail_parts = tail.split(_ID_MARK.encode())
        self._ids = itertools.count()
        # A prefix of this process's own, so that no two runs hand out the same ID.
        self._run = secrets.token_hex(6)

    def _session(self) -> bytes:
        session_id = f"cs_test_a1{self._run}{next(self._ids):034d}".encode()
        return self._head + session_id + session_id.join(self._tail_parts)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path.startswith(CONTROL):
            await self._control(scope, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] != "POST" or path != SESSIONS:
            await _answer(send, 404, _NOT_FOUND)
            return
        if self.session_body is None:
            self.session_body = body
        await asyncio.sleep(self.latency_s)
        # uvicorn drops an answer to a client that has gone (wrk closes its connections, calls
        # in flight included, when a run ends).
        await _answer(
            send, 200, self._session(), [(b"request-id", b"req_" + secrets.token_hex(7).encode())]
        )

    async def _control(self, scope: Any, send: Any) -> None:
        name = scope["path"][len(CONTROL) :]
        if scope["method"] != "GET":
            await _answer(send, 405, b"GET only", kind=b"text/plain")
        elif name == "health":
            await _answer(send, 200, b"ok", kind=b"text/plain")
        elif name == "session-body" and self.session_body is not None:
            await _answer(send, 200, self.session_body, kind=b"application/x-www-form-urlencoded")
        else:
            await _answer(send, 404, b"not found", kind=b"text/plain")


async def _answer(
    send: Any,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    kind: bytes = b"application/json",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", kind),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app() -> CannedStripe:
    """The uvicorn factory, configured from the environment."""
    return CannedStripe(int(os.environ[LATENCY_ENV]) / 1000)
