"""Minor units and how amounts read on a receipt."""

from __future__ import annotations

from decimal import Decimal

from babel.numbers import format_currency

# ISO 4217 minor-unit exponents that are not 2.
_EXPONENTS = {
    "BIF": 0,
    "CLP": 0,
    "DJF": 0,
    "GNF": 0,
    "ISK": 0,
    "JPY": 0,
    "KMF": 0,
    "KRW": 0,
    "PYG": 0,
    "RWF": 0,
    "UGX": 0,
    "VND": 0,
    "VUV": 0,
    "XAF": 0,
    "XOF": 0,
    "XPF": 0,
    "BHD": 3,
    "IQD": 3,
    "JOD": 3,
    "KWD": 3,
    "LYD": 3,
    "OMR": 3,
    "TND": 3,
}


def currency_exponent(currency: str) -> int:
    return _EXPONENTS.get(currency.upper(), 2)


def to_major(amount: int, currency: str) -> Decimal:
    """1900 EUR -> Decimal('19.00'); 1900 JPY -> Decimal('1900')."""
    exponent = currency_exponent(currency)
    return (Decimal(amount) / (Decimal(10) ** exponent)).quantize(Decimal(1).scaleb(-exponent))


def format_amount(amount: int, currency: str, locale: str = "en") -> str:
    """A human amount as CLDR writes it for ``locale``: '€1,234.50', '¥1,900', 'NGN45,000.00'
    in English, '1.234,50 €' in German. The digits are ISO 4217's (``to_major``), whatever
    CLDR's own idea of the currency's decimals."""
    return str(
        format_currency(
            to_major(amount, currency),
            currency.upper(),
            locale=locale,
            # CLDR's digits for the currency, but never fewer than the amount has: an ISO
            # amount is printed exactly, never rounded to CLDR's idea of the currency.
            decimal_quantization=False,
        )
    )
