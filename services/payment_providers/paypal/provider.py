"""PayPal, through its REST API (Orders v2, Payments v2, Webhooks v1; Subscriptions v1, and
Payments v1 for the sales that bill them) on the shared ``httpx2.AsyncClient``.

One OAuth2 client-credentials token per provider instance, fetched once, kept until shortly
before it expires, refreshed once when PayPal answers 401, and fetched by one request at a
time however many wait for it. Retries happen in ``with_retries``, only for calls that are
safe to repeat: reads, and writes that carry a ``PayPal-Request-Id`` (every write here does).
PayPal's errors become the service's errors at this edge; PayPal's debug id is logged with
each failure, and its raw messages never reach a client.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import httpx2
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from models.payment import PaymentStatus
from models.subscription import SubscriptionStatus
from services.errors import (
    InvalidStateTransition,
    InvalidWebhookPayload,
    NotFound,
    OperationNotSupported,
    PaymentDeclined,
    PaymentNotFound,
    ProviderError,
    ProviderMisconfigured,
    ProviderNotConfigured,
    ProviderUnavailable,
    ProviderUpstreamError,
    RefundExceedsBalance,
    ServiceError,
)

from ..base import (
    BasePaymentProvider,
    Capability,
    EnvironmentOnly,
    HealthStatus,
    IntentRequest,
    IntentResult,
    InvoicePayment,
    PaymentState,
    ProviderDeps,
    RecurringPrice,
    RefundResult,
    SubscriptionRequest,
    SubscriptionStarted,
    SubscriptionState,
    WebhookEvent,
)
from ..payloads import load_json
from ..resilience import RetryPolicy
from ..vendor_http import (
    AccessToken,
    AccessTokenCache,
    VendorErrors,
    header,
    json_object,
    retry_after_seconds,
    with_retries_keeping_outcome,
)
from . import billing, sales
from . import transformers as tx

log = logging.getLogger("payments.providers.paypal")

API_BASES = {"sandbox": "https://api-m.sandbox.paypal.com", "live": "https://api-m.paypal.com"}
# A token is renewed this long before PayPal says it expires (at most a tenth of its life).
TOKEN_RENEW_MARGIN_S = 300.0

# 422 issues that mean the buyer's money was refused: the customer's side, not ours.
DECLINE_ISSUES = frozenset(
    {
        "INSTRUMENT_DECLINED",
        "PAYER_CANNOT_PAY",
        "PAYER_ACCOUNT_LOCKED_OR_CLOSED",
        "PAYER_ACCOUNT_RESTRICTED",
        "TRANSACTION_REFUSED",
        "REDIRECT_PAYER_FOR_ALTERNATE_FUNDING",
        "MAX_NUMBER_OF_PAYMENT_ATTEMPTS_EXCEEDED",
        "DECLINED_DUE_TO_RELATED_TXN",
        "COMPLIANCE_VIOLATION",
        "PAYEE_BLOCKED_TRANSACTION",
        "TRANSACTION_BLOCKED_BY_PAYEE",
        "TRANSACTION_LIMIT_EXCEEDED",
        "CARD_EXPIRED",
        "PAYMENT_SOURCE_DECLINED_BY_PROCESSOR",
        "PAYMENT_SOURCE_CANNOT_BE_USED",
    }
)
# 422 issues that mean the payment is not in a state for what was asked.
STATE_ISSUES = frozenset(
    {
        "ORDER_NOT_APPROVED",
        "ORDER_ALREADY_CAPTURED",
        "ORDER_ALREADY_AUTHORIZED",
        "ORDER_COMPLETION_IN_PROGRESS",
        "ORDER_EXPIRED",
        "PAYER_ACTION_REQUIRED",
        "PENDING_CAPTURE",
        "REFUND_NOT_ALLOWED",
        "PARTIAL_REFUND_NOT_ALLOWED",
        "REFUND_TIME_LIMIT_EXCEEDED",
        "REFUND_NOT_PERMITTED_DUE_TO_CHARGEBACK",
        "TRANSACTION_DISPUTED",
        # Subscriptions: suspend, activate, cancel or revise in a status that does not allow it.
        "SUBSCRIPTION_STATUS_INVALID",
    }
)
REFUND_TOO_LARGE_ISSUES = frozenset({"REFUND_AMOUNT_EXCEEDED", "CAPTURE_FULLY_REFUNDED"})
# The currencies PayPal's REST API takes ("Currency codes", developer.paypal.com/api/rest/
# reference/currency-codes/); routing sends PayPal no other.
PAYPAL_CURRENCIES = frozenset(
    {
        "AUD", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "EUR", "GBP", "HKD", "HUF", "ILS",
        "JPY", "MXN", "MYR", "NOK", "NZD", "PHP", "PLN", "SEK", "SGD", "THB", "TWD", "USD",
    }
)  # fmt: skip
CURRENCY_ISSUES = frozenset(
    {"INVALID_CURRENCY_CODE", "CURRENCY_NOT_SUPPORTED", "DECIMALS_NOT_SUPPORTED"}
)

# Header values a genuine delivery can have; anything else is not sent on to PayPal. The
# limits are those of verify-webhook-signature's request fields.
_TRANSMISSION_HEADERS = {
    "transmission_id": ("paypal-transmission-id", re.compile(r"^[\w-]{1,50}$")),
    "transmission_time": ("paypal-transmission-time", re.compile(r"^[\w:.+-]{1,100}$")),
    "transmission_sig": ("paypal-transmission-sig", re.compile(r"^[A-Za-z0-9+/]{1,498}={0,2}$")),
    "cert_url": ("paypal-cert-url", re.compile(r"^https://[^\s\"\\]{1,492}$")),
    "auth_algo": ("paypal-auth-algo", re.compile(r"^[a-zA-Z0-9]{1,100}$")),
}
_WEBHOOK_ID = re.compile(r"^[a-zA-Z0-9]{1,50}$")


def _request_id(idempotency_key: str, *, limit: int = tx.REQUEST_ID_MAX) -> str:
    """PayPal-Request-Id: the key itself when it fits PayPal's limit (108 characters; 78 on
    Payments v1), else a digest of it (64 characters, stable, so retries still match)."""
    if 0 < len(idempotency_key) <= limit and idempotency_key.isascii():
        return idempotency_key
    return hashlib.sha256(idempotency_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _Failure:
    """What PayPal said when it refused a call."""

    status: int
    name: str | None
    issue: str | None
    debug_id: str | None
    description: str | None
    retry_after: float | None

    @classmethod
    def of(cls, response: httpx2.Response) -> _Failure:
        body = json_object(response)
        details = body.get("details")
        first = details[0] if isinstance(details, list) and details else {}
        first = first if isinstance(first, dict) else {}
        name = body.get("name") or body.get("error")
        description = first.get("description") or body.get("error_description")
        return cls(
            status=response.status_code,
            name=str(name) if name else None,
            issue=str(first["issue"]) if first.get("issue") else None,
            debug_id=response.headers.get("paypal-debug-id") or body.get("debug_id"),
            description=str(description)[:300] if description else None,
            retry_after=retry_after_seconds(response.headers),
        )


class _OrderAlreadyCaptured(InvalidStateTransition):
    """PayPal's ORDER_ALREADY_CAPTURED: answered by reading the order, never shown as is."""


