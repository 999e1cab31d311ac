"""Prometheus metrics for admins on the API's port (METRICS_PORT serves them without a token,
on a private address)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.deps import Admin, ProviderAdminDep
from app.metrics import metrics_response, render
from routers.docs import problems

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        **problems(401, 403, 503),
    },
    summary="Prometheus metrics of every worker (admins)",
)
async def metrics(_admin: Admin, admin: ProviderAdminDep) -> Response:
    return metrics_response(render(await admin.live_figures()))
