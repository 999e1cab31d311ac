"""Subscription state: what the provider says a subscription is, applied once per event and
never backwards, and every paid invoice recorded as a payment linked to it.

The truth comes from the provider: its events (an unverified one only makes us ask its API,
``get_subscription``), the answers to our own calls, and the reconciler's reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from models.payment import PaymentRecord, PaymentStatus
from models.subscription import SubscriptionRecord, SubscriptionStatus
from services.errors import SubscriptionNotFound
from services.payment_providers.base import (
    BasePaymentProvider,
    InvoicePayment,
    SubscriptionState,
    WebhookEvent,
)
from services.payment_state import WebhookAck
from services.payment_store import PaymentStore
from services.plan_sync import PlanSync, parse_price_key
from services.subscription_store import ApplyOutcome, SubscriptionStore, text_of

if TYPE_CHECKING:
    from services.payment_providers.factory import PaymentProviderFactory
    from services.payment_providers.guard import ProviderGuard

log = logging.getLogger("payments.subscriptions")

SUBSCRIPTION_PREFIX = "sub_"


class SubscriptionStateService:
    def __init__(
        self,
        store: SubscriptionStore,
        payments: PaymentStore,
        providers: Callable[[], PaymentProviderFactory],
        guard: ProviderGuard,
        plan_sync: PlanSync,
        *,
        on_paid: Callable[[PaymentRecord], None] = lambda record: None,
    ) -> None:
        self._store = store
        self._payments = payments
        self._providers = providers
        self._guard = guard
        self._plan_sync = plan_sync
        self._on_paid = on_paid  # render the invoice payment's receipt ahead of its download

    async def apply(
        self,
        record: SubscriptionRecord,
        state: SubscriptionState,
        *,
        cause: str,
        event_id: str | None = None,
        event_at: datetime | None = None,
        invoice: InvoicePayment | None = None,
        extra: dict[str, str | None] | None = None,
    ) -> tuple[SubscriptionRecord, ApplyOutcome]:
        """Move ``record`` to what the provider says; record ``invoice`` (or the state's
        latest) as a payment if it was paid."""
        fields: dict[str, str | None] = {
            "provider_subscription_id": state.provider_subscription_id,
            "current_period_start": text_of(state.current_period_start),
            "current_period_end": text_of(state.current_period_end),
            "cancel_at_period_end": text_of(state.cancel_at_period_end),
            "vendor_price_id": state.vendor_price_id,
            **(extra or {}),
        }
        billed = await self._billed_price(record.provider, state.vendor_price_id)
        if billed is not None:
            plan, amount = billed
            fields |= {"plan": plan, "amount": str(amount)}
            if plan == record.pending_plan:
                fields["pending_plan"] = ""  # the downgrade has taken effect
        if event_at is not None and (record.vendor_time is None or event_at > record.vendor_time):
            fields["vendor_time"] = event_at.isoformat()
        applied = await self._store.apply(
            record.subscription_id,
            state.status,
            cause=cause,
            event_id=event_id,
            period_end=state.current_period_end,
            event_at=event_at,
            past_due_since=event_at,
            fields=fields,
        )
        log_extra = {
            "subscription_id": record.subscription_id,
            "from": str(applied.previous),
            "to": str(state.status),
            "outcome": str(applied.outcome),
            "cause": cause,
        }
        if applied.outcome in (ApplyOutcome.REJECTED, ApplyOutcome.STALE):
            log.warning("subscription.transition_refused", extra=log_extra)
        elif applied.outcome is ApplyOutcome.APPLIED:
            log.info("subscription.transition", extra=log_extra)
        updated = applied.record
        if applied.outcome is ApplyOutcome.MISSING or updated is None:
            raise SubscriptionNotFound(f"No subscription {record.subscription_id!r}")
        if state.provider_subscription_id != record.provider_subscription_id:
            await self._payments.link(
                record.provider,
                "subscription",
                record.subscription_id,
                state.provider_subscription_id,
            )
        paid = invoice or state.latest_invoice
        if paid is not None and paid.paid and applied.outcome is not ApplyOutcome.DUPLICATE:
            await self.record_invoice(updated, paid)
        return updated, applied.outcome

    async def _billed_price(
        self, provider: str, vendor_price_id: str | None
    ) -> tuple[str, int] | None:
        """(plan, amount) of the price the vendor bills now, when it is one of ours."""
        if not vendor_price_id:
            return None
        key = await self._plan_sync.price_key_of(provider, vendor_price_id)
        if key is None:
            return None
        plan, _, amount = parse_price_key(key)
        return plan, amount

    async def record_invoice(self, record: SubscriptionRecord, invoice: InvoicePayment) -> None:
        """A paid invoice or renewal: a payment of the subscription's owner, with its receipt,
        refundable like any payment. Once per provider invoice id."""
        provider = record.provider
        existing = await self._payments.find_by_reference(provider, invoice.provider_invoice_id)
        if existing is not None:
            await self._store.record_invoice(
                record.subscription_id, invoice.provider_invoice_id, existing.payment_id
            )
            return
        now = datetime.now(UTC)
        currency = invoice.currency.upper()
        if currency != record.currency or invoice.amount != record.amount:
            # Prorations and plan changes bill other sums: recorded as the vendor charged.
            log.info(
                "subscription.invoice_amount",
                extra={
                    "subscription_id": record.subscription_id,
                    "price": f"{record.amount} {record.currency}",
                    "invoiced": f"{invoice.amount} {currency}",
                },
            )
        payment = PaymentRecord(
            payment_id=invoice.payment_id or invoice.provider_invoice_id,
            provider=provider,
            reference=invoice.provider_invoice_id,
            plan=record.plan,
            amount=invoice.amount,
            currency=currency,
            status=PaymentStatus.SUCCEEDED,
            owner=record.owner,
            customer_email=record.customer_email,
            created_at=now,
            updated_at=now,
            paid_at=now,
            test_mode=record.test_mode,
            subscription_id=record.subscription_id,
            period_start=invoice.period_start,
            period_end=invoice.period_end,
        )
        created = await self._payments.create(
            payment, cause=f"subscription:{record.subscription_id}"
        )
        await self._store.record_invoice(
            record.subscription_id, invoice.provider_invoice_id, payment.payment_id
        )
        if created:
            log.info(
                "subscription.invoice_paid",
                extra={
                    "subscription_id": record.subscription_id,
                    "payment_id": payment.payment_id,
                    "invoice": invoice.provider_invoice_id,
                },
            )
            self._on_paid(payment)

    # -- events ----------------------------------------------------------------------------

    async def apply_event(
        self, provider: BasePaymentProvider, event: WebhookEvent, *, cause: str | None = None
    ) -> WebhookAck:
        """One provider event about a subscription (or its invoice), at most once. An
        unverified one is never taken at its word: the subscription is read again from the
        provider, by the id we stored."""
        record = await self._find(provider, event.subscription)
        if record is None:
            log.info(
                "webhook.ignored",
                extra={
                    "provider": provider.name,
                    "event_id": event.event_id,
                    "event_type": event.event_type,
                    "known_subscription": False,
                },
            )
            return WebhookAck(event_id=event.event_id, outcome="ignored")
        cause = cause or f"webhook:{event.event_id}"
        if event.verified and event.subscription is not None:
            state, invoice = event.subscription, event.invoice
            dedupe_id: str | None = f"{provider.name}:{event.event_id}"
            event_at = event.occurred_at
        else:
            state = await self._guard.run(
                provider, partial(provider.get_subscription, record.provider_subscription_id)
            )
            invoice, dedupe_id, event_at = None, None, None
        _, outcome = await self.apply(
            record, state, cause=cause, event_id=dedupe_id, event_at=event_at, invoice=invoice
        )
        log.info(
            "webhook.processed",
            extra={
                "provider": provider.name,
                "event_id": event.event_id,
                "event_type": event.event_type,
                "subscription_id": record.subscription_id,
                "outcome": str(outcome),
                "verified": event.verified,
            },
        )
        return WebhookAck(event_id=event.event_id, outcome=str(outcome))

    async def _find(
        self, provider: BasePaymentProvider, state: SubscriptionState | None
    ) -> SubscriptionRecord | None:
        if state is None:
            return None
        record = None
        ours = state.subscription_id
        if ours and ours.startswith(SUBSCRIPTION_PREFIX):
            record = await self._store.get(ours)
        if record is None:
            found = await self._payments.local_id(
                provider.name, "subscription", state.provider_subscription_id
            )
            record = await self._store.get(found) if found else None
        if record is not None and record.provider != provider.name:
            return None
        return record

    # -- reconciliation --------------------------------------------------------------------

    def follows(self, some_id: str) -> bool:
        """Whether a reconciliation queue entry is a subscription's."""
        return some_id.startswith(SUBSCRIPTION_PREFIX)

    async def reconcile(
        self, subscription_id: str, step: int, schedule_s: list[float]
    ) -> tuple[str, tuple[float, int] | None]:
        """Read the subscription from its provider and apply it: (its status, when and at
        which step to look again, or None to stop following it). A live one is followed on
        the schedule, then again at each renewal."""
        record = await self._store.get(subscription_id)
        if record is None:
            return "missing", None
        if not record.status.is_final:
            provider = self._providers().get_configured(record.provider)
            state = await self._guard.run(
                provider, partial(provider.get_subscription, record.provider_subscription_id)
            )
            record, _ = await self.apply(record, state, cause="reconcile")
        if record.status.is_final:
            return str(record.status), None
        if step + 1 < len(schedule_s):
            return str(record.status), (schedule_s[step + 1], step + 1)
        if record.current_period_end is None or record.status is SubscriptionStatus.INCOMPLETE:
            return str(record.status), None  # never started: nothing renews
        until_renewal = (record.current_period_end - datetime.now(UTC)).total_seconds()
        return str(record.status), (max(until_renewal, 0.0) + schedule_s[0], 0)
