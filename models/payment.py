"""Payment domain types and the API's request and response bodies."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

from babel.numbers import list_currencies
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from models.subscription import BillingInterval

# Payment IDs are opaque to clients; this charset covers every provider's IDs and keeps them
# safe in Redis keys, file names and URLs.
PAYMENT_ID_PATTERN = r"^[A-Za-z0-9_\-]{3,128}$"
PaymentId = Annotated[str, StringConstraints(pattern=PAYMENT_ID_PATTERN)]
PlanCode = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_\-]{1,64}$")]
ProviderName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_\-]{1,64}$")]
# ISO 4217, as clients may write it ("ngn"): normalized to upper case.
CurrencyCode = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z]{3}$", to_upper=True, strip_whitespace=False)
]
_ISO_CURRENCIES = frozenset(list_currencies()) - {"XXX", "XTS"}  # "no currency", "testing"


class PaymentStatus(StrEnum):
    CREATED = "created"
    PENDING = "pending"
    PROCESSING = "processing"
    REQUIRES_CAPTURE = "requires_capture"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"

    @property
    def is_paid(self) -> bool:
        """Money moved: the customer is entitled to a receipt."""
        return self in _PAID


_PAID = frozenset(
    {PaymentStatus.SUCCEEDED, PaymentStatus.PARTIALLY_REFUNDED, PaymentStatus.REFUNDED}
)


class RefundStatus(StrEnum):
    """A refund's own lifecycle. Only ``succeeded`` means money went back; ``pending`` holds
    its amount against what may still be refunded until the provider says how it ended."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self is not RefundStatus.PENDING


class PaymentMethod(StrEnum):
    """The providers the service knows by name; the factory holds the classes."""

    SANDBOX = "sandbox"
    STRIPE = "stripe"
    PAYPAL = "paypal"
    MOBILEPAY = "mobilepay"
    GOOGLE_PAY = "googlepay"
    APPLE_PAY = "applepay"


class Plan(BaseModel):
    """A plan at one of its prices: what one payment is for."""

    model_config = ConfigDict(frozen=True)

    code: PlanCode
    name: str = Field(min_length=1, max_length=120)
    amount: int = Field(gt=0, description="Price in minor units of the currency")
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
    tax_rate: Decimal | None = Field(
        default=None, ge=0, lt=100, description="Percent; TAX_RATE when not given"
    )


class TaxTreatment(StrEnum):
    """How a sale was taxed, decided at checkout and printed on its receipt."""

    STANDARD = "standard"  # tax at the rate recorded with the payment
    NO_TAX = "no_tax"  # the rate is 0
    REVERSE_CHARGE = "reverse_charge"  # the buyer, VAT-registered in another country, owes it


