"""Checkout: creating a payment for a catalogue plan, once per Idempotency-Key, at the first
provider that can take it.

Failover goes to the next provider only when this one surely did not take the request; an
attempt whose outcome is unknown is never followed by another provider's.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from models.payment import (
    CataloguePlanResponse,
    CreateIntentRequest,
    IntentResponse,
    PaymentRecord,
    Plan,
    PlanListResponse,
    PlanPrice,
    ProviderAttempt,
)
from models.user import User
from services.catalogue import Catalogue
from services.errors import (
    ProviderNotConfigured,
    ProviderUnavailable,
    RedirectNotAllowed,
    ServiceError,
)
from services.idempotency import IdempotencyClaims
from services.money import format_amount
from services.payment_providers.base import BasePaymentProvider, IntentRequest, IntentResult
from services.payment_store import IdempotencyAnswer, PaymentStore
from services.tax import Sale, TaxPolicy

if TYPE_CHECKING:
    from services.payment_providers.factory import PaymentProviderFactory
    from services.payment_providers.guard import ProviderGuard

log = logging.getLogger("payments.checkout")


@dataclass(frozen=True, slots=True)
class CheckoutConfig:
    public_base_url: str | None  # how customers reach us; the request's own base when None
    redirect_hosts: frozenset[str]  # where return/cancel URLs may point; empty: our own host
    reconcile_after_s: float | None  # when an open payment is first checked again


@dataclass(frozen=True, slots=True)
class IntentAnswer:
    response: IntentResponse
    replayed: bool = False  # the answer stored for this Idempotency-Key, not a new payment


class CheckoutService:
    def __init__(
        self,
        config: CheckoutConfig,
        catalogue: Catalogue,
        store: PaymentStore,
        providers: Callable[[], PaymentProviderFactory],
        guard: ProviderGuard,
        claims: IdempotencyClaims,
        *,
        tax: TaxPolicy | None = None,
    ) -> None:
        self._config = config
        self._tax = tax or TaxPolicy()
        self._catalogue = catalogue
        self._store = store
        self._providers = providers
        self._guard = guard
        self._claims = claims

    @property
    def providers(self) -> PaymentProviderFactory:
        """The providers as configured now; a hot swap replaces them between requests."""
        return self._providers()

    def price_list(self) -> PlanListResponse:
        """Every plan with its prices and the providers that can take each currency now."""
        providers = self.providers
        takers = {
            currency: providers.takers(currency)
            for entry in self._catalogue.plans()
            for currency in entry.currencies
        }
        return PlanListResponse(
            plans=[
                CataloguePlanResponse(
                    code=entry.code,
                    name=entry.name,
                    default_currency=entry.currencies[0],
                    prices=[
                        PlanPrice(
                            currency=currency,
                            amount=amount,
                            amount_formatted=format_amount(amount, currency),
                            providers=takers[currency],
                        )
                        for currency, amount in entry.prices.items()
                    ],
                    interval=entry.interval,
                    interval_count=entry.interval_count if entry.recurring else None,
                    trial_days=entry.trial_days if entry.recurring else None,
                )
                for entry in self._catalogue.plans()
            ]
        )

    async def create_intent(
        self,
        body: CreateIntentRequest,
        *,
        user: User | None,
        caller: str,
        idempotency_key: str | None,
        base_url: str,
    ) -> IntentAnswer:
        """Create a payment for a catalogue plan. The price is the catalogue's, never the
        client's. With an idempotency key, a replay answers the first response."""
        plan = self._catalogue.plan(body.plan, body.currency)
        self._check_redirects(body, base_url)
        customer = user.sub if user else (str(body.customer_email or "") or caller)
        candidates = self.providers.route(
            body.provider_name, currency=plan.currency, customer=customer
        )
        if idempotency_key is None:
            return IntentAnswer(
                await self._create(body, plan, candidates, user, secrets.token_hex(16), base_url)
            )

        scope = f"user:{user.sub}" if user else caller
        fingerprint = self._claims.fingerprint(
            {**body.fingerprint_fields(), "provider": body.provider_name or "default"}
        )
        stored = await self._claims.claim(scope, idempotency_key, fingerprint)
        if stored is not None:
            return IntentAnswer(IntentResponse.model_validate(stored), replayed=True)
        # The vendor sees a key derived from the caller's, so a retry after a crash between
        # the vendor call and our bookkeeping still finds the same vendor object.
        vendor_key = hashlib.sha256(f"{scope}\0{idempotency_key}".encode()).hexdigest()[:40]
        # The claim is renewed while the providers are tried, however long that takes: a
        # retry meanwhile waits (or hears 409) instead of creating a second payment.
        async with self._claims.held(scope, idempotency_key):
            return IntentAnswer(
                await self._create(
                    body, plan, candidates, user, vendor_key, base_url, (scope, idempotency_key)
                )
            )

    def _check_redirects(self, body: CreateIntentRequest, base_url: str) -> None:
        """Customers are only ever sent back to hosts the operator listed (or the service's
        own): anything else would make the checkout an open redirect."""
        allowed = self._config.redirect_hosts or {(urlsplit(base_url).hostname or "").lower()}
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
        # Tax is decided once, here, and recorded for the receipt; where prices exclude it
        # the provider charges the price with tax added.
        sale = self._tax.sale(plan, body.buyer)
        plan = sale.charged(plan)
        options = body.provider_options()
        # The client's email, else the signed-in user's from the token (vendors that need one
        # refuse without it: CustomerEmailRequired).
        customer_email = (
            str(body.customer_email) if body.customer_email else (user.email if user else None)
        )
        request = IntentRequest(
            reference=reference,
            plan=plan,
            idempotency_key=vendor_key,
            base_url=self._config.public_base_url or base_url,
            user_id=user.sub if user else None,
            customer_email=customer_email,
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
            customer_email=customer_email,
            return_url=str(body.return_url) if body.return_url else None,
            cancel_url=str(body.cancel_url) if body.cancel_url else None,
            redirect_url=result.redirect_url,
            attempts=attempts,
            created_at=now,
            updated_at=now,
            **_receipt_facts(body, sale, test_mode=provider.test_mode),
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
            reconcile_after_s=self._config.reconcile_after_s,
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
            at = datetime.now(UTC)
            if not self.providers.is_active(provider):
                attempts.append(
                    ProviderAttempt(
                        provider=provider.name,
                        outcome="skipped",
                        code=ProviderNotConfigured.code,
                        at=at,
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
                        at=at,
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
                    provider=provider.name,
                    outcome="succeeded",
                    latency_ms=_ms_since(started),
                    at=at,
                )
            )
            return provider, result, attempts
        raise AssertionError("unreachable: the loop returns or raises")


def _receipt_facts(body: CreateIntentRequest, sale: Sale, *, test_mode: bool) -> dict[str, Any]:
    """What the payment's receipt will print besides the price: the buyer as given, the tax
    decided for this sale, and whether it is test money."""
    buyer = body.buyer
    return {
        "buyer_name": buyer.name if buyer else None,
        "buyer_address": buyer.address if buyer else None,
        "buyer_country": buyer.country if buyer else None,
        "buyer_vat_id": buyer.vat_id if buyer else None,
        "tax_rate": sale.rate,
        "tax_amount": sale.tax,
        "tax_treatment": sale.treatment,
        "test_mode": test_mode,
    }


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
