"""Plan sync: every recurring plan, at every price, made a vendor price at each provider that
bills subscriptions, and recorded in the provider mappings.

Entity ``price``: our ``RecurringPrice.key`` <-> the vendor's price id (a changed price is a
new key, so a new vendor price: an old one is never edited). Entity ``plan``: ``code:currency``
-> the latest vendor price of that plan in that currency. It runs at start-up, in the
background, and on demand (``payments plans sync``, ``POST /api/v1/providers/plans/sync``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from services.catalogue import Catalogue
from services.errors import ServiceError
from services.payment_providers.base import BasePaymentProvider, Capability, RecurringPrice
from services.payment_providers.factory import charges
from services.payment_store import PaymentStore

if TYPE_CHECKING:
    from services.payment_providers.factory import PaymentProviderFactory
    from services.payment_providers.guard import ProviderGuard

log = logging.getLogger("payments.plan_sync")


@dataclass(frozen=True, slots=True)
class SyncedPrice:
    provider: str
    price_key: str
    vendor_price_id: str | None  # None: it failed (see error)
    error: str | None = None


def parse_price_key(key: str) -> tuple[str, str, int]:
    """(plan code, currency, amount) of a ``RecurringPrice.key``."""
    code, currency, amount, *_ = key.split(":")
    return code, currency, int(amount)


class PlanSync:
    def __init__(
        self,
        catalogue: Catalogue,
        store: PaymentStore,
        providers: Callable[[], PaymentProviderFactory],
        guard: ProviderGuard,
    ) -> None:
        self._catalogue = catalogue
        self._store = store
        self._providers = providers
        self._guard = guard

    def billers(self) -> list[BasePaymentProvider]:
        """The active providers that bill subscriptions."""
        factory = self._providers()
        return [
            provider
            for provider in factory.providers()
            if Capability.SUBSCRIPTIONS in provider.capabilities and factory.is_active(provider)
        ]

    async def run(self) -> list[SyncedPrice]:
        """Sync every recurring price at every biller that can charge its currency. A failure
        is logged and reported, and the rest go on."""
        results = []
        for provider in self.billers():
            for price in self._catalogue.recurring_prices():
                if not charges(provider, price.plan.currency):
                    continue
                try:
                    vendor_id = await self.vendor_price(provider, price, refresh=True)
                except ServiceError as error:
                    log.warning(
                        "plans.sync_failed",
                        extra={"provider": provider.name, "price": price.key, "code": error.code},
                    )
                    results.append(SyncedPrice(provider.name, price.key, None, error.code))
                    continue
                results.append(SyncedPrice(provider.name, price.key, vendor_id))
        log.info(
            "plans.synced",
            extra={
                "synced": sum(1 for item in results if item.vendor_price_id),
                "failed": sum(1 for item in results if item.error),
            },
        )
        return results

    async def run_logged(self) -> None:
        """``run`` for the app's start-up task: never raises."""
        try:
            await self.run()
        except Exception:
            log.exception("plans.sync_crashed")

    async def vendor_price(
        self, provider: BasePaymentProvider, price: RecurringPrice, *, refresh: bool = False
    ) -> str:
        """The vendor's price id for ``price``: the mapped one (asking the vendor again only
        with ``refresh``), else one made now and recorded."""
        existing = await self._store.external_id(provider.name, "price", price.key)
        if existing is not None and not refresh:
            return existing
        vendor_id = await self._guard.run(
            provider, partial(provider.sync_price, price, existing=existing)
        )
        if vendor_id != existing:
            await self._store.link(provider.name, "price", price.key, vendor_id)
        plan_key = f"{price.plan.code}:{price.plan.currency}"
        if await self._store.external_id(provider.name, "plan", plan_key) != vendor_id:
            await self._store.link(provider.name, "plan", plan_key, vendor_id)
        return vendor_id

    async def price_key_of(self, provider: str, vendor_price_id: str) -> str | None:
        """Our price key for a vendor price id, if it is one of ours."""
        return await self._store.local_id(provider, "price", vendor_price_id)
