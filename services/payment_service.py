"""PaymentService: plans, ownership, idempotency and the state machine, in one place.

Routers call it; it calls the store, the providers and the receipts. It knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from models.payment import (
    CreateIntentRequest,
    IntentResponse,
    PaymentHistoryResponse,
    PaymentRecord,
    PaymentResponse,
    PaymentStatus,
    Plan,
    ProviderAttempt,
    ReceiptResponse,
    RefundListResponse,
    RefundRequest,
)
from services.errors import (
    InvalidStateTransition,
    PaymentNotFound,
    ProviderNotConfigured,
    ProviderUnavailable,
    ProviderUpstreamError,
    ReceiptNotAvailable,
    RedirectNotAllowed,
    ServiceError,
    UnknownPlan,
)
from services.idempotency import IdempotencyClaims
from services.payment_providers.base import (
    BasePaymentProvider,
    IntentRequest,
    IntentResult,
    PaymentState,
    WebhookEvent,
)
from services.payment_providers.guard import ProviderGuard
from services.payment_store import (
    IdempotencyAnswer,
    PaymentStore,
    TransitionOutcome,
)
from services.refunds import RefundAnswer, RefundService
from services.views import API_PREFIX, payment_response

if TYPE_CHECKING:
    from app.settings import Settings
    from models.user import User
    from services.payment_providers.factory import PaymentProviderFactory
    from services.provider_manager import ProviderManager
    from services.receipt_service import ReceiptService

log = logging.getLogger("payments.service")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WebhookAck:
    event_id: str
    outcome: str  # applied | unchanged | duplicate | rejected (by the state machine) | ignored


class PaymentService:
    def __init__(
        self,
        settings: Settings,
        store: PaymentStore,
        providers: ProviderManager,
        receipts: ReceiptService,
        guard: ProviderGuard,
    ) -> None:
        self._settings = settings
        self._store = store
        self._manager = providers
        self._receipts = receipts
        self._guard = guard
        self._claims = IdempotencyClaims(store, lease_s=settings.idempotency_lease_seconds)
        self._refunds = RefundService(
            store,
            lambda: self._manager.current,
            guard,
            self._claims,
            reconcile_after_s=self._reconcile_after_s,
        )
        self._background: set[asyncio.Task[None]] = set()

    @property
    def providers(self) -> PaymentProviderFactory:
        """The providers as configured now; a hot swap replaces them between requests."""
        return self._manager.current

    @property
    def manager(self) -> ProviderManager:
        return self._manager

    @property
    def store(self) -> PaymentStore:
        return self._store

    @property
    def guard(self) -> ProviderGuard:
        return self._guard

    # -- create ----------------------------------------------------------------------------

    def plan(self, code: str) -> Plan:
        try:
            return self._settings.plans[code]
        except KeyError:
            known = ", ".join(sorted(self._settings.plans))
            raise UnknownPlan(f"No plan {code!r}; plans: {known}") from None

    async def create_intent(
        self,
        body: CreateIntentRequest,
        *,
        user: User | None,
        caller: str,
        idempotency_key: str | None,
        base_url: str,
    ) -> IntentResponse:
        """Create a payment for a catalogue plan. The price is the catalogue's, never the
        client's. With an idempotency key, a replay answers the first response."""
        plan = self.plan(body.plan)
        self._check_redirects(body, base_url)
        customer = user.sub if user else (str(body.customer_email or "") or caller)
        candidates = self.providers.route(body.provider_name, customer=customer)
        if idempotency_key is None:
            return await self._create(body, plan, candidates, user, secrets.token_hex(16), base_url)

        scope = f"user:{user.sub}" if user else caller
        fingerprint = self._claims.fingerprint(
            {**body.fingerprint_fields(), "provider": body.provider_name or "default"}
        )
        stored = await self._claims.claim(scope, idempotency_key, fingerprint)
        if stored is not None:
            return IntentResponse.model_validate(stored)
        # The vendor sees a key derived from the caller's, so a retry after a crash between
        # the vendor call and our bookkeeping still finds the same vendor object.
        vendor_key = hashlib.sha256(f"{scope}\0{idempotency_key}".encode()).hexdigest()[:40]
        # The claim is renewed while the providers are tried, however long that takes: a
        # retry meanwhile waits (or hears 409) instead of creating a second payment.
        async with self._claims.held(scope, idempotency_key):
            return await self._create(
                body, plan, candidates, user, vendor_key, base_url, (scope, idempotency_key)
            )

    def _check_redirects(self, body: CreateIntentRequest, base_url: str) -> None:
        """Customers are only ever sent back to hosts the operator listed (or the service's
        own): anything else would make the checkout an open redirect."""
        allowed = self._settings.redirect_hosts or {(urlsplit(base_url).hostname or "").lower()}
        for name, url in (("return_url", body.return_url), ("cancel_url", body.cancel_url)):
            if url is None:
                continue
            host = (url.host or "").lower()
            if not any(
                host == entry or (entry.startswith(".") and host.endswith(entry))
                for entry in allowed
            ):
                raise RedirectNotAllowed(
                    f"{name} must point to one of this service's hosts (RETURN_URL_HOSTS)",
                    extra={"field": name},
                )

    async def _create(
        self,
        body: CreateIntentRequest,
        plan: Plan,
        candidates: list[BasePaymentProvider],
        user: User | None,
        vendor_key: str,
        base_url: str,
        idempotency: tuple[str, str] | None = None,
    ) -> IntentResponse:
        """Create at the first provider that can take it, then store the payment and (with a
        key) the answer to replay, in one round trip."""
        reference = f"ord_{secrets.token_hex(12)}"
        options = body.provider_options()
        request = IntentRequest(
            reference=reference,
            plan=plan,
            idempotency_key=vendor_key,
            base_url=self._settings.public_base_url or base_url,
            user_id=user.sub if user else None,
            customer_email=str(body.customer_email) if body.customer_email else None,
            return_url=str(body.return_url) if body.return_url else None,
            cancel_url=str(body.cancel_url) if body.cancel_url else None,
            options=options,
        )
        provider, result, attempts = await self._create_at_first_available(candidates, request)
        now = datetime.now(UTC)
        record = PaymentRecord(
            payment_id=result.payment_id,
            provider=provider.name,
            reference=reference,
            plan=plan.code,
            amount=plan.amount,
            currency=plan.currency,
            status=result.status,
            owner=user.sub if user else None,
            customer_email=str(body.customer_email) if body.customer_email else None,
            return_url=str(body.return_url) if body.return_url else None,
            cancel_url=str(body.cancel_url) if body.cancel_url else None,
            redirect_url=result.redirect_url,
            attempts=attempts,
            created_at=now,
            updated_at=now,
        )
        response = IntentResponse(
            payment_id=record.payment_id,
            status=record.status,
            plan=record.plan,
            amount=record.amount,
            currency=record.currency,
            provider=record.provider,
            redirect_url=result.redirect_url,
            client_secret=result.client_secret,
            publishable_key=result.publishable_key,
        )
        answer = (
            IdempotencyAnswer(idempotency[0], idempotency[1], response.model_dump(mode="json"))
            if idempotency
            else None
        )
        if not await self._store.create(
            record,
            cause="api:create-intent",
            idempotency=answer,
            reconcile_after_s=self._reconcile_after_s,
        ):
            # The vendor replayed an earlier object for this key (our first attempt stored it
            # but could not record its answer): answer with what we stored then.
            stored = await self._store.get(result.payment_id)
            if stored is not None:
                response = response.model_copy(update={"status": stored.status})
                if answer is not None:
                    await self._store.idempotency_complete(
                        IdempotencyAnswer(
                            answer.scope, answer.key, response.model_dump(mode="json")
                        )
                    )
        log.info(
            "payment.created",
            extra={"payment_id": record.payment_id, "provider": provider.name, "plan": plan.code},
        )
        return response

    async def _create_at_first_available(
        self, candidates: list[BasePaymentProvider], request: IntentRequest
    ) -> tuple[BasePaymentProvider, IntentResult, list[ProviderAttempt]]:
        """Try the candidates in order. The next one is tried only when this one surely did
        not take the request (not configured, circuit open, refused before it arrived); an
        attempt whose outcome is unknown is never followed by another provider's."""
        attempts: list[ProviderAttempt] = []
        for index, provider in enumerate(candidates):
            last = index == len(candidates) - 1
            if not self.providers.is_active(provider):
                attempts.append(
                    ProviderAttempt(
                        provider=provider.name, outcome="skipped", code=ProviderNotConfigured.code
                    )
                )
                if last:
                    first = candidates[0]
                    why = (
                        "deactivated" if first.name in self.providers.inactive else "not configured"
                    )
                    raise ProviderNotConfigured(
                        f"The {first.name} provider is {why} on this service"
                        + (" and no fallback could take the payment" if index else ""),
                        provider=first.name,
                    )
                continue
            started = time.perf_counter()
            try:
                result = await self._guard.run(
                    provider, partial(provider.create_payment_intent, request)
                )
            except ServiceError as error:
                attempts.append(
                    ProviderAttempt(
                        provider=provider.name,
                        outcome="failed",
                        code=error.code,
                        latency_ms=_ms_since(started),
                    )
                )
                if last or not isinstance(error, ProviderUnavailable) or error.outcome_unknown:
                    raise
                log.warning(
                    "payment.failover",
                    extra={
                        "from": provider.name,
                        "to": candidates[index + 1].name,
                        "code": error.code,
                        "reference": request.reference,
                    },
                )
                continue
            attempts.append(
                ProviderAttempt(
                    provider=provider.name, outcome="succeeded", latency_ms=_ms_since(started)
                )
            )
            return provider, result, attempts
        raise AssertionError("unreachable: the loop returns or raises")

    # -- read and verify -------------------------------------------------------------------

    async def _visible(self, payment_id: str, user: User | None) -> PaymentRecord:
        """The payment, if ``user`` may see it. To anyone else it does not exist."""
        return _seen_by(await self._store.get(payment_id), payment_id, user)

    async def verify(self, payment_id: str, user: User | None) -> PaymentResponse:
        """Ask the payment's provider for the truth and apply it."""
        provider = self.providers.for_payment_id(payment_id)
        record = await self._visible(payment_id, user)
        if record.status is PaymentStatus.REFUNDED:
            return payment_response(record)  # nothing can change any more
        state = await self._guard.run(provider, partial(provider.verify_payment, payment_id))
        record = await self._apply(record, state, cause="verify")
        if record.amount_pending_refund > 0:
            await self._refunds.follow_pending(record, cause="verify")
            record = await self._visible(payment_id, user)
        return payment_response(record)

    async def _apply(
        self,
        record: PaymentRecord,
        state: PaymentState,
        *,
        cause: str,
        event_id: str | None = None,
    ) -> PaymentRecord:
        """Move ``record`` to what the provider says, through the transition table."""
        updated, _ = await self._apply_with_outcome(record, state, cause=cause, event_id=event_id)
        return updated

    async def _apply_with_outcome(
        self,
        record: PaymentRecord,
        state: PaymentState,
        *,
        cause: str,
        event_id: str | None = None,
    ) -> tuple[PaymentRecord, TransitionOutcome]:
        if (
            state.status.is_paid
            and state.amount is not None
            and (
                state.amount != record.amount
                or (state.currency or record.currency).upper() != record.currency
            )
        ):
            # The provider took a different sum than the catalogue price: never call it paid.
            log.error(
                "payment.amount_mismatch",
                extra={
                    "payment_id": record.payment_id,
                    "expected": f"{record.amount} {record.currency}",
                    "provider_said": f"{state.amount} {state.currency}",
                },
            )
            raise ProviderUpstreamError(
                "The provider reports a different amount for this payment",
                provider=record.provider,
            )
        # Refunds are records of their own, moved by the provider's word on each refund: a
        # payment the provider calls (partially) refunded is, to the payment's own state, paid.
        target = state.status
        if target.is_paid:
            target = record.status if record.status.is_paid else PaymentStatus.SUCCEEDED
        if state.refunds:
            await self._refunds.sync(record, state.refunds, cause=cause)
            record = await self._store.get(record.payment_id) or record
        if event_id is None and _says_nothing_new(record, state, target):
            # A verify of a payment already as the provider says: no write, no round trip.
            return record, TransitionOutcome.UNCHANGED
        fields: dict[str, str | int | None] = {
            "capture_id": state.capture_id,
            "payment_method": state.payment_method,
        }
        result = await self._store.transition(
            record.payment_id, target, cause=cause, event_id=event_id, fields=fields
        )
        log_extra = {
            "payment_id": record.payment_id,
            "from": str(result.previous),
            "to": str(target),
            "outcome": str(result.outcome),
            "cause": cause,
        }
        if result.outcome is TransitionOutcome.REJECTED:
            log.warning("payment.transition_rejected", extra=log_extra)
        elif result.outcome is TransitionOutcome.APPLIED:
            log.info("payment.transition", extra=log_extra)
        updated = result.record
        if result.outcome is TransitionOutcome.MISSING or updated is None:
            raise PaymentNotFound(f"No payment {record.payment_id!r}")
        if state.capture_id and state.capture_id != record.capture_id:
            await self._store.add_mapping(
                record.provider, "capture", record.payment_id, state.capture_id
            )
        if updated.status.is_paid and result.outcome is TransitionOutcome.APPLIED:
            self._render_receipt_soon(updated)
        return updated, result.outcome

    @property
    def _reconcile_after_s(self) -> float | None:
        settings = self._settings
        return settings.reconcile_schedule[0] if settings.reconcile_enabled else None

    async def reconcile_payment(self, record: PaymentRecord) -> PaymentRecord:
        """What the reconciler does for one payment: ask its provider and apply the answer,
        then follow its refunds that are still pending."""
        if record.status is not PaymentStatus.REFUNDED:
            provider = self.providers.for_payment_id(record.payment_id)
            state = await self._guard.run(
                provider, partial(provider.verify_payment, record.payment_id)
            )
            record = await self._apply(record, state, cause="reconcile")
        if record.amount_pending_refund > 0:
            await self._refunds.follow_pending(record, cause="reconcile")
            record = await self._store.get(record.payment_id) or record
        return record

    async def _operate(
        self,
        provider: BasePaymentProvider,
        call: Callable[[], Awaitable[T]],
        record: PaymentRecord,
    ) -> T:
        """Run a money-moving call. When its outcome is unknown (the request may have reached
        the provider), the payment is queued to be verified again soon: the caller's retry
        or the reconciler, whichever comes first, brings our record in line."""
        try:
            return await self._guard.run(provider, call)
        except ProviderUnavailable as error:
            if error.outcome_unknown and self._reconcile_after_s is not None:
                await self._store.schedule_reconcile(
                    record.payment_id, after_s=self._reconcile_after_s
                )
                log.warning(
                    "payment.outcome_unknown",
                    extra={"payment_id": record.payment_id, "code": error.code},
                )
            raise

    async def history(self, payment_id: str, user: User) -> PaymentHistoryResponse:
        """Attempts and transitions, for the payment's owner or an admin."""
        record = await self._owned(payment_id, user)
        return PaymentHistoryResponse(
            payment_id=record.payment_id,
            status=record.status,
            provider=record.provider,
            reference=record.reference,
            attempts=record.attempts,
            transitions=await self._store.history(payment_id),
        )

    # -- capture, cancel, refund -----------------------------------------------------------

    async def capture(
        self, payment_id: str, user: User | None, *, provider_name: str | None = None
    ) -> PaymentResponse:
        """Capture an authorized payment. Capturing a paid payment again answers its state."""
        if provider_name is not None:
            expected = self.providers.get_configured(provider_name)
            if not expected.can_handle_payment_id(payment_id):
                raise PaymentNotFound(f"No {provider_name} payment {payment_id!r}")
        provider = self.providers.for_payment_id(payment_id)
        record = await self._visible(payment_id, user)
        if record.status.is_paid:
            return payment_response(record)
        if record.status in _FINAL_UNPAID:
            raise InvalidStateTransition(f"A {record.status} payment cannot be captured")
        state = await self._operate(
            provider,
            partial(provider.capture, payment_id, idempotency_key=f"capture-{payment_id}"),
            record,
        )
        return payment_response(await self._apply(record, state, cause="api:capture"))

    async def cancel(self, payment_id: str, user: User | None) -> PaymentResponse:
        provider = self.providers.for_payment_id(payment_id)
        record = await self._visible(payment_id, user)
        if record.status is PaymentStatus.CANCELED:
            return payment_response(record)
        if record.status.is_paid or record.status in _FINAL_UNPAID:
            raise InvalidStateTransition(f"A {record.status} payment cannot be canceled")
        state = await self._operate(
            provider,
            partial(provider.cancel, payment_id, idempotency_key=f"cancel-{payment_id}"),
            record,
        )
        return payment_response(await self._apply(record, state, cause="api:cancel"))

    async def refund(
        self,
        payment_id: str,
        body: RefundRequest,
        *,
        user: User,
        idempotency_key: str | None,
    ) -> RefundAnswer:
        """Refund all that is left, or ``body.amount`` of it (admins only; the router
        checks). The answer carries the refund: final (200) or pending (202)."""
        return await self._refunds.refund(
            payment_id, body, user=user, idempotency_key=idempotency_key
        )

    async def refunds(self, payment_id: str, user: User) -> RefundListResponse:
        """A payment's refunds, for its owner or an admin."""
        return await self._refunds.list(await self._owned(payment_id, user))

    # -- webhooks --------------------------------------------------------------------------

    async def handle_webhook(
        self, provider_name: str, body: bytes, headers: Mapping[str, str]
    ) -> WebhookAck:
        """Apply one provider event at most once. An event whose signature could not be
        verified is never taken at its word: it only makes us ask the provider's API, and
        never marks a later delivery as a duplicate."""
        provider = self.providers.get_configured(provider_name)
        # Checking a signature is our own work: no breaker may refuse it, and its outcome
        # says nothing about the provider's health.
        event = await self._guard.within_deadline(
            provider, partial(provider.parse_webhook, body, headers)
        )
        return await self._apply_event(provider, event)

    async def apply_provider_event(
        self, provider_name: str, event: WebhookEvent, cause: str
    ) -> None:
        """An event from a provider that lives inside this service (see LocalEvents)."""
        provider = self.providers.get_configured(provider_name)
        await self._apply_event(provider, event, cause=cause)

    async def _apply_event(
        self, provider: BasePaymentProvider, event: WebhookEvent, *, cause: str | None = None
    ) -> WebhookAck:
        record = await self._find_event_payment(provider, event)
        if record is None or (event.status is None and event.refund is None):
            log.info(
                "webhook.ignored",
                extra={
                    "provider": provider.name,
                    "event_id": event.event_id,
                    "event_type": event.event_type,
                    "known_payment": record is not None,
                },
            )
            return WebhookAck(event_id=event.event_id, outcome="ignored")
        # Only a verified event may make a later delivery of the same event a duplicate.
        dedupe_id = f"{provider.name}:{event.event_id}" if event.verified else None
        cause = cause or f"webhook:{event.event_id}"
        if event.refund is not None:
            outcome = await self._apply_refund_event(provider, record, event, cause, dedupe_id)
        else:
            if event.verified and event.status is not None:
                state = PaymentState(
                    payment_id=record.payment_id,
                    status=event.status,
                    capture_id=event.capture_id,
                )
            else:
                state = await self._guard.run(
                    provider, partial(provider.verify_payment, record.payment_id)
                )
            _, result = await self._apply_with_outcome(
                record, state, cause=cause, event_id=dedupe_id
            )
            outcome = str(result)
        log.info(
            "webhook.processed",
            extra={
                "provider": provider.name,
                "event_id": event.event_id,
                "event_type": event.event_type,
                "payment_id": record.payment_id,
                "outcome": outcome,
                "verified": event.verified,
            },
        )
        return WebhookAck(event_id=event.event_id, outcome=outcome)

    async def _apply_refund_event(
        self,
        provider: BasePaymentProvider,
        record: PaymentRecord,
        event: WebhookEvent,
        cause: str,
        dedupe_id: str | None,
    ) -> str:
        refund = event.refund
        assert refund is not None
        if not event.verified:
            refund = await self._guard.run(
                provider,
                partial(provider.get_refund, record.payment_id, refund.provider_refund_id),
            )
        applied = await self._refunds.apply(record, refund, cause=cause, event_id=dedupe_id)
        return str(applied.outcome)

    async def _find_event_payment(
        self, provider: BasePaymentProvider, event: WebhookEvent
    ) -> PaymentRecord | None:
        record = None
        if event.payment_id and provider.can_handle_payment_id(event.payment_id):
            record = await self._store.get(event.payment_id)
        if record is None and event.reference:
            record = await self._store.find_by_reference(provider.name, event.reference)
        if record is not None and record.provider != provider.name:
            return None
        return record

    # -- receipts --------------------------------------------------------------------------

    async def _owned(self, payment_id: str, user: User) -> PaymentRecord:
        """The payment, if ``user`` owns it or is an admin; to anyone else it does not exist
        (an anonymous payment is an admin's only)."""
        self.providers.for_payment_id(payment_id)
        record = await self._store.get(payment_id)
        if record is None or not (user.is_admin or record.owner == user.sub):
            raise PaymentNotFound(f"No payment {payment_id!r}")
        return record

    async def _receipt_record(self, payment_id: str, user: User) -> PaymentRecord:
        record = await self._owned(payment_id, user)
        if not record.status.is_paid:
            raise ReceiptNotAvailable(f"A {record.status} payment has no receipt")
        return record

    async def receipt(self, payment_id: str, user: User) -> ReceiptResponse:
        record = await self._receipt_record(payment_id, user)
        info = self._receipts.info(record, self._plan_of(record))
        return ReceiptResponse(
            payment_id=record.payment_id,
            receipt_number=info.receipt_number,
            plan=record.plan,
            plan_name=info.plan.name,
            amount=record.amount,
            currency=record.currency,
            amount_formatted=info.amount_formatted,
            payment_method=info.payment_method,
            status=record.status,
            paid_at=info.paid_at,
            pdf_url=f"{API_PREFIX}/receipt/{record.payment_id}/pdf",
        )

    async def receipt_pdf(self, payment_id: str, user: User) -> tuple[str, bytes]:
        # The record is read on every download: a refund that succeeded since the last one
        # changes what the receipt says (ReceiptService.key_of), on whichever worker it did.
        record = await self._receipt_record(payment_id, user)
        info = self._receipts.info(record, self._plan_of(record))
        data = await self._receipts.pdf(record, info.plan)
        return f"receipt-{info.receipt_number}.pdf", data

    def _plan_of(self, record: PaymentRecord) -> Plan:
        # A plan removed from the catalogue after the sale still gets a receipt.
        return self._settings.plans.get(record.plan) or Plan(
            code=record.plan, name=record.plan, amount=record.amount, currency=record.currency
        )

    def _render_receipt_soon(self, record: PaymentRecord) -> None:
        task = asyncio.create_task(self._render_receipt(record))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _render_receipt(self, record: PaymentRecord) -> None:
        try:
            await self._receipts.ensure(record, self._plan_of(record))
        except Exception:
            # The receipt is rendered on first download instead; nothing is lost.
            log.exception("receipt.render_failed", extra={"payment_id": record.payment_id})

    async def drain(self, grace_s: float = 30.0) -> None:
        """Let receipt renders in flight finish before shutdown."""
        if self._background:
            await asyncio.wait(self._background, timeout=grace_s)


_FINAL_UNPAID = frozenset({PaymentStatus.FAILED, PaymentStatus.CANCELED, PaymentStatus.EXPIRED})


def _says_nothing_new(record: PaymentRecord, state: PaymentState, target: PaymentStatus) -> bool:
    return (
        target is record.status
        and state.capture_id in (None, record.capture_id)
        and state.payment_method in (None, record.payment_method)
    )


def _seen_by(record: PaymentRecord | None, payment_id: str, user: User | None) -> PaymentRecord:
    """``record`` if ``user`` may see it. To anyone else it does not exist."""
    if record is None or not _may_see(record, user):
        raise PaymentNotFound(f"No payment {payment_id!r}")
    return record


def _may_see(record: PaymentRecord, user: User | None) -> bool:
    if record.owner is None:
        return True  # an anonymous payment is reached by its ID
    return user is not None and (user.is_admin or user.sub == record.owner)


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
