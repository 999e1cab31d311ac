"""Every error leaves the service as RFC 9457 problem details with a stable ``code``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import ServiceError, StoreUnavailable

log = logging.getLogger("payments.errors")

PROBLEM_MEDIA_TYPE = "application/problem+json"

_HTTP_CODES = {
    400: ("invalid_body", "Malformed request body"),
    401: ("not_authenticated", "Authentication required"),
    403: ("forbidden", "Not allowed"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    413: ("payload_too_large", "Request body too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


def problem_response(
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://errors.payments.example/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


async def _service_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    if error.status >= 500:
        log.warning(
            "request.failed",
            extra={"code": error.code, "path": request.url.path, "error_detail": error.detail},
        )
    return problem_response(
        status=error.status,
        code=error.code,
        title=error.title,
        detail=error.detail,
        instance=request.url.path,
        headers=error.headers,
        extra=error.extra,
    )


def _clean_validation_error(error: Any) -> dict[str, Any]:
    # Never echo the input back: it may hold a secret or be huge.
    location = [str(part) for part in error.get("loc", ())]
    return {"loc": location, "type": error.get("type"), "msg": error.get("msg")}


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = [_clean_validation_error(item) for item in error.errors()]
    if any(item["type"] == "json_invalid" for item in errors):
        code, title, detail = "invalid_json", "Malformed JSON", "The request body is not valid JSON"
    else:
        fields = ", ".join(".".join(item["loc"][1:] or item["loc"]) for item in errors)
        code, title = "validation_error", "Invalid request"
        detail = f"Invalid or missing fields: {fields}"
    return problem_response(
        status=422,
        code=code,
        title=title,
        detail=detail,
        instance=request.url.path,
        extra={"errors": errors},
    )


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    code, title = _HTTP_CODES.get(error.status_code, ("http_error", "HTTP error"))
    detail = error.detail if isinstance(error.detail, str) else title
    return problem_response(
        status=error.status_code,
        code=code,
        title=title,
        detail=detail,
        instance=request.url.path,
        headers=dict(error.headers or {}),
    )


async def _redis_error(request: Request, error: Exception) -> JSONResponse:
    log.warning("store.unavailable", extra={"path": request.url.path, "error": repr(error)})
    return await _service_error(request, StoreUnavailable())


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("request.unhandled_error", extra={"path": request.url.path})
    return problem_response(
        status=500,
        code="internal_error",
        title="Internal error",
        detail="Something went wrong on our side",
        instance=request.url.path,
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisError, _redis_error)
    app.add_exception_handler(Exception, _unexpected_error)
