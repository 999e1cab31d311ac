"""Paddle Billing, through its REST API on the shared ``httpx2.AsyncClient``.

Paddle is a merchant of record: it sells to the customer, computes and remits the tax and
issues the invoice; the merchant is paid out. A payment is a Paddle transaction (``txn_...``,
our payment id as it is), paid on Paddle Checkout at the transaction's checkout URL; a refund
is an adjustment (``action: refund``) that Paddle approves or rejects later.

Paddle's API takes no idempotency key, so no write here is ever repeated blindly: reads are
retried in ``with_retries``, writes are sent once. A refund whose answer was lost is found
again before it is asked for again (our refund id travels in the adjustment's reason), so
asking twice never refunds twice. Paddle's errors become the service's errors at this edge;
Paddle's request id is logged with each failure, and its messages never reach a client.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import httpx2
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from models.payment import RefundStatus
from models.subscription import SubscriptionStatus
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
    InvoicePayment,
    PaymentState,
    ProviderDeps,
    ProviderMappings,
    RecurringPrice,
    RefundResult,
    SubscriptionRequest,
    SubscriptionStarted,
    SubscriptionState,
    WebhookEvent,
)
from ..payloads import load_json
from ..resilience import NO_RETRY, RetryPolicy, with_retries
from ..vendor_http import VendorErrors, header, json_object, retry_after_seconds
from . import billing
from . import transformers as tx

log = logging.getLogger("payments.providers.paddle")

API_BASES = {
    "sandbox": "https://sandbox-api.paddle.com",
    "production": "https://api.paddle.com",
}
# Error codes that mean the account is not set up for what we ask: an operator must act in
# Paddle's dashboard (developer.paddle.com/errors).
SETUP_CODES = frozenset(
    {
        "transaction_default_checkout_url_not_set",
        "transaction_checkout_url_domain_is_not_approved",
        "transaction_checkout_not_enabled",
        "forbidden",
    }
)
REFUND_STATE_CODES = frozenset(
    {
        "adjustment_pending_refund_request",
        "adjustment_transaction_invalid_status_for_refund",
    }
)
REFUND_TOO_LARGE_CODES = frozenset(
    {
        "adjustment_amount_above_remaining_allowed",
        "adjustment_total_amount_above_remaining_allowed",
        "adjustment_transaction_item_over_refunded",
    }
)
# One page is enough for a payment's refunds: Paddle refuses a new refund while one is
# pending, so a transaction gathers few adjustments.
ADJUSTMENTS_PER_PAGE = 50


@dataclass(frozen=True, slots=True)
class _Failure:
    """What Paddle said when it refused a call: its error envelope
    (``{"error": {"type", "code", "detail"}, "meta": {"request_id"}}``)."""

    status: int
    type: str | None
    code: str | None
    detail: str | None
    request_id: str | None
    retry_after: float | None

    @classmethod
    def of(cls, response: httpx2.Response) -> _Failure:
        body = json_object(response)
        error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
        meta: dict[str, Any] = body["meta"] if isinstance(body.get("meta"), dict) else {}

        def text(value: Any, limit: int = 100) -> str | None:
            return str(value)[:limit] if isinstance(value, str) and value else None

        return cls(
            status=response.status_code,
            type=text(error.get("type")),
            code=text(error.get("code")),
            detail=text(error.get("detail"), 300),
            request_id=text(meta.get("request_id")),
            retry_after=retry_after_seconds(response.headers),
        )


TaxCategory = Literal[
    "digital-goods",
    "ebooks",
    "implementation-services",
    "professional-services",
    "saas",
    "software-programming-services",
    "standard",
    "training-services",
    "website-hosting",
]


class PaddleConfig(BaseModel):
    """Paddle's configuration besides secrets (settings ``paddle_*``). The API base address
    is set only in the environment (``PADDLE_API_BASE``), never stored: whoever could change
    it could send our API key to another host. Without it, ``environment`` picks Paddle's
    sandbox or production address."""

    model_config = ConfigDict(extra="forbid")

    vendor_id: str | None = Field(
        default=None,
        pattern=r"^[0-9]{1,12}$",
        description="The Paddle seller ID, shown to operators (Paddle > Business account)",
    )
    environment: Literal["sandbox", "production"] = Field(
        default="sandbox", description="sandbox or production: which Paddle API is used"
    )
    webhook_tolerance_seconds: int = Field(
        default=5,
        ge=1,
        le=300,
        description="How far a webhook's Paddle-Signature timestamp may be from now",
    )
    tax_category: TaxCategory = Field(
        default="standard",
        description="Tax category of the products made for our plans (enabled on the account)",
    )
    api_base: Annotated[str | None, EnvironmentOnly()] = Field(
        default=None,
        description="Where Paddle's API is, if not the environment's (environment only)",
    )


class PaddleSecrets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr = Field(min_length=8, description="A Paddle API key")
    webhook_secret: SecretStr | None = Field(
        default=None,
        min_length=8,
        description="The notification destination's secret key; verifies webhook signatures",
    )

    @model_validator(mode="after")
    def _webhooks_verifiable(self) -> PaddleSecrets:
        # Paddle's refunds end by its webhook: without the secret no event could be trusted.
        if self.webhook_secret is None:
            raise ValueError(
                "webhook_secret (PADDLE_WEBHOOK_SECRET) is required with api_key: Paddle "
                "tells the outcome of payments and refunds by signed webhooks"
            )
        return self


class PaddleProvider(BasePaymentProvider):
    name = "paddle"
    display_name = "Paddle"
    id_prefixes = (tx.PREFIX,)
    settings_prefix = "paddle_"
    config_model = PaddleConfig
    secrets_model = PaddleSecrets
    merchant_of_record = "Paddle.com"
    currencies = tx.CURRENCIES
    # No CAPTURE or CANCEL: Paddle Checkout charges at once, and an unpaid checkout simply
    # lapses (canceling a transaction is for invoices, which this service does not issue).
    capabilities = frozenset(
        {
            Capability.CARD,
            Capability.WALLET,
            Capability.REDIRECT,
            Capability.REFUND,
            Capability.PARTIAL_REFUND,
            Capability.WEBHOOKS,
            Capability.SUBSCRIPTIONS,
        }
    )

    def __init__(
        self,
        *,
        http: httpx2.AsyncClient,
        api_key: SecretStr | None,
        webhook_secret: SecretStr | None = None,
        api_base: str = API_BASES["sandbox"],
        vendor_id: str | None = None,
        webhook_tolerance_s: int = 5,
        tax_category: str = "standard",
        mappings: ProviderMappings | None = None,
        timeout_seconds: float = 10.0,
        retry_policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._api_key = api_key or None  # read only to be sent
        self._webhook_secret = webhook_secret or None
        self._api_base = api_base.rstrip("/")
        self.vendor_id = vendor_id
        self._tolerance_s = webhook_tolerance_s
        self._tax_category = tax_category
        self._mappings = mappings
        self._timeout = httpx2.Timeout(timeout_seconds)
        self._retry_policy = retry_policy or RetryPolicy()
        self._clock = clock
        self._errors = VendorErrors(self.name, self.display_name, log)

    @classmethod
    def from_config(
        cls,
        config: PaddleConfig | None,
        secrets: PaddleSecrets | None,
        deps: ProviderDeps,
        *,
        retry_policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> PaddleProvider:
        api_base = (
            (config.api_base or API_BASES[config.environment]) if config else API_BASES["sandbox"]
        )
        common: dict[str, Any] = {
            "http": deps.http,
            "api_base": api_base,
            "timeout_seconds": deps.timeout_s,
            "retry_policy": retry_policy,
            "clock": clock,
        }
        if config is None or secrets is None:  # not configured: every call is refused
            return cls(api_key=None, **common)
        return cls(
            api_key=secrets.api_key,
            webhook_secret=secrets.webhook_secret,
            vendor_id=config.vendor_id,
            webhook_tolerance_s=config.webhook_tolerance_seconds,
            tax_category=config.tax_category,
            mappings=deps.mappings,
            **common,
        )

    @property
    def api_base(self) -> str:
        """Where this provider sends its calls (sandbox, production, or PADDLE_API_BASE)."""
        return self._api_base

    def is_configured(self) -> bool:
        return self._api_key is not None

    def _require_configured(self) -> None:
        if not self.is_configured():
            raise ProviderNotConfigured(
                "Paddle is not configured on this service (PADDLE_API_KEY, PADDLE_WEBHOOK_SECRET)",
                provider=self.name,
            )

    def _check_id(self, payment_id: str) -> None:
        self._require_configured()
        if not tx.is_transaction_id(payment_id):
            raise PaymentNotFound(f"No payment {payment_id!r}")

    # -- calls -----------------------------------------------------------------------------

    async def _call(
        self,
        method: Literal["GET", "POST", "PATCH"],
        path: str,
        *,
        log_event: str,
        payment_id: str | None = None,
        body: dict[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        policy: RetryPolicy | None = None,
    ) -> dict[str, Any]:
        """One API call; returns Paddle's whole answer (``data`` and ``meta``). Reads are
        retried while Paddle is unavailable; a write is sent once, whatever ``policy`` says,
        since Paddle takes no idempotency key. ``log_event`` names the call in logs."""
        self._require_configured()
        assert self._api_key is not None
        url = f"{self._api_base}{path}"
        if query:
            url += "?" + urlencode(query)
        headers = {
            "Accept": "application/json",
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
        }
        content = None
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
            policy = NO_RETRY

        async def attempt() -> dict[str, Any]:
            try:
                response = await self._http.request(
                    method, url, headers=headers, content=content, timeout=self._timeout
                )
            except httpx2.HTTPError as error:
                # A timeout may have been processed: a write is not sent again.
                raise self._errors.transport_error(
                    error, log_event, {"payment_id": payment_id}
                ) from error
            return self._answer(response, log_event, payment_id)

        return await with_retries(attempt, policy=policy or self._retry_policy, event=log_event)

    def _answer(
        self, response: httpx2.Response, log_event: str, payment_id: str | None
    ) -> dict[str, Any]:
        if 200 <= response.status_code < 300:
            try:
                data = response.json()
            except ValueError:
                data = None
            if not isinstance(data, dict) or "data" not in data:
                log.error(
                    f"{log_event}_unreadable",
                    extra={
                        "provider": self.name,
                        "payment_id": payment_id,
                        "http_status": response.status_code,
                    },
                )
                raise ProviderUpstreamError(
                    "Paddle answered with something unreadable", provider=self.name
                )
            return data
        raise self._service_error(_Failure.of(response), log_event, payment_id=payment_id)

    def _service_error(
        self, failure: _Failure, log_event: str, *, payment_id: str | None
    ) -> ServiceError:
        """Map one refusal from Paddle to the service's error tree, and log it once."""
        fields = {
            "provider": self.name,
            "payment_id": payment_id,
            "http_status": failure.status,
            "paddle_request_id": failure.request_id,
            "paddle_error_type": failure.type,
            "paddle_error_code": failure.code,
            "paddle_error_detail": failure.detail,
        }
        failed = f"{log_event}_failed"
        status, code = failure.status, failure.code
        if status == 429:
            return self._errors.rate_limited(log_event, fields, failure.retry_after)
        if status >= 500 or status == 409:
            # 409 concurrent_modification: another change to the same entity is running.
            return self._errors.unavailable(log_event, fields)
        if status in (401, 403) or code in SETUP_CODES:
            # invalid_token (403): a wrong, revoked or other-environment key. Never log it.
            log.error(
                failed,
                extra={
                    **fields,
                    "action": "check PADDLE_API_KEY, PADDLE_ENVIRONMENT and the key's "
                    "permissions, and the default payment link in Paddle's checkout settings",
                },
            )
            return ProviderMisconfigured(
                "Paddle refused the request for our account; an operator must check the "
                "configuration",
                provider=self.name,
            )
        if status == 404:
            log.info(failed, extra=fields)
            if payment_id is not None:
                return PaymentNotFound(f"No payment {payment_id!r}")
            return NotFound("Paddle does not know this object")
        if code in REFUND_TOO_LARGE_CODES:
            log.info(failed, extra=fields)
            return RefundExceedsBalance("The refund is larger than what is left to refund")
        if code in REFUND_STATE_CODES:
            log.info(failed, extra=fields)
            return InvalidStateTransition(_STATE_DETAILS[code])
        log.warning(failed, extra=fields)
        return ProviderUpstreamError("Paddle refused the request", provider=self.name)

    @staticmethod
    def _data(answer: Mapping[str, Any]) -> dict[str, Any]:
        data = tx.data_of(answer)
        return data if isinstance(data, dict) else {}

    # -- create and verify -----------------------------------------------------------------

    async def _mapped_price(self, plan_code: str) -> str | None:
        """The catalogue price (``pri_...``) our plan is mapped to, if any."""
        if self._mappings is None:
            return None
        price_id = await self._mappings.external_id(self.name, "plan", plan_code)
        if price_id is not None and not tx.is_price_id(price_id):
            log.error(
                "paddle.plan_mapping_invalid",
                extra={"plan": plan_code, "action": "map the plan to a pri_ price id"},
            )
            raise ProviderMisconfigured(
                "The Paddle price this plan is mapped to is not a price id", provider=self.name
            )
        return price_id

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        self._require_configured()
        if request.plan.currency.upper() not in tx.CURRENCIES:
            raise OperationNotSupported(
                f"Paddle does not take payments in {request.plan.currency.upper()}"
            )
        price_id = await self._mapped_price(request.plan.code)
        body = tx.transaction_request(request, price_id=price_id, tax_category=self._tax_category)
        # Sent once: Paddle has no idempotency key. A lost answer leaves at most a draft
        # transaction nobody is sent to, which Paddle never charges.
        answer = await self._call(
            "POST", "/transactions", log_event="paddle.transaction.create", body=body
        )
        transaction = self._data(answer)
        if not tx.is_transaction_id(transaction.get("id")):
            log.error(
                "paddle.transaction.create_unreadable", extra={"reference": request.reference}
            )
            raise ProviderUpstreamError(
                "Paddle answered without a transaction id", provider=self.name
            )
        result = tx.intent_result(transaction)
        if result.redirect_url is None:
            log.error(
                "paddle.transaction.no_checkout_url",
                extra={
                    "payment_id": result.payment_id,
                    "action": "set a default payment link in Paddle > Checkout settings",
                },
            )
            raise ProviderMisconfigured(
                "Paddle gave no checkout page for the payment; an operator must set the "
                "default payment link",
                provider=self.name,
            )
        total = tx.grand_total(transaction)
        if (
            price_id is not None
            and total is not None
            and total
            != (
                request.plan.amount,
                request.plan.currency.upper(),
            )
        ):
            # The mapped price is not the catalogue's: never send a customer to pay it.
            log.error(
                "paddle.plan_price_mismatch",
                extra={
                    "plan": request.plan.code,
                    "payment_id": result.payment_id,
                    "expected": f"{request.plan.amount} {request.plan.currency}",
                    "paddle_total": f"{total[0]} {total[1]}",
                    "action": "map the plan to a tax-inclusive price of the catalogue amount",
                },
            )
            raise ProviderMisconfigured(
                "The Paddle price this plan is mapped to differs from the catalogue price",
                provider=self.name,
            )
        log.info(
            "paddle.transaction.created",
            extra={
                "payment_id": result.payment_id,
                "reference": request.reference,
                "catalogue_price": price_id is not None,
            },
        )
        return result

    async def _get_transaction(self, payment_id: str) -> dict[str, Any]:
        answer = await self._call(
            "GET",
            f"/transactions/{payment_id}",
            log_event="paddle.transaction.get",
            payment_id=payment_id,
        )
        transaction = self._data(answer)
        if transaction.get("id") != payment_id:
            raise ProviderUpstreamError(
                "Paddle answered with another transaction", provider=self.name
            )
        return transaction

    async def _refund_adjustments(
        self, payment_id: str, *, adjustment_id: str | None = None
    ) -> list[Any]:
        query = {
            "transaction_id": payment_id,
            "action": "refund",
            "per_page": str(ADJUSTMENTS_PER_PAGE),
        }
        if adjustment_id is not None:
            query["id"] = adjustment_id
        answer = await self._call(
            "GET",
            "/adjustments",
            log_event="paddle.adjustment.list",
            query=query,
        )
        data = tx.data_of(answer)
        return data if isinstance(data, list) else []

    async def verify_payment(self, payment_id: str) -> PaymentState:
        self._check_id(payment_id)
        transaction = await self._get_transaction(payment_id)
        status = tx.transaction_status(transaction.get("status"))
        # Only a paid transaction can have refunds: one more read, only then.
        refunds = (
            tx.refunds_of(await self._refund_adjustments(payment_id)) if status.is_paid else None
        )
        return tx.state_from_transaction(transaction, refunds)

    # -- refunds ---------------------------------------------------------------------------

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
        self._check_id(payment_id)
        transaction = await self._get_transaction(payment_id)
        paddle_status = transaction.get("status")
        if paddle_status != tx.TransactionStatus.COMPLETED:
            raise InvalidStateTransition(
                "Paddle is still processing this payment; refund it shortly"
                if paddle_status == tx.TransactionStatus.PAID
                else "Nothing to refund: the Paddle payment has not been completed"
            )
        total = tx.grand_total(transaction)
        if total is None or total[1] != currency.upper():
            log.error(
                "paddle.refund.currency_mismatch",
                extra={"payment_id": payment_id, "expected": currency, "paddle": total},
            )
            raise ProviderUpstreamError(
                "Paddle holds this payment in another currency", provider=self.name
            )
        existing = tx.refunds_of(await self._refund_adjustments(payment_id))
        for found in existing:
            if found.refund_id == refund_id:
                # Asked before and the answer was lost: that one is ours, never a second.
                log.info(
                    "paddle.refund.found",
                    extra={"payment_id": payment_id, "refund_id": refund_id},
                )
                return found
        refunded_before = sum(r.amount for r in existing if r.status is not RefundStatus.FAILED)
        try:
            body = tx.refund_request(
                transaction,
                amount=amount,
                refund_id=refund_id,
                reason=reason,
                refunded_before=refunded_before,
            )
        except ValueError as error:
            raise RefundExceedsBalance(
                "The refund is larger than what is left to refund"
            ) from error
        answer = await self._call(
            "POST",
            "/adjustments",
            log_event="paddle.adjustment.create",
            payment_id=payment_id,
            body=body,
        )
        result = self._refund_result(self._data(answer))
        log.info(
            "paddle.refund.created",
            extra={
                "payment_id": payment_id,
                "refund_id": refund_id,
                "paddle_adjustment_id": result.provider_refund_id,
                "amount": amount,
                "currency": currency,
                "refund_status": str(result.status),
                "type": body["type"],
            },
        )
        return result

    async def get_refund(self, payment_id: str, provider_refund_id: str) -> RefundResult:
        self._check_id(payment_id)
        if not tx.is_adjustment_id(provider_refund_id):
            raise NotFound(f"No refund {provider_refund_id!r}")
        # The API has no GET of one adjustment: the list, filtered by its id.
        found = await self._refund_adjustments(payment_id, adjustment_id=provider_refund_id)
        for adjustment in found:
            if isinstance(adjustment, Mapping) and adjustment.get("id") == provider_refund_id:
                return self._refund_result(adjustment)
        raise NotFound(f"No refund {provider_refund_id!r}")

    def _refund_result(self, adjustment: Mapping[str, Any]) -> RefundResult:
        try:
            return tx.refund_result(adjustment)
        except ValueError as error:
            raise ProviderUpstreamError(
                "Paddle answered a refund we cannot read", provider=self.name
            ) from error

    # -- subscriptions ---------------------------------------------------------------------
    #
    # Paddle takes no idempotency key: as for payments, every write here is sent once, and
    # each create is preceded by a search for what an earlier call (whose answer was lost)
    # may have made: products by custom_data.plan, prices by custom_data.price_key. The
    # changes to a subscription (cancel, resume, price) are idempotent by nature: asking
    # again for the same end state changes nothing.

    async def _billing_read(
        self, path: str, *, log_event: str, subject: str, query: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        try:
            return self._data(await self._call("GET", path, log_event=log_event, query=query))
        except NotFound as error:
            raise NotFound(f"No Paddle subscription object {subject!r}") from error

    async def _list(
        self, path: str, *, log_event: str, query: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        data = tx.data_of(await self._call("GET", path, log_event=log_event, query=query))
        return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []

    async def sync_price(self, price: RecurringPrice, *, existing: str | None) -> str:
        self._require_configured()
        if price.plan.currency not in tx.CURRENCIES:
            raise OperationNotSupported(f"Paddle does not bill in {price.plan.currency}")
        if existing and tx.is_price_id(existing):
            try:
                found = await self._billing_read(
                    f"/prices/{existing}", log_event="paddle.price.get", subject=existing
                )
            except NotFound:
                found = None
            if found is not None and billing.price_matches(found, price):
                return existing
        product_id = await self._product_for(price)
        for candidate in await self._list(
            "/prices",
            log_event="paddle.price.list",
            query={
                "product_id": product_id,
                "status": "active",
                "recurring": "true",
                "per_page": "200",
            },
        ):
            if billing.keyed(candidate, "price_key", price.key) and billing.price_matches(
                candidate, price
            ):
                return str(candidate["id"])
        created = self._data(
            await self._call(
                "POST",
                "/prices",
                log_event="paddle.price.create",
                body=billing.price_request(price, product_id=product_id),
            )
        )
        if not tx.is_price_id(created.get("id")):
            raise ProviderUpstreamError("Paddle answered without a price id", provider=self.name)
        log.info(
            "paddle.price.created",
            extra={"plan": price.plan.code, "price_key": price.key, "paddle_price": created["id"]},
        )
        return str(created["id"])

    async def _product_for(self, price: RecurringPrice) -> str:
        for candidate in await self._list(
            "/products",
            log_event="paddle.product.list",
            query={"status": "active", "per_page": "200"},
        ):
            if billing.keyed(candidate, "plan", price.plan.code):
                return str(candidate["id"])
        created = self._data(
            await self._call(
                "POST",
                "/products",
                log_event="paddle.product.create",
                body=billing.product_request(price, tax_category=self._tax_category),
            )
        )
        if not isinstance(created.get("id"), str):
            raise ProviderUpstreamError("Paddle answered without a product id", provider=self.name)
        return str(created["id"])

    async def create_subscription(self, request: SubscriptionRequest) -> SubscriptionStarted:
        self._require_configured()
        price_id = request.vendor_price_id or await self.sync_price(request.price, existing=None)
        # Sent once, as every Paddle write: a lost answer leaves a draft transaction nobody
        # is sent to, which Paddle never charges.
        transaction = self._data(
            await self._call(
                "POST",
                "/transactions",
                log_event="paddle.subscription.checkout_create",
                body=billing.checkout_transaction_request(request, price_id=price_id),
            )
        )
        if not tx.is_transaction_id(transaction.get("id")):
            raise ProviderUpstreamError(
                "Paddle answered without a transaction id", provider=self.name
            )
        url = tx.checkout_url(transaction)
        if url is None:
            log.error(
                "paddle.transaction.no_checkout_url",
                extra={"action": "set a default payment link in Paddle > Checkout settings"},
            )
            raise ProviderMisconfigured(
                "Paddle gave no checkout page for the subscription; an operator must set the "
                "default payment link",
                provider=self.name,
            )
        log.info(
            "paddle.subscription.checkout_created",
            extra={"subscription_id": request.subscription_id, "transaction": transaction["id"]},
        )
        return SubscriptionStarted(
            provider_subscription_id=str(transaction["id"]),
            status=SubscriptionStatus.INCOMPLETE,
            redirect_url=url,
        )

    async def _get_subscription(self, subscription_id: str) -> dict[str, Any]:
        return await self._billing_read(
            f"/subscriptions/{subscription_id}",
            log_event="paddle.subscription.get",
            subject=subscription_id,
        )

    async def _checkout_or_subscription(
        self, provider_subscription_id: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        self._require_configured()
        if billing.is_subscription_id(provider_subscription_id):
            return None, await self._get_subscription(provider_subscription_id)
        if not tx.is_transaction_id(provider_subscription_id):
            raise NotFound(f"No Paddle subscription {provider_subscription_id!r}")
        transaction = await self._billing_read(
            f"/transactions/{provider_subscription_id}",
            log_event="paddle.transaction.get",
            subject=provider_subscription_id,
        )
        made = billing.subscription_of_transaction(transaction)
        return transaction, (await self._get_subscription(made) if made else None)

    async def _existing_subscription(self, provider_subscription_id: str) -> dict[str, Any]:
        _, subscription = await self._checkout_or_subscription(provider_subscription_id)
        if subscription is None:
            raise InvalidStateTransition("The customer has not completed Paddle Checkout yet")
        return subscription

    async def _latest_invoice(self, subscription_id: str) -> InvoicePayment | None:
        transactions = await self._list(
            "/transactions",
            log_event="paddle.transaction.list",
            query={
                "subscription_id": subscription_id,
                "order_by": "created_at[DESC]",
                "per_page": "1",
            },
        )
        try:
            return billing.invoice_of_transaction(transactions[0]) if transactions else None
        except ValueError as error:
            raise ProviderUpstreamError(
                "Paddle answered a transaction we cannot read", provider=self.name
            ) from error

    def _subscription_state(
        self, subscription: Mapping[str, Any], latest: InvoicePayment | None = None
    ) -> SubscriptionState:
        try:
            return billing.subscription_state(subscription, latest_invoice=latest)
        except ValueError as error:
            raise ProviderUpstreamError(
                "Paddle answered a subscription we cannot read", provider=self.name
            ) from error

    async def _state_now(self, subscription: Mapping[str, Any]) -> SubscriptionState:
        latest = await self._latest_invoice(str(subscription.get("id")))
        return self._subscription_state(subscription, latest)

    async def get_subscription(self, provider_subscription_id: str) -> SubscriptionState:
        transaction, subscription = await self._checkout_or_subscription(provider_subscription_id)
        if subscription is not None:
            return await self._state_now(subscription)
        assert transaction is not None
        return billing.state_of_unfinished_checkout(transaction)

    async def _change(
        self, subscription_id: str, path: str, body: dict[str, Any], log_event: str
    ) -> dict[str, Any]:
        method: Literal["POST", "PATCH"] = "PATCH" if path == "" else "POST"
        return self._data(
            await self._call(
                method,
                f"/subscriptions/{subscription_id}{path}",
                log_event=log_event,
                body=body,
            )
        )

    async def cancel_subscription(
        self, provider_subscription_id: str, *, at_period_end: bool, idempotency_key: str
    ) -> SubscriptionState:
        # ``idempotency_key`` has no Paddle header to go in: cancelling is idempotent here
        # (a subscription already canceled, or set to cancel, is answered as it is).
        transaction, subscription = await self._checkout_or_subscription(provider_subscription_id)
        if subscription is None:
            assert transaction is not None
            # No subscription yet: the customer simply never pays the checkout, which Paddle
            # does not charge; there is nothing at Paddle to end.
            raise InvalidStateTransition(
                "Paddle has no subscription to cancel until its checkout is paid"
            )
        state = self._subscription_state(subscription)
        if state.status.is_final or (at_period_end and state.cancel_at_period_end):
            return await self._state_now(subscription)
        updated = await self._change(
            state.provider_subscription_id,
            "/cancel",
            billing.cancel_request(at_period_end=at_period_end),
            "paddle.subscription.cancel",
        )
        return await self._state_now(updated)

    async def resume_subscription(
        self, provider_subscription_id: str, *, idempotency_key: str
    ) -> SubscriptionState:
        subscription = await self._existing_subscription(provider_subscription_id)
        state = self._subscription_state(subscription)
        if state.status.is_final:
            raise InvalidStateTransition("A canceled Paddle subscription cannot be resumed")
        if state.status is SubscriptionStatus.PAUSED:
            updated = await self._change(
                state.provider_subscription_id,
                "/resume",
                {"effective_from": "immediately"},
                "paddle.subscription.resume",
            )
        elif state.cancel_at_period_end:
            # Removing the scheduled change undoes a cancel at period end.
            updated = await self._change(
                state.provider_subscription_id,
                "",
                {"scheduled_change": None},
                "paddle.subscription.update",
            )
        else:
            return await self._state_now(subscription)  # nothing to undo
        return await self._state_now(updated)

    async def change_subscription_price(
        self,
        provider_subscription_id: str,
        *,
        vendor_price_id: str,
        now: bool,
        prorate: bool,
        idempotency_key: str,
    ) -> SubscriptionState:
        if not tx.is_price_id(vendor_price_id):
            raise NotFound(f"No Paddle price {vendor_price_id!r}")
        subscription = await self._existing_subscription(provider_subscription_id)
        state = self._subscription_state(subscription)
        if state.status.is_final:
            raise InvalidStateTransition("A canceled Paddle subscription bills nothing")
        if state.vendor_price_id == vendor_price_id:
            return await self._state_now(subscription)  # asked again: already done
        updated = await self._change(
            state.provider_subscription_id,
            "",
            billing.price_change_request(price_id=vendor_price_id, now=now, prorate=prorate),
            "paddle.subscription.update",
        )
        return await self._state_now(updated)

    async def customer_portal_url(self, provider_subscription_id: str, *, return_url: str) -> str:
        subscription = await self._existing_subscription(provider_subscription_id)
        customer = billing.customer_of(subscription)
        if customer is None:
            raise ProviderUpstreamError(
                "Paddle's subscription names no customer", provider=self.name
            )
        # Paddle's portal has no return address: ``return_url`` cannot be passed on.
        session = self._data(
            await self._call(
                "POST",
                f"/customers/{customer}/portal-sessions",
                log_event="paddle.portal_session.create",
                body={"subscription_ids": [str(subscription["id"])]},
            )
        )
        url = billing.portal_url(session)
        if url is None:
            raise ProviderUpstreamError("Paddle gave no portal address", provider=self.name)
        return url

    async def _billing_event(self, event: WebhookEvent, payload: Mapping[str, Any]) -> WebhookEvent:
        """A subscription's event in our terms; events of a subscription's transactions carry
        the invoice and the subscription as it is now, and no payment of ours."""
        data = payload.get("data")
        data = data if isinstance(data, Mapping) else {}
        try:
            if event.event_type.startswith(billing.SUBSCRIPTION_EVENT_PREFIX):
                return dataclasses.replace(event, subscription=billing.subscription_state(data))
            if event.event_type in billing.INVOICE_EVENTS:
                made = billing.subscription_of_transaction(data)
                ours = billing.ours_of(data)
                if made is None and ours is None:
                    return event  # a one-off payment's transaction
                invoice = billing.invoice_of_transaction(data)
                if made is not None:
                    try:
                        found = await self._get_subscription(made)
                    except NotFound:
                        log.warning(
                            "paddle.webhook.subscription_missing",
                            extra={"event_id": event.event_id},
                        )
                        return event
                    state = self._subscription_state(found)
                    if state.subscription_id is None:
                        state = dataclasses.replace(state, subscription_id=ours)
                else:
                    state = billing.state_of_unfinished_checkout(data)
                return dataclasses.replace(
                    event,
                    payment_id=None,
                    status=None,
                    reference=None,
                    subscription=state,
                    invoice=invoice,
                )
        except ValueError as error:
            raise InvalidWebhookPayload("The event's data is not what its type says") from error
        return event

    # -- webhooks and health ---------------------------------------------------------------

    async def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        self._require_configured()
        if self._webhook_secret is None:
            log.error("paddle.webhook.no_secret", extra={"action": "set PADDLE_WEBHOOK_SECRET"})
            raise InvalidWebhookSignature("Paddle webhooks are not accepted: no signing secret")
        signature = header(headers, tx.SIGNATURE_HEADER)
        try:
            tx.verify_signature(
                body,
                signature,
                [self._webhook_secret.get_secret_value()],
                now=self._clock(),
                tolerance_s=self._tolerance_s,
            )
        except tx.SignatureInvalid as error:
            log.warning(
                "paddle.webhook.signature_invalid",
                extra={"reason": str(error), "has_header": signature is not None},
            )
            raise InvalidWebhookSignature("The Paddle-Signature header does not match") from error
        payload = load_json(body)
        if not tx.is_event(payload):
            raise InvalidWebhookPayload("The webhook body is not a Paddle event")
        try:
            event = tx.webhook_event(payload)
        except ValueError as error:
            raise InvalidWebhookPayload("The event's data is not what its type says") from error
        event = await self._billing_event(event, payload)
        log.info(
            "paddle.webhook.received",
            extra={
                "event_id": event.event_id,
                "event_type": event.event_type,
                "payment_id": event.payment_id,
                "status": event.status,
                "refund_status": event.refund.status if event.refund else None,
            },
        )
        return event

    async def health_check(self) -> HealthStatus:
        if not self.is_configured():
            return HealthStatus(
                healthy=False, message="not configured (PADDLE_API_KEY, PADDLE_WEBHOOK_SECRET)"
            )
        started = time.perf_counter()
        try:
            # One page of one transaction: proves Paddle answers and takes our key.
            await self._call(
                "GET",
                "/transactions",
                log_event="paddle.health",
                query={"per_page": "1"},
                policy=NO_RETRY,  # a health check reports, it does not insist
            )
        except ServiceError as error:
            latency = (time.perf_counter() - started) * 1000
            return HealthStatus(healthy=False, message=error.title, latency_ms=round(latency, 1))
        latency = (time.perf_counter() - started) * 1000
        return HealthStatus(healthy=True, message="ok", latency_ms=round(latency, 1))


_STATE_DETAILS = {
    "adjustment_pending_refund_request": (
        "A refund of this payment is waiting for Paddle's approval; ask again once it is decided"
    ),
    "adjustment_transaction_invalid_status_for_refund": (
        "Paddle does not allow a refund of this payment in its current state"
    ),
}
