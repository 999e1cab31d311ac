"""Payment state: what the provider says a payment is, applied through the transition table.

The truth comes from the provider: verify, webhooks (the signature checked on the raw body
before anything is believed; an event that cannot be verified only makes us ask the provider)
and the reconciler. Each event applies once; a late event never moves a payment backwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

from models.payment import PaymentHistoryResponse, PaymentRecord, PaymentResponse, PaymentStatus
from models.user import User
from services.access import owned_by, seen_by
from services.errors import PaymentNotFound, ProviderUpstreamError
from services.metrics import WEBHOOKS_RECEIVED, outcome_of
from services.payment_providers.base import (
    BasePaymentProvider,
    CardDetails,
    PaymentState,
    WebhookEvent,
)
from services.payment_store import PaymentStore, TransitionOutcome
from services.refunds import RefundService
from services.views import payment_response

if TYPE_CHECKING:
    from services.payment_providers.factory import PaymentProviderFactory
    from services.payment_providers.guard import ProviderGuard

log = logging.getLogger("payments.state")


@dataclass(frozen=True, slots=True)
class WebhookAck:
    event_id: str
    outcome: str  # applied | unchanged | duplicate | rejected (by the state machine) | ignored


class SubscriptionEvents(Protocol):
    """Where events about a subscription or its invoice go (services/subscription_state)."""

    async def apply_event(
        self, provider: BasePaymentProvider, event: WebhookEvent, *, cause: str | None = None
    ) -> WebhookAck: ...


class PaymentStateService:
    def __init__(
        self,
        store: PaymentStore,
        providers: Callable[[], PaymentProviderFactory],
        guard: ProviderGuard,
        refunds: RefundService,
        *,
        on_paid: Callable[[PaymentRecord], None] = lambda record: None,
    ) -> None:
        self._store = store
        self._providers = providers
        self._guard = guard
        self._refunds = refunds
        self._on_paid = on_paid  # e.g. render the receipt ahead of its first download
        self._subscriptions: SubscriptionEvents | None = None

    def connect_subscriptions(self, subscriptions: SubscriptionEvents) -> None:
        """Route events that carry a subscription or an invoice there."""
        self._subscriptions = subscriptions

    @property
    def providers(self) -> PaymentProviderFactory:
        return self._providers()

    async def visible(self, payment_id: str, user: User | None) -> PaymentRecord:
        """The payment, if ``user`` may see it. To anyone else it does not exist."""
        return seen_by(await self._store.get(payment_id), payment_id, user)

    async def owned(self, payment_id: str, user: User) -> PaymentRecord:
        """The payment, if ``user`` owns it or is an admin; to anyone else it does not
        exist."""
        self.providers.for_payment_id(payment_id)
        return owned_by(await self._store.get(payment_id), payment_id, user)

    async def verify(self, payment_id: str, user: User | None) -> PaymentResponse:
        """Ask the payment's provider for the truth and apply it."""
        provider = self.providers.for_payment_id(payment_id)
        record = await self.visible(payment_id, user)
        if record.status is PaymentStatus.REFUNDED:
            return payment_response(record)  # nothing can change any more
        state = await self._guard.run(provider, partial(provider.verify_payment, payment_id))
        record = await self.apply(record, state, cause="verify")
        if record.amount_pending_refund > 0:
            await self._refunds.follow_pending(record, cause="verify")
            record = await self.visible(payment_id, user)
        return payment_response(record)

    async def apply(
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
        if state.amount_captured is not None and not 0 < state.amount_captured <= record.amount:
            log.error(
                "payment.captured_amount_mismatch",
                extra={
                    "payment_id": record.payment_id,
                    "expected_at_most": record.amount,
                    "provider_said": state.amount_captured,
                },
            )
            raise ProviderUpstreamError(
                "The provider reports a captured amount this payment cannot have",
                provider=record.provider,
            )
        # Refunds are records of their own, moved by the provider's word on each refund: a
        # payment the provider calls (partially) refunded is, to the payment's own state, paid.
        target = state.status
        if target.is_paid:
            target = record.status if record.status.is_paid else PaymentStatus.SUCCEEDED
        if state.refunds and await self._refunds.sync(record, state.refunds, cause=cause):
            record = await self._store.get(record.payment_id) or record
        if event_id is None and _says_nothing_new(record, state, target):
            # A verify of a payment already as the provider says: no write, no round trip.
            return record, TransitionOutcome.UNCHANGED
        fields: dict[str, str | int | None] = {
            "capture_id": state.capture_id,
            "payment_method": state.payment_method,
            # Only a capture of part of the amount is recorded: refunds are limited to it.
            "amount_captured": _partial_capture(record, state),
            **_card_fields(state.card),
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
            self._on_paid(updated)
        return updated, result.outcome

    async def reconcile_payment(self, record: PaymentRecord) -> PaymentRecord:
        """What the reconciler does for one payment: ask its provider and apply the answer,
        then follow its refunds that are still pending."""
        if record.status is not PaymentStatus.REFUNDED:
            provider = self.providers.for_payment_id(record.payment_id)
            state = await self._guard.run(
                provider, partial(provider.verify_payment, record.payment_id)
            )
            record = await self.apply(record, state, cause="reconcile")
        if record.amount_pending_refund > 0:
            await self._refunds.follow_pending(record, cause="reconcile")
            record = await self._store.get(record.payment_id) or record
        return record

    async def history(self, payment_id: str, user: User) -> PaymentHistoryResponse:
        """Attempts and transitions, for the payment's owner or an admin."""
        record = await self.owned(payment_id, user)
        return PaymentHistoryResponse(
            payment_id=record.payment_id,
            status=record.status,
            provider=record.provider,
            reference=record.reference,
            attempts=record.attempts,
            transitions=await self._store.history(payment_id),
        )

    async def handle_webhook(
        self, provider_name: str, body: bytes, headers: Mapping[str, str]
    ) -> WebhookAck:
        """Apply one provider event at most once. An event whose signature could not be
        verified is never taken at its word: it only makes us ask the provider's API, and
        never marks a later delivery as a duplicate."""
        try:
            provider = self.providers.get_configured(provider_name)
            # Checking a signature is our own work: no breaker may refuse it, and its outcome
            # says nothing about the provider's health.
            event = await self._guard.within_deadline(
                provider, partial(provider.parse_webhook, body, headers)
            )
            ack = await self._apply_event(provider, event)
        except BaseException as error:
            # A label per provider this service has; any other name sent to the route is
            # "unknown", so that made-up names cannot grow the metric without bound.
            known = any(p.name == provider_name for p in self.providers.providers())
            label = provider_name if known else "unknown"
            WEBHOOKS_RECEIVED.labels(label, outcome_of(error)).inc()
            raise
        WEBHOOKS_RECEIVED.labels(provider_name, ack.outcome).inc()
        return ack

    async def apply_provider_event(
        self, provider_name: str, event: WebhookEvent, cause: str
    ) -> None:
        """An event from a provider that lives inside this service (see LocalEvents)."""
        provider = self.providers.get_configured(provider_name)
        await self._apply_event(provider, event, cause=cause)

    async def _apply_event(
        self, provider: BasePaymentProvider, event: WebhookEvent, *, cause: str | None = None
    ) -> WebhookAck:
        if self._subscriptions is not None and (
            event.subscription is not None or event.invoice is not None
        ):
            return await self._subscriptions.apply_event(provider, event, cause=cause)
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
                    amount_captured=event.amount_captured,
                    capture_id=event.capture_id,
                    payment_method=event.payment_method,
                    card=event.card,
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


def _partial_capture(record: PaymentRecord, state: PaymentState) -> int | None:
    captured = state.amount_captured
    return captured if captured is not None and captured < record.amount else None


def _says_nothing_new(record: PaymentRecord, state: PaymentState, target: PaymentStatus) -> bool:
    card = state.card
    return (
        target is record.status
        and state.capture_id in (None, record.capture_id)
        and state.payment_method in (None, record.payment_method)
        and _partial_capture(record, state) in (None, record.amount_captured)
        and (
            card is None
            or (
                card.brand in (None, record.card_brand)
                and card.last4 in (None, record.card_last4)
                and card.wallet in (None, record.wallet)
            )
        )
    )


def _card_fields(card: CardDetails | None) -> dict[str, str | None]:
    if card is None:
        return {}
    return {"card_brand": card.brand, "card_last4": card.last4, "wallet": card.wallet}
