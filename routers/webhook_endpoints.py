"""The operators' API for the merchant's webhook endpoints and their deliveries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from app.deps import Admin, WebhookEventsDep
from routers.docs import problems
from services.events.deliveries import Delivery
from services.events.endpoints import (
    ENDPOINT_ID_PATTERN,
    RotatedSecret,
    SecretRotation,
    WebhookEndpoint,
    WebhookEndpointCreated,
    WebhookEndpointIn,
    WebhookEndpointPatch,
)

router = APIRouter(prefix="/api/v1/webhook-endpoints", tags=["webhook endpoints (admin)"])

EndpointId = Annotated[str, Path(pattern=ENDPOINT_ID_PATTERN)]
DeliveryId = Annotated[str, Path(pattern=r"^wd_[0-9a-f]{24}$")]
EventId = Annotated[str, Path(pattern=r"^evt_[0-9a-f]{24}$")]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookEndpointCreated,
    responses=problems(401, 403, 409, 422, 503),
    summary="Add an endpoint; its signing secret is in this answer only",
)
async def create_endpoint(
    body: WebhookEndpointIn, _admin: Admin, events: WebhookEventsDep
) -> WebhookEndpointCreated:
    return await events.create_endpoint(body)


@router.get("", response_model=list[WebhookEndpoint], responses=problems(401, 403))
async def list_endpoints(_admin: Admin, events: WebhookEventsDep) -> list[WebhookEndpoint]:
    return await events.list_endpoints()


@router.get("/{endpoint_id}", response_model=WebhookEndpoint, responses=problems(401, 403, 404))
async def get_endpoint(
    endpoint_id: EndpointId, _admin: Admin, events: WebhookEventsDep
) -> WebhookEndpoint:
    return await events.get_endpoint(endpoint_id)


@router.patch(
    "/{endpoint_id}", response_model=WebhookEndpoint, responses=problems(401, 403, 404, 422)
)
async def update_endpoint(
    endpoint_id: EndpointId, body: WebhookEndpointPatch, _admin: Admin, events: WebhookEventsDep
) -> WebhookEndpoint:
    return await events.update_endpoint(endpoint_id, body)


@router.delete(
    "/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problems(401, 403, 404)
)
async def delete_endpoint(
    endpoint_id: EndpointId, _admin: Admin, events: WebhookEventsDep
) -> Response:
    await events.delete_endpoint(endpoint_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{endpoint_id}/rotate-secret",
    response_model=RotatedSecret,
    responses=problems(401, 403, 404, 422, 503),
    summary="A new signing secret; the old one also signs for the overlap period",
)
async def rotate_secret(
    endpoint_id: EndpointId,
    _admin: Admin,
    events: WebhookEventsDep,
    body: SecretRotation | None = None,
) -> RotatedSecret:
    return await events.rotate_secret(endpoint_id, body or SecretRotation())


@router.get(
    "/{endpoint_id}/deliveries",
    response_model=list[Delivery],
    responses=problems(401, 403, 404),
    summary="The endpoint's latest deliveries, newest first",
)
async def deliveries(
    endpoint_id: EndpointId,
    _admin: Admin,
    events: WebhookEventsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[Delivery]:
    return await events.delivery_log(endpoint_id, limit=limit)


@router.get(
    "/{endpoint_id}/deliveries/{delivery_id}",
    response_model=Delivery,
    responses=problems(401, 403, 404),
)
async def delivery(
    endpoint_id: EndpointId, delivery_id: DeliveryId, _admin: Admin, events: WebhookEventsDep
) -> Delivery:
    return await events.get_delivery(endpoint_id, delivery_id)


@router.post(
    "/{endpoint_id}/deliveries/{delivery_id}/replay",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Delivery,
    responses=problems(401, 403, 404),
    summary="Send a delivery's event again (a new delivery, after the payment's others)",
)
async def replay_delivery(
    endpoint_id: EndpointId, delivery_id: DeliveryId, _admin: Admin, events: WebhookEventsDep
) -> Delivery:
    return await events.replay_delivery(endpoint_id, delivery_id)


@router.post(
    "/{endpoint_id}/events/{event_id}/replay",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Delivery,
    responses=problems(401, 403, 404),
    summary="Send an event of the retention period to this endpoint",
)
async def replay_event(
    endpoint_id: EndpointId, event_id: EventId, _admin: Admin, events: WebhookEventsDep
) -> Delivery:
    return await events.replay_event(endpoint_id, event_id)
