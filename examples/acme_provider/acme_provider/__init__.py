"""Acme Pay: a worked example of a third-party payment provider plug-in.

Acme Pay is not a real vendor, and this package calls nobody. It is the smallest honest
provider: the class metadata, ``from_settings``, the required operations and a health check,
registered through the ``payment_service.providers`` entry point in its pyproject.toml. Where a
real provider would call its vendor's API, a comment says so.

Configuration: the service's ``Settings`` has no fields for a plug-in, and a configuration
stored through the admin API reaches a provider only by replacing ``Settings`` fields. So this
plug-in reads its key from the process environment, ``ACME_API_KEY``. A stored configuration
can still deactivate it (``"active": false``).
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from models.payment import PaymentStatus
from services.errors import ProviderNotConfigured
from services.payment_providers.base import (
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

API_KEY_VARIABLE = "ACME_API_KEY"


class AcmeProvider(BasePaymentProvider):
    """Acme Pay (an example): the customer pays on Acme's hosted page. No capture, cancel,
    refunds or webhooks: the base class answers those with ``operation_not_supported``."""

    name = "acme"
    display_name = "Acme Pay"
    id_prefixes = ("acme_",)
    capabilities = frozenset({Capability.CARD, Capability.REDIRECT})

    def __init__(self, api_key: str | None) -> None:
        # A real provider would build its own vendor client here, with this key.
        self._api_key = api_key

    @classmethod
    def from_settings(cls, settings: Settings, deps: ProviderDeps) -> AcmeProvider:
        return cls(os.environ.get(API_KEY_VARIABLE) or None)

    def is_configured(self) -> bool:
        return bool(self._api_key)

    def _require_key(self) -> None:
        if not self.is_configured():
            raise ProviderNotConfigured(
                f"Acme Pay needs {API_KEY_VARIABLE} on this service", provider=self.name
            )

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        self._require_key()
        # A vendor honours our idempotency key; here the same key gives the same payment ID.
        digest = hashlib.sha256(request.idempotency_key.encode()).hexdigest()
        payment_id = f"acme_{digest[:24]}"
        return IntentResult(
            payment_id=payment_id,
            status=PaymentStatus.PENDING,
            # Where Acme's hosted page would be. Nothing serves it: Acme Pay is an example.
            redirect_url=f"{request.base_url.rstrip('/')}/acme/checkout/{payment_id}",
        )

    async def verify_payment(self, payment_id: str) -> PaymentState:
        self._require_key()
        # A real provider asks its vendor here and maps the vendor's status; a status it does
        # not know stays pending. Acme has nobody to ask, so every payment stays pending.
        return PaymentState(payment_id=payment_id, status=PaymentStatus.PENDING)

    async def health_check(self) -> HealthStatus:
        # A real provider makes a cheap authenticated call to its vendor and times it.
        if not self.is_configured():
            return HealthStatus(healthy=False, message=f"{API_KEY_VARIABLE} is not set")
        return HealthStatus(healthy=True, message="example provider: no vendor to call")
