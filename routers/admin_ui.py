"""The admin dashboard: server-rendered pages under /admin, for administrators only.

Thin handlers: read the form or the query, call ``AdminViews`` (which calls the same services
as the admin API), render a template. Sign-in exchanges an admin's bearer token for a session
cookie (services/admin_sessions.py); every POST carries the session's CSRF token. Every answer
of these routes, error pages and redirects included, carries the security headers below; no
page has a script, so the CSP allows none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from app.deps import AdminSessionsDep, AdminViewsDep, get_admin_sessions
from services.admin_sessions import (
    AdminSession,
    CsrfRefused,
    SessionMissing,
    check_same_token,
    new_token,
)
from services.admin_views import PaymentSearch, RoutingForm
from services.errors import AuthenticationRequired, PermissionDenied, ServiceError
from services.money import format_amount
from services.receipt_render import TEMPLATES_DIR

SESSION_COOKIE = "payments_admin_session"
LOGIN_COOKIE = "payments_admin_login"  # the sign-in form's own CSRF token, before a session
STYLESHEET = (TEMPLATES_DIR / "admin" / "admin.css").read_bytes()

SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make Chromium send Origin: null
    "Cross-Origin-Opener-Policy": "same-origin",
}

templates = Jinja2Templates(directory=TEMPLATES_DIR / "admin")
templates.env.filters["money"] = lambda amount, currency: format_amount(int(amount), currency)


class AdminPageRoute(APIRoute):
    """A dashboard route: errors become pages (never JSON, never a 500 for bad input), a
    missing session becomes the sign-in page, and every answer gets the security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                response = await handler(request)
            except SessionMissing as error:
                response = _signed_out(request, error)
            except RequestValidationError:
                response = _error(request, 400, "The request has invalid fields")
            except ServiceError as error:
                response = _error(request, error.status, error.detail)
            response.headers.update(SECURITY_HEADERS)
            return response

        return page


router = APIRouter(prefix="/admin", route_class=AdminPageRoute, include_in_schema=False)


# -- who is signed in ---------------------------------------------------------------------------


async def signed_in(request: Request) -> AdminSession:
    sessions = await get_admin_sessions(request)
    return await sessions.get(request.cookies.get(SESSION_COOKIE))


async def signed_in_form(request: Request) -> AdminSession:
    """The session, for a form it sent: same origin, and the session's CSRF token."""
    session = await signed_in(request)
    await _same_origin(request)
    sent = (await request.form()).get("csrf_token")
    session.check_csrf(sent if isinstance(sent, str) else None)
    return session


SignedIn = Annotated[AdminSession, Depends(signed_in)]
SignedInForm = Annotated[AdminSession, Depends(signed_in_form)]


async def _same_origin(request: Request) -> None:
    sessions = await get_admin_sessions(request)
    sessions.check_origin(
        request.headers.get("origin"), f"{request.url.scheme}://{request.url.netloc}"
    )


def _render(
    request: Request,
    template: str,
    session: AdminSession | None,
    status_code: int = 200,
    **context: Any,
) -> Response:
    return templates.TemplateResponse(
        request,
        template,
        {"session": session, "csrf_token": session.csrf_token if session else "", **context},
        status_code=status_code,
    )


def _error(request: Request, status_code: int, message: str) -> Response:
    return _render(request, "error.html", None, status_code, status=status_code, message=message)


def _signed_out(request: Request, error: ServiceError) -> Response:
    if request.method == "GET":
        return RedirectResponse("/admin/login", status_code=303)
    return _login_page(request, 401, error.detail)


def _login_page(request: Request, status_code: int = 200, message: str | None = None) -> Response:
    token = new_token()
    response = _render(request, "login.html", None, status_code, login_token=token, message=message)
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=600,
        path="/admin/login",
        httponly=True,
        secure=request.url.scheme == "https",
        samesite="strict",
    )
    return response


def _see(path: str) -> Response:
    return RedirectResponse(path, status_code=303)


# -- sign-in ------------------------------------------------------------------------------------


