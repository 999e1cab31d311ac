"""The contract every payment provider implements.

A provider is a stateless adapter between the service and one vendor's API. It converts the
vendor's data to the types below at its edge (it never returns SDK objects), maps unknown
vendor statuses to ``PENDING`` (only an explicit success or failure from the vendor is final),
and maps vendor exceptions to ``services.errors`` (declined, unavailable, misconfigured, upstream).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from models.payment import PaymentStatus, Plan, RefundStatus
from models.subscription import BillingInterval, SubscriptionStatus
from services.errors import OperationNotSupported

if TYPE_CHECKING:
    import httpx2


class Capability(StrEnum):
    CARD = "card"
    WALLET = "wallet"
    REDIRECT = "redirect"
    EMBEDDED = "embedded"
    CAPTURE = "capture"
    PARTIAL_CAPTURE = "partial_capture"
    CANCEL = "cancel"
    REFUND = "refund"
    PARTIAL_REFUND = "partial_refund"
    WEBHOOKS = "webhooks"
    SUBSCRIPTIONS = "subscriptions"


class LocalEvents:
    """How a provider that lives inside this service (a timer of its own, not a vendor's
    server) tells the service of a change it made, where a vendor would push a webhook.

    The app connects the service once it is built; until then, and without a service,
    events are dropped (the reconciler and verify still find the change)."""

    def __init__(self) -> None:
        self._sink: EventSink | None = None

    def connect(self, sink: EventSink) -> None:
        self._sink = sink

    async def publish(self, provider: str, event: WebhookEvent, *, cause: str) -> None:
        """``cause`` is what the payment's history will say moved it."""
        if self._sink is not None:
            await self._sink(provider, event, cause)


EventSink = Callable[[str, "WebhookEvent", str], Awaitable[None]]


class ProviderKeyValue(Protocol):
    """A small key-value store in the service's Redis, for a provider that keeps state there
    (one simulated in-process): keys in the provider's own namespace, each with a hash tag so
    that a script touches one Redis Cluster slot, atomic scripts, and the few reads it needs."""

    @property
    def namespace(self) -> str:
        """What every key of this provider starts with."""

    def key(self, tag: str) -> str:
        """The provider's key for ``tag`` (e.g. a payment id), hash-tagged on it; suffixes
        appended to it stay in the same slot."""

    def script(self, lua: str) -> Callable[..., Awaitable[Any]]:
        """A Lua script, called as ``await script(keys=[...], args=[...])``."""

    async def read_hash(self, key: str) -> dict[str, str]: ...

    async def read_hash_field(self, key: str, field: str) -> str | None: ...

    async def read_hash_fields(self, key: str, fields: list[str]) -> list[str | None]: ...

    async def read_list(self, key: str) -> list[str]: ...

    async def remove_from_list(self, key: str, value: str) -> int:
        """Remove one occurrence of ``value``; how many were removed (0 or 1)."""

    async def append_capped(self, key: str, value: str, *, keep: int, ttl_s: int) -> None:
        """Append ``value`` to a list that keeps its last ``keep`` entries, for ``ttl_s``."""

    async def ping(self) -> None: ...


class ProviderMappings(Protocol):
    """The service's table of our IDs and a vendor's (entity ``plan``: our plan code and
    the vendor's price or variant; ``payment``, ``customer``, ...), for a provider that must
    name a vendor object of ours (a plan mapped to a vendor price) or record one it made."""

    async def external_id(self, provider: str, entity: str, local_id: str) -> str | None:
        """The vendor's ID mapped to our ``local_id``, or None."""

    async def local_id(self, provider: str, entity: str, external_id: str) -> str | None:
        """Our ID mapped to the vendor's ``external_id``, or None."""

    async def link(self, provider: str, entity: str, local_id: str, external_id: str) -> None:
        """Map ``local_id`` to ``external_id`` (both ways)."""


@dataclass(frozen=True, slots=True)
class ProviderDeps:
    """Shared clients handed to providers when the app starts, and the facts about this
    deployment that are not any one provider's configuration."""

    # The provider's own namespace in the service's Redis, by provider name.
    key_value: Callable[[str], ProviderKeyValue]
    http: httpx2.AsyncClient
    events: LocalEvents = field(default_factory=LocalEvents)
    mappings: ProviderMappings | None = None  # None where nothing is stored (some tests)
    timeout_s: float = 10.0  # each vendor call's (PROVIDER_TIMEOUT_SECONDS)
    production: bool = False  # real money moves here: test-money providers refuse to run


