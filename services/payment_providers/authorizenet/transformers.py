"""Conversions between the service's types and Authorize.Net's JSON API, kept apart from the
calls.

Authorize.Net's JSON API is its XML API spelled in JSON: one endpoint, one top-level element
naming the request (``getHostedPaymentPageRequest``, ``createTransactionRequest``, ...), and
the XML schema's *element order* still applies (the JSON is converted to XML before it is
checked), so every body here is built in schema order; Python dicts keep insertion order.
Answers start with a UTF-8 byte order mark and carry ``messages.resultCode`` (``Ok`` or
``Error``) with ``messages.message[].code`` (``I00001``, ``E00007``, ...); a transaction's own
outcome is ``transactionResponse.responseCode`` (1 approved, 2 declined, 3 error, 4 held for
review).

Amounts: the service counts in ISO 4217 minor units; Authorize.Net takes a decimal string in
major units. Conversions are exact (Decimal), never through floats.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, assert_never

from models.payment import PaymentStatus, RefundStatus
from services.money import currency_exponent

from ..base import IntentRequest, RefundResult

AnetObject = Mapping[str, Any]

PREFIX = "an_"
# order.invoiceNumber holds at most 20 characters, and is how a transaction made on the
# hosted form leads back to our payment: our payment id *is* the invoice number. "an_" and 17
# base32 characters (85 bits) of a digest of the checkout's idempotency key.
INVOICE_MAX = 20
PAYMENT_ID = re.compile(r"^an_[a-z2-7]{17}$")
# A refund we ask for carries an invoice number of its own, derived from our refund id, so
# that a repeated request can be found (and Authorize.Net's duplicate window refuses it).
REFUND_INVOICE = re.compile(r"^rf[a-z2-7]{18}$")
# Authorize.Net's transaction ids are decimal numbers (up to 20 digits in practice).
TRANS_ID = re.compile(r"^[0-9]{1,20}$")
# A refund answered by voiding the unsettled payment: its "refund id" names the voided
# transaction.
VOID_REFUND_PREFIX = "void-"
# refId: at most 20 characters, echoed back in the answer.
REF_ID_MAX = 20
# The longest duplicate window Authorize.Net allows: 8 hours.
DUPLICATE_WINDOW_S = 28800

# Currencies an Authorize.Net account can settle in (one per account: the processor's).
CURRENCIES = frozenset(
    {"USD", "CAD", "GBP", "EUR", "AUD", "NZD", "CHF", "DKK", "NOK", "PLN", "SEK"}
)

# Result codes (messages.message[].code) that mean what they say for us.
CODE_OK = "I00001"
CODE_AUTH_FAILED = "E00007"  # invalid login id or transaction key
CODE_ACCOUNT_INACTIVE = "E00008"
CODE_TEST_MODE = "E00009"  # the account is in test mode: the API cannot be used
CODE_PERMISSION = "E00011"  # access denied
CODE_NOT_FOUND = "E00040"  # the record cannot be found
CODE_TRANSACTION_FAILED = "E00027"  # see transactionResponse
# "An error occurred during processing", "server busy", "in maintenance": try again later.
RETRY_CODES = frozenset({"E00001", "E00053", "E00104"})
MISCONFIGURED_CODES = frozenset(
    {CODE_AUTH_FAILED, CODE_ACCOUNT_INACTIVE, CODE_TEST_MODE, CODE_PERMISSION, "E00124"}
)

# transactionResponse.errors[].errorCode (the response reason codes).
REASON_DUPLICATE = "11"
REASON_NOT_FOUND = "16"
REASON_CANNOT_CREDIT = "54"
REASON_CREDIT_EXCEEDS = "55"
# "The amount requested for settlement cannot be greater than the original amount authorized."
REASON_CAPTURE_EXCEEDS = "47"
REASON_ALREADY_VOIDED = "310"
REASON_ALREADY_CAPTURED = "311"


class ResponseCode(StrEnum):
    APPROVED = "1"
    DECLINED = "2"
    ERROR = "3"
    HELD_FOR_REVIEW = "4"


class TransactionStatus(StrEnum):
    """``transactionStatus`` in getTransactionDetails and the transaction lists."""

    AUTHORIZED_PENDING_CAPTURE = "authorizedPendingCapture"
    CAPTURED_PENDING_SETTLEMENT = "capturedPendingSettlement"
    COMMUNICATION_ERROR = "communicationError"
    REFUND_SETTLED_SUCCESSFULLY = "refundSettledSuccessfully"
    REFUND_PENDING_SETTLEMENT = "refundPendingSettlement"
    APPROVED_REVIEW = "approvedReview"
    DECLINED = "declined"
    COULD_NOT_VOID = "couldNotVoid"
    EXPIRED = "expired"
    GENERAL_ERROR = "generalError"
    FAILED_REVIEW = "failedReview"
    SETTLED_SUCCESSFULLY = "settledSuccessfully"
    SETTLEMENT_ERROR = "settlementError"
    UNDER_REVIEW = "underReview"
    VOIDED = "voided"
    FDS_PENDING_REVIEW = "FDSPendingReview"
    FDS_AUTHORIZED_PENDING_REVIEW = "FDSAuthorizedPendingReview"
    RETURNED_ITEM = "returnedItem"


class EventType(StrEnum):
    AUTHCAPTURE_CREATED = "net.authorize.payment.authcapture.created"
    AUTHORIZATION_CREATED = "net.authorize.payment.authorization.created"
    CAPTURE_CREATED = "net.authorize.payment.capture.created"
    PRIOR_AUTH_CAPTURE_CREATED = "net.authorize.payment.priorAuthCapture.created"
    VOID_CREATED = "net.authorize.payment.void.created"
    REFUND_CREATED = "net.authorize.payment.refund.created"
    FRAUD_HELD = "net.authorize.payment.fraud.held"
    FRAUD_APPROVED = "net.authorize.payment.fraud.approved"
    FRAUD_DECLINED = "net.authorize.payment.fraud.declined"


class AmountNotRepresentable(ValueError):
    """An amount Authorize.Net cannot take (it has two decimals at most)."""


# -- amounts -------------------------------------------------------------------------------


def to_anet_amount(amount: int, currency: str) -> str:
    """Minor units to Authorize.Net's decimal string: 1900 USD -> "19.00"."""
    exponent = currency_exponent(currency)
    if exponent > 2:
        raise AmountNotRepresentable(f"{currency} has {exponent} decimals; Authorize.Net two")
    major = Decimal(amount).scaleb(-exponent)
    return f"{major.quantize(Decimal(1).scaleb(-2)):f}"


