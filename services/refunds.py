"""Refunds: records of their own, reserved against the balance before the provider is asked.

A refund is asked for in three steps. The store records it as pending and reserves its amount,
atomically, against what may still be refunded (succeeded and pending refunds both count, so
refunds in flight can never add up to more than was paid). The provider is asked, with our
refund id as its idempotency key. Its answer moves the record: succeeded counts towards the
payment's ``amount_refunded`` (and moves the payment to partially refunded / refunded);
failed or canceled gives the amount back; pending stays reserved until a webhook, a verify or
the reconciler brings the provider's final word.

If the provider surely made no refund (it refused, or the request never reached it), the
record is discarded and the error answered. If nobody knows (the answer was lost), the record
stays pending: the reconciler, or the client's retry with the same Idempotency-Key, asks the
provider again with the same refund id, which never refunds twice.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from models.payment import (
    PaymentRecord,
    PaymentStatus,
    RefundListResponse,
    RefundRecord,
    RefundRequest,
    RefundResponse,
    RefundStatus,
)
from services.errors import (
    IdempotencyKeyReused,
    InvalidStateTransition,
    PaymentNotFound,
    ProviderUnavailable,
    RefundExceedsBalance,
    ServiceError,
)
from services.idempotency import IdempotencyClaims
from services.payment_providers.base import BasePaymentProvider, RefundResult
from services.payment_store import (
    IdempotencyAnswer,
    PaymentStore,
    RefundApplied,
    RefundBeginOutcome,
    TransitionOutcome,
)
from services.views import payment_response, refund_view

if TYPE_CHECKING:
    from models.user import User
    from services.payment_providers.factory import PaymentProviderFactory
    from services.payment_providers.guard import ProviderGuard

log = logging.getLogger("payments.refunds")


@dataclass(frozen=True, slots=True)
class RefundAnswer:
    response: RefundResponse
    replayed: bool = False  # the answer stored for this Idempotency-Key, not a new refund

    @property
    def status_code(self) -> int:
        """200 once the refund is final, 202 while it is pending."""
        return 202 if self.response.refund.status is RefundStatus.PENDING else 200


class RefundService:
    def __init__(
        self,
        store: PaymentStore,
        providers: Callable[[], PaymentProviderFactory],
        guard: ProviderGuard,
        claims: IdempotencyClaims,
        *,
        reconcile_after_s: float | None,
        on_succeeded: Callable[[PaymentRecord, RefundRecord], None] = lambda record, refund: None,
    ) -> None:
        self._on_succeeded = on_succeeded  # e.g. render the refund's credit note
        self._store = store
        self._providers = providers
        self._guard = guard
        self._claims = claims
        self._reconcile_after_s = reconcile_after_s

    # -- asking for a refund -----------------------------------------------------------------

    async def refund(
        self,
        payment_id: str,
        body: RefundRequest,
        *,
        user: User,
        idempotency_key: str | None,
    ) -> RefundAnswer:
        """Refund ``body.amount`` (all that is left when None) of a paid payment."""
        provider = self._providers().for_payment_id(payment_id)
        if idempotency_key is None:
            return await self._refund(provider, payment_id, body, f"rf_{secrets.token_hex(12)}")
        scope = f"refund:{payment_id}:user:{user.sub}"
        fingerprint = self._claims.fingerprint(body.fingerprint_fields())
        stored = await self._claims.claim(scope, idempotency_key, fingerprint)
        if stored is not None:
            return RefundAnswer(RefundResponse.model_validate(stored), replayed=True)
        # The refund's id is derived from the key: a retry after a crash, or after an answer
        # that was lost, finds the same refund and asks the provider again under the same id.
        digest = hashlib.sha256(f"{scope}\0{idempotency_key}".encode()).hexdigest()
        async with self._claims.held(scope, idempotency_key):
            answer = await self._refund(provider, payment_id, body, f"rf_{digest[:24]}")
            await self._store.idempotency_complete(
                IdempotencyAnswer(scope, idempotency_key, answer.response.model_dump(mode="json"))
            )
        return answer

    async def _refund(
        self,
        provider: BasePaymentProvider,
        payment_id: str,
        body: RefundRequest,
        refund_id: str,
    ) -> RefundAnswer:
        record = await self._store.get(payment_id)
        if record is None:
            raise PaymentNotFound(f"No payment {payment_id!r}")
        begin = await self._store.begin_refund(
            payment_id,
            refund_id=refund_id,
            provider=provider.name,
            amount=body.amount,
            currency=record.currency,
            reason=body.reason,
            cause="api:refund",
        )
        if begin.outcome is RefundBeginOutcome.MISSING:
            raise PaymentNotFound(f"No payment {payment_id!r}")
        if begin.outcome is RefundBeginOutcome.UNPAID:
            raise InvalidStateTransition("Only a paid payment can be refunded")
        if begin.outcome is RefundBeginOutcome.EXCEEDS:
            raise RefundExceedsBalance(
                f"{begin.left} minor units are left to refund (pending refunds count)",
                extra={"left": begin.left},
            )
        refund = begin.refund
        assert refund is not None
        if begin.outcome is RefundBeginOutcome.EXISTS and (
            (body.amount is not None and body.amount != refund.amount)
            or body.reason != refund.reason
        ):
            raise IdempotencyKeyReused("This Idempotency-Key was used for another refund")
        if refund.status is RefundStatus.PENDING and refund.provider_refund_id is None:
            refund = await self._ask_provider(provider, record, refund)
        return await self._answer(payment_id, refund)

    async def _ask_provider(
        self, provider: BasePaymentProvider, record: PaymentRecord, refund: RefundRecord
    ) -> RefundRecord:
        call = partial(
            provider.refund,
            record.payment_id,
            refund_id=refund.refund_id,
            amount=refund.amount,
            currency=refund.currency,
            capture_id=record.capture_id,
            reason=refund.reason,
        )
        try:
            result = await self._guard.run(provider, call)
        except ServiceError as error:
            if isinstance(error, ProviderUnavailable) and error.outcome_unknown:
                # It may have been made: keep it pending (reserved) and find out later.
                log.warning(
                    "refund.outcome_unknown",
                    extra={"payment_id": record.payment_id, "refund_id": refund.refund_id},
                )
                await self._follow_later(record.payment_id)
                raise
            # The provider made no refund: forget ours, and give its amount back.
            await self._store.discard_refund(record.payment_id, refund.refund_id)
            log.info(
                "refund.refused",
                extra={
                    "payment_id": record.payment_id,
                    "refund_id": refund.refund_id,
                    "code": error.code,
                },
            )
            raise
        applied = await self.apply(record, result, cause="api:refund", refund_id=refund.refund_id)
        return applied.refund or refund

    async def _answer(self, payment_id: str, refund: RefundRecord) -> RefundAnswer:
        record = await self._store.get(payment_id)
        if record is None:
            raise PaymentNotFound(f"No payment {payment_id!r}")
        history = await self._store.refund_history(payment_id, refund.refund_id)
        return RefundAnswer(
            RefundResponse(
                **payment_response(record).model_dump(), refund=refund_view(refund, history)
            )
        )

    async def list(self, record: PaymentRecord) -> RefundListResponse:
        views = []
        for refund in await self._store.refunds(record.payment_id):
            history = await self._store.refund_history(record.payment_id, refund.refund_id)
            views.append(refund_view(refund, history))
        return RefundListResponse(
            payment_id=record.payment_id,
            refunds=views,
            amount_refunded=record.amount_refunded,
            amount_pending_refund=record.amount_pending_refund,
        )

    # -- learning how refunds end ------------------------------------------------------------

    async def apply(
        self,
        record: PaymentRecord,
        result: RefundResult,
        *,
        cause: str,
        refund_id: str | None = None,
        event_id: str | None = None,
    ) -> RefundApplied:
        """Apply the provider's word on one refund of ``record``. A refund we have no record
        of (made at the provider directly) is adopted, so that the payment's sums stay true."""
        if not record.status.is_paid:
            # Money went back, so it had been taken: record the payment as paid first (a lost
            # answer, events out of order), so that the history says what happened.
            await self._store.transition(record.payment_id, PaymentStatus.SUCCEEDED, cause=cause)
        now = datetime.now(UTC)
        adopt = RefundRecord(
            refund_id=_adopted_id(record.provider, result.provider_refund_id),
            payment_id=record.payment_id,
            provider=record.provider,
            provider_refund_id=result.provider_refund_id,
            amount=result.amount,
            currency=(result.currency or record.currency).upper(),
            status=RefundStatus.PENDING,
            reason="made at the provider",
            created_at=now,
            updated_at=now,
        )
        applied = await self._store.apply_refund(
            record.payment_id,
            status=result.status,
            cause=cause,
            refund_id=refund_id or result.refund_id,
            provider_refund_id=result.provider_refund_id,
            failure_code=result.failure_code,
            event_id=event_id,
            adopt=adopt,
        )
        if applied.outcome is TransitionOutcome.MISSING and (refund_id or result.refund_id):
            # Our id names no record here (not ours after all): go by the provider's id.
            applied = await self._store.apply_refund(
                record.payment_id,
                status=result.status,
                cause=cause,
                provider_refund_id=result.provider_refund_id,
                failure_code=result.failure_code,
                event_id=event_id,
                adopt=adopt,
            )
        refund = applied.refund
        if refund is None:
            return applied
        log_extra = {
            "payment_id": record.payment_id,
            "refund_id": refund.refund_id,
            "from": str(applied.previous),
            "to": str(result.status),
            "outcome": str(applied.outcome),
            "cause": cause,
        }
        if applied.outcome is TransitionOutcome.REJECTED:
            log.warning("refund.transition_rejected", extra=log_extra)
        elif applied.outcome is TransitionOutcome.APPLIED:
            log.info("refund.transition", extra=log_extra)
            if refund.status is RefundStatus.SUCCEEDED:
                self._on_succeeded(record, refund)
        if refund.status is RefundStatus.PENDING:
            await self._follow_later(record.payment_id)
        return applied

    async def sync(
        self, record: PaymentRecord, results: tuple[RefundResult, ...], *, cause: str
    ) -> bool:
        """Apply a provider's list of a payment's refunds; True when any was not as we held it.

        A verify lists every refund the payment ever had: the ones we already hold as the
        provider says are skipped after one read, not re-applied one script each."""
        known = {
            refund.provider_refund_id: refund.status
            for refund in await self._store.refunds(record.payment_id)
            if refund.provider_refund_id is not None
        }
        moved = False
        for result in results:
            if known.get(result.provider_refund_id) is result.status:
                continue
            await self.apply(record, result, cause=cause)
            moved = True
        return moved

    async def follow_pending(self, record: PaymentRecord, *, cause: str) -> None:
        """Ask the provider about each refund of ``record`` that is still pending: by its id
        when the provider gave one, otherwise by asking for it again under the same refund id
        (the first answer was lost), which never refunds twice."""
        if record.amount_pending_refund <= 0:
            return
        provider = self._providers().for_payment_id(record.payment_id)
        for refund in await self._store.refunds(record.payment_id):
            if refund.status is not RefundStatus.PENDING:
                continue
            if refund.provider_refund_id is not None:
                result = await self._guard.run(
                    provider,
                    partial(provider.get_refund, record.payment_id, refund.provider_refund_id),
                )
                await self.apply(record, result, cause=cause, refund_id=refund.refund_id)
            else:
                try:
                    await self._ask_provider(provider, record, refund)
                except ServiceError as error:
                    log.warning(
                        "refund.follow_failed",
                        extra={
                            "payment_id": record.payment_id,
                            "refund_id": refund.refund_id,
                            "code": error.code,
                        },
                    )

    async def _follow_later(self, payment_id: str) -> None:
        if self._reconcile_after_s is not None:
            await self._store.schedule_reconcile(payment_id, after_s=self._reconcile_after_s)


def _adopted_id(provider: str, provider_refund_id: str) -> str:
    """Our id for a refund made at the provider: the same for every event about it."""
    digest = hashlib.sha256(f"{provider}\0{provider_refund_id}".encode()).hexdigest()
    return f"rf_{digest[:24]}"