@dataclass(frozen=True, slots=True)
class IntentRequest:
    """What the service asks a provider to create. Amount and currency come from the plan."""

    reference: str  # our order reference, made before the provider is called
    plan: Plan
    idempotency_key: str  # stable for one logical attempt; pass it as the vendor's key
    base_url: str  # where this service is reachable, for pages it serves itself
    user_id: str | None = None
    customer_email: str | None = None
    return_url: str | None = None
    cancel_url: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # ui_mode, capture_method, ...

    @property
    def amount(self) -> int:
        return self.plan.amount

    @property
    def currency(self) -> str:
        return self.plan.currency


@dataclass(frozen=True, slots=True)
class IntentResult:
    payment_id: str  # carries the provider's prefix, so the factory can route it back
    status: PaymentStatus
    redirect_url: str | None = None
    client_secret: str | None = None
    publishable_key: str | None = None


@dataclass(frozen=True, slots=True)
class RefundResult:
    """The provider's truth about one refund, as of now."""

    provider_refund_id: str
    amount: int
    status: RefundStatus  # unknown vendor statuses are pending
    currency: str | None = None
    refund_id: str | None = None  # ours (rf_...), when the vendor carries it back
    failure_code: str | None = None  # the vendor's reason, when it failed


@dataclass(frozen=True, slots=True)
class CardDetails:
    """What a receipt may print about how the customer paid: never more than the brand and
    the last four digits of a card, or the wallet it was paid through."""

    brand: str | None = None  # visa, mastercard, amex, ...
    last4: str | None = None
    wallet: str | None = None  # apple_pay, google_pay, link, ...


@dataclass(frozen=True, slots=True)
class PaymentState:
    """The provider's truth about one payment, as of now.

    ``status`` may say refunded or partially refunded; the service keeps refunds as records
    of their own, so what counts is ``refunds``: the payment's refunds as the provider lists
    them (None when this answer does not list them)."""

    payment_id: str
    status: PaymentStatus
    amount: int | None = None
    currency: str | None = None
    # What was captured, where the provider can capture part of the amount (None: all of it,
    # once paid). Refunds are limited to it.
    amount_captured: int | None = None
    capture_id: str | None = None
    payment_method: str | None = None  # e.g. "card", a wallet: how the customer paid
    vendor_status: str | None = None  # the vendor's own word, for logs
    refunds: tuple[RefundResult, ...] | None = None
    card: CardDetails | None = None  # for the receipt, where the vendor tells it


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One provider event, normalized.

    ``verified`` says whether the signature proved the event came from the provider. An
    unverified event is never trusted on its own word: the service only re-verifies the
    payment through the provider's API.
    """

    event_id: str
    event_type: str
    verified: bool
    payment_id: str | None = None
    status: PaymentStatus | None = None  # the state the event claims, if it names one
    refund: RefundResult | None = None  # the refund the event is about, if it is about one
    capture_id: str | None = None
    occurred_at: datetime | None = None
    # Our order reference (IntentRequest.reference) when the event carries it: events about a
    # vendor object other than the one whose ID we stored (a payment object the vendor made
    # for the checkout we created) are found by it.
    reference: str | None = None
    # How the customer paid, when a verified event says (taken as PaymentState.card).
    payment_method: str | None = None
    card: CardDetails | None = None
    # What a partial capture took, when a verified event says (taken as
    # PaymentState.amount_captured): a capture made at the vendor limits refunds too.
    amount_captured: int | None = None
    # The subscription the event is about (customer.subscription.*, BILLING.SUBSCRIPTION.*,
    # subscription.*), and the invoice it paid or failed, if any.
    subscription: SubscriptionState | None = None
    invoice: InvoicePayment | None = None


@dataclass(frozen=True, slots=True)
class RecurringPrice:
    """A recurring plan at one of its prices, as a provider bills it: ``amount`` minor units
    of ``currency`` every ``interval_count`` ``interval``s, after ``trial_days`` free."""

    plan: Plan
    interval: BillingInterval
    interval_count: int = 1
    trial_days: int = 0

    @property
    def key(self) -> str:
        """What identifies this price among the plan's: a new key is a new vendor price (a
        price change never edits an old one). Our ``plan``/``price`` mappings use it."""
        return (
            f"{self.plan.code}:{self.plan.currency}:{self.plan.amount}:"
            f"{self.interval_count}{self.interval}:{self.trial_days}"
        )


@dataclass(frozen=True, slots=True)
class SubscriptionRequest:
    """What the service asks a provider to start: ``subscription_id`` is ours (sub_...), to
    be carried in the vendor's metadata so that its events lead back to our record."""

    subscription_id: str
    price: RecurringPrice
    idempotency_key: str
    base_url: str
    vendor_price_id: str | None = None  # from plan sync (mapping ``price``/``price.key``)
    user_id: str | None = None
    customer_email: str | None = None
    return_url: str | None = None
    cancel_url: str | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionStarted:
    """The vendor's subscription (or, until the customer completes the vendor's page, the
    checkout that will make it) and where to send the customer."""

    provider_subscription_id: str
    status: SubscriptionStatus
    redirect_url: str | None = None


