"""The operators' API for providers: what is there, stored configurations, routing."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from app.deps import Admin, ProviderAdminDep
from routers.docs import problems
from services.provider_admin import (
    MappingIn,
    MappingOut,
    MappingPage,
    ProviderConfigIn,
    ProviderConfigPatch,
    ProviderInfo,
    ProviderSchema,
    ReconciliationStats,
)
from services.provider_configs import RoutingConfig, StoredProviderConfig

router = APIRouter(prefix="/api/v1/providers", tags=["providers (admin)"])

ConfigId = Annotated[str, Path(pattern=r"^pc_[0-9a-f]{16}$")]


@router.get(
    "",
    response_model=list[ProviderInfo],
    responses=problems(401, 403),
    summary="Every provider: prefixes, capabilities, configured, active, breaker",
)
async def list_providers(_admin: Admin, admin: ProviderAdminDep) -> list[ProviderInfo]:
    return await admin.providers()


@router.get("/routing", response_model=RoutingConfig, responses=problems(401, 403))
async def get_routing(_admin: Admin, admin: ProviderAdminDep) -> RoutingConfig:
    return admin.routing()


@router.put(
    "/routing",
    response_model=RoutingConfig,
    responses=problems(401, 403, 422),
    summary="Switch the default provider, the fallback order or a weighted split",
)
async def put_routing(
    body: RoutingConfig,
    _admin: Admin,
    admin: ProviderAdminDep,
    force: Annotated[
        bool, Query(description="Route to a provider even if it cannot take payments yet")
    ] = False,
) -> RoutingConfig:
    return await admin.set_routing(body, force=force)


@router.put(
    "/mappings",
    response_model=MappingOut,
    responses=problems(401, 403, 422),
    summary="Map one of our IDs to the provider's (a plan to a Paddle price, a variant)",
)
async def link_mapping(body: MappingIn, _admin: Admin, admin: ProviderAdminDep) -> MappingOut:
    return await admin.link(body)


@router.get(
    "/mappings",
    response_model=MappingPage,
    responses=problems(401, 403, 404, 422),
    summary="Our IDs and the providers' IDs for the same things, looked up either way",
)
async def mappings(
    _admin: Admin,
    admin: ProviderAdminDep,
    provider: Annotated[str, Query(pattern=r"^[a-z0-9_\-]{1,64}$")],
    entity: Annotated[str, Query(pattern=r"^[a-z_]{1,32}$")] = "payment",
    local_id: Annotated[str | None, Query(max_length=256)] = None,
    external_id: Annotated[str | None, Query(max_length=256)] = None,
    cursor: Annotated[int, Query(ge=0)] = 0,
) -> MappingPage:
    return await admin.mappings(
        provider, entity, local_id=local_id, external_id=external_id, cursor=cursor
    )


@router.get(
    "/reconciliation",
    response_model=ReconciliationStats,
    responses=problems(401, 403, 503),
    summary="What the reconciliation job has done, and what it still has to do",
)
async def reconciliation(_admin: Admin, admin: ProviderAdminDep) -> ReconciliationStats:
    return await admin.reconciliation()


@router.get("/configs", response_model=list[StoredProviderConfig], responses=problems(401, 403))
async def list_configs(_admin: Admin, admin: ProviderAdminDep) -> list[StoredProviderConfig]:
    return await admin.configs()


@router.post(
    "/configs",
    response_model=StoredProviderConfig,
    status_code=201,
    responses=problems(401, 403, 409, 422, 503),
    summary="Store a provider's configuration (secrets encrypted at rest)",
)
async def create_config(
    body: ProviderConfigIn, _admin: Admin, admin: ProviderAdminDep
) -> StoredProviderConfig:
    return await admin.create_config(body)


@router.get(
    "/configs/{config_id}", response_model=StoredProviderConfig, responses=problems(401, 403, 404)
)
async def get_config(
    config_id: ConfigId, _admin: Admin, admin: ProviderAdminDep
) -> StoredProviderConfig:
    return await admin.config(config_id)


@router.patch(
    "/configs/{config_id}",
    response_model=StoredProviderConfig,
    responses=problems(401, 403, 404, 422, 503),
    summary="Change, activate or deactivate a stored configuration",
)
async def patch_config(
    config_id: ConfigId, body: ProviderConfigPatch, _admin: Admin, admin: ProviderAdminDep
) -> StoredProviderConfig:
    return await admin.update_config(config_id, body)


@router.delete("/configs/{config_id}", status_code=204, responses=problems(401, 403, 404))
async def delete_config(config_id: ConfigId, _admin: Admin, admin: ProviderAdminDep) -> Response:
    await admin.delete_config(config_id)
    return Response(status_code=204)


@router.get(
    "/{provider_key}/schema", response_model=ProviderSchema, responses=problems(401, 403, 422)
)
async def provider_schema(
    provider_key: Annotated[str, Path(max_length=64)], _admin: Admin, admin: ProviderAdminDep
) -> ProviderSchema:
    return admin.schema(provider_key)