def from_anet_amount(value: Any, currency: str) -> int:
    """Authorize.Net's amount (a JSON number or string: 19.0, "19.00") to minor units."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"not an amount: {value!r}")
    try:
        major = Decimal(str(value))
    except InvalidOperation as error:
        raise ValueError(f"not an amount: {value!r}") from error
    if not major.is_finite() or major.adjusted() > 15 or major < 0:
        raise ValueError(f"not an amount: {value!r}")
    minor = major.scaleb(currency_exponent(currency))
    if minor != minor.to_integral_value():
        raise ValueError(f"{value} {currency} is finer than the currency's minor unit")
    return int(minor)


# -- ids -----------------------------------------------------------------------------------


def _base32(data: bytes, length: int) -> str:
    return base64.b32encode(data).decode().lower().rstrip("=")[:length]


def payment_id_for(idempotency_key: str) -> str:
    """Our payment id (and Authorize.Net invoice number) for one checkout attempt: the same
    key always gives the same id, so a retried create lands on the same payment."""
    digest = hashlib.sha256(f"authorizenet\0{idempotency_key}".encode()).digest()
    return PREFIX + _base32(digest, INVOICE_MAX - len(PREFIX))


def refund_invoice_for(refund_id: str) -> str:
    """The invoice number our refund ``refund_id`` carries at Authorize.Net."""
    digest = hashlib.sha256(f"authorizenet-refund\0{refund_id}".encode()).digest()
    return "rf" + _base32(digest, INVOICE_MAX - 2)


def ref_id(value: str) -> str:
    """A refId (<= 20 characters) for a call: ours when it fits, else a digest of it."""
    if len(value) <= REF_ID_MAX and value.isascii() and value.isalnum():
        return value
    return _base32(hashlib.sha256(value.encode()).digest(), REF_ID_MAX)


def is_payment_id(value: Any) -> bool:
    return isinstance(value, str) and PAYMENT_ID.fullmatch(value) is not None


def is_trans_id(value: Any) -> bool:
    return isinstance(value, str) and TRANS_ID.fullmatch(value) is not None and value != "0"


def void_refund_id(trans_id: str) -> str:
    return f"{VOID_REFUND_PREFIX}{trans_id}"


def voided_trans_id(provider_refund_id: str) -> str | None:
    """The voided transaction a void-refund id names, or None when it is a real refund's."""
    if not provider_refund_id.startswith(VOID_REFUND_PREFIX):
        return None
    trans_id = provider_refund_id.removeprefix(VOID_REFUND_PREFIX)
    return trans_id if is_trans_id(trans_id) else None


