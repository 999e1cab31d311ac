"""Flutterwave, through its v3 REST API on the shared ``httpx2.AsyncClient``.

The flow is Flutterwave Standard: ``POST /v3/payments`` makes a hosted payment link for our
``tx_ref``; the customer pays there and is sent back to our return URL with ``status``,
``tx_ref`` and ``transaction_id`` in its query, which we never believe. The truth is
``GET /v3/transactions/verify_by_reference``, and a success counts only when its amount and
currency are the ones we asked for (kept in the provider's own Redis namespace when the link
is made, since the contract's ``verify_payment`` is given only the payment id).

Flutterwave v3 takes no idempotency key. Creating a link moves no money, so it is retried
like a read. A refund does move money: it is sent once, carries our refund id in
``comments``, and before any refund is sent the transaction's refunds are listed for one
carrying that id, so that asking again after a lost answer never refunds twice.

Webhooks carry ``verif-hash``: the secret hash configured in Flutterwave's dashboard, sent as
is. It is compared in constant time and a delivery without it is refused, but it signs
nothing, so every event is unverified: it only makes the service read the transaction.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping
from typing import Annotated, Any

import httpx2
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from models.payment import PaymentStatus
from services.errors import (
    CustomerEmailRequired,
    InvalidStateTransition,
    InvalidWebhookPayload,
    InvalidWebhookSignature,
    NotFound,
    OperationNotSupported,
    PaymentNotFound,
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
    PaymentState,
    ProviderDeps,
    ProviderKeyValue,
    RefundResult,
    WebhookEvent,
)
from ..payloads import load_json
from ..resilience import NO_RETRY, RetryPolicy
from ..vendor_http import VendorErrors, header, retry_after_seconds, with_retries_keeping_outcome
from . import transformers as tx

log = logging.getLogger("payments.providers.flutterwave")

API_BASE = "https://api.flutterwave.com"
# What we asked each payment link for, kept this long: past any verify or refund of it.
EXPECTED_TTL_S = 400 * 24 * 3600
# A transaction's refunds, read page by page while looking for ours (a handful in practice).
MAX_REFUND_PAGES = 10

_REMEMBER_LUA = """
redis.call('HSET', KEYS[1], 'amount', ARGV[1], 'currency', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class FlutterwaveConfig(BaseModel):
    """Flutterwave's configuration besides secrets (settings ``flutterwave_*``). The API base
    address is set only in the environment (``FLUTTERWAVE_API_BASE``), never stored: whoever
    could change it could send our secret key to another host."""

    model_config = ConfigDict(extra="forbid")

    public_key: str | None = Field(
        default=None,
        pattern=r"^FLWPUBK(_TEST)?-[A-Za-z0-9]{8,64}-X$",
        description="FLWPUBK-...-X, for clients that open Flutterwave's inline checkout",
    )
    api_base: Annotated[str, EnvironmentOnly()] = Field(
        default=API_BASE, description="Where Flutterwave's API is (environment only)"
    )


class FlutterwaveSecrets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secret_key: SecretStr = Field(min_length=8, description="FLWSECK-...-X, the API secret key")
    secret_hash: SecretStr | None = Field(
        default=None,
        min_length=8,
        description="The webhook secret hash set in Flutterwave's dashboard (verif-hash)",
    )

    @model_validator(mode="after")
    def _webhooks_can_be_checked(self) -> FlutterwaveSecrets:
        # Without it no delivery can be told from a stranger's: refuse to start rather than
        # accept every POST, or silently refuse every real one.
        if self.secret_hash is None:
            raise ValueError("FLUTTERWAVE_SECRET_HASH is required when Flutterwave is configured")
        return self


class FlutterwaveProvider(BasePaymentProvider):
    name = "flutterwave"
    display_name = "Flutterwave"
    id_prefixes = (tx.PREFIX,)
    settings_prefix = "flutterwave_"
    config_model = FlutterwaveConfig
    secrets_model = FlutterwaveSecrets
    currencies = tx.CURRENCIES
    # No CAPTURE or CANCEL: a Standard payment is taken when the customer pays, and a link
    # nobody paid simply lapses.
    capabilities = frozenset(
        {
            Capability.CARD,
            Capability.WALLET,
            Capability.REDIRECT,
            Capability.REFUND,
            Capability.PARTIAL_REFUND,
            Capability.WEBHOOKS,
        }
    )

    def __init__(
        self,
        *,
        http: httpx2.AsyncClient,
        key_value: ProviderKeyValue,
        secret_key: SecretStr | None,
        secret_hash: SecretStr | None,
        api_base: str = API_BASE,
        timeout_seconds: float = 10.0,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self._http = http
        self._kv = key_value
        self._remember = key_value.script(_REMEMBER_LUA)
        self._secret_key = secret_key or None  # read only to be sent
        self._secret_hash = secret_hash or None  # read only to be compared
        self._api_base = api_base.rstrip("/")
        self._timeout = httpx2.Timeout(timeout_seconds)
        self._errors = VendorErrors(self.name, self.display_name, log)
        self._retry_policy = retry_policy or RetryPolicy()

    @classmethod
    def from_config(
        cls,
        config: FlutterwaveConfig | None,
        secrets: FlutterwaveSecrets | None,
        deps: ProviderDeps,
        *,
        retry_policy: RetryPolicy | None = None,
    ) -> FlutterwaveProvider:
        configured = config is not None and secrets is not None
        return cls(
            http=deps.http,
            key_value=deps.key_value(cls.name),
            secret_key=secrets.secret_key if configured and secrets else None,
            secret_hash=secrets.secret_hash if configured and secrets else None,
            api_base=config.api_base if config else API_BASE,
            timeout_seconds=deps.timeout_s,
            retry_policy=retry_policy,
        )

    @property
    def api_base(self) -> str:
        return self._api_base

    def is_configured(self) -> bool:
        return self._secret_key is not None and self._secret_hash is not None

    def _require_configured(self) -> None:
        if not self.is_configured():
            raise ProviderNotConfigured(
                "Flutterwave is not configured on this service "
                "(FLUTTERWAVE_SECRET_KEY, FLUTTERWAVE_SECRET_HASH)",
                provider=self.name,
            )

    def _tx_ref(self, payment_id: str) -> str:
        self._require_configured()
        tx_ref = tx.tx_ref_of(payment_id)
        if tx_ref is None:
            raise PaymentNotFound(f"No payment {payment_id!r}")
        return tx_ref

    # -- calls -----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        log_event: str,
        payment_id: str | None = None,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
        policy: RetryPolicy | None = None,
    ) -> Any:
        """One API call, retried while Flutterwave is unavailable as ``policy`` allows;
        returns the ``data`` of Flutterwave's ``{"status": "success", ...}`` answer."""
        self._require_configured()

        async def attempt() -> Any:
            return await self._send(
                method, path, content, params, log_event=log_event, payment_id=payment_id
            )

        return await with_retries_keeping_outcome(
            attempt, policy=policy or self._retry_policy, event=log_event
        )

    async def _send(
        self,
        method: str,
        path: str,
        content: bytes | None,
        params: Mapping[str, str] | None,
        *,
        log_event: str,
        payment_id: str | None,
    ) -> Any:
        assert self._secret_key is not None
        headers = {
            "Accept": "application/json",
            "Authorization": f"Bearer {self._secret_key.get_secret_value()}",
        }
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = await self._http.request(
                method,
                f"{self._api_base}{path}",
                headers=headers,
                content=content,
                params=dict(params) if params else None,
                timeout=self._timeout,
            )
        except httpx2.HTTPError as error:
            raise self._errors.transport_error(
                error, log_event, {"payment_id": payment_id}
            ) from error
        try:
            body = tx.decode(response.content)
        except ValueError:
            body = None
        if (
            200 <= response.status_code < 300
            and isinstance(body, dict)
            and body.get("status") == "success"
        ):
            return body.get("data")
        raise self._service_error(response, body, log_event, payment_id=payment_id)

    def _service_error(
        self, response: httpx2.Response, body: Any, log_event: str, *, payment_id: str | None
    ) -> ServiceError:
        """Map one refusal from Flutterwave to the service's error tree, and log it once.
        Flutterwave's message is logged (shortened), never shown to a client."""
        status = response.status_code
        message = body.get("message") if isinstance(body, dict) else None
        message = str(message)[:300] if message else None
        fields = {
            "provider": self.name,
            "payment_id": payment_id,
            "http_status": status,
            "flutterwave_message": message,
        }
        failed = f"{log_event}_failed"
        if status in (401, 403):
            return self._errors.credentials_refused(
                log_event, fields, action="check FLUTTERWAVE_SECRET_KEY"
            )
        if status == 429:
            return self._errors.rate_limited(
                log_event, fields, retry_after_seconds(response.headers)
            )
        if status >= 500:
            return self._errors.unavailable(log_event, fields)
        words = (message or "").lower()
        if status == 404 or "not found" in words or "no transaction" in words:
            log.info(failed, extra=fields)
            return NotFound("Flutterwave does not know this object")
        if "exceed" in words or "greater than" in words:
            log.info(failed, extra=fields)
            return RefundExceedsBalance("The refund is larger than what is left to refund")
        if "currency" in words:
            log.warning(failed, extra=fields)
            return OperationNotSupported("Flutterwave does not take payments in this currency")
        return self._errors.refused(log_event, fields)

    # -- what we asked for -----------------------------------------------------------------

    async def _expected(self, tx_ref: str) -> tuple[int, str] | None:
        """The amount and currency the payment link for ``tx_ref`` was made for."""
        amount, currency = await self._kv.read_hash_fields(
            self._kv.key(tx_ref), ["amount", "currency"]
        )
        if amount is None or currency is None or not amount.isdigit():
            return None
        return int(amount), currency

    # -- create and verify -----------------------------------------------------------------

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        self._require_configured()
        currency = request.plan.currency.upper()
        if currency not in tx.CURRENCIES:
            raise OperationNotSupported(f"Flutterwave does not take payments in {currency}")
        if not request.customer_email:
            raise CustomerEmailRequired(
                "Flutterwave needs the customer's email: send customer_email, or sign in with "
                "a token that carries an email claim"
            )
        if not tx.TX_REF.fullmatch(request.reference):
            raise ProviderUpstreamError(
                "Our order reference cannot be a Flutterwave tx_ref", provider=self.name
            )
        payment_id = tx.payment_id_of(request.reference)
        # Kept before Flutterwave is asked, so that even a link whose answer is lost is
        # verified against our price.
        await self._remember(
            keys=[self._kv.key(request.reference)],
            args=[request.plan.amount, currency, EXPECTED_TTL_S],
        )
        data = await self._call(
            "POST",
            "/v3/payments",
            log_event="flutterwave.payment.create",
            payment_id=payment_id,
            content=tx.payment_request(request, payment_id),
        )
        link = data.get("link") if isinstance(data, dict) else None
        if not isinstance(link, str) or not link.startswith(("https://", "http://")):
            log.error("flutterwave.payment.no_link", extra={"payment_id": payment_id})
            raise ProviderUpstreamError(
                "Flutterwave gave no page for the customer to pay on", provider=self.name
            )
        log.info(
            "flutterwave.payment.created",
            extra={"payment_id": payment_id, "reference": request.reference},
        )
        return IntentResult(payment_id=payment_id, status=PaymentStatus.PENDING, redirect_url=link)

    async def _transaction(self, tx_ref: str, payment_id: str) -> dict[str, Any] | None:
        """The transaction for ``tx_ref`` as Flutterwave verifies it; None while there is none
        (the customer has not paid yet)."""
        try:
            data = await self._call(
                "GET",
                "/v3/transactions/verify_by_reference",
                log_event="flutterwave.transaction.verify",
                payment_id=payment_id,
                params={"tx_ref": tx_ref},
            )
        except NotFound:
            return None
        if not isinstance(data, dict) or data.get("tx_ref") != tx_ref:
            log.error("flutterwave.transaction.unreadable", extra={"payment_id": payment_id})
            raise ProviderUpstreamError(
                "Flutterwave answered with another transaction", provider=self.name
            )
        return data

    async def verify_payment(self, payment_id: str) -> PaymentState:
        tx_ref = self._tx_ref(payment_id)
        data = await self._transaction(tx_ref, payment_id)
        if data is None:
            return PaymentState(
                payment_id=payment_id, status=PaymentStatus.PENDING, vendor_status="no transaction"
            )
        expected = await self._expected(tx_ref)
        state, mismatch = tx.state_from_transaction(data, payment_id, expected=expected)
        if mismatch:
            assert expected is not None
            log.error(
                "flutterwave.transaction.amount_mismatch",
                extra={
                    "payment_id": payment_id,
                    "expected": f"{expected[0]} {expected[1]}",
                    "flutterwave_said": f"{state.amount} {state.currency}",
                },
            )
        elif expected is None and state.status.is_paid:
            # The service still compares it with the payment's own amount before calling it
            # paid; this says only that our own note of the price is gone.
            log.warning(
                "flutterwave.transaction.expected_unknown", extra={"payment_id": payment_id}
            )
        return state

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
        self._tx_ref(payment_id)
        transaction_id = tx.numeric_id(capture_id) if capture_id else None
        if transaction_id is None:
            state = await self.verify_payment(payment_id)
            if state.capture_id is None or not state.status.is_paid:
                raise InvalidStateTransition(
                    "Nothing to refund: Flutterwave has no successful transaction for it"
                )
            transaction_id = state.capture_id
        try:
            made = await self._find_refund(transaction_id, refund_id, currency, payment_id)
        except ProviderUnavailable as error:
            # We cannot tell whether an earlier attempt made it: never a second one blind.
            error.outcome_unknown = True
            raise
        if made is not None:
            log.info(
                "flutterwave.refund.found",
                extra={"payment_id": payment_id, "refund_id": refund_id},
            )
            return made
        data = await self._call(
            "POST",
            f"/v3/transactions/{transaction_id}/refund",
            log_event="flutterwave.refund.create",
            payment_id=payment_id,
            content=tx.refund_request(amount, currency, refund_id=refund_id),
            policy=NO_RETRY,  # moves money, with no idempotency key at Flutterwave
        )
        result = self._refund_result(data, currency, refund_id=refund_id)
        log.info(
            "flutterwave.refund.created",
            extra={
                "payment_id": payment_id,
                "refund_id": refund_id,
                "flutterwave_refund_id": result.provider_refund_id,
                "amount": amount,
                "currency": currency,
                "refund_status": str(result.status),
            },
        )
        return result

    async def _find_refund(
        self, transaction_id: str, refund_id: str, currency: str, payment_id: str
    ) -> RefundResult | None:
        """A refund of the transaction that carries our ``refund_id``, if one was made."""
        for page in range(1, MAX_REFUND_PAGES + 1):
            data = await self._call(
                "GET",
                "/v3/refunds",
                log_event="flutterwave.refund.list",
                payment_id=payment_id,
                params={"id": transaction_id, "page": str(page)},
            )
            refunds = data if isinstance(data, list) else []
            for item in refunds:
                if isinstance(item, dict) and tx.refund_comment(item) == refund_id:
                    return self._refund_result(item, currency, refund_id=refund_id)
            if len(refunds) == 0:
                return None
        return None

    async def get_refund(self, payment_id: str, provider_refund_id: str) -> RefundResult:
        tx_ref = self._tx_ref(payment_id)
        if tx.numeric_id(provider_refund_id) is None:
            raise NotFound(f"No refund {provider_refund_id!r}")
        data = await self._call(
            "GET",
            f"/v3/refunds/{provider_refund_id}",
            log_event="flutterwave.refund.get",
            payment_id=payment_id,
        )
        if not isinstance(data, dict):
            raise ProviderUpstreamError(
                "Flutterwave answered a refund we cannot read", provider=self.name
            )
        expected = await self._expected(tx_ref)
        if expected is not None:
            currency = expected[1]
        else:
            state = await self.verify_payment(payment_id)
            if state.currency is None:
                raise ProviderUpstreamError(
                    "Flutterwave's transaction has no currency", provider=self.name
                )
            currency = state.currency
        return self._refund_result(data, currency)

    def _refund_result(
        self, data: Any, currency: str, *, refund_id: str | None = None
    ) -> RefundResult:
        try:
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return tx.refund_result(data, currency, refund_id=refund_id)
        except ValueError as error:
            log.error("flutterwave.refund.unreadable", extra={"refund_id": refund_id})
            raise ProviderUpstreamError(
                "Flutterwave answered a refund we cannot read", provider=self.name
            ) from error

    # -- webhooks and health ---------------------------------------------------------------

    async def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        self._require_configured()
        assert self._secret_hash is not None
        given = header(headers, tx.HEADER_VERIF_HASH)
        expected = self._secret_hash.get_secret_value()
        if given is None or not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected.encode()
        ):
            log.warning("flutterwave.webhook.hash_invalid", extra={"present": given is not None})
            raise InvalidWebhookSignature("The verif-hash header is missing or wrong")
        payload = load_json(body)
        if not tx.is_event(payload):
            raise InvalidWebhookPayload("The webhook body is not a Flutterwave event")
        event = tx.webhook_event(payload)
        log.info(
            "flutterwave.webhook.received",
            extra={
                "event_id": event.event_id,
                "event_type": event.event_type,
                "payment_id": event.payment_id,
                "claimed_status": event.status,
            },
        )
        return event

    async def health_check(self) -> HealthStatus:
        if not self.is_configured():
            return HealthStatus(
                healthy=False,
                message="not configured (FLUTTERWAVE_SECRET_KEY, FLUTTERWAVE_SECRET_HASH)",
            )
        started = time.perf_counter()
        try:
            # One authenticated read: proves Flutterwave answers and takes our key.
            await self._call("GET", "/v3/balances", log_event="flutterwave.health", policy=NO_RETRY)
        except ServiceError as error:
            latency = (time.perf_counter() - started) * 1000
            return HealthStatus(healthy=False, message=error.title, latency_ms=round(latency, 1))
        latency = (time.perf_counter() - started) * 1000
        return HealthStatus(healthy=True, message="ok", latency_ms=round(latency, 1))
