"""The sandbox's subscriptions: prices, subscriptions and their invoices, billed by a test clock.

Like the sandbox's payments, this is the "provider side": its own records in its own Redis
namespace. A subscription starts on its checkout page (Pay / Decline / Cancel); after that
nothing happens until its test clock is advanced (``advance``): the clock jumps to the next
renewal, which succeeds or fails as asked, and the sandbox tells the service as a vendor's
webhook would (``LocalEvents``). Every paid invoice is also a sandbox payment (``sb_...``), so
that the service can verify and refund it like any other.

What it does not do: prorate (an upgrade is charged in full, whatever the service asks), retry
failed renewals on its own schedule (each ``advance`` is one renewal attempt), or give a
customer portal.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Literal

from models.subscription import BillingInterval, SubscriptionStatus
from services.errors import InvalidSubscriptionState, NotFound, SubscriptionNotFound

from .base import (
    InvoicePayment,
    LocalEvents,
    ProviderKeyValue,
    RecurringPrice,
    SubscriptionRequest,
    SubscriptionStarted,
    SubscriptionState,
    WebhookEvent,
)
from .sandbox_webhooks import SESSION_TTL_S

RenewalOutcome = Literal["succeeded", "failed"]
CheckoutOutcome = Literal["succeeded", "failed", "canceled"]

SUBSCRIPTION_TTL_S = 400 * 24 * 3600  # past a yearly renewal

# KEYS: hash. ARGV: TTL, then field/value pairs. Writes a hash once: 0 when it exists.
_OPEN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: subscription hash. ARGV: the version read, TTL, then field/value pairs. Writes only if
# nobody wrote since the read (compare and set on `version`).
_SWAP_LUA = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return -1 end
if version ~= ARGV[1] then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# ``_change``'s argument: the record as read -> the fields to write, or None for no change.
_Change = Callable[[dict[str, str]], Awaitable[dict[str, str] | None]]

_STATUS = {status.value: status for status in SubscriptionStatus}
_LIVE = ("trialing", "active", "past_due")


def add_interval(moment: int, interval: str, count: int) -> int:
    """``moment`` (epoch seconds) plus ``count`` months or years, on the same day of the month
    where it exists (31 January + 1 month: the last day of February)."""
    when = datetime.fromtimestamp(moment, UTC)
    months = count * (12 if interval == BillingInterval.YEAR else 1)
    month_index = when.month - 1 + months
    year, month = when.year + month_index // 12, month_index % 12 + 1
    day = min(when.day, calendar.monthrange(year, month)[1])
    return int(when.replace(year=year, month=month, day=day).timestamp())


def _at(epoch: str | None) -> datetime | None:
    return datetime.fromtimestamp(int(epoch), UTC) if epoch else None


class SandboxSubscriptions:
    def __init__(self, store: ProviderKeyValue, events: LocalEvents | None, *, name: str) -> None:
        self._store = store
        self._events = events
        self._name = name
        self._prefix = store.namespace
        self._open = store.script(_OPEN_LUA)
        self._swap = store.script(_SWAP_LUA)

    def _digest(self, text: str) -> str:
        return hashlib.sha256(f"{self._prefix}{text}".encode()).hexdigest()[:24]

    # -- prices ----------------------------------------------------------------------------

    async def sync_price(self, price: RecurringPrice, *, existing: str | None) -> str:
        if existing and await self._store.read_hash(self._store.key(existing)):
            return existing
        # The price id comes from its key: the same price is one sandbox price, however
        # often it is synced; a changed price is a new one.
        price_id = f"sbpr_{self._digest(price.key)}"
        fields = {
            "key": price.key,
            "plan": price.plan.code,
            "plan_name": price.plan.name,
            "amount": str(price.plan.amount),
            "currency": price.plan.currency,
            "interval": str(price.interval),
            "interval_count": str(price.interval_count),
            "trial_days": str(price.trial_days),
        }
        await self._open(
            keys=[self._store.key(price_id)],
            args=[str(SUBSCRIPTION_TTL_S), *(item for pair in fields.items() for item in pair)],
        )
        return price_id

    async def _price(self, price_id: str) -> dict[str, str]:
        fields = await self._store.read_hash(self._store.key(price_id))
        if not fields:
            raise NotFound(f"The sandbox has no price {price_id!r}")
        return fields

    # -- subscriptions ---------------------------------------------------------------------

    async def create(self, request: SubscriptionRequest, base_url: str) -> SubscriptionStarted:
        price_id = request.vendor_price_id or await self.sync_price(request.price, existing=None)
        price = await self._price(price_id)
        # The vendor's own idempotency: the id comes from the key.
        sandbox_id = f"sbsub_{self._digest(request.idempotency_key)}"
        fields = {
            "status": "incomplete",
            "subscription_id": request.subscription_id,
            "price_id": price_id,
            **{name: price[name] for name in ("plan", "plan_name", "amount", "currency")},
            **{name: price[name] for name in ("interval", "interval_count", "trial_days")},
            "return_url": request.return_url or "",
            "cancel_url": request.cancel_url or "",
            "clock": str(int(time.time())),
            "cancel_at_period_end": "0",
            "invoices": "0",
            "version": "0",
        }
        await self._open(
            keys=[self._store.key(sandbox_id)],
            args=[str(SUBSCRIPTION_TTL_S), *(item for pair in fields.items() for item in pair)],
        )
        return SubscriptionStarted(
            provider_subscription_id=sandbox_id,
            status=SubscriptionStatus.INCOMPLETE,
            redirect_url=base_url.rstrip("/") + self.checkout_path(sandbox_id),
        )

    @staticmethod
    def checkout_path(sandbox_id: str) -> str:
        return f"/sandbox/subscriptions/{sandbox_id}/checkout"

    async def record(self, sandbox_id: str) -> dict[str, str]:
        """The sandbox's own record of a subscription."""
        fields = await self._store.read_hash(self._store.key(sandbox_id))
        if not fields or "version" not in fields:
            raise SubscriptionNotFound(f"No sandbox subscription {sandbox_id!r}")
        return fields

    async def get(self, sandbox_id: str) -> SubscriptionState:
        return self.state_of(sandbox_id, await self.record(sandbox_id))

    @staticmethod
    def state_of(sandbox_id: str, fields: Mapping[str, str]) -> SubscriptionState:
        latest = fields.get("latest_invoice")
        return SubscriptionState(
            provider_subscription_id=sandbox_id,
            status=_STATUS.get(fields["status"], SubscriptionStatus.INCOMPLETE),
            current_period_start=_at(fields.get("period_start")),
            current_period_end=_at(fields.get("period_end")),
            cancel_at_period_end=fields.get("cancel_at_period_end") == "1",
            vendor_price_id=fields.get("price_id"),
            subscription_id=fields.get("subscription_id") or None,
            latest_invoice=_invoice_of(json.loads(latest)) if latest else None,
            vendor_status=fields["status"],
        )

    async def _change(self, sandbox_id: str, compute: _Change) -> tuple[dict[str, str], bool]:
        """Apply ``compute`` (the read record -> the fields to write, or None for no change)
        atomically against concurrent changes: (the record after, whether it changed)."""
        for _ in range(5):
            fields = await self.record(sandbox_id)
            update = await compute(fields)
            if update is None:
                return fields, False
            written = await self._swap(
                keys=[self._store.key(sandbox_id)],
                args=[
                    fields["version"],
                    str(SUBSCRIPTION_TTL_S),
                    *(item for pair in update.items() for item in pair),
                ],
            )
            if int(written) == 1:
                return await self.record(sandbox_id), True
            if int(written) == -1:
                raise SubscriptionNotFound(f"No sandbox subscription {sandbox_id!r}")
        raise InvalidSubscriptionState("The subscription is changing; try again")

    async def _invoice(
        self, sandbox_id: str, fields: Mapping[str, str], *, paid: bool, start: int, end: int
    ) -> dict[str, str]:
        """A new invoice of the subscription for [start, end): paid ones are also sandbox
        payments, verifiable and refundable. The fields that record it."""
        number = int(fields["invoices"]) + 1
        invoice_id = f"sbin_{self._digest(f'{sandbox_id}:{number}')}"
        payment_id = f"sb_{self._digest(f'{sandbox_id}:{number}:payment')}" if paid else None
        if payment_id is not None:
            session = {
                "status": "succeeded",
                "amount": fields["amount"],
                "currency": fields["currency"],
                "plan": fields["plan"],
                "plan_name": fields["plan_name"],
                "reference": invoice_id,
                "return_url": "",
                "cancel_url": "",
                "capture_method": "automatic",
                "refunded": "0",
                "refund_pending": "0",
                "refund_mode": "",
                "refund_settle_ms": "0",
                "created_at": str(int(time.time())),
                "subscription": sandbox_id,
            }
            await self._open(
                keys=[self._store.key(payment_id)],
                args=[str(SESSION_TTL_S), *(item for pair in session.items() for item in pair)],
            )
        invoice = {
            "id": invoice_id,
            "amount": int(fields["amount"]),
            "currency": fields["currency"],
            "paid": paid,
            "period_start": start,
            "period_end": end,
            "payment_id": payment_id,
        }
        return {"invoices": str(number), "latest_invoice": json.dumps(invoice)}

    async def checkout(self, sandbox_id: str, outcome: CheckoutOutcome) -> dict[str, str]:
        """The customer's click on the subscription's checkout page: Pay starts it (a trial,
        or a first paid period), Decline and Cancel leave it never started."""

        async def compute(fields: dict[str, str]) -> dict[str, str] | None:
            if fields["status"] != "incomplete":
                raise InvalidSubscriptionState(
                    f"This subscription was already settled ({fields['status']})"
                )
            clock = int(fields["clock"])
            if outcome != "succeeded":
                update = {"status": "incomplete_expired"}
                if outcome == "failed":
                    update |= await self._invoice(
                        sandbox_id, fields, paid=False, start=clock, end=clock
                    )
                return update
            trial_days = int(fields["trial_days"])
            if trial_days:
                end = clock + trial_days * 86400
                return {"status": "trialing", "period_start": str(clock), "period_end": str(end)}
            end = add_interval(clock, fields["interval"], int(fields["interval_count"]))
            return {
                "status": "active",
                "period_start": str(clock),
                "period_end": str(end),
                **await self._invoice(sandbox_id, fields, paid=True, start=clock, end=end),
            }

        fields, _ = await self._change(sandbox_id, compute)
        await self._tell(sandbox_id, fields, "subscription.checkout", cause="sandbox:checkout")
        return fields

    async def advance(self, sandbox_id: str, outcome: RenewalOutcome) -> SubscriptionState:
        """Move the subscription's clock to its next renewal, which ``outcome`` decides.

        A subscription set to cancel at the period's end is canceled then; a downgrade
        waiting for the renewal takes effect with it. A failed renewal makes it past_due
        (its new period begins unpaid); a later successful one makes it active again."""

        async def compute(fields: dict[str, str]) -> dict[str, str] | None:
            if fields["status"] not in _LIVE:
                raise InvalidSubscriptionState(
                    f"Only a live subscription renews (this one is {fields['status']})"
                )
            start = int(fields["period_end"])
            update = {"clock": str(start)}
            if fields["cancel_at_period_end"] == "1":
                return update | {"status": "canceled"}
            renewing = dict(fields)
            if fields.get("pending_price_id"):
                price = await self._price(fields["pending_price_id"])
                moved = {name: price[name] for name in ("plan", "plan_name", "amount")}
                moved |= {name: price[name] for name in ("interval", "interval_count")}
                moved |= {"price_id": fields["pending_price_id"], "pending_price_id": ""}
                renewing |= moved
                update |= moved
            end = add_interval(start, renewing["interval"], int(renewing["interval_count"]))
            paid = outcome == "succeeded"
            return update | {
                "status": "active" if paid else "past_due",
                "period_start": str(start),
                "period_end": str(end),
                **await self._invoice(sandbox_id, renewing, paid=paid, start=start, end=end),
            }

        fields, _ = await self._change(sandbox_id, compute)
        await self._tell(sandbox_id, fields, "subscription.renewal", cause="sandbox:clock")
        return self.state_of(sandbox_id, fields)

    async def cancel(self, sandbox_id: str, *, at_period_end: bool) -> SubscriptionState:
        async def compute(fields: dict[str, str]) -> dict[str, str] | None:
            status = fields["status"]
            if status in ("canceled", "incomplete_expired"):
                return None  # canceling twice answers the first result
            if at_period_end and status in _LIVE:
                return (
                    None if fields["cancel_at_period_end"] == "1" else {"cancel_at_period_end": "1"}
                )
            return {"status": "canceled" if status != "incomplete" else "incomplete_expired"}

        fields, _ = await self._change(sandbox_id, compute)
        return self.state_of(sandbox_id, fields)

    async def resume(self, sandbox_id: str) -> SubscriptionState:
        async def compute(fields: dict[str, str]) -> dict[str, str] | None:
            if fields["status"] not in _LIVE:
                raise InvalidSubscriptionState(
                    f"Only a live subscription resumes (this one is {fields['status']})"
                )
            return {"cancel_at_period_end": "0"} if fields["cancel_at_period_end"] == "1" else None

        fields, _ = await self._change(sandbox_id, compute)
        return self.state_of(sandbox_id, fields)

    async def change_price(
        self, sandbox_id: str, *, price_id: str, now: bool, idempotency_key: str
    ) -> SubscriptionState:
        """Bill ``price_id``: ``now``, from today for a full new period charged at once (the
        sandbox never prorates), or from the next renewal."""
        price = await self._price(price_id)

        async def compute(fields: dict[str, str]) -> dict[str, str] | None:
            if fields.get("change_key") == idempotency_key:
                return None  # asked before: never charged twice
            if fields["status"] not in _LIVE:
                raise InvalidSubscriptionState(
                    f"Only a live subscription changes price (this one is {fields['status']})"
                )
            if not now:
                return {"pending_price_id": price_id, "change_key": idempotency_key}
            clock = int(fields["clock"])
            moved = {name: price[name] for name in ("plan", "plan_name", "amount")}
            moved |= {name: price[name] for name in ("interval", "interval_count")}
            renewing = dict(fields) | moved
            end = add_interval(clock, moved["interval"], int(moved["interval_count"]))
            return moved | {
                "price_id": price_id,
                "pending_price_id": "",
                "change_key": idempotency_key,
                "status": "active",
                "period_start": str(clock),
                "period_end": str(end),
                **await self._invoice(sandbox_id, renewing, paid=True, start=clock, end=end),
            }

        fields, _ = await self._change(sandbox_id, compute)
        return self.state_of(sandbox_id, fields)

    async def _tell(
        self, sandbox_id: str, fields: Mapping[str, str], event_type: str, *, cause: str
    ) -> None:
        """Tell the service, as a vendor's webhook would: the subscription as it is now, its
        newest invoice, at the subscription's clock."""
        if self._events is None:
            return
        state = self.state_of(sandbox_id, fields)
        event = WebhookEvent(
            event_id=f"evt_sb_{secrets.token_hex(12)}",
            event_type=event_type,
            verified=True,
            occurred_at=_at(fields["clock"]),
            subscription=state,
            invoice=state.latest_invoice,
        )
        await self._events.publish(self._name, event, cause=cause)


def _invoice_of(invoice: Mapping[str, object]) -> InvoicePayment:
    start, end = invoice.get("period_start"), invoice.get("period_end")
    payment_id = invoice.get("payment_id")
    return InvoicePayment(
        provider_invoice_id=str(invoice["id"]),
        amount=int(str(invoice["amount"])),
        currency=str(invoice["currency"]),
        paid=bool(invoice["paid"]),
        period_start=datetime.fromtimestamp(int(str(start)), UTC) if start is not None else None,
        period_end=datetime.fromtimestamp(int(str(end)), UTC) if end is not None else None,
        payment_id=str(payment_id) if payment_id else None,
    )
