"""A fake of Paystack's REST API, for tests: the real ``PaystackProvider`` talks to it over
loopback.

It speaks Paystack's wire format as its API reference describes it (paystack.com/docs/api:
transaction/initialize, transaction/verify, refund create/list/fetch, balance): the secret key
as a Bearer token (anything else is 401 ``Invalid key``), JSON envelopes ``{"status", "message",
"data"}``, errors ``{"status": false, "message"}``, amounts in the currency's subunit.

Every request is checked against Paystack's published OpenAPI description, and every answer
the fake gives is checked too (``tests/fakes/paystack_spec.py``); departures are kept in
``violations`` (a request that departs is answered 400, as Paystack would). Tests assert that
``violations`` is empty.

It is stateful, as Paystack is: an initialized transaction is ``abandoned`` until the customer
acts (paystack.com/docs/payments/verify-payments: "The customer has not completed the
transaction"), ``pay`` stands in for the customer on the checkout page (``success``,
``failed``, ``abandoned``, or ``ongoing``), as does a POST of that page's form; refunds start
``pending`` and end ``processed`` or ``failed`` when ``process_refund`` / ``fail_refund`` say
so, and a transaction whose whole amount went back is ``reversed``. State changes emit the
events Paystack would send (payments/webhooks, payments/refunds: ``charge.success``,
``refund.pending``, ``refund.processed``, ``refund.failed``), and ``signed_delivery`` turns one
into a delivery's body and headers, signed as Paystack signs them: ``x-paystack-signature`` is
the hex HMAC-SHA512 of the body keyed with the secret key.

Controls: ``tamper`` changes what a transaction charged (another amount or currency), as a
checkout tampered with in the customer's browser would; ``fail_next`` makes the next calls
answer 429 (with Retry-After), 500, 503, 401, or hang (before the work, or after it: the answer
is what is lost); ``currencies`` limits what the merchant's account may charge in.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import secrets
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tests.fakes.openapi_check import Operation, Violation
from tests.fakes.paystack_spec import PaystackSpec
from tests.fakes.server import serve_in_thread

Json = dict[str, Any]
FaultKind = Literal[
    "rate_limit", "server_error", "unavailable", "unauthorized", "hang", "hang_after"
]
Outcome = Literal["success", "failed", "abandoned", "ongoing"]

ALL_CURRENCIES = frozenset({"NGN", "GHS", "ZAR", "KES", "USD"})
GATEWAY_RESPONSES = {
    "success": "Successful",
    "failed": "Declined",
    "abandoned": "The transaction was not completed",
    "ongoing": "Awaiting customer action",
}


class PaystackError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: Json = {"status": False, "message": message, **extra}
        self.headers: dict[str, str] = {}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Fault:
    kind: FaultKind
    path_prefix: str | None = None
    retry_after: int | None = None
    method: str | None = None


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    body: Json | None
    status: int = 0


@dataclass
class FakePaystack:
    """Paystack's API, in memory. ``app`` is the ASGI app; ``url`` is set once served."""

    secret_key: str
    url: str = ""
    hang_limit_s: float = 10.0
    currencies: frozenset[str] = ALL_CURRENCIES
    transactions: dict[str, Json] = field(default_factory=dict)  # by reference
    refunds: dict[int, Json] = field(default_factory=dict)
    events: list[Json] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._faults: deque[Fault] = deque()
        self._release = threading.Event()
        self._next_id = 4099260516
        self._access: dict[str, str] = {}  # access code -> reference
        self._spec = PaystackSpec.load()
        self.app = Starlette(
            routes=[
                Route("/checkout/{code}", self._checkout_page, methods=["GET", "POST"]),
                Route("/{path:path}", self._api, methods=["GET", "POST", "PUT", "DELETE"]),
            ]
        )

    # -- controls for tests --------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.release_hangs()
            self.transactions.clear()
            self.refunds.clear()
            self.events.clear()
            self.requests.clear()
            self.violations.clear()
            self._faults.clear()
            self._access.clear()
            self.currencies = ALL_CURRENCIES
            self._release = threading.Event()

    def fail_next(
        self,
        kind: FaultKind,
        times: int = 1,
        *,
        path_prefix: str | None = None,
        retry_after: int | None = None,
        method: str | None = None,
    ) -> None:
        """The next ``times`` calls (under ``path_prefix``, with ``method``, if given) answer
        429 (with ``Retry-After``), 500, 503 or 401, or hang until ``release_hangs``
        (``hang``: before doing anything; ``hang_after``: once the work is done, so only the
        answer is lost)."""
        with self._lock:
            for _ in range(times):
                self._faults.append(Fault(kind, path_prefix, retry_after, method))

    def release_hangs(self) -> None:
        self._release.set()

    def calls(self, method: str, path: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r for r in self.requests if r.method == method and (path is None or r.path == path)
            ]

    def pay(self, reference: str, outcome: Outcome = "success") -> str:
        """The customer acts on the checkout page; returns where Paystack sends them next
        (the callback URL with ``trxref`` and ``reference``)."""
        with self._lock:
            transaction = self._transaction(reference)
            if transaction["status"] in ("success", "reversed", "failed"):
                raise ValueError(f"transaction {reference} is {transaction['status']}")
            transaction["status"] = outcome
            transaction["gateway_response"] = GATEWAY_RESPONSES[outcome]
            if outcome == "success":
                transaction["paid_at"] = transaction["paidAt"] = now_iso()
                transaction["authorization"] = {
                    "authorization_code": f"AUTH_{secrets.token_hex(5)}",
                    "bin": "408408",
                    "last4": "4081",
                    "exp_month": "12",
                    "exp_year": "2030",
                    "channel": "card",
                    "card_type": "visa ",
                    "bank": "TEST BANK",
                    "country_code": "NG",
                    "brand": "visa",
                    "reusable": True,
                    "signature": f"SIG_{secrets.token_hex(10)}",
                    "account_name": None,
                }
                self._emit("charge.success", self._charge_event_data(transaction))
            callback = transaction["_callback_url"] or f"{self.url}/callback"
            query = urlencode({"trxref": reference, "reference": reference})
            return f"{callback}{'&' if '?' in callback else '?'}{query}"

    def tamper(
        self, reference: str, *, amount: int | None = None, currency: str | None = None
    ) -> None:
        """What Paystack charged differs from what was initialized (as when the amount is set
        in the customer's browser): ``amount`` and ``requested_amount`` both change."""
        with self._lock:
            transaction = self._transaction(reference)
            if amount is not None:
                transaction["amount"] = transaction["requested_amount"] = amount
            if currency is not None:
                transaction["currency"] = currency

    def process_refund(self, refund_id: int) -> Json:
        return self._settle_refund(refund_id, "processed")

    def fail_refund(self, refund_id: int) -> Json:
        return self._settle_refund(refund_id, "failed")

    def events_of(self, name: str, reference: str | None = None) -> list[Json]:
        with self._lock:
            return [
                copy.deepcopy(event)
                for event in self.events
                if event["event"] == name
                and reference
                in (
                    None,
                    event["data"].get("reference"),
                    event["data"].get("transaction_reference"),
                )
            ]

    def signed_delivery(
        self, event: Json | bytes, *, key: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """A webhook delivery of ``event``: its body, and Paystack's headers with the
        signature made with our secret key (or ``key``, to forge one)."""
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        signature = hmac.new((key or self.secret_key).encode(), body, hashlib.sha512).hexdigest()
        return body, {"Content-Type": "application/json", "x-paystack-signature": signature}

    # -- state ---------------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _transaction(self, reference: str) -> Json:
        try:
            return self.transactions[reference]
        except KeyError:
            raise PaystackError(404, "Transaction reference not found") from None

    def _emit(self, name: str, data: Json) -> None:
        self.events.append({"event": name, "data": copy.deepcopy(data)})

    @staticmethod
    def _public(transaction: Json) -> Json:
        return {k: copy.deepcopy(v) for k, v in transaction.items() if not k.startswith("_")}

    def _charge_event_data(self, transaction: Json) -> Json:
        data = self._public(transaction)
        for key in ("receipt_number", "plan_object", "subaccount", "transaction_date", "connect"):
            data.pop(key, None)
        return data

    def _refunded(self, transaction: Json, *, counting: tuple[str, ...]) -> int:
        return sum(
            r["amount"]
            for r in self.refunds.values()
            if r["transaction"] == transaction["id"] and r["status"] in counting
        )

    def _settle_refund(self, refund_id: int, status: str) -> Json:
        with self._lock:
            refund = self.refunds[refund_id]
            if refund["status"] not in ("pending", "processing"):
                raise ValueError(f"refund {refund_id} is {refund['status']}")
            refund["status"] = status
            refund["updatedAt"] = now_iso()
            if status == "processed":
                refund["refunded_at"] = now_iso()
                refund["deducted_amount"] = refund["amount"]
                refund["fully_deducted"] = 1
            transaction = self.transactions[refund["transaction_reference"]]
            if self._refunded(transaction, counting=("processed",)) >= transaction["amount"]:
                transaction["status"] = "reversed"
            self._emit(f"refund.{status}", self._refund_event_data(refund))
            return copy.deepcopy(refund)

    def _refund_event_data(self, refund: Json) -> Json:
        # As Paystack's refund events are shaped (payments/refunds): the transaction by its
        # reference, no refund ID, the amount as a string.
        return {
            "status": refund["status"],
            "transaction_reference": refund["transaction_reference"],
            "refund_reference": f"TRF_{secrets.token_hex(6)}"
            if refund["status"] != "pending"
            else None,
            "amount": str(refund["amount"]),
            "currency": refund["currency"],
            "processor": "mpgs_zen",
            "customer": {"first_name": None, "last_name": None, "email": refund["_email"]},
            "integration": 412829,
            "domain": "test",
        }

    # -- the API -------------------------------------------------------------------------------

    async def _inject_fault(self, method: str, path: str, *, after: bool) -> None:
        with self._lock:
            fault = next(
                (
                    f
                    for f in self._faults
                    if (f.path_prefix is None or path.startswith(f.path_prefix))
                    and (f.method is None or f.method == method)
                ),
                None,
            )
            if fault is None or (fault.kind == "hang_after") != after:
                return
            self._faults.remove(fault)
            release = self._release
        if fault.kind in ("hang", "hang_after"):
            await asyncio.get_running_loop().run_in_executor(None, release.wait, self.hang_limit_s)
            raise PaystackError(504, "Gateway timeout")
        if fault.kind == "rate_limit":
            error = PaystackError(429, "Too many requests, please try again later")
            if fault.retry_after is not None:
                error.headers["Retry-After"] = str(fault.retry_after)
            raise error
        if fault.kind == "unauthorized":
            raise PaystackError(401, "Invalid key")
        status = 500 if fault.kind == "server_error" else 503
        raise PaystackError(status, "An error occurred")

    def _authenticate(self, authorization: str | None) -> None:
        expected = f"Bearer {self.secret_key}"
        if authorization is None or not hmac.compare_digest(authorization, expected):
            raise PaystackError(401, "Invalid key")

    async def _api(self, request: Request) -> Response:
        method, path, query = request.method, request.url.path, request.url.query
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = RecordedRequest(method=method, path=path, query=query, body=None)
        if raw:
            try:
                record.body = json.loads(raw)
            except ValueError:
                record.body = None
        with self._lock:
            self.requests.append(record)
        check_response = True
        extra_headers: dict[str, str] = {}
        try:
            await self._inject_fault(method, path, after=False)
            self._authenticate(headers.get("authorization"))
            operation, violations = self._spec.check_request(method, path, query, headers, raw)
            if violations or operation is None:
                check_response = False  # the request is already a failure of the test
                with self._lock:
                    self.violations.extend(violations)
                raise PaystackError(400, "Invalid request", type="validation_error")
            with self._lock:
                status, answer = self._serve(operation, record.body, dict(parse_qsl(query)))
            content = json.dumps(answer).encode()
            await self._inject_fault(method, path, after=True)
        except PaystackError as error:
            status, content = error.status, json.dumps(error.body).encode()
            extra_headers = error.headers
        record.status = status
        if check_response:
            problems = self._spec.check_response(method, path, query, headers, raw, status, content)
            if problems:
                with self._lock:
                    self.violations.extend(problems)
        return Response(
            content, status_code=status, media_type="application/json", headers=extra_headers
        )

    def _serve(
        self, operation: Operation, body: Json | None, query: dict[str, str]
    ) -> tuple[int, Json]:
        route = (operation.method, operation.template)
        params = operation.path_params
        if route == ("post", "/transaction/initialize"):
            return self._initialize(body or {})
        if route == ("get", "/transaction/verify/{reference}"):
            transaction = self._transaction(params["reference"])
            return 200, {
                "status": True,
                "message": "Verification successful",
                "data": self._public(transaction),
            }
        if route == ("post", "/refund"):
            return self._create_refund(body or {})
        if route == ("get", "/refund"):
            return self._list_refunds(query)
        if route == ("get", "/refund/{id}"):
            refund = self.refunds.get(int(params["id"])) if params["id"].isdigit() else None
            if refund is None:
                raise PaystackError(404, "Refund not found")
            return 200, {
                "status": True,
                "message": "Refund retrieved",
                "data": self._public(refund),
            }
        if route == ("get", "/balance"):
            return 200, {
                "status": True,
                "message": "Balances retrieved",
                "data": [{"currency": "NGN", "balance": 0}],
            }
        self.violations.append(
            Violation(operation.method, operation.template, "valid, but the fake does not serve it")
        )
        raise PaystackError(404, "Not found")

    def _initialize(self, body: Json) -> tuple[int, Json]:
        currency = body.get("currency", "NGN")
        if currency not in self.currencies:
            raise PaystackError(400, "Currency not supported by merchant")
        reference = body.get("reference") or secrets.token_hex(5)
        if reference in self.transactions:
            raise PaystackError(
                400,
                "Duplicate Transaction Reference",
                type="validation_error",
                code="duplicate_reference",
                meta={"nextStep": "Try and create the Transaction or Charge with a new reference"},
            )
        access_code = secrets.token_hex(8)
        created = now_iso()
        self._access[access_code] = reference
        self.transactions[reference] = {
            "id": self._new_id(),
            "domain": "test",
            "status": "abandoned",
            "reference": reference,
            "receipt_number": None,
            "amount": body["amount"],
            "message": None,
            "gateway_response": GATEWAY_RESPONSES["abandoned"],
            "paid_at": None,
            "created_at": created,
            "channel": "card",
            "currency": currency,
            "ip_address": "197.210.54.33",
            "metadata": copy.deepcopy(body.get("metadata", "")),
            "log": None,
            "fees": None,
            "fees_split": None,
            "authorization": {},
            "customer": {
                "id": 181873746,
                "first_name": None,
                "last_name": None,
                "email": body["email"],
                "customer_code": "CUS_1rkzaqsv4rrhqo6",
                "phone": None,
                "metadata": None,
                "risk_action": "default",
                "international_format_phone": None,
            },
            "plan": None,
            "split": {},
            "order_id": None,
            "paidAt": None,
            "createdAt": created,
            "requested_amount": body["amount"],
            "pos_transaction_data": None,
            "source": None,
            "fees_breakdown": None,
            "connect": None,
            "transaction_date": created,
            "plan_object": {},
            "subaccount": {},
            "_callback_url": body.get("callback_url"),
            "_access_code": access_code,
        }
        return 200, {
            "status": True,
            "message": "Authorization URL created",
            "data": {
                "authorization_url": f"{self.url}/checkout/{access_code}",
                "access_code": access_code,
                "reference": reference,
            },
        }

    def _find_transaction(self, key: str) -> Json | None:
        """A transaction by reference or by ID, as refunds name them."""
        if key in self.transactions:
            return self.transactions[key]
        return next((t for t in self.transactions.values() if str(t["id"]) == key), None)

    def _create_refund(self, body: Json) -> tuple[int, Json]:
        transaction = self._find_transaction(str(body["transaction"]))
        if transaction is None:
            raise PaystackError(404, "Transaction not found")
        if transaction["status"] == "reversed":
            raise PaystackError(400, "Transaction has been fully reversed")
        if transaction["status"] != "success":
            raise PaystackError(400, "Cannot refund a transaction that is not successful")
        if "currency" in body and body["currency"] != transaction["currency"]:
            raise PaystackError(400, "Currency does not match the transaction's")
        left = transaction["amount"] - self._refunded(
            transaction, counting=("pending", "processing", "processed")
        )
        amount = body.get("amount", left)
        if amount <= 0 or amount > left:
            raise PaystackError(
                400, "Refund amount cannot be greater than the amount left on the transaction"
            )
        created = now_iso()
        refund = {
            "integration": 412829,
            "transaction": transaction["id"],
            "dispute": None,
            "settlement": None,
            "id": self._new_id(),
            "domain": "test",
            "currency": transaction["currency"],
            "amount": amount,
            "status": "pending",
            "refunded_at": None,
            "refunded_by": "merchant@example.com",
            "customer_note": body.get("customer_note", ""),
            "merchant_note": body.get("merchant_note", ""),
            "deducted_amount": 0,
            "fully_deducted": 0,
            "createdAt": created,
            "updatedAt": created,
            "expected_at": created,
            "channel": None,
            "bank_reference": None,
            "transaction_reference": transaction["reference"],
            "reason": body.get("customer_note", ""),
            "customer": {
                "id": 181873746,
                "first_name": "",
                "last_name": "",
                "email": transaction["customer"]["email"],
                "customer_code": "CUS_1rkzaqsv4rrhqo6",
                "phone": "+2348000000000",
                "metadata": "",
                "risk_action": "default",
                "international_format_phone": "",
            },
            "refund_type": "partial" if amount < transaction["amount"] else "full",
            "transaction_amount": transaction["amount"],
            "initiated_by": "api",
            "refund_channel": "card",
            "session_id": None,
            "collect_account_number": False,
            "_email": transaction["customer"]["email"],
        }
        self.refunds[refund["id"]] = refund
        self._emit("refund.pending", self._refund_event_data(refund))
        answer = {
            key: copy.deepcopy(refund[key])
            for key in (
                "integration",
                "deducted_amount",
                "channel",
                "merchant_note",
                "customer_note",
                "status",
                "refunded_by",
                "expected_at",
                "currency",
                "domain",
                "amount",
                "id",
                "createdAt",
                "updatedAt",
            )
        }
        answer["fully_deducted"] = False
        answer["transaction"] = {
            "id": transaction["id"],
            "domain": "test",
            "reference": transaction["reference"],
            "amount": transaction["amount"],
            "paid_at": transaction["paid_at"] or "",
            "channel": transaction["channel"],
            "currency": transaction["currency"],
            "authorization": {"exp_month": None, "exp_year": None, "account_name": None},
            "customer": {"international_format_phone": None},
            "plan": {},
            "subaccount": {"currency": None},
            "split": {},
            "order_id": None,
            "paidAt": transaction["paidAt"] or "",
            "pos_transaction_data": None,
            "source": None,
            "fees_breakdown": None,
        }
        return 200, {
            "status": True,
            "message": "Refund has been queued for processing",
            "data": answer,
        }

    def _list_refunds(self, query: dict[str, str]) -> tuple[int, Json]:
        wanted = query.get("transaction")
        transaction = self._find_transaction(wanted) if wanted else None
        listed = [
            {
                k: copy.deepcopy(v)
                for k, v in r.items()
                if not k.startswith("_") and k not in ("expected_at", "updatedAt", "channel")
            }
            for r in self.refunds.values()
            if wanted is None or (transaction is not None and r["transaction"] == transaction["id"])
        ]
        per_page = int(query.get("perPage", "50"))
        page = int(query.get("page", "1"))
        chunk = listed[(page - 1) * per_page : page * per_page]
        page_count = max(1, -(-len(listed) // per_page))
        return 200, {
            "status": True,
            "message": "Refunds retrieved",
            "data": chunk,
            "meta": {
                "total": len(listed),
                "skipped": (page - 1) * per_page,
                "perPage": str(per_page),
                "page": page,
                "pageCount": page_count,
                "failedRefundCount": sum(1 for r in listed if r["status"] == "failed"),
            },
        }

    # -- the customer's checkout page ------------------------------------------------------

    async def _checkout_page(self, request: Request) -> Response:
        code = request.path_params["code"]
        with self._lock:
            reference = self._access.get(code)
        if reference is None:
            return Response("No such checkout", status_code=404)
        if request.method == "GET":
            return Response(
                f"<form method=post><button name=outcome value=success>Pay</button></form>"
                f"<!-- {reference} -->",
                media_type="text/html",
            )
        form = dict(parse_qsl((await request.body()).decode()))
        outcome = form.get("outcome", "success")
        if outcome not in GATEWAY_RESPONSES:
            return Response("Unknown outcome", status_code=400)
        return RedirectResponse(self.pay(reference, outcome), status_code=302)  # type: ignore[arg-type]


@contextmanager
def running_fake_paystack(**kwargs: Any) -> Iterator[FakePaystack]:
    fake = FakePaystack(**kwargs)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.release_hangs()