def last_four(account_number: Any) -> str | None:
    """The card's last four digits from a masked number ("XXXX1111")."""
    if not isinstance(account_number, str):
        return None
    match = re.search(r"([0-9]{4})$", account_number)
    return match.group(1) if match else None


# -- requests ------------------------------------------------------------------------------


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def return_urls(request: IntentRequest, payment_id: str) -> tuple[str, str]:
    base = request.base_url.rstrip("/")
    fallback = f"{base}/?provider=authorizenet&payment_id={payment_id}"
    return (
        request.return_url or _with_query(fallback, "status=returned"),
        request.cancel_url or _with_query(fallback, "status=canceled"),
    )


def _setting(name: str, value: Mapping[str, Any]) -> dict[str, str]:
    # Each setting's value is itself a JSON string, as the Accept Hosted guide shows.
    return {"settingName": name, "settingValue": json.dumps(value, separators=(",", ":"))}


def hosted_page_request(
    request: IntentRequest, payment_id: str, *, manual_capture: bool
) -> dict[str, Any]:
    """The ``getHostedPaymentPageRequest`` body after merchantAuthentication and refId: a
    card-only form for the plan's amount, our payment id as the invoice number."""
    return_url, cancel_url = return_urls(request, payment_id)
    transaction: dict[str, Any] = {
        "transactionType": "authOnlyTransaction" if manual_capture else "authCaptureTransaction",
        "amount": to_anet_amount(request.amount, request.currency),
        "currencyCode": request.currency.upper(),
        "order": {"invoiceNumber": payment_id, "description": request.plan.name[:255]},
    }
    if request.customer_email:
        transaction["customer"] = {"email": request.customer_email[:255]}
    transaction["transactionSettings"] = {
        "setting": [{"settingName": "duplicateWindow", "settingValue": str(DUPLICATE_WINDOW_S)}]
    }
    return {
        "transactionRequest": transaction,
        "hostedPaymentSettings": {
            "setting": [
                _setting(
                    "hostedPaymentReturnOptions",
                    {
                        "showReceipt": False,
                        "url": return_url,
                        "urlText": "Continue",
                        "cancelUrl": cancel_url,
                        "cancelUrlText": "Cancel",
                    },
                ),
                _setting("hostedPaymentButtonOptions", {"text": "Pay"}),
                # Cards only: an eCheck would settle for days and is not what we declare.
                _setting(
                    "hostedPaymentPaymentOptions",
                    {"cardCodeRequired": True, "showCreditCard": True, "showBankAccount": False},
                ),
                _setting("hostedPaymentOrderOptions", {"show": True}),
            ]
        },
    }


def prior_auth_capture_request(trans_id: str, amount: str | None) -> dict[str, Any]:
    transaction: dict[str, Any] = {"transactionType": "priorAuthCaptureTransaction"}
    if amount is not None:
        transaction["amount"] = amount
    transaction["refTransId"] = trans_id
    return {"transactionRequest": transaction}


def void_request(trans_id: str) -> dict[str, Any]:
    return {"transactionRequest": {"transactionType": "voidTransaction", "refTransId": trans_id}}


def refund_request(trans_id: str, amount: str, card_last_four: str, invoice: str) -> dict[str, Any]:
    return {
        "transactionRequest": {
            "transactionType": "refundTransaction",
            "amount": amount,
            "payment": {"creditCard": {"cardNumber": card_last_four, "expirationDate": "XXXX"}},
            "refTransId": trans_id,
            "order": {"invoiceNumber": invoice},
            "transactionSettings": {
                "setting": [
                    {"settingName": "duplicateWindow", "settingValue": str(DUPLICATE_WINDOW_S)}
                ]
            },
        }
    }


# -- answers -------------------------------------------------------------------------------


