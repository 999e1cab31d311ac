"""The built-in sandbox provider: a whole payment flow with no account anywhere.

It behaves like an external provider that happens to live in this service. It keeps its own
records (the "provider side") in Redis apart from the service's payments, serves its own hosted
checkout page (``routers/sandbox.py``), and answers verify from those records. The customer
settles a payment on that page with Pay, Decline or Cancel.

Asked per payment, it also pushes its own signed webhooks to the service over real HTTP, with
delivery faults on demand (duplicated, delayed, reordered, badly signed), so that the service's
webhook handling can be proven against a vendor that misbehaves the way real ones do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import httpx2
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from models.payment import PaymentStatus, RefundStatus, SandboxBehaviour
from services.errors import (
    CaptureExceedsAmount,
    InvalidStateTransition,
    InvalidWebhookPayload,
    NotFound,
    PaymentDeclined,
    PaymentNotFound,
    ProviderNotConfigured,
    ProviderUnavailable,
    ProviderUpstreamError,
    RefundExceedsBalance,
)

from .base import (
    BasePaymentProvider,
    Capability,
    CardDetails,
    HealthStatus,
    IntentRequest,
    IntentResult,
    LocalEvents,
    PaymentState,
    ProviderDeps,
    ProviderKeyValue,
    RecurringPrice,
    RefundResult,
    SubscriptionRequest,
    SubscriptionStarted,
    SubscriptionState,
    WebhookEvent,
)
from .payloads import load_json
from .sandbox_subscriptions import CheckoutOutcome, RenewalOutcome, SandboxSubscriptions
from .sandbox_webhooks import (
    SESSION_TTL_S,
    SIGNATURE_HEADER,
    WEBHOOK_PATH,
    SandboxWebhookPusher,
    verify_webhook_signature,
)

log = logging.getLogger("payments.sandbox")

Outcome = Literal["succeeded", "failed", "canceled"]
OUTCOMES: tuple[Outcome, ...] = ("succeeded", "failed", "canceled")

# The sandbox's own statuses, as a vendor would have them, and what they mean to us.
_STATUS_MAP = {
    "open": PaymentStatus.PENDING,
    "authorized": PaymentStatus.REQUIRES_CAPTURE,
    "succeeded": PaymentStatus.SUCCEEDED,
    "failed": PaymentStatus.FAILED,
    "canceled": PaymentStatus.CANCELED,
}

# KEYS: session hash. ARGV: TTL, the session's fields as one JSON object of strings (one
# argument rather than a pair per field: each argument costs the client its own encoding).
# Opens a session once.
_OPEN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local pairs_ = {}
for field, value in pairs(cjson.decode(ARGV[2])) do
  pairs_[#pairs_ + 1] = field
  pairs_[#pairs_ + 1] = value
end
redis.call('HSET', KEYS[1], unpack(pairs_))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: session hash. ARGV: outcome, now. Settles an open session once.
_SETTLE_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', ''} end
if status ~= 'open' then return {'settled', status} end
local target = ARGV[1]
if target == 'succeeded' and redis.call('HGET', KEYS[1], 'capture_method') == 'manual' then
  target = 'authorized'
end
redis.call('HSET', KEYS[1], 'status', target, 'settled_at', ARGV[2])
return {'ok', target}
"""

# KEYS: session hash. ARGV: from status, to status. Moves only from the expected status.
_MOVE_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', ''} end
if status ~= ARGV[1] then return {'refused', status} end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
return {'ok', ARGV[2]}
"""

# KEYS: session hash. ARGV: the amount to capture ('' for all that is authorized). Captures an
# authorized session once, all of it or part (the rest is released: nothing can take it
# later), and keeps what it took as 'captured'. Asked again, under the same idempotency key or
# another, it captures nothing more and answers what was taken.
_CAPTURE_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', ''} end
local authorized = redis.call('HGET', KEYS[1], 'amount')
if status == 'succeeded' then
  return {'captured', redis.call('HGET', KEYS[1], 'captured') or authorized}
end
if status ~= 'authorized' then return {'refused', status} end
local amount = ARGV[1]
if amount == '' then amount = authorized end
if tonumber(amount) <= 0 or tonumber(amount) > tonumber(authorized) then
  return {'exceeds', authorized}
end
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'captured', amount)
return {'ok', amount}
"""

