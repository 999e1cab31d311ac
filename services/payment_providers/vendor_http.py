"""What the providers that call a vendor's HTTP API themselves (on ``deps.http``) share.

Each of them reads headers whatever their case, reads a vendor's ``Retry-After``, keeps a
call's outcome unknown once one attempt may have reached the vendor, keeps an OAuth-style
access token (those that need one), and turns a transport
failure, a 429, refused credentials and a 5xx into the same service errors, logged the same
way. Those pieces live here; what a vendor's refusals mean (its error envelope, its codes,
which 4xx is a decline) stays in its own provider module.

The messages name the vendor as customers and operators know it (``display_name``); logs
carry the provider's name and the call's event (``paystack.transaction.verify``), with
``_failed`` appended for a failure.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2

from services.errors import ProviderMisconfigured, ProviderUnavailable, ProviderUpstreamError

from .resilience import RetryPolicy, with_retries

T = TypeVar("T")

# How long a client is told to wait after a 429 that came without a usable Retry-After.
DEFAULT_RETRY_AFTER_S = 5


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header from any mapping, whatever the case of its keys (a webhook's headers arrive
    as a plain dict)."""
    value = headers.get(name)
    if value is None:
        wanted = name.lower()
        value = next((v for k, v in headers.items() if str(k).lower() == wanted), None)
    return str(value) if value is not None else None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The ``Retry-After`` a vendor sent, in seconds; None when absent or not a finite,
    non-negative number. An HTTP date is ignored: a guess would be worse than our own
    backoff."""
    raw = header(headers, "retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def json_object(response: httpx2.Response) -> dict[str, Any]:
    """The response's body when it is a JSON object, else an empty one (a refusal's body is
    read for the log; what it holds is never trusted to be there)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def with_retries_keeping_outcome(
    operation: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    event: str,
    retry_unknown_outcome: bool = True,
) -> T:
    """``with_retries`` for a call that may move money: once one attempt may have reached the
    vendor (a ``ProviderUnavailable`` with ``outcome_unknown``), the call's outcome stays
    unknown even if a later attempt was plainly refused. With ``retry_unknown_outcome``
    False (a write the vendor cannot deduplicate), such a failure is not retried at all."""
    outcome_unknown = False

    async def attempt() -> T:
        nonlocal outcome_unknown
        try:
            return await operation()
        except ProviderUnavailable as error:
            outcome_unknown = outcome_unknown or error.outcome_unknown
            error.outcome_unknown = outcome_unknown
            if outcome_unknown and not retry_unknown_outcome:
                raise _Unrepeatable(error) from error
            raise

    try:
        return await with_retries(attempt, policy=policy, event=event)
    except _Unrepeatable as unrepeatable:
        raise unrepeatable.error from unrepeatable.error.__cause__


class _Unrepeatable(Exception):
    """Carries a failure past ``with_retries``: the call may have reached the vendor."""

    def __init__(self, error: ProviderUnavailable) -> None:
        super().__init__(error.detail)
        self.error = error


