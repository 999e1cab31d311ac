"""Paystack, through its REST API (Transactions, Refunds, Balance) on the shared
``httpx2.AsyncClient``, authenticated with the secret key as a Bearer token.

Paystack takes no idempotency key on any call, so what may be repeated is decided here:
reads are retried while Paystack is unavailable; writes (initialize, refund) only when the
request surely never reached it (a refused connection, a 429). A write whose answer was lost
is ``ProviderUnavailable`` with ``outcome_unknown``, never repeated blindly: an initialize is
harmless to leave behind (nobody has its checkout link), and a refund is asked for again only
after the refunds Paystack lists for the transaction show that ours is not among them (our
refund id travels in its ``merchant_note``).

Paystack's errors become the service's errors at this edge; its messages are logged, never
shown to a client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import httpx2
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from models.payment import PaymentStatus
from services.errors import (
    CustomerEmailRequired,
    InvalidStateTransition,
    InvalidWebhookPayload,
    InvalidWebhookSignature,
    NotFound,
    OperationNotSupported,
    PaymentDeclined,
    PaymentNotFound,
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
    ProviderKeyValue,
    RefundResult,
    WebhookEvent,
)
from ..payloads import load_json
from ..resilience import NO_RETRY, RetryPolicy
from ..vendor_http import (
    VendorErrors,
    header,
    json_object,
    retry_after_seconds,
    with_retries_keeping_outcome,
)
from . import transformers as tx

log = logging.getLogger("payments.providers.paystack")

API_BASE = "https://api.paystack.co"
SIGNATURE_HEADER = "x-paystack-signature"
_SIGNATURE = re.compile(r"^[0-9a-fA-F]{128}$")
# How long we remember what a payment was to cost (for the checks on what Paystack charged).
EXPECTATION_TTL_S = 400 * 24 * 3600
# Refunds of one transaction read per page, and at most this many pages.
REFUNDS_PER_PAGE = 100
REFUND_PAGES_MAX = 5

# Stores what a payment is to cost. KEYS: the payment's key. ARGV: amount, currency, ttl.
_REMEMBER_LUA = """
redis.call('HSET', KEYS[1], 'amount', ARGV[1], 'currency', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class PaystackConfig(BaseModel):
    """Paystack's configuration besides secrets (settings ``PAYSTACK_*``). The API base
    address is set only in the environment (``PAYSTACK_API_BASE``), never stored: whoever
    could change it could send our secret key to another host."""

    model_config = ConfigDict(extra="forbid")

    public_key: str | None = Field(
        default=None,
        pattern=r"^pk_(test|live)_[A-Za-z0-9]{8,120}$",
        description="Public key (pk_test_... or pk_live_...), handed to clients using "
        "Paystack's Popup with the transaction's access code",
    )
    api_base: Annotated[str, EnvironmentOnly()] = Field(
        default=API_BASE, description="Where Paystack's API is (environment only)"
    )


class PaystackSecrets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secret_key: SecretStr = Field(
        description="Secret key (sk_test_... or sk_live_...): authenticates our calls and "
        "signs Paystack's webhooks"
    )

    @field_validator("secret_key")
    @classmethod
    def _secret_key_shape(cls, value: SecretStr) -> SecretStr:
        if not re.fullmatch(r"sk_(test|live)_[A-Za-z0-9]{8,120}", value.get_secret_value()):
            raise ValueError("must be a Paystack secret key (sk_test_... or sk_live_...)")
        return value


@dataclass(frozen=True, slots=True)
class _Failure:
    """What Paystack said when it refused a call: ``{"status": false, "message": ...}``,
    with ``code`` and ``type`` on some errors."""

    status: int
    message: str | None
    code: str | None
    kind: str | None
    retry_after: float | None

    @classmethod
    def of(cls, response: httpx2.Response) -> _Failure:
        body = json_object(response)
        message, code, kind = body.get("message"), body.get("code"), body.get("type")
        return cls(
            status=response.status_code,
            message=str(message)[:300] if message else None,
            code=str(code)[:100] if code else None,
            kind=str(kind)[:100] if kind else None,
            retry_after=retry_after_seconds(response.headers),
        )

    def says(self, *words: str) -> bool:
        text = (self.message or "").lower()
        return all(word in text for word in words)


class PaystackProvider(BasePaymentProvider):
    name = "paystack"
    display_name = "Paystack"
    id_prefixes = (tx.PREFIX,)
    settings_prefix = "paystack_"
    config_model = PaystackConfig
    secrets_model = PaystackSecrets
    currencies = tx.CURRENCIES
    # Paystack charges at once (no separate capture) and cannot void a transaction.
    capabilities = frozenset(
        {
            Capability.CARD,
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
        public_key: str | None = None,
        api_base: str = API_BASE,
        timeout_seconds: float = 10.0,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self._http = http
        self._key_value = key_value
        self._remember_script = key_value.script(_REMEMBER_LUA)
        self._secret_key = secret_key  # read only to be sent, or to check a signature
        self._public_key = public_key
        self._api_base = api_base.rstrip("/")
        self._timeout = httpx2.Timeout(timeout_seconds)
        self._errors = VendorErrors(self.name, self.display_name, log)
        self._retry_policy = retry_policy or RetryPolicy()

    @classmethod
    def from_config(
        cls,
        config: PaystackConfig | None,
        secrets: PaystackSecrets | None,
        deps: ProviderDeps,
        *,
        retry_policy: RetryPolicy | None = None,
    ) -> PaystackProvider:
        return cls(
            http=deps.http,
            key_value=deps.key_value(cls.name),
            secret_key=secrets.secret_key if secrets else None,
            public_key=config.public_key if config else None,
            api_base=config.api_base if config else API_BASE,
            timeout_seconds=deps.timeout_s,
            retry_policy=retry_policy,
        )

    @property
    def api_base(self) -> str:
        return self._api_base

    def is_configured(self) -> bool:
        return self._secret_key is not None

    def _require_configured(self) -> SecretStr:
        if self._secret_key is None:
            raise ProviderNotConfigured(
                "Paystack is not configured on this service (PAYSTACK_SECRET_KEY)",
                provider=self.name,
            )
        return self._secret_key

    def _reference(self, payment_id: str) -> str:
        self._require_configured()
        reference = tx.reference_of(payment_id)
        if reference is None:
            raise PaymentNotFound(f"No payment {payment_id!r}")
        return reference

    # -- what a payment is to cost ---------------------------------------------------------

    async def _remember(self, payment_id: str, expected: tx.Expected) -> None:
        await self._remember_script(
            keys=[self._key_value.key(payment_id)],
            args=[expected.amount, expected.currency, EXPECTATION_TTL_S],
        )

    async def _expected(self, payment_id: str) -> tx.Expected | None:
        amount, currency = await self._key_value.read_hash_fields(
            self._key_value.key(payment_id), ["amount", "currency"]
        )
        if amount is None or currency is None or not amount.isdigit():
            return None
        return tx.Expected(amount=int(amount), currency=currency)

    # -- calls -----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        log_event: str,
        payment_id: str | None = None,
        body: dict[str, Any] | None = None,
        params: dict[str, str | int] | None = None,
        policy: RetryPolicy | None = None,
    ) -> dict[str, Any]:
        """One API call; returns Paystack's envelope (``status``, ``message``, ``data``).
        Reads are retried while Paystack is unavailable, writes only while it surely never
        got them. ``log_event`` names the call in logs: ``paystack.transaction.verify``."""
        secret_key = self._require_configured()

        async def attempt() -> dict[str, Any]:
            return await self._send(
                method,
                path,
                secret_key,
                body=body,
                params=params,
                log_event=log_event,
                payment_id=payment_id,
            )

        return await with_retries_keeping_outcome(
            attempt,
            policy=policy or self._retry_policy,
            event=log_event,
            retry_unknown_outcome=method == "GET",
        )

    async def _send(
        self,
        method: str,
        path: str,
        secret_key: SecretStr,
        *,
        body: dict[str, Any] | None,
        params: dict[str, str | int] | None,
        log_event: str,
        payment_id: str | None,
    ) -> dict[str, Any]:
        headers = {
            "Authorization": f"Bearer {secret_key.get_secret_value()}",
            "Accept": "application/json",
        }
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = json.dumps(body, separators=(",", ":")).encode()
        try:
            response = await self._http.request(
                method,
                f"{self._api_base}{path}",
                params=params,
                headers=headers,
                content=content,
                timeout=self._timeout,
            )
        except httpx2.HTTPError as error:
            raise self._errors.transport_error(
                error, log_event, {"payment_id": payment_id}
            ) from error
        if 200 <= response.status_code < 300:
            try:
                envelope = response.json()
            except ValueError:
                envelope = None
            if isinstance(envelope, dict) and envelope.get("status") is True:
                return envelope
            log.error(
                f"{log_event}_unreadable",
                extra={
                    "provider": self.name,
                    "payment_id": payment_id,
                    "http_status": response.status_code,
                },
            )
            raise ProviderUpstreamError(
                "Paystack answered with something unreadable", provider=self.name
            )
        raise self._service_error(_Failure.of(response), log_event, payment_id=payment_id)

    def _service_error(
        self, failure: _Failure, log_event: str, *, payment_id: str | None
    ) -> ServiceError:
        """Map one refusal from Paystack to the service's error tree, and log it once."""
        fields = {
            "provider": self.name,
            "payment_id": payment_id,
            "http_status": failure.status,
            "paystack_message": failure.message,
            "paystack_code": failure.code,
            "paystack_type": failure.kind,
        }
        failed = f"{log_event}_failed"
        status = failure.status
        if status == 429:
            return self._errors.rate_limited(log_event, fields, failure.retry_after)
        if status >= 500:
            return self._errors.unavailable(log_event, fields)
        if status in (401, 403):
            # "Invalid key": our secret key is wrong, or of another integration. Never log it.
            return self._errors.credentials_refused(
                log_event, fields, action="check PAYSTACK_SECRET_KEY"
            )
        if status == 404 or failure.says("not found"):
            log.info(failed, extra=fields)
            if payment_id is not None:
                return PaymentNotFound(f"No payment {payment_id!r}")
            return NotFound("Paystack does not know this object")
        if failure.says("currency") and failure.says("not supported"):
            log.warning(failed, extra={**fields, "action": "enable the currency at Paystack"})
            return OperationNotSupported(
                "Paystack does not take payments in this currency for this account"
            )
        about_refunds = failure.says("refund") or failure.says("reversed")
        if about_refunds and any(failure.says(w) for w in ("fully", "greater", "more than")):
            log.info(failed, extra=fields)
            return RefundExceedsBalance("The refund is larger than what is left to refund")
        if failure.kind == "processor_error":
            log.info(f"{log_event}_declined", extra=fields)
            code = (failure.code or "processor_error").lower()
            return PaymentDeclined(
                "Paystack declined the payment", provider=self.name, decline_code=code
            )
        return self._errors.refused(log_event, fields)

    def _data(self, envelope: Mapping[str, Any], log_event: str) -> Mapping[str, Any]:
        data = envelope.get("data")
        if not isinstance(data, Mapping):
            log.error(f"{log_event}_unreadable", extra={"provider": self.name})
            raise ProviderUpstreamError(
                "Paystack answered without the object asked for", provider=self.name
            )
        return data

    # -- create and verify -----------------------------------------------------------------

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        self._require_configured()
        if not request.customer_email:
            raise CustomerEmailRequired(
                "Paystack needs the customer's email address: send customer_email, or sign in "
                "with a token that carries an email claim"
            )
        try:
            body = tx.initialize_request(request, request.customer_email)
        except tx.AmountNotRepresentable as error:
            raise OperationNotSupported(
                f"Paystack does not take payments in {request.plan.currency.upper()}"
            ) from error
        payment_id = tx.payment_id_of(body["reference"])
        # Before Paystack is asked: whatever happens to its answer, verify can check the sum.
        await self._remember(
            payment_id, tx.Expected(amount=request.plan.amount, currency=body["currency"])
        )
        envelope = await self._call(
            "POST",
            "/transaction/initialize",
            log_event="paystack.transaction.initialize",
            payment_id=payment_id,
            body=body,
        )
        data = self._data(envelope, "paystack.transaction.initialize")
        url, access_code = data.get("authorization_url"), data.get("access_code")
        if (
            data.get("reference") != body["reference"]
            or not isinstance(url, str)
            or not url.startswith(("https://", "http://"))
        ):
            log.error(
                "paystack.transaction.initialize_unreadable",
                extra={"payment_id": payment_id, "reference": request.reference},
            )
            raise ProviderUpstreamError(
                "Paystack gave no checkout page for the payment", provider=self.name
            )
        log.info(
            "paystack.transaction.initialized",
            extra={"payment_id": payment_id, "reference": request.reference},
        )
        return IntentResult(
            payment_id=payment_id,
            status=PaymentStatus.PENDING,
            redirect_url=url,
            # With the public key, Paystack's Popup resumes this transaction in the page.
            client_secret=access_code if isinstance(access_code, str) else None,
            publishable_key=self._public_key,
        )

    async def _transaction(self, reference: str, payment_id: str) -> Mapping[str, Any]:
        envelope = await self._call(
            "GET",
            f"/transaction/verify/{reference}",
            log_event="paystack.transaction.verify",
            payment_id=payment_id,
        )
        transaction = self._data(envelope, "paystack.transaction.verify")
        if transaction.get("reference") != reference or not tx.is_paystack_id(
            transaction.get("id")
        ):
            log.error("paystack.transaction.verify_unreadable", extra={"payment_id": payment_id})
            raise ProviderUpstreamError(
                "Paystack answered about another transaction", provider=self.name
            )
        return transaction

    async def _refunds_of(
        self, transaction_id: int | str, payment_id: str
    ) -> tuple[RefundResult, ...]:
        """Every refund Paystack lists for one transaction."""
        found: list[RefundResult] = []
        for page in range(1, REFUND_PAGES_MAX + 1):
            envelope = await self._call(
                "GET",
                "/refund",
                log_event="paystack.refund.list",
                params={
                    "transaction": str(transaction_id),
                    "perPage": REFUNDS_PER_PAGE,
                    "page": page,
                },
            )
            listed = envelope.get("data")
            if not isinstance(listed, list):
                raise ProviderUpstreamError(
                    "Paystack answered a refund list we cannot read", provider=self.name
                )
            found.extend(tx.refunds_of(listed, transaction_id))
            meta = envelope.get("meta")
            page_count = meta.get("pageCount") if isinstance(meta, Mapping) else None
            if not isinstance(page_count, int) or page >= page_count:
                break
        else:
            log.warning(
                "paystack.refund.list_truncated",
                extra={"payment_id": payment_id, "pages": REFUND_PAGES_MAX},
            )
        return tuple(found)

    async def verify_payment(self, payment_id: str) -> PaymentState:
        reference = self._reference(payment_id)
        transaction = await self._transaction(reference, payment_id)
        expected = await self._expected(payment_id)
        refunds = None
        if transaction.get("status") in (
            tx.TransactionStatus.SUCCESS,
            tx.TransactionStatus.REVERSED,
        ):
            refunds = await self._refunds_of(transaction["id"], payment_id)
        state, refused = tx.state_from_transaction(transaction, expected=expected, refunds=refunds)
        if refused is not None:
            assert expected is not None
            log.error(
                "paystack.transaction.amount_mismatch",
                extra={
                    "payment_id": payment_id,
                    "expected": f"{expected.amount} {expected.currency}",
                    "paystack_said": refused,
                    "paystack_status": transaction.get("status"),
                },
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
        reference = self._reference(payment_id)
        transaction = await self._transaction(reference, payment_id)
        if transaction.get("status") not in (
            tx.TransactionStatus.SUCCESS,
            tx.TransactionStatus.REVERSED,
        ):
            raise InvalidStateTransition(
                "Nothing to refund: the Paystack payment has not succeeded"
            )
        charged = tx.amount_of(transaction)
        if charged is None or charged[1] != currency.upper():
            log.error(
                "paystack.refund.currency_mismatch",
                extra={"payment_id": payment_id, "expected": currency},
            )
            raise ProviderUpstreamError(
                "Paystack holds this payment in another currency", provider=self.name
            )
        # Paystack takes no idempotency key: a refund asked for before (whose answer was
        # lost) is found by our refund id, never made twice.
        for existing in await self._refunds_of(transaction["id"], payment_id):
            if existing.refund_id == refund_id:
                log.info(
                    "paystack.refund.found",
                    extra={"payment_id": payment_id, "refund_id": refund_id},
                )
                return existing
        try:
            body = tx.refund_request(
                reference, amount, currency, refund_id=refund_id, reason=reason
            )
        except tx.AmountNotRepresentable as error:
            raise OperationNotSupported(f"Paystack cannot refund in {currency.upper()}") from error
        envelope = await self._call(
            "POST", "/refund", log_event="paystack.refund.create", payment_id=payment_id, body=body
        )
        try:
            result = tx.refund_result(self._data(envelope, "paystack.refund.create"))
        except ValueError as error:
            raise ProviderUpstreamError(
                "Paystack answered a refund we cannot read", provider=self.name
            ) from error
        log.info(
            "paystack.refund.created",
            extra={
                "payment_id": payment_id,
                "refund_id": refund_id,
                "paystack_refund_id": result.provider_refund_id,
                "amount": amount,
                "currency": currency,
                "refund_status": str(result.status),
            },
        )
        return result if result.refund_id else _with_refund_id(result, refund_id)

    async def get_refund(self, payment_id: str, provider_refund_id: str) -> RefundResult:
        self._reference(payment_id)
        if not tx.is_paystack_id(provider_refund_id):
            raise NotFound(f"No refund {provider_refund_id!r}")
        envelope = await self._call(
            "GET", f"/refund/{provider_refund_id}", log_event="paystack.refund.get"
        )
        try:
            return tx.refund_result(self._data(envelope, "paystack.refund.get"))
        except ValueError as error:
            raise ProviderUpstreamError(
                "Paystack answered a refund we cannot read", provider=self.name
            ) from error

    # -- webhooks and health ---------------------------------------------------------------

    def _check_signature(self, body: bytes, headers: Mapping[str, str]) -> None:
        secret_key = self._require_configured()
        signature = header(headers, SIGNATURE_HEADER)
        if signature is None or not _SIGNATURE.fullmatch(signature):
            log.warning(
                "paystack.webhook.signature_missing", extra={"present": signature is not None}
            )
            raise InvalidWebhookSignature("The x-paystack-signature header is missing or malformed")
        computed = hmac.new(
            secret_key.get_secret_value().encode(), body, hashlib.sha512
        ).hexdigest()
        if not hmac.compare_digest(computed, signature.lower()):
            log.warning("paystack.webhook.signature_invalid")
            raise InvalidWebhookSignature("The webhook signature does not match")

    async def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        # The signature first, on the raw bytes: nothing in an unsigned body is read.
        self._check_signature(body, headers)
        try:
            payload = load_json(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidWebhookPayload("The webhook body is not JSON") from error
        if not tx.is_event(payload):
            raise InvalidWebhookPayload("The webhook body is not a Paystack event")
        name = payload["event"]
        if name == tx.Event.CHARGE_SUCCESS:
            event = await self._charge_event(payload, body)
        elif name in tx.REFUND_EVENTS:
            event = await self._refund_event(payload, body)
        else:
            event = tx.ignored_event(payload, body)
        log.info(
            "paystack.webhook.received",
            extra={
                "event_id": event.event_id,
                "event_type": event.event_type,
                "verified": event.verified,
                "payment_id": event.payment_id,
                "status": event.status,
            },
        )
        return event

    async def _charge_event(self, payload: Mapping[str, Any], body: bytes) -> WebhookEvent:
        reference = tx.event_reference(payload)
        expected = await self._expected(tx.payment_id_of(reference)) if reference else None
        event = tx.charge_event(payload, body, expected=expected)
        if not event.verified:
            # Signed, but not for the sum we asked: the service reads the transaction itself.
            log.warning(
                "paystack.webhook.charge_unconfirmed",
                extra={"event_id": event.event_id, "payment_id": event.payment_id},
            )
        return event

    async def _refund_event(self, payload: Mapping[str, Any], body: bytes) -> WebhookEvent:
        """A refund event names its transaction by reference and rarely its refund by ID,
        and carries no time: the refund is read from Paystack's list for the transaction,
        and what Paystack says now is what is applied (a late ``refund.pending`` after
        ``refund.processed`` applies processed again, which changes nothing)."""
        reference = tx.event_reference(payload)
        identity = tx.event_identity(payload, body)
        if reference is None:
            return tx.ignored_event(payload, body)
        payment_id = tx.payment_id_of(reference)
        try:
            transaction = await self._transaction(reference, payment_id)
        except NotFound:
            return tx.ignored_event(payload, body)  # not a transaction of this account
        # Paystack unavailable: the delivery fails (503) and Paystack sends it again later.
        listed = await self._refunds_of(transaction["id"], payment_id)
        refund = tx.matching_refund(payload, listed)
        if refund is None:
            log.warning(
                "paystack.webhook.refund_not_listed",
                extra={"event_id": identity, "payment_id": payment_id},
            )
            return tx.ignored_event(payload, body)
        return WebhookEvent(
            event_id=identity,
            event_type=str(payload["event"]),
            verified=True,
            payment_id=payment_id,
            refund=refund,
            reference=tx.our_reference(reference),
        )

    async def health_check(self) -> HealthStatus:
        if not self.is_configured():
            return HealthStatus(healthy=False, message="not configured (PAYSTACK_SECRET_KEY)")
        started = time.perf_counter()
        try:
            # The balance: cheap, and only answered for a valid secret key (one attempt: a
            # health check reports, it does not insist).
            await self._call("GET", "/balance", log_event="paystack.balance.get", policy=NO_RETRY)
        except ServiceError as error:
            latency = (time.perf_counter() - started) * 1000
            return HealthStatus(healthy=False, message=error.title, latency_ms=round(latency, 1))
        latency = (time.perf_counter() - started) * 1000
        return HealthStatus(healthy=True, message="ok", latency_ms=round(latency, 1))


def _with_refund_id(result: RefundResult, refund_id: str) -> RefundResult:
    return RefundResult(
        provider_refund_id=result.provider_refund_id,
        amount=result.amount,
        status=result.status,
        currency=result.currency,
        refund_id=refund_id,
        failure_code=result.failure_code,
    )
