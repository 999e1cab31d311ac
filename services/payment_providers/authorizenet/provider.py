"""Authorize.Net, through its JSON API (Accept Hosted for the card form, createTransaction for
capture, void and refund, the Transaction Reporting calls to read transactions, Webhooks) on
the shared ``httpx2.AsyncClient``.

Accept Hosted gives a token, not a URL: the buyer's browser must POST the token to
Authorize.Net's form. The token stays on the server, in this provider's Redis namespace
beside what we asked for; our own page (``routers/authorizenet.py``) posts it. The
transaction the buyer makes there carries our payment id as its invoice number; it reaches us
by webhook, or verify finds it in the transaction lists.

Authorize.Net has no idempotency keys. What keeps a repeated money-moving call from moving
money twice: a capture or a void of a transaction already captured or voided is refused by
Authorize.Net (reason 311, 310) and answered here by reading the transaction; a refund
carries an invoice number derived from our refund id, which is looked for among the unsettled
transactions before the refund is asked for, and Authorize.Net's duplicate window (8 hours,
the longest it allows) refuses a second refund with the same card, amount and invoice number.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import httpx2
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from models.payment import PaymentStatus, RefundStatus
from services.errors import (
    CaptureExceedsAmount,
    InvalidStateTransition,
    InvalidWebhookPayload,
    InvalidWebhookSignature,
    NotFound,
    OperationNotSupported,
    PaymentDeclined,
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
from ..vendor_http import VendorErrors, header, with_retries_keeping_outcome
from . import transformers as tx

log = logging.getLogger("payments.providers.authorizenet")

API_BASES = {
    "sandbox": "https://apitest.authorize.net/xml/v1/request.api",
    "production": "https://api.authorize.net/xml/v1/request.api",
}
HOSTED_FORMS = {
    "sandbox": "https://test.authorize.net/payment/payment",
    "production": "https://accept.authorize.net/payment/payment",
}
SIGNATURE_HEADER = "x-anet-signature"
_SIGNATURE = re.compile(r"^sha512=([0-9A-Fa-f]{128})$")
# An Accept Hosted token is good for 15 minutes; our page stops posting it a little earlier.
TOKEN_LIFETIME_S = 15 * 60 - 30
# A buyer whose card was declined may try another on the same form while it is open: a
# decline is final only once the form can no longer be used.
RETRY_WINDOW_S = 60 * 60
# With no transaction this long after the form was made, the buyer has gone.
ABANDONED_AFTER_S = 24 * 60 * 60
# What we keep per payment, in this provider's Redis namespace.
RECORD_TTL_S = 180 * 24 * 60 * 60
# Transaction Reporting pages: at most 1000 a page.
PAGE_LIMIT = 1000

_SAVE_LUA = """
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
_CREATE_LUA = """
redis.call('HSETNX', KEYS[1], 'created_at', ARGV[2])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class AuthorizeNetConfig(BaseModel):
    """Authorize.Net's configuration besides secrets (settings ``AUTHORIZENET_*``). The API
    and hosted-form addresses are set only in the environment, never stored: whoever could
    change them could send our transaction key, or our buyers, to another host."""

    model_config = ConfigDict(extra="forbid")

    api_login_id: str = Field(
        min_length=1, max_length=25, pattern=r"^[A-Za-z0-9]+$", description="API Login ID"
    )
    environment: Literal["sandbox", "production"] = Field(
        default="sandbox", description="sandbox (apitest.authorize.net) or production"
    )
    api_base: Annotated[str | None, EnvironmentOnly()] = Field(
        default=None, description="The JSON API endpoint, if not the environment's (tests)"
    )
    hosted_form_url: Annotated[str | None, EnvironmentOnly()] = Field(
        default=None, description="The Accept Hosted form, if not the environment's (tests)"
    )


class AuthorizeNetSecrets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transaction_key: SecretStr = Field(
        min_length=8, max_length=32, description="Transaction Key (API Credentials and Keys)"
    )
    # Without it no webhook could be believed: the provider is not configured without it.
    signature_key: SecretStr = Field(
        min_length=16, max_length=256, description="Signature Key, for webhook signatures"
    )


@dataclass(frozen=True, slots=True)
class HostedForm:
    """What our redirect page posts: the token, to Authorize.Net's form."""

    action_url: str
    token: str


class _AlreadyDone(InvalidStateTransition):
    """Reason 310/311: voided or captured already; answered by reading the transaction."""


class _Duplicate(ProviderUnavailable):
    """Reason 11: a request like this one was made within the duplicate window."""


