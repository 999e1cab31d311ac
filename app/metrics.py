"""Metrics over HTTP: every request counted and timed by its route, a request id on every
answer and log line, and the Prometheus text at /metrics (for admins on the API's port, and
without a token on METRICS_PORT, which should be bound to a private address)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Gauge,
    generate_latest,
    multiprocess,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logging import REQUEST_ID
from services.metrics import HTTP_LATENCY, HTTP_REQUESTS
from services.provider_admin import LiveFigures

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class RequestMetrics:
    """Pure ASGI: count and time each request by its route template (never its raw path,
    which would make a metric per payment id), and give it a request id: the caller's
    ``X-Request-ID`` when it is a sane one, else ours, echoed on the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(route, method, str(status)).inc()
            HTTP_LATENCY.labels(route, method).observe(time.perf_counter() - started)
            REQUEST_ID.reset(token)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = str(value.decode("latin-1"))
            if _REQUEST_ID.fullmatch(given):
                return given
            break
    return secrets.token_hex(8)


def render(live: LiveFigures) -> bytes:
    """The Prometheus text: every worker's figures (multiprocess mode) or this process's,
    then the figures read from Redis just now."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        recorded = CollectorRegistry()
        multiprocess.MultiProcessCollector(recorded)  # type: ignore[no-untyped-call]
    else:
        recorded = REGISTRY
    now = CollectorRegistry()
    breaker = Gauge(
        "payments_breaker_state",
        "Each provider's circuit breaker: 0 closed, 1 half-open (probing), 2 open",
        ["provider"],
        registry=now,
    )
    for provider, state in live.breakers.items():
        breaker.labels(provider).set(_BREAKER_VALUES.get(state, 2))
    backlog = Gauge(
        "payments_reconciler_backlog",
        "Payments waiting to be verified again (queued), and those due now (due)",
        ["kind"],
        registry=now,
    )
    backlog.labels("queued").set(live.queued)
    backlog.labels("due").set(live.due)
    return generate_latest(recorded) + generate_latest(now)


def metrics_response(body: bytes) -> Response:
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


class _InnerServer(uvicorn.Server):
    """A server inside the app's worker: the worker's own server handles the signals (and
    stops this one from the app's lifespan). Left to itself, this one would take SIGTERM over
    and end the worker without the app's graceful shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_metrics_port(
    host: str, port: int, figures: Callable[[], Awaitable[LiveFigures]]
) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """/metrics without a token on ``host:port``, from this worker. Every worker binds the
    port with SO_REUSEPORT and any of them answers for all (multiprocess mode), so that
    several workers never fight over it."""

    async def endpoint(_request: Request) -> Response:
        return metrics_response(render(await figures()))

    app = Starlette(routes=[Route("/metrics", endpoint)])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    server = _InnerServer(
        # No logging set-up of its own: it would reconfigure the worker's uvicorn loggers.
        uvicorn.Config(app, log_config=None, log_level=None, access_log=False, lifespan="off")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    return server, task
