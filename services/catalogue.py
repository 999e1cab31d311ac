"""The plan catalogue: what is sold, at which prices. Prices come from here, never from a
client; a client only chooses among a plan's currencies."""

from __future__ import annotations

from collections.abc import Mapping

from models.payment import CataloguePlan, PaymentRecord, Plan
from services.errors import CurrencyNotOffered, UnknownPlan


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
