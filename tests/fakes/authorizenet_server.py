"""A fake of Authorize.Net's JSON API, for tests: the real ``AuthorizeNetProvider`` talks to
it over loopback.

Authorize.Net's XML schema is not redistributable here, so the fake follows the API reference
page by page (https://developer.authorize.net/api/reference/index.html):

- "Accept Hosted" (features/accept-hosted.html): ``getHostedPaymentPageRequest`` with a
  ``transactionRequest`` and ``hostedPaymentSettings.setting[]`` whose values are JSON
  strings; the token is posted to ``/payment/payment`` as the form field ``token``.
- "Payment Transactions": ``createTransactionRequest`` for ``priorAuthCaptureTransaction``
  ("Capture a Previously Authorized Amount": all of it, or an ``amount`` at most what was
  authorized, else reason 47; once, then reason 311; the details then say ``authAmount`` as
  authorized and ``settleAmount`` as captured), ``voidTransaction`` ("Void a Transaction") and
  ``refundTransaction`` ("Refund a Transaction": a settled transaction, the card's last four
  digits, ``expirationDate`` XXXX).
- "Transaction Reporting": ``getTransactionDetailsRequest``,
  ``getUnsettledTransactionListRequest``, ``getSettledBatchListRequest`` (31 days at most),
  ``getTransactionListRequest`` (by batch).
- "Authenticate Test Request" (``authenticateTestRequest``) and the response code / error
  code tables ("Response Codes": E00007 bad credentials, E00027 a transaction that did not
  go through, E00040 no such record; reasons 11 duplicate, 16 not found, 47 capture above
  the authorization, 54 cannot credit, 55 credit exceeds, 310 already voided, 311 already
  captured).
- "Webhooks" (features/webhooks.html): notifications ``{notificationId, eventType,
  eventDate, webhookId, payload: {responseCode, authCode, avsResponse, authAmount,
  invoiceNumber, merchantReferenceId, entityName, id}}`` signed ``X-ANET-Signature:
  sha512=<HEX>``, the upper-case HMAC-SHA512 of the body keyed with the Signature Key's text.

Every request is checked strictly: one top-level element naming a known request,
``merchantAuthentication`` (name, transactionKey) first, the required elements present, no
unknown ones, and elements in the schema's order where the schema (a sequence) demands it
(the JSON API converts to XML before it validates). A request that departs is answered
E00003 as Authorize.Net would, and kept in ``violations``; tests assert it stays empty.
Answers start with a UTF-8 byte order mark, as Authorize.Net's do.

It is stateful: tokens wait for the buyer (``pay`` plays them: approved, declined or held
for review, on a card of the test's choosing), ``settle`` closes the day's batch, refunds
add up against what was settled, and every change emits the webhook Authorize.Net would
send (``signed_delivery`` signs one). ``fail_next`` makes calls fail (500, 503, a hang before
or after the work is done, E00001) and ``credentials`` can be changed to make ours wrong.
The server runs in another thread: every state change holds one lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import serve_in_thread

Json = dict[str, Any]
FaultKind = Literal["server_error", "unavailable", "hang", "hang_after", "processing_error"]
PayOutcome = Literal["approved", "declined", "held"]

API_PATH = "/xml/v1/request.api"
FORM_PATH = "/payment/payment"
BOM = "\ufeff"

# The schema's sequences, as the API reference lists each request's fields.
_BASE = ("merchantAuthentication", "clientId", "refId")
REQUESTS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "authenticateTestRequest": (_BASE, frozenset()),
    "getHostedPaymentPageRequest": (
        (*_BASE, "transactionRequest", "hostedPaymentSettings"),
        frozenset({"transactionRequest"}),
    ),
    "createTransactionRequest": ((*_BASE, "transactionRequest"), frozenset({"transactionRequest"})),
    "getTransactionDetailsRequest": ((*_BASE, "transId"), frozenset({"transId"})),
    "getUnsettledTransactionListRequest": ((*_BASE, "status", "sorting", "paging"), frozenset()),
    "getSettledBatchListRequest": (
        (*_BASE, "includeStatistics", "firstSettlementDate", "lastSettlementDate"),
        frozenset(),
    ),
    "getTransactionListRequest": ((*_BASE, "batchId", "sorting", "paging"), frozenset({"batchId"})),
}
TRANSACTION_REQUEST_ORDER = (
    "transactionType", "amount", "currencyCode", "payment", "profile", "solution", "callId",
    "terminalNumber", "authCode", "refTransId", "splitTenderId", "order", "lineItems", "tax",
    "duty", "shipping", "taxExempt", "poNumber", "customer", "billTo", "shipTo", "customerIP",
    "cardholderAuthentication", "retail", "employeeId", "transactionSettings", "userFields",
    "surcharge", "merchantDescriptor", "subMerchant", "tip", "processingOptions",
    "subsequentAuthInformation", "otherTax", "shipFrom", "authorizationIndicatorType",
)  # fmt: skip
# What each transaction type needs, as the reference's examples and field tables say.
TRANSACTION_REQUIRED = {
    "authCaptureTransaction": {"amount"},
    "authOnlyTransaction": {"amount"},
    "priorAuthCaptureTransaction": {"refTransId"},
    "voidTransaction": {"refTransId"},
    "refundTransaction": {"amount", "payment", "refTransId"},
}
HOSTED_TYPES = frozenset({"authCaptureTransaction", "authOnlyTransaction"})
HOSTED_SETTINGS = frozenset(
    {
        "hostedPaymentReturnOptions", "hostedPaymentButtonOptions", "hostedPaymentStyleOptions",
        "hostedPaymentPaymentOptions", "hostedPaymentSecurityOptions",
        "hostedPaymentShippingAddressOptions", "hostedPaymentBillingAddressOptions",
        "hostedPaymentCustomerOptions", "hostedPaymentOrderOptions",
        "hostedPaymentIFrameCommunicatorUrl",
    }
)  # fmt: skip
TRANSACTION_SETTINGS = frozenset(
    {"allowPartialAuth", "duplicateWindow", "emailCustomer", "recurringBilling", "testRequest"}
)
MAX_DUPLICATE_WINDOW_S = 28800


@dataclass
class Violation:
    request: str
    problem: str

    def __str__(self) -> str:
        return f"{self.request}: {self.problem}"


@dataclass
class Transaction:
    trans_id: str
    transaction_type: str
    status: str
    auth_amount: Decimal
    settle_amount: Decimal
    invoice: str | None
    description: str | None
    card_number: str
    submitted: datetime
    response_code: int = 1
    ref_trans_id: str | None = None
    batch_id: str | None = None

    @property
    def last_four(self) -> str:
        return self.card_number[-4:]


@dataclass
class _Fault:
    kind: FaultKind
    times: int
    request: str | None


@dataclass
class _Token:
    transaction: Json
    used: bool = False


@dataclass
class FakeAuthorizeNet:
    login_id: str
    transaction_key: str
    signature_key: str
    url: str = ""
    hang_s: float = 2.0
    violations: list[Violation] = field(default_factory=list)
    requests: list[tuple[str, Json]] = field(default_factory=list)
    events: list[Json] = field(default_factory=list)
    transactions: dict[str, Transaction] = field(default_factory=dict)
    batches: dict[str, datetime] = field(default_factory=dict)
    tokens: dict[str, _Token] = field(default_factory=dict)
    faults: list[_Fault] = field(default_factory=list)
    # Changes made at Authorize.Net (another request, the Merchant Interface) just before the
    # next request of a name is answered: what happened between our read and our call.
    meanwhile: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    credentials_valid: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next_id: int = 60_000_000_000
    _resets: int = 0  # how many times reset() ran: a hung request outliving its test is dropped

    def reset(self) -> None:
        with self._lock:
            self._resets += 1
            self.violations.clear()
            self.requests.clear()
            self.events.clear()
            self.transactions.clear()
            self.batches.clear()
            self.tokens.clear()
            self.faults.clear()
            self.meanwhile.clear()
            self.credentials_valid = True

    # -- controls ----------------------------------------------------------------------------

    def before_next(self, request: str, change: Callable[[], None]) -> None:
        """Make ``change`` (e.g. ``lambda: fake.capture_in_interface(...)``) just before the
        next ``request`` is answered, as if it happened at Authorize.Net meanwhile."""
        with self._lock:
            self.meanwhile.append((request, change))

    def fail_next(self, kind: FaultKind, *, times: int = 1, request: str | None = None) -> None:
        with self._lock:
            self.faults.append(_Fault(kind, times, request))

    def token_for(self, invoice: str) -> str:
        with self._lock:
            for token, held in self.tokens.items():
                order = held.transaction.get("order") or {}
                if order.get("invoiceNumber") == invoice:
                    return token
        raise KeyError(invoice)

    def pay(
        self, token: str, outcome: PayOutcome = "approved", card: str = "4111111111111111"
    ) -> Transaction:
        """The buyer submits the hosted form for ``token``: one transaction, with the
        token's invoice number, and its webhook."""
        with self._lock:
            held = self.tokens[token]
            request = held.transaction
            kind = str(request["transactionType"])
            amount = Decimal(str(request["amount"]))
            order = request.get("order") or {}
            if outcome == "declined":
                status, code = "declined", 2
            elif outcome == "held":
                status, code = "FDSPendingReview", 4
            elif kind == "authOnlyTransaction":
                status, code = "authorizedPendingCapture", 1
            else:
                status, code = "capturedPendingSettlement", 1
            if outcome != "declined":
                held.used = True
            transaction = self._new(
                kind,
                status,
                auth_amount=amount,
                settle_amount=amount if status == "capturedPendingSettlement" else Decimal(0),
                invoice=order.get("invoiceNumber"),
                description=order.get("description"),
                card_number=card,
                response_code=code,
            )
            event = (
                "net.authorize.payment.fraud.held"
                if outcome == "held"
                else "net.authorize.payment.authorization.created"
                if kind == "authOnlyTransaction"
                else "net.authorize.payment.authcapture.created"
            )
            self._emit(event, transaction)
            return transaction

    def settle(self) -> str:
        """The day's batch closes: captured transactions and refunds settle."""
        with self._lock:
            batch_id = str(self._id())
            self.batches[batch_id] = datetime.now(UTC)
            for transaction in self.transactions.values():
                if transaction.batch_id is not None:
                    continue
                if transaction.status == "capturedPendingSettlement":
                    transaction.status = "settledSuccessfully"
                elif transaction.status == "refundPendingSettlement":
                    transaction.status = "refundSettledSuccessfully"
                elif transaction.status not in ("voided", "declined"):
                    continue  # authorizations and held transactions wait
                transaction.batch_id = batch_id
            return batch_id

    def capture_in_interface(self, trans_id: str, amount: Decimal | None = None) -> None:
        """The merchant captures an authorization in the Merchant Interface: all of it, or
        less ("the amount may only be modified to be less than the original amount")."""
        with self._lock:
            transaction = self.transactions[trans_id]
            captured = transaction.auth_amount if amount is None else amount
            assert transaction.status == "authorizedPendingCapture"
            assert 0 < captured <= transaction.auth_amount
            transaction.status, transaction.settle_amount = "capturedPendingSettlement", captured
            self._emit("net.authorize.payment.priorAuthCapture.created", transaction)

    def void_in_interface(self, trans_id: str) -> None:
        """The merchant voids in the Merchant Interface."""
        with self._lock:
            transaction = self.transactions[trans_id]
            transaction.status = "voided"
            self._emit("net.authorize.payment.void.created", transaction)

    def approve_held(self, trans_id: str) -> None:
        with self._lock:
            transaction = self.transactions[trans_id]
            transaction.status = (
                "authorizedPendingCapture"
                if transaction.transaction_type == "authOnlyTransaction"
                else "capturedPendingSettlement"
            )
            if transaction.status == "capturedPendingSettlement":
                transaction.settle_amount = transaction.auth_amount
            transaction.response_code = 1
            self._emit("net.authorize.payment.fraud.approved", transaction)

    def events_of(self, event_type: str) -> list[Json]:
        return [event for event in self.events if event["eventType"] == event_type]

    def sign(self, body: bytes, key: str | None = None) -> str:
        digest = hmac.new((key or self.signature_key).encode(), body, hashlib.sha512)
        return "sha512=" + digest.hexdigest().upper()

    def signed_delivery(
        self, event: Json | bytes, *, key: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        body = (
            event if isinstance(event, bytes) else json.dumps(event, separators=(",", ":")).encode()
        )
        return body, {"Content-Type": "application/json", "X-ANET-Signature": self.sign(body, key)}

    # -- state -------------------------------------------------------------------------------

    def _id(self) -> int:
        self._next_id += secrets.randbelow(1000) + 1
        return self._next_id

    def _new(self, kind: str, status: str, **fields: Any) -> Transaction:
        transaction = Transaction(
            trans_id=str(self._id()),
            transaction_type=kind,
            status=status,
            submitted=datetime.now(UTC),
            **fields,
        )
        self.transactions[transaction.trans_id] = transaction
        return transaction

    def _emit(self, event_type: str, transaction: Transaction) -> None:
        payload: Json = {
            "responseCode": transaction.response_code,
            "authCode": "QWE123",
            "avsResponse": "Y",
            "authAmount": float(transaction.auth_amount or transaction.settle_amount),
        }
        if transaction.invoice:
            payload["merchantReferenceId"] = transaction.invoice
            payload["invoiceNumber"] = transaction.invoice
        payload |= {"entityName": "transaction", "id": transaction.trans_id}
        self.events.append(
            {
                "notificationId": str(uuid.uuid4()),
                "eventType": event_type,
                "eventDate": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "1Z",
                "webhookId": "a8a17f6f-79eb-49f4-a047-436db0938bbb",
                "payload": payload,
            }
        )

    # -- the API -----------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8-sig"))
        except ValueError:
            return self._violation("?", "the body is not JSON")
        if not isinstance(body, dict) or len(body) != 1:
            return self._violation("?", "the body must hold exactly one request element")
        name, inner = next(iter(body.items()))
        fault = self._take_fault(name)
        for change in self._take_meanwhile(name):
            change()
        if fault is not None and fault.kind in ("server_error", "unavailable"):
            return Response("busy", status_code=500 if fault.kind == "server_error" else 503)
        if fault is not None and fault.kind == "hang":
            resets = self._resets
            await asyncio.sleep(self.hang_s)
            if resets != self._resets:
                # The test that asked for the hang is over: its request must not land in the
                # next test's record (nor change its transactions).
                return Response("gone", status_code=503)
        with self._lock:
            self.requests.append((name, inner if isinstance(inner, dict) else {}))
            answer = self._answer(name, inner, fault)
        if fault is not None and fault.kind == "hang_after":
            await asyncio.sleep(self.hang_s)
        return self._json(answer)

    def _take_meanwhile(self, name: str) -> list[Callable[[], None]]:
        with self._lock:
            due = [change for request, change in self.meanwhile if request == name]
            self.meanwhile = [entry for entry in self.meanwhile if entry[0] != name]
        return due

    def _take_fault(self, name: str) -> _Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.request in (None, name) and fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def _json(self, answer: Json) -> Response:
        text = BOM + json.dumps(answer)
        return Response(text.encode(), media_type="application/json; charset=utf-8")

    def _violation(self, name: str, problem: str) -> Response:
        with self._lock:
            self.violations.append(Violation(name, problem))
        return self._json(_error("E00003", f"The request is invalid: {problem}"))

    def _answer(self, name: str, inner: Any, fault: _Fault | None) -> Json:
        problem = self._check(name, inner)
        if problem is not None:
            self.violations.append(Violation(name, problem))
            return _error("E00003", f"The request is invalid: {problem}")
        auth = inner["merchantAuthentication"]
        if (
            not self.credentials_valid
            or auth.get("name") != self.login_id
            or auth.get("transactionKey") != self.transaction_key
        ):
            return _error(
                "E00007", "User authentication failed due to invalid authentication values."
            )
        if fault is not None and fault.kind == "processing_error":
            return _error("E00001", "An error occurred during processing. Please try again.")
        answer: Json = getattr(self, f"_{name}")(inner)
        if "refId" in inner:
            answer = {"refId": inner["refId"], **answer}
        return answer

    def _check(self, name: str, inner: Any) -> str | None:
        if name not in REQUESTS:
            return f"unknown request {name!r}"
        if not isinstance(inner, dict):
            return "the request element must be an object"
        order, required = REQUESTS[name]
        problem = _in_order(list(inner), order) or _missing(
            inner, {"merchantAuthentication", *required}
        )
        if problem:
            return problem
        auth = inner["merchantAuthentication"]
        if not isinstance(auth, dict) or list(auth) != ["name", "transactionKey"]:
            return "merchantAuthentication must be name then transactionKey"
        if not isinstance(auth["name"], str) or not 1 <= len(auth["name"]) <= 25:
            return "merchantAuthentication.name must be 1 to 25 characters"
        if "refId" in inner and (not isinstance(inner["refId"], str) or len(inner["refId"]) > 20):
            return "refId must be a string of at most 20 characters"
        if "transactionRequest" in inner:
            return self._check_transaction(name, inner["transactionRequest"])
        for key in ("sorting", "paging"):
            if key in inner:
                shape = ("orderBy", "orderDescending") if key == "sorting" else ("limit", "offset")
                if not isinstance(inner[key], dict) or list(inner[key]) != list(shape):
                    return f"{key} must be {' then '.join(shape)}"
                if key == "paging" and not 1 <= int(inner[key]["limit"]) <= 1000:
                    return "paging.limit must be 1 to 1000"
        if name == "getSettledBatchListRequest":
            try:
                first = _date(inner["firstSettlementDate"])
                last = _date(inner["lastSettlementDate"])
            except (KeyError, ValueError):
                return "firstSettlementDate and lastSettlementDate must both be UTC dates"
            if last - first > timedelta(days=31) or last < first:
                return "the settlement dates must be at most 31 days apart"
        if name == "getTransactionDetailsRequest" and not str(inner["transId"]).isdigit():
            return "transId must be a number"
        return None

    def _check_transaction(self, name: str, request: Any) -> str | None:
        if not isinstance(request, dict):
            return "transactionRequest must be an object"
        problem = _in_order(list(request), TRANSACTION_REQUEST_ORDER)
        if problem:
            return f"transactionRequest: {problem}"
        kind = request.get("transactionType")
        if kind not in TRANSACTION_REQUIRED:
            return f"transactionType {kind!r} is not one the fake knows"
        if (name == "getHostedPaymentPageRequest") != (kind in HOSTED_TYPES):
            return f"{kind} does not belong in {name}"
        problem = _missing(request, TRANSACTION_REQUIRED[kind])
        if problem:
            return f"transactionRequest: {problem}"
        if "amount" in request:
            try:
                amount = Decimal(request["amount"])
            except (InvalidOperation, TypeError):
                return "amount must be a decimal string"
            if (
                not isinstance(request["amount"], str)
                or amount <= 0
                or amount != amount.quantize(Decimal("0.01"))
            ):
                return "amount must be a positive decimal string with at most two decimals"
        order = request.get("order")
        if order is not None:
            if not isinstance(order, dict) or _in_order(
                list(order), ("invoiceNumber", "description")
            ):
                return "order must be invoiceNumber then description"
            if len(str(order.get("invoiceNumber", ""))) > 20:
                return "order.invoiceNumber is longer than 20 characters"
            if len(str(order.get("description", ""))) > 255:
                return "order.description is longer than 255 characters"
        if "customer" in request and _in_order(list(request["customer"]), ("type", "id", "email")):
            return "customer must be type, id, email"
        payment = request.get("payment")
        if payment is not None:
            card = payment.get("creditCard") if isinstance(payment, dict) else None
            if not isinstance(card, dict) or list(card)[:2] != ["cardNumber", "expirationDate"]:
                return "payment.creditCard must be cardNumber then expirationDate"
        settings = request.get("transactionSettings")
        if settings is not None:
            for setting in settings.get("setting", []):
                if list(setting) != ["settingName", "settingValue"]:
                    return "a setting must be settingName then settingValue"
                if setting["settingName"] not in TRANSACTION_SETTINGS:
                    return f"unknown transaction setting {setting['settingName']!r}"
                if setting["settingName"] == "duplicateWindow" and not (
                    0 <= int(setting["settingValue"]) <= MAX_DUPLICATE_WINDOW_S
                ):
                    return "duplicateWindow must be 0 to 28800"
        return None

    def _check_hosted_settings(self, settings: Any) -> str | None:
        if not isinstance(settings, dict) or list(settings) != ["setting"]:
            return "hostedPaymentSettings must hold setting[]"
        for setting in settings["setting"]:
            if list(setting) != ["settingName", "settingValue"]:
                return "a setting must be settingName then settingValue"
            if setting["settingName"] not in HOSTED_SETTINGS:
                return f"unknown hosted payment setting {setting['settingName']!r}"
            try:
                value = json.loads(setting["settingValue"])
            except (TypeError, ValueError):
                return f"{setting['settingName']} must be a JSON string"
            if setting["settingName"] == "hostedPaymentReturnOptions":
                for key in ("url", "cancelUrl"):
                    if not str(value.get(key, "")).startswith(("https://", "http://")):
                        return f"hostedPaymentReturnOptions.{key} must be a URL"
        return None

    # -- requests ----------------------------------------------------------------------------

    def _authenticateTestRequest(self, inner: Json) -> Json:
        return _ok()

    def _getHostedPaymentPageRequest(self, inner: Json) -> Json:
        problem = self._check_hosted_settings(inner.get("hostedPaymentSettings", {"setting": []}))
        if problem:
            self.violations.append(Violation("getHostedPaymentPageRequest", problem))
            return _error("E00003", problem)
        token = secrets.token_urlsafe(600)  # Authorize.Net's tokens are long opaque strings
        self.tokens[token] = _Token(transaction=dict(inner["transactionRequest"]))
        return {"token": token, **_ok()}

    def _createTransactionRequest(self, inner: Json) -> Json:
        request = inner["transactionRequest"]
        kind = request["transactionType"]
        ref = self.transactions.get(str(request.get("refTransId")))
        if ref is None:
            return _declined(3, "16", "The transaction cannot be found.")
        if kind == "priorAuthCaptureTransaction":
            if ref.status in ("capturedPendingSettlement", "settledSuccessfully"):
                return _declined(3, "311", "This transaction has already been captured.")
            if ref.status != "authorizedPendingCapture":
                return _declined(3, "16", "The transaction cannot be found.")
            amount = Decimal(request.get("amount", ref.auth_amount))
            if amount > ref.auth_amount:
                return _declined(
                    3,
                    "47",
                    "The amount requested for settlement cannot be greater than the original "
                    "amount authorized.",
                )
            ref.status, ref.settle_amount = "capturedPendingSettlement", amount
            self._emit("net.authorize.payment.priorAuthCapture.created", ref)
            return _approved(ref.trans_id, ref, ref_trans_id=ref.trans_id)
        if kind == "voidTransaction":
            if ref.status == "voided":
                return _declined(3, "310", "This transaction has already been voided.")
            if ref.status not in (
                "authorizedPendingCapture",
                "capturedPendingSettlement",
                "FDSPendingReview",
                "refundPendingSettlement",
            ):
                return _declined(3, "16", "The transaction cannot be found.")
            ref.status = "voided"
            self._emit("net.authorize.payment.void.created", ref)
            return _approved(ref.trans_id, ref, ref_trans_id=ref.trans_id)
        # refundTransaction
        card = request["payment"]["creditCard"]
        if ref.status != "settledSuccessfully" or card.get("cardNumber") != ref.last_four:
            return _declined(
                3,
                "54",
                "The referenced transaction does not meet the criteria for issuing a credit.",
            )
        amount = Decimal(request["amount"])
        invoice = (request.get("order") or {}).get("invoiceNumber")
        refunded = sum(
            (t.settle_amount for t in self.transactions.values()
             if t.ref_trans_id == ref.trans_id and t.transaction_type == "refundTransaction"
             and t.status != "voided"),
            Decimal(0),
        )  # fmt: skip
        for earlier in self.transactions.values():
            if (
                earlier.ref_trans_id == ref.trans_id
                and earlier.transaction_type == "refundTransaction"
                and earlier.settle_amount == amount
                and earlier.invoice == invoice
                and datetime.now(UTC) - earlier.submitted < timedelta(seconds=_window(request))
            ):
                return _declined(3, "11", "A duplicate transaction has been submitted.")
        if refunded + amount > ref.settle_amount:
            return _declined(
                3,
                "55",
                "The sum of credits against the referenced transaction would exceed original "
                "debit amount.",
            )
        refund = self._new(
            "refundTransaction",
            "refundPendingSettlement",
            auth_amount=Decimal(0),
            settle_amount=amount,
            invoice=invoice,
            description=None,
            card_number=ref.card_number,
            ref_trans_id=ref.trans_id,
        )
        self._emit("net.authorize.payment.refund.created", refund)
        return _approved(refund.trans_id, refund, ref_trans_id=ref.trans_id)

    def _getTransactionDetailsRequest(self, inner: Json) -> Json:
        transaction = self.transactions.get(str(inner["transId"]))
        if transaction is None:
            return _error("E00040", "The record cannot be found.")
        return {"transaction": _details(transaction, self.batches), **_ok()}

    def _getUnsettledTransactionListRequest(self, inner: Json) -> Json:
        listed = [t for t in self.transactions.values() if t.batch_id is None]
        return self._listed(listed)

    def _getSettledBatchListRequest(self, inner: Json) -> Json:
        first = _date(inner["firstSettlementDate"])
        last = _date(inner["lastSettlementDate"])
        batches = [
            {
                "batchId": batch_id,
                "settlementTimeUTC": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "settlementState": "settledSuccessfully",
                "paymentMethod": "creditCard",
            }
            for batch_id, when in self.batches.items()
            if first <= when <= last + timedelta(seconds=1)
        ]
        return ({"batchList": batches} if batches else {}) | _ok()

    def _getTransactionListRequest(self, inner: Json) -> Json:
        batch_id = str(inner["batchId"])
        if batch_id not in self.batches:
            return _error("E00040", "The record cannot be found.")
        return self._listed([t for t in self.transactions.values() if t.batch_id == batch_id])

    def _listed(self, listed: list[Transaction]) -> Json:
        listed.sort(key=lambda t: t.submitted, reverse=True)
        items = [
            {
                "transId": t.trans_id,
                "submitTimeUTC": t.submitted.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "transactionStatus": t.status,
                **({"invoiceNumber": t.invoice} if t.invoice else {}),
                "accountType": "Visa",
                "accountNumber": f"XXXX{t.last_four}",
                "settleAmount": float(t.settle_amount),
                "marketType": "eCommerce",
                "product": "Card Not Present",
            }
            for t in listed
        ]
        # Authorize.Net leaves the list out when it is empty.
        return (
            ({"transactions": items} if items else {}) | {"totalNumInResultSet": len(items)} | _ok()
        )

    # -- the hosted form ---------------------------------------------------------------------

    async def form(self, request: Request) -> Response:
        form = await request.form()
        token = str(form.get("token", ""))
        with self._lock:
            held = self.tokens.get(token)
            if held is None or held.used:
                return HTMLResponse("<p>Your session has expired or does not exist.</p>", 400)
            amount = held.transaction["amount"]
        return HTMLResponse(f"<h1 id='amount'>Pay {amount}</h1>")

    async def control_pay(self, request: Request) -> Response:
        body = await request.json()
        transaction = self.pay(str(body["token"]), body.get("outcome", "approved"))
        return JSONResponse({"transId": transaction.trans_id})


def _in_order(keys: list[str], order: tuple[str, ...]) -> str | None:
    position = -1
    for key in keys:
        if key not in order:
            return f"unknown element {key!r}"
        if order.index(key) < position:
            return f"element {key!r} is out of order (the schema's sequence: {', '.join(order)})"
        position = order.index(key)
    return None


def _missing(obj: Json, required: set[str] | frozenset[str]) -> str | None:
    absent = sorted(required - set(obj))
    return f"missing required element(s): {', '.join(absent)}" if absent else None


def _window(request: Json) -> int:
    for setting in (request.get("transactionSettings") or {}).get("setting", []):
        if setting["settingName"] == "duplicateWindow":
            return int(setting["settingValue"])
    return 120  # Authorize.Net's default: two minutes


def _date(value: Any) -> datetime:
    return datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _ok() -> Json:
    return {
        "messages": {"resultCode": "Ok", "message": [{"code": "I00001", "text": "Successful."}]}
    }


def _error(code: str, text: str) -> Json:
    return {"messages": {"resultCode": "Error", "message": [{"code": code, "text": text}]}}


def _approved(trans_id: str, transaction: Transaction, *, ref_trans_id: str) -> Json:
    return {
        "transactionResponse": {
            "responseCode": "1",
            "authCode": "QWE123",
            "avsResultCode": "P",
            "cvvResultCode": "",
            "cavvResultCode": "",
            "transId": trans_id,
            "refTransID": ref_trans_id,
            "transHash": "",
            "accountNumber": f"XXXX{transaction.last_four}",
            "accountType": "Visa",
            "messages": [{"code": "1", "description": "This transaction has been approved."}],
        },
        **_ok(),
    }


def _declined(response_code: int, reason: str, text: str) -> Json:
    return {
        "transactionResponse": {
            "responseCode": str(response_code),
            "authCode": "",
            "avsResultCode": "P",
            "transId": "0",
            "refTransID": "",
            "transHash": "",
            "errors": [{"errorCode": reason, "errorText": text}],
        },
        **_error("E00027", "The transaction was unsuccessful."),
    }


def _details(t: Transaction, batches: dict[str, datetime]) -> Json:
    details: Json = {
        "transId": t.trans_id,
        **({"refTransId": t.ref_trans_id} if t.ref_trans_id else {}),
        "submitTimeUTC": t.submitted.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "transactionType": t.transaction_type,
        "transactionStatus": t.status,
        "responseCode": t.response_code,
        "responseReasonCode": 1,
        "authAmount": float(t.auth_amount),
        "settleAmount": float(t.settle_amount),
        "order": {
            **({"invoiceNumber": t.invoice} if t.invoice else {}),
            **({"description": t.description} if t.description else {}),
        },
        "payment": {
            "creditCard": {
                "cardNumber": f"XXXX{t.last_four}",
                "expirationDate": "XXXX",
                "cardType": "Visa",
            }
        },
        "marketType": "eCommerce",
        "product": "Card Not Present",
    }
    if t.batch_id:
        details["batch"] = {
            "batchId": t.batch_id,
            "settlementTimeUTC": batches[t.batch_id].strftime("%Y-%m-%dT%H:%M:%SZ"),
            "settlementState": "settledSuccessfully",
        }
    return details


@contextmanager
def running_fake_authorizenet(
    *, login_id: str, transaction_key: str, signature_key: str
) -> Iterator[FakeAuthorizeNet]:
    fake = FakeAuthorizeNet(login_id, transaction_key, signature_key)
    app = Starlette(
        routes=[
            Route(API_PATH, fake.handle, methods=["POST"]),
            Route(FORM_PATH, fake.form, methods=["POST"]),
            Route("/_control/pay", fake.control_pay, methods=["POST"]),
        ]
    )
    with serve_in_thread(app) as url:
        fake.url = url
        yield fake
