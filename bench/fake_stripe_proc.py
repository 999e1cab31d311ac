"""The fake Stripe of tests/fakes/ as a server process of its own, for the provider benchmarks.

``python -m uvicorn bench.fake_stripe_proc:create_app --factory`` with the bench's server flags
(uvloop, httptools, no access log; see bench/procs.py), one worker: the fake keeps its state in
memory, so one process must see every call. Started and stopped by ``providers.fake_stripe``.

Every answer is delayed by ``BENCH_FAKE_STRIPE_LATENCY_MS``; the API key is
``BENCH_FAKE_STRIPE_API_KEY``. Besides Stripe's paths, the wrapper answers (without delay, and
without the fake seeing them):

- ``GET /_bench/health``: 200 once the fake is built (the spec is loaded at start-up);
- ``GET /_bench/session-body``: the raw body of the first Checkout Session create it received
  (404 before that), which the bench replays to load the fake directly;
- ``GET /_bench/violations``: ``{"count": n, "first": [...]}``, the requests the fake found
  outside Stripe's API description.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
from typing import Any

from starlette.requests import ClientDisconnect

LATENCY_ENV = "BENCH_FAKE_STRIPE_LATENCY_MS"
API_KEY_ENV = "BENCH_FAKE_STRIPE_API_KEY"
CONTROL = "/_bench/"


class _Slow:
    """ASGI wrapper: answer every request ``latency_s`` later; keep the first raw body of a
    Checkout Session create; answer the bench's own ``/_bench/`` requests itself."""

    def __init__(self, fake: Any, latency_s: float) -> None:
        self.fake = fake
        self.app = fake.app
        self.latency_s = latency_s
        self.session_body: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(CONTROL):
            await self._control(scope, send)
            return
        await asyncio.sleep(self.latency_s)
        try:
            if self.session_body is None and scope["path"] == "/v1/checkout/sessions":
                message = await receive()
                self.session_body = message.get("body", b"")
                replay = [message]

                async def replayed() -> Any:
                    return replay.pop() if replay else await receive()

                await self.app(scope, replayed, send)
                return
            await self.app(scope, receive, send)
        except ClientDisconnect:
            # wrk drops its connections when a run ends, requests in flight included: nobody
            # is left to answer, and the server would log a traceback for each of them.
            pass

    async def _control(self, scope: Any, send: Any) -> None:
        name = scope["path"][len(CONTROL) :]
        status, body, kind = 404, b"not found", b"text/plain"
        if scope["method"] != "GET":
            status, body = 405, b"GET only"
        elif name == "health":
            status, body = 200, b"ok"
        elif name == "session-body" and self.session_body is not None:
            status, body, kind = 200, self.session_body, b"application/x-www-form-urlencoded"
        elif name == "violations":
            violations = list(self.fake.violations)
            status, kind = 200, b"application/json"
            body = json.dumps(
                {"count": len(violations), "first": [str(v) for v in violations[:20]]}
            ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app() -> _Slow:
    """The uvicorn factory: the fake, wrapped, configured from the environment."""
    from tests.fakes.stripe_server import FakeStripe

    fake = FakeStripe(api_key=os.environ[API_KEY_ENV])
    # Stripe's API description, loaded above, is some 70,000 objects that live as long as the
    # process: out of the collector's way, full collections under load cost much less.
    gc.collect()
    gc.freeze()
    return _Slow(fake, int(os.environ[LATENCY_ENV]) / 1000)
