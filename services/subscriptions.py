"""Subscriptions as the API offers them: start one (once per Idempotency-Key), read, cancel,
resume, change plan, the vendor's portal, and the entitlements they give.

Plan changes cannot be gamed: an upgrade takes effect now and is charged in full for the new
plan at once (no proration credit), a downgrade takes effect at renewal; SUBSCRIPTION_PRORATION
=vendor lets the vendor prorate an upgrade instead.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from models.subscription import (
    ENTITLED,
    BillingInterval,
    CreateSubscriptionRequest,
    Entitlement,
    EntitlementsResponse,
    PortalResponse,
    SubscriptionHistoryResponse,
    SubscriptionListResponse,
    SubscriptionRecord,
    SubscriptionResponse,
    SubscriptionStatus,
)
from models.user import User
from services.catalogue import Catalogue
from services.errors import (
    CurrencyNotOffered,
    InvalidSubscriptionState,
    OperationNotSupported,
    PermissionDenied,
    PlanChangeNotAllowed,
    RedirectNotAllowed,
    SubscriptionNotFound,
)
from services.idempotency import IdempotencyClaims
from services.payment_providers.base import (
    BasePaymentProvider,
    Capability,
    RecurringPrice,
    SubscriptionRequest,
)
from services.payment_store import IdempotencyAnswer, PaymentStore
from services.plan_sync import PlanSync
from services.subscription_state import SubscriptionStateService
from services.subscription_store import SubscriptionStore

if TYPE_CHECKING:
    from services.payment_providers.factory import PaymentProviderFactory
    from services.payment_providers.guard import ProviderGuard

log = logging.getLogger("payments.subscriptions")

Proration = Literal["none", "vendor"]
_LIVE = (SubscriptionStatus.TRIALING, SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    public_base_url: str | None
    redirect_hosts: frozenset[str]
    reconcile_after_s: float | None  # when a new subscription is first read again
    grace_days: int = 7  # SUBSCRIPTION_GRACE_DAYS
    proration: Proration = "none"  # SUBSCRIPTION_PRORATION


@dataclass(frozen=True, slots=True)
class SubscriptionAnswer:
    response: SubscriptionResponse
    replayed: bool = False


class SubscriptionService:
    def __init__(
        self,
        config: SubscriptionConfig,
        catalogue: Catalogue,
        store: SubscriptionStore,
        payments: PaymentStore,
        providers: Callable[[], PaymentProviderFactory],
        guard: ProviderGuard,
        claims: IdempotencyClaims,
        plan_sync: PlanSync,
        state: SubscriptionStateService,
    ) -> None:
        self._config = config
        self._catalogue = catalogue
        self._store = store
        self._payments = payments
        self._providers = providers
        self._guard = guard
        self._claims = claims
        self._plan_sync = plan_sync
        self._state = state

    # -- start -----------------------------------------------------------------------------

    async def create(
        self,
        body: CreateSubscriptionRequest,
        *,
        user: User,
        idempotency_key: str | None,
        base_url: str,
    ) -> SubscriptionAnswer:
        """Start a subscription to a recurring plan at the catalogue's price: ``incomplete``
        until the customer completes the vendor's page (``redirect_url``)."""
        price = self._catalogue.recurring_price(body.plan, body.currency)
        self._check_redirects(body, base_url)
        provider = self._biller(body.provider, price.plan.currency)
        if idempotency_key is None:
            return SubscriptionAnswer(
                await self._create(body, price, provider, user, secrets.token_hex(16), base_url)
            )
        scope = f"subscribe:{user.sub}"
        fingerprint = self._claims.fingerprint(body.fingerprint_fields())
        stored = await self._claims.claim(scope, idempotency_key, fingerprint)
        if stored is not None:
            return SubscriptionAnswer(SubscriptionResponse.model_validate(stored), replayed=True)
        vendor_key = hashlib.sha256(f"{scope}\0{idempotency_key}".encode()).hexdigest()[:40]
        async with self._claims.held(scope, idempotency_key):
            response = await self._create(body, price, provider, user, vendor_key, base_url)
            await self._payments.idempotency_complete(
                IdempotencyAnswer(scope, idempotency_key, response.model_dump(mode="json"))
            )
        return SubscriptionAnswer(response)

    def _biller(self, requested: str | None, currency: str) -> BasePaymentProvider:
        factory = self._providers()
        provider = factory.route(requested, currency=currency)[0]
        factory.get_configured(provider.name)
        if Capability.SUBSCRIPTIONS not in provider.capabilities:
            raise OperationNotSupported(
                f"The {provider.name} provider does not bill subscriptions",
                extra={"provider": provider.name},
            )
        return provider

    def _check_redirects(self, body: CreateSubscriptionRequest, base_url: str) -> None:
        """As create-intent: customers are only sent back to hosts the operator listed."""
        allowed = self._config.redirect_hosts or {(urlsplit(base_url).hostname or "").lower()}
        for name, url in (("return_url", body.return_url), ("cancel_url", body.cancel_url)):
            host = (url.host or "").lower() if url is not None else None
            if host is not None and not any(
                host == entry or (entry.startswith(".") and host.endswith(entry))
                for entry in allowed
            ):
                raise RedirectNotAllowed(
                    f"{name} must point to one of this service's hosts (RETURN_URL_HOSTS)",
                    extra={"field": name},
                )

    async def _create(
        self,
        body: CreateSubscriptionRequest,
        price: RecurringPrice,
        provider: BasePaymentProvider,
        user: User,
        vendor_key: str,
        base_url: str,
    ) -> SubscriptionResponse:
        # Ours derives from the vendor key: a retry after a crash finds the same record.
        subscription_id = f"sub_{hashlib.sha256(vendor_key.encode()).hexdigest()[:24]}"
        vendor_price_id = await self._plan_sync.vendor_price(provider, price)
        request = SubscriptionRequest(
            subscription_id=subscription_id,
            price=price,
            idempotency_key=vendor_key,
            base_url=self._config.public_base_url or base_url,
            vendor_price_id=vendor_price_id,
            user_id=user.sub,
            customer_email=user.email,
            return_url=str(body.return_url) if body.return_url else None,
            cancel_url=str(body.cancel_url) if body.cancel_url else None,
        )
        started = await self._guard.run(provider, partial(provider.create_subscription, request))
        now = datetime.now(UTC)
        record = SubscriptionRecord(
            subscription_id=subscription_id,
            provider=provider.name,
            provider_subscription_id=started.provider_subscription_id,
            owner=user.sub,
            plan=price.plan.code,
            currency=price.plan.currency,
            amount=price.plan.amount,
            interval=price.interval,
            interval_count=price.interval_count,
            trial_days=price.trial_days,
            status=SubscriptionStatus.INCOMPLETE,
            vendor_price_id=vendor_price_id,
            customer_email=user.email,
            return_url=request.return_url,
            cancel_url=request.cancel_url,
            redirect_url=started.redirect_url,
            test_mode=provider.test_mode,
            created_at=now,
            updated_at=now,
        )
        if await self._store.create(record, cause="api:subscribe"):
            await self._payments.link(
                provider.name, "subscription", subscription_id, started.provider_subscription_id
            )
            if self._config.reconcile_after_s is not None:
                await self._payments.schedule_reconcile(
                    subscription_id, after_s=self._config.reconcile_after_s
                )
            log.info(
                "subscription.created",
                extra={
                    "subscription_id": subscription_id,
                    "provider": provider.name,
                    "plan": price.plan.code,
                },
            )
        stored = await self._store.get(subscription_id) or record
        return await self._response(stored)

    # -- read ------------------------------------------------------------------------------

    async def _owned(self, subscription_id: str, user: User) -> SubscriptionRecord:
        """The subscription, if ``user`` owns it or is an admin; to anyone else it does not
        exist."""
        record = None
        if subscription_id.startswith("sub_"):
            record = await self._store.get(subscription_id)
        if record is None or not (user.is_admin or record.owner == user.sub):
            raise SubscriptionNotFound(f"No subscription {subscription_id!r}")
        return record

    async def _response(self, record: SubscriptionRecord) -> SubscriptionResponse:
        return SubscriptionResponse(
            subscription_id=record.subscription_id,
            status=record.status,
            plan=record.plan,
            amount=record.amount,
            currency=record.currency,
            interval=record.interval,
            interval_count=record.interval_count,
            trial_days=record.trial_days,
            provider=record.provider,
            current_period_start=record.current_period_start,
            current_period_end=record.current_period_end,
            cancel_at_period_end=record.cancel_at_period_end,
            pending_plan=record.pending_plan,
            redirect_url=(
                record.redirect_url if record.status is SubscriptionStatus.INCOMPLETE else None
            ),
            payments=await self._store.invoices(record.subscription_id),
            created_at=record.created_at,
        )

    async def view(self, subscription_id: str, user: User) -> SubscriptionResponse:
        return await self._response(await self._owned(subscription_id, user))

    async def mine(self, user: User) -> SubscriptionListResponse:
        records = await self._store.of_owner(user.sub)
        return SubscriptionListResponse(
            subscriptions=[await self._response(record) for record in records]
        )

    async def history(self, subscription_id: str, user: User) -> SubscriptionHistoryResponse:
        record = await self._owned(subscription_id, user)
        return SubscriptionHistoryResponse(
            subscription_id=record.subscription_id,
            status=record.status,
            transitions=await self._store.history(subscription_id),
        )

    # -- change ----------------------------------------------------------------------------

    def _provider_of(self, record: SubscriptionRecord) -> BasePaymentProvider:
        return self._providers().get_configured(record.provider)

    def _key(self, record: SubscriptionRecord, action: str) -> str:
        """The vendor's idempotency key for one action on the subscription as it is now: a
        retry meanwhile is the same call, a later action a new one."""
        seed = f"{record.subscription_id}\0{action}\0{record.updated_at.isoformat()}"
        return hashlib.sha256(seed.encode()).hexdigest()[:40]

    async def cancel(
        self, subscription_id: str, user: User, *, at_period_end: bool
    ) -> SubscriptionResponse:
        record = await self._owned(subscription_id, user)
        if record.status.is_final:
            return await self._response(record)  # canceling twice answers the first result
        provider = self._provider_of(record)
        state = await self._guard.run(
            provider,
            partial(
                provider.cancel_subscription,
                record.provider_subscription_id,
                at_period_end=at_period_end,
                idempotency_key=self._key(record, f"cancel:{at_period_end}"),
            ),
        )
        updated, _ = await self._state.apply(record, state, cause="api:cancel")
        return await self._response(updated)

    async def resume(self, subscription_id: str, user: User) -> SubscriptionResponse:
        record = await self._owned(subscription_id, user)
        if record.status not in _LIVE or not record.cancel_at_period_end:
            raise InvalidSubscriptionState(
                "Only a subscription set to cancel at the period's end can resume, before then",
                extra={"subscription_status": str(record.status)},
            )
        provider = self._provider_of(record)
        state = await self._guard.run(
            provider,
            partial(
                provider.resume_subscription,
                record.provider_subscription_id,
                idempotency_key=self._key(record, "resume"),
            ),
        )
        updated, _ = await self._state.apply(record, state, cause="api:resume")
        return await self._response(updated)

    async def change_plan(
        self, subscription_id: str, user: User, plan: str
    ) -> SubscriptionResponse:
        """An upgrade (more per month) now, charged in full at once; a downgrade at renewal."""
        record = await self._owned(subscription_id, user)
        if record.status not in (SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING):
            raise InvalidSubscriptionState(
                "Only an active or trialing subscription changes plan",
                extra={"subscription_status": str(record.status)},
            )
        if plan in (record.plan, record.pending_plan):
            raise PlanChangeNotAllowed(f"The subscription is already on plan {plan!r}")
        entry = self._catalogue.entry(plan)
        if record.currency not in entry.prices:
            raise CurrencyNotOffered(
                f"Plan {plan!r} has no price in {record.currency}, the subscription's currency",
                extra={"currency": record.currency, "offered": list(entry.currencies)},
            )
        price = self._catalogue.recurring_price(plan, record.currency)
        provider = self._provider_of(record)
        vendor_price_id = await self._plan_sync.vendor_price(provider, price)
        upgrade = _monthly(price.plan.amount, price.interval, price.interval_count) > _monthly(
            record.amount, record.interval, record.interval_count
        )
        state = await self._guard.run(
            provider,
            partial(
                provider.change_subscription_price,
                record.provider_subscription_id,
                vendor_price_id=vendor_price_id,
                now=upgrade,
                prorate=upgrade and self._config.proration == "vendor",
                idempotency_key=self._key(record, f"change:{plan}"),
            ),
        )
        extra: dict[str, str | None] = {} if upgrade else {"pending_plan": plan}
        if upgrade:
            extra["interval"] = str(price.interval)
            extra["interval_count"] = str(price.interval_count)
        updated, _ = await self._state.apply(
            record, state, cause=f"api:change-plan:{plan}", extra=extra
        )
        log.info(
            "subscription.plan_change",
            extra={
                "subscription_id": subscription_id,
                "from": record.plan,
                "to": plan,
                "when": "now" if upgrade else "renewal",
            },
        )
        response = await self._response(updated)
        if state.approval_url:
            # The vendor bills the new price only once the customer approves it there (PayPal):
            # send the customer to that page.
            response = response.model_copy(update={"approval_url": state.approval_url})
        return response

    async def portal(self, subscription_id: str, user: User, base_url: str) -> PortalResponse:
        record = await self._owned(subscription_id, user)
        provider = self._provider_of(record)
        return_url = record.return_url or (self._config.public_base_url or base_url)
        url = await self._guard.run(
            provider,
            partial(
                provider.customer_portal_url,
                record.provider_subscription_id,
                return_url=return_url,
            ),
        )
        return PortalResponse(url=url)

    # -- entitlements ----------------------------------------------------------------------

    async def entitlements(self, user: User, of_user: str | None = None) -> EntitlementsResponse:
        """Which plans a user may use now: active and trialing subscriptions, and past_due
        ones within the grace period (counted to the later of now and the vendor's clock).
        Admins may ask about any user."""
        who = user.sub
        if of_user is not None and of_user != user.sub:
            if not user.is_admin:
                raise PermissionDenied("Only administrators may ask about another user")
            who = of_user
        grace = timedelta(days=self._config.grace_days)
        entitlements = []
        for record in await self._store.of_owner(who):
            until: datetime | None = None
            if record.status in ENTITLED:
                until = record.current_period_end
            elif record.status is SubscriptionStatus.PAST_DUE:
                since = record.past_due_since or record.updated_at
                now = max(datetime.now(UTC), record.vendor_time or since)
                if now - since >= grace:
                    continue
                until = since + grace
            else:
                continue
            entitlements.append(
                Entitlement(
                    plan=record.plan,
                    subscription_id=record.subscription_id,
                    status=record.status,
                    until=until,
                )
            )
        return EntitlementsResponse(
            user=who,
            plans=sorted({item.plan for item in entitlements}),
            entitlements=entitlements,
        )


def _monthly(amount: int, interval: BillingInterval, count: int) -> float:
    """A price per month, to tell an upgrade from a downgrade (never charged)."""
    months = count * (12 if interval is BillingInterval.YEAR else 1)
    return amount / months
