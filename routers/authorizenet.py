"""Our page in front of Authorize.Net's hosted payment form.

Accept Hosted takes its token only in a form POST, so ``redirect_url`` points here: a page
that posts the token (kept on the server since the payment was created, never put in a URL)
to Authorize.Net's form, by itself with scripts on and with one button without. The page is
strict about what it may do: one nonce'd script, posts only to Authorize.Net's form, never
framed, never cached, no referrer."""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from app.deps import Access, AuthorizeNetPageDep, Caller, RateLimit
from routers.docs import problems
from services.receipt_render import TEMPLATES_DIR

router = APIRouter(prefix="/api/v1/payment/authorizenet", tags=["authorizenet"])
templates = Jinja2Templates(directory=TEMPLATES_DIR)

PageCaller = Annotated[Caller, Depends(Access(RateLimit("authorizenet-pay", 30)))]


@router.get(
    "/{payment_id}/pay",
    response_class=HTMLResponse,
    responses=problems(404, 409, 429, 503),
    summary="Sends the buyer on to Authorize.Net's hosted payment form",
)
async def pay(
    payment_id: Annotated[str, Path(max_length=64)],
    request: Request,
    caller: PageCaller,
    page: AuthorizeNetPageDep,
) -> Response:
    form = await page.form(payment_id)
    action = urlsplit(form.action_url)
    nonce = secrets.token_urlsafe(18)
    policy = "; ".join(
        (
            "default-src 'none'",
            f"script-src 'nonce-{nonce}'",
            f"style-src 'nonce-{nonce}'",
            f"form-action {action.scheme}://{action.netloc}",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        )
    )
    return templates.TemplateResponse(
        request,
        "authorizenet_redirect.html",
        {"action_url": form.action_url, "token": form.token, "nonce": nonce},
        headers={
            **caller.headers,
            "Content-Security-Policy": policy,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
        },
    )
