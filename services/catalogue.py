"""The plan catalogue: what is sold, at which prices. Prices come from here, never from a
client; a client only chooses among a plan's currencies."""

from __future__ import annotations

from collections.abc import Mapping

from models.payment import CataloguePlan, PaymentRecord, Plan
from services.errors import CurrencyNotOffered, PlanNotRecurring, UnknownPlan
from services.payment_providers.base import RecurringPrice


class Catalogue:
    def __init__(self, plans: Mapping[str, CataloguePlan]) -> None:
        self._plans = dict(plans)

    def plans(self) -> list[CataloguePlan]:
        return list(self._plans.values())

    def entry(self, code: str) -> CataloguePlan:
        try:
            return self._plans[code]
        except KeyError:
            known = ", ".join(sorted(self._plans))
            raise UnknownPlan(f"No plan {code!r}; plans: {known}") from None

    def plan(self, code: str, currency: str | None = None) -> Plan:
        """Plan ``code`` at its price in ``currency`` (upper case), or at its first price."""
        entry = self.entry(code)
        if currency is None:
            return entry.at(entry.currencies[0])
        if currency not in entry.prices:
            offered = ", ".join(entry.currencies)
            raise CurrencyNotOffered(
                f"Plan {code!r} has no price in {currency}; it is priced in {offered}",
                extra={"currency": currency, "offered": list(entry.currencies)},
            )
        return entry.at(currency)

    def recurring_price(self, code: str, currency: str | None = None) -> RecurringPrice:
        """Recurring plan ``code`` at its price in ``currency`` (or its first), as a provider
        bills it. ``PlanNotRecurring`` for a plan sold once."""
        entry = self.entry(code)
        if entry.interval is None:
            raise PlanNotRecurring(
                f"Plan {code!r} is sold once; subscriptions are for plans with an interval",
                extra={"plan": code},
            )
        return RecurringPrice(
            plan=self.plan(code, currency),
            interval=entry.interval,
            interval_count=entry.interval_count,
            trial_days=entry.trial_days,
        )

    def recurring_prices(self) -> list[RecurringPrice]:
        """Every recurring plan at every one of its prices: what plan sync makes vendor
        prices of."""
        return [
            self.recurring_price(entry.code, currency)
            for entry in self._plans.values()
            if entry.recurring
            for currency in entry.currencies
        ]

    def plan_of(self, record: PaymentRecord) -> Plan:
        """The plan a payment was for, at the price it was sold at: what the payment
        recorded (a plan repriced or removed since still gets its receipt as sold)."""
        entry = self._plans.get(record.plan)
        return Plan(
            code=record.plan,
            name=entry.name if entry else record.plan,
            amount=record.amount,
            currency=record.currency,
        )
