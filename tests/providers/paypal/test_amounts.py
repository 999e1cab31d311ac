"""Minor units <-> PayPal's decimal strings, per currency: what PayPal takes is not always
what ISO 4217 says (HUF and TWD have cents in ISO 4217, none at PayPal)."""

from __future__ import annotations

import pytest

from services.payment_providers.paypal.transformers import (
    AmountNotRepresentable,
    from_paypal_value,
    to_paypal_value,
)


class TestToPayPal:
    @pytest.mark.parametrize(
        ("amount", "currency", "value"),
        [
            (1900, "EUR", "19.00"),
            (1, "EUR", "0.01"),
            (2999, "usd", "29.99"),
            (1900, "JPY", "1900"),
            (100000, "HUF", "1000"),  # ISO: 2 decimals; PayPal: none
            (25000, "TWD", "250"),
            (1234, "KWD", "1.234"),  # 3 decimals; whether PayPal takes KWD is PayPal's call
        ],
    )
    def test_value(self, amount: int, currency: str, value: str) -> None:
        assert to_paypal_value(amount, currency) == value

    @pytest.mark.parametrize(("amount", "currency"), [(1050, "HUF"), (199, "TWD")])
    def test_cents_paypal_cannot_take_are_refused(self, amount: int, currency: str) -> None:
        with pytest.raises(AmountNotRepresentable):
            to_paypal_value(amount, currency)


class TestFromPayPal:
    @pytest.mark.parametrize(
        ("value", "currency", "amount"),
        [
            ("19.00", "EUR", 1900),
            ("19.5", "EUR", 1950),
            ("1900", "JPY", 1900),
            ("1000", "HUF", 100000),
            ("1.234", "KWD", 1234),
        ],
    )
    def test_value(self, value: str, currency: str, amount: int) -> None:
        assert from_paypal_value(value, currency) == amount

    @pytest.mark.parametrize(
        ("value", "currency"), [("19.001", "EUR"), ("1.5", "JPY"), ("x", "EUR")]
    )
    def test_finer_than_the_currency_or_not_a_number(self, value: str, currency: str) -> None:
        with pytest.raises(ValueError, match=r"."):
            from_paypal_value(value, currency)

    @pytest.mark.parametrize("currency", ["EUR", "JPY", "HUF", "KWD", "USD"])
    def test_round_trip(self, currency: str) -> None:
        for amount in (100, 1900, 123400):
            assert from_paypal_value(to_paypal_value(amount, currency), currency) == amount
