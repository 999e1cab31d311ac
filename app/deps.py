"""Request dependencies: who is calling, under which rate limit, and the service they call.

Every route takes one ``Access`` dependency that does all of it. FastAPI spends as much time
per dependency node as a Redis round trip costs (it recomputes each node's cache key on every
request): the tree of small ones this replaced (rate limit -> optional user -> HTTPBearer,
current user, service) was more than half of a cached PDF download's CPU under cProfile.
``Access`` is a security scheme to FastAPI, so the OpenAPI document still names the bearer
token on every route that reads it.

Every dependency here is ``async def``: FastAPI runs a plain ``def`` dependency in a worker
thread, which cost more than the whole Redis round trip of a request (seen in a profile).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Annotated

from fastapi import Depends, Request
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase

from app.security import decode_access_token
from app.settings import Settings
from models.user import User
from services.admin_sessions import AdminSessions
from services.admin_views import AdminViews
from services.checkout import CheckoutService
from services.errors import AuthenticationRequired, InvalidToken, PermissionDenied, RateLimited
from services.events.service import WebhookEvents
from services.operations import PaymentOperations
from services.payment_providers.authorizenet.hosted_page import AuthorizeNetHostedPage
from services.payment_providers.sandbox_checkout import SandboxCheckout
from services.payment_receipts import PaymentReceipts
from services.payment_state import PaymentStateService
from services.payment_store import PaymentStore
from services.plan_sync import PlanSync
from services.provider_admin import ProviderAdmin
from services.subscriptions import SubscriptionService

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Need(Enum):
    ANYONE = "anyone"  # a token is optional; a bad one is still a 401
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``RateLimit("verify", 30)`` allows 30 a minute per user (per client address when the
    caller sent no token), counted in Redis so that it holds across worker processes.

    The counter is one Lua call on the service's own async Redis pool: slowapi, the library
    first chosen, calls its storage synchronously and would block the event loop on every
    request (and hang it while Redis is slow)."""

    name: str
    limit: int
    per_seconds: int = 60

    @property
    def description(self) -> str:
        unit = "minute" if self.per_seconds == 60 else f"{self.per_seconds}s"
        return f"{self.limit}/{unit}"


@dataclass(frozen=True, slots=True)
class Caller:
    user: User | None
    address: str  # "ip:<client address>": who a tokenless caller is
    headers: Mapping[str, str]  # RateLimit-* for the response, when limits are on

    @property
    def signed_in(self) -> User:
        """The user, on routes whose ``Access`` needs one (already checked there)."""
        if self.user is None:
            raise AuthenticationRequired("This endpoint needs a bearer token")
        return self.user


class Access(SecurityBase):
    """``Depends(Access(RateLimit("verify", 30)))``: the caller, after checking the bearer
    token (a token that is sent but bad is a 401, never silently anonymous), counting the
    request against the rate limit, then requiring a user or an admin if ``need`` says so.

    A request is counted before ``need`` is checked, so that callers without a token are
    limited too (by address), as they were when these were separate dependencies.
    """

    def __init__(
        self, rate_limit: RateLimit | None = None, *, need: Need = Need.ANYONE, bearer: bool = True
    ) -> None:
        self.model = HTTPBearerModel(description="JWT from `payments token`")
        self.scheme_name = "HTTPBearer"
        self.rate_limit = rate_limit
        self.need = need
        # False where the Authorization header is someone else's scheme (a provider's webhook
        # signature, as Vipps MobilePay's ``HMAC-SHA256 ...``): it is not read as our token.
        self.bearer = bearer

    async def __call__(self, request: Request) -> Caller:
        state = request.app.state
        settings: Settings = state.settings
        user = _bearer_user(request, settings) if self.bearer else None
        address = f"ip:{client_address(request)}"
        headers: Mapping[str, str] = _NO_HEADERS
        if self.rate_limit is not None and settings.rate_limits_enabled:
            who = f"user:{user.sub}" if user else address
            headers = await _count(self.rate_limit, state.store, who)
        if self.need is not Need.ANYONE:
            if user is None:
                raise AuthenticationRequired("This endpoint needs a bearer token")
            if self.need is Need.ADMIN and not user.is_admin:
                raise PermissionDenied("This endpoint is for administrators")
        return Caller(user=user, address=address, headers=headers)


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


def _bearer_user(request: Request, settings: Settings) -> User | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise InvalidToken("The Authorization header must be 'Bearer <token>'")
    return decode_access_token(settings, token)


async def _count(limit: RateLimit, store: PaymentStore, who: str) -> dict[str, str]:
    """Count one request; the RateLimit-* headers to answer it with, or RateLimited."""
    hits, seconds_left = await store.hit_rate_limit(f"{limit.name}:{who}", limit.per_seconds)
    reset = max(1, math.ceil(seconds_left))
    if hits > limit.limit:
        raise RateLimited(retry_after=reset, limit=limit.description)
    return {
        "RateLimit-Limit": str(limit.limit),
        "RateLimit-Remaining": str(max(0, limit.limit - hits)),
        "RateLimit-Reset": str(reset),
    }


