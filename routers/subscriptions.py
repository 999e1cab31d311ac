"""The subscription API and entitlements: thin handlers that parse, authorize, rate-limit and
call the service; and the admins' plan sync."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel

from app.deps import Access, Admin, Caller, Need, PlanSyncDep, RateLimit, SubscriptionsDep
from models.payment import PAYMENT_ID_PATTERN
from models.subscription import (
    CancelSubscriptionRequest,
    ChangePlanRequest,
    CreateSubscriptionRequest,
    EntitlementsResponse,
    PortalResponse,
    SubscriptionHistoryResponse,
    SubscriptionListResponse,
    SubscriptionResponse,
)
from routers.docs import problems
from routers.payments import _IDEMPOTENCY_KEY_PARAMETER, _idempotency_key, _json
from services.errors import SubscriptionNotFound

router = APIRouter(tags=["subscriptions"])

SubscriptionIdPath = Annotated[str, Path(max_length=256)]
_COMMON = (401, 404, 413, 422, 429, 503)

SubscribeCaller = Annotated[Caller, Depends(Access(RateLimit("subscribe", 10), need=Need.USER))]
ReadCaller = Annotated[Caller, Depends(Access(RateLimit("subscriptions", 60), need=Need.USER))]
ChangeCaller = Annotated[
    Caller, Depends(Access(RateLimit("subscription-change", 10), need=Need.USER))
]


def _checked_id(subscription_id: str) -> str:
    if not subscription_id.startswith("sub_") or not re.fullmatch(
        PAYMENT_ID_PATTERN, subscription_id
    ):
        raise SubscriptionNotFound("No such subscription")
    return subscription_id


@router.post(
    "/api/v1/subscriptions",
    response_model=SubscriptionResponse,
    status_code=201,
    responses=problems(*_COMMON, 402, 409, 502),
    summary="Subscribe to a recurring plan: the vendor's page to start it",
    openapi_extra={"parameters": [_IDEMPOTENCY_KEY_PARAMETER]},
)
async def subscribe(
    body: CreateSubscriptionRequest,
    request: Request,
    caller: SubscribeCaller,
    subscriptions: SubscriptionsDep,
) -> Response:
    created = await subscriptions.create(
        body,
        user=caller.signed_in,
        idempotency_key=_idempotency_key(request),
        base_url=str(request.base_url),
    )
    return _json(created.response, caller, 201, replayed=created.replayed)


@router.get(
    "/api/v1/subscriptions",
    response_model=SubscriptionListResponse,
    responses=problems(401, 429, 503),
    summary="The caller's subscriptions, newest first",
)
async def mine(caller: ReadCaller, subscriptions: SubscriptionsDep) -> Response:
    return _json(await subscriptions.mine(caller.signed_in), caller)


@router.get(
    "/api/v1/subscriptions/{subscription_id}",
    response_model=SubscriptionResponse,
    responses=problems(401, 404, 429, 503),
    summary="One subscription (owner or admin)",
)
async def view(
    subscription_id: SubscriptionIdPath, caller: ReadCaller, subscriptions: SubscriptionsDep
) -> Response:
    return _json(await subscriptions.view(_checked_id(subscription_id), caller.signed_in), caller)


@router.get(
    "/api/v1/subscriptions/{subscription_id}/history",
    response_model=SubscriptionHistoryResponse,
    responses=problems(401, 404, 429, 503),
    summary="A subscription's status changes and renewals (owner or admin)",
)
async def history(
    subscription_id: SubscriptionIdPath, caller: ReadCaller, subscriptions: SubscriptionsDep
) -> Response:
    found = await subscriptions.history(_checked_id(subscription_id), caller.signed_in)
    return _json(found, caller)


@router.post(
    "/api/v1/subscriptions/{subscription_id}/cancel",
    response_model=SubscriptionResponse,
    responses=problems(*_COMMON, 409, 502),
    summary="Cancel at the end of the paid period (default) or now",
)
async def cancel(
    subscription_id: SubscriptionIdPath,
    caller: ChangeCaller,
    subscriptions: SubscriptionsDep,
    body: CancelSubscriptionRequest | None = None,
) -> Response:
    at_period_end = (body or CancelSubscriptionRequest()).at_period_end
    canceled = await subscriptions.cancel(
        _checked_id(subscription_id), caller.signed_in, at_period_end=at_period_end
    )
    return _json(canceled, caller)


@router.post(
    "/api/v1/subscriptions/{subscription_id}/resume",
    response_model=SubscriptionResponse,
    responses=problems(*_COMMON, 409, 502),
    summary="Undo a cancel at the period's end, before the period ends",
)
async def resume(
    subscription_id: SubscriptionIdPath, caller: ChangeCaller, subscriptions: SubscriptionsDep
) -> Response:
    resumed = await subscriptions.resume(_checked_id(subscription_id), caller.signed_in)
    return _json(resumed, caller)


@router.post(
    "/api/v1/subscriptions/{subscription_id}/change-plan",
    response_model=SubscriptionResponse,
    responses=problems(*_COMMON, 402, 409, 502),
    summary="Upgrade now (charged in full at once) or downgrade at renewal",
)
async def change_plan(
    subscription_id: SubscriptionIdPath,
    body: ChangePlanRequest,
    caller: ChangeCaller,
    subscriptions: SubscriptionsDep,
) -> Response:
    changed = await subscriptions.change_plan(
        _checked_id(subscription_id), caller.signed_in, body.plan
    )
    return _json(changed, caller)


@router.post(
    "/api/v1/subscriptions/{subscription_id}/portal",
    response_model=PortalResponse,
    responses=problems(*_COMMON, 502),
    summary="The vendor's customer portal for this subscription, where it has one",
)
async def portal(
    subscription_id: SubscriptionIdPath,
    request: Request,
    caller: ChangeCaller,
    subscriptions: SubscriptionsDep,
) -> Response:
    found = await subscriptions.portal(
        _checked_id(subscription_id), caller.signed_in, str(request.base_url)
    )
    return _json(found, caller)


@router.get(
    "/api/v1/entitlements",
    response_model=EntitlementsResponse,
    responses=problems(401, 403, 422, 429, 503),
    summary="The plans a user may use now (the caller's; admins may name any user)",
)
async def entitlements(
    caller: ReadCaller,
    subscriptions: SubscriptionsDep,
    user: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
) -> Response:
    return _json(await subscriptions.entitlements(caller.signed_in, user), caller)


class SyncedPriceView(BaseModel):
    provider: str
    price_key: str
    vendor_price_id: str | None = None
    error: str | None = None


class PlanSyncResponse(BaseModel):
    prices: list[SyncedPriceView]


@router.post(
    "/api/v1/providers/plans/sync",
    response_model=PlanSyncResponse,
    responses=problems(401, 403, 503),
    tags=["providers (admin)"],
    summary="Make vendor prices of every recurring plan now, at each provider that bills",
)
async def sync_plans(caller: Admin, plan_sync: PlanSyncDep) -> Response:
    synced = await plan_sync.run()
    response = PlanSyncResponse(
        prices=[
            SyncedPriceView(
                provider=item.provider,
                price_key=item.price_key,
                vendor_price_id=item.vendor_price_id,
                error=item.error,
            )
            for item in synced
        ]
    )
    return _json(response, caller)
