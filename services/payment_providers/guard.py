"""Every provider call goes through here: a deadline and the provider's circuit breaker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from services.errors import ProviderUnavailable
from services.metrics import timed_provider_call

from .breaker import BreakerPolicy, BreakerState, CircuitBreaker

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from services.payment_store import RedisClient

    from .base import BasePaymentProvider

T = TypeVar("T")


class ProviderGuard:
    def __init__(
        self,
        redis: RedisClient,
        *,
        key_prefix: str,
        policy: BreakerPolicy,
        deadline_s: float,
        tracer: Tracer | None = None,
    ) -> None:
        self._redis = redis
        self._tracer = tracer  # a span per provider call, when tracing is on
        self._prefix = key_prefix
        self._policy = policy
        self._deadline_s = deadline_s
        self._breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, provider_name: str) -> CircuitBreaker:
        breaker = self._breakers.get(provider_name)
        if breaker is None:
            breaker = CircuitBreaker(
                self._redis,
                key=f"{self._prefix}breaker:{{{provider_name}}}",
                provider=provider_name,
                policy=self._policy,
            )
            self._breakers[provider_name] = breaker
        return breaker

    async def state(self, provider_name: str) -> BreakerState:
        return await self.breaker(provider_name).state()

    async def run(self, provider: BasePaymentProvider, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one provider call under the deadline and the provider's breaker, counted and
        timed (payments_provider_calls_total, refusals by an open breaker included)."""
        name = _operation_name(operation)

        async def guarded() -> T:
            return await self.breaker(provider.name).call(
                lambda: self.within_deadline(provider, operation)
            )

        if self._tracer is None:
            return await timed_provider_call(provider.name, name, guarded)
        with self._tracer.start_as_current_span(
            f"provider {provider.name} {name}",
            attributes={"payments.provider": provider.name, "payments.operation": name},
        ):
            return await timed_provider_call(provider.name, name, guarded)

    async def within_deadline(
        self, provider: BasePaymentProvider, operation: Callable[[], Awaitable[T]]
    ) -> T:
        """Run ``operation`` under the deadline only, outside the breaker: for work that is
        mostly local (checking a webhook's signature), which must neither be refused by an
        open circuit nor count as the provider's success or failure."""
        try:
            async with asyncio.timeout(self._deadline_s):
                return await operation()
        except TimeoutError as error:
            # The request may have reached the vendor: the outcome is unknown.
            raise ProviderUnavailable(
                f"{provider.name} did not answer in time", provider=provider.name
            ) from error


def _operation_name(operation: Callable[..., object]) -> str:
    """The provider method a call runs (``partial(provider.refund, ...)`` is "refund"), as
    the metric's operation label."""
    target = getattr(operation, "func", operation)
    return getattr(target, "__name__", "call")