class CataloguePlan(BaseModel):
    """A plan as the catalogue sells it: one price per currency, in minor units; the first
    is the plan's default. Configured as ``{"name": "Pro", "prices": {"EUR": 2900, "NGN":
    4500000}}`` or, for one currency, ``{"name": "Pro", "amount": 2900, "currency": "EUR"}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: PlanCode
    name: str = Field(min_length=1, max_length=120)
    prices: dict[CurrencyCode, Annotated[int, Field(gt=0, strict=True)]] = Field(min_length=1)
    tax_rate: Decimal | None = Field(
        default=None, ge=0, lt=100, description="Percent; TAX_RATE when not given"
    )
    # A recurring plan bills its price every `interval_count` `interval`s, after `trial_days`
    # free; a plan without `interval` is sold once.
    interval: BillingInterval | None = None
    interval_count: int = Field(default=1, ge=1, le=12, strict=True)
    trial_days: int = Field(default=0, ge=0, le=730, strict=True)

    @model_validator(mode="after")
    def _recurring_fields_need_an_interval(self) -> CataloguePlan:
        if self.interval is None and (self.interval_count != 1 or self.trial_days):
            raise ValueError("interval_count and trial_days are for plans with an interval")
        return self

    @property
    def recurring(self) -> bool:
        return self.interval is not None

    @model_validator(mode="before")
    @classmethod
    def _one_currency_form(cls, data: Any) -> Any:
        if not isinstance(data, dict) or ("amount" not in data and "currency" not in data):
            return data
        if "prices" in data:
            raise ValueError("give either prices or amount and currency, not both")
        rest = {key: value for key, value in data.items() if key not in ("amount", "currency")}
        currency = data.get("currency")
        if not isinstance(currency, str) or not currency.isupper():
            # The one-currency form always took upper case only; say so rather than guess.
            raise ValueError("currency must be an upper-case ISO 4217 code")
        return {**rest, "prices": {currency: data.get("amount")}}

    @field_validator("prices")
    @classmethod
    def _known_currencies(cls, prices: dict[str, int]) -> dict[str, int]:
        unknown = sorted(code for code in prices if code not in _ISO_CURRENCIES)
        if unknown:
            raise ValueError(f"not ISO 4217 currency codes: {', '.join(unknown)}")
        return prices

    @property
    def currencies(self) -> tuple[str, ...]:
        return tuple(self.prices)

    def at(self, currency: str) -> Plan:
        """This plan at its price in ``currency`` (one it has)."""
        return Plan(
            code=self.code,
            name=self.name,
            amount=self.prices[currency],
            currency=currency,
            tax_rate=self.tax_rate,
        )


class HistoryEntry(BaseModel):
    at: datetime
    status: PaymentStatus
    previous: PaymentStatus | None = None
    cause: str = Field(description="api, verify, webhook:<event id>, checkout, refund, ...")


class ProviderAttempt(BaseModel):
    """One try at a provider while creating a payment."""

    provider: str
    outcome: Literal["succeeded", "failed", "skipped"]
    code: str | None = None
    latency_ms: float | None = None
    at: datetime | None = Field(default=None, description="When the attempt started")


class PaymentRecord(BaseModel):
    """What the store keeps about one payment."""

    payment_id: str
    provider: str
    reference: str
    plan: str
    amount: int
    currency: str
    status: PaymentStatus
    owner: str | None = None
    customer_email: str | None = None
    return_url: str | None = None
    cancel_url: str | None = None
    redirect_url: str | None = None
    payment_method: str | None = None
    capture_id: str | None = None
    amount_captured: int | None = Field(
        default=None, description="What a partial capture took (None: the whole amount)"
    )
    amount_refunded: int = Field(default=0, description="Sum of succeeded refunds")
    amount_pending_refund: int = Field(default=0, description="Sum of refunds still pending")
    attempts: list[ProviderAttempt] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    paid_at: datetime | None = None
    # For the receipt. The buyer as the client gave it at create-intent (never used for
    # amounts); the tax decided then; how the customer paid, where the provider tells;
    # whether the money was test money (a sandbox or a vendor's test mode); and the receipt's
    # number, allocated in the receipt ledger when the payment is paid and kept here.
    buyer_name: str | None = None
    buyer_address: str | None = None
    buyer_country: str | None = None
    buyer_vat_id: str | None = None
    tax_rate: Decimal | None = None
    tax_amount: int | None = None
    tax_treatment: TaxTreatment | None = None
    card_brand: str | None = None
    card_last4: str | None = None
    wallet: str | None = None
    test_mode: bool = False
    receipt_number: str | None = None
    # A subscription's invoice or renewal: the subscription (sub_...) and the service period
    # it paid for (printed on its receipt).
    subscription_id: str | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None


class RefundHistoryEntry(BaseModel):
    at: datetime
    status: RefundStatus
    previous: RefundStatus | None = None
    cause: str = Field(description="api, verify, webhook:<event id>, reconcile, ...")


class RefundRecord(BaseModel):
    """One refund of a payment, as the store keeps it."""

    refund_id: str = Field(description="Ours: rf_...")
    payment_id: str
    provider: str
    provider_refund_id: str | None = None
    amount: int
    currency: str
    status: RefundStatus
    reason: str | None = None
    failure_code: str | None = Field(
        default=None, description="Why the provider said it failed, when it said"
    )
    credit_note_number: str | None = Field(
        default=None, description="Its credit note's number, allocated when the refund succeeds"
    )
    created_at: datetime
    updated_at: datetime


# -- requests ------------------------------------------------------------------------------


def _also_boolean(schema: dict[str, Any]) -> None:
    """Document that a field taking an object or null also takes a boolean."""
    schema.setdefault("anyOf", []).insert(0, {"type": "boolean"})


class SandboxWebhooks(BaseModel):
    """How the sandbox delivers one payment's webhooks: each option is a fault to inject."""

    model_config = ConfigDict(extra="forbid")

    duplicate: int = Field(
        default=1, ge=1, le=10, description="Deliver each event this many times, same event id"
    )
    delay_ms: int = Field(
        default=0, ge=0, le=60_000, description="Wait this long before delivering each event"
    )
    reorder: bool = Field(
        default=False,
        description=(
            "Hold each event until the payment's next one, then deliver the newer one first "
            "(an event with no successor goes out alone after a few seconds)"
        ),
    )
    bad_signature: bool = Field(
        default=False,
        description="Sign with a wrong key: the service must refuse it (400) and change nothing",
    )


