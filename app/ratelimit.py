"""Per-endpoint rate limits, counted in Redis so they hold across worker processes.

Keyed by user when the caller is authenticated and by client address otherwise. The counter
is one Lua call on the service's own async Redis pool: slowapi, the library first chosen, is
synchronous and would block the event loop on every request (and hang it when Redis is slow).
"""

from __future__ import annotations

import math

from fastapi import Request, Response

from app.deps import OptionalUser, client_address
from app.errors import RateLimited
from app.settings import Settings
from services.payment_store import PaymentStore


class RateLimit:
    """A FastAPI dependency: ``Depends(RateLimit("verify", 30))`` allows 30 a minute."""

    def __init__(self, name: str, limit: int, *, per_seconds: int = 60) -> None:
        self.name = name
        self.limit = limit
        self.per_seconds = per_seconds
        self.description = f"{limit}/{'minute' if per_seconds == 60 else f'{per_seconds}s'}"

    async def __call__(
        self,
        request: Request,
        response: Response,
        user: OptionalUser,
    ) -> None:
        # Read from app state rather than through more dependencies: each dependency node
        # costs FastAPI time on every request, and this runs on every request.
        state = request.app.state
        settings: Settings = state.settings
        store: PaymentStore = state.store
        if not settings.rate_limits_enabled:
            return
        who = f"user:{user.sub}" if user else f"ip:{client_address(request)}"
        hits, seconds_left = await store.hit_rate_limit(f"{self.name}:{who}", self.per_seconds)
        reset = max(1, math.ceil(seconds_left))
        if hits > self.limit:
            raise RateLimited(retry_after=reset, limit=self.description)
        response.headers["RateLimit-Limit"] = str(self.limit)
        response.headers["RateLimit-Remaining"] = str(max(0, self.limit - hits))
        response.headers["RateLimit-Reset"] = str(reset)
