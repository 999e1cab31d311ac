"""Stripe, through the official SDK's async API.

One ``StripeClient`` per provider, with its own async HTTPX transport, the configured base
address and timeout, and the SDK's own retries off: retries happen in ``with_retries``, only
for calls that are safe to repeat (reads, and writes that carry an idempotency key; every
write here carries one). Stripe's exceptions become the service's errors at this edge; raw
Stripe messages are logged with Stripe's request id, never shown to clients.

Two ways to pay: ``ui_mode=hosted`` (default) makes a Checkout Session (``cs_...``) and the
customer pays on Stripe's page; ``ui_mode=embedded`` makes a PaymentIntent (``pi_...``) that
the client confirms with Stripe.js and the returned client secret.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Annotated, Any, TypeVar

import httpx2
import stripe
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from models.payment import PaymentStatus
from models.subscription import SubscriptionStatus
from services.errors import (
    CaptureExceedsAmount,
    IdempotencyKeyReused,
    InvalidStateTransition,
    InvalidWebhookPayload,
    InvalidWebhookSignature,
    NotFound,
    OperationNotSupported,
    PaymentDeclined,
    PaymentNotFound,
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
from ..resilience import NO_RETRY, RetryPolicy
from ..vendor_http import VendorErrors, retry_after_seconds, with_retries_keeping_outcome
from . import billing
from . import transformers as tx

log = logging.getLogger("payments.providers.stripe")

T = TypeVar("T")

WEBHOOK_TOLERANCE_S = 300
# Expansions that let one GET answer verify: the intent of a session and its latest charge
# (refunds, payment method).
SESSION_EXPAND = ["payment_intent", "payment_intent.latest_charge"]
INTENT_EXPAND = ["latest_charge"]
# A subscription read answers its latest invoice too: paid or not, for what.
SUBSCRIPTION_EXPAND = ["latest_invoice"]
# Codes Stripe uses when a refund asks for more than is left on the charge.
REFUND_TOO_LARGE_CODES = frozenset({"amount_too_large", "charge_already_refunded"})


def _header(headers: Any, name: str) -> str | None:
    """A header from any mapping, whatever the case of its keys."""
    if not headers:
        return None
    try:
        value = headers.get(name)  # httpx2.Headers and Starlette's are case-insensitive
    except AttributeError:
        return None
    if value is None and isinstance(headers, Mapping):
        value = next((v for k, v in headers.items() if str(k).lower() == name.lower()), None)
    return str(value) if value is not None else None


def _signed_at(header: str | None) -> int:
    """The ``t=`` of a Stripe-Signature header (verified before this is asked)."""
    for part in (header or "").split(","):
        key, _, value = part.partition("=")
        if key.strip() == "t" and value.strip().isdigit():
            return int(value)
    return 0


class _HTTPX2Client(stripe.HTTPClient):
    """Sends the requests the SDK builds through an httpx2 client of our own.

    The SDK documents this seam: "You can also subclass `stripe.HTTPClient` and provide your
    own instance" (stripe-python's README, async section); an async client implements
    ``request_async``, ``sleep_async`` and ``close_async`` and raises
    ``stripe.APIConnectionError`` when nothing usable came back. The SDK still builds the
    request (address, headers, encoded form body) and reads the answer; this class only
    carries it, so the body goes out as ``content=`` (httpx deprecates ``data=<str>``, which
    the SDK's own ``HTTPXClient`` sends). The httpx2 error stays the ``__cause__``: that is how
    ``_service_error`` tells a connection that never opened (nothing sent) from one lost
    mid-request or a read timeout (outcome unknown). Sync and streaming calls are not used
    here and keep the base class's NotImplementedError.

    httpx2 is Pydantic's maintained continuation of httpx (same API). Its connection pool is
    the reason: httpx 0.28's httpcore counted every pooled connection as idle when enforcing
    max_keepalive_connections (20), so with more calls in flight than that each connection
    was closed after one use and reopened for the next call (a TCP and, with Stripe, a TLS
    handshake each); and raising the limit made each pool pass quadratic in the number of
    connections. With 64 calls in flight to a server answering in 50 ms, the same client
    code made 461 calls/s (one new connection per call) on httpx and 739 calls/s on httpx2,
    at 60 % of the CPU per call. The client is built as the SDK's ``HTTPXClient`` built its
    own (default pool limits, the SDK's CA bundle), so only the library changes.
    """

    name = "httpx2"  # reported to Stripe in the SDK's user-agent header

    def __init__(self, *, timeout: float) -> None:
        super().__init__()
        self._client = httpx2.AsyncClient(
            timeout=timeout,
            verify=ssl.create_default_context(cafile=stripe.ca_bundle_path),
        )

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            response = await self._client.request(
                method, url, headers=headers, content=post_data or None
            )
        except httpx2.RequestError as error:
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]  # SDK: unannotated
                f"Network error talking to Stripe ({type(error).__name__})", should_retry=True
            ) from error
        return response.content, response.status_code, response.headers

    def sleep_async(self, secs: float) -> Awaitable[None]:
        return asyncio.sleep(secs)

    async def close_async(self) -> None:
        await self._client.aclose()


class StripeConfig(BaseModel):
    """Stripe's configuration besides secrets (settings ``stripe_*``). The API base address
    is set only in the environment (``STRIPE_API_BASE``), never stored: whoever could change
    it could send our secret key to another host."""

    model_config = ConfigDict(extra="forbid")

    publishable_key: str | None = Field(
        default=None,
        pattern=r"^pk_(test|live)_[A-Za-z0-9]+$",
        description="pk_..., handed to clients for embedded payments",
    )
    api_base: Annotated[str, EnvironmentOnly()] = Field(
        default="https://api.stripe.com", description="Where Stripe's API is (environment only)"
    )


class StripeSecrets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secret_key: SecretStr = Field(min_length=8, description="sk_... or a restricted rk_... key")
    webhook_secret: SecretStr | None = Field(
        default=None, min_length=8, description="whsec_..., verifies webhook signatures"
    )


class StripeProvider(BasePaymentProvider):
    name = "stripe"
    display_name = "Stripe"
    id_prefixes = ("cs_", "pi_")
    settings_prefix = "stripe_"
    config_model = StripeConfig
    secrets_model = StripeSecrets
    capabilities = frozenset(
        {
            Capability.CARD,
            Capability.WALLET,
            Capability.REDIRECT,
            Capability.EMBEDDED,
            Capability.CAPTURE,
            Capability.PARTIAL_CAPTURE,
            Capability.CANCEL,
            Capability.REFUND,
            Capability.PARTIAL_REFUND,
            Capability.WEBHOOKS,
            Capability.SUBSCRIPTIONS,
        }
    )

    def __init__(
        self,
        *,
        secret_key: str | None,
        publishable_key: str | None = None,
        webhook_secret: str | None = None,
        api_base: str = "https://api.stripe.com",
        timeout_seconds: float = 10.0,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self._publishable_key = publishable_key
        self._webhook_secret = webhook_secret or None
        # Stripe's test-mode keys (secret or restricted) move no real money.
        self._test_mode = (secret_key or "").startswith(("sk_test_", "rk_test_"))
        self._retry_policy = retry_policy or RetryPolicy()
        self._errors = VendorErrors(self.name, self.display_name, log)
        self._http: _HTTPX2Client | None = None
        self._client: stripe.StripeClient | None = None
        if secret_key:
            self._http = _HTTPX2Client(timeout=timeout_seconds)
            self._client = stripe.StripeClient(
                secret_key,
                base_addresses={"api": api_base.rstrip("/")},
                http_client=self._http,
                max_network_retries=0,  # with_retries decides what is retried
            )

    @classmethod
    def from_config(
        cls,
        config: StripeConfig | None,
        secrets: StripeSecrets | None,
        deps: ProviderDeps,
        *,
        retry_policy: RetryPolicy | None = None,
    ) -> StripeProvider:
        # Of deps, only the timeout: Stripe needs neither Redis nor the shared HTTP client,
        # since the provider's own httpx2 client owns its connection pool (closed in aclose).
        if config is None or secrets is None:
            return cls(secret_key=None, timeout_seconds=deps.timeout_s, retry_policy=retry_policy)
        webhook_secret = secrets.webhook_secret
        return cls(
            secret_key=secrets.secret_key.get_secret_value(),
            publishable_key=config.publishable_key,
            webhook_secret=webhook_secret.get_secret_value() if webhook_secret else None,
            api_base=config.api_base,
            timeout_seconds=deps.timeout_s,
            retry_policy=retry_policy,
        )

    @property
    def test_mode(self) -> bool:
        return self._test_mode

    def is_configured(self) -> bool:
        return self._client is not None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close_async()

    # -- calls -----------------------------------------------------------------------------

    def _require_client(self) -> stripe.StripeClient:
        if self._client is None:
            raise ProviderNotConfigured(
                "Stripe is not configured on this service (STRIPE_SECRET_KEY)", provider=self.name
            )
        return self._client

    async def _call(
        self,
        event: str,
        operation: Callable[[stripe.StripeClient], Awaitable[Any]],
        *,
        payment_id: str | None = None,
        is_refund: bool = False,
        is_capture: bool = False,
        policy: RetryPolicy | None = None,
    ) -> dict[str, Any]:
        """Run one SDK call (retried when Stripe is unavailable) and return its object as a
        plain dict. ``event`` names the call in logs: ``stripe.payment_intent.create``."""
        return await self._call_reading(
            event,
            operation,
            _plain,
            payment_id=payment_id,
            is_refund=is_refund,
            is_capture=is_capture,
            policy=policy,
        )

    async def _call_reading(
        self,
        event: str,
        operation: Callable[[stripe.StripeClient], Awaitable[Any]],
        read: Callable[[Any], T],
        *,
        payment_id: str | None = None,
        is_refund: bool = False,
        is_capture: bool = False,
        policy: RetryPolicy | None = None,
    ) -> T:
        """``_call``, reading what the caller needs straight from the SDK's object with
        ``read``: for a call that needs a field or two of a large object (creating a
        Checkout Session reads its ID and URL), where turning the whole object into dicts
        cost more CPU than the rest of the call's handling on our side."""
        client = self._require_client()

        async def attempt() -> T:
            try:
                result = await operation(client)
            except stripe.StripeError as error:
                raise self._service_error(
                    error,
                    event=event,
                    payment_id=payment_id,
                    is_refund=is_refund,
                    is_capture=is_capture,
                ) from error
            return read(result)

        # Once one attempt may have reached Stripe, the call's outcome stays unknown even if
        # a later attempt was plainly refused.
        return await with_retries_keeping_outcome(
            attempt, policy=policy or self._retry_policy, event=event
        )

    def _service_error(
        self,
        error: stripe.StripeError,
        *,
        event: str,
        payment_id: str | None,
        is_refund: bool,
        is_capture: bool = False,
    ) -> ServiceError:
        """Map one Stripe exception to the service's error tree, and log it once."""
        details = error.error
        code = error.code or (details.code if details is not None else None)
        fields: dict[str, Any] = {
            "provider": self.name,
            "payment_id": payment_id,
            "stripe_request_id": error.request_id,
            "http_status": error.http_status,
            "stripe_error": type(error).__name__,
            "stripe_code": code,
        }
        failed = f"{event}_failed"
        if isinstance(error, stripe.AuthenticationError | stripe.PermissionError):
            # Stripe's message names part of the key: keep it out of the log.
            log.error(failed, extra={**fields, "action": "check STRIPE_SECRET_KEY"})
            return ProviderMisconfigured(
                "Stripe refused our credentials; an operator must check the configuration",
                provider=self.name,
            )
        fields["stripe_message"] = (error.user_message or "")[:300]
        if isinstance(error, stripe.CardError):
            decline_code = (details.decline_code if details is not None else None) or code
            log.info(f"{event}_declined", extra={**fields, "decline_code": decline_code})
            return PaymentDeclined(
                f"The payment was declined ({decline_code or 'card_declined'})",
                provider=self.name,
                decline_code=decline_code,
            )
        if isinstance(error, stripe.RateLimitError):
            # The SDK's headers are a mapping (httpx2's, or a dict); anything else has none.
            hint = (
                retry_after_seconds(error.headers) if isinstance(error.headers, Mapping) else None
            )
            return self._errors.rate_limited(event, fields, hint)
        if isinstance(error, stripe.APIConnectionError) or (
            isinstance(error, stripe.APIError)
            and (error.http_status is None or error.http_status >= 500 or error.http_status == 409)
        ):
            log.warning(failed, extra=fields)
            # A connection that never opened sent nothing; a timeout or a 5xx may have been
            # processed (safe to retry with the same idempotency key, unsafe to go elsewhere).
            not_sent = isinstance(error.__cause__, httpx2.ConnectError | httpx2.ConnectTimeout)
            return ProviderUnavailable(
                "Stripe could not be reached", provider=self.name, outcome_unknown=not not_sent
            )
        if isinstance(error, stripe.IdempotencyError):
            log.error(failed, extra=fields)
            return IdempotencyKeyReused(
                "This idempotency key was already used with Stripe for a different request"
            )
        if isinstance(error, stripe.InvalidRequestError):
            param = getattr(error, "param", None)
            if code == "resource_missing" and error.http_status == 404 and payment_id:
                log.info(failed, extra=fields)
                return PaymentNotFound(f"No payment {payment_id!r}")
            if is_refund and (code in REFUND_TOO_LARGE_CODES or param == "amount"):
                log.info(failed, extra=fields)
                return RefundExceedsBalance("The refund is larger than what is left to refund")
            if is_capture and (code == "amount_too_large" or param == "amount_to_capture"):
                log.info(failed, extra=fields)
                return CaptureExceedsAmount("Stripe can capture less than that on this payment")
            if code == "payment_intent_unexpected_state":
                log.info(failed, extra=fields)
                return InvalidStateTransition("Stripe says the payment is not in a state for this")
        log.warning(failed, extra=fields)
        return ProviderUpstreamError("Stripe refused the request", provider=self.name)

    # -- create and verify -----------------------------------------------------------------

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        self._require_client()
        ui_mode = request.options.get("ui_mode") or "hosted"
        capture_method = request.options.get("capture_method") or "automatic"
        if ui_mode not in tx.UI_MODES:
            raise OperationNotSupported(f"Stripe has no ui_mode {ui_mode!r}")
        if capture_method not in tx.CAPTURE_METHODS:
            raise OperationNotSupported(f"Stripe has no capture_method {capture_method!r}")
        options: stripe.RequestOptions = {"idempotency_key": request.idempotency_key}
        if ui_mode == "embedded":
            intent_params = tx.payment_intent_params(request, capture_method=capture_method)
            key = self._publishable_key
            result = await self._call_reading(
                "stripe.payment_intent.create",
                lambda c: c.v1.payment_intents.create_async(intent_params, options),
                partial(tx.intent_result_from_payment_intent, publishable_key=key),
            )
        else:
            session_params = tx.checkout_session_params(request, capture_method=capture_method)
            result = await self._call_reading(
                "stripe.checkout_session.create",
                lambda c: c.v1.checkout.sessions.create_async(session_params, options),
                tx.intent_result_from_session,
            )
        log.info(
            "stripe.payment.created",
            extra={"payment_id": result.payment_id, "reference": request.reference},
        )
        return result

    async def _retrieve_session(self, session_id: str, *, expand: list[str]) -> dict[str, Any]:
        return await self._call(
            "stripe.checkout_session.retrieve",
            lambda c: c.v1.checkout.sessions.retrieve_async(session_id, {"expand": expand}),
            payment_id=session_id,
        )

    async def _retrieve_intent(self, intent_id: str, *, payment_id: str) -> dict[str, Any]:
        return await self._call(
            "stripe.payment_intent.retrieve",
            lambda c: c.v1.payment_intents.retrieve_async(intent_id, {"expand": INTENT_EXPAND}),
            payment_id=payment_id,
        )

    def _check_id(self, payment_id: str) -> None:
        self._require_client()
        if not self.can_handle_payment_id(payment_id):
            raise PaymentNotFound(f"No payment {payment_id!r}")

    async def verify_payment(self, payment_id: str) -> PaymentState:
        self._check_id(payment_id)
        if payment_id.startswith("cs_"):
            session = await self._retrieve_session(payment_id, expand=SESSION_EXPAND)
            return tx.state_from_checkout_session(session)
        intent = await self._retrieve_intent(payment_id, payment_id=payment_id)
        return tx.state_from_payment_intent(intent)

    async def _intent_id(self, payment_id: str) -> str | None:
        """The PaymentIntent behind ``payment_id``; a session has one once the customer
        has confirmed."""
        if payment_id.startswith("pi_"):
            return payment_id
        session = await self._retrieve_session(payment_id, expand=[])
        return tx.payment_intent_id_of(session)

    async def _intent_of(self, payment_id: str) -> dict[str, Any] | None:
        """The PaymentIntent behind ``payment_id``, with its latest charge."""
        if payment_id.startswith("pi_"):
            return await self._retrieve_intent(payment_id, payment_id=payment_id)
        session = await self._retrieve_session(payment_id, expand=SESSION_EXPAND)
        intent = session.get("payment_intent")
        return intent if isinstance(intent, dict) else None

    # -- capture, cancel, refund -----------------------------------------------------------

    async def capture(
        self, payment_id: str, *, idempotency_key: str, amount: int | None = None
    ) -> PaymentState:
        """All that is authorized, or ``amount`` of it (``amount_to_capture``: Stripe releases
        the rest, and the answer's ``amount_captured`` says what was taken)."""
        self._check_id(payment_id)
        intent_id = await self._intent_id(payment_id)
        if intent_id is None:
            raise InvalidStateTransition("Nothing to capture: the customer has not paid yet")
        params = tx.capture_params(amount=amount, expand=INTENT_EXPAND)
        try:
            intent = await self._call(
                "stripe.payment_intent.capture",
                lambda c: c.v1.payment_intents.capture_async(
                    intent_id, params, {"idempotency_key": idempotency_key}
                ),
                payment_id=payment_id,
                is_capture=True,
            )
        except (InvalidStateTransition, IdempotencyKeyReused) as refused:
            # Captured already: under another key, or under this one with other parameters
            # (an answer lost, then asked again for another amount)? Capturing again answers
            # that result, unless it asks for another amount than was taken: an intent is
            # captured once.
            current = await self._retrieve_intent(intent_id, payment_id=payment_id)
            if current.get("status") != "succeeded":
                raise
            taken = tx.amount_received(current)
            if amount is not None and amount != taken:
                raise InvalidStateTransition(
                    f"The payment was captured already, for {taken} minor units"
                ) from refused
            intent = current
        return tx.state_from_payment_intent(intent, payment_id=payment_id)

    async def cancel(self, payment_id: str, *, idempotency_key: str) -> PaymentState:
        self._check_id(payment_id)
        intent_id = payment_id
        if payment_id.startswith("cs_"):
            session = await self._retrieve_session(payment_id, expand=SESSION_EXPAND)
            if session.get("status") == "open":
                # An open session is ended by expiring it; Stripe cancels its intent, if any.
                expired = await self._call(
                    "stripe.checkout_session.expire",
                    lambda c: c.v1.checkout.sessions.expire_async(
                        payment_id, {"expand": SESSION_EXPAND}, {"idempotency_key": idempotency_key}
                    ),
                    payment_id=payment_id,
                )
                state = tx.state_from_checkout_session(expired)
                return PaymentState(
                    payment_id=state.payment_id,
                    status=PaymentStatus.CANCELED,  # we asked for it: not a lapse of time
                    amount=state.amount,
                    currency=state.currency,
                    vendor_status=state.vendor_status,
                )
            state = tx.state_from_checkout_session(session)
            found = tx.payment_intent_id_of(session)
            if state.status is not PaymentStatus.REQUIRES_CAPTURE or found is None:
                if state.status in (PaymentStatus.CANCELED, PaymentStatus.EXPIRED):
                    return state  # already over: cancelling again changes nothing
                raise InvalidStateTransition(
                    f"A Stripe payment that is {state.status} cannot be canceled"
                )
            intent_id = found
        try:
            intent = await self._call(
                "stripe.payment_intent.cancel",
                lambda c: c.v1.payment_intents.cancel_async(
                    intent_id, {"expand": INTENT_EXPAND}, {"idempotency_key": idempotency_key}
                ),
                payment_id=payment_id,
            )
        except InvalidStateTransition:
            current = await self._retrieve_intent(intent_id, payment_id=payment_id)
            if current.get("status") != "canceled":
                raise
            intent = current
        return tx.state_from_payment_intent(intent, payment_id=payment_id)

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
        # ``capture_id`` is not needed: the intent names its charge. One read first, so that
        # an unpaid payment or a currency we did not expect is refused in our own words.
        self._check_id(payment_id)
        intent = await self._intent_of(payment_id)
        if intent is None or intent.get("status") != "succeeded":
            raise InvalidStateTransition("Nothing to refund: the payment has not been captured")
        if str(intent.get("currency")).upper() != currency.upper():
            log.error(
                "stripe.refund.currency_mismatch",
                extra={
                    "payment_id": payment_id,
                    "expected": currency,
                    "stripe": intent.get("currency"),
                },
            )
            raise ProviderUpstreamError(
                "Stripe holds this payment in another currency", provider=self.name
            )
        intent_id = str(intent["id"])
        metadata = tx.refund_metadata(refund_id=refund_id, payment_id=payment_id, reason=reason)
        refund = await self._call(
            "stripe.refund.create",
            lambda c: c.v1.refunds.create_async(
                {"payment_intent": intent_id, "amount": amount, "metadata": metadata},
                # Our refund id is the key: asking again (a lost answer) never refunds twice.
                {"idempotency_key": refund_id},
            ),
            payment_id=payment_id,
            is_refund=True,
        )
        result = self._refund_result(refund)
        log.info(
            "stripe.refund.created",
            extra={
                "payment_id": payment_id,
                "refund_id": refund_id,
                "stripe_refund_id": result.provider_refund_id,
                "status": str(result.status),
                "amount": amount,
                "currency": currency,
            },
        )
        return result

    async def get_refund(self, payment_id: str, provider_refund_id: str) -> RefundResult:
        self._check_id(payment_id)
        refund = await self._call(
            "stripe.refund.retrieve",
            lambda c: c.v1.refunds.retrieve_async(provider_refund_id),
            payment_id=payment_id,
        )
        return self._refund_result(refund)

    def _refund_result(self, refund: dict[str, Any]) -> RefundResult:
        try:
            return tx.refund_result(refund)
        except ValueError as error:
            raise ProviderUpstreamError(
                "Stripe answered a refund we cannot read", provider=self.name
            ) from error

    # -- subscriptions ---------------------------------------------------------------------

    async def _subscription_call(
        self,
        event: str,
        operation: Callable[[stripe.StripeClient], Awaitable[Any]],
        *,
        subject: str,
    ) -> dict[str, Any]:
        """``_call`` for a subscription (or its checkout): a missing one is NotFound in our
        words, not a missing payment."""
        try:
            return await self._call(event, operation, payment_id=subject)
        except PaymentNotFound as error:
            raise NotFound(f"No Stripe subscription {subject!r}") from error

    async def sync_price(self, price: RecurringPrice, *, existing: str | None) -> str:
        self._require_client()
        if existing:
            try:
                found = await self._subscription_call(
                    "stripe.price.retrieve",
                    lambda c: c.v1.prices.retrieve_async(existing),
                    subject=existing,
                )
            except NotFound:
                found = None
            if found is not None and billing.price_matches(found, price):
                return existing
        # The lookup key is the price's key: a price made before (by another instance, or a
        # call whose answer was lost) is found instead of made twice.
        listed = await self._call(
            "stripe.price.list",
            lambda c: c.v1.prices.list_async({"lookup_keys": [price.key], "active": True}),
        )
        for candidate in listed.get("data") or []:
            if isinstance(candidate, dict) and billing.price_matches(candidate, price):
                return str(candidate["id"])
        product_id = await self._product_for(price)
        params = billing.price_params(price, product_id=product_id)
        # The key names the price it replaces: a retry replays this creation, but replacing
        # a price archived since is a new creation (else Stripe would replay the old one).
        key = f"price:{price.key}" + (f":replacing:{existing}" if existing else "")
        created = await self._call(
            "stripe.price.create",
            lambda c: c.v1.prices.create_async(params, {"idempotency_key": key}),
        )
        log.info(
            "stripe.price.created",
            extra={"plan": price.plan.code, "price_key": price.key, "stripe_price": created["id"]},
        )
        return str(created["id"])

    async def _product_for(self, price: RecurringPrice) -> str:
        """The plan's product, made the first time one of its prices is."""
        product_id = billing.product_id_for(price)
        try:
            await self._subscription_call(
                "stripe.product.retrieve",
                lambda c: c.v1.products.retrieve_async(product_id),
                subject=product_id,
            )
            return product_id
        except NotFound:
            pass
        params = billing.product_params(price)
        created = await self._call(
            "stripe.product.create",
            lambda c: c.v1.products.create_async(
                params, {"idempotency_key": f"product:{product_id}"}
            ),
        )
        return str(created["id"])

    async def create_subscription(self, request: SubscriptionRequest) -> SubscriptionStarted:
        self._require_client()
        vendor_price_id = request.vendor_price_id or await self.sync_price(
            request.price, existing=None
        )
        params = billing.subscription_checkout_params(request, vendor_price_id=vendor_price_id)
        session = await self._call(
            "stripe.checkout_session.create",
            lambda c: c.v1.checkout.sessions.create_async(
                params, {"idempotency_key": request.idempotency_key}
            ),
        )
        log.info(
            "stripe.subscription.checkout_created",
            extra={"subscription_id": request.subscription_id, "session": session["id"]},
        )
        # Until the customer completes Checkout there is no subscription at Stripe: the
        # session stands for it (get_subscription follows it to the subscription it made).
        return SubscriptionStarted(
            provider_subscription_id=str(session["id"]),
            status=SubscriptionStatus.INCOMPLETE,
            redirect_url=session.get("url"),
        )

    async def _retrieve_subscription(self, stripe_subscription_id: str) -> dict[str, Any]:
        return await self._subscription_call(
            "stripe.subscription.retrieve",
            lambda c: c.v1.subscriptions.retrieve_async(
                stripe_subscription_id, {"expand": SUBSCRIPTION_EXPAND}
            ),
            subject=stripe_subscription_id,
        )

    async def _session_or_subscription(
        self, provider_subscription_id: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The checkout session (when the id is one) and the subscription, if there is one
        yet."""
        self._require_client()
        if provider_subscription_id.startswith("sub_"):
            return None, await self._retrieve_subscription(provider_subscription_id)
        if not provider_subscription_id.startswith("cs_"):
            raise NotFound(f"No Stripe subscription {provider_subscription_id!r}")
        session = await self._subscription_call(
            "stripe.checkout_session.retrieve",
            lambda c: c.v1.checkout.sessions.retrieve_async(provider_subscription_id),
            subject=provider_subscription_id,
        )
        found = billing.subscription_of_session(session)
        return session, (await self._retrieve_subscription(found) if found else None)

    async def _existing_subscription(self, provider_subscription_id: str) -> dict[str, Any]:
        _, subscription = await self._session_or_subscription(provider_subscription_id)
        if subscription is None:
            raise InvalidStateTransition("The customer has not completed Stripe Checkout yet")
        return subscription

    def _subscription_state(self, subscription: dict[str, Any]) -> SubscriptionState:
        try:
            return billing.subscription_state(subscription)
        except ValueError as error:
            raise ProviderUpstreamError(
                "Stripe answered a subscription we cannot read", provider=self.name
            ) from error

    async def get_subscription(self, provider_subscription_id: str) -> SubscriptionState:
        session, subscription = await self._session_or_subscription(provider_subscription_id)
        if subscription is not None:
            return self._subscription_state(subscription)
        assert session is not None
        return billing.state_of_unfinished_checkout(session)

    async def cancel_subscription(
        self, provider_subscription_id: str, *, at_period_end: bool, idempotency_key: str
    ) -> SubscriptionState:
        session, subscription = await self._session_or_subscription(provider_subscription_id)
        if subscription is None:
            assert session is not None
            if session.get("status") == "open":
                # Nothing to bill yet: ending the checkout ends the subscription it would make.
                session = await self._subscription_call(
                    "stripe.checkout_session.expire",
                    lambda c: c.v1.checkout.sessions.expire_async(
                        provider_subscription_id, options={"idempotency_key": idempotency_key}
                    ),
                    subject=provider_subscription_id,
                )
            return billing.state_of_unfinished_checkout(session)
        subscription_id = str(subscription["id"])
        if subscription.get("status") == "canceled":
            return self._subscription_state(subscription)  # cancelling again changes nothing
        if at_period_end:
            updated = await self._subscription_call(
                "stripe.subscription.update",
                lambda c: c.v1.subscriptions.update_async(
                    subscription_id,
                    {"cancel_at_period_end": True, "expand": SUBSCRIPTION_EXPAND},
                    {"idempotency_key": idempotency_key},
                ),
                subject=subscription_id,
            )
        else:
            updated = await self._subscription_call(
                "stripe.subscription.cancel",
                # No expand: the SDK sends a DELETE's parameters in the query string, where
                # Stripe's description has none (the answer's status is what matters here).
                lambda c: c.v1.subscriptions.cancel_async(
                    subscription_id, options={"idempotency_key": idempotency_key}
                ),
                subject=subscription_id,
            )
        return self._subscription_state(updated)

    async def resume_subscription(
        self, provider_subscription_id: str, *, idempotency_key: str
    ) -> SubscriptionState:
        subscription = await self._existing_subscription(provider_subscription_id)
        subscription_id = str(subscription["id"])
        if subscription.get("status") in ("canceled", "incomplete_expired"):
            raise InvalidStateTransition("A canceled Stripe subscription cannot be resumed")
        updated = await self._subscription_call(
            "stripe.subscription.update",
            lambda c: c.v1.subscriptions.update_async(
                subscription_id,
                {"cancel_at_period_end": False, "expand": SUBSCRIPTION_EXPAND},
                {"idempotency_key": idempotency_key},
            ),
            subject=subscription_id,
        )
        return self._subscription_state(updated)

    async def change_subscription_price(
        self,
        provider_subscription_id: str,
        *,
        vendor_price_id: str,
        now: bool,
        prorate: bool,
        idempotency_key: str,
    ) -> SubscriptionState:
        subscription = await self._existing_subscription(provider_subscription_id)
        subscription_id = str(subscription["id"])
        item_id = billing.subscription_item_id(subscription)
        if item_id is None or subscription.get("status") in ("canceled", "incomplete_expired"):
            raise InvalidStateTransition("This Stripe subscription bills nothing to change")
        params = billing.price_change_params(
            item_id=item_id, vendor_price_id=vendor_price_id, now=now, prorate=prorate
        )
        params["expand"] = SUBSCRIPTION_EXPAND
        updated = await self._subscription_call(
            "stripe.subscription.update",
            lambda c: c.v1.subscriptions.update_async(
                subscription_id, params, {"idempotency_key": idempotency_key}
            ),
            subject=subscription_id,
        )
        return self._subscription_state(updated)

    async def customer_portal_url(self, provider_subscription_id: str, *, return_url: str) -> str:
        subscription = await self._existing_subscription(provider_subscription_id)
        customer = billing.customer_of(subscription)
        if customer is None:
            raise ProviderUpstreamError(
                "Stripe's subscription names no customer", provider=self.name
            )
        portal = await self._call(
            "stripe.billing_portal_session.create",
            lambda c: c.v1.billing_portal.sessions.create_async(
                {"customer": customer, "return_url": return_url}
            ),
        )
        return str(portal["url"])

    async def _billing_event(
        self, event: dict[str, Any], base: WebhookEvent
    ) -> WebhookEvent | None:
        """A subscription's event in our terms; None for an event that is not about one.
        An invoice event names its subscription but not its state: that is read from Stripe,
        so that the event carries the subscription as it is now."""
        event_type = base.event_type
        obj = event["data"]["object"]
        try:
            if event_type in billing.SUBSCRIPTION_EVENTS:
                return dataclasses.replace(base, subscription=billing.subscription_state(obj))
            if event_type in billing.INVOICE_EVENTS:
                invoice = billing.invoice_payment(obj)
                found = billing.subscription_id_of_invoice(obj)
                if found is None:
                    return base  # a one-off invoice: none of ours
                try:
                    retrieved = await self._retrieve_subscription(found)
                except NotFound:
                    # Deleted at Stripe since (test data): nothing of ours to move.
                    log.warning(
                        "stripe.webhook.subscription_missing", extra={"event": base.event_id}
                    )
                    return base
                subscription = self._subscription_state(retrieved)
                return dataclasses.replace(base, subscription=subscription, invoice=invoice)
            if event_type.startswith("checkout.session.") and billing.is_subscription_checkout(obj):
                made = billing.subscription_of_session(obj)
                if made is None:
                    state = billing.state_of_unfinished_checkout(obj)
                else:
                    state = self._subscription_state(await self._retrieve_subscription(made))
                    state = dataclasses.replace(
                        state, subscription_id=state.subscription_id or billing.ours_of(obj)
                    )
                return dataclasses.replace(base, subscription=state)
        except ValueError as error:
            raise InvalidWebhookPayload("The event's object is not what its type says") from error
        return None

    # -- webhooks and health ---------------------------------------------------------------

    async def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        self._require_client()
        if not self._webhook_secret:
            # Without a secret nothing can be verified: refuse rather than trust the body.
            log.error("stripe.webhook.no_secret", extra={"action": "set STRIPE_WEBHOOK_SECRET"})
            raise InvalidWebhookSignature("Stripe webhooks are not accepted: no signing secret")
        signature = _header(headers, "stripe-signature")
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError as error:
            # Stripe signs text; a body that is not text cannot carry its signature.
            raise InvalidWebhookSignature("The webhook body is not UTF-8 text") from error
        if signature is not None and not signature.isascii():
            # The SDK's comparison raises TypeError on non-ASCII text: Stripe sends none.
            raise InvalidWebhookSignature("The Stripe-Signature header is not ASCII")
        try:
            stripe.WebhookSignature.verify_header(
                payload, signature, self._webhook_secret, tolerance=WEBHOOK_TOLERANCE_S
            )
            # The SDK refuses only old timestamps; a signature dated ahead would stay
            # replayable for as long as it is ahead, so the window holds both ways.
            if _signed_at(signature) > time.time() + WEBHOOK_TOLERANCE_S:
                raise stripe.SignatureVerificationError(  # type: ignore[no-untyped-call]
                    "Timestamp is in the future", signature, payload
                )
        except stripe.SignatureVerificationError as error:
            log.warning(
                "stripe.webhook.signature_invalid",
                extra={"reason": error.user_message, "has_header": signature is not None},
            )
            raise InvalidWebhookSignature("The Stripe-Signature header does not match") from error
        try:
            event = load_json(body)
        except ValueError as error:
            raise InvalidWebhookPayload("The webhook body is not JSON") from error
        if not tx.is_event(event):
            raise InvalidWebhookPayload("The webhook body is not a Stripe event")
        subscription_event = await self._billing_event(
            event,
            WebhookEvent(
                event_id=str(event["id"]),
                event_type=str(event["type"]),
                verified=True,
                occurred_at=tx.moment(event.get("created")),
            ),
        )
        if subscription_event is not None:
            log.info(
                "stripe.webhook.received",
                extra={
                    "event_id": subscription_event.event_id,
                    "event_type": subscription_event.event_type,
                    "subscription_id": subscription_event.subscription.subscription_id
                    if subscription_event.subscription
                    else None,
                },
            )
            return subscription_event
        try:
            normalized = tx.webhook_event(event)
        except ValueError as error:
            raise InvalidWebhookPayload("The event's object is not what its type says") from error
        if (
            normalized.refund is not None
            and normalized.refund.refund_id is None  # ours carry our payment id already
            and normalized.reference is None
        ):
            normalized = await self._with_reference(normalized)
        log.info(
            "stripe.webhook.received",
            extra={
                "event_id": normalized.event_id,
                "event_type": normalized.event_type,
                "payment_id": normalized.payment_id,
                "status": normalized.status,
            },
        )
        return normalized

    async def _with_reference(self, event: WebhookEvent) -> WebhookEvent:
        """A refund made at Stripe directly does not carry our metadata: read our reference
        off its intent, so that the service can find a payment it knows by its session ID."""
        if event.payment_id is None or not event.payment_id.startswith("pi_"):
            return event
        intent = await self._call(
            "stripe.payment_intent.retrieve",
            lambda c: c.v1.payment_intents.retrieve_async(event.payment_id or ""),
            payment_id=event.payment_id,
        )
        return dataclasses.replace(event, reference=tx.reference_of(intent))

    async def health_check(self) -> HealthStatus:
        if not self.is_configured():
            return HealthStatus(healthy=False, message="not configured (STRIPE_SECRET_KEY)")
        started = time.perf_counter()
        try:
            await self._call(
                "stripe.balance.retrieve",
                lambda c: c.v1.balance.retrieve_async(),
                policy=NO_RETRY,  # a health check reports, it does not insist
            )
        except ServiceError as error:
            latency = (time.perf_counter() - started) * 1000
            return HealthStatus(healthy=False, message=error.title, latency_ms=round(latency, 1))
        latency = (time.perf_counter() - started) * 1000
        return HealthStatus(healthy=True, message="ok", latency_ms=round(latency, 1))


def _plain(obj: stripe.StripeObject) -> dict[str, Any]:
    """An SDK object as plain dicts and lists, as the transformers read it."""
    return dict(obj.to_dict())