@dataclass(frozen=True, slots=True)
class InvoicePayment:
    """One paid (or failed) invoice or renewal of a subscription, as the vendor reports it:
    the service records each paid one as a payment linked to the subscription, with its
    receipt, refundable like any payment."""

    provider_invoice_id: str
    amount: int
    currency: str
    paid: bool
    period_start: datetime | None = None
    period_end: datetime | None = None
    payment_id: str | None = None  # the vendor's payment for it, when it has its own id


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    """The vendor's truth about one subscription, as of now. Unknown vendor statuses map to
    ``incomplete`` before a first payment and to ``past_due`` after one, never to active."""

    provider_subscription_id: str
    status: SubscriptionStatus
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    cancel_at_period_end: bool = False
    vendor_price_id: str | None = None  # the price billed now
    subscription_id: str | None = None  # ours, when the vendor carries it back
    latest_invoice: InvoicePayment | None = None
    vendor_status: str | None = None  # the vendor's own word, for logs
    # A page where the customer must approve a change before the vendor applies it (a vendor
    # may ask the subscriber to consent to a plan change), when one waits; None otherwise.
    approval_url: str | None = None


@dataclass(frozen=True, slots=True)
class HealthStatus:
    healthy: bool
    message: str
    latency_ms: float | None = None


class NoSettings(BaseModel):
    """A provider with nothing to configure (or nothing secret)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class EnvironmentOnly:
    """Marks a config field that only the environment sets, never a stored configuration:
    ``api_base: Annotated[str, EnvironmentOnly()]``. An API base address is one: whoever
    could change it could send our secret key to another host, and the admin API is one
    stolen token away. Its JSON schema says ``readOnly``."""

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        described = handler(schema)
        described["readOnly"] = True
        return described


def environment_only_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` marked ``EnvironmentOnly``."""
    return frozenset(
        name
        for name, info in model.model_fields.items()
        if any(isinstance(marker, EnvironmentOnly) for marker in info.metadata)
    )


