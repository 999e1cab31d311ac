"""The payment API: thin handlers that parse, authorize, rate-limit and call the service."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, StringConstraints, TypeAdapter, ValidationError

from app.deps import (
    Access,
    Caller,
    CheckoutDep,
    Need,
    OperationsDep,
    PaymentStateDep,
    RateLimit,
    ReceiptsDep,
)
from app.openapi import OPTIONAL_TOKEN, SIGNATURE_ONLY
from models.payment import (
    PAYMENT_ID_PATTERN,
    CaptureRequest,
    CreateIntentRequest,
    IntentResponse,
    PaymentHistoryResponse,
    PaymentResponse,
    PlanListResponse,
    ReceiptResponse,
    RefundListResponse,
    RefundRequest,
    RefundResponse,
    VerifyRequest,
)
from routers.docs import problems
from services.errors import PaymentNotFound

router = APIRouter(prefix="/api/v1/payment", tags=["payments"])

# An ID that cannot be a payment ID is simply not found: same answer as an unknown one.
PaymentIdPath = Annotated[str, Path(max_length=256)]
# The Idempotency-Key header, read and checked by create_intent itself (see there).
_IDEMPOTENCY_KEY_DESCRIPTION = "Makes retries safe: the same key and body give the same answer"
_IdempotencyKey = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")
]
_IDEMPOTENCY_KEY = TypeAdapter(_IdempotencyKey)
_IDEMPOTENCY_KEY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {
        "anyOf": [
            {**_IDEMPOTENCY_KEY.json_schema(), "type": "string"},
            {"type": "null"},
        ],
        "description": _IDEMPOTENCY_KEY_DESCRIPTION,
        "title": "Idempotency-Key",
    },
    "description": _IDEMPOTENCY_KEY_DESCRIPTION,
}


def _idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key, if it has one, checked as FastAPI checks a declared
    header (same 422). Not a declared parameter: FastAPI's per-request work for one optional
    header was a twentieth of a create-intent's CPU."""
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    try:
        return _IDEMPOTENCY_KEY.validate_python(raw)
    except ValidationError as error:
        raise RequestValidationError(
            [{**item, "loc": ("header", "Idempotency-Key")} for item in error.errors()]
        ) from None


_COMMON = (401, 404, 413, 422, 429, 503)

# One dependency a route (see app.deps): the token, the rate limit and the service.
CreateIntentCaller = Annotated[Caller, Depends(Access(RateLimit("create-intent", 10)))]
VerifyCaller = Annotated[Caller, Depends(Access(RateLimit("verify", 30)))]
ReceiptUserCaller = Annotated[Caller, Depends(Access(RateLimit("receipt", 30), need=Need.USER))]
ReceiptPdfUserCaller = Annotated[
    Caller, Depends(Access(RateLimit("receipt-pdf", 10), need=Need.USER))
]
# A provider's webhook signs with its own Authorization header (Vipps MobilePay's HMAC): the
# signature is the authentication, and the header is never read as our bearer token.
WebhookCaller = Annotated[Caller, Depends(Access(RateLimit("webhook", 100), bearer=False))]
CaptureCaller = Annotated[Caller, Depends(Access(RateLimit("capture", 10)))]
CancelCaller = Annotated[Caller, Depends(Access(RateLimit("cancel", 10)))]
RefundAdminCaller = Annotated[Caller, Depends(Access(RateLimit("refund", 10), need=Need.ADMIN))]