class PayPalConfig(BaseModel):
    """PayPal's configuration besides secrets (settings ``paypal_*``). The API base address
    is set only in the environment (``PAYPAL_API_BASE``), never stored: whoever could change
    it could send our client secret to another host. Without it, ``mode`` picks PayPal's own
    sandbox or live address."""

    model_config = ConfigDict(extra="forbid")

    client_id: str = Field(min_length=8, max_length=128, description="REST app client ID")
    mode: Literal["sandbox", "live"] = Field(default="sandbox", description="sandbox or live")
    webhook_id: str | None = Field(
        default=None,
        pattern=r"^[a-zA-Z0-9]{1,50}$",
        description="The webhook's ID in the PayPal app; events are verified against it",
    )
    api_base: Annotated[str | None, EnvironmentOnly()] = Field(
        default=None, description="Where PayPal's API is, if not the mode's (environment only)"
    )


class PayPalSecrets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client_secret: SecretStr = Field(min_length=8, description="REST app client secret")


class PayPalProvider(BasePaymentProvider):
    name = "paypal"
    display_name = "PayPal"
    id_prefixes = (tx.PREFIX,)
    settings_prefix = "paypal_"
    config_model = PayPalConfig
    secrets_model = PayPalSecrets
    # No CANCEL: Orders v2 has no call that voids an order made with intent CAPTURE.
    capabilities = frozenset(
        {
            Capability.WALLET,
            Capability.REDIRECT,
            Capability.CAPTURE,
            Capability.REFUND,
            Capability.PARTIAL_REFUND,
            Capability.WEBHOOKS,
            Capability.SUBSCRIPTIONS,
        }
    )
    currencies = PAYPAL_CURRENCIES

    def __init__(
        self,
        *,
        http: httpx2.AsyncClient,
        client_id: str | None,
        client_secret: SecretStr | None,
        api_base: str,
        webhook_id: str | None = None,
        timeout_seconds: float = 10.0,
        retry_policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._client_id = client_id or None
        self._client_secret = client_secret or None  # read only to be sent, for a token
        self._api_base = api_base.rstrip("/")
        self._webhook_id = webhook_id or None
        self._timeout = httpx2.Timeout(timeout_seconds)
        self._retry_policy = retry_policy or RetryPolicy()
        self._clock = clock
        self._tokens = AccessTokenCache(self._fetch_token, clock=clock)
        self._errors = VendorErrors(self.name, self.display_name, log)

    @classmethod
    def from_config(
        cls,
        config: PayPalConfig | None,
        secrets: PayPalSecrets | None,
        deps: ProviderDeps,
        *,
        retry_policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> PayPalProvider:
        api_base = (config.api_base or API_BASES[config.mode]) if config else API_BASES["sandbox"]
        if config is None or secrets is None:  # not configured: every call is refused
            return cls(
                http=deps.http,
                client_id=None,
                client_secret=None,
                api_base=api_base,
                timeout_seconds=deps.timeout_s,
                retry_policy=retry_policy,
                clock=clock,
            )
        return cls(
            http=deps.http,
            client_id=config.client_id,
            client_secret=secrets.client_secret,
            api_base=api_base,
            webhook_id=config.webhook_id,
            timeout_seconds=deps.timeout_s,
            retry_policy=retry_policy,
            clock=clock,
        )

    @property
    def api_base(self) -> str:
        """Where this provider sends its calls (sandbox, live, or PAYPAL_API_BASE)."""
        return self._api_base

    def is_configured(self) -> bool:
        return self._client_id is not None and self._client_secret is not None

    def _require_configured(self) -> None:
        if not self.is_configured():
            raise ProviderNotConfigured(
                "PayPal is not configured on this service (PAYPAL_CLIENT_ID, PAYPAL_CLIENT_SECRET)",
                provider=self.name,
            )

    def _order_id(self, payment_id: str) -> str:
        self._require_configured()
        order_id = tx.order_id_of(payment_id)
        if order_id is None:
            if sales.sale_id_of(payment_id) is not None:
                # A subscription's payment: a sale, complete when we record it.
                raise InvalidStateTransition(
                    "A PayPal subscription payment is complete: it can only be refunded"
                )
            raise PaymentNotFound(f"No payment {payment_id!r}")
        return order_id

    # -- the token -------------------------------------------------------------------------

    async def _fetch_token(self) -> AccessToken:
        assert self._client_id is not None and self._client_secret is not None
        started = self._clock()
        try:
            response = await self._http.post(
                f"{self._api_base}/v1/oauth2/token",
                data={"grant_type": "client_credentials"},
                auth=(self._client_id, self._client_secret.get_secret_value()),
                headers={"Accept": "application/json"},
                timeout=self._timeout,
            )
        except httpx2.HTTPError as error:
            raise self._errors.transport_error(error, "paypal.oauth.token") from error
        if response.status_code != 200:
            failure = _Failure.of(response)
            if response.status_code in (400, 401, 403):
                # invalid_client: our client ID or secret is wrong. Never log either.
                raise self._errors.credentials_refused(
                    "paypal.oauth.token",
                    self._log_fields(failure),
                    action="check PAYPAL_CLIENT_ID and PAYPAL_CLIENT_SECRET",
                )
            raise self._service_error(failure, "paypal.oauth.token", payment_id=None)
        try:
            body = response.json()
            value = str(body["access_token"])
            expires_in = float(body.get("expires_in", 0))
        except (ValueError, KeyError, TypeError) as error:
            log.error("paypal.oauth.token_unreadable", extra={"http_status": 200})
            raise ProviderUpstreamError(
                "PayPal answered the token request with something unreadable", provider=self.name
            ) from error
        log.info("paypal.oauth.token_fetched", extra={"expires_in_s": expires_in})
        return AccessToken.lasting(
            value, fetched_at=started, expires_in=expires_in, renew_margin_s=TOKEN_RENEW_MARGIN_S
        )

    # -- calls -----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        log_event: str,
        payment_id: str | None = None,
        body: dict[str, Any] | None = None,
        content: bytes | None = None,
        request_id: str | None = None,
        policy: RetryPolicy | None = None,
    ) -> dict[str, Any]:
        """One API call, retried while PayPal is unavailable; returns PayPal's JSON object.
        ``log_event`` names the call in logs: ``paypal.order.create``."""
        self._require_configured()
        headers = {"Accept": "application/json"}
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
        if content is not None:
            headers["Content-Type"] = "application/json"
        if request_id is not None:
            headers["PayPal-Request-Id"] = request_id
            # The whole object, not PayPal's minimal id/status/links: the capture's details
            # and the refunds' running total are in it.
            headers["Prefer"] = "return=representation"

        async def attempt() -> dict[str, Any]:
            return await self._send_authenticated(
                method, path, headers, content, log_event=log_event, payment_id=payment_id
            )

        # Once one attempt may have reached PayPal, the call's outcome stays unknown even if
        # a later attempt was plainly refused.
        return await with_retries_keeping_outcome(
            attempt, policy=policy or self._retry_policy, event=log_event
        )

    async def _send_authenticated(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        content: bytes | None,
        *,
        log_event: str,
        payment_id: str | None,
    ) -> dict[str, Any]:
        token = await self._tokens.get()
        response = await self._send(method, path, headers, content, token, log_event=log_event)
        if response.status_code == 401:
            # The token expired early or was revoked: one fresh token, one more try.
            log.info("paypal.oauth.token_refused", extra={"call": log_event})
            self._tokens.forget(token)
            token = await self._tokens.get()
            response = await self._send(method, path, headers, content, token, log_event=log_event)
            if response.status_code == 401:
                raise self._errors.credentials_refused(
                    log_event,
                    self._log_fields(_Failure.of(response), payment_id),
                    action="PayPal refused a fresh token: check the REST app",
                )
        if response.status_code == 204:
            return {}  # suspend, activate, cancel: done, nothing to say
        if 200 <= response.status_code < 300:
            try:
                data = response.json()
            except ValueError:
                data = None
            if not isinstance(data, dict):
                log.error(
                    f"{log_event}_unreadable",
                    extra={
                        "provider": self.name,
                        "payment_id": payment_id,
                        "http_status": response.status_code,
                        "paypal_debug_id": response.headers.get("paypal-debug-id"),
                    },
                )
                raise ProviderUpstreamError(
                    "PayPal answered with something unreadable", provider=self.name
                )
            return data
        raise self._service_error(_Failure.of(response), log_event, payment_id=payment_id)

    async def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        content: bytes | None,
        token: str,
        *,
        log_event: str,
    ) -> httpx2.Response:
        try:
            return await self._http.request(
                method,
                f"{self._api_base}{path}",
                headers={**headers, "Authorization": f"Bearer {token}"},
                content=content,
                timeout=self._timeout,
            )
        except httpx2.HTTPError as error:
            # A timeout may have been processed: safe to retry with the same
            # PayPal-Request-Id, unsafe to go elsewhere.
            raise self._errors.transport_error(error, log_event) from error

    def _log_fields(self, failure: _Failure, payment_id: str | None = None) -> dict[str, Any]:
        return {
            "provider": self.name,
            "payment_id": payment_id,
            "http_status": failure.status,
            "paypal_debug_id": failure.debug_id,
            "paypal_name": failure.name,
            "paypal_issue": failure.issue,
            "paypal_description": failure.description,
        }

    def _service_error(
        self, failure: _Failure, log_event: str, *, payment_id: str | None
    ) -> ServiceError:
        """Map one refusal from PayPal to the service's error tree, and log it once."""
        fields = self._log_fields(failure, payment_id)
        failed = f"{log_event}_failed"
        status, issue = failure.status, failure.issue
        if status == 429:
            return self._errors.rate_limited(log_event, fields, failure.retry_after)
        if status >= 500 or status == 409:
            # 409 PREVIOUS_REQUEST_IN_PROGRESS: the same PayPal-Request-Id is still running.
            return self._errors.unavailable(log_event, fields)
        if status == 403:
            log.error(failed, extra={**fields, "action": "the REST app lacks a permission"})
            return ProviderMisconfigured(
                "PayPal refused the operation for our account; an operator must check it",
                provider=self.name,
            )
        if status == 404 and payment_id is not None:
            log.info(failed, extra=fields)
            return PaymentNotFound(f"No payment {payment_id!r}")
        if status in (400, 422) and issue is None and failure.name is not None:
            # Payments v1 (a subscription's sales) says what went wrong in the error's name.
            if failure.name in sales.REFUND_TOO_LARGE_NAMES:
                log.info(failed, extra=fields)
                return RefundExceedsBalance("The refund is larger than what is left to refund")
            if failure.name in sales.STATE_NAMES:
                log.info(failed, extra=fields)
                return InvalidStateTransition(
                    _STATE_DETAILS.get(failure.name, "PayPal refused to refund this payment")
                )
        if status == 422 and issue is not None:
            if issue in DECLINE_ISSUES:
                log.info(f"{log_event}_declined", extra=fields)
                return PaymentDeclined(
                    f"PayPal declined the payment ({issue.lower()})",
                    provider=self.name,
                    decline_code=issue.lower(),
                )
            if issue in REFUND_TOO_LARGE_ISSUES:
                log.info(failed, extra=fields)
                return RefundExceedsBalance("The refund is larger than what is left to refund")
            if issue == "ORDER_ALREADY_CAPTURED":
                log.info(failed, extra=fields)
                return _OrderAlreadyCaptured("The PayPal order has been captured already")
            if issue in STATE_ISSUES:
                log.info(failed, extra=fields)
                return InvalidStateTransition(_STATE_DETAILS.get(issue, _STATE_DETAIL))
            if issue in CURRENCY_ISSUES:
                log.warning(failed, extra=fields)
                return OperationNotSupported("PayPal does not take payments in this currency")
        log.warning(failed, extra=fields)
        return ProviderUpstreamError("PayPal refused the request", provider=self.name)

    # -- create and verify -----------------------------------------------------------------

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        self._require_configured()
        try:
            body = tx.order_request(request)
        except tx.AmountNotRepresentable as error:
            raise OperationNotSupported(
                f"PayPal cannot take {request.plan.currency} amounts with decimals"
            ) from error
        order = await self._call(
            "POST",
            "/v2/checkout/orders",
            log_event="paypal.order.create",
            body=body,
            request_id=_request_id(request.idempotency_key),
        )
        if not tx.is_paypal_id(order.get("id")):
            log.error("paypal.order.create_unreadable", extra={"reference": request.reference})
            raise ProviderUpstreamError("PayPal answered without an order ID", provider=self.name)
        result = tx.intent_result(order)
        if result.redirect_url is None:
            log.error(
                "paypal.order.no_approval_link",
                extra={"payment_id": result.payment_id, "reference": request.reference},
            )
            raise ProviderUpstreamError(
                "PayPal gave no page for the buyer to approve the payment", provider=self.name
            )
        log.info(
            "paypal.order.created",
            extra={"payment_id": result.payment_id, "reference": request.reference},
        )
        return result

    async def _get_order(self, order_id: str, payment_id: str) -> dict[str, Any]:
        return await self._call(
            "GET",
            f"/v2/checkout/orders/{order_id}",
            log_event="paypal.order.get",
            payment_id=payment_id,
        )

    async def verify_payment(self, payment_id: str) -> PaymentState:
        sale_id = self._sale_id(payment_id)
        if sale_id is not None:
            sale = await self._call(
                "GET",
                f"/v1/payments/sale/{sale_id}",
                log_event="paypal.sale.get",
                payment_id=payment_id,
            )
            try:
                return sales.state_from_sale(sale)
            except ValueError as error:
                raise ProviderUpstreamError(
                    "PayPal answered a sale we cannot read", provider=self.name
                ) from error
        order_id = self._order_id(payment_id)
        return tx.state_from_order(await self._get_order(order_id, payment_id))

    # -- capture, cancel, refund -----------------------------------------------------------

    async def capture(
        self, payment_id: str, *, idempotency_key: str, amount: int | None = None
    ) -> PaymentState:
        if amount is not None:
            raise OperationNotSupported(f"{self.display_name} captures the whole amount only")
        order_id = self._order_id(payment_id)
        try:
            order = await self._call(
                "POST",
                f"/v2/checkout/orders/{order_id}/capture",
                log_event="paypal.order.capture",
                payment_id=payment_id,
                body={},
                request_id=_request_id(idempotency_key),
            )
        except _OrderAlreadyCaptured:
            # Captured before, under another PayPal-Request-Id: answer with that result.
            order = await self._get_order(order_id, payment_id)
        state = tx.state_from_order(order)
        if state.status is PaymentStatus.FAILED:
            # PayPal completed the order but its capture was DECLINED (or FAILED).
            capture = tx.capture_of(order) or {}
            log.info(
                "paypal.order.capture_declined",
                extra={"payment_id": payment_id, "capture_status": capture.get("status")},
            )
            raise PaymentDeclined(
                "PayPal declined the payment (capture_declined)",
                provider=self.name,
                decline_code="capture_declined",
            )
        log.info(
            "paypal.order.captured",
            extra={"payment_id": payment_id, "capture_id": state.capture_id},
        )
        return state

    async def cancel(self, payment_id: str, *, idempotency_key: str) -> PaymentState:
        self._order_id(payment_id)
        raise OperationNotSupported(
            "PayPal orders cannot be canceled through the API: an order the buyer has not "
            "approved simply lapses, and an approved one is settled by capturing it or not"
        )

    async def refund(
        self,
        payment_id: str,
        *,
        refund_id: str,
        amount: int,
        currency: str,
        capture_id: str | None,
        reason: str | None = None,
    ) -> RefundResult:
        sale_id = self._sale_id(payment_id)
        if sale_id is not None:
            return await self._refund_sale(
                payment_id,
                sale_id,
                refund_id=refund_id,
                amount=amount,
                currency=currency,
                reason=reason,
            )
        order_id = self._order_id(payment_id)
        if capture_id is None:
            state = tx.state_from_order(await self._get_order(order_id, payment_id))
            if state.capture_id is None or not state.status.is_paid:
                raise InvalidStateTransition(
                    "Nothing to refund: the PayPal payment has not been captured"
                )
            if state.currency is not None and state.currency != currency.upper():
                log.error(
                    "paypal.refund.currency_mismatch",
                    extra={
                        "payment_id": payment_id,
                        "expected": currency,
                        "paypal": state.currency,
                    },
                )
                raise ProviderUpstreamError(
                    "PayPal holds this payment in another currency", provider=self.name
                )
            capture_id = state.capture_id
        if not tx.is_paypal_id(capture_id):
            raise PaymentNotFound(f"No capture {capture_id!r} for payment {payment_id!r}")
        return await self._send_refund(
            payment_id,
            f"/v2/payments/captures/{capture_id}/refund",
            lambda: tx.refund_request(amount, currency, refund_id=refund_id, reason=reason),
            kind="refund",
            read=self._refund_result,
            request_id=_request_id(refund_id),
            refund_id=refund_id,
            amount=amount,
            currency=currency,
        )

    async def _send_refund(
        self,
        payment_id: str,
        path: str,
        body: Callable[[], dict[str, Any]],
        *,
        kind: str,
        read: Callable[..., RefundResult],
        request_id: str,
        refund_id: str,
        amount: int,
        currency: str,
    ) -> RefundResult:
        """Ask PayPal for a refund (of an order's capture, or of a sale) and log what it
        answered. ``request_id`` carries our refund id: asking again (a lost answer) never
        refunds twice."""
        try:
            payload = body()
        except tx.AmountNotRepresentable as error:
            raise OperationNotSupported(
                f"PayPal cannot refund {currency.upper()} amounts with decimals"
            ) from error
        refund = await self._call(
            "POST",
            path,
            log_event=f"paypal.{kind}.create",
            payment_id=payment_id,
            body=payload,
            request_id=request_id,
        )
        result = read(refund, amount=amount, currency=currency)
        log.info(
            f"paypal.{kind}.created",
            extra={
                "payment_id": payment_id,
                "refund_id": refund_id,
                "paypal_refund_id": result.provider_refund_id,
                "amount": amount,
                "currency": currency,
                "refund_status": str(result.status),
            },
        )
        return result

    async def get_refund(self, payment_id: str, provider_refund_id: str) -> RefundResult:
        if self._sale_id(payment_id) is None:
            self._order_id(payment_id)
        if not tx.is_paypal_id(provider_refund_id):
            raise NotFound(f"No refund {provider_refund_id!r}")
        if self._sale_id(payment_id) is not None:
            refund = await self._call(
                "GET",
                f"/v1/payments/refund/{provider_refund_id}",
                log_event="paypal.sale_refund.get",
                payment_id=payment_id,
            )
            return self._sale_refund_result(refund)
        refund = await self._call(
            "GET",
            f"/v2/payments/refunds/{provider_refund_id}",
            log_event="paypal.refund.get",
            payment_id=payment_id,
        )
        return self._refund_result(refund)

    # -- a subscription's payments: Payments v1 sales ---------------------------------------

    def _sale_id(self, payment_id: str) -> str | None:
        sale_id = sales.sale_id_of(payment_id)
        if sale_id is not None:
            self._require_configured()
        return sale_id

    async def _refund_sale(
        self,
        payment_id: str,
        sale_id: str,
        *,
        refund_id: str,
        amount: int,
        currency: str,
        reason: str | None,
    ) -> RefundResult:
        """``POST /v1/payments/sale/{id}/refund``: a subscription's payment is a sale, not an
        order (see ``sales``)."""
        return await self._send_refund(
            payment_id,
            f"/v1/payments/sale/{sale_id}/refund",
            lambda: sales.refund_request(amount, currency, refund_id=refund_id, reason=reason),
            kind="sale_refund",
            read=self._sale_refund_result,
            request_id=_request_id(refund_id, limit=sales.REQUEST_ID_MAX),
            refund_id=refund_id,
            amount=amount,
            currency=currency,
        )

    def _sale_refund_result(
        self, refund: dict[str, Any], *, amount: int | None = None, currency: str | None = None
    ) -> RefundResult:
        try:
            return sales.refund_result(refund, amount=amount, currency=currency)
        except ValueError as error:
            raise ProviderUpstreamError(
                "PayPal answered a refund we cannot read", provider=self.name
            ) from error

    def _refund_result(
        self, refund: dict[str, Any], *, amount: int | None = None, currency: str | None = None
    ) -> RefundResult:
        try:
            return tx.refund_result(refund, amount=amount, currency=currency)
        except ValueError as error:
            raise ProviderUpstreamError(
                "PayPal answered a refund we cannot read", provider=self.name
            ) from error

    # -- subscriptions ---------------------------------------------------------------------

    async def _billing_call(
        self,
        method: str,
        path: str,
        *,
        log_event: str,
        subject: str,
        body: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """``_call`` for the Subscriptions API: a missing object is NotFound in our words."""
        try:
            return await self._call(
                method,
                path,
                log_event=log_event,
                payment_id=subject,
                body=body,
                request_id=request_id,
            )
        except PaymentNotFound as error:
            raise NotFound(f"No PayPal subscription object {subject!r}") from error

    def _subscription_path(self, provider_subscription_id: str, suffix: str = "") -> str:
        self._require_configured()
        if not billing.is_subscription_id(provider_subscription_id):
            raise NotFound(f"No PayPal subscription {provider_subscription_id!r}")
        return f"/v1/billing/subscriptions/{provider_subscription_id}{suffix}"

    async def sync_price(self, price: RecurringPrice, *, existing: str | None) -> str:
        self._require_configured()
        if price.plan.currency not in PAYPAL_CURRENCIES:
            raise OperationNotSupported(f"PayPal does not bill in {price.plan.currency}")
        if existing and billing.is_plan_id(existing):
            try:
                plan = await self._get_plan(existing)
            except NotFound:
                plan = None
            if plan is not None and billing.plan_matches(plan, price):
                return existing
        product_id = await self._product_for(price)
        found = await self._find_plan(price, product_id=product_id)
        if found is not None:
            return found
        try:
            body = billing.plan_request(price, product_id=product_id)
        except tx.AmountNotRepresentable as error:
            raise OperationNotSupported(
                f"PayPal cannot bill {price.plan.currency} amounts with decimals"
            ) from error
        key = f"plan:{price.key}" + (f":replacing:{existing}" if existing else "")
        plan = await self._call(
            "POST",
            "/v1/billing/plans",
            log_event="paypal.plan.create",
            body=body,
            request_id=_request_id(key),
        )
        if not billing.is_plan_id(plan.get("id")):
            raise ProviderUpstreamError("PayPal answered without a plan ID", provider=self.name)
        log.info(
            "paypal.plan.created",
            extra={"plan": price.plan.code, "price_key": price.key, "paypal_plan": plan["id"]},
        )
        return str(plan["id"])

    async def _get_plan(self, plan_id: str) -> dict[str, Any]:
        return await self._billing_call(
            "GET", f"/v1/billing/plans/{plan_id}", log_event="paypal.plan.get", subject=plan_id
        )

    async def _find_plan(self, price: RecurringPrice, *, product_id: str) -> str | None:
        """A plan made before for ``price`` (by another instance, or by a call whose answer
        was lost): the product's plans are listed, and ours carry ``price.key`` as their
        description. The first pages only: a product has a few plans, not hundreds."""
        for page in range(1, 6):
            listed = await self._call(
                "GET",
                f"/v1/billing/plans?product_id={product_id}&page_size=20&page={page}",
                log_event="paypal.plan.list",
            )
            plans = [p for p in listed.get("plans") or [] if isinstance(p, dict)]
            for candidate in plans:
                if (
                    candidate.get("description") == price.key
                    and candidate.get("status") == "ACTIVE"
                ):
                    plan = await self._get_plan(str(candidate.get("id")))
                    if billing.plan_matches(plan, price):
                        return str(plan["id"])
            if len(plans) < 20:
                return None
        return None

    async def _product_for(self, price: RecurringPrice) -> str:
        product_id = billing.product_id_for(price)
        try:
            await self._billing_call(
                "GET",
                f"/v1/catalogs/products/{product_id}",
                log_event="paypal.product.get",
                subject=product_id,
            )
            return product_id
        except NotFound:
            pass
        created = await self._call(
            "POST",
            "/v1/catalogs/products",
            log_event="paypal.product.create",
            body=billing.product_request(price),
            request_id=_request_id(f"product:{product_id}"),
        )
        return str(created.get("id") or product_id)

    async def create_subscription(self, request: SubscriptionRequest) -> SubscriptionStarted:
        self._require_configured()
        plan_id = request.vendor_price_id or await self.sync_price(request.price, existing=None)
        subscription = await self._call(
            "POST",
            "/v1/billing/subscriptions",
            log_event="paypal.subscription.create",
            body=billing.subscription_request(request, plan_id=plan_id),
            request_id=_request_id(request.idempotency_key),
        )
        provider_id = subscription.get("id")
        approve = billing.approval_link(subscription)
        if not billing.is_subscription_id(provider_id) or approve is None:
            log.error(
                "paypal.subscription.create_unreadable",
                extra={"subscription_id": request.subscription_id},
            )
            raise ProviderUpstreamError(
                "PayPal gave no subscription to approve", provider=self.name
            )
        log.info(
            "paypal.subscription.created",
            extra={"subscription_id": request.subscription_id, "paypal_subscription": provider_id},
        )
        return SubscriptionStarted(
            provider_subscription_id=str(provider_id),
            status=SubscriptionStatus.INCOMPLETE,
            redirect_url=approve,
        )

    async def _get_subscription(self, provider_subscription_id: str) -> dict[str, Any]:
        return await self._billing_call(
            "GET",
            self._subscription_path(provider_subscription_id),
            log_event="paypal.subscription.get",
            subject=provider_subscription_id,
        )

    async def _latest_transaction(self, subscription: dict[str, Any]) -> InvoicePayment | None:
        """The subscription's latest payment, paid or failed, from its transactions since
        it started (PayPal requires a window)."""
        started = billing.moment(subscription.get("start_time") or subscription.get("create_time"))
        if started is None or subscription.get("status") in ("APPROVAL_PENDING", "APPROVED"):
            return None
        now = datetime.now(UTC)
        window = (
            f"start_time={billing.iso(started - timedelta(days=1))}&end_time={billing.iso(now)}"
        )
        transactions = await self._billing_call(
            "GET",
            self._subscription_path(str(subscription["id"]), f"/transactions?{window}"),
            log_event="paypal.subscription.transactions",
            subject=str(subscription["id"]),
        )
        return billing.latest_transaction(transactions)

    def _state(
        self, subscription: dict[str, Any], latest: InvoicePayment | None = None
    ) -> SubscriptionState:
        try:
            return billing.subscription_state(
                subscription, now=datetime.now(UTC), latest_invoice=latest
            )
        except ValueError as error:
            raise ProviderUpstreamError(
                "PayPal answered a subscription we cannot read", provider=self.name
            ) from error

    async def get_subscription(self, provider_subscription_id: str) -> SubscriptionState:
        subscription = await self._get_subscription(provider_subscription_id)
        return self._state(subscription, await self._latest_transaction(subscription))

    async def _status_change(
        self, provider_subscription_id: str, action: str, reason: str, idempotency_key: str
    ) -> None:
        await self._billing_call(
            "POST",
            self._subscription_path(provider_subscription_id, f"/{action}"),
            log_event=f"paypal.subscription.{action}",
            subject=provider_subscription_id,
            body={"reason": reason[:128]},
            request_id=_request_id(idempotency_key),
        )

    async def cancel_subscription(
        self, provider_subscription_id: str, *, at_period_end: bool, idempotency_key: str
    ) -> SubscriptionState:
        subscription = await self._get_subscription(provider_subscription_id)
        state = self._state(subscription)
        if state.status.is_final:
            return state  # cancelling again changes nothing
        status = subscription.get("status")
        if status in ("APPROVAL_PENDING", "APPROVED"):
            # PayPal cancels active or suspended subscriptions only; one never approved
            # lapses on its own, and one approved is activated within moments.
            raise InvalidStateTransition(
                "PayPal cannot cancel a subscription before it is active; an unapproved one "
                "lapses on its own"
            )
        period_end = state.current_period_end
        if at_period_end and status == "ACTIVE" and period_end is not None:
            # PayPal cancels at once only: suspend (billing stops, activate can undo it)
            # with a note of when the paid period ends. See billing's docstring.
            await self._status_change(
                provider_subscription_id,
                "suspend",
                billing.period_end_note(period_end),
                idempotency_key,
            )
        elif not (at_period_end and billing.suspended_by_us(subscription)):
            # Now; or at period end of one suspended by PayPal (failed payments) or paused,
            # whose billing has stopped already: the end is now.
            await self._status_change(
                provider_subscription_id, "cancel", "Canceled by the merchant", idempotency_key
            )
        return self._state(await self._get_subscription(provider_subscription_id))

    async def resume_subscription(
        self, provider_subscription_id: str, *, idempotency_key: str
    ) -> SubscriptionState:
        subscription = await self._get_subscription(provider_subscription_id)
        state = self._state(subscription)
        if billing.suspended_by_us(subscription) and state.status is SubscriptionStatus.ACTIVE:
            await self._status_change(
                provider_subscription_id, "activate", "Resumed by the customer", idempotency_key
            )
            return self._state(await self._get_subscription(provider_subscription_id))
        if state.status is SubscriptionStatus.PAUSED:
            await self._status_change(
                provider_subscription_id, "activate", "Resumed by the merchant", idempotency_key
            )
            return self._state(await self._get_subscription(provider_subscription_id))
        if state.status.is_final:
            raise InvalidStateTransition("A canceled PayPal subscription cannot be resumed")
        return state  # nothing to undo

    async def change_subscription_price(
        self,
        provider_subscription_id: str,
        *,
        vendor_price_id: str,
        now: bool,
        prorate: bool,
        idempotency_key: str,
    ) -> SubscriptionState:
        if now:
            # PayPal's revise applies a new plan from the next billing cycle and prorates
            # nothing; charging the new plan at once would need a second subscription.
            raise OperationNotSupported(
                "PayPal changes a subscription's plan from the next billing cycle only"
            )
        if not billing.is_plan_id(vendor_price_id):
            raise NotFound(f"No PayPal plan {vendor_price_id!r}")
        subscription = await self._get_subscription(provider_subscription_id)
        if subscription.get("status") != "ACTIVE":
            raise InvalidStateTransition("PayPal revises active subscriptions only")
        revised = await self._billing_call(
            "POST",
            self._subscription_path(provider_subscription_id, "/revise"),
            log_event="paypal.subscription.revise",
            subject=provider_subscription_id,
            body=billing.revise_request(vendor_price_id, return_url=None),
            request_id=_request_id(idempotency_key),
        )
        state = self._state(await self._get_subscription(provider_subscription_id))
        # A PayPal-wallet subscriber must consent on PayPal's page; until then (or if they
        # never do) the subscription keeps its plan.
        return dataclasses.replace(state, approval_url=billing.approval_link(revised))

    async def _billing_event(self, event: WebhookEvent, payload: Mapping[str, Any]) -> WebhookEvent:
        """A subscription's event in our terms. A sale names its subscription but not its
        state: that is read from PayPal."""
        resource = payload.get("resource")
        resource = resource if isinstance(resource, Mapping) else {}
        try:
            if event.event_type.startswith(billing.SUBSCRIPTION_EVENT_PREFIX):
                state = billing.subscription_state(resource, now=datetime.now(UTC))
                invoice = (
                    billing.failed_payment(resource)
                    if event.event_type == billing.EVENT_PAYMENT_FAILED
                    else None
                )
                # custom_id is our subscription id, not an order reference: no reference.
                return dataclasses.replace(
                    event, subscription=state, invoice=invoice, reference=None
                )
            if event.event_type == billing.EVENT_SALE_COMPLETED:
                found = billing.subscription_of_sale(resource)
                if found is None:
                    return event  # a sale of no subscription
                invoice = billing.sale_invoice(resource)
                try:
                    subscription = self._state(await self._get_subscription(found))
                except ServiceError as error:
                    if event.verified and isinstance(error, ProviderUnavailable):
                        raise  # PayPal delivers again later, when we can read it
                    # An unverified event may name anything: it says nothing then.
                    log.warning(
                        "paypal.webhook.subscription_lookup_failed",
                        extra={"event_id": event.event_id, "error_code": error.code},
                    )
                    return dataclasses.replace(event, reference=None)
                return dataclasses.replace(
                    event, subscription=subscription, invoice=invoice, reference=None
                )
        except ValueError as error:
            raise InvalidWebhookPayload("The event's resource is not what its type says") from error
        return event

    # -- webhooks and health ---------------------------------------------------------------

    async def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        self._require_configured()
        try:
            payload = load_json(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidWebhookPayload("The webhook body is not JSON") from error
        if not tx.is_event(payload):
            raise InvalidWebhookPayload("The webhook body is not a PayPal event")
        verified = await self._verify_signature(body, headers, payload)
        try:
            event = tx.webhook_event(payload, verified=verified)
        except ValueError as error:
            raise InvalidWebhookPayload("The event's resource is not what its type says") from error
        if event.event_type in sales.SALE_REFUND_EVENTS:
            event = self._sale_refund_event(event, payload)
        elif event.refund is not None:
            event = await self._with_refunded_order(event)
        event = await self._billing_event(event, payload)
        log.info(
            "paypal.webhook.received",
            extra={
                "event_id": event.event_id,
                "event_type": event.event_type,
                "verified": event.verified,
                "payment_id": event.payment_id,
                "status": event.status,
            },
        )
        return event

    async def _verify_signature(
        self, body: bytes, headers: Mapping[str, str], payload: Mapping[str, Any]
    ) -> bool:
        """Ask PayPal whether it sent this delivery. Any doubt is False: an unverified event
        only makes the service read the payment from PayPal itself."""
        event_id = payload.get("id")
        if self._webhook_id is None or not _WEBHOOK_ID.fullmatch(self._webhook_id):
            log.warning(
                "paypal.webhook.unverifiable",
                extra={"event_id": event_id, "action": "set PAYPAL_WEBHOOK_ID"},
            )
            return False
        fields: dict[str, str] = {}
        for field, (name, shape) in _TRANSMISSION_HEADERS.items():
            value = header(headers, name)
            if value is None or not shape.fullmatch(value):
                log.warning(
                    "paypal.webhook.signature_missing",
                    extra={"event_id": event_id, "header": name, "present": value is not None},
                )
                return False
            fields[field] = value
        # The event goes back byte for byte as it came: PayPal checks its signature against a
        # CRC32 of exactly those bytes, and a re-serialized event would not match.
        request = json.dumps({**fields, "webhook_id": self._webhook_id}, separators=(",", ":"))
        content = request[:-1].encode() + b',"webhook_event":' + body.strip() + b"}"
        try:
            answer = await self._call(
                "POST",
                "/v1/notifications/verify-webhook-signature",
                log_event="paypal.webhook.verify",
                content=content,
            )
        except ProviderError as error:
            # PayPal could not tell us: the event stays untrusted, never trusted by default.
            log.warning(
                "paypal.webhook.verify_unavailable",
                extra={"event_id": event_id, "error_code": error.code},
            )
            return False
        if answer.get("verification_status") != "SUCCESS":
            log.warning(
                "paypal.webhook.signature_invalid",
                extra={
                    "event_id": event_id,
                    "verification_status": answer.get("verification_status"),
                },
            )
            return False
        return True

    @staticmethod
    def _sale_refund_event(event: WebhookEvent, payload: Mapping[str, Any]) -> WebhookEvent:
        """PAYMENT.SALE.REFUNDED / .REVERSED: the resource is a v1 refund naming its sale,
        which is our payment ``pp_sale_<sale id>``."""
        resource = payload.get("resource")
        resource = resource if isinstance(resource, Mapping) else {}
        sale_id = sales.sale_of_refund(resource)
        try:
            refund = sales.refund_result(resource)
        except ValueError as error:
            raise InvalidWebhookPayload("The event's resource is not what its type says") from error
        return dataclasses.replace(
            event,
            payment_id=sales.payment_id_of_sale(sale_id) if sale_id else None,
            refund=refund,
            reference=None,
        )

    async def _with_refunded_order(self, event: WebhookEvent) -> WebhookEvent:
        """A refund names its capture, not its order: read the capture for the order (our
        payment ID) and whether the refunds now add up to all of it."""
        if event.capture_id is None:
            return event
        try:
            capture = await self._call(
                "GET",
                f"/v2/payments/captures/{event.capture_id}",
                log_event="paypal.capture.get",
            )
        except ServiceError as error:
            if event.verified and isinstance(error, ProviderUnavailable):
                raise  # PayPal delivers again later, when we can read the capture
            log.warning(
                "paypal.webhook.capture_lookup_failed",
                extra={"event_id": event.event_id, "error_code": error.code},
            )
            return event
        order_id = tx.order_id_of_capture(capture)
        return dataclasses.replace(
            event,
            payment_id=tx.payment_id_of(order_id) if order_id else None,
            reference=event.reference or tx.reference_of(capture),
        )

    async def health_check(self) -> HealthStatus:
        if not self.is_configured():
            return HealthStatus(
                healthy=False, message="not configured (PAYPAL_CLIENT_ID, PAYPAL_CLIENT_SECRET)"
            )
        started = time.perf_counter()
        try:
            # A fresh token proves both that PayPal answers and that it takes our credentials
            # (one attempt: a health check reports, it does not insist).
            await self._tokens.renew()
        except ServiceError as error:
            latency = (time.perf_counter() - started) * 1000
            return HealthStatus(healthy=False, message=error.title, latency_ms=round(latency, 1))
        latency = (time.perf_counter() - started) * 1000
        return HealthStatus(healthy=True, message="ok", latency_ms=round(latency, 1))


_STATE_DETAIL = "PayPal says the payment is not in a state that allows this"
_STATE_DETAILS = {
    "ORDER_NOT_APPROVED": "The buyer has not approved this PayPal payment yet: nothing to capture",
    "PAYER_ACTION_REQUIRED": "The buyer must return to PayPal before this payment can be captured",
    "ORDER_COMPLETION_IN_PROGRESS": "PayPal is still completing this payment; verify it shortly",
    "PENDING_CAPTURE": "The PayPal payment is still pending and cannot be refunded yet",
    "REFUND_TIME_LIMIT_EXCEEDED": "The PayPal payment is too old to be refunded",
    "REFUND_NOT_ALLOWED": "PayPal does not allow a refund of this payment",
    "PARTIAL_REFUND_NOT_ALLOWED": "PayPal allows only a full refund of this payment",
    "TRANSACTION_DISPUTED": "The PayPal payment is disputed; refund it through the dispute",
    "REFUND_NOT_PERMITTED_DUE_TO_CHARGEBACK": "The PayPal payment has a chargeback",
    # Payments v1 (a subscription's sales), by the error's name.
    "FULL_REFUND_NOT_ALLOWED_AFTER_PARTIAL_REFUND": (
        "PayPal allows no full refund after a partial one: refund what is left"
    ),
    "PAYMENT_STATE_INVALID": "PayPal says the payment is not in a state that allows this",
    "REFUND_FAILED_INSUFFICIENT_FUNDS": "The PayPal account holds too little to refund this",
    "TRANSACTION_REFUSED": "PayPal refused to refund this payment",
}