def result_codes(answer: AnetObject) -> tuple[str | None, list[str]]:
    """(resultCode, [message codes]) of an answer's ``messages``."""
    messages = answer.get("messages")
    if not isinstance(messages, Mapping):
        return None, []
    items = messages.get("message")
    codes = [
        str(item["code"])
        for item in (items if isinstance(items, list) else [])
        if isinstance(item, Mapping) and isinstance(item.get("code"), str)
    ]
    result = messages.get("resultCode")
    return (str(result) if isinstance(result, str) else None), codes


def transaction_outcome(answer: AnetObject) -> tuple[ResponseCode | None, list[str], str | None]:
    """(responseCode, [reason codes], transId) of a createTransaction answer."""
    response = answer.get("transactionResponse")
    if not isinstance(response, Mapping):
        return None, [], None
    raw = response.get("responseCode")
    try:
        code = ResponseCode(str(raw)) if raw is not None else None
    except ValueError:
        code = None
    reasons = []
    for key, field in (("errors", "errorCode"), ("messages", "code")):
        items = response.get(key)
        for item in items if isinstance(items, list) else []:
            if isinstance(item, Mapping) and item.get(field) is not None:
                reasons.append(str(item[field]))
    trans_id = response.get("transId")
    return code, reasons, (str(trans_id) if is_trans_id(str(trans_id)) else None)


def _status_of(value: Any) -> TransactionStatus | None:
    try:
        return TransactionStatus(str(value))
    except ValueError:
        return None


def payment_status(status: TransactionStatus | None) -> PaymentStatus:
    """A payment transaction's status in our terms. Unknown statuses are pending."""
    if status is None:
        return PaymentStatus.PENDING
    match status:
        case TransactionStatus.AUTHORIZED_PENDING_CAPTURE:
            return PaymentStatus.REQUIRES_CAPTURE
        case (
            TransactionStatus.CAPTURED_PENDING_SETTLEMENT
            | TransactionStatus.SETTLED_SUCCESSFULLY
            | TransactionStatus.APPROVED_REVIEW
        ):
            return PaymentStatus.SUCCEEDED
        case TransactionStatus.VOIDED:
            return PaymentStatus.CANCELED
        case TransactionStatus.EXPIRED:
            return PaymentStatus.EXPIRED
        case (
            TransactionStatus.DECLINED
            | TransactionStatus.FAILED_REVIEW
            | TransactionStatus.GENERAL_ERROR
            | TransactionStatus.SETTLEMENT_ERROR
            | TransactionStatus.COMMUNICATION_ERROR
            | TransactionStatus.COULD_NOT_VOID
        ):
            return PaymentStatus.FAILED
        case (
            TransactionStatus.FDS_PENDING_REVIEW
            | TransactionStatus.FDS_AUTHORIZED_PENDING_REVIEW
            | TransactionStatus.UNDER_REVIEW
        ):
            return PaymentStatus.PENDING
        case (
            TransactionStatus.REFUND_SETTLED_SUCCESSFULLY
            | TransactionStatus.REFUND_PENDING_SETTLEMENT
            | TransactionStatus.RETURNED_ITEM
        ):
            # Not a payment's status (a refund's, or an eCheck return): nothing to conclude.
            return PaymentStatus.PENDING
        case _:
            assert_never(status)


def refund_status(status: TransactionStatus | None) -> RefundStatus:
    """A refund transaction's status in our terms. Unknown statuses are pending."""
    match status:
        case TransactionStatus.REFUND_SETTLED_SUCCESSFULLY:
            return RefundStatus.SUCCEEDED
        case TransactionStatus.VOIDED:
            return RefundStatus.CANCELED
        case (
            TransactionStatus.DECLINED
            | TransactionStatus.GENERAL_ERROR
            | TransactionStatus.SETTLEMENT_ERROR
            | TransactionStatus.FAILED_REVIEW
            | TransactionStatus.COMMUNICATION_ERROR
        ):
            return RefundStatus.FAILED
        case _:
            return RefundStatus.PENDING


# How far along a payment transaction is: when a hosted form made several transactions with
# one invoice number (a decline, then a card that worked), the furthest one is the payment.
_RANK = {
    PaymentStatus.FAILED: 0,
    PaymentStatus.EXPIRED: 0,
    PaymentStatus.PENDING: 1,
    PaymentStatus.CANCELED: 2,
    PaymentStatus.REQUIRES_CAPTURE: 3,
    PaymentStatus.SUCCEEDED: 4,
}