def client_address(request: Request) -> str:
    """Who the caller is by address: the connection's peer, or, when the peer is a proxy
    listed in FORWARDED_ALLOW_IPS, the client that proxy says it forwarded for."""
    peer = request.client.host if request.client else "unknown"
    settings: Settings = request.app.state.settings
    if not settings.forwarded_allow_ips:
        return peer
    return forwarded_client(
        peer, request.headers.getlist("x-forwarded-for"), settings.forwarded_allow_ips
    )


def forwarded_client(peer: str, forwarded_for: list[str], proxies: Sequence[Network]) -> str:
    """The client behind trusted ``proxies``, read from X-Forwarded-For the standard way:
    each proxy appends the address it got the request from, so only entries written by our
    own proxies can be believed. Walking from the right, the first address that is not one of
    our proxies is the client; anything left of it is whatever the client chose to send.
    (uvicorn's --proxy-headers reads it the same way, given the same list.)"""
    if not _is_proxy(peer, proxies):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    hops = [hop for hop in hops if hop]
    for hop in reversed(hops):
        host = _host(hop)
        if not _is_proxy(host, proxies):
            return host
    # Every hop is one of our proxies: the request started inside, at the left-most.
    return _host(hops[0]) if hops else peer


def _is_proxy(host: str, proxies: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's spelling of an IPv4 peer
    return any(address in network for network in proxies)


def _host(hop: str) -> str:
    """The address in one X-Forwarded-For entry, without a port, in its canonical spelling
    (one client, one rate-limit bucket); an entry that is not an address stays as it is."""
    if hop.startswith("["):  # [2001:db8::1]:4711
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:  # 192.0.2.1:4711
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return hop


async def get_checkout(request: Request) -> CheckoutService:
    service: CheckoutService = request.app.state.checkout
    return service


async def get_payment_state(request: Request) -> PaymentStateService:
    service: PaymentStateService = request.app.state.payment_state
    return service


async def get_operations(request: Request) -> PaymentOperations:
    service: PaymentOperations = request.app.state.operations
    return service


async def get_receipts(request: Request) -> PaymentReceipts:
    service: PaymentReceipts = request.app.state.receipts
    return service


async def get_subscriptions(request: Request) -> SubscriptionService:
    service: SubscriptionService = request.app.state.subscriptions
    return service


async def get_plan_sync(request: Request) -> PlanSync:
    service: PlanSync = request.app.state.plan_sync
    return service


CheckoutDep = Annotated[CheckoutService, Depends(get_checkout)]
SubscriptionsDep = Annotated[SubscriptionService, Depends(get_subscriptions)]
PlanSyncDep = Annotated[PlanSync, Depends(get_plan_sync)]
PaymentStateDep = Annotated[PaymentStateService, Depends(get_payment_state)]
OperationsDep = Annotated[PaymentOperations, Depends(get_operations)]
ReceiptsDep = Annotated[PaymentReceipts, Depends(get_receipts)]


async def get_sandbox_checkout(request: Request) -> SandboxCheckout:
    checkout: SandboxCheckout = request.app.state.sandbox_checkout
    return checkout


SandboxCheckoutDep = Annotated[SandboxCheckout, Depends(get_sandbox_checkout)]


async def get_authorizenet_page(request: Request) -> AuthorizeNetHostedPage:
    page: AuthorizeNetHostedPage = request.app.state.authorizenet_page
    return page


AuthorizeNetPageDep = Annotated[AuthorizeNetHostedPage, Depends(get_authorizenet_page)]


async def get_provider_admin(request: Request) -> ProviderAdmin:
    admin: ProviderAdmin = request.app.state.provider_admin
    return admin


ProviderAdminDep = Annotated[ProviderAdmin, Depends(get_provider_admin)]


async def get_admin_views(request: Request) -> AdminViews:
    views: AdminViews = request.app.state.admin_views
    return views


async def get_admin_sessions(request: Request) -> AdminSessions:
    sessions: AdminSessions = request.app.state.admin_sessions
    return sessions


# The admin dashboard (routers/admin_ui.py): its pages' service and its sign-in sessions.
AdminViewsDep = Annotated[AdminViews, Depends(get_admin_views)]
AdminSessionsDep = Annotated[AdminSessions, Depends(get_admin_sessions)]


async def get_webhook_events(request: Request) -> WebhookEvents:
    events: WebhookEvents = request.app.state.webhook_events
    return events


WebhookEventsDep = Annotated[WebhookEvents, Depends(get_webhook_events)]

# Operator routes: an admin's token, no rate limit.
Admin = Annotated[Caller, Depends(Access(need=Need.ADMIN))]