@router.get("/static/admin.css")
async def stylesheet() -> Response:
    return Response(STYLESHEET, media_type="text/css")


@router.get("/login")
async def login_form(request: Request, sessions: AdminSessionsDep) -> Response:
    try:
        await sessions.get(request.cookies.get(SESSION_COOKIE))
    except SessionMissing:
        return _login_page(request)
    return _see("/admin")


@router.post("/login")
async def login(
    request: Request,
    sessions: AdminSessionsDep,
    token: Annotated[str, Form(max_length=8192)] = "",
    csrf_token: Annotated[str, Form(max_length=128)] = "",
) -> Response:
    try:
        await _same_origin(request)
        check_same_token(request.cookies.get(LOGIN_COOKIE) or "", csrf_token or None)
    except CsrfRefused:
        return _login_page(request, 403, "The sign-in form was stale: paste the token again")
    try:
        session = await sessions.sign_in(token)
    except PermissionDenied as error:
        return _login_page(request, 403, error.detail)
    except AuthenticationRequired as error:
        return _login_page(request, 401, error.detail)
    response = _see("/admin")
    response.set_cookie(
        SESSION_COOKIE,
        session.session_id,
        max_age=max(1, int(session.expires_at - time.time())),
        path="/admin",
        httponly=True,
        secure=request.url.scheme == "https",
        samesite="strict",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/admin/login")
    return response


@router.post("/logout")
async def logout(session: SignedInForm, sessions: AdminSessionsDep) -> Response:
    await sessions.sign_out(session.session_id)
    response = _see("/admin/login")
    response.delete_cookie(SESSION_COOKIE, path="/admin")
    return response


# -- providers and routing ----------------------------------------------------------------------


@router.get("")
async def overview(request: Request, session: SignedIn, views: AdminViewsDep) -> Response:
    return _render(request, "overview.html", session, overview=await views.overview())


@router.get("/routing")
async def routing_form(request: Request, session: SignedIn, views: AdminViewsDep) -> Response:
    return _render(
        request,
        "routing.html",
        session,
        form=views.routing_form(),
        providers=await views.provider_names(),
        saved="saved" in request.query_params,
    )


@router.post("/routing")
async def set_routing(
    request: Request,
    session: SignedInForm,
    views: AdminViewsDep,
    default: Annotated[str, Form(max_length=64)] = "",
    fallback: Annotated[str, Form(max_length=1024)] = "",
    weights: Annotated[str, Form(max_length=4096)] = "",
    force: Annotated[bool, Form()] = False,
) -> Response:
    form = RoutingForm(default=default, fallback=fallback, weights=weights, force=force)
    try:
        await views.set_routing(form)
    except ServiceError as error:
        return _render(
            request,
            "routing.html",
            session,
            error.status,
            form=form,
            providers=await views.provider_names(),
            message=error.detail,
        )
    return _see("/admin/routing?saved")


# -- stored configurations ----------------------------------------------------------------------

ConfigId = Annotated[str, Path(pattern=r"^pc_[0-9a-f]{16}$")]


@router.get("/configs")
async def configs(request: Request, session: SignedIn, views: AdminViewsDep) -> Response:
    return _render(
        request,
        "configs.html",
        session,
        configs=await views.configs(),
        providers=await views.provider_names(),
    )


@router.get("/configs/new")
async def new_config(request: Request, session: SignedIn, views: AdminViewsDep) -> Response:
    provider = request.query_params.get("provider", "")[:64]
    return _render(request, "config.html", session, spec=await views.config_form(provider))


@router.post("/configs")
async def create_config(request: Request, session: SignedInForm, views: AdminViewsDep) -> Response:
    form = _strings(await request.form())
    provider = form.get("provider", "")[:64]
    try:
        stored = await views.create_config(provider, form, active="active" in form)
    except ServiceError as error:
        spec = await views.config_form(provider)
        return _render(
            request, "config.html", session, error.status, spec=spec, message=error.detail
        )
    return _see(f"/admin/configs/{stored.id}?saved")


@router.get("/configs/{config_id}")
async def config(
    request: Request, config_id: ConfigId, session: SignedIn, views: AdminViewsDep
) -> Response:
    return _render(
        request,
        "config.html",
        session,
        spec=await views.config_form(config_id=config_id),
        saved="saved" in request.query_params,
    )


@router.post("/configs/{config_id}")
async def update_config(
    request: Request, config_id: ConfigId, session: SignedInForm, views: AdminViewsDep
) -> Response:
    try:
        await views.update_config(config_id, _strings(await request.form()))
    except ServiceError as error:
        spec = await views.config_form(config_id=config_id)
        return _render(
            request, "config.html", session, error.status, spec=spec, message=error.detail
        )
    return _see(f"/admin/configs/{config_id}?saved")


@router.post("/configs/{config_id}/active")
async def set_config_active(
    config_id: ConfigId,
    session: SignedInForm,
    views: AdminViewsDep,
    active: Annotated[bool, Form()] = False,
) -> Response:
    await views.set_active(config_id, active=active)
    return _see(f"/admin/configs/{config_id}?saved")


def _strings(form: Mapping[str, Any]) -> dict[str, str]:
    return {key: value for key, value in form.items() if isinstance(value, str)}


# -- payments -----------------------------------------------------------------------------------

_SEARCH_FIELDS = ("payment_id", "user", "status", "provider", "cursor")


@router.get("/payments")
async def payments(request: Request, session: SignedIn, views: AdminViewsDep) -> Response:
    asked = {name: request.query_params.get(name, "")[:1024] for name in _SEARCH_FIELDS}
    context: dict[str, Any] = {"asked": asked, "page": None, "message": None}
    status_code = 200
    try:
        query = PaymentSearch.of_form(asked)
        if not query.empty:
            context["page"] = await views.search(query)
    except ServiceError as error:
        status_code, context["message"] = error.status, error.detail
    return _render(request, "payments.html", session, status_code, **context)


PaymentIdPath = Annotated[str, Path(max_length=256)]


@router.get("/payments/{payment_id}")
async def payment(
    request: Request, payment_id: PaymentIdPath, session: SignedIn, views: AdminViewsDep
) -> Response:
    return _render(
        request,
        "payment.html",
        session,
        detail=await views.payment(payment_id, session.user),
        refunded=request.query_params.get("refund", "")[:64],
    )


@router.post("/payments/{payment_id}/refund")
async def refund(
    request: Request,
    payment_id: PaymentIdPath,
    session: SignedInForm,
    views: AdminViewsDep,
    idempotency_key: Annotated[str, Form(max_length=128)] = "",
    amount: Annotated[str, Form(max_length=32)] = "",
    reason: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    try:
        answer = await views.refund(
            payment_id, session.user, amount=amount, reason=reason, idempotency_key=idempotency_key
        )
    except ServiceError as error:
        return _render(
            request,
            "payment.html",
            session,
            error.status,
            detail=await views.payment(payment_id, session.user),
            message=error.detail,
        )
    return _see(f"/admin/payments/{payment_id}?refund={answer.response.refund.refund_id}")


# -- reconciliation and merchant webhooks -------------------------------------------------------


@router.get("/reconciliation")
async def reconciliation(request: Request, session: SignedIn, views: AdminViewsDep) -> Response:
    return _render(request, "reconciliation.html", session, view=await views.reconciliation())


@router.get("/webhooks")
async def webhooks(request: Request, session: SignedIn, views: AdminViewsDep) -> Response:
    # HOOK: merchant webhook endpoints and deliveries come from services/events* once it is
    # wired into AdminViews(webhooks=...); without it the page says so, with no data.
    if views.webhooks is None:
        return _render(request, "webhooks.html", session, endpoints=None, deliveries={})
    endpoints = await views.webhooks.list_endpoints()
    deliveries = {
        endpoint.id: await views.webhooks.delivery_log(endpoint.id, limit=10)
        for endpoint in endpoints
    }
    return _render(request, "webhooks.html", session, endpoints=endpoints, deliveries=deliveries)
