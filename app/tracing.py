"""OpenTelemetry tracing, on when OTEL_EXPORTER_OTLP_ENDPOINT names a collector.

Each request is a server span (the ASGI instrumentation), each provider call a span of its
own (ProviderGuard), and each Redis command one (the Redis instrumentation, on the service's
own client only); spans go to the collector over OTLP/HTTP in batches. Nothing here is global:
the tracer provider is the app's, so that two apps in one process (the tests) never share one,
and the log lines of a traced request carry its ``trace_id`` (app/logging.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.trace import Tracer

    from services.payment_store import RedisClient


@dataclass
class Tracing:
    provider: TracerProvider

    @classmethod
    def start(cls, endpoint: str, service_name: str) -> Tracing:
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def tracer(self) -> Tracer:
        return self.provider.get_tracer("payments")

    def instrument_app(self, app: FastAPI) -> None:
        # /health and /metrics are probed every few seconds: no trace worth keeping.
        app.add_middleware(
            OpenTelemetryMiddleware,
            tracer_provider=self.provider,
            excluded_urls="/health,/ready,/metrics",
        )

    def instrument_redis(self, client: RedisClient) -> None:
        RedisInstrumentor.instrument_client(client, tracer_provider=self.provider)

    def shutdown(self) -> None:
        """Send what is still buffered, then stop."""
        self.provider.shutdown()
