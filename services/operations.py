"""Operations on a payment that move money: capture, cancel and refunds."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from models.payment import (
    PaymentRecord,
    PaymentResponse,
    PaymentStatus,
    RefundListResponse,
    RefundRequest,
)
from models.user import User
from services.errors import (
    CaptureExceedsAmount,
    InvalidStateTransition,
    OperationNotSupported,
    PaymentNotFound,
    ProviderUnavailable,
)
from services.payment_providers.base import BasePaymentProvider, Capability
from services.payment_state import PaymentStateService
from services.payment_store import PaymentStore
from services.refunds import RefundAnswer, RefundService
from services.views import payment_response

if TYPE_CHECKING:
    from services.payment_providers.factory import PaymentProviderFactory
    from services.payment_providers.guard import ProviderGuard

log = logging.getLogger("payments.operations")

T = TypeVar("T")

_FINAL_UNPAID = frozenset({PaymentStatus.FAILED, PaymentStatus.CANCELED, PaymentStatus.EXPIRED})


class PaymentOperations:
    def __init__(
        self,
        state: PaymentStateService,
        store: PaymentStore,
        providers: Callable[[], PaymentProviderFactory],
        guard: ProviderGuard,
        refunds: RefundService,
        *,
        reconcile_after_s: float | None,
    ) -> None:
        self._state = state
        self._store = store
        self._providers = providers
        self._guard = guard
        self._refunds = refunds
        self._reconcile_after_s = reconcile_after_s

    @property
    def providers(self) -> PaymentProviderFactory:
        return self._providers()

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

    async def capture(
        self,
        payment_id: str,
        user: User | None,
        *,
        provider_name: str | None = None,
        amount: int | None = None,
    ) -> PaymentResponse:
        """Capture an authorized payment: all of it, or ``amount`` minor units of it where
        the provider can capture part (the rest is released). Capturing a paid payment again
        answers its state, unless it asks for another amount than was captured."""
        if provider_name is not None:
            expected = self.providers.get_configured(provider_name)
            if not expected.can_handle_payment_id(payment_id):
                raise PaymentNotFound(f"No {provider_name} payment {payment_id!r}")
        provider = self.providers.for_payment_id(payment_id)
        record = await self._state.visible(payment_id, user)
        if amount is not None:
            if amount > record.amount:
                raise CaptureExceedsAmount(
                    f"At most {record.amount} minor units can be captured",
                    extra={"amount": record.amount},
                )
            if amount == record.amount:
                amount = None  # all of it: an ordinary capture, whoever the provider is
            elif Capability.PARTIAL_CAPTURE not in provider.capabilities:
                raise OperationNotSupported(
                    f"{provider.display_name} captures the whole amount only"
                )
        if record.status.is_paid:
            captured = record.amount_captured or record.amount
            if amount is not None and amount != captured:
                raise InvalidStateTransition(
                    f"The payment was captured already, for {captured} minor units"
                )
            return payment_response(record)
        if record.status in _FINAL_UNPAID:
            raise InvalidStateTransition(f"A {record.status} payment cannot be captured")
        # One key per payment, whatever the amount: a retry after a lost answer can never
        # capture a second time.
        state = await self._operate(
            provider,
            partial(
                provider.capture, payment_id, idempotency_key=f"capture-{payment_id}", amount=amount
            ),
            record,
        )
        return payment_response(await self._state.apply(record, state, cause="api:capture"))

    async def cancel(self, payment_id: str, user: User | None) -> PaymentResponse:
        provider = self.providers.for_payment_id(payment_id)
        record = await self._state.visible(payment_id, user)
        if record.status is PaymentStatus.CANCELED:
            return payment_response(record)
        if record.status.is_paid or record.status in _FINAL_UNPAID:
            raise InvalidStateTransition(f"A {record.status} payment cannot be canceled")
        state = await self._operate(
            provider,
            partial(provider.cancel, payment_id, idempotency_key=f"cancel-{payment_id}"),
            record,
        )
        return payment_response(await self._state.apply(record, state, cause="api:cancel"))

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
        return await self._refunds.list(await self._state.owned(payment_id, user))