class SandboxBehaviour(BaseModel):
    """Fault injection for the sandbox provider (ignored by every other provider)."""

    model_config = ConfigDict(extra="forbid")

    fail: Literal["decline", "unavailable", "error", "lost_answer"] | None = Field(
        default=None,
        description=(
            "decline: card declined (402); unavailable: refused before it arrived (503, may "
            "fail over); error: the provider answered 5xx (502); lost_answer: created, but the "
            "answer was lost (503, outcome unknown, never fails over)"
        ),
    )
    delay_ms: int = Field(default=0, ge=0, le=60_000, description="Answer this much later")
    refund: Literal["pending_then_succeeded", "pending_then_failed"] | None = Field(
        default=None,
        description=(
            "Hold each refund of this payment pending, then settle it as succeeded or failed "
            "after `refund_settle_ms`, telling the service as a vendor would; without it "
            "refunds succeed at once"
        ),
    )
    refund_settle_ms: int = Field(
        default=2_000, ge=0, le=60_000, description="How long a refund stays pending"
    )
    webhooks: SandboxWebhooks | None = Field(
        default=None,
        description=(
            "Push this payment's events as signed webhooks to the service's own "
            "`/api/v1/payment/webhook/sandbox` (`true`, or an object to add delivery faults); "
            "the checkout page then no longer tells the service directly"
        ),
        json_schema_extra=_also_boolean,
    )

    @field_validator("webhooks", mode="before")
    @classmethod
    def _webhooks_flag(cls, value: object) -> object:
        # `true` asks for plain deliveries, `false` for none; an object picks delivery faults.
        if value is True:
            return {}
        if value is False:
            return None
        return value


_Line = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class Buyer(BaseModel):
    """Who buys, as the receipt names them. Printed, never used for amounts; a VAT id may
    make the sale reverse charge where the service allows it."""

    model_config = ConfigDict(extra="forbid")

    name: _Line | None = None
    address: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
        | None
    ) = Field(default=None, description="Postal address; lines separated by newlines")
    country: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")] | None = Field(
        default=None, description="ISO 3166-1 alpha-2"
    )
    vat_id: (
        Annotated[
            str,
            StringConstraints(
                strip_whitespace=True, to_upper=True, pattern=r"^[A-Z]{2}[A-Z0-9+*]{2,13}$"
            ),
        ]
        | None
    ) = Field(default=None, description="VAT id with its country prefix, e.g. FR12345678901")

    @field_validator("name", "address")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        # Newlines separate address lines; no other control characters reach the PDF.
        if value is not None and any(ord(c) < 32 and c != "\n" for c in value):
            raise ValueError("control characters are not allowed")
        return value

    @field_validator("vat_id", mode="before")
    @classmethod
    def _compact(cls, value: object) -> object:
        # "DE 123 456 789" and "de123456789" are the same id.
        if isinstance(value, str):
            return value.replace(" ", "").replace(".", "").replace("-", "").upper()
        return value


