"""Liveness, readiness and the operators' view of Redis and the providers."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.deps import Admin, PaymentServiceDep, PlatformParts
from models.payment import ProviderHealth, ServiceHealth
from routers.docs import problems
from services.errors import StoreUnavailable
from services.payment_providers.base import BasePaymentProvider
from services.payment_providers.breaker import BreakerState
from services.provider_configs import SecretsProblem, UnreadableConfigs

router = APIRouter(tags=["health"])

HEALTH_CHECK_TIMEOUT_S = 5.0


@router.get("/health", summary="The process is up")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Redis answers", responses=problems(503))
async def ready(service: PaymentServiceDep) -> dict[str, str]:
    await service.store.ping()
    return {"status": "ready"}


class StoredConfigsHealth(BaseModel):
    status: Literal["ok", "degraded"]
    problem: SecretsProblem | None = None
    reason: str | None = None
    held_out: list[str] = Field(
        default_factory=list, description="Providers whose stored configuration is unreadable"
    )

    @classmethod
    def of(cls, unreadable: UnreadableConfigs | None) -> StoredConfigsHealth:
        if unreadable is None:
            return cls(status="ok")
        return cls(
            status="degraded",
            problem=unreadable.problem,
            reason=unreadable.reason,
            held_out=list(unreadable.providers),
        )


class AdminHealth(ServiceHealth):
    stored_configs: StoredConfigsHealth


async def _provider_health(
    provider: BasePaymentProvider, service: PlatformParts, unreadable: UnreadableConfigs | None
) -> ProviderHealth:
    if unreadable is not None and provider.name in unreadable.providers:
        return ProviderHealth(
            provider=provider.name, status="error", configured=False, message=unreadable.reason
        )
    if not provider.is_configured():
        return ProviderHealth(provider=provider.name, status="unconfigured", configured=False)
    breaker = await service.guard.state(provider.name)
    if breaker is not BreakerState.CLOSED:
        return ProviderHealth(
            provider=provider.name,
            status="circuit_open",
            configured=True,
            breaker=breaker,
            message="recent technical failures; calls are refused until a probe succeeds",
        )
    try:
        result = await asyncio.wait_for(provider.health_check(), HEALTH_CHECK_TIMEOUT_S)
    except Exception as error:  # a health check reports failure, it does not fail
        return ProviderHealth(
            provider=provider.name,
            status="error",
            configured=True,
            message=type(error).__name__,
        )
    return ProviderHealth(
        provider=provider.name,
        status="connected" if result.healthy else "error",
        configured=True,
        breaker=breaker,
        latency_ms=result.latency_ms,
        message=result.message,
    )


@router.get(
    "/admin/health",
    response_model=AdminHealth,
    responses=problems(401, 403),
    summary="Overall status, Redis and each provider (admins)",
)
async def admin_health(_admin: Admin, service: PaymentServiceDep) -> JSONResponse:
    started = time.perf_counter()
    try:
        await service.store.ping()
        redis = {
            "status": "connected",
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        }
    except StoreUnavailable:
        redis = {"status": "error", "latency_ms": None}
    # Read once, with the providers it describes: a reload may swap both meanwhile.
    factory, unreadable = service.providers, service.manager.unreadable_configs()
    checks = await asyncio.gather(
        *(_provider_health(provider, service, unreadable) for provider in factory.providers())
    )
    providers = {check.provider: check for check in checks}
    default = providers.get(factory.default)
    if redis["status"] != "connected" or default is None or default.status != "connected":
        status = "unhealthy"
    elif unreadable is not None or any(
        check.status in {"error", "circuit_open"} for check in checks
    ):
        status = "degraded"
    else:
        status = "healthy"
    body = AdminHealth(
        status=status,
        redis=redis,
        providers=providers,
        stored_configs=StoredConfigsHealth.of(unreadable),
    )
    return JSONResponse(
        body.model_dump(mode="json"), status_code=200 if status != "unhealthy" else 503
    )
