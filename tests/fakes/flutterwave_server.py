"""A fake of Flutterwave's v3 REST API, for tests: the real ``FlutterwaveProvider`` talks to it
over loopback.

Flutterwave publishes no machine-readable description of v3 that is reachable here, so this
fake follows its API reference and guides, page by page (developer.flutterwave.com):

- "Flutterwave Standard" (docs/collecting-payments/standard): ``POST /v3/payments`` with
  ``tx_ref``, ``amount``, ``currency``, ``redirect_url``, ``customer`` (an email is required),
  optional ``meta``, ``customizations``, ``session_duration``, ``max_retry_attempt``,
  ``payment_options``; the answer ``{"status": "success", "message": "Hosted Link",
  "data": {"link": ...}}``.
- "Verify transaction with tx_ref" (v3.0.0/reference/verify-transaction-with-tx_ref):
  ``GET /v3/transactions/verify_by_reference?tx_ref=``; the transaction (``id``, ``tx_ref``,
  ``flw_ref``, ``amount``, ``currency``, ``charged_amount``, ``status`` successful / failed /
  pending, ``payment_type``, ``customer``, ``meta``...), or 400 "No transaction was found for
  this id".
- "Refund a transaction" (v3.0.0/reference/transaction-refund) and "Refunds"
  (docs/payment-operations/refunds): ``POST /v3/transactions/{id}/refund`` with optional
  ``amount`` (a partial refund), ``comments``, ``callback_url``; the refund (``id``, ``tx_id``,
  ``flw_ref``, ``amount_refunded``, ``status``, ``destination``, ``meta``, ``created_at``).
- "Get a refund" (v3.0.0/reference/get-a-refund): ``GET /v3/refunds/{id}``; "Fetch multiple
  refunded transactions" (v3.0.0/reference/get-all-refunds): ``GET /v3/refunds`` filtered by
  ``id`` (the transaction), paged, with ``meta.page_info``.
- "Get all wallet balances" (``GET /v3/balances``), the health check's cheap read.
- "Webhooks" (docs/integration-guides/webhooks): a POST of ``{"event": "charge.completed",
  "data": {...the transaction...}, "event.type": "CARD_TRANSACTION"}`` with the header
  ``verif-hash`` set to the secret hash from the dashboard.
- Errors everywhere: ``{"status": "error", "message": ..., "data": null}``; 401 "Invalid
  authorization key" without our secret key as a Bearer token; 429 with Retry-After.

Every request is checked strictly: the Bearer secret key, the JSON body's fields (required
ones present, no unknown ones, the right types), ``amount`` a JSON number in major units with
at most the currency's decimals (ISO 4217's, from ``services.money``). A request that departs
is answered 400 and kept in ``violations``; tests assert that it stays empty.

Controls stand in for the customer and Flutterwave's back office: ``pay`` (successful, failed
or pending; optionally with another amount or currency, to tamper), ``complete_refund`` and
``fail_refund`` (refunds start pending, as Flutterwave processes them later), ``delivery``
(a webhook body and headers), and ``fail_next`` (429, 500, 503, or a hang before or after the
work). The server runs in another thread: every state change holds one lock.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.money import currency_exponent
from tests.fakes.openapi_check import Violation
from tests.fakes.server import serve_in_thread

Json = dict[str, Any]
FaultKind = Literal["rate_limit", "server_error", "unavailable", "hang", "hang_after"]

# Flutterwave Standard's currencies ("Payment methods"; the provider's list is the same).
CURRENCIES = frozenset(
    {
        "NGN",
        "GHS",
        "KES",
        "UGX",
        "TZS",
        "RWF",
        "ZMW",
        "MWK",
        "ZAR",
        "EGP",
        "XAF",
        "XOF",
        "USD",
        "EUR",
        "GBP",
    }
)
PAYMENT_FIELDS = {
    "tx_ref": str,
    "amount": (int, Decimal),
    "currency": str,
    "redirect_url": str,
    "customer": dict,
    "meta": dict,
    "customizations": dict,
    "session_duration": int,
    "max_retry_attempt": int,
    "payment_options": str,
    "payment_plan": (int, str),
    "subaccounts": list,
}
PAYMENT_REQUIRED = ("tx_ref", "amount", "redirect_url", "customer")
REFUND_FIELDS = {"amount": (int, Decimal), "comments": str, "callback_url": str}
HANG_S = 3.0
PAGE_SIZE = 10


@dataclass
class Link:
    tx_ref: str
    amount: Decimal
    currency: str
    email: str
    meta: Json
    redirect_url: str


@dataclass
class Transaction:
    id: int
    tx_ref: str
    amount: Decimal
    currency: str
    status: str
    email: str
    meta: Json
    created_at: str
    refunded: Decimal = Decimal(0)

    def as_json(self) -> Json:
        return {
            "id": self.id,
            "tx_ref": self.tx_ref,
            "flw_ref": f"FLW-MOCK-{self.id}",
            "device_fingerprint": "N/A",
            "amount": _number(self.amount),
            "currency": self.currency,
            "charged_amount": _number(self.amount),
            "app_fee": 1.4,
            "merchant_fee": 0,
            "processor_response": (
                "Approved by Financial Institution" if self.status == "successful" else "Declined"
            ),
            "auth_model": "PIN",
            "ip": "197.210.64.96",
            "narration": "CARD Transaction ",
            "status": self.status,
            "payment_type": "card",
            "created_at": self.created_at,
            "account_id": 17321,
            "meta": self.meta,
            "customer": {"id": 215604089, "email": self.email, "name": "Anonymous customer"},
        }


@dataclass
class Refund:
    id: int
    tx_id: int
    amount: Decimal
    status: str
    comments: str | None
    created_at: str

    def as_json(self) -> Json:
        return {
            "id": self.id,
            "account_id": 73362,
            "tx_id": self.tx_id,
            "flw_ref": f"URF_{self.id}",
            "wallet_id": 74639,
            "amount_refunded": _number(self.amount),
            "status": self.status,
            "destination": "payment_source",
            "meta": {"source": "availablebalance"},
            "comments": self.comments,
            "created_at": self.created_at,
        }


@dataclass
class Fault:
    kind: FaultKind
    path_prefix: str
    times: int


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    authorization: str | None


def _number(value: Decimal) -> int | float:
    # Flutterwave answers plain JSON numbers; the client under test parses them exactly.
    return int(value) if value == value.to_integral_value() else float(value)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps({"status": "error", "message": message, "data": None}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _ok(message: str, data: Any, meta: Json | None = None) -> Response:
    body: Json = {"status": "success", "message": message, "data": data}
    if meta is not None:
        body["meta"] = meta
    return Response(json.dumps(body), media_type="application/json")


@dataclass
class FakeFlutterwave:
    secret_key: str
    secret_hash: str
    url: str = ""
    links: dict[str, Link] = field(default_factory=dict)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    refunds: dict[int, Refund] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    refunds_complete_at_once: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next_id: int = 5_000_000

    # -- controls --------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.links.clear()
            self.transactions.clear()
            self.refunds.clear()
            self.violations.clear()
            self.requests.clear()
            self.faults.clear()
            self.refunds_complete_at_once = False

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def pay(
        self,
        tx_ref: str,
        status: Literal["successful", "failed", "pending"] = "successful",
        *,
        amount: Decimal | None = None,
        currency: str | None = None,
    ) -> int:
        """The customer pays on the link for ``tx_ref`` (``amount`` or ``currency`` other than
        the link's: a tampered payment). The new transaction's id."""
        with self._lock:
            link = self.links[tx_ref]
            transaction = Transaction(
                id=self._new_id(),
                tx_ref=tx_ref,
                amount=link.amount if amount is None else amount,
                currency=link.currency if currency is None else currency,
                status=status,
                email=link.email,
                meta=link.meta,
                created_at=_now(),
            )
            self.transactions[transaction.id] = transaction
            return transaction.id

    def settle(self, transaction_id: int, status: Literal["successful", "failed"]) -> None:
        """A pending transaction ends."""
        with self._lock:
            self.transactions[transaction_id].status = status

    def latest(self, tx_ref: str) -> Transaction | None:
        found = [t for t in self.transactions.values() if t.tx_ref == tx_ref]
        return max(found, key=lambda t: t.id) if found else None

    def complete_refund(self, refund_id: int) -> None:
        with self._lock:
            self.refunds[refund_id].status = "completed"

    def fail_refund(self, refund_id: int) -> None:
        with self._lock:
            refund = self.refunds[refund_id]
            refund.status = "failed"
            self.transactions[refund.tx_id].refunded -= refund.amount

    def refund_directly(self, transaction_id: int, amount: Decimal) -> int:
        """The merchant refunds in Flutterwave's dashboard."""
        with self._lock:
            return self._make_refund(self.transactions[transaction_id], amount, None).id

    def delivery(
        self, tx_ref: str, *, secret_hash: str | None = None, event: str = "charge.completed"
    ) -> tuple[bytes, dict[str, str]]:
        """A webhook delivery about the latest transaction of ``tx_ref`` (with another
        ``secret_hash``: a forged one)."""
        transaction = self.latest(tx_ref)
        assert transaction is not None, f"nothing paid for {tx_ref}"
        payload = {"event": event, "data": transaction.as_json(), "event.type": "CARD_TRANSACTION"}
        headers = {
            "Content-Type": "application/json",
            "verif-hash": self.secret_hash if secret_hash is None else secret_hash,
        }
        return json.dumps(payload).encode(), headers

    def fail_next(self, kind: FaultKind, *, times: int = 1, path_prefix: str = "/v3/") -> None:
        with self._lock:
            self.faults.append(Fault(kind, path_prefix, times))

    def seen(self, method: str, path_prefix: str) -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    # -- the API ---------------------------------------------------------------------------

    def _make_refund(
        self, transaction: Transaction, amount: Decimal, comments: str | None
    ) -> Refund:
        transaction.refunded += amount
        refund = Refund(
            id=self._new_id(),
            tx_id=transaction.id,
            amount=amount,
            status="completed" if self.refunds_complete_at_once else "pending",
            comments=comments,
            created_at=_now(),
        )
        self.refunds[refund.id] = refund
        return refund

    def _violation(self, request: Request, problem: str) -> Response:
        self.violations.append(Violation(request.method, request.url.path, problem))
        return _error(400, problem)

    def _check_fields(
        self,
        request: Request,
        body: Any,
        allowed: dict[str, Any],
        required: tuple[str, ...],
    ) -> str | None:
        if not isinstance(body, dict):
            return "the body is not a JSON object"
        for name in required:
            if name not in body:
                return f"{name} is required"
        for name, value in body.items():
            if name not in allowed:
                return f"{name} is not a field of this request"
            if isinstance(value, bool) or not isinstance(value, allowed[name]):
                return f"{name} has the wrong type"
        return None

    def _check_amount(self, value: Any, currency: str) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            return "amount must be a JSON number"
        amount = Decimal(value)
        if amount <= 0:
            return "amount must be positive"
        exponent = amount.as_tuple().exponent
        assert isinstance(exponent, int)
        if -exponent > currency_exponent(currency):
            return f"amount has more decimals than {currency} has"
        return None

    async def handle(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw, parse_float=Decimal) if raw else None
        except ValueError:
            body = "<not json>"
        path = request.url.path
        with self._lock:
            self.requests.append(
                Seen(
                    request.method,
                    path,
                    dict(request.query_params),
                    body,
                    request.headers.get("authorization"),
                )
            )
            fault = next((f for f in self.faults if path.startswith(f.path_prefix)), None)
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
        if request.headers.get("authorization") != f"Bearer {self.secret_key}":
            return _error(401, "Invalid authorization key")
        if fault is not None:
            if fault.kind == "rate_limit":
                return _error(429, "Too many requests", {"Retry-After": "1"})
            if fault.kind == "server_error":
                return _error(500, "Internal server error")
            if fault.kind == "unavailable":
                return _error(503, "Service unavailable")
            if fault.kind == "hang":
                await asyncio.sleep(HANG_S)
                return _error(504, "Gateway timeout")
        if body == "<not json>":
            with self._lock:
                return self._violation(request, "the body is not JSON")
        with self._lock:
            response = self._route(request, path, body)
        if fault is not None and fault.kind == "hang_after":
            await asyncio.sleep(HANG_S)  # the work is done; its answer never arrives in time
        return response

    def _route(self, request: Request, path: str, body: Any) -> Response:
        method = request.method
        if method == "POST" and path == "/v3/payments":
            return self._create_payment(request, body)
        if method == "GET" and path == "/v3/transactions/verify_by_reference":
            return self._verify(request)
        match = re.fullmatch(r"/v3/transactions/([0-9]+)/refund", path)
        if method == "POST" and match:
            return self._refund(request, int(match.group(1)), body)
        match = re.fullmatch(r"/v3/refunds/([0-9]+)", path)
        if method == "GET" and match:
            refund = self.refunds.get(int(match.group(1)))
            if refund is None:
                return _error(404, "Refund not found")
            return _ok("Refund fetched", refund.as_json())
        if method == "GET" and path == "/v3/refunds":
            return self._list_refunds(request)
        if method == "GET" and path == "/v3/balances":
            return _ok(
                "Wallet balances fetched",
                [{"currency": "NGN", "available_balance": 100000, "ledger_balance": 100000}],
            )
        return self._violation(request, "no such endpoint in Flutterwave's v3 reference")

    def _create_payment(self, request: Request, body: Any) -> Response:
        problem = self._check_fields(request, body, PAYMENT_FIELDS, PAYMENT_REQUIRED)
        if problem:
            return self._violation(request, problem)
        currency = body.get("currency", "NGN")  # "If you don't specify a value ... NGN"
        if currency not in CURRENCIES:
            return _error(400, "Invalid currency provided")
        problem = self._check_amount(body["amount"], currency)
        if problem:
            return self._violation(request, problem)
        email = body["customer"].get("email")
        if not isinstance(email, str) or "@" not in email:
            return self._violation(request, "customer.email is required")
        if not body["tx_ref"] or not body["redirect_url"].startswith(("https://", "http://")):
            return self._violation(request, "tx_ref or redirect_url is not usable")
        existing = self.links.get(body["tx_ref"])
        if existing is not None and (existing.amount, existing.currency) != (
            Decimal(body["amount"]),
            currency,
        ):
            return _error(400, "Duplicate transaction reference")
        self.links[body["tx_ref"]] = Link(
            tx_ref=body["tx_ref"],
            amount=Decimal(body["amount"]),
            currency=currency,
            email=email,
            meta=body.get("meta") or {},
            redirect_url=body["redirect_url"],
        )
        token = secrets.token_hex(8)
        return _ok("Hosted Link", {"link": f"{self.url}/v3/hosted/pay/{token}"})

    def _verify(self, request: Request) -> Response:
        tx_ref = request.query_params.get("tx_ref")
        if not tx_ref:
            return self._violation(request, "tx_ref is required")
        transaction = self.latest(tx_ref)
        if transaction is None:
            return _error(400, "No transaction was found for this id")
        return _ok("Transaction fetched successfully", transaction.as_json())

    def _refund(self, request: Request, transaction_id: int, body: Any) -> Response:
        problem = self._check_fields(request, body or {}, REFUND_FIELDS, ())
        if problem:
            return self._violation(request, problem)
        transaction = self.transactions.get(transaction_id)
        if transaction is None:
            return _error(404, "Transaction not found")
        if transaction.status != "successful":
            return _error(400, "Only successful transactions can be refunded")
        body = body or {}
        left = transaction.amount - transaction.refunded
        if "amount" in body:
            problem = self._check_amount(body["amount"], transaction.currency)
            if problem:
                return self._violation(request, problem)
            amount = Decimal(body["amount"])
        else:
            amount = left
        if amount > left:
            return _error(400, "Refund amount exceeds the transaction amount left to refund")
        refund = self._make_refund(transaction, amount, body.get("comments"))
        return _ok("Transaction refund initiated", refund.as_json())

    def _list_refunds(self, request: Request) -> Response:
        query = request.query_params
        unknown = set(query) - {"from", "to", "page", "status", "currency", "flw_ref", "id"}
        if unknown:
            return self._violation(request, f"unknown query parameters {sorted(unknown)}")
        found = sorted(self.refunds.values(), key=lambda r: r.id)
        if "id" in query:
            found = [r for r in found if str(r.tx_id) == query["id"]]
        page = int(query.get("page", "1"))
        chunk = found[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        pages = max(1, -(-len(found) // PAGE_SIZE))
        listed = [
            {
                "id": r.id,
                "amount_refunded": _number(r.amount),
                "status": r.status,
                "flw_ref": f"URF_{r.id}",
                "comment": r.comments,
                "settlement_id": "NEW",
                "meta": "{}",
                "created_at": r.created_at,
                "account_id": 73362,
                "transaction_id": r.tx_id,
            }
            for r in chunk
        ]
        return _ok(
            "Refunds fetched",
            listed,
            meta={
                "page_info": {
                    "total": len(found),
                    "current_page": page,
                    "total_pages": pages,
                    "page_size": PAGE_SIZE,
                }
            },
        )


@contextmanager
def running_fake_flutterwave(*, secret_key: str, secret_hash: str) -> Iterator[FakeFlutterwave]:
    fake = FakeFlutterwave(secret_key=secret_key, secret_hash=secret_hash)
    app = Starlette(
        routes=[
            Route("/{path:path}", fake.handle, methods=["GET", "POST", "PUT", "DELETE"]),
        ]
    )
    with serve_in_thread(app) as url:
        fake.url = url
        # give the server a beat to bind everything before the first test
        time.sleep(0.01)
        yield fake
