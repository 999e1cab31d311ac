"""The service's domain error tree: a status and a stable code each; app/problems.py renders them.

Every error a client can see is a ``ServiceError``: it carries the HTTP status, a stable
machine ``code`` and a human ``detail``, and is rendered as RFC 9457 problem details by
``app.problems``. Provider failures split in two: the customer's fault (``PaymentDeclined``,
4xx) and technical trouble (``ProviderUnavailable`` and friends, 502/503) that a client may
retry later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class ServiceError(Exception):
    """Root of every error the service reports to a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.detail = detail or self.title
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        super().__init__(self.detail)


# -- client errors -----------------------------------------------------------------------


class NotFound(ServiceError):
    status = 404
    code = "not_found"
    title = "Not found"


class PaymentNotFound(NotFound):
    code = "payment_not_found"
    title = "Payment not found"


class SubscriptionNotFound(NotFound):
    code = "subscription_not_found"
    title = "Subscription not found"


class InvalidSubscriptionState(ServiceError):
    status = 409
    code = "invalid_subscription_state"
    title = "The subscription is not in a state that allows this"


class PlanNotRecurring(ServiceError):
    status = 422
    code = "plan_not_recurring"
    title = "The plan is not a recurring plan"


class PlanChangeNotAllowed(ServiceError):
    status = 422
    code = "plan_change_not_allowed"
    title = "The subscription cannot change to this plan"


class ReceiptNotAvailable(ServiceError):
    status = 409
    code = "receipt_not_available"
    title = "Receipt not available"


class ReceiptStorageUnavailable(ServiceError):
    """RECEIPTS_DIR cannot be written or read (a volume not mounted, wrong owner, full)."""

    status = 503
    code = "receipt_storage_unavailable"
    title = "Receipt storage unavailable"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": "30"})


class ReceiptLedgerInconsistent(ServiceError):
    """A document holds a number the receipt ledger has no entry for: the ledger's data was
    lost or restored from an older copy. Nothing is served or numbered anew until an operator
    has looked (``payments receipts verify``): handing out numbers again could repeat one."""

    status = 503
    code = "receipt_ledger_inconsistent"
    title = "Receipt ledger inconsistent"


class InvalidStateTransition(ServiceError):
    status = 409
    code = "invalid_payment_state"
    title = "The payment is not in a state that allows this"


class UnknownPlan(ServiceError):
    status = 422
    code = "unknown_plan"
    title = "Unknown plan"


class CurrencyNotOffered(ServiceError):
    status = 422
    code = "currency_not_offered"
    title = "The plan has no price in this currency"


class CurrencyNotSupported(ServiceError):
    status = 422
    code = "currency_not_supported"
    title = "No provider that may take this payment can charge this currency"


class UnknownProvider(ServiceError):
    status = 422
    code = "unknown_provider"
    title = "Unknown payment provider"


class OperationNotSupported(ServiceError):
    status = 422
    code = "operation_not_supported"
    title = "The provider does not support this operation"


class CustomerEmailRequired(ServiceError):
    status = 422
    code = "customer_email_required"
    title = "The provider needs the customer's email address"


class RedirectNotAllowed(ServiceError):
    status = 422
    code = "redirect_not_allowed"
    title = "The return or cancel URL points to a host this service does not send customers to"


class RefundExceedsBalance(ServiceError):
    status = 422
    code = "refund_exceeds_balance"
    title = "The refund is larger than what is left to refund"


class CaptureExceedsAmount(ServiceError):
    status = 422
    code = "capture_exceeds_amount"
    title = "The capture is larger than the payment's authorized amount"


class IdempotencyKeyReused(ServiceError):
    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency key reused with a different request"


class IdempotencyRequestInProgress(ServiceError):
    status = 409
    code = "idempotency_request_in_progress"
    title = "A request with this idempotency key is still in progress"


class InvalidWebhookSignature(ServiceError):
    status = 400
    code = "invalid_signature"
    title = "Webhook signature could not be verified"


class InvalidWebhookPayload(ServiceError):
    status = 400
    code = "invalid_payload"
    title = "Webhook payload is not a valid event"


class AuthenticationRequired(ServiceError):
    status = 401
    code = "not_authenticated"
    title = "Authentication required"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class InvalidToken(AuthenticationRequired):
    code = "invalid_token"
    title = "Invalid or expired token"


class PermissionDenied(ServiceError):
    status = 403
    code = "forbidden"
    title = "Not allowed"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class RateLimited(ServiceError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, retry_after: int, limit: str) -> None:
        super().__init__(
            f"Rate limit of {limit} exceeded; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


# -- technical errors --------------------------------------------------------------------


class StoreUnavailable(ServiceError):
    status = 503
    code = "store_unavailable"
    title = "Payment store unavailable"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


class ProviderError(ServiceError):
    """Anything that went wrong at or with a payment provider."""

    def __init__(
        self,
        detail: str | None = None,
        *,
        provider: str,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail, headers=headers, extra={"provider": provider, **(extra or {})})
        self.provider = provider


class ProviderNotConfigured(ProviderError):
    status = 503
    code = "provider_not_configured"
    title = "Payment provider not configured"


class PaymentDeclined(ProviderError):
    """The customer's payment method was refused. Not retryable as is."""

    status = 402
    code = "payment_declined"
    title = "Payment declined"

    def __init__(
        self, detail: str | None = None, *, provider: str, decline_code: str | None = None
    ) -> None:
        super().__init__(
            detail,
            provider=provider,
            extra={"decline_code": decline_code} if decline_code else None,
        )
        self.decline_code = decline_code


class ProviderUnavailable(ProviderError):
    """The provider could not be reached or asked us to slow down. Retry later."""

    status = 503
    code = "provider_unavailable"
    title = "Payment provider unavailable"

    def __init__(
        self,
        detail: str | None = None,
        *,
        provider: str,
        retry_after: int = 5,
        retry_after_hint: float | None = None,
        outcome_unknown: bool = True,
    ) -> None:
        super().__init__(detail, provider=provider, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after
        # What the vendor itself asked for (its Retry-After), when it said; None otherwise.
        self.retry_after_hint = retry_after_hint
        # False only when the request surely did not reach the vendor (an open circuit, a
        # refused connection, a 429): only then may another provider be tried instead.
        self.outcome_unknown = outcome_unknown


class ProviderMisconfigured(ProviderError):
    """Our credentials or settings for the provider are wrong. An operator must act."""

    status = 503
    code = "provider_misconfigured"
    title = "Payment provider misconfigured"


class ProviderUpstreamError(ProviderError):
    """The provider answered with something we cannot use."""

    status = 502
    code = "provider_error"
    title = "Payment provider error"
