"""What a receipt or a credit note says: the template context, built from the payment record,
the ledger's number and the tax decided at checkout, worded and formatted for the locale.

Everything here comes from the record and the settings, never from the clock, so that
rendering the same document again gives the same bytes (the hash chain depends on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from babel.dates import format_date, format_time
from babel.numbers import format_decimal

from models.payment import PaymentRecord, Plan, RefundRecord, TaxTreatment
from services.money import format_amount
from services.receipt_text import TEXTS
from services.tax import TaxLines

# How the payment-method line names a method; unknown ones print as the provider gave them.
_METHODS = {"card": "card", "sandbox": "sandbox", "paypal": "PayPal", "link": "Link"}
_WALLETS = {
    "apple_pay": "Apple Pay",
    "google_pay": "Google Pay",
    "samsung_pay": "Samsung Pay",
    "link": "Link",
    "masterpass": "Masterpass",
    "visa_checkout": "Visa Checkout",
}
_BRANDS = {
    "visa": "Visa",
    "mastercard": "Mastercard",
    "amex": "American Express",
    "discover": "Discover",
    "diners": "Diners Club",
    "jcb": "JCB",
    "unionpay": "UnionPay",
    "cartes_bancaires": "Cartes Bancaires",
}


@dataclass(frozen=True, slots=True)
class Seller:
    name: str
    address: str
    vat_id: str | None = None
    email: str | None = None
    website: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderFacts:
    """What the receipt needs to know about the payment's provider."""

    display_name: str
    merchant_of_record: str | None = None  # who sold, when it is not the merchant


class Formatter:
    """Amounts, dates and words in one locale."""

    def __init__(self, locale: str) -> None:
        self.locale = locale
        self.text = TEXTS[locale]

    def amount(self, minor: int, currency: str) -> str:
        return format_amount(minor, currency, self.locale)

    def rate(self, rate: Decimal) -> str:
        return str(format_decimal(rate.normalize(), locale=self.locale))

    def moment(self, when: datetime) -> str:
        when = when.astimezone(UTC)
        day = format_date(when, "long", locale=self.locale)
        return f"{day}, {format_time(when, 'HH:mm', locale=self.locale)} UTC"

    def day(self, when: datetime) -> str:
        return str(format_date(when.astimezone(UTC), "long", locale=self.locale))


def payment_method_line(record: PaymentRecord, text: Any) -> str:
    """'Card: Visa ending in 4242 via Apple Pay', 'PayPal', 'Sandbox test payment (Visa ...)'."""
    method = record.payment_method or record.provider
    label = {"card": text["card"], "sandbox": text["sandbox"]}.get(method) or _METHODS.get(
        method, method
    )
    card = []
    if record.card_brand:
        card.append(_BRANDS.get(record.card_brand, record.card_brand.title()))
    if record.card_last4:
        card.append(f"{text['card_ending']} {record.card_last4}")
    if record.wallet:
        card.append(f"{text['via']} {_WALLETS.get(record.wallet, record.wallet)}")
    if not card:
        return label
    detail = " ".join(card)
    return f"{label}: {detail}" if method == "card" else f"{label} ({detail})"


def _tax_rows(tax: TaxLines, currency: str, fmt: Formatter) -> dict[str, Any]:
    text = fmt.text
    note = None
    if tax.treatment is TaxTreatment.REVERSE_CHARGE:
        note = text["reverse_charge"].format(tax=tax.name)
    elif tax.treatment is TaxTreatment.NO_TAX or tax.tax == 0:
        note = text["no_tax"].format(tax=tax.name)
    return {
        "net": fmt.amount(tax.net, currency),
        "tax": fmt.amount(tax.tax, currency),
        "gross": fmt.amount(tax.gross, currency),
        "tax_label": text["tax_line"].format(tax=tax.name, rate=fmt.rate(tax.rate)),
        "charged": tax.treatment is TaxTreatment.STANDARD and tax.tax > 0,
        "note": note,
    }


def _common(
    record: PaymentRecord,
    plan: Plan,
    seller: Seller,
    provider: ProviderFacts,
    fmt: Formatter,
) -> dict[str, Any]:
    buyer_lines = [
        line
        for line in (
            record.buyer_name,
            *(record.buyer_address or "").split("\n"),
            record.buyer_country,
            record.customer_email,
        )
        if line
    ]
    return {
        "lang": fmt.locale,
        "t": fmt.text,
        "seller": seller,
        "seller_lines": [line.strip() for line in seller.address.split("\n") if line.strip()],
        "buyer_lines": buyer_lines,
        "buyer_vat_id": record.buyer_vat_id,
        "plan_name": plan.name,
        "plan_code": plan.code,
        "currency": record.currency,
        "payment_id": record.payment_id,
        "provider": provider.display_name,
        "provider_reference": record.capture_id or record.payment_id,
        "payment_method": payment_method_line(record, fmt.text),
        "merchant_of_record": provider.merchant_of_record,
        "test": record.test_mode,
    }


def receipt_context(
    record: PaymentRecord,
    plan: Plan,
    *,
    number: str,
    tax: TaxLines,
    seller: Seller,
    provider: ProviderFacts,
    locale: str,
) -> dict[str, Any]:
    fmt = Formatter(locale)
    paid_at = record.paid_at or record.updated_at
    title = fmt.text["payment_confirmation" if provider.merchant_of_record else "receipt"]
    return {
        **_common(record, plan, seller, provider, fmt),
        "template": "receipt.html",
        "kind": "receipt",
        "title": title,
        "number": number,
        "date": fmt.moment(paid_at),
        "created": paid_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # What was paid: the whole authorization, or the part of it that was captured.
        "unit_price": fmt.amount(tax.gross, record.currency),
        "partial_capture": (
            fmt.text["partial_capture"].format(
                captured=fmt.amount(tax.gross, record.currency),
                authorized=fmt.amount(record.amount, record.currency),
            )
            if tax.gross < record.amount
            else None
        ),
        "paid_on": fmt.day(paid_at),
        # A subscription's invoice: the period it paid for.
        "service_period": (
            f"{fmt.day(record.period_start)} - {fmt.day(record.period_end)}"
            if record.period_start and record.period_end
            else None
        ),
        **_tax_rows(tax, record.currency, fmt),
    }


def credit_note_context(
    record: PaymentRecord,
    plan: Plan,
    refund: RefundRecord,
    *,
    number: str,
    receipt_number: str,
    tax: TaxLines,
    seller: Seller,
    provider: ProviderFacts,
    locale: str,
) -> dict[str, Any]:
    fmt = Formatter(locale)
    return {
        **_common(record, plan, seller, provider, fmt),
        "template": "credit_note.html",
        "kind": "credit_note",
        "title": fmt.text["credit_note"],
        "number": number,
        "receipt_number": receipt_number,
        "date": fmt.moment(refund.updated_at),
        "created": refund.updated_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "refund_id": refund.refund_id,
        "refund_reference": refund.provider_refund_id or refund.refund_id,
        "reason": refund.reason,
        **_tax_rows(tax, record.currency, fmt),
    }
