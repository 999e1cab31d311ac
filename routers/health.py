"""Liveness, readiness and the operators' view of Redis and the providers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import Admin, ProviderAdminDep
from routers.docs import problems
from services.provider_admin import AdminHealth

router = APIRouter(tags=["health"])


@router.get("/health", summary="The process is up")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Redis answers and receipts can be stored", responses=problems(503))
async def ready(admin: ProviderAdminDep) -> dict[str, str]:
    await admin.ready()
    return {"status": "ready"}


@router.get(
    "/admin/health",
    response_model=AdminHealth,
    responses=problems(401, 403),
    summary="Overall status, Redis and each provider (admins)",
)
async def admin_health(_admin: Admin, admin: ProviderAdminDep) -> JSONResponse:
    body = await admin.health()
    return JSONResponse(
        body.model_dump(mode="json"), status_code=503 if body.status == "unhealthy" else 200
    )
