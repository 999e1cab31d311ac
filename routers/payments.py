"""The payment API: thin handlers that parse, authorize, rate-limit and call the service."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response

from app.deps import AdminUser, CurrentUser, OptionalUser, PaymentServiceDep, client_address
from app.errors import PaymentNotFound
from app.ratelimit import RateLimit
from models.payment import (
    PAYMENT_ID_PATTERN,
    CreateIntentRequest,
    IntentResponse,
    PaymentHistoryResponse,
    PaymentResponse,
    ReceiptResponse,
    RefundRequest,
    VerifyRequest,
)
from routers.docs import problems

router = APIRouter(prefix="/api/v1/payment", tags=["payments"])

# An ID that cannot be a payment ID is simply not found: same answer as an unknown one.
PaymentIdPath = Annotated[str, Path(max_length=256)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Makes retries safe: the same key and body give the same answer",
    ),
]

_COMMON = (401, 404, 413, 422, 429, 503)


def _checked_id(payment_id: str) -> str:
    if not re.fullmatch(PAYMENT_ID_PATTERN, payment_id):
        raise PaymentNotFound("No such payment")
    return payment_id


@router.post(
    "/create-intent",
    response_model=IntentResponse,
    status_code=201,
    dependencies=[Depends(RateLimit("create-intent", 10))],
    responses=problems(*_COMMON, 402, 409, 502),
    summary="Create a payment for a catalogue plan",
)
async def create_intent(
    body: CreateIntentRequest,
    request: Request,
    user: OptionalUser,
    service: PaymentServiceDep,
    idempotency_key: IdempotencyKey = None,
) -> IntentResponse:
    return await service.create_intent(
        body,
        user=user,
        caller=f"ip:{client_address(request)}",
        idempotency_key=idempotency_key,
        base_url=str(request.base_url),
    )


@router.post(
    "/verify",
    response_model=PaymentResponse,
    dependencies=[Depends(RateLimit("verify", 30))],
    responses=problems(*_COMMON, 502),
    summary="Ask the provider for the payment's state and apply it",
)
async def verify(
    body: VerifyRequest, user: OptionalUser, service: PaymentServiceDep
) -> PaymentResponse:
    return await service.verify(body.payment_id, user)


@router.get(
    "/receipt/{payment_id}",
    response_model=ReceiptResponse,
    dependencies=[Depends(RateLimit("receipt", 30))],
    responses=problems(*_COMMON, 409),
    summary="Receipt details (owner or admin)",
)
async def receipt(
    payment_id: PaymentIdPath, user: CurrentUser, service: PaymentServiceDep
) -> ReceiptResponse:
    return await service.receipt(_checked_id(payment_id), user)


@router.get(
    "/receipt/{payment_id}/pdf",
    response_class=Response,
    dependencies=[Depends(RateLimit("receipt-pdf", 10))],
    responses={
        200: {"content": {"application/pdf": {}}, "description": "The receipt PDF"},
        **problems(*_COMMON, 409),
    },
    summary="Download the receipt PDF (owner or admin)",
)
async def receipt_pdf(
    payment_id: PaymentIdPath, user: CurrentUser, service: PaymentServiceDep
) -> Response:
    filename, data = await service.receipt_pdf(_checked_id(payment_id), user)
    return Response(
        data,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "private, max-age=3600",
        },
    )


@router.post(
    "/webhook/{provider}",
    dependencies=[Depends(RateLimit("webhook", 100))],
    responses=problems(400, 404, 413, 422, 429, 503),
    summary="Provider webhooks (stripe, paypal); the signature is the authentication",
)
async def webhook(
    provider: Annotated[str, Path(pattern=r"^[a-z0-9_\-]{1,64}$")],
    request: Request,
    service: PaymentServiceDep,
) -> dict[str, Any]:
    body = await request.body()
    ack = await service.handle_webhook(provider, body, request.headers)
    return {"received": True, "event_id": ack.event_id, "outcome": ack.outcome}


@router.post(
    "/capture/paypal/{payment_id}",
    response_model=PaymentResponse,
    dependencies=[Depends(RateLimit("capture", 10))],
    responses=problems(*_COMMON, 402, 409, 502),
    summary="Capture an approved PayPal order",
)
async def capture_paypal(
    payment_id: PaymentIdPath, user: OptionalUser, service: PaymentServiceDep
) -> PaymentResponse:
    return await service.capture(_checked_id(payment_id), user, provider_name="paypal")


@router.get(
    "/{payment_id}/history",
    response_model=PaymentHistoryResponse,
    dependencies=[Depends(RateLimit("receipt", 30))],
    responses=problems(401, 404, 429, 503),
    summary="A payment's provider attempts and status changes (owner or admin)",
)
async def history(
    payment_id: PaymentIdPath, user: CurrentUser, service: PaymentServiceDep
) -> PaymentHistoryResponse:
    return await service.history(_checked_id(payment_id), user)


@router.post(
    "/{payment_id}/capture",
    response_model=PaymentResponse,
    dependencies=[Depends(RateLimit("capture", 10))],
    responses=problems(*_COMMON, 402, 409, 502),
    summary="Capture an authorized payment",
)
async def capture(
    payment_id: PaymentIdPath, user: OptionalUser, service: PaymentServiceDep
) -> PaymentResponse:
    return await service.capture(_checked_id(payment_id), user)


@router.post(
    "/{payment_id}/cancel",
    response_model=PaymentResponse,
    dependencies=[Depends(RateLimit("cancel", 10))],
    responses=problems(*_COMMON, 409, 502),
    summary="Cancel a payment that has not been captured",
)
async def cancel(
    payment_id: PaymentIdPath, user: OptionalUser, service: PaymentServiceDep
) -> PaymentResponse:
    return await service.cancel(_checked_id(payment_id), user)


@router.post(
    "/{payment_id}/refund",
    response_model=PaymentResponse,
    dependencies=[Depends(RateLimit("refund", 10))],
    responses=problems(*_COMMON, 403, 409, 502),
    summary="Refund a paid payment, fully or in part (admins)",
)
async def refund(
    payment_id: PaymentIdPath,
    _admin: AdminUser,
    service: PaymentServiceDep,
    body: RefundRequest | None = None,
) -> PaymentResponse:
    return await service.refund(_checked_id(payment_id), body.amount if body else None)
