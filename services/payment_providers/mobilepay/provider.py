"""Vipps MobilePay, through the ePayment API on the shared ``httpx2.AsyncClient``.

The payment is reserved in the customer's app (``userFlow: WEB_REDIRECT``) and captured,
cancelled and refunded through the API's modification endpoints, each call carrying an
``Idempotency-Key`` derived from our operation (the refund's: our refund id), so a call whose
answer was lost is asked again without moving money twice.

Access token: ``POST /accesstoken/get`` with the client id, client secret and subscription
key, kept **per worker** until shortly before it expires, fetched by one request at a time
however many wait for it, and renewed once when the API answers 401. Not shared through Redis,
on purpose: a token lives an hour (test) or a day (production), so each worker fetches about
one a day, too few to be worth a Redis round trip on every call; and a token in Redis would
be a bearer credential stored in plain text, readable by anyone who can read the store.

Webhooks: HMAC-SHA256 (see ``signature``), checked on the raw body in constant time; a delivery
whose date is more than five minutes away is refused. The signature covers the host and path
that Vipps MobilePay posted to, which behind a proxy are not the ones this process sees: set
``MOBILEPAY_WEBHOOK_URL`` to the URL registered with the Webhooks API (otherwise the request's
``Host`` header and the service's own route are used).

Errors become the service's errors at this edge; the API's ``traceId`` is logged with each
failure, and its raw messages never reach a client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import httpx2
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from models.payment import PaymentStatus, RefundStatus
from services.errors import (
    InvalidStateTransition,
    InvalidWebhookPayload,
    InvalidWebhookSignature,
    NotFound,
    OperationNotSupported,
    PaymentNotFound,
    ProviderMisconfigured,
    ProviderNotConfigured,
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
    PaymentState,
    ProviderDeps,
    RefundResult,
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
from . import transformers as tx

log = logging.getLogger("payments.providers.mobilepay")

API_BASES = {"test": "https://apitest.vipps.no", "production": "https://api.vipps.no"}
# The service's own webhook route, signed over when MOBILEPAY_WEBHOOK_URL is not set.
WEBHOOK_PATH = "/api/v1/payment/webhook/mobilepay"
# A token is renewed this long before it expires (at most a tenth of its life).
TOKEN_RENEW_MARGIN_S = 300.0
# How far a delivery's x-ms-date may be from our clock.
WEBHOOK_TOLERANCE_S = 300.0

SUBSCRIPTION_KEY_HEADER = "Ocp-Apim-Subscription-Key"
MERCHANT_SERIAL_NUMBER_HEADER = "Merchant-Serial-Number"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
SYSTEM_NAME_HEADER = "Vipps-System-Name"
SYSTEM_NAME = "payment-service"
DATE_HEADER = "x-ms-date"
CONTENT_HASH_HEADER = "x-ms-content-sha256"
SIGNED_HEADERS = "x-ms-date;host;x-ms-content-sha256"
AUTHORIZATION_PREFIX = f"HMAC-SHA256 SignedHeaders={SIGNED_HEADERS}&Signature="


def signature(secret: str, *, path_and_query: str, date: str, host: str, content_hash: str) -> str:
    """The webhook signature as the Webhooks API's "Request authentication" page defines it:
    base64 HMAC-SHA256, keyed with the secret's UTF-8 bytes, of
    ``POST\\n{path and query}\\n{date};{host};{content hash}`` (``\\n``, not ``\\r\\n``)."""
    text = f"POST\n{path_and_query}\n{date};{host};{content_hash}"
    digest = hmac.new(secret.encode(), text.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def content_hash(body: bytes) -> str:
    """``x-ms-content-sha256``: base64 SHA-256 of the raw body."""
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


@dataclass(frozen=True, slots=True)
class _Failure:
    """What the API said when it refused a call (a ``Problem``), for logs only."""

    status: int
    title: str | None
    detail: str | None
    trace_id: str | None
    retry_after: float | None

    @classmethod
    def of(cls, response: httpx2.Response) -> _Failure:
        body = json_object(response)
        title, detail = body.get("title"), body.get("detail")
        trace = body.get("traceId") or response.headers.get("x-request-id")
        return cls(
            status=response.status_code,
            title=str(title)[:200] if title else None,
            detail=str(detail)[:300] if detail else None,
            trace_id=str(trace)[:100] if trace else None,
            retry_after=retry_after_seconds(response.headers),
        )


class MobilePayConfig(BaseModel):
    """Vipps MobilePay's configuration besides secrets (settings ``MOBILEPAY_*``). The API
    base address is set only in the environment (``MOBILEPAY_API_BASE``), never stored:
    whoever could change it could send our keys to another host."""

    model_config = ConfigDict(extra="forbid")

    client_id: str = Field(min_length=1, max_length=200, description="The sales unit's client_id")
    merchant_sales_number: str | None = Field(
        default=None,
        pattern=r"^[0-9]{4,6}$",
        description="The sales unit's merchant serial number (MSN), sent as Merchant-Serial-Number",
    )
    environment: Literal["test", "production"] = Field(
        default="test", description="test (apitest.vipps.no) or production (api.vipps.no)"
    )
    webhook_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        max_length=2000,
        description="The public URL registered with the Webhooks API; its host and path are "
        "what deliveries are signed over",
    )
    api_base: Annotated[str | None, EnvironmentOnly()] = Field(
        default=None, description="Where the API is, if not the environment's (environment only)"
    )

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.merchant_sales_number is None:
            raise ValueError("MOBILEPAY_MERCHANT_SALES_NUMBER is required with MOBILEPAY_CLIENT_ID")
        return self


class MobilePaySecrets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client_secret: SecretStr = Field(min_length=1, description="The sales unit's client_secret")
    subscription_key: SecretStr | None = Field(
        default=None, description="Ocp-Apim-Subscription-Key of the sales unit"
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="The secret the Webhooks API gave when the webhook was registered"
    )

    @model_validator(mode="after")
    def _complete(self) -> Self:
        # Without the subscription key no call gets through; without the webhook secret no
        # event could be trusted: both belong with the client secret.
        if self.subscription_key is None or self.webhook_secret is None:
            raise ValueError(
                "MOBILEPAY_SUBSCRIPTION_KEY and MOBILEPAY_WEBHOOK_SECRET are required with "
                "MOBILEPAY_CLIENT_SECRET"
            )
        return self


@dataclass(frozen=True, slots=True)
class _Credentials:
    client_id: str
    client_secret: SecretStr
    subscription_key: SecretStr
    merchant_serial_number: str
    webhook_secret: SecretStr


class MobilePayProvider(BasePaymentProvider):
    name = "mobilepay"
    display_name = "Vipps MobilePay"
    id_prefixes = (tx.PREFIX,)
    settings_prefix = "mobilepay_"
    config_model = MobilePayConfig
    secrets_model = MobilePaySecrets
    currencies = tx.CURRENCIES
    capabilities = frozenset(
        {
            Capability.WALLET,
            Capability.REDIRECT,
            Capability.CAPTURE,
            Capability.PARTIAL_CAPTURE,
            Capability.CANCEL,
            Capability.REFUND,
            Capability.PARTIAL_REFUND,
            Capability.WEBHOOKS,
        }
    )

    def __init__(
        self,
        *,
        http: httpx2.AsyncClient,
        credentials: _Credentials | None,
        api_base: str,
        webhook_url: str | None = None,
        timeout_seconds: float = 10.0,
        retry_policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._credentials = credentials
        self._api_base = api_base.rstrip("/")
        self._webhook_url = webhook_url
        self._timeout = httpx2.Timeout(timeout_seconds)
        self._retry_policy = retry_policy or RetryPolicy()
        self._clock = clock
        self._wall_clock = wall_clock
        self._tokens = AccessTokenCache(self._fetch_token, clock=clock)
        self._errors = VendorErrors(self.name, self.display_name, log)

    @classmethod
    def from_config(
        cls,
        config: MobilePayConfig | None,
        secrets: MobilePaySecrets | None,
        deps: ProviderDeps,
        *,
        retry_policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> MobilePayProvider:
        api_base = (
            (config.api_base or API_BASES[config.environment]) if config else API_BASES["test"]
        )
        credentials = None
        if (
            config is not None
            and secrets is not None
            and config.merchant_sales_number is not None
            and secrets.subscription_key is not None
            and secrets.webhook_secret is not None
        ):
            credentials = _Credentials(
                client_id=config.client_id,
                client_secret=secrets.client_secret,
                subscription_key=secrets.subscription_key,
                merchant_serial_number=config.merchant_sales_number,
                webhook_secret=secrets.webhook_secret,
            )
        return cls(
            http=deps.http,
            credentials=credentials,
            api_base=api_base,
            webhook_url=config.webhook_url if config else None,
            timeout_seconds=deps.timeout_s,
            retry_policy=retry_policy,
            clock=clock,
            wall_clock=wall_clock,
        )

    @property
    def api_base(self) -> str:
        return self._api_base

    def is_configured(self) -> bool:
        return self._credentials is not None

    def _require_configured(self) -> _Credentials:
        if self._credentials is None:
            raise ProviderNotConfigured(
                "Vipps MobilePay is not configured on this service (MOBILEPAY_CLIENT_ID, "
                "MOBILEPAY_CLIENT_SECRET, MOBILEPAY_SUBSCRIPTION_KEY, "
                "MOBILEPAY_MERCHANT_SALES_NUMBER, MOBILEPAY_WEBHOOK_SECRET)",
                provider=self.name,
            )
        return self._credentials

    def _reference(self, payment_id: str) -> str:
        self._require_configured()
        reference = tx.reference_of(payment_id)
        if reference is None:
            raise PaymentNotFound(f"No payment {payment_id!r}")
        return reference

    # -- the token -------------------------------------------------------------------------

    async def _fetch_token(self) -> AccessToken:
        credentials = self._require_configured()
        started = self._clock()
        try:
            response = await self._http.post(
                f"{self._api_base}/accesstoken/get",
                headers={
                    "client_id": credentials.client_id,
                    "client_secret": credentials.client_secret.get_secret_value(),
                    SUBSCRIPTION_KEY_HEADER: credentials.subscription_key.get_secret_value(),
                    MERCHANT_SERIAL_NUMBER_HEADER: credentials.merchant_serial_number,
                    "Accept": "application/json",
                },
                timeout=self._timeout,
            )
        except httpx2.HTTPError as error:
            raise self._errors.transport_error(error, "mobilepay.token.fetch") from error
        if response.status_code != 200:
            failure = _Failure.of(response)
            if response.status_code in (400, 401, 403):
                # Our client id, secret or subscription key is wrong. Never log any of them.
                raise self._errors.credentials_refused(
                    "mobilepay.token.fetch",
                    self._log_fields(failure),
                    action="check MOBILEPAY_CLIENT_ID, MOBILEPAY_CLIENT_SECRET and "
                    "MOBILEPAY_SUBSCRIPTION_KEY",
                )
            raise self._service_error(failure, "mobilepay.token.fetch", payment_id=None)
        try:
            body = response.json()
            value = str(body["access_token"])
            expires_in = float(body.get("expires_in", 0))
        except (ValueError, KeyError, TypeError) as error:
            log.error("mobilepay.token.unreadable", extra={"http_status": 200})
            raise ProviderUpstreamError(
                "Vipps MobilePay answered the token request with something unreadable",
                provider=self.name,
            ) from error
        log.info("mobilepay.token.fetched", extra={"expires_in_s": expires_in})
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
        idempotency_key: str | None = None,
    ) -> Any:
        """One API call, retried while the API is unavailable (every call here is a read or
        carries an Idempotency-Key); returns the answer's JSON."""
        credentials = self._require_configured()
        headers = {
            "Accept": "application/json",
            SUBSCRIPTION_KEY_HEADER: credentials.subscription_key.get_secret_value(),
            MERCHANT_SERIAL_NUMBER_HEADER: credentials.merchant_serial_number,
            SYSTEM_NAME_HEADER: SYSTEM_NAME,
        }
        content = None
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            headers[IDEMPOTENCY_KEY_HEADER] = tx.idempotency_key(idempotency_key)

        async def attempt() -> Any:
            return await self._send_authenticated(
                method, path, headers, content, log_event=log_event, payment_id=payment_id
            )

        return await with_retries_keeping_outcome(
            attempt, policy=self._retry_policy, event=log_event
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
    ) -> Any:
        token = await self._tokens.get()
        response = await self._send(method, path, headers, content, token, log_event=log_event)
        if response.status_code == 401:
            # The token expired early or was revoked: one fresh token, one more try.
            log.info("mobilepay.token.refused", extra={"call": log_event})
            self._tokens.forget(token)
            token = await self._tokens.get()
            response = await self._send(method, path, headers, content, token, log_event=log_event)
            if response.status_code == 401:
                raise self._errors.credentials_refused(
                    log_event,
                    self._log_fields(_Failure.of(response), payment_id),
                    action="Vipps MobilePay refused a fresh token: check the sales unit",
                )
        if 200 <= response.status_code < 300:
            try:
                return response.json()
            except ValueError as error:
                log.error(
                    f"{log_event}_unreadable",
                    extra={"payment_id": payment_id, "http_status": response.status_code},
                )
                raise ProviderUpstreamError(
                    "Vipps MobilePay answered with something unreadable", provider=self.name
                ) from error
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
            raise self._errors.transport_error(error, log_event) from error

    def _log_fields(self, failure: _Failure, payment_id: str | None = None) -> dict[str, Any]:
        return {
            "provider": self.name,
            "payment_id": payment_id,
            "http_status": failure.status,
            "mobilepay_trace_id": failure.trace_id,
            "mobilepay_title": failure.title,
            "mobilepay_detail": failure.detail,
        }

    def _service_error(
        self, failure: _Failure, log_event: str, *, payment_id: str | None
    ) -> ServiceError:
        """Map one refusal to the service's error tree, and log it once."""
        fields = self._log_fields(failure, payment_id)
        failed = f"{log_event}_failed"
        status = failure.status
        if status == 429:
            return self._errors.rate_limited(log_event, fields, failure.retry_after)
        if status >= 500:
            return self._errors.unavailable(log_event, fields)
        if status == 403:
            log.error(failed, extra={**fields, "action": "the sales unit lacks access"})
            return ProviderMisconfigured(
                "Vipps MobilePay refused the operation for our sales unit; an operator must "
                "check it",
                provider=self.name,
            )
        if status == 404 and payment_id is not None:
            log.info(failed, extra=fields)
            return PaymentNotFound(f"No payment {payment_id!r}")
        if status in (400, 409) and payment_id is not None and log_event != "mobilepay.create":
            # A modification the payment's state does not allow (more than is left to
            # capture or refund, a cancel after capture, ...): the API's problem says which,
            # in words meant for developers; ours stay stable.
            log.info(failed, extra=fields)
            if log_event == "mobilepay.refund":
                return RefundExceedsBalance(
                    "Vipps MobilePay refused the refund: more than is left to refund, or the "
                    "payment cannot be refunded"
                )
            return InvalidStateTransition(
                "Vipps MobilePay says the payment is not in a state that allows this"
            )
        return self._errors.refused(log_event, fields)

    # -- create and verify -----------------------------------------------------------------

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        self._require_configured()
        currency = request.plan.currency.upper()
        if currency not in tx.CURRENCIES:
            raise OperationNotSupported(f"Vipps MobilePay does not take payments in {currency}")
        if not 0 < request.plan.amount <= tx.AMOUNT_MAX:
            raise OperationNotSupported("Vipps MobilePay cannot take this amount")
        capture_method = str(request.options.get("capture_method") or "automatic")
        if capture_method not in ("automatic", "manual"):
            raise OperationNotSupported(f"Vipps MobilePay has no capture method {capture_method!r}")
        body = tx.create_payment_request(request, capture_method=capture_method)
        answer = await self._call(
            "POST",
            "/epayment/v1/payments",
            log_event="mobilepay.create",
            body=body,
            idempotency_key=request.idempotency_key,
        )
        redirect = answer.get("redirectUrl") if isinstance(answer, dict) else None
        if not isinstance(redirect, str) or urlsplit(redirect).scheme not in ("https", "http"):
            log.error("mobilepay.create_unreadable", extra={"reference": request.reference})
            raise ProviderUpstreamError(
                "Vipps MobilePay gave no page for the customer to pay on", provider=self.name
            )
        payment_id = tx.payment_id_of(body["reference"])
        log.info(
            "mobilepay.created",
            extra={
                "payment_id": payment_id,
                "reference": request.reference,
                "capture_method": capture_method,
            },
        )
        return IntentResult(
            payment_id=payment_id, status=PaymentStatus.PENDING, redirect_url=redirect
        )

    async def _get_payment(self, reference: str, payment_id: str) -> tx.VippsObject:
        payment = await self._call(
            "GET",
            f"/epayment/v1/payments/{reference}",
            log_event="mobilepay.get",
            payment_id=payment_id,
        )
        return self._readable(payment, payment_id)

    def _readable(self, payment: Any, payment_id: str) -> tx.VippsObject:
        try:
            return tx.check_payment(payment)
        except tx.UnreadablePayment as error:
            log.error("mobilepay.payment_unreadable", extra={"payment_id": payment_id})
            raise ProviderUpstreamError(
                "Vipps MobilePay answered a payment we cannot read", provider=self.name
            ) from error

    async def _refunds(self, reference: str, payment_id: str) -> tuple[RefundResult, ...]:
        events = await self._call(
            "GET",
            f"/epayment/v1/payments/{reference}/events",
            log_event="mobilepay.events",
            payment_id=payment_id,
        )
        try:
            return tx.refunds_of_events(events)
        except tx.UnreadablePayment as error:
            raise ProviderUpstreamError(
                "Vipps MobilePay answered an event log we cannot read", provider=self.name
            ) from error

    async def _state(self, payment: tx.VippsObject, payment_id: str) -> PaymentState:
        reference = str(payment["reference"])
        # The event log is read only when the payment has refunds to list.
        refunds = await self._refunds(reference, payment_id) if tx.amount_refunded(payment) else ()
        return tx.state_of_payment(payment, refunds)

    async def verify_payment(self, payment_id: str) -> PaymentState:
        """The payment as Vipps MobilePay has it. An authorized payment whose capture method
        is automatic is captured here, at once (the capture's Idempotency-Key is the one
        ``capture`` uses, so a verify and a capture at the same time move the money once);
        its history then says ``succeeded`` where it would have said ``requires_capture``."""
        reference = self._reference(payment_id)
        payment = await self._get_payment(reference, payment_id)
        if (
            payment.get("state") == tx.State.AUTHORIZED
            and tx.amount_captured(payment) == 0
            and tx.amount_cancelled(payment) == 0
            and tx.capture_method_of(payment) == "automatic"
        ):
            log.info("mobilepay.capture_at_once", extra={"payment_id": payment_id})
            return await self.capture(payment_id, idempotency_key=f"capture-{payment_id}")
        return await self._state(payment, payment_id)

    # -- capture, cancel, refund -----------------------------------------------------------

    async def capture(
        self, payment_id: str, *, idempotency_key: str, amount: int | None = None
    ) -> PaymentState:
        """Capture all of the authorization, or ``amount`` of it; the rest is then released
        (cancelled), as the contract promises. Asking again answers the first capture."""
        reference = self._reference(payment_id)
        payment = await self._get_payment(reference, payment_id)
        planned, currency = payment["amount"]["value"], str(payment["amount"]["currency"])
        captured = tx.amount_captured(payment)
        if captured == 0:
            if payment.get("state") != tx.State.AUTHORIZED:
                raise InvalidStateTransition(
                    "The customer has not approved this Vipps MobilePay payment: nothing to capture"
                )
            wanted = planned if amount is None else amount
            if not 0 < wanted <= planned:
                raise OperationNotSupported("The capture amount must be within the authorization")
            answer = await self._call(
                "POST",
                f"/epayment/v1/payments/{reference}/capture",
                log_event="mobilepay.capture",
                payment_id=payment_id,
                body=tx.modification(wanted, currency),
                idempotency_key=idempotency_key,
            )
            payment = self._readable(answer, payment_id)
            captured = tx.amount_captured(payment)
            log.info(
                "mobilepay.captured",
                extra={"payment_id": payment_id, "amount": captured, "currency": currency},
            )
        left = planned - captured - tx.amount_cancelled(payment)
        if 0 < captured < planned and left > 0:
            payment = await self._release(reference, payment_id, payment, left, idempotency_key)
        return await self._state(payment, payment_id)

    async def _release(
        self,
        reference: str,
        payment_id: str,
        payment: tx.VippsObject,
        left: int,
        idempotency_key: str,
    ) -> tx.VippsObject:
        """Cancel what a partial capture left reserved, so the customer's money is freed now
        and not when the reservation lapses. A failure is logged and left: the payment is
        paid either way, and the next capture call (or the reservation's end) frees it."""
        try:
            answer = await self._call(
                "POST",
                f"/epayment/v1/payments/{reference}/cancel",
                log_event="mobilepay.release",
                payment_id=payment_id,
                idempotency_key=f"{idempotency_key}-release",
            )
        except ServiceError as error:
            log.warning(
                "mobilepay.release_failed",
                extra={"payment_id": payment_id, "left": left, "code": error.code},
            )
            return payment
        log.info("mobilepay.released", extra={"payment_id": payment_id, "amount": left})
        return self._readable(answer, payment_id)

    async def cancel(self, payment_id: str, *, idempotency_key: str) -> PaymentState:
        reference = self._reference(payment_id)
        answer = await self._call(
            "POST",
            f"/epayment/v1/payments/{reference}/cancel",
            log_event="mobilepay.cancel",
            payment_id=payment_id,
            idempotency_key=idempotency_key,
        )
        payment = self._readable(answer, payment_id)
        if tx.amount_captured(payment) > 0:
            # Cancelling a captured payment only releases what was not captured: it is paid.
            raise InvalidStateTransition("A captured Vipps MobilePay payment cannot be canceled")
        log.info("mobilepay.canceled", extra={"payment_id": payment_id})
        return await self._state(payment, payment_id)

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
        """Refund ``amount``; our refund id is the Idempotency-Key, which the API keeps on
        the refund's event, so the event log and webhooks lead back to our record. The API
        refunds synchronously: an accepted refund is succeeded."""
        reference = self._reference(payment_id)
        if currency.upper() not in tx.CURRENCIES:
            raise OperationNotSupported(f"Vipps MobilePay does not refund {currency.upper()}")
        answer = await self._call(
            "POST",
            f"/epayment/v1/payments/{reference}/refund",
            log_event="mobilepay.refund",
            payment_id=payment_id,
            body=tx.modification(amount, currency),
            idempotency_key=refund_id,
        )
        self._readable(answer, payment_id)
        log.info(
            "mobilepay.refunded",
            extra={
                "payment_id": payment_id,
                "refund_id": refund_id,
                "amount": amount,
                "currency": currency,
            },
        )
        return RefundResult(
            provider_refund_id=refund_id,
            amount=amount,
            currency=currency.upper(),
            status=RefundStatus.SUCCEEDED,
            refund_id=refund_id,
        )

    async def get_refund(self, payment_id: str, provider_refund_id: str) -> RefundResult:
        reference = self._reference(payment_id)
        for refund in await self._refunds(reference, payment_id):
            if refund.provider_refund_id == provider_refund_id:
                return refund
        raise NotFound(f"No refund {provider_refund_id!r}")

    # -- webhooks and health ---------------------------------------------------------------

    def _verify_signature(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Raise ``InvalidWebhookSignature`` unless the delivery is signed with our secret
        and dated within five minutes of now."""
        credentials = self._require_configured()
        date = header(headers, DATE_HEADER)
        claimed_hash = header(headers, CONTENT_HASH_HEADER)
        authorization = header(headers, "authorization")
        if not date or not claimed_hash or not authorization:
            raise InvalidWebhookSignature("The webhook is not signed")
        try:
            sent_at = parsedate_to_datetime(date)
        except (TypeError, ValueError) as error:
            raise InvalidWebhookSignature("The webhook's date cannot be read") from error
        if sent_at.tzinfo is None:
            sent_at = sent_at.replace(tzinfo=UTC)
        if abs(self._wall_clock() - sent_at.timestamp()) > WEBHOOK_TOLERANCE_S:
            raise InvalidWebhookSignature("The webhook's date is too far from now")
        actual_hash = content_hash(body)
        if not hmac.compare_digest(actual_hash.encode(), claimed_hash.encode("utf-8", "replace")):
            raise InvalidWebhookSignature("The webhook's body does not match its hash")
        if self._webhook_url is not None:
            public = urlsplit(self._webhook_url)
            host = public.netloc
            path = (public.path or "/") + (f"?{public.query}" if public.query else "")
        else:
            host = header(headers, "host") or ""
            path = WEBHOOK_PATH
        expected = AUTHORIZATION_PREFIX + signature(
            credentials.webhook_secret.get_secret_value(),
            path_and_query=path,
            date=date,
            host=host,
            content_hash=actual_hash,
        )
        if not hmac.compare_digest(expected.encode(), authorization.encode("utf-8", "replace")):
            raise InvalidWebhookSignature("The webhook's signature does not match")

    async def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        """A verified event. Events whose name alone does not say where the payment is
        (AUTHORIZED, CANCELLED, CAPTURED) are answered by reading the payment: an
        authorized payment with automatic capture is captured then, a cancel that only
        released the rest of a partial capture leaves it paid, and events out of order
        cannot move it to a state it has left."""
        self._verify_signature(body, headers)
        try:
            payload = load_json(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidWebhookPayload("The webhook body is not JSON") from error
        if not tx.is_event(payload):
            raise InvalidWebhookPayload("The webhook body is not a Vipps MobilePay event")
        name = tx.event_name(payload)
        status = None
        if name is not None and payload["success"] is True:
            status = tx.status_named_by(name)
            if status is None and name is not tx.EventName.REFUNDED:
                payment_id = tx.payment_id_of(str(payload["reference"]))
                try:
                    status = (await self.verify_payment(payment_id)).status
                except PaymentNotFound:
                    status = None  # not a payment of this sales unit
        event = tx.webhook_event(payload, verified=True, status=status)
        log.info(
            "mobilepay.webhook.received",
            extra={
                "event_id": event.event_id,
                "event_type": event.event_type,
                "payment_id": event.payment_id,
                "status": event.status,
                "success": payload["success"],
            },
        )
        return event

    async def health_check(self) -> HealthStatus:
        if not self.is_configured():
            return HealthStatus(
                healthy=False, message="not configured (MOBILEPAY_CLIENT_ID and the rest)"
            )
        started = time.perf_counter()
        try:
            # A fresh token proves both that the API answers and that it takes our keys.
            await self._tokens.renew()
        except ServiceError as error:
            latency = (time.perf_counter() - started) * 1000
            return HealthStatus(healthy=False, message=error.title, latency_ms=round(latency, 1))
        latency = (time.perf_counter() - started) * 1000
        return HealthStatus(healthy=True, message="ok", latency_ms=round(latency, 1))
