"""Routers take their services through small get_x dependencies, so an app can be given
another service the FastAPI way, with dependency_overrides (no patching of module globals)."""

from __future__ import annotations

from typing import Any

import httpx

from app.deps import get_checkout
from models.payment import CataloguePlan
from services.catalogue import Catalogue
from services.checkout import CheckoutService


class TestOverrides:
    async def test_a_checkout_with_another_catalogue(
        self, app: Any, client: httpx.AsyncClient
    ) -> None:
        unknown = await client.post("/api/v1/payment/create-intent", json={"plan": "gold"})
        assert unknown.status_code == 422
        current: CheckoutService = app.state.checkout
        gold = CataloguePlan(code="gold", name="Gold", prices={"EUR": 9900})
        other = CheckoutService(
            current._config,
            Catalogue({"gold": gold}),
            app.state.store,
            current._providers,
            app.state.guard,
            current._claims,
        )
        app.dependency_overrides[get_checkout] = lambda: other
        try:
            created = await client.post("/api/v1/payment/create-intent", json={"plan": "gold"})
        finally:
            app.dependency_overrides.clear()
        assert created.status_code == 201, created.text
        assert (created.json()["plan"], created.json()["amount"]) == ("gold", 9900)