@dataclass(frozen=True, slots=True)
class VendorErrors:
    """The service errors every HTTP provider raises alike, each logged once on the
    provider's own logger. ``fields`` are the provider's log fields for the call (its
    payment id, the vendor's status and request id); ``log_event`` names the call."""

    provider: str  # the provider's name, carried by the errors and logged
    vendor: str  # the vendor as people know it, in the errors' messages
    log: logging.Logger

    def transport_error(
        self, error: httpx2.HTTPError, log_event: str, fields: Mapping[str, Any] | None = None
    ) -> ProviderUnavailable:
        """Nothing usable came back. A connection that never opened sent nothing; after that
        (a timeout, a connection lost mid-request) the vendor may have acted: safe to retry
        with the same idempotency key, unsafe to go elsewhere."""
        not_sent = isinstance(error, httpx2.ConnectError | httpx2.ConnectTimeout)
        self.log.warning(
            f"{log_event}_failed",
            extra={
                "provider": self.provider,
                **(fields or {}),
                "transport_error": type(error).__name__,
            },
        )
        return ProviderUnavailable(
            f"{self.vendor} could not be reached",
            provider=self.provider,
            outcome_unknown=not not_sent,
        )

    def rate_limited(
        self,
        log_event: str,
        fields: Mapping[str, Any],
        retry_after: float | None,
        *,
        default_s: int = DEFAULT_RETRY_AFTER_S,
    ) -> ProviderUnavailable:
        """A 429: answered before anything was done. The vendor's ``retry_after`` (seconds)
        is both the retries' hint and, rounded up, what the client is told."""
        self.log.warning(f"{log_event}_failed", extra={**fields, "retry_after_s": retry_after})
        return ProviderUnavailable(
            f"{self.vendor} asked us to slow down; try again shortly",
            provider=self.provider,
            retry_after=max(1, math.ceil(retry_after)) if retry_after is not None else default_s,
            retry_after_hint=retry_after,
            outcome_unknown=False,
        )

    def unavailable(self, log_event: str, fields: Mapping[str, Any]) -> ProviderUnavailable:
        """A 5xx (or another answer that means "not now"): the vendor may have acted, so the
        outcome is unknown."""
        self.log.warning(f"{log_event}_failed", extra=dict(fields))
        return ProviderUnavailable(f"{self.vendor} could not be reached", provider=self.provider)

    def credentials_refused(
        self, log_event: str, fields: Mapping[str, Any], *, action: str
    ) -> ProviderMisconfigured:
        """The vendor refused our credentials (401, 403): only an operator can help, and
        ``action`` tells them where to look (setting names, never a secret)."""
        self.log.error(f"{log_event}_failed", extra={**fields, "action": action})
        return ProviderMisconfigured(
            f"{self.vendor} refused our credentials; an operator must check the configuration",
            provider=self.provider,
        )

    def refused(self, log_event: str, fields: Mapping[str, Any]) -> ProviderUpstreamError:
        """A refusal the provider has no better meaning for."""
        self.log.warning(f"{log_event}_failed", extra=dict(fields))
        return ProviderUpstreamError(f"{self.vendor} refused the request", provider=self.provider)


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str
    renew_at: float  # on the clock of the cache that keeps it

    @classmethod
    def lasting(
        cls, value: str, *, fetched_at: float, expires_in: float, renew_margin_s: float
    ) -> AccessToken:
        """A token the vendor said lasts ``expires_in`` seconds from ``fetched_at`` (taken
        before it was asked for), renewed ``renew_margin_s`` early, at most a tenth of its
        life. A lifetime that is not a finite, non-negative number is none at all."""
        if not math.isfinite(expires_in) or expires_in < 0:
            expires_in = 0.0
        margin = min(renew_margin_s, expires_in / 10)
        return cls(value=value, renew_at=fetched_at + expires_in - margin)


class AccessTokenCache:
    """One access token per provider instance (per worker): fetched when first needed, kept
    until shortly before it expires, and fetched by one request at a time however many wait
    for it. ``fetch`` asks the vendor for a new one and raises the service's errors."""

    def __init__(
        self, fetch: Callable[[], Awaitable[AccessToken]], *, clock: Callable[[], float]
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._token: AccessToken | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        token = self._token
        if token is not None and self._clock() < token.renew_at:
            return token.value
        async with self._lock:
            # Whoever waited here while another request fetched the token uses that one.
            token = self._token
            if token is not None and self._clock() < token.renew_at:
                return token.value
            return await self.renew()

    async def renew(self) -> str:
        """A fresh token, kept (a health check: it proves the vendor takes our keys)."""
        self._token = await self._fetch()
        return self._token.value

    def forget(self, value: str) -> None:
        """Drop ``value`` after the vendor refused it; only that one, since another request
        may have renewed it already."""
        if self._token is not None and self._token.value == value:
            self._token = None