class CreateIntentRequest(BaseModel):
    """Body of create-intent. Any amount a client sends is ignored: prices come from the
    server-side plan catalogue only (``currency`` chooses among the plan's prices)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    plan: PlanCode
    provider: ProviderName | None = Field(
        default=None,
        validation_alias="provider",
        description="Provider name; `payment_method` is accepted as an alias.",
    )
    payment_method: ProviderName | None = Field(default=None, exclude=True)
    return_url: AnyHttpUrl | None = Field(default=None, max_length=2048)
    cancel_url: AnyHttpUrl | None = Field(default=None, max_length=2048)
    customer_email: EmailStr | None = None
    currency: CurrencyCode | None = Field(
        default=None,
        description=(
            "ISO 4217 code of the plan price to pay (case-insensitive); the plan's first "
            "price when omitted. It picks one of the catalogue's prices, never sets an amount."
        ),
    )
    buyer: Buyer | None = Field(
        default=None, description="The buyer's name, address and VAT id, for the receipt"
    )
    ui_mode: Literal["hosted", "embedded"] | None = Field(
        default=None, description="Stripe only: hosted Checkout (default) or embedded Elements"
    )
    capture_method: Literal["automatic", "manual"] | None = Field(
        default=None, description="Providers with capture: authorize now, capture later"
    )
    sandbox: SandboxBehaviour | None = Field(
        default=None,
        description=(
            "Sandbox only: make this payment fail or answer slowly, or push its webhooks "
            "with delivery faults"
        ),
    )

    @property
    def provider_name(self) -> str | None:
        return self.provider or self.payment_method

    def provider_options(self) -> dict[str, Any]:
        """What the providers read besides the plan (IntentRequest.options): each takes what
        is meant for it and ignores the rest."""
        options: dict[str, Any] = {
            key: value
            for key, value in (("ui_mode", self.ui_mode), ("capture_method", self.capture_method))
            if value is not None
        }
        if self.sandbox is not None:
            options["sandbox"] = self.sandbox.model_dump()
        return options

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that make two requests the same request, for idempotency."""
        fields: dict[str, Any] = {
            "plan": self.plan,
            "provider": self.provider_name,
            "return_url": str(self.return_url) if self.return_url else None,
            "cancel_url": str(self.cancel_url) if self.cancel_url else None,
            "customer_email": self.customer_email,
            "ui_mode": self.ui_mode,
            "capture_method": self.capture_method,
            "sandbox": self.sandbox.model_dump() if self.sandbox else None,
            # Only when given: a key claimed before currencies existed keeps its fingerprint.
            **({"currency": self.currency} if self.currency else {}),
        }
        if self.buyer is not None:  # absent: the same fingerprint as before buyers existed
            fields["buyer"] = self.buyer.model_dump()
        return fields


class VerifyRequest(BaseModel):
    payment_id: PaymentId


class CaptureRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int | None = Field(
        default=None,
        gt=0,
        strict=True,  # 100, never true, "100" or 1.0
        description="Minor units to capture, at most the payment's amount (the rest is "
        "released); omit to capture all of it. Only for providers with partial_capture.",
    )


class RefundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int | None = Field(
        default=None,
        gt=0,
        strict=True,  # 100, never true, "100" or 1.0
        description="Minor units; omit for a full refund of what is left",
    )
    reason: str | None = Field(
        default=None,
        max_length=500,
        description="Why the money goes back; kept with the refund and sent to the provider",
    )

    def fingerprint_fields(self) -> dict[str, Any]:
        return {"amount": self.amount, "reason": self.reason}


# -- responses -----------------------------------------------------------------------------


