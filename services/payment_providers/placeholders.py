"""Providers the catalogue names but this service cannot reach yet.

They are registered so that their IDs route and their names resolve, and they refuse every
operation with ``provider_not_configured`` instead of pretending to work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.errors import ProviderNotConfigured

from .base import (
    BasePaymentProvider,
    Capability,
    HealthStatus,
    IntentRequest,
    IntentResult,
    PaymentState,
    ProviderDeps,
)

if TYPE_CHECKING:
    from app.settings import Settings


class UnavailableProvider(BasePaymentProvider):
    """A named provider with no integration behind it."""

    @classmethod
    def from_settings(cls, settings: Settings, deps: ProviderDeps) -> UnavailableProvider:
        return cls()

    def is_configured(self) -> bool:
        return False

    def _refuse(self) -> ProviderNotConfigured:
        return ProviderNotConfigured(
            f"{self.display_name} is not available on this service yet", provider=self.name
        )

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        raise self._refuse()

    async def verify_payment(self, payment_id: str) -> PaymentState:
        raise self._refuse()

    async def health_check(self) -> HealthStatus:
        return HealthStatus(healthy=False, message="no integration available")


class MobilePayProvider(UnavailableProvider):
    name = "mobilepay"
    display_name = "MobilePay"
    id_prefixes = ("mp_",)
    capabilities = frozenset({Capability.WALLET, Capability.REDIRECT})


class GooglePayProvider(UnavailableProvider):
    name = "googlepay"
    display_name = "Google Pay"
    id_prefixes = ("gp_",)
    capabilities = frozenset({Capability.WALLET})


class ApplePayProvider(UnavailableProvider):
    name = "applepay"
    display_name = "Apple Pay"
    id_prefixes = ("ap_",)
    capabilities = frozenset({Capability.WALLET})
