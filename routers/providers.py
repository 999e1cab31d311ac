"""The operators' API for providers: what is there, stored configurations, routing."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.deps import Admin, PaymentServiceDep
from models.payment import ProviderName
from routers.docs import problems
from services.errors import NotFound, ServiceError, UnknownProvider
from services.payment_providers.base import BasePaymentProvider, Capability
from services.provider_configs import (
    ProviderConfigStore,
    RoutingConfig,
    StoredProviderConfig,
    secret_values,
)

router = APIRouter(prefix="/api/v1/providers", tags=["providers (admin)"])

ConfigId = Annotated[str, Path(pattern=r"^pc_[0-9a-f]{16}$")]


class InvalidProviderConfig(ServiceError):
    status = 422
    code = "invalid_provider_config"
    title = "The configuration does not fit the provider"


class ProviderInfo(BaseModel):
    name: str
    display_name: str
    service_type: str
    id_prefixes: list[str]
    capabilities: list[str]
    configured: bool
    active: bool
    default: bool
    breaker: str


class ProviderSchema(BaseModel):
    provider: str
    config: dict[str, Any]
    config_secret: dict[str, Any]
    capabilities: list[str]


class ProviderConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider_key: ProviderName
    service_type: Literal["payment"] = "payment"
    config: dict[str, Any] = Field(default_factory=dict)
    config_secret: dict[str, Any] = Field(default_factory=dict)
    capabilities: list[Capability] | None = None
    active: bool = True


class ProviderConfigPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] | None = None
    config_secret: dict[str, Any] | None = None
    capabilities: list[Capability] | None = None
    active: bool | None = None


def _configs(request: Request) -> ProviderConfigStore:
    store: ProviderConfigStore = request.app.state.provider_configs
    return store


ConfigStoreDep = Annotated[ProviderConfigStore, Depends(_configs)]


def _provider_class(service: Any, key: str) -> type[BasePaymentProvider]:
    classes: dict[str, type[BasePaymentProvider]] = service.manager.classes
    try:
        return classes[key]
    except KeyError:
        raise UnknownProvider(
            f"No provider named {key!r}; known: {', '.join(sorted(classes))}"
        ) from None


def _validated(
    cls: type[BasePaymentProvider],
    config: dict[str, Any] | None,
    secrets: dict[str, Any] | None,
    capabilities: list[Capability] | None,
) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """Check a configuration against the provider's models. Errors name the field and never
    carry the value: it may be a secret."""
    errors: list[dict[str, Any]] = []
    public = private = None
    for part, model, values in (
        ("config", cls.config_model, config),
        ("config_secret", cls.secrets_model, secrets),
    ):
        if values is None:
            continue
        try:
            validated = model.model_validate(values)
        except ValidationError as error:
            errors += [
                {"loc": [part, *map(str, item["loc"])], "type": item["type"], "msg": item["msg"]}
                for item in error.errors(include_input=False, include_url=False)
            ]
            continue
        if part == "config":
            public = validated.model_dump(mode="json", exclude_none=True)
        else:
            private = secret_values(validated)
    for capability in capabilities or []:
        if capability not in cls.capabilities:
            errors.append(
                {
                    "loc": ["capabilities"],
                    "type": "unsupported",
                    "msg": f"{cls.name} does not offer {capability}",
                }
            )
    if errors:
        fields = ", ".join(".".join(item["loc"]) for item in errors)
        raise InvalidProviderConfig(f"Invalid fields: {fields}", extra={"errors": errors})
    return public, private


@router.get(
    "",
    response_model=list[ProviderInfo],
    responses=problems(401, 403),
    summary="Every provider: prefixes, capabilities, configured, active, breaker",
)
async def list_providers(_admin: Admin, service: PaymentServiceDep) -> list[ProviderInfo]:
    factory = service.providers
    result = []
    for provider in factory.providers():
        result.append(
            ProviderInfo(
                name=provider.name,
                display_name=provider.display_name,
                service_type=provider.service_type,
                id_prefixes=list(provider.id_prefixes),
                capabilities=sorted(provider.capabilities),
                configured=provider.is_configured(),
                active=factory.is_active(provider),
                default=provider.name == factory.default,
                breaker=await service.guard.state(provider.name),
            )
        )
    return result


@router.get("/routing", response_model=RoutingConfig, responses=problems(401, 403))
async def get_routing(_admin: Admin, service: PaymentServiceDep) -> RoutingConfig:
    factory = service.providers
    return RoutingConfig(
        default=factory.default, fallback=list(factory.fallback), weights=factory.weights or None
    )


@router.put(
    "/routing",
    response_model=RoutingConfig,
    responses=problems(401, 403, 422),
    summary="Switch the default provider, the fallback order or a weighted split",
)
async def put_routing(
    body: RoutingConfig, _admin: Admin, service: PaymentServiceDep, configs: ConfigStoreDep
) -> RoutingConfig:
    names = [body.default] if body.default else []
    names += list(body.fallback or []) + list(body.weights or {})
    for name in names:
        _provider_class(service, name)
    if body.weights is not None and (
        any(weight < 0 for weight in body.weights.values()) or not sum(body.weights.values())
    ):
        raise InvalidProviderConfig("Weights must be non-negative and not all zero")
    await configs.set_routing(body)
    await service.manager.refresh()
    return await get_routing(_admin, service)


class MappingOut(BaseModel):
    provider: str
    entity: str
    local_id: str
    external_id: str


class MappingPage(BaseModel):
    items: list[MappingOut]
    next_cursor: int | None


@router.get(
    "/mappings",
    response_model=MappingPage,
    responses=problems(401, 403, 404, 422),
    summary="Our IDs and the providers' IDs for the same things, looked up either way",
)
async def mappings(
    _admin: Admin,
    service: PaymentServiceDep,
    provider: Annotated[str, Query(pattern=r"^[a-z0-9_\-]{1,64}$")],
    entity: Annotated[str, Query(pattern=r"^[a-z_]{1,32}$")] = "payment",
    local_id: Annotated[str | None, Query(max_length=256)] = None,
    external_id: Annotated[str | None, Query(max_length=256)] = None,
    cursor: Annotated[int, Query(ge=0)] = 0,
) -> MappingPage:
    _provider_class(service, provider)
    if local_id is not None or external_id is not None:
        found = await service.store.lookup_mapping(
            provider, entity, local_id=local_id, external_id=external_id
        )
        if found is None:
            raise NotFound(f"No {entity} mapping for that ID at {provider}")
        return MappingPage(items=[MappingOut(**asdict(found))], next_cursor=None)
    next_cursor, items = await service.store.list_mappings(provider, entity, cursor=cursor)
    return MappingPage(
        items=[MappingOut(**asdict(item)) for item in items], next_cursor=next_cursor or None
    )


class ReconciliationStats(BaseModel):
    runs: int
    checked: int
    changed: int
    settled: int
    gave_up: int
    errors: int
    queued: int = Field(description="Payments waiting to be verified again")
    due: int = Field(description="Of those, the ones whose time has come")
    schedule_seconds: list[float]
    last_run_at: str | None
    last_run_ms: float | None
    leader: str | None = Field(description="The worker doing reconciliation now")
    this_worker: str


@router.get(
    "/reconciliation",
    response_model=ReconciliationStats,
    responses=problems(401, 403, 503),
    summary="What the reconciliation job has done, and what it still has to do",
)
async def reconciliation(_admin: Admin, request: Request) -> ReconciliationStats:
    return ReconciliationStats.model_validate(await request.app.state.reconciler.stats())


@router.get("/configs", response_model=list[StoredProviderConfig], responses=problems(401, 403))
async def list_configs(_admin: Admin, configs: ConfigStoreDep) -> list[StoredProviderConfig]:
    return await configs.all()


@router.post(
    "/configs",
    response_model=StoredProviderConfig,
    status_code=201,
    responses=problems(401, 403, 409, 422, 503),
    summary="Store a provider's configuration (secrets encrypted at rest)",
)
async def create_config(
    body: ProviderConfigIn, _admin: Admin, service: PaymentServiceDep, configs: ConfigStoreDep
) -> StoredProviderConfig:
    cls = _provider_class(service, body.provider_key)
    public, private = _validated(cls, body.config, body.config_secret, body.capabilities)
    stored = await configs.create(
        provider_key=body.provider_key,
        service_type=body.service_type,
        config=public or {},
        secrets_=private or {},
        capabilities=[str(c) for c in body.capabilities] if body.capabilities else None,
        active=body.active,
    )
    await service.manager.refresh()  # this worker at once; the others within a second
    return stored


@router.get(
    "/configs/{config_id}", response_model=StoredProviderConfig, responses=problems(401, 403, 404)
)
async def get_config(
    config_id: ConfigId, _admin: Admin, configs: ConfigStoreDep
) -> StoredProviderConfig:
    return await configs.get(config_id)


@router.patch(
    "/configs/{config_id}",
    response_model=StoredProviderConfig,
    responses=problems(401, 403, 404, 422, 503),
    summary="Change, activate or deactivate a stored configuration",
)
async def patch_config(
    config_id: ConfigId,
    body: ProviderConfigPatch,
    _admin: Admin,
    service: PaymentServiceDep,
    configs: ConfigStoreDep,
) -> StoredProviderConfig:
    current = await configs.get(config_id)
    cls = _provider_class(service, current.provider_key)
    secrets_in = body.config_secret
    if secrets_in is not None:
        # Fields left out keep their stored values, so one secret can change alone.
        secrets_in = {**await configs.current_secrets(config_id), **secrets_in}
    public, private = _validated(cls, body.config, secrets_in, body.capabilities)
    stored = await configs.update(
        config_id,
        config=public,
        secrets_=private,
        capabilities=[str(c) for c in body.capabilities] if body.capabilities else None,
        active=body.active,
    )
    await service.manager.refresh()
    return stored


@router.delete("/configs/{config_id}", status_code=204, responses=problems(401, 403, 404))
async def delete_config(
    config_id: ConfigId, _admin: Admin, service: PaymentServiceDep, configs: ConfigStoreDep
) -> Response:
    await configs.delete(config_id)
    await service.manager.refresh()
    return Response(status_code=204)


@router.get(
    "/{provider_key}/schema", response_model=ProviderSchema, responses=problems(401, 403, 422)
)
async def provider_schema(
    provider_key: Annotated[str, Path(max_length=64)],
    _admin: Admin,
    service: PaymentServiceDep,
) -> ProviderSchema:
    cls = _provider_class(service, provider_key)
    return ProviderSchema(
        provider=cls.name,
        config=cls.config_model.model_json_schema(),
        config_secret=cls.secrets_model.model_json_schema(),
        capabilities=sorted(cls.capabilities),
    )
