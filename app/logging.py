"""Structured JSON logs: the message is the event name, extras become fields."""

from __future__ import annotations

import copy
import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The request being served (X-Request-ID, ours or the caller's), for every log line it causes.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

# Record attributes that are not extras (uvicorn's color_message is its terminal markup).
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        if (
            record.name == "uvicorn.access"
            and isinstance(record.args, tuple)
            and len(record.args) == 5
        ):
            # uvicorn's access line as fields: client, method, path, HTTP version, status.
            client, method, path, version, status = record.args
            entry["event"] = "http.access"
            entry |= {"client": client, "method": method, "path": path, "status": status}
            entry["http_version"] = version
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        trace_id = _current_trace_id()
        if trace_id is not None:
            entry["trace_id"] = trace_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _current_trace_id() -> str | None:
    """The OpenTelemetry trace being recorded, when tracing is on (app/tracing.py)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("payments")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # uvicorn's own lines (access log, start-up, errors) in the same JSON, through the
    # handlers uvicorn set up: an access log it was told not to keep (--no-access-log) has
    # none and stays off.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        for server_handler in logging.getLogger(name).handlers:
            server_handler.setFormatter(JsonFormatter())


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging set-up with this JSON formatter, for `payments serve`: with several
    workers its supervising process logs (where it listens, its workers' fate) without ever
    importing the app, whose ``configure_logging`` only reaches the workers."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"] = {
        name: {"()": f"{__name__}.JsonFormatter"} for name in config["formatters"]
    }
    return config