class AuthorizeNetProvider(BasePaymentProvider):
    name = "authorizenet"
    display_name = "Authorize.Net"
    id_prefixes = (tx.PREFIX,)
    settings_prefix = "authorizenet_"
    config_model = AuthorizeNetConfig
    secrets_model = AuthorizeNetSecrets
    currencies = tx.CURRENCIES
    capabilities = frozenset(
        {
            Capability.CARD,
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
        key_value: ProviderKeyValue,
        api_login_id: str | None,
        transaction_key: SecretStr | None,
        signature_key: SecretStr | None,
        api_base: str,
        hosted_form_url: str,
        timeout_seconds: float = 10.0,
        retry_policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._kv = key_value
        self._login_id = api_login_id or None
        self._transaction_key = transaction_key or None
        self._signature_key = signature_key or None
        self._api_base = api_base
        self._hosted_form_url = hosted_form_url
        self._timeout = httpx2.Timeout(timeout_seconds)
        self._errors = VendorErrors(self.name, self.display_name, log)
        self._retry_policy = retry_policy or RetryPolicy()
        self._clock = clock
        self._save_script = key_value.script(_SAVE_LUA)
        self._create_script = key_value.script(_CREATE_LUA)

    @classmethod
    def from_config(
        cls,
        config: AuthorizeNetConfig | None,
        secrets: AuthorizeNetSecrets | None,
        deps: ProviderDeps,
        *,
        retry_policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> AuthorizeNetProvider:
        environment = config.environment if config else "sandbox"
        configured = config is not None and secrets is not None
        return cls(
            http=deps.http,
            key_value=deps.key_value(cls.name),
            api_login_id=config.api_login_id if configured and config else None,
            transaction_key=secrets.transaction_key if configured and secrets else None,
            signature_key=secrets.signature_key if configured and secrets else None,
            api_base=(config.api_base if config else None) or API_BASES[environment],
            hosted_form_url=(config.hosted_form_url if config else None)
            or HOSTED_FORMS[environment],
            timeout_seconds=deps.timeout_s,
            retry_policy=retry_policy,
            clock=clock,
        )

    @property
    def hosted_form_url(self) -> str:
        return self._hosted_form_url

    def is_configured(self) -> bool:
        return (
            self._login_id is not None
            and self._transaction_key is not None
            and self._signature_key is not None
        )

    def _require_configured(self) -> None:
        if not self.is_configured():
            raise ProviderNotConfigured(
                "Authorize.Net is not configured on this service (AUTHORIZENET_API_LOGIN_ID, "
                "AUTHORIZENET_TRANSACTION_KEY, AUTHORIZENET_SIGNATURE_KEY)",
                provider=self.name,
            )

    def _checked(self, payment_id: str) -> str:
        self._require_configured()
        if not tx.is_payment_id(payment_id):
            raise PaymentNotFound(f"No payment {payment_id!r}")
        return payment_id

    # -- what we keep per payment ----------------------------------------------------------

    async def _record(self, payment_id: str) -> dict[str, str]:
        record = await self._kv.read_hash(self._kv.key(payment_id))
        if not record:
            raise PaymentNotFound(f"No payment {payment_id!r}")
        return record

    async def _save(self, payment_id: str, **fields: str) -> None:
        args: list[str | int] = [RECORD_TTL_S]
        for name, value in fields.items():
            args += [name, value]
        await self._save_script(keys=[self._kv.key(payment_id)], args=args)

    # -- calls -----------------------------------------------------------------------------

    async def _call(
        self,
        request_name: str,
        body: Mapping[str, Any],
        *,
        log_event: str,
        payment_id: str | None = None,
        ref: str | None = None,
        policy: RetryPolicy | None = None,
    ) -> dict[str, Any]:
        """One API call (``request_name`` as the top-level element, merchantAuthentication
        and refId first, as the schema orders them), retried while Authorize.Net is
        unavailable; Authorize.Net's answer when its resultCode is Ok, or a transaction's
        answer (E00027) for the caller to read."""
        self._require_configured()
        assert self._login_id is not None and self._transaction_key is not None
        inner: dict[str, Any] = {
            "merchantAuthentication": {
                "name": self._login_id,
                "transactionKey": self._transaction_key.get_secret_value(),
            }
        }
        if ref is not None:
            inner["refId"] = tx.ref_id(ref)
        inner.update(body)
        content = json.dumps({request_name: inner}, separators=(",", ":")).encode()

        async def attempt() -> dict[str, Any]:
            return await self._send(content, log_event=log_event, payment_id=payment_id)

        return await with_retries_keeping_outcome(
            attempt, policy=policy or self._retry_policy, event=log_event
        )

    async def _send(
        self, content: bytes, *, log_event: str, payment_id: str | None
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"provider": self.name, "payment_id": payment_id}
        try:
            response = await self._http.post(
                self._api_base,
                content=content,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                timeout=self._timeout,
            )
        except httpx2.HTTPError as error:
            raise self._errors.transport_error(error, log_event, fields) from error
        fields["http_status"] = response.status_code
        if response.status_code == 429:
            # No Retry-After is read from Authorize.Net: the client is told the default wait.
            raise self._errors.rate_limited(log_event, fields, None)
        if response.status_code >= 500:
            raise self._errors.unavailable(log_event, fields)
        try:
            # Authorize.Net's JSON starts with a UTF-8 byte order mark.
            answer = json.loads(response.content.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            answer = None
        if response.status_code != 200 or not isinstance(answer, dict):
            log.error(f"{log_event}_unreadable", extra=fields)
            raise ProviderUpstreamError(
                "Authorize.Net answered with something unreadable", provider=self.name
            )
        result, codes = tx.result_codes(answer)
        fields["anet_codes"] = codes
        if result == "Ok":
            return answer
        if tx.CODE_TRANSACTION_FAILED in codes and "transactionResponse" in answer:
            return answer  # the transaction's own outcome says more
        if any(code in tx.MISCONFIGURED_CODES for code in codes):
            raise self._errors.credentials_refused(
                log_event,
                fields,
                action="check AUTHORIZENET_API_LOGIN_ID and AUTHORIZENET_TRANSACTION_KEY",
            )
        if tx.CODE_NOT_FOUND in codes:
            log.info(f"{log_event}_not_found", extra=fields)
            raise NotFound("Authorize.Net has no such record")
        if any(code in tx.RETRY_CODES for code in codes):
            log.warning(f"{log_event}_failed", extra=fields)
            raise ProviderUnavailable(
                "Authorize.Net could not process the request now", provider=self.name
            )
        log.error(f"{log_event}_failed", extra=fields)
        raise ProviderUpstreamError("Authorize.Net refused the request", provider=self.name)

    async def _transact(
        self,
        body: Mapping[str, Any],
        *,
        log_event: str,
        payment_id: str,
        ref: str,
        policy: RetryPolicy | None = None,
    ) -> tuple[tx.ResponseCode, str | None]:
        """A createTransactionRequest; (responseCode, transId) when approved or held, else the
        service's error for its reason."""
        answer = await self._call(
            "createTransactionRequest",
            body,
            log_event=log_event,
            payment_id=payment_id,
            ref=ref,
            policy=policy,
        )
        code, reasons, trans_id = tx.transaction_outcome(answer)
        fields = {"provider": self.name, "payment_id": payment_id, "anet_reasons": reasons}
        if code in (tx.ResponseCode.APPROVED, tx.ResponseCode.HELD_FOR_REVIEW):
            log.info(log_event, extra={**fields, "trans_id": trans_id, "response_code": code})
            return code, trans_id
        if code is tx.ResponseCode.DECLINED:
            log.info(f"{log_event}_declined", extra=fields)
            raise PaymentDeclined(
                "Authorize.Net declined the transaction",
                provider=self.name,
                decline_code="declined",
            )
        if tx.REASON_ALREADY_CAPTURED in reasons or tx.REASON_ALREADY_VOIDED in reasons:
            log.info(f"{log_event}_already_done", extra=fields)
            raise _AlreadyDone("Authorize.Net has done this already")
        if tx.REASON_DUPLICATE in reasons:
            log.warning(f"{log_event}_duplicate", extra=fields)
            raise _Duplicate(
                "Authorize.Net holds a matching request from moments ago; its outcome is being "
                "checked",
                provider=self.name,
                outcome_unknown=True,
            )
        if tx.REASON_NOT_FOUND in reasons:
            log.warning(f"{log_event}_failed", extra=fields)
            raise PaymentNotFound(f"Authorize.Net does not know payment {payment_id!r}")
        if tx.REASON_CREDIT_EXCEEDS in reasons:
            log.info(f"{log_event}_failed", extra=fields)
            raise RefundExceedsBalance("The refund is larger than what is left to refund")
        if tx.REASON_CAPTURE_EXCEEDS in reasons:
            log.info(f"{log_event}_failed", extra=fields)
            raise CaptureExceedsAmount("Authorize.Net can capture at most what was authorized")
        if tx.REASON_CANNOT_CREDIT in reasons:
            log.info(f"{log_event}_failed", extra=fields)
            raise InvalidStateTransition(
                "Authorize.Net does not allow a refund of this payment (too old, or not settled)"
            )
        log.error(f"{log_event}_failed", extra=fields)
        raise ProviderUpstreamError("Authorize.Net refused the transaction", provider=self.name)

    async def _details(self, trans_id: str, payment_id: str | None) -> tx.Details:
        answer = await self._call(
            "getTransactionDetailsRequest",
            {"transId": trans_id},
            log_event="authorizenet.transaction.get",
            payment_id=payment_id,
        )
        transaction = answer.get("transaction")
        if not isinstance(transaction, Mapping) or str(transaction.get("transId")) != trans_id:
            raise ProviderUpstreamError(
                "Authorize.Net answered a transaction we cannot read", provider=self.name
            )
        return tx.Details(transaction)

    async def _unsettled(self, log_event: str, payment_id: str) -> list[Mapping[str, Any]]:
        answer = await self._call(
            "getUnsettledTransactionListRequest",
            {
                "sorting": {"orderBy": "submitTimeUTC", "orderDescending": "true"},
                "paging": {"limit": str(PAGE_LIMIT), "offset": "1"},
            },
            log_event=log_event,
            payment_id=payment_id,
        )
        return _transactions(answer)

    async def _settled_since(self, since: datetime, payment_id: str) -> list[Mapping[str, Any]]:
        """The settled transactions of the batches settled since ``since`` (at most 31 days
        back, as getSettledBatchList allows; each batch's first page only)."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        since = max(since, now - timedelta(days=31))
        answer = await self._call(
            "getSettledBatchListRequest",
            {
                "includeStatistics": "false",
                "firstSettlementDate": since.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "lastSettlementDate": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            log_event="authorizenet.batches.list",
            payment_id=payment_id,
        )
        batches = answer.get("batchList")
        listed: list[Mapping[str, Any]] = []
        for batch in batches if isinstance(batches, list) else []:
            batch_id = batch.get("batchId") if isinstance(batch, Mapping) else None
            if not tx.is_trans_id(str(batch_id)):
                continue
            page = await self._call(
                "getTransactionListRequest",
                {
                    "batchId": str(batch_id),
                    "sorting": {"orderBy": "submitTimeUTC", "orderDescending": "true"},
                    "paging": {"limit": str(PAGE_LIMIT), "offset": "1"},
                },
                log_event="authorizenet.transactions.list",
                payment_id=payment_id,
            )
            listed += _transactions(page)
        return listed

    async def _find_trans_id(self, payment_id: str, record: Mapping[str, str]) -> str | None:
        """The payment's transaction: known (a webhook or an earlier look said), or searched
        for by invoice number among the unsettled transactions, then the batches settled
        since the form was made. Only a transaction that went somewhere is remembered: a
        declined one may still be followed by one that worked."""
        known = record.get("trans_id")
        if known and tx.is_trans_id(known):
            return known
        listed = await self._unsettled("authorizenet.unsettled.list", payment_id)
        found = tx.best_transaction(listed, payment_id)
        if found is None:
            created = _float(record.get("created_at"))
            since = datetime.fromtimestamp(created or self._clock(), UTC) - timedelta(days=1)
            found = tx.best_transaction(await self._settled_since(since, payment_id), payment_id)
        return found

    # -- create and verify -----------------------------------------------------------------

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        self._require_configured()
        if request.currency.upper() not in tx.CURRENCIES:
            raise OperationNotSupported(
                f"Authorize.Net does not take payments in {request.currency.upper()}"
            )
        payment_id = tx.payment_id_for(request.idempotency_key)
        manual = request.options.get("capture_method") == "manual"
        try:
            body = tx.hosted_page_request(request, payment_id, manual_capture=manual)
        except tx.AmountNotRepresentable as error:
            raise OperationNotSupported(str(error)) from error
        answer = await self._call(
            "getHostedPaymentPageRequest",
            body,
            log_event="authorizenet.hosted_page.create",
            payment_id=payment_id,
            ref=payment_id.replace("_", ""),
        )
        token = answer.get("token")
        if not isinstance(token, str) or not token or len(token) > 8192:
            log.error("authorizenet.hosted_page.no_token", extra={"payment_id": payment_id})
            raise ProviderUpstreamError("Authorize.Net gave no payment form", provider=self.name)
        now = self._clock()
        await self._create_script(
            keys=[self._kv.key(payment_id)],
            args=[
                RECORD_TTL_S,
                repr(now),
                "reference",
                request.reference,
                "amount",
                str(request.amount),
                "currency",
                request.currency.upper(),
                "capture_method",
                "manual" if manual else "automatic",
                "token",
                token,
                "token_issued_at",
                repr(now),
            ],
        )
        log.info(
            "authorizenet.hosted_page.created",
            extra={"payment_id": payment_id, "reference": request.reference, "manual": manual},
        )
        base = request.base_url.rstrip("/")
        return IntentResult(
            payment_id=payment_id,
            status=PaymentStatus.PENDING,
            redirect_url=f"{base}/api/v1/payment/authorizenet/{payment_id}/pay",
        )

    async def hosted_form(self, payment_id: str) -> HostedForm:
        """What our redirect page posts for ``payment_id``. Refuses a payment whose form has
        been used (a transaction is known) or whose token has lapsed."""
        record = await self._record(self._checked(payment_id))
        token = record.get("token")
        issued = _float(record.get("token_issued_at"))
        if record.get("trans_id") or record.get("canceled"):
            raise InvalidStateTransition("This payment has been paid or canceled already")
        if not token or issued is None or self._clock() - issued > TOKEN_LIFETIME_S:
            raise InvalidStateTransition(
                "This payment's Authorize.Net form has expired; create the payment again"
            )
        return HostedForm(action_url=self._hosted_form_url, token=token)

    async def verify_payment(self, payment_id: str) -> PaymentState:
        record = await self._record(self._checked(payment_id))
        trans_id = await self._find_trans_id(payment_id, record)
        if trans_id is None:
            created = _float(record.get("created_at")) or self._clock()
            abandoned = self._clock() - created > ABANDONED_AFTER_S
            if record.get("canceled"):
                status = PaymentStatus.CANCELED
            else:
                status = PaymentStatus.EXPIRED if abandoned else PaymentStatus.PENDING
            return PaymentState(
                payment_id=payment_id, status=status, vendor_status="no transaction yet"
            )
        details = await self._details(trans_id, payment_id)
        return await self._state(payment_id, details, record)

    async def _state(
        self, payment_id: str, details: tx.Details, record: Mapping[str, str]
    ) -> PaymentState:
        if details.invoice != payment_id:
            log.error(
                "authorizenet.transaction.invoice_mismatch",
                extra={"payment_id": payment_id, "trans_id": details.trans_id},
            )
            raise ProviderUpstreamError(
                "Authorize.Net's transaction belongs to another invoice", provider=self.name
            )
        currency = record.get("currency", "USD")
        status = tx.payment_status(details.status)
        if status is PaymentStatus.FAILED:
            issued = _float(record.get("token_issued_at")) or 0.0
            if self._clock() - issued <= RETRY_WINDOW_S:
                status = PaymentStatus.PENDING  # the buyer may try another card on the form
        elif status not in (PaymentStatus.PENDING,) and record.get("trans_id") != details.trans_id:
            await self._save(payment_id, trans_id=details.trans_id)
        refunds: tuple[RefundResult, ...] | None = None
        amount = details.amount("authAmount", currency)
        captured = details.amount_captured(currency)
        void_refund = record.get("void_refund_id")
        if status is PaymentStatus.CANCELED and void_refund:
            # We voided it in place of a refund: money was taken, and given back in full.
            status = PaymentStatus.SUCCEEDED
            given_back = int(record.get("void_refund_amount", "0"))
            refunds = (
                RefundResult(
                    provider_refund_id=tx.void_refund_id(details.trans_id),
                    amount=given_back,
                    status=RefundStatus.SUCCEEDED,
                    currency=currency,
                    refund_id=void_refund,
                ),
            )
            # All that was taken was given back: what a partial capture took, if it was less.
            if amount is not None and 0 < given_back < amount:
                captured = given_back
        return PaymentState(
            payment_id=payment_id,
            status=status,
            amount=amount,
            currency=currency,
            amount_captured=captured,
            capture_id=details.trans_id if status.is_paid else None,
            payment_method="card" if details.is_card else None,
            vendor_status=details.vendor_status,
            refunds=refunds,
        )

    async def _payment_transaction(
        self, payment_id: str
    ) -> tuple[dict[str, str], tx.Details | None]:
        record = await self._record(self._checked(payment_id))
        trans_id = await self._find_trans_id(payment_id, record)
        if trans_id is None:
            return record, None
        return record, await self._details(trans_id, payment_id)

    # -- capture, cancel, refund -----------------------------------------------------------

    async def capture(
        self, payment_id: str, *, idempotency_key: str, amount: int | None = None
    ) -> PaymentState:
        """All that was authorized, or ``amount`` of it (``priorAuthCaptureTransaction`` with
        an amount: a transaction is captured once, so the rest is released, and the answer's
        ``amount_captured`` says what was taken). Captured already: the transaction is read
        and its capture answered, unless ``amount`` is another than it took."""
        record, details = await self._payment_transaction(payment_id)
        if details is None:
            raise InvalidStateTransition("The buyer has not paid on Authorize.Net's form yet")
        state = await self._state(payment_id, details, record)
        if state.status.is_paid:
            return _as_captured(state, amount)  # captured before: the first result
        if state.status is not PaymentStatus.REQUIRES_CAPTURE:
            raise InvalidStateTransition(
                f"A {state.status} Authorize.Net payment cannot be captured"
            )
        currency = record.get("currency", "USD")
        authorized = details.amount("authAmount", currency)
        if amount is not None and amount <= 0:
            raise InvalidStateTransition("A capture must be of more than 0")
        if amount is not None and authorized is not None and amount > authorized:
            # Asked of Authorize.Net, it would refuse (reason 47): nothing is sent.
            raise CaptureExceedsAmount(
                f"At most {authorized} minor units can be captured",
                extra={"amount": authorized},
            )
        # Captured under an earlier request (reason 311, an answer lost): read what it did.
        with contextlib.suppress(_AlreadyDone):
            await self._transact(
                tx.prior_auth_capture_request(
                    details.trans_id,
                    tx.to_anet_amount(amount, currency) if amount is not None else None,
                ),
                log_event="authorizenet.capture",
                payment_id=payment_id,
                ref=idempotency_key,
            )
        after = await self._state(
            payment_id, await self._details(details.trans_id, payment_id), record
        )
        return _as_captured(after, amount) if after.status.is_paid else after

    async def cancel(self, payment_id: str, *, idempotency_key: str) -> PaymentState:
        record, details = await self._payment_transaction(payment_id)
        if details is None:
            # Nothing to void: the form is closed on our side (our page stops posting it).
            await self._save(payment_id, canceled="1")
            return PaymentState(
                payment_id=payment_id, status=PaymentStatus.CANCELED, vendor_status="no transaction"
            )
        state = await self._state(payment_id, details, record)
        if state.status is PaymentStatus.CANCELED:
            return state
        if state.status not in (PaymentStatus.REQUIRES_CAPTURE, PaymentStatus.PENDING):
            raise InvalidStateTransition(
                f"A {state.status} Authorize.Net payment cannot be canceled"
            )
        with contextlib.suppress(_AlreadyDone):
            await self._transact(
                tx.void_request(details.trans_id),
                log_event="authorizenet.void",
                payment_id=payment_id,
                ref=idempotency_key,
            )
        return await self._state(
            payment_id, await self._details(details.trans_id, payment_id), record
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
        record, details = await self._payment_transaction(payment_id)
        paid = details is not None and tx.payment_status(details.status).is_paid
        voided_for_refund = (
            details is not None
            and details.status is tx.TransactionStatus.VOIDED
            and bool(record.get("void_refund_id"))
        )
        if details is None or not (paid or voided_for_refund):
            raise InvalidStateTransition("Nothing to refund: the Authorize.Net payment is not paid")
        currency = currency.upper()
        if details.status is tx.TransactionStatus.VOIDED:
            # Voided for an earlier refund: the money is all back already.
            if record.get("void_refund_id") == refund_id:
                return _void_refund(details.trans_id, record, currency)
            raise RefundExceedsBalance("The payment has been refunded in full already")
        if details.captured_unsettled:
            return await self._refund_by_void(
                payment_id, record, details, refund_id, amount, currency
            )
        if not details.settled:
            raise InvalidStateTransition(
                f"Authorize.Net cannot refund a payment that is {details.vendor_status}"
            )
        invoice = tx.refund_invoice_for(refund_id)
        await self._save(payment_id, **{f"refund:{invoice}": refund_id})
        # Asked before (the answer was lost)? The refund carries our invoice number.
        earlier = tx.best_refund(
            await self._unsettled("authorizenet.refund.lookup", payment_id), invoice
        )
        if earlier is not None:
            found = await self._details(earlier, payment_id)
            log.info(
                "authorizenet.refund.found",
                extra={"payment_id": payment_id, "refund_id": refund_id},
            )
            return found.refund_result(currency, refund_id=refund_id)
        if details.card_last_four is None:
            raise OperationNotSupported("Authorize.Net can refund card payments only")
        _, refund_trans_id = await self._transact(
            tx.refund_request(
                details.trans_id,
                tx.to_anet_amount(amount, currency),
                details.card_last_four,
                invoice,
            ),
            log_event="authorizenet.refund",
            payment_id=payment_id,
            ref=refund_id,
            # Not repeated in place: a repeat is the duplicate window's to refuse, and the
            # lookup above finds the first on the service's next ask.
            policy=NO_RETRY,
        )
        if refund_trans_id is None:
            raise ProviderUnavailable(
                "Authorize.Net approved a refund without naming it", provider=self.name
            )
        log.info(
            "authorizenet.refund.created",
            extra={"payment_id": payment_id, "refund_id": refund_id, "trans_id": refund_trans_id},
        )
        return RefundResult(
            provider_refund_id=refund_trans_id,
            amount=amount,
            # Approved, paid out when the day's batch settles (refundPendingSettlement).
            status=RefundStatus.PENDING,
            currency=currency,
            refund_id=refund_id,
        )

    async def _refund_by_void(
        self,
        payment_id: str,
        record: Mapping[str, str],
        details: tx.Details,
        refund_id: str,
        amount: int,
        currency: str,
    ) -> RefundResult:
        """An unsettled payment cannot be refunded, only voided, and a void gives back all
        of it: a full refund becomes a void (its refund id says ``void-``), a partial one
        must wait for the settlement."""
        captured = details.amount("settleAmount", currency) or details.amount(
            "authAmount", currency
        )
        if amount != captured:
            raise InvalidStateTransition(
                "Authorize.Net has not settled this payment yet: until it does (once a day), "
                "only a refund of the whole amount is possible, by voiding the payment"
            )
        await self._save(payment_id, void_refund_id=refund_id, void_refund_amount=str(amount))
        with contextlib.suppress(_AlreadyDone):
            await self._transact(
                tx.void_request(details.trans_id),
                log_event="authorizenet.refund_void",
                payment_id=payment_id,
                ref=refund_id,
            )
        after = await self._details(details.trans_id, payment_id)
        if after.status is not tx.TransactionStatus.VOIDED:
            raise ProviderUpstreamError(
                "Authorize.Net did not void the payment", provider=self.name
            )
        return _void_refund(
            details.trans_id, {**record, "void_refund_amount": str(amount)}, currency, refund_id
        )

    async def get_refund(self, payment_id: str, provider_refund_id: str) -> RefundResult:
        record = await self._record(self._checked(payment_id))
        currency = record.get("currency", "USD")
        voided = tx.voided_trans_id(provider_refund_id)
        if voided is not None:
            details = await self._details(voided, payment_id)
            if details.status is tx.TransactionStatus.VOIDED:
                return _void_refund(voided, record, currency)
            status = RefundStatus.FAILED if details.settled else RefundStatus.PENDING
            return RefundResult(
                provider_refund_id=provider_refund_id,
                amount=int(record.get("void_refund_amount", "0")),
                status=status,
                currency=currency,
                refund_id=record.get("void_refund_id"),
            )
        if not tx.is_trans_id(provider_refund_id):
            raise NotFound(f"No refund {provider_refund_id!r}")
        try:
            details = await self._details(provider_refund_id, payment_id)
        except NotFound:
            raise NotFound(f"No refund {provider_refund_id!r}") from None
        return self._refund_of(details, record, currency)

    def _refund_of(
        self, details: tx.Details, record: Mapping[str, str], currency: str
    ) -> RefundResult:
        ours = record.get(f"refund:{details.invoice}") if details.invoice else None
        try:
            return details.refund_result(currency, refund_id=ours)
        except ValueError as error:
            raise ProviderUpstreamError(
                "Authorize.Net answered a refund we cannot read", provider=self.name
            ) from error

    # -- webhooks and health ---------------------------------------------------------------

    def _signature_valid(self, body: bytes, headers: Mapping[str, str]) -> bool:
        """``X-ANET-Signature: sha512=<HEX>``: the HMAC-SHA512 of the raw body keyed with the
        Signature Key *as text* (the merchant interface shows it as 128 hex characters, and
        Authorize.Net keys the HMAC with those characters, not the bytes they spell), in
        upper-case hex; compared whatever the case, in constant time."""
        assert self._signature_key is not None
        given = header(headers, SIGNATURE_HEADER)
        match = _SIGNATURE.fullmatch(given.strip()) if given else None
        if match is None:
            return False
        key = self._signature_key.get_secret_value().encode()
        expected = hmac.new(key, body, hashlib.sha512).hexdigest()
        return hmac.compare_digest(expected, match.group(1).lower())

    async def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        self._require_configured()
        if not self._signature_valid(body, headers):
            log.warning(
                "authorizenet.webhook.signature_invalid",
                extra={"present": header(headers, SIGNATURE_HEADER) is not None},
            )
            raise InvalidWebhookSignature("The X-ANET-Signature does not match the body")
        notification = load_json(body)
        if not tx.is_notification(notification):
            raise InvalidWebhookPayload("The webhook body is not an Authorize.Net notification")
        event = await self._event(notification)
        log.info(
            "authorizenet.webhook.received",
            extra={
                "event_id": event.event_id,
                "event_type": event.event_type,
                "payment_id": event.payment_id,
                "status": event.status,
                "refund": event.refund is not None,
            },
        )
        return event

    async def _event(self, notification: Mapping[str, Any]) -> WebhookEvent:
        base: dict[str, Any] = {
            "event_id": str(notification["notificationId"]),
            "event_type": str(notification["eventType"]),
            "verified": True,
            "occurred_at": tx.occurred_at(notification),
        }
        kind = tx.event_type(notification["eventType"])
        payload = notification["payload"]
        trans_id = str(payload.get("id"))
        if (
            kind is None
            or payload.get("entityName") != "transaction"
            or not tx.is_trans_id(trans_id)
        ):
            return WebhookEvent(**base)  # not about a payment of ours
        if kind is tx.EventType.REFUND_CREATED:
            return await self._refund_event(base, trans_id)
        invoice = payload.get("invoiceNumber")
        details: tx.Details | None = None
        if not tx.is_payment_id(invoice):
            # Older notifications leave the invoice number out: the transaction has it.
            details = await self._details(trans_id, None)
            invoice = details.invoice
        if not tx.is_payment_id(invoice):
            return WebhookEvent(**base)
        payment_id = str(invoice)
        try:
            record = await self._record(payment_id)
        except PaymentNotFound:
            return WebhookEvent(**base, payment_id=payment_id)  # not one of ours
        code = str(payload.get("responseCode"))
        claimed: PaymentStatus | None = None
        if code == tx.ResponseCode.APPROVED:
            if kind is tx.EventType.AUTHORIZATION_CREATED:
                claimed = PaymentStatus.REQUIRES_CAPTURE
            elif kind in (
                tx.EventType.AUTHCAPTURE_CREATED,
                tx.EventType.CAPTURE_CREATED,
                tx.EventType.PRIOR_AUTH_CAPTURE_CREATED,
            ):
                claimed = PaymentStatus.SUCCEEDED
        if claimed is not None:
            if record.get("trans_id") != trans_id:
                await self._save(payment_id, trans_id=trans_id)
            captured: int | None = None
            if kind in (tx.EventType.CAPTURE_CREATED, tx.EventType.PRIOR_AUTH_CAPTURE_CREATED):
                # A capture may have taken part of the authorization (one made in the Merchant
                # Interface too). The notification carries only ``authAmount``, which the
                # reference does not give as what a capture took; the transaction's
                # ``settleAmount`` says it, so the transaction is read.
                details = details or await self._details(trans_id, payment_id)
                captured = details.amount_captured(record.get("currency", "USD"))
            return WebhookEvent(
                **base,
                payment_id=payment_id,
                status=claimed,
                capture_id=trans_id if claimed.is_paid else None,
                amount_captured=captured,
            )
        # A void, a decline, a fraud hold or its outcome: what it means depends on what else
        # happened (a void may be our refund; a decline may be followed by a card that
        # worked), so the transaction is read again.
        state = await self._state(payment_id, await self._details(trans_id, payment_id), record)
        if state.refunds:
            return WebhookEvent(**base, payment_id=payment_id, refund=state.refunds[0])
        return WebhookEvent(**base, payment_id=payment_id, status=state.status)

    async def _refund_event(self, base: dict[str, Any], trans_id: str) -> WebhookEvent:
        refund = await self._details(trans_id, None)
        if refund.ref_trans_id is None:
            return WebhookEvent(**base)
        original = await self._details(refund.ref_trans_id, None)
        if not tx.is_payment_id(original.invoice):
            return WebhookEvent(**base)
        payment_id = str(original.invoice)
        try:
            record = await self._record(payment_id)
        except PaymentNotFound:
            return WebhookEvent(**base, payment_id=payment_id)
        return WebhookEvent(
            **base,
            payment_id=payment_id,
            refund=self._refund_of(refund, record, record.get("currency", "USD")),
            capture_id=refund.ref_trans_id,
        )

    async def health_check(self) -> HealthStatus:
        if not self.is_configured():
            return HealthStatus(
                healthy=False,
                message="not configured (AUTHORIZENET_API_LOGIN_ID, AUTHORIZENET_TRANSACTION_KEY,"
                " AUTHORIZENET_SIGNATURE_KEY)",
            )
        started = time.perf_counter()
        try:
            await self._call(
                "authenticateTestRequest", {}, log_event="authorizenet.health", policy=NO_RETRY
            )
        except ServiceError as error:
            latency = (time.perf_counter() - started) * 1000
            return HealthStatus(healthy=False, message=error.title, latency_ms=round(latency, 1))
        latency = (time.perf_counter() - started) * 1000
        return HealthStatus(healthy=True, message="ok", latency_ms=round(latency, 1))


def _as_captured(state: PaymentState, amount: int | None) -> PaymentState:
    """A captured payment's state, as the answer to a capture of ``amount`` (None: all that
    was authorized): the capture it had, unless it asks for another amount than was taken
    (a transaction is captured once)."""
    taken = state.amount_captured if state.amount_captured is not None else state.amount
    if amount is not None and taken is not None and amount != taken:
        raise InvalidStateTransition(f"The payment was captured already, for {taken} minor units")
    return state


def _void_refund(
    trans_id: str, record: Mapping[str, str], currency: str, refund_id: str | None = None
) -> RefundResult:
    return RefundResult(
        provider_refund_id=tx.void_refund_id(trans_id),
        amount=int(record.get("void_refund_amount", "0")),
        status=RefundStatus.SUCCEEDED,
        currency=currency,
        refund_id=refund_id or record.get("void_refund_id"),
    )


def _transactions(answer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    listed = answer.get("transactions")
    return (
        [item for item in listed if isinstance(item, Mapping)] if isinstance(listed, list) else []
    )


def _float(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None
