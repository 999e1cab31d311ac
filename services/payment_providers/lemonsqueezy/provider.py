"""LemonSqueezy, through its JSON:API REST API (checkouts, orders, order refunds, stores) on
the shared ``httpx2.AsyncClient``, and its HMAC-signed webhooks.

LemonSqueezy is a merchant of record: it sells to the customer, computes and remits the tax
and issues the receipt; our document for its payments names it.

How a payment is followed. We create a checkout for the plan's variant at our catalogue price,
with our payment id in ``checkout_data.custom``; the customer pays on LemonSqueezy's page, which
makes an *order*. LemonSqueezy's API has no way to find the order a checkout made (orders carry
no custom data and cannot be filtered by checkout), so the order is linked to our payment by the
``order_created`` webhook, whose ``meta.custom_data`` carries our payment id; until then, verify
answers pending (expired once the checkout's ``expires_at`` has passed). Guessing an order by
email, variant and price would risk calling a payment paid with someone else's order.

What the provider keeps in its own Redis namespace (``deps.key_value``), per payment: the
checkout (id, variant, expiry) and the linked order; the refund ledger (LemonSqueezy keeps no
refund objects, only an order's running ``refunded_amount``: each refund is named by the order
and that total right after it); and the refunds asked for, so that a refund whose answer was
lost is never made twice (LemonSqueezy takes no idempotency key).

Retries happen in ``with_retries`` for reads and for checkout creation (a second checkout moves
no money); never for a refund, which LemonSqueezy cannot deduplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Self

import httpx2
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from models.payment import PaymentStatus
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
    ProviderKeyValue,
    ProviderMappings,
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

log = logging.getLogger("payments.providers.lemonsqueezy")

API_BASE = "https://api.lemonsqueezy.com"
# X-Signature is a hex SHA-256 HMAC: 64 characters.
_SIGNATURE_LENGTH = 64

# key_value scripts. KEYS[1] a hash. Set a field unless present; answer what is there now.
_SET_ONCE_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then return ARGV[2] end
return redis.call('HGET', KEYS[1], ARGV[1])
"""
# KEYS[1] a hash. ARGV: field/value pairs to set.
_SET_LUA = """
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class ProviderMappingMissing(ServiceError):
    """The plan has no LemonSqueezy variant. 422, not 503: it is a fact about this plan and
    this provider (as a currency a provider cannot charge), which no retry changes; the client
    may pick another provider, and the operator must add the mapping."""

    status = 422
    code = "provider_mapping_missing"
    title = "The plan is not mapped to the provider's product"


class LemonSqueezyConfig(BaseModel):
    """LemonSqueezy's configuration besides secrets (settings ``LEMON_*``)."""

    model_config = ConfigDict(extra="forbid")

    store_id: str = Field(pattern=r"^[1-9][0-9]{0,18}$", description="The store's numeric ID")
    variants: dict[str, Annotated[str, Field(pattern=r"^[1-9][0-9]{0,18}$")]] = Field(
        default_factory=dict,
        description="Our plan code -> the LemonSqueezy variant ID sold for it (JSON)",
    )
    api_base: Annotated[str, EnvironmentOnly()] = Field(
        default=API_BASE, description="Where LemonSqueezy's API is (environment only)"
    )


class LemonSqueezySecrets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr = Field(min_length=16, description="API key (Settings > API)")
    webhook_secret: SecretStr | None = Field(
        default=None,
        min_length=6,
        max_length=40,
        description="The webhook's signing secret (Settings > Webhooks)",
    )

    @model_validator(mode="after")
    def _webhook_secret_with_the_key(self) -> Self:
        # Without it no webhook can be verified, and an order is linked to its payment only
        # by its order_created webhook: the provider would never learn of a payment.
        if self.webhook_secret is None:
            raise ValueError("LEMON_WEBHOOK_SECRET is required when LEMON_API_KEY is set")
        return self


