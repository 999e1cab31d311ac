"""The plan catalogue: what is sold, at which price. Prices come from here, never from a
client."""

from __future__ import annotations

from collections.abc import Mapping

from models.payment import PaymentRecord, Plan
from services.errors import UnknownPlan


class Catalogue:
    def __init__(self, plans: Mapping[str, Plan]) -> None:
        self._plans = dict(plans)

    def plan(self, code: str) -> Plan:
        try:
            return self._plans[code]
        except KeyError:
            known = ", ".join(sorted(self._plans))
            raise UnknownPlan(f"No plan {code!r}; plans: {known}") from None

    def plan_of(self, record: PaymentRecord) -> Plan:
        """The plan a payment was for; a plan removed from the catalogue after the sale still
        gets a receipt, from what the payment recorded."""
        return self._plans.get(record.plan) or Plan(
            code=record.plan, name=record.plan, amount=record.amount, currency=record.currency
        )