def _json(
    model: BaseModel, caller: Caller, status_code: int = 200, *, replayed: bool = False
) -> Response:
    """The route's ``response_model``, already built by the service, as JSON with the caller's
    RateLimit-* headers (and ``Idempotent-Replayed: true`` when it is the answer stored for
    the request's Idempotency-Key). Answering a Response skips FastAPI validating the model a
    second time and serializing it again; the OpenAPI document still comes from
    response_model."""
    headers = {**caller.headers, "Idempotent-Replayed": "true"} if replayed else caller.headers
    return Response(
        model.model_dump_json(),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def _checked_id(payment_id: str) -> str:
    if not re.fullmatch(PAYMENT_ID_PATTERN, payment_id):
        raise PaymentNotFound("No such payment")
    return payment_id


@router.post(
    "/create-intent",
    response_model=IntentResponse,
    status_code=201,
    responses=problems(*_COMMON, 402, 409, 502),
    summary="Create a payment for a catalogue plan",
    openapi_extra={"parameters": [_IDEMPOTENCY_KEY_PARAMETER], **OPTIONAL_TOKEN},
)
async def create_intent(
    body: CreateIntentRequest, request: Request, caller: CreateIntentCaller, checkout: CheckoutDep
) -> Response:
    created = await checkout.create_intent(
        body,
        user=caller.user,
        caller=caller.address,
        idempotency_key=_idempotency_key(request),
        base_url=str(request.base_url),
    )
    return _json(created.response, caller, 201, replayed=created.replayed)


@router.get(
    "/plans",
    response_model=PlanListResponse,
    summary="The plan catalogue: prices per currency and which providers take each (public)",
)
async def plans(checkout: CheckoutDep) -> Response:
    # The same for every caller and changed only by a restart or a provider's configuration:
    # clients and proxies may keep it a minute.
    return Response(
        checkout.price_list().model_dump_json(),
        media_type="application/json",
        headers={"Cache-Control": "public, max-age=60"},
    )


@router.post(
    "/verify",
    response_model=PaymentResponse,
    responses=problems(*_COMMON, 502),
    summary="Ask the provider for the payment's state and apply it",
    openapi_extra=OPTIONAL_TOKEN,
)
async def verify(body: VerifyRequest, caller: VerifyCaller, payments: PaymentStateDep) -> Response:
    return _json(await payments.verify(body.payment_id, caller.user), caller)


@router.get(
    "/receipt/{payment_id}",
    response_model=ReceiptResponse,
    responses=problems(*_COMMON, 409),
    summary="Receipt details (owner or admin)",
)
async def receipt(
    payment_id: PaymentIdPath, caller: ReceiptUserCaller, receipts: ReceiptsDep
) -> Response:
    return _json(await receipts.receipt(_checked_id(payment_id), caller.signed_in), caller)


@router.get(
    "/receipt/{payment_id}/pdf",
    response_class=Response,
    responses={
        200: {"content": {"application/pdf": {}}, "description": "The receipt PDF"},
        **problems(*_COMMON, 409),
    },
    summary="Download the receipt PDF (owner or admin)",
)
async def receipt_pdf(
    payment_id: PaymentIdPath, caller: ReceiptPdfUserCaller, receipts: ReceiptsDep
) -> Response:
    filename, data = await receipts.receipt_pdf(_checked_id(payment_id), caller.signed_in)
    return _pdf(filename, data, caller)


def _pdf(filename: str, data: bytes, caller: Caller) -> Response:
    return Response(
        data,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "private, max-age=3600",
            **caller.headers,
        },
    )


@router.get(
    "/{payment_id}/refunds/{refund_id}/pdf",
    response_class=Response,
    responses={
        200: {"content": {"application/pdf": {}}, "description": "The credit note PDF"},
        **problems(*_COMMON),
    },
    summary="Download a succeeded refund's credit note (owner or admin)",
)
async def credit_note_pdf(
    payment_id: PaymentIdPath,
    refund_id: Annotated[str, Path(max_length=256)],
    caller: ReceiptPdfUserCaller,
    receipts: ReceiptsDep,
) -> Response:
    if not re.fullmatch(PAYMENT_ID_PATTERN, refund_id):
        raise PaymentNotFound("No credit note for this refund")
    filename, data = await receipts.credit_note_pdf(
        _checked_id(payment_id), refund_id, caller.signed_in
    )
    return _pdf(filename, data, caller)