class BasePaymentProvider(abc.ABC):
    """A payment provider.

    Subclasses set the class metadata and implement the abstract methods; the optional
    operations raise ``OperationNotSupported`` unless the provider has the capability.

    ``config_model`` and ``secrets_model`` describe the provider's configuration: the admin
    API validates stored configurations with them and serves their JSON schemas, and the
    provider is built from instances of them. The app reads each field ``f`` from the
    environment as the setting ``settings_prefix + f`` (prefix ``acme_``, field ``api_key``:
    ``ACME_API_KEY``), lets a stored configuration override it field by field (except the
    fields marked ``EnvironmentOnly``) and hands the result to ``from_config``: a provider
    has one constructor path, and never sees the service's settings.
    """

    name: ClassVar[str]
    display_name: ClassVar[str]
    id_prefixes: ClassVar[tuple[str, ...]]
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    service_type: ClassVar[str] = "payment"
    # Who sells to the customer when it is not the merchant: a merchant of record computes
    # and remits the tax and issues the tax receipt itself, so our document for its payments
    # is a payment confirmation naming it, not a tax receipt.
    merchant_of_record: ClassVar[str | None] = None
    # The currencies (ISO 4217, upper case) the provider can charge; None: any the vendor
    # accepts. Routing, fallback and A/B weights only consider providers that can charge the
    # request's currency.
    currencies: ClassVar[frozenset[str] | None] = None
    settings_prefix: ClassVar[str | None] = None
    config_model: ClassVar[type[BaseModel]] = NoSettings
    secrets_model: ClassVar[type[BaseModel]] = NoSettings

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: Any, secrets: Any, deps: ProviderDeps) -> BasePaymentProvider:
        """Build the provider, with its own client instances, from ``config`` (an instance of
        ``config_model``), ``secrets`` (of ``secrets_model``) and the shared ``deps``.

        Either model is None when the environment and the stored configuration together do
        not complete it (a required field is missing, as a secret key where the vendor is not
        used): the provider is then not configured, and refuses every call with
        ``ProviderNotConfigured``. (They are typed ``Any`` here so that each provider can
        name its own models.)
        """

    # -- the original five -----------------------------------------------------------------

    @abc.abstractmethod
    def is_configured(self) -> bool:
        """True when the provider has what it needs to take payments here."""

    def get_provider_name(self) -> str:
        return self.name

    @property
    def test_mode(self) -> bool:
        """True when this provider moves test money (a simulated provider, a vendor's test
        keys): its payments' receipts carry a TEST mark."""
        return False

    def can_handle_payment_id(self, payment_id: str) -> bool:
        return payment_id.startswith(self.id_prefixes)

    @abc.abstractmethod
    async def create_payment_intent(self, request: IntentRequest) -> IntentResult:
        """Create the vendor-side payment for ``request``.

        Raises ``ProviderNotConfigured``, ``PaymentDeclined``, ``ProviderUnavailable``,
        ``ProviderMisconfigured`` or ``ProviderUpstreamError``.
        """

    @abc.abstractmethod
    async def verify_payment(self, payment_id: str) -> PaymentState:
        """Ask the vendor for the payment's current truth. Raises ``PaymentNotFound`` when
        the vendor does not know the ID, and the technical errors above."""

    # -- optional operations ---------------------------------------------------------------

    async def capture(
        self, payment_id: str, *, idempotency_key: str, amount: int | None = None
    ) -> PaymentState:
        """Capture an authorized payment: all of it, or ``amount`` minor units of it where
        the provider has ``PARTIAL_CAPTURE`` (the rest is released). Capturing twice answers
        the first result."""
        raise OperationNotSupported(f"{self.name} does not support capture")

    async def cancel(self, payment_id: str, *, idempotency_key: str) -> PaymentState:
        """Cancel a payment that has not been captured."""
        raise OperationNotSupported(f"{self.name} does not support cancel")

    async def refund(
        self,
        payment_id: str,
        *,
        refund_id: str,
        amount: int,
        currency: str,
        capture_id: str | None,
        reason: str | None = None,
    ) -> RefundResult:
        """Refund ``amount`` minor units of a paid payment.

        ``refund_id`` is ours: it is the vendor's idempotency key (asking again with it never
        refunds twice, so the service can repeat a call whose outcome it did not learn) and
        travels with the refund where the vendor keeps metadata, so that its events lead back
        to our record. A refund the vendor accepted answers its state, pending included; an
        error means the vendor made no refund (or, ``ProviderUnavailable`` with
        ``outcome_unknown``, that nobody knows yet)."""
        raise OperationNotSupported(f"{self.name} does not support refunds")

    async def get_refund(self, payment_id: str, provider_refund_id: str) -> RefundResult:
        """The vendor's truth about one refund of ``payment_id``. Raises ``NotFound`` when
        the vendor does not know it."""
        raise OperationNotSupported(f"{self.name} does not support refunds")

    # -- subscriptions (Capability.SUBSCRIPTIONS) -------------------------------------------

    async def sync_price(self, price: RecurringPrice, *, existing: str | None) -> str:
        """The vendor's price id for ``price``: ``existing`` (from our mappings) when the
        vendor still has it active, else a product and price created for it (idempotently:
        ``price.key`` is the idempotency key or the vendor-side lookup key)."""
        raise OperationNotSupported(f"{self.name} does not bill subscriptions")

    async def create_subscription(self, request: SubscriptionRequest) -> SubscriptionStarted:
        """Start a subscription: the vendor's page where the customer starts it."""
        raise OperationNotSupported(f"{self.name} does not bill subscriptions")

    async def get_subscription(self, provider_subscription_id: str) -> SubscriptionState:
        """The vendor's truth about one subscription. Raises ``NotFound`` if it has none."""
        raise OperationNotSupported(f"{self.name} does not bill subscriptions")

    async def cancel_subscription(
        self, provider_subscription_id: str, *, at_period_end: bool, idempotency_key: str
    ) -> SubscriptionState:
        """Cancel now, or at the end of the paid period (``cancel_at_period_end``)."""
        raise OperationNotSupported(f"{self.name} does not bill subscriptions")

    async def resume_subscription(
        self, provider_subscription_id: str, *, idempotency_key: str
    ) -> SubscriptionState:
        """Undo a cancel at period end, before the period ends."""
        raise OperationNotSupported(f"{self.name} does not bill subscriptions")

    async def change_subscription_price(
        self,
        provider_subscription_id: str,
        *,
        vendor_price_id: str,
        now: bool,
        prorate: bool,
        idempotency_key: str,
    ) -> SubscriptionState:
        """Bill another price: ``now`` (an upgrade: charged in full at once unless
        ``prorate``) or from the next renewal (a downgrade)."""
        raise OperationNotSupported(f"{self.name} does not bill subscriptions")

    async def customer_portal_url(self, provider_subscription_id: str, *, return_url: str) -> str:
        """The vendor's page where the customer manages the subscription."""
        raise OperationNotSupported(f"{self.name} has no customer portal")

    async def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        """Verify and normalize one webhook delivery.

        Raises ``InvalidWebhookSignature`` for a delivery that must be refused outright and
        ``InvalidWebhookPayload`` for one that is not an event.
        """
        raise OperationNotSupported(f"{self.name} does not accept webhooks")

    async def health_check(self) -> HealthStatus:
        """A cheap authenticated call to the vendor, timed."""
        return HealthStatus(healthy=self.is_configured(), message="no check implemented")

    async def aclose(self) -> None:
        """Release clients the provider owns (shared clients are closed by the app)."""
        return None
