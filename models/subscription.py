"""Subscription domain types: one normalized lifecycle whatever the provider."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StringConstraints


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


# Entitlement states: what a user may use now (past_due only within the grace period).
ENTITLED = frozenset({SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING})


class SubscriptionHistoryEntry(BaseModel):
    at: datetime
    status: SubscriptionStatus
    previous: SubscriptionStatus | None = None
    cause: str = Field(description="api, webhook:<event id>, reconcile, sandbox:clock, ...")
    current_period_end: datetime | None = None


class SubscriptionRecord(BaseModel):
    """What the store keeps about one subscription."""

    subscription_id: str = Field(description="Ours: sub_...")
    provider: str
    provider_subscription_id: str
    owner: str
    plan: str
    currency: str
    amount: int = Field(description="The plan's price per period, minor units")
    interval: BillingInterval
    interval_count: int = 1
    trial_days: int = 0
    status: SubscriptionStatus
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    cancel_at_period_end: bool = False
    pending_plan: str | None = Field(
        default=None, description="A downgrade that takes effect at the next renewal"
    )
    vendor_price_id: str | None = None
    customer_email: str | None = None
    return_url: str | None = None
    cancel_url: str | None = None
    redirect_url: str | None = None
    past_due_since: datetime | None = None
    # The latest time the vendor spoke of (its event times; a sandbox's test clock): the
    # grace period is counted to the later of it and now.
    vendor_time: datetime | None = None
    test_mode: bool = False
    created_at: datetime
    updated_at: datetime
    canceled_at: datetime | None = None


# -- requests ------------------------------------------------------------------------------

_PLAN = StringConstraints(pattern=r"^[a-z0-9_\-]{1,64}$")
_PROVIDER = StringConstraints(pattern=r"^[a-z0-9_\-]{1,64}$")
_CURRENCY = StringConstraints(pattern=r"^[A-Za-z]{3}$", to_upper=True)


class CreateSubscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: Annotated[str, _PLAN]
    provider: Annotated[str, _PROVIDER] | None = None
    currency: Annotated[str, _CURRENCY] | None = None
    return_url: AnyHttpUrl | None = Field(
        default=None, max_length=2048, description="Where the vendor sends the customer back"
    )
    cancel_url: AnyHttpUrl | None = Field(default=None, max_length=2048)

    def fingerprint_fields(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "provider": self.provider,
            "currency": self.currency,
            "return_url": str(self.return_url) if self.return_url else None,
            "cancel_url": str(self.cancel_url) if self.cancel_url else None,
        }


class CancelSubscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at_period_end: bool = Field(
        default=True, strict=True, description="Keep it to the end of the paid period"
    )


class ChangePlanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: Annotated[str, _PLAN]


# -- responses -----------------------------------------------------------------------------


class SubscriptionResponse(BaseModel):
    subscription_id: str
    status: SubscriptionStatus
    plan: str
    amount: int
    currency: str
    interval: BillingInterval
    interval_count: int
    trial_days: int
    provider: str
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    cancel_at_period_end: bool = False
    pending_plan: str | None = None
    redirect_url: str | None = None
    approval_url: str | None = Field(
        default=None,
        description=(
            "After a plan change the vendor needs the customer to approve (PayPal): where to "
            "send them; until they do, the old plan is billed"
        ),
    )
    payments: list[str] = Field(
        default_factory=list, description="Its paid invoices and renewals, as payments"
    )
    created_at: datetime


class SubscriptionListResponse(BaseModel):
    subscriptions: list[SubscriptionResponse]


class SubscriptionHistoryResponse(BaseModel):
    subscription_id: str
    status: SubscriptionStatus
    transitions: list[SubscriptionHistoryEntry]


class PortalResponse(BaseModel):
    url: str


class Entitlement(BaseModel):
    plan: str
    subscription_id: str
    status: SubscriptionStatus
    until: datetime | None = Field(
        default=None, description="The end of the paid period (past_due: of the grace period)"
    )


class EntitlementsResponse(BaseModel):
    user: str
    plans: list[str] = Field(description="The plans the user may use now")
    entitlements: list[Entitlement]