class PlanPrice(BaseModel):
    currency: str
    amount: int = Field(description="Minor units")
    amount_formatted: str
    providers: list[str] = Field(description="Providers that can take a payment in it now")


class CataloguePlanResponse(BaseModel):
    code: str
    name: str
    default_currency: str = Field(description="Charged when create-intent names none")
    prices: list[PlanPrice]
    interval: BillingInterval | None = Field(
        default=None, description="Recurring plans: billed every interval_count intervals"
    )
    interval_count: int | None = None
    trial_days: int | None = None


class PlanListResponse(BaseModel):
    plans: list[CataloguePlanResponse]


class IntentResponse(BaseModel):
    payment_id: str
    status: PaymentStatus
    plan: str
    amount: int
    currency: str
    provider: str
    redirect_url: str | None = None
    client_secret: str | None = None
    publishable_key: str | None = None


class PaymentResponse(BaseModel):
    payment_id: str
    status: PaymentStatus
    plan: str
    amount: int
    currency: str
    provider: str
    amount_captured: int | None = Field(
        default=None, description="What was captured, when only part of the amount was"
    )
    amount_refunded: int = 0
    amount_pending_refund: int = 0
    receipt_url: str | None = None


class RefundView(BaseModel):
    """A refund as the API shows it."""

    refund_id: str
    payment_id: str
    amount: int
    currency: str
    status: RefundStatus
    reason: str | None = None
    failure_code: str | None = None
    provider_refund_id: str | None = None
    created_at: datetime
    updated_at: datetime
    history: list[RefundHistoryEntry] = Field(default_factory=list)


class RefundResponse(PaymentResponse):
    """The payment after a refund was asked for, with the refund it made (200 when the
    refund is final, 202 while it is pending)."""

    refund: RefundView


class RefundListResponse(BaseModel):
    payment_id: str
    refunds: list[RefundView]
    amount_refunded: int
    amount_pending_refund: int


class PaymentHistoryResponse(BaseModel):
    """A payment's provider attempts (where it was tried, how each went) and every change
    of its status, oldest first."""

    payment_id: str
    status: PaymentStatus
    provider: str
    reference: str
    attempts: list[ProviderAttempt]
    transitions: list[HistoryEntry]


class TaxView(BaseModel):
    """A document's tax lines, in minor units: net + tax == gross."""

    name: str
    rate: Decimal = Field(description="Percent")
    treatment: TaxTreatment
    net: int
    tax: int
    gross: int


class CreditNoteView(BaseModel):
    number: str
    refund_id: str
    amount: int
    currency: str
    tax: TaxView
    pdf_url: str
    pdf_sha256: str


class ReceiptResponse(BaseModel):
    payment_id: str
    receipt_number: str
    document: Literal["receipt", "payment_confirmation"] = Field(
        description="payment_confirmation where a merchant of record sold (its tax receipt)"
    )
    merchant_of_record: str | None = None
    test: bool = Field(description="Test money: the PDF carries a TEST mark")
    plan: str
    plan_name: str
    amount: int = Field(
        description="What was paid, in minor units: the part captured, where only part of "
        "the authorization was"
    )
    currency: str
    amount_formatted: str
    tax: TaxView
    payment_method: str
    status: PaymentStatus
    paid_at: datetime
    pdf_url: str
    pdf_sha256: str = Field(description="SHA-256 of the PDF's bytes, as the hash chain holds")
    signed: bool = Field(description="The PDF carries a PAdES signature")
    credit_notes: list[CreditNoteView] = Field(default_factory=list)


class Problem(BaseModel):
    """RFC 9457 problem details, as every error is rendered."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class ProviderHealth(BaseModel):
    provider: str
    status: Literal["connected", "unconfigured", "error", "circuit_open"]
    configured: bool
    breaker: str | None = None
    latency_ms: float | None = None
    message: str | None = None


class ServiceHealth(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    redis: dict[str, Any]
    providers: dict[str, ProviderHealth]