def best_transaction(listed: list[AnetObject], invoice: str) -> str | None:
    """The transId, among list entries whose invoice number is ``invoice``, of the one that
    got furthest (latest first among equals)."""
    best: tuple[int, str] | None = None
    for item in listed:
        if item.get("invoiceNumber") != invoice or not is_trans_id(str(item.get("transId"))):
            continue
        rank = _RANK.get(payment_status(_status_of(item.get("transactionStatus"))), 1)
        if best is None or rank > best[0]:
            best = (rank, str(item["transId"]))
    return best[1] if best else None


def best_refund(listed: list[AnetObject], invoice: str) -> str | None:
    """The transId of a refund among list entries whose invoice number is ``invoice``."""
    for item in listed:
        if item.get("invoiceNumber") == invoice and is_trans_id(str(item.get("transId"))):
            status = _status_of(item.get("transactionStatus"))
            if status is not TransactionStatus.DECLINED:
                return str(item["transId"])
    return None


class Details:
    """One transaction as getTransactionDetails reads it."""

    def __init__(self, transaction: AnetObject) -> None:
        self.raw = transaction
        self.trans_id = str(transaction.get("transId"))
        self.status = _status_of(transaction.get("transactionStatus"))
        self.vendor_status = str(transaction.get("transactionStatus"))
        self.transaction_type = str(transaction.get("transactionType"))
        ref = transaction.get("refTransId")
        self.ref_trans_id = str(ref) if is_trans_id(str(ref)) else None
        order = transaction.get("order")
        invoice = order.get("invoiceNumber") if isinstance(order, Mapping) else None
        self.invoice = invoice if isinstance(invoice, str) else None
        payment = transaction.get("payment")
        card = payment.get("creditCard") if isinstance(payment, Mapping) else None
        self.card_last_four = (
            last_four(card.get("cardNumber")) if isinstance(card, Mapping) else None
        )
        self.is_card = isinstance(card, Mapping)

    def amount(self, field: str, currency: str) -> int | None:
        try:
            return from_anet_amount(self.raw.get(field), currency)
        except ValueError:
            return None

    def amount_captured(self, currency: str) -> int | None:
        """What a capture of part of the authorization took: ``settleAmount`` when it is less
        than ``authAmount`` (a priorAuthCaptureTransaction with an amount; Authorize.Net
        captures a transaction once, and the rest of the authorization is not taken). None
        when all of it was taken, or nothing yet."""
        if not payment_status(self.status).is_paid:
            return None
        settled = self.amount("settleAmount", currency)
        authorized = self.amount("authAmount", currency)
        if settled is None or authorized is None or not 0 < settled < authorized:
            return None
        return settled

    @property
    def settled(self) -> bool:
        return self.status is TransactionStatus.SETTLED_SUCCESSFULLY

    @property
    def captured_unsettled(self) -> bool:
        return self.status is TransactionStatus.CAPTURED_PENDING_SETTLEMENT

    def refund_result(self, currency: str, *, refund_id: str | None = None) -> RefundResult:
        amount = self.amount("settleAmount", currency)
        if amount is None:
            amount = self.amount("authAmount", currency)
        if amount is None:
            raise ValueError("a refund without an amount")
        return RefundResult(
            provider_refund_id=self.trans_id,
            amount=amount,
            status=refund_status(self.status),
            currency=currency.upper(),
            refund_id=refund_id,
            failure_code=self.vendor_status
            if refund_status(self.status) is RefundStatus.FAILED
            else None,
        )


# -- webhooks ------------------------------------------------------------------------------


def event_type(value: Any) -> EventType | None:
    try:
        return EventType(str(value))
    except ValueError:
        return None


def is_notification(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and isinstance(payload.get("notificationId"), str)
        and 0 < len(payload["notificationId"]) <= 64
        and isinstance(payload.get("eventType"), str)
        and isinstance(payload.get("payload"), Mapping)
    )


def occurred_at(notification: AnetObject) -> datetime | None:
    raw = notification.get("eventDate")
    if not isinstance(raw, str):
        return None
    try:
        # Authorize.Net writes seven fractional digits ("...56.4671136Z"); keep six.
        text = re.sub(r"(\.\d{6})\d+", r"\1", raw).replace("Z", "+00:00")
        return datetime.fromisoformat(text)
    except ValueError:
        return None
