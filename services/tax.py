"""Tax on a sale: decided once at checkout, recorded with the payment, printed on its receipt.

Amounts are integers in minor units. The one rounding rule: the tax amount is rounded half up
to a whole minor unit (0.5 cent up), and the other figure is what is left, so that
net + tax == gross always holds exactly:

- prices include tax: tax = round_half_up(gross * rate / (100 + rate)), net = gross - tax;
- prices exclude tax: tax = round_half_up(net * rate / 100), gross = net + tax.

A refund gives back tax in proportion, allocated on the running total of refunds so that the
credit notes of a fully refunded payment add up to exactly the receipt's tax. A payment of
which only part was captured is a sale of that part: its tax in proportion, by the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from models.payment import Buyer, PaymentRecord, Plan, TaxTreatment

# The VAT id prefix that is not the country's ISO code.
_VAT_PREFIX_COUNTRY = {"EL": "GR", "XI": "GB"}


def round_half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def tax_included(gross: int, rate: Decimal) -> int:
    """The tax inside a price that includes it."""
    return round_half_up(Decimal(gross) * rate / (100 + rate))


def tax_on_top(net: int, rate: Decimal) -> int:
    """The tax added to a price that excludes it."""
    return round_half_up(Decimal(net) * rate / 100)


def vat_country(vat_id: str) -> str:
    prefix = vat_id[:2].upper()
    return _VAT_PREFIX_COUNTRY.get(prefix, prefix)


@dataclass(frozen=True, slots=True)
class TaxLines:
    """What a receipt (or a credit note, for what went back) says about tax."""

    net: int
    tax: int
    gross: int
    rate: Decimal
    treatment: TaxTreatment
    name: str


@dataclass(frozen=True, slots=True)
class Sale:
    """The tax decision for one sale: what to charge and how much of it is tax."""

    gross: int
    tax: int
    rate: Decimal
    treatment: TaxTreatment

    def charged(self, plan: Plan) -> Plan:
        """The plan at the price charged (tax added on top where prices exclude it)."""
        return plan if plan.amount == self.gross else plan.model_copy(update={"amount": self.gross})


@dataclass(frozen=True, slots=True)
class TaxPolicy:
    default_rate: Decimal = Decimal(0)
    name: str = "VAT"
    prices_include_tax: bool = True
    reverse_charge_enabled: bool = False
    seller_country: str | None = None

    def rate_for(self, plan: Plan) -> Decimal:
        return plan.tax_rate if plan.tax_rate is not None else self.default_rate

    def treatment(self, rate: Decimal, buyer: Buyer | None) -> TaxTreatment:
        if (
            self.reverse_charge_enabled
            and self.seller_country
            and buyer is not None
            and buyer.vat_id
            and vat_country(buyer.vat_id) != self.seller_country
        ):
            return TaxTreatment.REVERSE_CHARGE
        return TaxTreatment.NO_TAX if rate == 0 else TaxTreatment.STANDARD

    def sale(self, plan: Plan, buyer: Buyer | None) -> Sale:
        """What a buyer pays for ``plan`` and the tax in it. The catalogue price is the
        gross when prices include tax (a reverse-charge buyer pays it too, all of it net),
        and the net otherwise (a reverse-charge buyer pays just that)."""
        rate = self.rate_for(plan)
        treatment = self.treatment(rate, buyer)
        taxed = treatment is TaxTreatment.STANDARD
        if self.prices_include_tax:
            tax = tax_included(plan.amount, rate) if taxed else 0
            return Sale(gross=plan.amount, tax=tax, rate=rate, treatment=treatment)
        tax = tax_on_top(plan.amount, rate) if taxed else 0
        return Sale(gross=plan.amount + tax, tax=tax, rate=rate, treatment=treatment)

    def lines(self, record: PaymentRecord, plan: Plan) -> TaxLines:
        """The receipt's tax lines for what was paid: the whole sale, or where only part of
        the authorization was captured, that part (its tax in proportion)."""
        sale = self._sale_lines(record, plan)
        captured = record.amount_captured
        if captured is not None and 0 < captured < sale.gross:
            return refunded_tax(sale, 0, captured)  # the same proportion, from zero
        return sale

    def _sale_lines(self, record: PaymentRecord, plan: Plan) -> TaxLines:
        """The sale's tax lines: as recorded at checkout, or for a payment made before tax
        was recorded, its amount read as a price including the plan's rate."""
        if record.tax_amount is not None and record.tax_treatment is not None:
            rate = record.tax_rate if record.tax_rate is not None else Decimal(0)
            return TaxLines(
                net=record.amount - record.tax_amount,
                tax=record.tax_amount,
                gross=record.amount,
                rate=rate,
                treatment=record.tax_treatment,
                name=self.name,
            )
        rate = self.rate_for(plan)
        treatment = TaxTreatment.NO_TAX if rate == 0 else TaxTreatment.STANDARD
        tax = tax_included(record.amount, rate)
        return TaxLines(
            net=record.amount - tax,
            tax=tax,
            gross=record.amount,
            rate=rate,
            treatment=treatment,
            name=self.name,
        )


def refunded_tax(sale: TaxLines, refunded_before: int, amount: int) -> TaxLines:
    """The tax inside a refund of ``amount`` after ``refunded_before`` went back already: in
    proportion to the sale's, rounded on the running total so that refunds of the whole
    amount give back exactly the sale's tax."""
    if sale.gross <= 0 or sale.tax == 0:
        tax = 0
    else:
        after = round_half_up(Decimal(refunded_before + amount) * sale.tax / sale.gross)
        before = round_half_up(Decimal(refunded_before) * sale.tax / sale.gross)
        tax = after - before
    return TaxLines(
        net=amount - tax,
        tax=tax,
        gross=amount,
        rate=sale.rate,
        treatment=sale.treatment,
        name=sale.name,
    )
