"""Flutterwave's amounts are in major units: the conversions to and from our minor units are
exact for currencies of 0, 2 and 3 decimals, and a float never holds an amount."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from models.payment import PaymentStatus, RefundStatus
from services.payment_providers.flutterwave import transformers as tx


class TestMinorToMajor:
    @pytest.mark.parametrize(
        ("amount", "currency", "text"),
        [
            (4_500_000, "NGN", "45000.00"),  # 2 decimals
            (1_250_050, "NGN", "12500.50"),
            (1, "KES", "0.01"),
            (1900, "UGX", "1900"),  # 0 decimals
            (5000, "XOF", "5000"),
            (12_345, "KWD", "12.345"),  # 3 decimals
            (1, "BHD", "0.001"),
            # Past what a float holds exactly (2^53): still every digit.
            (9_007_199_254_740_993, "NGN", "90071992547409.93"),
        ],
    )
    def test_exact_text_and_back(self, amount: int, currency: str, text: str) -> None:
        assert tx.major_text(amount, currency) == text
        assert tx.to_major(amount, currency) == Decimal(text)
        assert tx.from_major(Decimal(text), currency) == amount
        assert tx.from_major(text, currency) == amount

    def test_the_json_number_is_written_from_its_digits(self) -> None:
        body = tx.encode({"currency": "NGN"}, amount=tx.major_text(9_007_199_254_740_993, "NGN"))
        assert body == b'{"amount":90071992547409.93,"currency":"NGN"}'
        assert tx.decode(body)["amount"] == Decimal("90071992547409.93")
        assert tx.encode({}, amount="5000") == b'{"amount":5000}'

    def test_integers_in_major_units_from_flutterwave(self) -> None:
        assert tx.from_major(45000, "NGN") == 4_500_000
        assert tx.from_major(1900, "UGX") == 1900
        assert tx.from_major(12, "KWD") == 12_000

    @pytest.mark.parametrize(
        ("value", "currency"),
        [("0.001", "NGN"), ("1900.5", "UGX"), ("1.2345", "KWD")],
    )
    def test_finer_than_the_currency_is_refused(self, value: str, currency: str) -> None:
        with pytest.raises(tx.AmountNotRepresentable):
            tx.from_major(Decimal(value), currency)

    @pytest.mark.parametrize("value", [None, True, 1.5, "NaN", "Infinity", "1e400", "abc", []])
    def test_what_is_not_an_amount(self, value: object) -> None:
        with pytest.raises(ValueError):
            tx.from_major(value, "NGN")

    def test_a_float_is_refused_even_when_it_looks_exact(self) -> None:
        # Our decoder never makes one; a float here would mean a conversion slipped through.
        with pytest.raises(ValueError):
            tx.from_major(45000.0, "NGN")

    def test_only_digits_go_into_the_json_text(self) -> None:
        with pytest.raises(ValueError):
            tx.encode({}, amount='1,"x":2')


class TestStatuses:
    @pytest.mark.parametrize(
        ("word", "status"),
        [
            ("successful", PaymentStatus.SUCCEEDED),
            ("SUCCESSFUL", PaymentStatus.SUCCEEDED),
            ("failed", PaymentStatus.FAILED),
            ("pending", PaymentStatus.PENDING),
            ("something-new", PaymentStatus.PENDING),
            (None, PaymentStatus.PENDING),
        ],
    )
    def test_transactions(self, word: object, status: PaymentStatus) -> None:
        assert tx.transaction_status(word) is status

    @pytest.mark.parametrize(
        ("word", "status"),
        [
            ("completed", RefundStatus.SUCCEEDED),
            ("pending", RefundStatus.PENDING),
            ("new", RefundStatus.PENDING),
            ("failed", RefundStatus.FAILED),
            ("completed-mpgs", RefundStatus.PENDING),
        ],
    )
    def test_refunds(self, word: str, status: RefundStatus) -> None:
        assert tx.refund_status(word) is status


class TestVerifiedTransaction:
    def _transaction(self, **changes: object) -> dict[str, object]:
        data: dict[str, object] = {
            "id": 5001,
            "tx_ref": "ord_1",
            "amount": 45000,
            "currency": "NGN",
            "status": "successful",
            "payment_type": "card",
        }
        data.update(changes)
        return tx.decode(json.dumps(data).encode())  # type: ignore[no-any-return]

    def test_success_at_our_price(self) -> None:
        state, mismatch = tx.state_from_transaction(
            self._transaction(), "flw_ord_1", expected=(4_500_000, "NGN")
        )
        assert not mismatch
        assert (state.status, state.amount, state.currency) == ("succeeded", 4_500_000, "NGN")
        assert state.capture_id == "5001"

    @pytest.mark.parametrize(
        "changes", [{"amount": 450}, {"amount": 45000.01}, {"currency": "GHS"}, {"amount": None}]
    )
    def test_success_at_another_price_is_a_failure(self, changes: dict[str, object]) -> None:
        state, mismatch = tx.state_from_transaction(
            self._transaction(**changes), "flw_ord_1", expected=(4_500_000, "NGN")
        )
        assert mismatch
        assert state.status is PaymentStatus.FAILED
        assert state.capture_id is None
