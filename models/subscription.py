"""Subscription domain types: one normalized lifecycle whatever the provider."""

from __future__ import annotations

from enum import StrEnum


class SubscriptionStatus(StrEnum):
    """The states every provider's subscriptions are mapped to (Stripe's names).

    ``incomplete``: created, first payment not made yet; ``incomplete_expired``: it never
    was; ``trialing``: in a free trial; ``active``: paid for the current period;
    ``past_due``: a renewal failed and the provider is retrying (entitlements last for the
    grace period); ``paused``: billing paused; ``canceled``: over, for good."""

    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    PAUSED = "paused"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in (SubscriptionStatus.CANCELED, SubscriptionStatus.INCOMPLETE_EXPIRED)


class BillingInterval(StrEnum):
    MONTH = "month"
    YEAR = "year"
