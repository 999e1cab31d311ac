"""The service's Prometheus metrics: defined here, once, and recorded where things happen.

With several uvicorn workers, ``payments serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a
fresh directory before the workers start, so that prometheus-client keeps each worker's
figures in files there and any worker's /metrics answers for all of them (multiprocess mode).
Figures that live in Redis (breaker states, the reconciliation backlog) are read from it at
each scrape rather than recorded by whichever worker saw them last.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from prometheus_client import Counter, Histogram

from services.errors import ServiceError

T = TypeVar("T")

# Provider calls last 50 ms to a few seconds; HTTP requests a millisecond to a few seconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HTTP_REQUESTS = Counter(
    "payments_http_requests_total",
    "HTTP requests answered, by route template, method and status",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "payments_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template and method",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)
PROVIDER_CALLS = Counter(
    "payments_provider_calls_total",
    "Calls to providers, by provider, operation and outcome (ok or the error's code)",
    ["provider", "operation", "outcome"],
)
PROVIDER_LATENCY = Histogram(
    "payments_provider_call_duration_seconds",
    "Time a provider call took, retries included, by provider and operation",
    ["provider", "operation"],
    buckets=_LATENCY_BUCKETS,
)
WEBHOOKS_RECEIVED = Counter(
    "payments_webhooks_received_total",
    "Provider webhooks received, by provider and outcome "
    "(applied, unchanged, duplicate, rejected, ignored, or the refusal's code)",
    ["provider", "outcome"],
)
WEBHOOK_DELIVERIES = Counter(
    "payments_webhook_deliveries_total",
    "Attempts to deliver events to the merchant's endpoints, by outcome "
    "(succeeded, retry, failed: given up)",
    ["outcome"],
)
RECEIPT_RENDER = Histogram(
    "payments_receipt_render_seconds",
    "Time to render a receipt or credit note PDF (in the render process pool)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
REDIS_ERRORS = Counter(
    "payments_redis_errors_total",
    "Redis commands that failed for want of Redis (connection, timeout, cluster down)",
    ["kind"],
)


def outcome_of(error: BaseException) -> str:
    """A metric label for what a call ended in: the error's stable code, never its text."""
    if isinstance(error, ServiceError):
        return error.code
    if isinstance(error, TimeoutError):
        return "timeout"
    return "error"


async def timed_provider_call(provider: str, operation: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call``, counted and timed as ``operation`` on ``provider``."""
    started = time.perf_counter()
    outcome = "ok"
    try:
        return await call()
    except BaseException as error:
        outcome = outcome_of(error)
        raise
    finally:
        PROVIDER_CALLS.labels(provider, operation, outcome).inc()
        PROVIDER_LATENCY.labels(provider, operation).observe(time.perf_counter() - started)


@contextmanager
def timed_render() -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        RECEIPT_RENDER.observe(time.perf_counter() - started)
