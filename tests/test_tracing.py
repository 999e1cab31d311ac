"""OpenTelemetry traces, exported over OTLP/HTTP to a collector on loopback (a fake one here,
reading the protobuf the way a real collector does): a request, its provider call and its
Redis commands are one trace, and the request's log lines name it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.logging import JsonFormatter
from app.main import create_app
from tests.conftest import RedisServer, make_settings
from tests.fakes.server import serve_in_thread


class Collector:
    """What an OTLP/HTTP collector received: (trace id, span id, parent, name, kind)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []

    async def traces(self, request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(await request.body())
        for resource in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        {
                            "service": service.get("service.name"),
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "name": span.name,
                        }
                    )
        return Response(b"", media_type="application/x-protobuf")


@pytest.fixture
def collector() -> Iterator[tuple[Collector, str]]:
    received = Collector()
    app = Starlette(routes=[Route("/v1/traces", received.traces, methods=["POST"])])
    with serve_in_thread(app) as url:
        yield received, url


@pytest.fixture
async def traced(
    collector: tuple[Collector, str],
    redis_server: RedisServer,
    tmp_path: Path,
    render_pool: ProcessPoolExecutor,
) -> Any:
    redis_server.flush()
    settings = make_settings(
        redis_server.url,
        tmp_path / "receipts",
        otel_exporter_otlp_endpoint=collector[1],
        otel_service_name="payments-under-test",
    )
    app = create_app(settings, receipt_executor=render_pool)
    async with app.router.lifespan_context(app):
        yield app


async def test_a_request_its_provider_call_and_its_redis_commands_are_one_trace(
    traced: Any, collector: tuple[Collector, str]
) -> None:
    lines: list[dict[str, Any]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(JsonFormatter().format(record)))

    keep = Keep()
    logging.getLogger("payments").addHandler(keep)
    try:
        transport = httpx.ASGITransport(app=traced)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            created = await http.post("/api/v1/payment/create-intent", json={"plan": "pro"})
            assert created.status_code == 201, created.text
            assert (await http.get("/health")).status_code == 200
    finally:
        logging.getLogger("payments").removeHandler(keep)
    traced.state.tracing.provider.force_flush()

    spans = collector[0].spans
    server = [s for s in spans if s["name"] == "POST /api/v1/payment/create-intent"]
    assert len(server) == 1, [s["name"] for s in spans]
    trace_id = server[0]["trace_id"]
    in_trace = [s for s in spans if s["trace_id"] == trace_id]
    names = {s["name"] for s in in_trace}
    assert "provider sandbox create_payment_intent" in names
    assert any(name.startswith(("EVALSHA", "EVAL")) for name in names), names
    assert {s["service"] for s in in_trace} == {"payments-under-test"}
    # The provider's span is a child within the request's trace.
    provider_span = next(s for s in in_trace if s["name"].startswith("provider "))
    assert provider_span["parent"]
    # Health probes are not traced.
    assert not any(s["name"].startswith("GET /health") for s in spans)
    # The request's log lines name its trace.
    created_lines = [line for line in lines if line["event"] == "payment.created"]
    assert created_lines and created_lines[0]["trace_id"] == trace_id
