"""Providers the catalogue names but this service cannot reach yet, and stand-ins for
providers whose stored configuration cannot be read.

They are registered so that their IDs route and their names resolve, and they refuse every
operation with ``provider_not_configured`` instead of pretending to work.
"""

from __future__ import annotations

from typing import Any, NoReturn, cast

from services.errors import ProviderNotConfigured

from .base import (
    BasePaymentProvider,
    Capability,
    HealthStatus,
    IntentRequest,
    IntentResult,
    NoSettings,
    PaymentState,
    ProviderDeps,
    RefundResult,
    WebhookEvent,
)


class UnavailableProvider(BasePaymentProvider):
    """A named provider with no integration behind it."""

    @classmethod
    def from_config(
        cls, config: NoSettings | None, secrets: NoSettings | None, deps: ProviderDeps
    ) -> UnavailableProvider:
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


class HeldOutProvider(BasePaymentProvider):
    """Stands in for a provider whose stored configuration cannot be read (its secrets do
    not decrypt with PROVIDER_SECRETS_KEY). Its IDs still route to it and it refuses every
    operation, with the reason: nothing is done with credentials other than the ones an
    operator stored (the environment's may be another account, or test keys), and a refused
    webhook is delivered again by the provider later."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    @classmethod
    def standing_in_for(cls, provider: type[BasePaymentProvider], reason: str) -> HeldOutProvider:
        # The provider's own name, prefixes and capabilities, so that an operation it offers
        # is refused as unavailable (503), not as unsupported.
        stand_in = type(
            f"HeldOut{provider.__name__}",
            (cls,),
            {
                "name": provider.name,
                "display_name": provider.display_name,
                "id_prefixes": provider.id_prefixes,
                "capabilities": provider.capabilities,
                "service_type": provider.service_type,
            },
        )
        return cast(HeldOutProvider, stand_in(reason))

    @classmethod
    def from_config(cls, config: Any, secrets: Any, deps: ProviderDeps) -> HeldOutProvider:
        raise TypeError("a held-out provider is made by standing_in_for, never from a config")

    def is_configured(self) -> bool:
        return False

    def _refuse(self) -> NoReturn:
        raise ProviderNotConfigured(
            f"The {self.name} provider is held out on this service: {self.reason}",
            provider=self.name,
        )

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        self._refuse()

    async def verify_payment(self, payment_id: str) -> PaymentState:
        self._refuse()

    # The optional operations, whatever their arguments: each is refused alike.
    async def capture(self, *args: Any, **kwargs: Any) -> PaymentState:
        self._refuse()

    async def cancel(self, *args: Any, **kwargs: Any) -> PaymentState:
        self._refuse()

    async def refund(self, *args: Any, **kwargs: Any) -> RefundResult:
        self._refuse()

    async def get_refund(self, *args: Any, **kwargs: Any) -> RefundResult:
        self._refuse()

    async def parse_webhook(self, *args: Any, **kwargs: Any) -> WebhookEvent:
        self._refuse()

    async def health_check(self) -> HealthStatus:
        return HealthStatus(healthy=False, message=self.reason)