# KEYS: session hash, refunds hash. ARGV: the sandbox's refund id, amount, the refund (JSON,
# pending or succeeded). Refunds only what was paid (captured, after a partial capture) and is
# neither refunded nor pending; the same refund id (derived from the merchant's idempotency
# key) never refunds twice.
_REFUND_LUA = """
local existing = redis.call('HGET', KEYS[2], ARGV[1])
if existing then return {'replay', existing} end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', ''} end
if status ~= 'succeeded' then return {'unpaid', ''} end
local paid = tonumber(redis.call('HGET', KEYS[1], 'captured')
  or redis.call('HGET', KEYS[1], 'amount'))
local refunded = tonumber(redis.call('HGET', KEYS[1], 'refunded') or '0')
local pending = tonumber(redis.call('HGET', KEYS[1], 'refund_pending') or '0')
local amount = tonumber(ARGV[2])
if amount <= 0 or refunded + pending + amount > paid then
  return {'exceeds', tostring(paid - refunded - pending)}
end
if cjson.decode(ARGV[3])['status'] == 'succeeded' then
  redis.call('HINCRBY', KEYS[1], 'refunded', amount)
else
  redis.call('HINCRBY', KEYS[1], 'refund_pending', amount)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], redis.call('TTL', KEYS[1]))
return {'ok', ARGV[3]}
"""

# KEYS: session hash, refunds hash. ARGV: the sandbox's refund id, final status. Settles a
# pending refund once.
_SETTLE_REFUND_LUA = """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return {'missing', ''} end
local refund = cjson.decode(raw)
if refund['status'] ~= 'pending' then return {'settled', raw} end
refund['status'] = ARGV[2]
redis.call('HINCRBY', KEYS[1], 'refund_pending', -refund['amount'])
if ARGV[2] == 'succeeded' then redis.call('HINCRBY', KEYS[1], 'refunded', refund['amount']) end
local encoded = cjson.encode(refund)
redis.call('HSET', KEYS[2], ARGV[1], encoded)
return {'ok', encoded}
"""


# The sandbox's event types and the state each one claims. refund.pending, refund.succeeded
# and refund.failed carry the refund itself (data.refund) instead.
_EVENT_STATUS = {
    "payment.succeeded": PaymentStatus.SUCCEEDED,
    "payment.failed": PaymentStatus.FAILED,
    "payment.canceled": PaymentStatus.CANCELED,
    "payment.authorized": PaymentStatus.REQUIRES_CAPTURE,
}
REFUND_EVENT_PREFIX = "refund."


class SandboxConfig(BaseModel):
    """What an operator may store for the sandbox (settings ``sandbox_*``)."""

    model_config = ConfigDict(extra="forbid")

    behaviour: SandboxBehaviour | None = Field(
        default=None,
        description=(
            "Faults for every payment that brings no `sandbox` object of its own: decline, "
            "answer slowly, fail, lose the answer, push webhooks"
        ),
    )


class SandboxSecrets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    webhook_secret: SecretStr | None = Field(
        default=None, min_length=16, description="Signs the sandbox's webhooks"
    )


# The card every sandbox payment reports, as a vendor's test mode would (Stripe's 4242 card).
TEST_CARD = CardDetails(brand="visa", last4="4242")


