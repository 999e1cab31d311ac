"""The sandbox provider's hosted checkout page, served by the service itself."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from app.deps import SandboxCheckoutDep
from models.payment import PAYMENT_ID_PATTERN
from routers.docs import problems
from services.errors import (
    InvalidStateTransition,
    InvalidSubscriptionState,
    NotFound,
    PaymentNotFound,
)
from services.money import format_amount
from services.payment_providers.sandbox import Outcome, captured_part
from services.receipt_render import TEMPLATES_DIR

router = APIRouter(prefix="/sandbox", tags=["sandbox"])
templates = Jinja2Templates(directory=TEMPLATES_DIR)

SandboxId = Annotated[str, Path(pattern=PAYMENT_ID_PATTERN.replace("^", "^sb_"))]
_SANDBOX_ID = re.compile(PAYMENT_ID_PATTERN.replace("^", "^sb_"))


def _page(request: Request, session: dict[str, str], payment_id: str, **extra: object) -> Response:
    captured = captured_part(session)
    return templates.TemplateResponse(
        request,
        "sandbox_checkout.html",
        {
            "payment_id": payment_id,
            "plan_name": session.get("plan_name", session.get("plan", "")),
            "amount": format_amount(int(session["amount"]), session["currency"]),
            "status": session["status"],
            "captured": None if captured is None else format_amount(captured, session["currency"]),
            **extra,
        },
        headers={"Cache-Control": "no-store"},
    )


@router.get(
    "/checkout/{payment_id}",
    response_class=HTMLResponse,
    responses=problems(404, 503),
    summary="The sandbox's hosted checkout page",
)
async def checkout_page(
    payment_id: Annotated[str, Path(max_length=256)],
    request: Request,
    checkout: SandboxCheckoutDep,
) -> Response:
    try:
        if not _SANDBOX_ID.fullmatch(payment_id):
            raise PaymentNotFound("No such sandbox checkout")
        session = await checkout.session(payment_id)
    except NotFound:
        # A customer's browser gets a page; an API client, the problem document.
        if "text/html" not in request.headers.get("accept", ""):
            raise
        return templates.TemplateResponse(
            request,
            "sandbox_not_found.html",
            {},
            status_code=404,
            headers={"Cache-Control": "no-store"},
        )
    return _page(request, session, payment_id)


@router.post(
    "/checkout/{payment_id}",
    response_class=HTMLResponse,
    responses=problems(404, 409, 422, 503),
    summary="Settle a sandbox payment: succeeded, failed or canceled",
)
async def settle(
    payment_id: SandboxId,
    outcome: Annotated[Literal["succeeded", "failed", "canceled"], Form()],
    request: Request,
    checkout: SandboxCheckoutDep,
) -> Response:
    chosen: Outcome = outcome
    try:
        session = await checkout.settle(payment_id, chosen)
    except InvalidStateTransition:
        session = await checkout.session(payment_id)
        return _page(request, session, payment_id, already_settled=True)
    target = session.get("cancel_url") if outcome == "canceled" else session.get("return_url")
    target = target or session.get("return_url")
    if target:
        return RedirectResponse(
            _with_query(target, payment_id=payment_id, status=outcome), status_code=303
        )
    return _page(request, session, payment_id)


def _with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query, before any #fragment (which the browser
    keeps to itself)."""
    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, urlencode(params)]))
    return urlunsplit(parts._replace(query=query))


# -- subscriptions -------------------------------------------------------------------------

SandboxSubscriptionId = Annotated[str, Path(pattern=PAYMENT_ID_PATTERN.replace("^", "^sbsub_"))]


class AdvanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: Literal["succeeded", "failed"] = Field(description="How the next renewal ends")


def _subscription_page(
    request: Request, record: dict[str, str], sandbox_id: str, **extra: object
) -> Response:
    count, interval = int(record["interval_count"]), record["interval"]
    every = interval if count == 1 else f"{count} {interval}s"
    return templates.TemplateResponse(
        request,
        "sandbox_checkout.html",
        {
            "payment_id": sandbox_id,
            "plan_name": record.get("plan_name", record.get("plan", "")),
            "amount": f"{format_amount(int(record['amount']), record['currency'])} / {every}",
            # The page offers Pay / Decline / Cancel while the subscription is not started.
            "status": "open" if record["status"] == "incomplete" else record["status"],
            **extra,
        },
        headers={"Cache-Control": "no-store"},
    )


@router.get(
    "/subscriptions/{sandbox_id}/checkout",
    response_class=HTMLResponse,
    responses=problems(404, 503),
    summary="The sandbox's page to start a subscription",
)
async def subscription_checkout_page(
    sandbox_id: SandboxSubscriptionId, request: Request, checkout: SandboxCheckoutDep
) -> Response:
    record = await checkout.subscription(sandbox_id)
    return _subscription_page(request, record, sandbox_id)


@router.post(
    "/subscriptions/{sandbox_id}/checkout",
    response_class=HTMLResponse,
    responses=problems(404, 409, 422, 503),
    summary="Start a sandbox subscription (succeeded), or not (failed, canceled)",
)
async def settle_subscription(
    sandbox_id: SandboxSubscriptionId,
    outcome: Annotated[Literal["succeeded", "failed", "canceled"], Form()],
    request: Request,
    checkout: SandboxCheckoutDep,
) -> Response:
    try:
        record = await checkout.settle_subscription(sandbox_id, outcome)
    except InvalidSubscriptionState:
        record = await checkout.subscription(sandbox_id)
        return _subscription_page(request, record, sandbox_id, already_settled=True)
    target = record.get("cancel_url") if outcome == "canceled" else record.get("return_url")
    target = target or record.get("return_url")
    if target:
        return RedirectResponse(
            _with_query(target, subscription_id=record["subscription_id"], status=outcome),
            status_code=303,
        )
    return _subscription_page(request, record, sandbox_id)


@router.post(
    "/subscriptions/{sandbox_id}/advance",
    response_model=dict[str, Any],
    responses=problems(404, 409, 422, 503),
    summary="Test clock: move a sandbox subscription to its next renewal, with that outcome",
)
async def advance_subscription(
    sandbox_id: SandboxSubscriptionId, body: AdvanceRequest, checkout: SandboxCheckoutDep
) -> dict[str, Any]:
    state = await checkout.advance_subscription(sandbox_id, body.outcome)
    return {
        "provider_subscription_id": state.provider_subscription_id,
        "subscription_id": state.subscription_id,
        "status": str(state.status),
        "current_period_start": state.current_period_start,
        "current_period_end": state.current_period_end,
    }