@router.post(
    "/webhook/{provider}",
    response_model=dict[str, Any],
    responses=problems(400, 404, 413, 422, 429, 503),
    summary="Provider webhooks; the signature is the authentication",
    openapi_extra=SIGNATURE_ONLY,
)
async def webhook(
    provider: Annotated[str, Path(pattern=r"^[a-z0-9_\-]{1,64}$")],
    request: Request,
    caller: WebhookCaller,
    payments: PaymentStateDep,
) -> Response:
    body = await request.body()
    ack = await payments.handle_webhook(provider, body, request.headers)
    return JSONResponse(
        {"received": True, "event_id": ack.event_id, "outcome": ack.outcome},
        headers=caller.headers,
    )


@router.post(
    "/capture/paypal/{payment_id}",
    response_model=PaymentResponse,
    responses=problems(*_COMMON, 402, 409, 502),
    summary="Capture an approved PayPal order",
    openapi_extra=OPTIONAL_TOKEN,
)
async def capture_paypal(
    payment_id: PaymentIdPath, caller: CaptureCaller, operations: OperationsDep
) -> Response:
    captured = await operations.capture(
        _checked_id(payment_id), caller.user, provider_name="paypal"
    )
    return _json(captured, caller)


@router.get(
    "/{payment_id}/history",
    response_model=PaymentHistoryResponse,
    responses=problems(401, 404, 429, 503),
    summary="A payment's provider attempts and status changes (owner or admin)",
)
async def history(
    payment_id: PaymentIdPath, caller: ReceiptUserCaller, payments: PaymentStateDep
) -> Response:
    return _json(await payments.history(_checked_id(payment_id), caller.signed_in), caller)


@router.post(
    "/{payment_id}/capture",
    response_model=PaymentResponse,
    responses=problems(*_COMMON, 402, 409, 502),
    summary="Capture an authorized payment, all of it or part of it",
    openapi_extra=OPTIONAL_TOKEN,
)
async def capture(
    payment_id: PaymentIdPath,
    caller: CaptureCaller,
    operations: OperationsDep,
    body: CaptureRequest | None = None,
) -> Response:
    captured = await operations.capture(
        _checked_id(payment_id), caller.user, amount=body.amount if body else None
    )
    return _json(captured, caller)


@router.post(
    "/{payment_id}/cancel",
    response_model=PaymentResponse,
    responses=problems(*_COMMON, 409, 502),
    summary="Cancel a payment that has not been captured",
    openapi_extra=OPTIONAL_TOKEN,
)
async def cancel(
    payment_id: PaymentIdPath, caller: CancelCaller, operations: OperationsDep
) -> Response:
    return _json(await operations.cancel(_checked_id(payment_id), caller.user), caller)


@router.post(
    "/{payment_id}/refund",
    response_model=RefundResponse,
    status_code=200,
    responses={
        202: {"model": RefundResponse, "description": "The refund is pending at the provider"},
        **problems(*_COMMON, 403, 409, 502),
    },
    summary="Refund a paid payment, fully or in part (admins)",
    openapi_extra={"parameters": [_IDEMPOTENCY_KEY_PARAMETER]},
)
async def refund(
    payment_id: PaymentIdPath,
    request: Request,
    caller: RefundAdminCaller,
    operations: OperationsDep,
    body: RefundRequest | None = None,
) -> Response:
    answer = await operations.refund(
        _checked_id(payment_id),
        body or RefundRequest(),
        user=caller.signed_in,
        idempotency_key=_idempotency_key(request),
    )
    return _json(answer.response, caller, answer.status_code, replayed=answer.replayed)


@router.get(
    "/{payment_id}/refunds",
    response_model=RefundListResponse,
    responses=problems(401, 404, 429, 503),
    summary="A payment's refunds with their status and history (owner or admin)",
)
async def refunds(
    payment_id: PaymentIdPath, caller: ReceiptUserCaller, operations: OperationsDep
) -> Response:
    return _json(await operations.refunds(_checked_id(payment_id), caller.signed_in), caller)
