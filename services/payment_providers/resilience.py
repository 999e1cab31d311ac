"""Retries for provider calls that are safe to repeat.

A call is safe to retry when it is a read, or a write that carries the vendor's own
idempotency key. Providers map vendor failures to ``ProviderUnavailable`` first (with the
vendor's Retry-After when it sent one); only those are retried here, with exponential backoff
and full jitter. A Retry-After longer than the policy allows is not waited out: the error goes
to the client, which is told when to come back.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.errors import ProviderUnavailable

T = TypeVar("T")
log = logging.getLogger("payments.providers")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    base_delay: float = 0.2
    max_delay: float = 4.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up now."""
        if retry_after is not None:
            return retry_after if retry_after <= self.max_delay else None
        ceiling = min(self.max_delay, self.base_delay * (2**attempt))
        return random.uniform(0, ceiling)


NO_RETRY = RetryPolicy(attempts=1)


async def with_retries(
    operation: Callable[[], Awaitable[T]], *, policy: RetryPolicy, event: str
) -> T:
    """Run ``operation``, retrying ``ProviderUnavailable`` as ``policy`` allows."""
    for attempt in range(policy.attempts):
        try:
            return await operation()
        except ProviderUnavailable as error:
            last_attempt = attempt + 1 >= policy.attempts
            wait = None if last_attempt else policy.delay(attempt, error.retry_after_hint)
            if wait is None:
                raise
            log.warning(
                "provider.retry",
                extra={"event": event, "attempt": attempt + 1, "wait_s": round(wait, 3)},
            )
            await asyncio.sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")