class SandboxProvider(BasePaymentProvider):
    name = "sandbox"
    display_name = "Sandbox"
    id_prefixes = ("sb_",)
    settings_prefix = "sandbox_"
    config_model = SandboxConfig
    secrets_model = SandboxSecrets
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
            Capability.SUBSCRIPTIONS,
        }
    )

    def __init__(
        self,
        store: ProviderKeyValue,
        *,
        enabled: bool,
        webhook_secret: str = "",
        http: httpx2.AsyncClient | None = None,
        behaviour: Mapping[str, Any] | None = None,
        events: LocalEvents | None = None,
    ) -> None:
        self._store = store  # its own keys in the service's Redis, and nothing else there
        self._events = events  # tells the service of refunds settled by a timer
        self._behaviour = dict(behaviour or {})  # for payments that bring none of their own
        self._webhook_secret = webhook_secret
        self._prefix = store.namespace
        self._enabled = enabled
        self._open = store.script(_OPEN_LUA)
        self._settle = store.script(_SETTLE_LUA)
        self._move = store.script(_MOVE_LUA)
        self._capture = store.script(_CAPTURE_LUA)
        self._refund = store.script(_REFUND_LUA)
        self._settle_refund = store.script(_SETTLE_REFUND_LUA)
        self._webhooks = SandboxWebhookPusher(
            store, http, secret=webhook_secret, key_of=self._key, enabled=enabled
        )
        self._subscriptions = SandboxSubscriptions(store, events, name=self.name)

    @classmethod
    def from_config(
        cls, config: SandboxConfig | None, secrets: SandboxSecrets | None, deps: ProviderDeps
    ) -> SandboxProvider:
        # Test money must never be taken for real money: production has no sandbox.
        webhook_secret = secrets.webhook_secret if secrets else None
        behaviour = config.behaviour if config else None
        return cls(
            deps.key_value(cls.name),
            enabled=not deps.production,
            webhook_secret=webhook_secret.get_secret_value() if webhook_secret else "",
            http=deps.http,
            behaviour=behaviour.model_dump() if behaviour else None,
            events=deps.events,
        )

    @property
    def test_mode(self) -> bool:
        return True  # never real money

    def is_configured(self) -> bool:
        return self._enabled

    def _require_enabled(self) -> None:
        if not self._enabled:
            raise ProviderNotConfigured(
                "The sandbox provider is disabled in production", provider=self.name
            )

    def _key(self, payment_id: str) -> str:
        return self._store.key(payment_id)

    def checkout_path(self, payment_id: str) -> str:
        return f"/sandbox/checkout/{payment_id}"

    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        self._require_enabled()
        behaviour: Mapping[str, Any] = request.options.get("sandbox") or self._behaviour
        if behaviour.get("delay_ms"):
            await asyncio.sleep(behaviour["delay_ms"] / 1000)
        self._inject_fault_before(behaviour.get("fail"))
        # The vendor's own idempotency: the payment ID is derived from the key, so the same
        # key finds the same session, and one script call creates it only once.
        digest = hashlib.sha256(f"{self._prefix}{request.idempotency_key}".encode()).hexdigest()
        payment_id = f"sb_{digest[:24]}"
        session = {
            "status": "open",
            "amount": request.amount,
            "currency": request.currency,
            "plan": request.plan.code,
            "plan_name": request.plan.name,
            "reference": request.reference,
            "return_url": request.return_url or "",
            "cancel_url": request.cancel_url or "",
            "capture_method": request.options.get("capture_method") or "automatic",
            "refunded": 0,
            "refund_pending": 0,
            # How this payment's refunds behave: at once, or pending then settled.
            "refund_mode": behaviour.get("refund") or "",
            "refund_settle_ms": int(behaviour.get("refund_settle_ms") or 0),
            "created_at": int(time.time()),
        }
        if behaviour.get("webhooks") is not None:
            # Where a vendor would have the merchant's endpoint: the service's own, at the base
            # URL it was reached at (or PUBLIC_BASE_URL). Never a URL from the request body.
            session["webhooks"] = json.dumps(behaviour["webhooks"])
            session["webhook_url"] = request.base_url.rstrip("/") + WEBHOOK_PATH
        key = self._key(payment_id)
        fields = {name: str(value) for name, value in session.items()}
        # Opened once: the same key finds the same session, as a vendor's idempotency would.
        await self._open(keys=[key], args=[SESSION_TTL_S, json.dumps(fields)])
        if behaviour.get("fail") == "lost_answer":
            raise ProviderUnavailable(
                "sandbox: the payment was created but the answer was lost", provider=self.name
            )
        return IntentResult(
            payment_id=payment_id,
            status=PaymentStatus.PENDING,
            redirect_url=request.base_url.rstrip("/") + self.checkout_path(payment_id),
        )

    def _inject_fault_before(self, fault: str | None) -> None:
        if fault == "decline":
            raise PaymentDeclined(
                "sandbox: the card was declined", provider=self.name, decline_code="card_declined"
            )
        if fault == "unavailable":
            raise ProviderUnavailable(
                "sandbox: refused the connection",
                provider=self.name,
                retry_after=1,
                outcome_unknown=False,
            )
        if fault == "error":
            raise ProviderUpstreamError("sandbox: answered 500", provider=self.name)

    async def session(self, payment_id: str) -> dict[str, str]:
        """The sandbox's own record of a payment, for its checkout page."""
        self._require_enabled()
        fields = await self._store.read_hash(self._key(payment_id))
        if not fields:
            raise PaymentNotFound(f"No payment {payment_id!r}")
        return fields

    async def settle(self, payment_id: str, outcome: Outcome) -> dict[str, str]:
        """What the customer's click on the checkout page does."""
        self._require_enabled()
        result, status = await self._settle(
            keys=[self._key(payment_id)], args=[outcome, datetime.now(UTC).isoformat()]
        )
        if result == "missing":
            raise PaymentNotFound(f"No payment {payment_id!r}")
        if result == "settled":
            raise InvalidStateTransition(f"This payment was already settled ({status})")
        session = await self.session(payment_id)
        await self._webhooks.emit(payment_id, f"payment.{status}", fields=session)
        return session

    async def settle_from_checkout(self, payment_id: str, outcome: Outcome) -> dict[str, str]:
        """The customer clicked Pay, Decline or Cancel on the checkout page. The sandbox tells
        the service at once, as a vendor's webhook would, unless the payment asked for pushed
        webhooks: then, as with a real vendor's page, the service hears of it only by them."""
        session = await self.settle(payment_id, outcome)
        if not self.pushes_webhooks(session) and self._events is not None:
            event_type = f"payment.{session['status']}"
            event = WebhookEvent(
                event_id=f"evt_sb_{secrets.token_hex(12)}",
                event_type=event_type,
                verified=True,
                payment_id=payment_id,
                status=_EVENT_STATUS.get(event_type),
                payment_method="sandbox",
                card=TEST_CARD,
            )
            await self._events.publish(self.name, event, cause="sandbox:checkout")
        return session

    @staticmethod
    def pushes_webhooks(session: Mapping[str, str]) -> bool:
        """Whether this payment's events reach the service only through pushed webhooks."""
        return "webhooks" in session

    async def webhook_deliveries(self, payment_id: str) -> list[dict[str, Any]]:
        """Every delivery attempt of this payment's webhooks, oldest first."""
        self._require_enabled()
        return await self._webhooks.deliveries(payment_id)

    async def wait_for_deliveries(self, grace_s: float) -> bool:
        """Wait until no delivery (nor refund timer) is under way, at most ``grace_s``."""
        return await self._webhooks.wait_for_deliveries(grace_s)

    async def aclose(self) -> None:
        """Drop deliveries and timers still under way: a vendor going away loses its retries
        too (a refund due meanwhile settles when it is next asked about)."""
        await self._webhooks.aclose()

    async def verify_payment(self, payment_id: str) -> PaymentState:
        return self.state_of(payment_id, await self.session(payment_id))

    @staticmethod
    def state_of(payment_id: str, fields: Mapping[str, str]) -> PaymentState:
        """The sandbox's truth about a payment, from its record as ``session`` reads it."""
        amount = int(fields["amount"])
        captured = captured_part(fields)
        refunded = int(fields.get("refunded", 0))
        status = _STATUS_MAP.get(fields["status"], PaymentStatus.PENDING)
        if status is PaymentStatus.SUCCEEDED and refunded:
            taken = amount if captured is None else captured
            status = (
                PaymentStatus.REFUNDED if refunded >= taken else PaymentStatus.PARTIALLY_REFUNDED
            )
        return PaymentState(
            payment_id=payment_id,
            status=status,
            amount=amount,
            currency=fields["currency"],
            amount_captured=captured,
            payment_method="sandbox",
            vendor_status=fields["status"],
            card=TEST_CARD,
        )

    async def capture(
        self, payment_id: str, *, idempotency_key: str, amount: int | None = None
    ) -> PaymentState:
        """All that the customer authorized, or ``amount`` of it: the rest is released at
        once, and the answer's ``amount_captured`` says what was taken. A session is captured
        once: asked again, the sandbox answers that capture, and refuses another amount."""
        self._require_enabled()
        result, value = await self._capture(
            keys=[self._key(payment_id)], args=["" if amount is None else amount]
        )
        if result == "missing":
            raise PaymentNotFound(f"No payment {payment_id!r}")
        if result == "refused":
            raise InvalidStateTransition(f"Only an authorized payment can be captured ({value})")
        if result == "exceeds":
            raise CaptureExceedsAmount(
                f"At most {value} minor units can be captured", extra={"amount": int(value)}
            )
        if result == "captured" and amount is not None and amount != int(value):
            raise InvalidStateTransition(
                f"The payment was captured already, for {value} minor units"
            )
        session = await self.session(payment_id)
        state = self.state_of(payment_id, session)
        if result == "ok":
            await self._webhooks.emit(
                payment_id,
                "payment.succeeded",
                fields=session,
                amount_captured=state.amount_captured,
            )
        return state

    async def cancel(self, payment_id: str, *, idempotency_key: str) -> PaymentState:
        self._require_enabled()
        for source in ("open", "authorized"):
            result, status = await self._move(
                keys=[self._key(payment_id)], args=[source, "canceled"]
            )
            if result == "missing":
                raise PaymentNotFound(f"No payment {payment_id!r}")
            if result == "ok":
                await self._webhooks.emit(payment_id, "payment.canceled")
            if result == "ok" or status == "canceled":
                return await self.verify_payment(payment_id)
        raise InvalidStateTransition(f"This payment can no longer be canceled ({status})")

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
        self._require_enabled()
        session = await self.session(payment_id)
        mode = session.get("refund_mode") or ""
        settle_ms = int(session.get("refund_settle_ms") or 0)
        # The sandbox's own refund id comes from ours, its idempotency key.
        digest = hashlib.sha256(f"{self._prefix}{refund_id}".encode()).hexdigest()
        sandbox_refund_id = f"sbre_{digest[:24]}"
        refund = {
            "id": sandbox_refund_id,
            "refund_id": refund_id,
            "amount": amount,
            "currency": currency,
            "status": "pending" if mode else "succeeded",
            "outcome": "failed" if mode == "pending_then_failed" else "succeeded",
            "settle_at_ms": int(time.time() * 1000) + settle_ms,
        }
        result, raw = await self._refund(
            keys=[self._key(payment_id), self._refunds_key(payment_id)],
            args=[sandbox_refund_id, amount, json.dumps(refund)],
        )
        if result == "missing":
            raise PaymentNotFound(f"No payment {payment_id!r}")
        if result == "unpaid":
            raise InvalidStateTransition("Only a paid payment can be refunded")
        if result == "exceeds":
            raise RefundExceedsBalance(f"At most {int(raw)} minor units were left to refund")
        stored = json.loads(raw)
        if result == "ok":
            await self._webhooks.emit(payment_id, f"refund.{stored['status']}", refund=stored)
            if stored["status"] == "pending":
                self._webhooks.spawn(self._settle_later(payment_id, stored, settle_ms))
        return _refund_result(stored)

    def _refunds_key(self, payment_id: str) -> str:
        return f"{self._key(payment_id)}:refunds"

    async def get_refund(self, payment_id: str, provider_refund_id: str) -> RefundResult:
        self._require_enabled()
        raw = await self._store.read_hash_field(self._refunds_key(payment_id), provider_refund_id)
        if not raw:
            raise NotFound(f"No refund {provider_refund_id!r}")
        refund = json.loads(raw)
        if refund["status"] == "pending" and time.time() * 1000 >= refund["settle_at_ms"]:
            # Due and not yet settled (the worker whose timer it was went away): settle now.
            refund = await self._finish_refund(payment_id, refund) or refund
        return _refund_result(refund)

    async def _settle_later(self, payment_id: str, refund: dict[str, Any], delay_ms: int) -> None:
        await asyncio.sleep(delay_ms / 1000)
        try:
            await self._finish_refund(payment_id, refund)
        except Exception:  # the refund stays pending; get_refund settles it when asked
            log.exception("sandbox.refund.settle_failed", extra={"payment_id": payment_id})

    async def _finish_refund(
        self, payment_id: str, refund: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Settle a pending refund as it was asked to end, and tell the service: by a pushed
        webhook when the payment asked for them, otherwise directly."""
        result, raw = await self._settle_refund(
            keys=[self._key(payment_id), self._refunds_key(payment_id)],
            args=[refund["id"], refund["outcome"]],
        )
        if result != "ok":
            return json.loads(raw) if raw else None
        settled: dict[str, Any] = json.loads(raw)
        event_type = f"refund.{settled['status']}"
        fields = await self.session(payment_id)
        if self.pushes_webhooks(fields):
            await self._webhooks.emit(payment_id, event_type, refund=settled, fields=fields)
        elif self._events is not None:
            event = WebhookEvent(
                event_id=f"evt_sb_{secrets.token_hex(12)}",
                event_type=event_type,
                verified=True,
                payment_id=payment_id,
                refund=_refund_result(settled),
            )
            await self._events.publish(self.name, event, cause=f"sandbox:{event_type}")
        return settled

    # -- subscriptions (sandbox_subscriptions.py) -------------------------------------------

    async def sync_price(self, price: RecurringPrice, *, existing: str | None) -> str:
        self._require_enabled()
        return await self._subscriptions.sync_price(price, existing=existing)

    async def create_subscription(self, request: SubscriptionRequest) -> SubscriptionStarted:
        self._require_enabled()
        return await self._subscriptions.create(request, request.base_url)

    async def get_subscription(self, provider_subscription_id: str) -> SubscriptionState:
        self._require_enabled()
        return await self._subscriptions.get(provider_subscription_id)

    async def cancel_subscription(
        self, provider_subscription_id: str, *, at_period_end: bool, idempotency_key: str
    ) -> SubscriptionState:
        self._require_enabled()
        return await self._subscriptions.cancel(
            provider_subscription_id, at_period_end=at_period_end
        )

    async def resume_subscription(
        self, provider_subscription_id: str, *, idempotency_key: str
    ) -> SubscriptionState:
        self._require_enabled()
        return await self._subscriptions.resume(provider_subscription_id)

    async def change_subscription_price(
        self,
        provider_subscription_id: str,
        *,
        vendor_price_id: str,
        now: bool,
        prorate: bool,
        idempotency_key: str,
    ) -> SubscriptionState:
        # The sandbox never prorates: an upgrade is a new period charged in full.
        self._require_enabled()
        return await self._subscriptions.change_price(
            provider_subscription_id,
            price_id=vendor_price_id,
            now=now,
            idempotency_key=idempotency_key,
        )

    async def subscription_session(self, provider_subscription_id: str) -> dict[str, str]:
        """The sandbox's own record of a subscription, for its checkout page."""
        self._require_enabled()
        return await self._subscriptions.record(provider_subscription_id)

    async def settle_subscription(
        self, provider_subscription_id: str, outcome: CheckoutOutcome
    ) -> dict[str, str]:
        """The customer's click on the subscription's checkout page."""
        self._require_enabled()
        return await self._subscriptions.checkout(provider_subscription_id, outcome)

    async def advance_subscription(
        self, provider_subscription_id: str, outcome: RenewalOutcome
    ) -> SubscriptionState:
        """The test clock: on to the next renewal, with ``outcome``."""
        self._require_enabled()
        return await self._subscriptions.advance(provider_subscription_id, outcome)

    async def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        """Verify the HMAC signature and normalize one sandbox event.

        Body: ``{"id": "evt_...", "type": "payment.succeeded", "created": <unix time>,
        "data": {"payment_id": "sb_..."}}``; after a capture of part of the amount,
        ``payment.succeeded`` adds ``data.amount_captured`` (minor units); the refund.* events
        add ``data.refund``: ``{"id": "sbre_...", "refund_id": "rf_...", "amount": <minor
        units>, "currency": "EUR", "status": "pending" | "succeeded" | "failed"}``.
        """
        self._require_enabled()
        verify_webhook_signature(
            self._webhook_secret, body, headers.get(SIGNATURE_HEADER), now=time.time()
        )
        try:
            event = load_json(body)
            event_id, event_type = event["id"], event["type"]
            if not isinstance(event_id, str) or not isinstance(event_type, str):
                raise TypeError("an event's id and type are strings")
            data = event.get("data") or {}
            payment_id = data.get("payment_id")
            amount_captured = _positive_or_none(data.get("amount_captured"))
            refund = (
                _refund_result(data["refund"])
                if event_type.startswith(REFUND_EVENT_PREFIX)
                else None
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise InvalidWebhookPayload("The body is not a sandbox event") from error
        if not (0 < len(event_id) <= 255) or (
            payment_id is not None and not isinstance(payment_id, str)
        ):
            raise InvalidWebhookPayload("The event has no usable id or payment_id")
        return WebhookEvent(
            event_id=event_id,
            event_type=event_type,
            verified=True,
            payment_id=payment_id,
            status=_EVENT_STATUS.get(event_type),
            refund=refund,
            payment_method="sandbox" if refund is None else None,
            card=TEST_CARD if refund is None else None,
            amount_captured=amount_captured,
        )

    async def health_check(self) -> HealthStatus:
        if not self._enabled:
            return HealthStatus(healthy=False, message="disabled in production")
        started = time.perf_counter()
        await self._store.ping()
        return HealthStatus(
            healthy=True,
            message="built-in sandbox",
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
        )


def captured_part(fields: Mapping[str, str]) -> int | None:
    """What a capture of part of a session took (its record's ``captured`` below its
    ``amount``); None when all of it was taken, or nothing yet."""
    captured = fields.get("captured")
    if not captured or int(captured) >= int(fields["amount"]):
        return None
    return int(captured)


def _positive_or_none(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError("an amount is a positive integer")
    return value


def _refund_result(refund: Mapping[str, Any]) -> RefundResult:
    """The sandbox's record of a refund (as stored and as sent in its events), in our terms."""
    amount = refund["amount"]
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise ValueError("a refund's amount is a positive integer")
    return RefundResult(
        provider_refund_id=str(refund["id"]),
        amount=amount,
        status=_REFUND_STATUS.get(str(refund["status"]), RefundStatus.PENDING),
        currency=str(refund["currency"]) if refund.get("currency") else None,
        refund_id=str(refund["refund_id"]) if refund.get("refund_id") else None,
        failure_code="sandbox_refund_failed" if refund["status"] == "failed" else None,
    )


_REFUND_STATUS = {
    "pending": RefundStatus.PENDING,
    "succeeded": RefundStatus.SUCCEEDED,
    "failed": RefundStatus.FAILED,
}
