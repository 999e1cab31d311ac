"""The sandbox's hosted checkout, as its router sees it: the session to show and the click to
settle. It finds the sandbox among the providers configured now (a hot swap replaces them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from services.errors import OperationNotSupported

from .base import SubscriptionState
from .sandbox import Outcome, SandboxProvider
from .sandbox_subscriptions import CheckoutOutcome, RenewalOutcome

if TYPE_CHECKING:
    from .factory import PaymentProviderFactory


class SandboxCheckout:
    def __init__(self, providers: Callable[[], PaymentProviderFactory]) -> None:
        self._providers = providers

    def sandbox(self) -> SandboxProvider:
        provider = self._providers().get_configured(SandboxProvider.name)
        if not isinstance(provider, SandboxProvider):
            raise OperationNotSupported("The sandbox provider is not the built-in one")
        return provider

    async def session(self, payment_id: str) -> dict[str, str]:
        return await self.sandbox().session(payment_id)

    async def settle(self, payment_id: str, outcome: Outcome) -> dict[str, str]:
        return await self.sandbox().settle_from_checkout(payment_id, outcome)

    async def subscription(self, sandbox_id: str) -> dict[str, str]:
        return await self.sandbox().subscription_session(sandbox_id)

    async def settle_subscription(
        self, sandbox_id: str, outcome: CheckoutOutcome
    ) -> dict[str, str]:
        return await self.sandbox().settle_subscription(sandbox_id, outcome)

    async def advance_subscription(
        self, sandbox_id: str, outcome: RenewalOutcome
    ) -> SubscriptionState:
        return await self.sandbox().advance_subscription(sandbox_id, outcome)
