"""Builds the providers once, at start-up, and picks one per request.

Providers are found by name (``sandbox``, ``stripe``, ...) or by a payment ID's prefix
(``sb_``, ``pi_``, ``pp_``, ...). Built-in providers are listed here; third-party ones register
a ``BasePaymentProvider`` subclass under the entry-point group ``payment_service.providers``
and need no edit of this file.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import secrets
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points

from services.errors import (
    CurrencyNotSupported,
    PaymentNotFound,
    ProviderNotConfigured,
    UnknownProvider,
)

from .base import BasePaymentProvider

log = logging.getLogger("payments.providers")

ENTRY_POINT_GROUP = "payment_service.providers"

BUILTIN_PROVIDERS: Mapping[str, str] = {
    "sandbox": "services.payment_providers.sandbox:SandboxProvider",
    "stripe": "services.payment_providers.stripe:StripeProvider",
    "paypal": "services.payment_providers.paypal:PayPalProvider",
    "lemonsqueezy": "services.payment_providers.lemonsqueezy:LemonSqueezyProvider",
    "authorizenet": "services.payment_providers.authorizenet:AuthorizeNetProvider",
    "flutterwave": "services.payment_providers.flutterwave:FlutterwaveProvider",
    "paystack": "services.payment_providers.paystack:PaystackProvider",
    "paddle": "services.payment_providers.paddle:PaddleProvider",
    "mobilepay": "services.payment_providers.mobilepay:MobilePayProvider",
    "googlepay": "services.payment_providers.placeholders:GooglePayProvider",
    "applepay": "services.payment_providers.placeholders:ApplePayProvider",
}


def _load(target: str) -> type[BasePaymentProvider]:
    module_name, _, attribute = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attribute)
    if not (isinstance(cls, type) and issubclass(cls, BasePaymentProvider)):
        raise TypeError(f"{target} is not a BasePaymentProvider subclass")
    return cls


def charges(provider: BasePaymentProvider, currency: str) -> bool:
    """Whether ``provider`` can charge ``currency`` (None declared: any)."""
    return provider.currencies is None or currency in provider.currencies


def discover_provider_classes() -> dict[str, type[BasePaymentProvider]]:
    """Built-in provider classes, then those registered through entry points."""
    classes = {name: _load(target) for name, target in BUILTIN_PROVIDERS.items()}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except Exception:  # a broken plug-in must not take the service down
            log.exception("provider.plugin_load_failed", extra={"entry_point": entry.name})
            continue
        if not (isinstance(cls, type) and issubclass(cls, BasePaymentProvider)):
            log.error("provider.plugin_invalid", extra={"entry_point": entry.name})
            continue
        if cls.name in classes:
            log.error("provider.plugin_name_taken", extra={"provider": cls.name})
            continue
        classes[cls.name] = cls
    return classes


class PaymentProviderFactory:
    """Holds one instance of each provider and resolves requests to them."""

    def __init__(
        self,
        providers: Iterable[BasePaymentProvider],
        *,
        default: str,
        fallback: Iterable[str] = (),
        weights: Mapping[str, int] | None = None,
        inactive: Iterable[str] = (),
    ) -> None:
        self._providers = {provider.name: provider for provider in providers}
        self.default = default
        self.fallback = tuple(fallback)
        self.weights = {name: weight for name, weight in (weights or {}).items() if weight > 0}
        self.inactive = frozenset(inactive)
        # Longest prefix first, so that a provider with a more specific prefix wins.
        self._by_prefix = sorted(
            (
                (prefix, provider)
                for provider in self._providers.values()
                for prefix in provider.id_prefixes
            ),
            key=lambda item: len(item[0]),
            reverse=True,
        )

    @classmethod
    def create(
        cls,
        providers: Iterable[BasePaymentProvider],
        *,
        production: bool,
        default: str,
        fallback: Iterable[str],
        weights: Mapping[str, int] | None = None,
        inactive: Iterable[str] = (),
    ) -> PaymentProviderFactory:
        # Test money is never routed to in production, not even as a fallback.
        return cls(
            providers,
            default=default,
            fallback=[name for name in fallback if not (production and name == "sandbox")],
            weights={
                name: weight
                for name, weight in (weights or {}).items()
                if not (production and name == "sandbox")
            },
            inactive=inactive,
        )

    def is_active(self, provider: BasePaymentProvider) -> bool:
        return provider.name not in self.inactive and provider.is_configured()

    def providers(self) -> list[BasePaymentProvider]:
        return list(self._providers.values())

    def get(self, name: str | None = None) -> BasePaymentProvider:
        """The provider called ``name`` (the default when None), configured or not."""
        key = name or self.default
        try:
            return self._providers[key]
        except KeyError:
            known = ", ".join(sorted(self._providers))
            raise UnknownProvider(f"No provider named {key!r}; known: {known}") from None

    def route(
        self,
        requested: str | None,
        *,
        currency: str,
        customer: str | None = None,
    ) -> list[BasePaymentProvider]:
        """The providers to try for a new payment in ``currency``, in order.

        A provider the client named is the only candidate, and must charge ``currency``.
        Otherwise, among the providers that can charge it: the weighted pick for this customer
        when a split is configured (the same customer always lands on the same provider),
        else the default; then the fallback list. None can: ``CurrencyNotSupported``, never a
        charge in another currency.
        """
        if requested is not None:
            provider = self.get_configured(requested)
            if not charges(provider, currency):
                raise CurrencyNotSupported(
                    f"The {provider.name} provider cannot charge {currency}",
                    extra={"currency": currency, "provider": provider.name},
                )
            return [provider]
        weights = {
            name: weight
            for name, weight in self.weights.items()
            if name in self._providers and charges(self._providers[name], currency)
        }
        first = self._weighted_pick(weights, customer) if weights else self.default
        candidates = [
            provider
            for provider in (self.get(first), *(self.get(name) for name in self.fallback))
            if charges(provider, currency)
        ]
        if not candidates:
            raise CurrencyNotSupported(
                f"No provider this service routes to can charge {currency}",
                extra={"currency": currency, "provider": self.default},
            )
        return list(dict.fromkeys(candidates))

    @staticmethod
    def _weighted_pick(weights: Mapping[str, int], customer: str | None) -> str:
        total = sum(weights.values())
        digest = hashlib.sha256((customer or secrets.token_hex(8)).encode()).digest()
        point = int.from_bytes(digest[:8], "big") % total
        for name, weight in sorted(weights.items()):
            if point < weight:
                return name
            point -= weight
        raise AssertionError("unreachable: the point falls within the total")

    def takers(self, currency: str) -> list[str]:
        """The active providers that can charge ``currency``, by name."""
        return sorted(
            provider.name
            for provider in self._providers.values()
            if self.is_active(provider) and charges(provider, currency)
        )

    def get_configured(self, name: str | None = None) -> BasePaymentProvider:
        provider = self.get(name)
        if provider.name in self.inactive:
            raise ProviderNotConfigured(
                f"The {provider.name} provider is deactivated on this service",
                provider=provider.name,
            )
        if not provider.is_configured():
            raise ProviderNotConfigured(
                f"The {provider.name} provider is not configured on this service",
                provider=provider.name,
            )
        return provider

    def for_payment_id(self, payment_id: str) -> BasePaymentProvider:
        """The provider that issued ``payment_id``, judged by its prefix."""
        for prefix, provider in self._by_prefix:
            if payment_id.startswith(prefix) and provider.can_handle_payment_id(payment_id):
                return provider
        raise PaymentNotFound(f"No payment {payment_id!r}")

    async def aclose(self) -> None:
        for provider in self._providers.values():
            try:
                await provider.aclose()
            except Exception:
                log.exception("provider.close_failed", extra={"provider": provider.name})