class LemonSqueezyProvider(BasePaymentProvider):
    name = "lemonsqueezy"
    display_name = "LemonSqueezy"
    id_prefixes = (tx.PREFIX,)
    settings_prefix = "lemon_"
    config_model = LemonSqueezyConfig
    secrets_model = LemonSqueezySecrets
    merchant_of_record: ClassVar[str | None] = "Lemon Squeezy"
    # No CAPTURE or CANCEL: a checkout charges at once, and an unpaid one simply lapses.
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
        mappings: ProviderMappings | None,
        config: LemonSqueezyConfig | None,
        secrets: LemonSqueezySecrets | None,
        timeout_seconds: float = 10.0,
        retry_policy: RetryPolicy | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._http = http
        self._kv = key_value
        self._mappings = mappings
        self._config = config
        self._secrets = secrets
        self._api_base = (config.api_base if config else API_BASE).rstrip("/")
        self._timeout = httpx2.Timeout(timeout_seconds)
        self._errors = VendorErrors(self.name, self.display_name, log)
        self._retry_policy = retry_policy or RetryPolicy()
        self._clock = clock
        self._set_once = key_value.script(_SET_ONCE_LUA)
        self._set = key_value.script(_SET_LUA)

    @classmethod
    def from_config(
        cls,
        config: LemonSqueezyConfig | None,
        secrets: LemonSqueezySecrets | None,
        deps: ProviderDeps,
        *,
        retry_policy: RetryPolicy | None = None,
    ) -> LemonSqueezyProvider:
        configured = config is not None and secrets is not None
        return cls(
            http=deps.http,
            key_value=deps.key_value(cls.name),
            mappings=deps.mappings,
            config=config if configured else None,
            secrets=secrets if configured else None,
            timeout_seconds=deps.timeout_s,
            retry_policy=retry_policy,
        )

    def is_configured(self) -> bool:
        return self._config is not None and self._secrets is not None

    def _require_configured(self) -> tuple[LemonSqueezyConfig, LemonSqueezySecrets]:
        if self._config is None or self._secrets is None:
            raise ProviderNotConfigured(
                "LemonSqueezy is not configured on this service "
                "(LEMON_API_KEY, LEMON_STORE_ID, LEMON_WEBHOOK_SECRET)",
                provider=self.name,
            )
        return self._config, self._secrets

    # -- what we keep ----------------------------------------------------------------------

    def _payment_key(self, payment_id: str) -> str:
        return self._kv.key(payment_id)

    async def _payment(self, payment_id: str) -> dict[str, str]:
        """Our record of the checkout made for ``payment_id``; PaymentNotFound without one."""
        self._require_configured()
        if not tx.is_payment_id(payment_id):
            raise PaymentNotFound(f"No payment {payment_id!r}")
        kept = await self._kv.read_hash(self._payment_key(payment_id))
        if "checkout_id" not in kept:
            raise PaymentNotFound(f"No payment {payment_id!r}")
        return kept

    async def _link_order(self, payment_id: str, order_id: str) -> str:
        """Link ``order_id`` to our payment, once: a later claim by another order is refused
        (the first order a checkout made is the payment's). Answers the linked order."""
        linked = str(
            await self._set_once(keys=[self._payment_key(payment_id)], args=["order_id", order_id])
        )
        if linked != order_id:
            log.warning(
                "lemonsqueezy.order.second_order",
                extra={"payment_id": payment_id, "order_id": order_id, "linked": linked},
            )
        elif self._mappings is not None:
            await self._mappings.link(self.name, "order", payment_id, order_id)
        return linked

    async def _variant_for(self, plan_code: str, config: LemonSqueezyConfig) -> str:
        mapped = None
        if self._mappings is not None:
            mapped = await self._mappings.external_id(self.name, "plan", plan_code)
        variant = mapped or config.variants.get(plan_code)
        if variant is None or not tx.is_numeric_id(variant):
            log.error(
                "lemonsqueezy.plan.unmapped",
                extra={"plan": plan_code, "action": "map the plan in LEMON_VARIANTS"},
            )
            raise ProviderMappingMissing(
                f"The plan {plan_code!r} has no LemonSqueezy variant: map it in LEMON_VARIANTS "
                "or the provider mappings (entity 'plan')",
                extra={"provider": self.name, "plan": plan_code, "entity": "plan"},
            )
        return variant

    # -- calls -----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        log_event: str,
        payment_id: str | None = None,
        body: dict[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        policy: RetryPolicy | None = None,
    ) -> dict[str, Any]:
        """One API call, retried while LemonSqueezy is unavailable (as ``policy`` allows);
        returns LemonSqueezy's JSON:API document."""
        _, secrets = self._require_configured()
        headers = {
            "Accept": tx.JSON_API,
            "Content-Type": tx.JSON_API,
            "Authorization": f"Bearer {secrets.api_key.get_secret_value()}",
        }
        content = json.dumps(body, separators=(",", ":")).encode() if body is not None else None

        async def attempt() -> dict[str, Any]:
            return await self._send(
                method, path, headers, content, params, log_event=log_event,
                payment_id=payment_id,
            )  # fmt: skip

        return await with_retries_keeping_outcome(
            attempt, policy=policy or self._retry_policy, event=log_event
        )

    async def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        content: bytes | None,
        params: Mapping[str, str] | None,
        *,
        log_event: str,
        payment_id: str | None,
    ) -> dict[str, Any]:
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
            raise self._errors.transport_error(error, log_event) from error
        if 200 <= response.status_code < 300:
            try:
                document = response.json()
            except ValueError:
                document = None
            if not isinstance(document, dict):
                log.error(
                    f"{log_event}_unreadable",
                    extra={"payment_id": payment_id, "http_status": response.status_code},
                )
                raise ProviderUpstreamError(
                    "LemonSqueezy answered with something unreadable", provider=self.name
                )
            return document
        raise self._service_error(response, log_event, payment_id=payment_id)

    def _service_error(
        self, response: httpx2.Response, log_event: str, *, payment_id: str | None
    ) -> ServiceError:
        """Map one refusal from LemonSqueezy to the service's error tree, and log it once.
        LemonSqueezy's own words (its JSON:API ``errors``) go to the log only."""
        status = response.status_code
        fields = {
            "provider": self.name,
            "payment_id": payment_id,
            "http_status": status,
            "lemonsqueezy_errors": _error_details(response),
        }
        if status == 429:
            # LemonSqueezy's limit is per minute: without its Retry-After, a minute.
            return self._errors.rate_limited(
                log_event, fields, retry_after_seconds(response.headers), default_s=60
            )
        if status >= 500:
            return self._errors.unavailable(log_event, fields)
        if status in (401, 403):
            return self._errors.credentials_refused(
                log_event, fields, action="check LEMON_API_KEY and LEMON_STORE_ID"
            )
        if status == 404 and payment_id is not None:
            log.info(f"{log_event}_failed", extra=fields)
            return PaymentNotFound(f"No payment {payment_id!r}")
        return self._errors.refused(log_event, fields)

    # -- create and verify -----------------------------------------------------------------

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        config, _ = self._require_configured()
        variant_id = await self._variant_for(request.plan.code, config)
        payment_id = tx.payment_id_for(request.idempotency_key)
        key = self._payment_key(payment_id)
        kept = await self._kv.read_hash(key)
        if "checkout_id" in kept:
            # A retry of an attempt that made its checkout: answer with that checkout.
            checkout = await self._call(
                "GET",
                f"/v1/checkouts/{kept['checkout_id']}",
                log_event="lemonsqueezy.checkout.get",
                payment_id=payment_id,
            )
        else:
            try:
                body = tx.checkout_request(request, store_id=config.store_id, variant_id=variant_id)
            except ValueError as error:
                raise OperationNotSupported(str(error)) from error
            try:
                checkout = await self._call(
                    "POST", "/v1/checkouts", log_event="lemonsqueezy.checkout.create", body=body
                )
            except ProviderUpstreamError as error:
                # A 4xx to a well-formed checkout: the store or variant is not what LemonSqueezy
                # knows (a variant of another store, a deleted one). The operator must act.
                raise ProviderMisconfigured(
                    "LemonSqueezy refused the checkout for this plan's variant; an operator "
                    "must check LEMON_STORE_ID and the plan's variant",
                    provider=self.name,
                ) from error
        try:
            resource = tx.resource(checkout, "checkouts")
        except ValueError as error:
            log.error("lemonsqueezy.checkout.unreadable", extra={"payment_id": payment_id})
            raise ProviderUpstreamError(
                "LemonSqueezy answered the checkout with something unreadable", provider=self.name
            ) from error
        url = tx.checkout_url(resource)
        if url is None or not tx.CHECKOUT_ID.fullmatch(str(resource["id"])):
            log.error("lemonsqueezy.checkout.no_url", extra={"payment_id": payment_id})
            raise ProviderUpstreamError(
                "LemonSqueezy gave no page for the customer to pay on", provider=self.name
            )
        expires_at = resource["attributes"].get("expires_at")
        await self._set(
            keys=[key],
            args=[
                "checkout_id", str(resource["id"]),
                "variant_id", variant_id,
                "amount", str(request.plan.amount),
                "currency", request.plan.currency.upper(),
                "expires_at", expires_at if isinstance(expires_at, str) else "",
            ],
        )  # fmt: skip
        log.info(
            "lemonsqueezy.checkout.created",
            extra={
                "payment_id": payment_id,
                "checkout_id": resource["id"],
                "reference": request.reference,
            },
        )
        return IntentResult(payment_id=payment_id, status=PaymentStatus.PENDING, redirect_url=url)

    async def _order(
        self, order_id: str, payment_id: str
    ) -> tuple[tx.LemonObject, tx.OrderFigures]:
        document = await self._call(
            "GET", f"/v1/orders/{order_id}", log_event="lemonsqueezy.order.get",
            payment_id=payment_id,
        )  # fmt: skip
        return self._figures(document, payment_id)

    def _figures(self, document: Any, payment_id: str) -> tuple[tx.LemonObject, tx.OrderFigures]:
        config, _ = self._require_configured()
        try:
            order = tx.resource(document, "orders")
            figures = tx.OrderFigures.of(order)
        except ValueError as error:
            log.error("lemonsqueezy.order.unreadable", extra={"payment_id": payment_id})
            raise ProviderUpstreamError(
                "LemonSqueezy answered an order we cannot read", provider=self.name
            ) from error
        if str(order["attributes"].get("store_id")) != config.store_id:
            log.error("lemonsqueezy.order.other_store", extra={"payment_id": payment_id})
            raise ProviderUpstreamError(
                "LemonSqueezy answered with an order of another store", provider=self.name
            )
        return order, figures

    async def verify_payment(self, payment_id: str) -> PaymentState:
        kept = await self._payment(payment_id)
        order_id = kept.get("order_id")
        if order_id is None:
            # No order_created yet: the customer has not paid (or its webhook is on its way).
            expires_at = tx.timestamp(kept.get("expires_at") or None)
            status = PaymentStatus.PENDING
            if expires_at is not None and expires_at <= self._clock():
                status = PaymentStatus.EXPIRED
            return PaymentState(
                payment_id=payment_id, status=status, vendor_status="checkout, no order"
            )
        order, figures = await self._order(order_id, payment_id)
        refunds = await self._ledger(payment_id, figures)
        return tx.state_from_order(payment_id, order, refunds)

    # -- refunds ---------------------------------------------------------------------------

    def _ledger_key(self, payment_id: str) -> str:
        return f"{self._payment_key(payment_id)}:refunds"

    def _asked_key(self, payment_id: str) -> str:
        return f"{self._payment_key(payment_id)}:asked"

    async def _ledger(self, payment_id: str, figures: tx.OrderFigures) -> tuple[RefundResult, ...]:
        """The order's refunds, one per step of its running ``refunded_amount``: those we
        recorded, plus one for any rise we have not (a refund made in LemonSqueezy's
        dashboard, or ours whose answer was lost, recognised by what we asked)."""
        ledger_key = self._ledger_key(payment_id)
        steps = await self._kv.read_hash(ledger_key)
        reached = figures.refunded
        top = max((int(total) for total in steps), default=0)
        if reached > top:
            entry = await self._asked_for(payment_id, top, reached)
            if entry is None:
                entry = f"{figures.to_ours(reached) - figures.to_ours(top)}|-"
            steps[str(reached)] = str(
                await self._set_once(keys=[ledger_key], args=[str(reached), entry])
            )
        results = []
        for total, entry in sorted(steps.items(), key=lambda item: int(item[0])):
            amount, _, refund_id = entry.partition("|")
            results.append(tx.refund_result(figures, int(total), int(amount), refund_id or None))
        return tuple(results)

    async def _asked_for(self, payment_id: str, before: int, after: int) -> str | None:
        """The ledger entry of a refund we asked for that took the order from ``before`` to
        ``after``, if there is one."""
        for refund_id, asked in (await self._kv.read_hash(self._asked_key(payment_id))).items():
            was, amount, vendor_amount = (int(part) for part in asked.split("|"))
            if was == before and was + vendor_amount == after:
                return f"{amount}|{refund_id}"
        return None

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
        kept = await self._payment(payment_id)
        order_id = kept.get("order_id") or capture_id
        if order_id is None or not tx.is_numeric_id(order_id):
            raise InvalidStateTransition("Nothing to refund: LemonSqueezy has no order for it")
        _, figures = await self._order(order_id, payment_id)
        if figures.currency != currency.upper():
            log.error(
                "lemonsqueezy.refund.currency_mismatch",
                extra={"payment_id": payment_id, "expected": currency, "order": figures.currency},
            )
            raise ProviderUpstreamError(
                "LemonSqueezy holds this order in another currency", provider=self.name
            )
        if not tx.payment_status(figures.status).is_paid:
            raise InvalidStateTransition("Only a paid LemonSqueezy order can be refunded")
        ledger = await self._ledger(payment_id, figures)
        for done in ledger:
            if done.refund_id == refund_id:
                return done  # asked before, and made: never twice
        vendor_amount = min(figures.to_vendor(amount), figures.total - figures.refunded)
        if vendor_amount <= 0:
            raise RefundExceedsBalance("The LemonSqueezy order has nothing left to refund")
        # Recorded before asking: if the answer is lost, the ledger recognises the refund
        # by the rise it made, and a second ask never happens.
        asked = f"{figures.refunded}|{amount}|{vendor_amount}"
        await self._set(keys=[self._asked_key(payment_id)], args=[refund_id, asked])
        document = await self._call(
            "POST",
            f"/v1/orders/{order_id}/refund",
            log_event="lemonsqueezy.refund.create",
            payment_id=payment_id,
            body=tx.refund_request(order_id, vendor_amount),
            policy=NO_RETRY,  # no idempotency key at LemonSqueezy: never asked twice
        )
        _, after = self._figures(document, payment_id)
        # The refund is made when LemonSqueezy answers (the order, with the refunded total).
        result = next(
            (r for r in await self._ledger(payment_id, after) if r.refund_id == refund_id), None
        )
        if result is None:
            log.error(
                "lemonsqueezy.refund.not_seen",
                extra={"payment_id": payment_id, "refund_id": refund_id},
            )
            raise ProviderUpstreamError(
                "LemonSqueezy answered the refund without refunding", provider=self.name
            )
        log.info(
            "lemonsqueezy.refund.created",
            extra={
                "payment_id": payment_id,
                "refund_id": refund_id,
                "lemonsqueezy_refund_id": result.provider_refund_id,
                "amount": amount,
                "vendor_amount": vendor_amount,
            },
        )
        return result

    async def get_refund(self, payment_id: str, provider_refund_id: str) -> RefundResult:
        kept = await self._payment(payment_id)
        parsed = tx.parse_refund_id(provider_refund_id)
        if parsed is None or parsed[0] != kept.get("order_id"):
            raise NotFound(f"No refund {provider_refund_id!r}")
        _, figures = await self._order(parsed[0], payment_id)
        for result in await self._ledger(payment_id, figures):
            if result.provider_refund_id == provider_refund_id:
                return result
        raise NotFound(f"No refund {provider_refund_id!r}")

    # -- webhooks and health ---------------------------------------------------------------

    async def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        _, secrets = self._require_configured()
        assert secrets.webhook_secret is not None  # the model requires it
        signature = header(headers, tx.HEADER_SIGNATURE)
        expected = hmac.new(
            secrets.webhook_secret.get_secret_value().encode(), body, hashlib.sha256
        ).hexdigest()
        if (
            signature is None
            or len(signature) != _SIGNATURE_LENGTH
            or not hmac.compare_digest(expected, signature.strip().lower())
        ):
            log.warning(
                "lemonsqueezy.webhook.signature_invalid",
                extra={"present": signature is not None},
            )
            raise InvalidWebhookSignature("The webhook's X-Signature does not match its body")
        payload = load_json(body)
        try:
            delivery = tx.read_delivery(payload, header(headers, tx.HEADER_EVENT_NAME))
        except ValueError as error:
            raise InvalidWebhookPayload("The webhook body is not a LemonSqueezy event") from error
        event = await self._event(delivery)
        log.info(
            "lemonsqueezy.webhook.received",
            extra={
                "event_id": event.event_id,
                "event_type": event.event_type,
                "payment_id": event.payment_id,
                "status": event.status,
            },
        )
        return event

    async def _event(self, delivery: tx.Delivery) -> WebhookEvent:
        handled = {str(name) for name in tx.EventName}
        if delivery.event_name not in handled or delivery.order is None:
            return tx.webhook_event(
                tx.Delivery(delivery.event_name, None, None, None), verified=True
            )
        payment_id = delivery.payment_id
        order_id = str(delivery.order["id"])
        if payment_id is None and self._mappings is not None:
            payment_id = await self._mappings.local_id(self.name, "order", order_id)
        try:
            kept = await self._payment(payment_id) if payment_id else None
        except PaymentNotFound:
            kept = None
        if kept is None or payment_id is None:
            return tx.webhook_event(
                tx.Delivery(delivery.event_name, None, None, None), verified=True
            )
        try:
            _, figures = self._figures({"data": delivery.order}, payment_id)
        except ProviderUpstreamError as error:
            # Signed, but not an order of this store we can read: nothing to apply, and no
            # redelivery would change that.
            raise InvalidWebhookPayload("The event's order is not one of this store's") from error
        if await self._link_order(payment_id, order_id) != order_id:
            # A second order for one checkout: not this payment's; the operator refunds it.
            return tx.webhook_event(
                tx.Delivery(delivery.event_name, None, None, None), verified=True
            )
        delivery = tx.Delivery(delivery.event_name, delivery.order, payment_id, delivery.reference)
        if delivery.event_name == tx.EventName.ORDER_CREATED and (
            figures.net != int(kept.get("amount", -1)) or figures.currency != kept.get("currency")
        ):
            # Not our price (a discount, another currency): the event claims nothing; the
            # service reads the order through verify, which refuses to call it paid.
            log.error("lemonsqueezy.webhook.amount_mismatch", extra={"payment_id": payment_id})
            return WebhookEvent(
                event_id=delivery.event_id, event_type=delivery.event_name, verified=False,
                payment_id=payment_id,
            )  # fmt: skip
        refund = None
        if delivery.event_name == tx.EventName.ORDER_REFUNDED and figures.refunded > 0:
            # The refund this event reports is the step up to the refunded total it carries;
            # an older event than what we hold finds its step already in the ledger.
            name = tx.refund_id_of(order_id, figures.refunded)
            refund = next(
                (
                    r
                    for r in await self._ledger(payment_id, figures)
                    if r.provider_refund_id == name
                ),
                None,
            )
        return tx.webhook_event(delivery, verified=True, refund=refund)

    async def health_check(self) -> HealthStatus:
        if not self.is_configured():
            return HealthStatus(
                healthy=False,
                message="not configured (LEMON_API_KEY, LEMON_STORE_ID, LEMON_WEBHOOK_SECRET)",
            )
        config, _ = self._require_configured()
        started = time.perf_counter()
        try:
            await self._call(
                "GET",
                f"/v1/stores/{config.store_id}",
                log_event="lemonsqueezy.store.get",
                policy=NO_RETRY,  # a health check reports, it does not insist
            )
        except ServiceError as error:
            latency = (time.perf_counter() - started) * 1000
            return HealthStatus(healthy=False, message=error.title, latency_ms=round(latency, 1))
        latency = (time.perf_counter() - started) * 1000
        return HealthStatus(healthy=True, message="ok", latency_ms=round(latency, 1))


def _error_details(response: httpx2.Response) -> list[str]:
    """The ``detail`` (else ``title``) of each JSON:API error, cut short, for the log."""
    errors = json_object(response).get("errors")
    if not isinstance(errors, list):
        return []
    return [
        str(error.get("detail") or error.get("title"))[:200]
        for error in errors[:5]
        if isinstance(error, dict)
    ]
