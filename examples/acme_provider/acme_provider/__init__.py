"""Acme Pay: a worked example of a third-party payment provider plug-in.

Acme Pay is not a real vendor, and this package calls nobody. It is the smallest honest
provider: the class metadata, its secret model, ``from_config``, the required operations and a
health check, registered through the ``payment_service.providers`` entry point in its
pyproject.toml. Where a real provider would call its vendor's API, a comment says so.

Configuration: the provider declares what it needs as models (here ``AcmeSecrets``, an API
key; a ``config_model`` for what is not secret) and a ``settings_prefix``. The service reads
each field from the environment under that prefix (``ACME_API_KEY``, or the same line in .env),
lets a configuration stored through the admin API override it (validated with the same model;
``"active": false`` deactivates the provider), and hands the models to ``from_config``. The
provider never reads the environment or the service's settings itself.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from models.payment import PaymentStatus
from services.errors import ProviderNotConfigured
from services.payment_providers.base import (
    BasePaymentProvider,
    Capability,
    HealthStatus,
    IntentRequest,
    IntentResult,
    NoSettings,
    PaymentState,
    ProviderDeps,
)

API_KEY_VARIABLE = "ACME_API_KEY"


class AcmeSecrets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Optional: a configuration stored only to deactivate the provider need not carry it
    # (the admin API refuses a stored configuration that lacks a required field).
    api_key: SecretStr | None = Field(default=None, min_length=8, description="Acme's API key")


class AcmeProvider(BasePaymentProvider):
    """Acme Pay (an example): the customer pays on Acme's hosted page. No capture, cancel,
    refunds or webhooks: the base class answers those with ``operation_not_supported``."""

    name = "acme"
    display_name = "Acme Pay"
    id_prefixes = ("acme_",)
    capabilities = frozenset({Capability.CARD, Capability.REDIRECT})
    currencies = frozenset({"EUR", "USD"})  # routing sends Acme no other
    settings_prefix = "acme_"  # api_key is the setting ACME_API_KEY
    secrets_model = AcmeSecrets

    def __init__(self, api_key: SecretStr | None) -> None:
        # A real provider would build its own vendor client here, with this key (and
        # deps.http and deps.timeout_s), and read the key's value only to send it.
        self._api_key = api_key

    @classmethod
    def from_config(
        cls, config: NoSettings | None, secrets: AcmeSecrets | None, deps: ProviderDeps
    ) -> AcmeProvider:
        # Without an API key, set or stored, the provider is not configured.
        return cls(secrets.api_key if secrets else None)

    def is_configured(self) -> bool:
        return self._api_key is not None

    def _require_key(self) -> None:
        if not self.is_configured():
            raise ProviderNotConfigured(
                f"Acme Pay needs an API key on this service ({API_KEY_VARIABLE})",
                provider=self.name,
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
            return HealthStatus(healthy=False, message=f"no API key ({API_KEY_VARIABLE})")
        return HealthStatus(healthy=True, message="example provider: no vendor to call")
