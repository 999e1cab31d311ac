"""A fake of Paddle Billing's API, for tests: the real ``PaddleProvider`` talks to it over
loopback.

It speaks Paddle's wire format: Bearer API keys (a wrong one is 403 ``invalid_token``, as
Paddle answers), ``POST /transactions`` (catalogue ``pri_`` prices or non-catalogue prices and
products), ``GET /transactions/{id}``, ``GET /transactions``, ``POST /adjustments`` and
``GET /adjustments``; answers inside Paddle's ``{"data", "meta": {"request_id"}}`` envelope
and errors in its ``{"error": {"type", "code", "detail", "documentation_url"}}`` one, with the
codes of Paddle's error reference (developer.paddle.com/errors). Every request is checked
against Paddle's published OpenAPI description and so is every answer the fake gives
(``tests/fakes/paddle_spec.py``); departures are kept in ``violations`` (a request that
departs is answered 400 ``bad_request``). Tests assert that ``violations`` is empty.

It is stateful, as Paddle is: a transaction waits on Paddle Checkout until the customer pays
(``pay``, or the test-only control endpoint ``POST /__fake/transactions/{id}/pay``, which
stands in for the customer on the checkout page), is declined (``decline``: the transaction
stays open, as Paddle keeps it for another try), or is canceled. A refund is an adjustment
created ``pending_approval`` that Paddle approves or rejects later (``approve_adjustment``,
``reject_adjustment``); Paddle refuses a second adjustment while one is pending, and a refund
above what is left. Changes emit the events Paddle would send; ``signed_delivery`` turns one
into the body and headers of a delivery, signed as Paddle signs them (``Paddle-Signature:
ts=...;h1=...``, HMAC-SHA256 of ``"{ts}:{body}"``; one ``h1`` per secret during a rotation).

Controls make the next calls fail (``fail_next``: 429 with Retry-After, 500, 503, 401, or a
hang before or after the work is done). The server runs in another thread: every state change
holds one lock.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import secrets
import string
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.openapi_check import Violation
from tests.fakes.paddle_billing import PaddleBilling
from tests.fakes.paddle_spec import PaddleSpec
from tests.fakes.server import serve_in_thread

Json = dict[str, Any]
FaultKind = Literal[
    "rate_limit", "server_error", "unavailable", "unauthorized", "hang", "hang_after"
]
Handler = Callable[[Json | None, dict[str, str], dict[str, str]], tuple[int, Json]]

_ID_ALPHABET = string.ascii_lowercase + string.digits
DOCS = "https://developer.paddle.com/errors"
# Paddle's error reference: (type, detail, page) per code.
ERRORS: dict[str, tuple[str, str, str]] = {
    "authentication_missing": (
        "request_error",
        "Authentication header missing.",
        "shared/authentication_missing",
    ),
    "authentication_malformed": (
        "request_error",
        "Authentication header included, but incorrectly formatted.",
        "shared/authentication_malformed",
    ),
    "invalid_token": ("request_error", "Invalid or revoked API key.", "shared/invalid_token"),
    "invalid_access_token": (
        "request_error",
        "Access token is expired or invalid.",
        "shared/invalid_access_token",
    ),
    "bad_request": ("request_error", "Invalid request.", "shared/bad_request"),
    "not_found": ("request_error", "Entity not found.", "shared/not_found"),
    "too_many_requests": (
        "request_error",
        "Too many requests, please retry later.",
        "shared/too_many_requests",
    ),
    "internal_error": ("api_error", "An internal error occurred.", "shared/internal_error"),
    "service_unavailable": (
        "api_error",
        "The service is temporarily unavailable.",
        "shared/service_unavailable",
    ),
    "transaction_default_checkout_url_not_set": (
        "request_error",
        "A Default Payment Link has not yet been defined within the Paddle Dashboard.",
        "transactions/transaction_default_checkout_url_not_set",
    ),
    "adjustment_pending_refund_request": (
        "request_error",
        "You are unable to create further adjustments against this transaction as there is "
        "a pending refund request",
        "adjustments/adjustment_pending_refund_request",
    ),
    "adjustment_transaction_invalid_status_for_refund": (
        "request_error",
        "The transaction being adjusted (refund) has a non supported status.",
        "adjustments/adjustment_transaction_invalid_status_for_refund",
    ),
    "adjustment_amount_above_remaining_allowed": (
        "request_error",
        "The adjustment amount is above the remaining amount allowed to be adjusted.",
        "adjustments/adjustment_amount_above_remaining_allowed",
    ),
}
STATUS_OF = {
    "authentication_missing": 403,
    "authentication_malformed": 403,
    "invalid_token": 403,
    "invalid_access_token": 401,
    "not_found": 404,
    "too_many_requests": 429,
    "internal_error": 500,
    "service_unavailable": 503,
}
# Paddle's messages and codes: a client of the service must never read them.
PADDLE_WORDING = (*ERRORS, *(detail for _, detail, _ in ERRORS.values()), "documentation_url")


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(26))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def sign(body: bytes, secret: str, timestamp: int) -> str:
    return hmac.new(secret.encode(), f"{timestamp}:".encode() + body, hashlib.sha256).hexdigest()


class PaddleError(Exception):
    """Raised inside a handler: answered as Paddle's error envelope."""

    def __init__(
        self, code: str, *, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(code)
        self.code = code
        self.status = status or STATUS_OF.get(code, 400)
        self.headers = headers or {}

    def body(self, request_id: str) -> Json:
        kind, detail, page = ERRORS[self.code]
        return {
            "error": {
                "type": kind,
                "code": self.code,
                "detail": detail,
                "documentation_url": f"{DOCS}/{page}",
            },
            "meta": {"request_id": request_id},
        }


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
    request_id: str = ""


@dataclass
class FakePaddle(PaddleBilling):
    """Paddle's API, in memory. ``app`` is the ASGI app; ``url`` is set once it is served.
    Subscriptions (products, recurring prices, subscriptions, portal sessions) are in
    ``tests.fakes.paddle_billing``."""

    api_key: str
    webhook_secret: str
    url: str = ""
    # The account's default payment link (Paddle > Checkout settings); None: not set.
    default_payment_link: str | None = "https://shop.example/pay"
    # The tax Paddle computes (prices here are tax-inclusive: it is carved out of them).
    tax_rate: Decimal = Decimal("0.2")
    hang_limit_s: float = 10.0
    transactions: dict[str, Json] = field(default_factory=dict)
    adjustments: dict[str, Json] = field(default_factory=dict)
    prices: dict[str, Json] = field(default_factory=dict)
    events: list[Json] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._faults: deque[Fault] = deque()
        self._release = threading.Event()
        self._spec = PaddleSpec.load()
        self.app = Starlette(
            routes=[
                Route("/__fake/transactions/{id}/pay", self._control_pay, methods=["POST"]),
                Route("/{path:path}", self._api, methods=["GET", "POST", "PATCH", "DELETE"]),
            ]
        )
        self._routes: dict[tuple[str, str], Handler] = {
            ("post", "/transactions"): self._create_transaction,
            ("get", "/transactions"): self._list_transactions,
            ("get", "/transactions/{transaction_id}"): self._get_transaction,
            ("post", "/adjustments"): self._create_adjustment,
            ("get", "/adjustments"): self._list_adjustments,
            **self._billing_routes(),
        }
        self._init_billing()

    # -- controls for tests --------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything, as a fresh account would."""
        with self._lock:
            self.release_hangs()
            for store in (self.transactions, self.adjustments, self.prices):
                store.clear()
            self.events.clear()
            self.requests.clear()
            self.violations.clear()
            self._faults.clear()
            self.default_payment_link = "https://shop.example/pay"
            self._reset_billing()
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
        """Make the next ``times`` calls (optionally only those under ``path_prefix``, or of
        ``method``) answer
        429 (with ``Retry-After`` when given), 500, 503, 401, or hang until ``release_hangs``
        (or ``hang_limit_s``): ``hang`` before doing anything, ``hang_after`` once the work
        is done (the answer is what is lost)."""
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

    def add_price(self, amount: int, currency: str, *, name: str = "Catalogue price") -> str:
        """A price in the account's catalogue (tax-inclusive), as the merchant would make in
        Paddle's dashboard; its ``pri_`` id."""
        with self._lock:
            product = self._product(name, custom=False)
            price = self._price(
                description=name, name=name, amount=amount, currency=currency, product=product
            )
            price["type"] = "standard"
            self.prices[price["id"]] = price
            return str(price["id"])

    def pay(self, transaction_id: str, *, method: str = "card") -> Json:
        """The customer pays on Paddle Checkout: the transaction is paid, then completed."""
        with self._lock:
            transaction = self._transaction(transaction_id)
            if transaction["status"] not in ("draft", "ready"):
                raise ValueError(f"transaction {transaction_id} is {transaction['status']}")
            self._checkout_details(transaction)
            attempt = self._attempt(transaction, status="captured", method=method)
            attempt["captured_at"] = now_iso()
            transaction["payments"].insert(0, attempt)
            transaction["status"] = "paid"
            transaction["billed_at"] = now_iso()
            self._touch(transaction)
            self._emit("transaction.paid", transaction)
            self._subscribe(transaction)  # recurring items: Paddle makes the subscription
            transaction["status"] = "completed"
            totals = transaction["details"]["totals"]
            fee = self._part(int(totals["grand_total"]), Decimal("0.05"))
            totals["fee"] = str(fee)
            totals["earnings"] = str(int(totals["grand_total"]) - fee)
            self._touch(transaction)
            self._emit("transaction.completed", transaction)
            return copy.deepcopy(transaction)

    def decline(self, transaction_id: str, *, error_code: str = "declined") -> Json:
        """The customer's card is declined on the checkout: the transaction stays open (the
        customer may try another card) and Paddle says so by ``transaction.payment_failed``."""
        with self._lock:
            transaction = self._transaction(transaction_id)
            self._checkout_details(transaction)
            attempt = self._attempt(transaction, status="error", method="card")
            attempt["error_code"] = error_code
            transaction["payments"].insert(0, attempt)
            self._touch(transaction)
            self._emit("transaction.payment_failed", transaction)
            return copy.deepcopy(transaction)

    def cancel(self, transaction_id: str) -> Json:
        with self._lock:
            transaction = self._transaction(transaction_id)
            transaction["status"] = "canceled"
            self._touch(transaction)
            self._emit("transaction.canceled", transaction)
            return copy.deepcopy(transaction)

    def approve_adjustment(self, adjustment_id: str) -> Json:
        return self._decide(adjustment_id, "approved")

    def reject_adjustment(self, adjustment_id: str) -> Json:
        return self._decide(adjustment_id, "rejected")

    def events_of(self, event_type: str) -> list[Json]:
        with self._lock:
            return [copy.deepcopy(e) for e in self.events if e["event_type"] == event_type]

    def last_event(self, event_type: str) -> Json:
        found = self.events_of(event_type)
        if not found:
            seen = sorted({e["event_type"] for e in self.events})
            raise LookupError(f"no {event_type} event; the fake emitted {seen}")
        return found[-1]

    def build_event(self, event_type: str, data: Json) -> Json:
        """An event of any type around ``data``, shaped as Paddle sends them."""
        return {
            "event_id": new_id("evt_"),
            "event_type": event_type,
            "occurred_at": now_iso(),
            "notification_id": new_id("ntf_"),
            "data": copy.deepcopy(data),
        }

    def signed_delivery(
        self,
        event: Json | bytes,
        *,
        secrets: Sequence[str] | None = None,
        timestamp: int | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """The body and headers of Paddle's POST delivering ``event``: signed with the
        destination's secret (or each of ``secrets``, one ``h1`` each, as during a rotation),
        at ``timestamp`` (now by default). Paddle's JSON is compact and keeps non-ASCII text
        as UTF-8."""
        if isinstance(event, bytes):
            body = event
        else:
            body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        ts = int(time.time()) if timestamp is None else timestamp
        hashes = ";".join(f"h1={sign(body, s, ts)}" for s in (secrets or [self.webhook_secret]))
        return body, {
            "Content-Type": "application/json",
            "User-Agent": "Paddle",
            "Paddle-Signature": f"ts={ts};{hashes}",
        }

    # -- HTTP ------------------------------------------------------------------------------

    async def _control_pay(self, request: Request) -> Response:
        """Test-only: what the customer's click on Paddle Checkout does (``outcome`` paid,
        declined or canceled). Not part of Paddle's API; never checked against it."""
        form = dict(parse_qsl((await request.body()).decode()))
        outcome = form.get("outcome", "paid")
        transaction_id = request.path_params["id"]
        try:
            if outcome == "paid":
                self.pay(transaction_id, method=form.get("method", "card"))
            elif outcome == "declined":
                self.decline(transaction_id)
            elif outcome == "canceled":
                self.cancel(transaction_id)
            else:
                return Response("unknown outcome", status_code=400)
        except (KeyError, ValueError) as error:
            return Response(str(error), status_code=409)
        return Response(status_code=204)

    async def _api(self, request: Request) -> Response:
        method, path, query = request.method, request.url.path, request.url.query
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        request_id = str(uuid.uuid4())
        record = RecordedRequest(method, path, query, None, request_id=request_id)
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
            if violations:
                check_response = False  # the request is already a failure of the test
                with self._lock:
                    self.violations.extend(violations)
                raise PaddleError("not_found" if operation is None else "bad_request")
            assert operation is not None
            handler = self._routes.get((operation.method, operation.template))
            if handler is None:
                with self._lock:
                    self.violations.append(
                        Violation(method, path, "valid, but the fake does not serve it")
                    )
                raise PaddleError("not_found")
            with self._lock:
                status, answer = handler(record.body, operation.path_params, dict(parse_qsl(query)))
            answer.setdefault("meta", {})["request_id"] = request_id
            content = json.dumps(answer).encode()
            await self._inject_fault(method, path, after=True)
        except PaddleError as error:
            status, content = error.status, json.dumps(error.body(request_id)).encode()
            extra_headers = error.headers
        record.status = status
        if check_response:
            problems = self._spec.check_response(
                method,
                path,
                query,
                headers,
                raw,
                status,
                content,
                {"Request-Id": request_id, **extra_headers},
            )
            if problems:
                with self._lock:
                    self.violations.extend(problems)
        return Response(
            content,
            status_code=status,
            headers={"Request-Id": request_id, **extra_headers},
            media_type="application/json",
        )

    def _authenticate(self, authorization: str | None) -> None:
        if not authorization:
            raise PaddleError("authentication_missing")
        scheme, _, key = authorization.partition(" ")
        if scheme != "Bearer" or not key:
            raise PaddleError("authentication_malformed")
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise PaddleError("invalid_token")

    async def _inject_fault(self, method: str, path: str, *, after: bool) -> None:
        with self._lock:
            fault = next(
                (
                    f
                    for f in self._faults
                    if (f.kind == "hang_after") == after
                    and (f.path_prefix is None or path.startswith(f.path_prefix))
                    and (f.method is None or f.method == method)
                ),
                None,
            )
            if fault is not None:
                self._faults.remove(fault)
            release = self._release
        if fault is None:
            return
        if fault.kind == "rate_limit":
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
            raise PaddleError("too_many_requests", headers=headers)
        if fault.kind == "server_error":
            raise PaddleError("internal_error")
        if fault.kind == "unavailable":
            raise PaddleError("service_unavailable")
        if fault.kind == "unauthorized":
            raise PaddleError("invalid_access_token")
        # Held in a worker thread so that the server keeps answering other requests.
        await asyncio.to_thread(release.wait, self.hang_limit_s)

    # -- entities --------------------------------------------------------------------------

    def _touch(self, entity: Json) -> None:
        entity["updated_at"] = now_iso()

    def _transaction(self, transaction_id: str) -> Json:
        try:
            return self.transactions[transaction_id]
        except KeyError:
            raise KeyError(f"no transaction {transaction_id}") from None

    def _emit(self, event_type: str, data: Json) -> None:
        self.events.append(self.build_event(event_type, data))

    def _part(self, amount: int, rate: Decimal) -> int:
        return int((Decimal(amount) * rate).quantize(Decimal(1), rounding=ROUND_HALF_UP))

    def _tax_of(self, total: int) -> int:
        """The tax inside a tax-inclusive ``total``."""
        inside = Decimal(total) * self.tax_rate / (1 + self.tax_rate)
        return int(inside.quantize(Decimal(1), rounding=ROUND_HALF_UP))

    def _totals(self, total: int) -> Json:
        tax = self._tax_of(total)
        return {
            "subtotal": str(total - tax),
            "discount": "0",
            "tax": str(tax),
            "total": str(total),
        }

    def _product(self, name: str, *, custom: bool, tax_category: str = "standard") -> Json:
        return {
            "id": new_id("pro_"),
            "name": name,
            "tax_category": tax_category,
            "type": "custom" if custom else "standard",
            "description": None,
            "image_url": None,
            "custom_data": None,
            "status": "active",
            "import_meta": None,
            "created_at": now_iso(),
            "updated_at": now_iso(),
        }

    def _price(
        self, *, description: str, name: str | None, amount: int, currency: str, product: Json
    ) -> Json:
        return {
            "id": new_id("pri_"),
            "product_id": product["id"],
            "type": "custom",
            "description": description,
            "name": name,
            "billing_cycle": None,
            "trial_period": None,
            "tax_mode": "internal",
            "unit_price": {"amount": str(amount), "currency_code": currency},
            "unit_price_overrides": [],
            "quantity": {"minimum": 1, "maximum": 100},
            "status": "active",
            "custom_data": None,
            "import_meta": None,
            "created_at": now_iso(),
            "updated_at": now_iso(),
            "_product": product,  # kept by the fake, never shown
        }

    def _shown(self, entity: Json) -> Json:
        return {k: v for k, v in copy.deepcopy(entity).items() if not k.startswith("_")}

    def _checkout_details(self, transaction: Json) -> None:
        """What Paddle Checkout fills in: the customer and their address."""
        if transaction["status"] == "draft":
            transaction["customer_id"] = new_id("ctm_")
            transaction["address_id"] = new_id("add_")
            transaction["status"] = "ready"

    def _attempt(self, transaction: Json, *, status: str, method: str) -> Json:
        return {
            "payment_attempt_id": str(uuid.uuid4()),
            "stored_payment_method_id": str(uuid.uuid4()),
            "payment_method_id": new_id("paymtd_"),
            "amount": transaction["details"]["totals"]["grand_total"],
            "status": status,
            "error_code": None,
            "method_details": {
                "type": method,
                "card": {
                    "type": "visa",
                    "last4": "4242",
                    "expiry_month": 1,
                    "expiry_year": 2030,
                    "cardholder_name": "Sam Miller",
                }
                if method == "card"
                else None,
            },
            "created_at": now_iso(),
            "captured_at": None,
        }

    # -- transactions ----------------------------------------------------------------------

    def _create_transaction(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        if self.default_payment_link is None and not (body.get("checkout") or {}).get("url"):
            raise PaddleError("transaction_default_checkout_url_not_set")
        currency = body.get("currency_code")
        transaction_id = new_id("txn_")
        items, line_items = [], []
        total = 0
        for item in body["items"]:
            if "price_id" in item:
                price = self.prices.get(item["price_id"])
                if price is None:
                    raise PaddleError("not_found")
            else:
                spec = item["price"]
                product = self._product(
                    spec["product"]["name"],
                    custom=True,
                    tax_category=spec["product"]["tax_category"],
                )
                price = self._price(
                    description=spec["description"],
                    name=spec.get("name"),
                    amount=int(spec["unit_price"]["amount"]),
                    currency=spec["unit_price"]["currency_code"],
                    product=product,
                )
                price["tax_mode"] = spec.get("tax_mode", "account_setting")
            currency = currency or price["unit_price"]["currency_code"]
            quantity = int(item["quantity"])
            # A price with a trial bills nothing at checkout: the trial starts instead.
            unit = 0 if price.get("trial_period") else int(price["unit_price"]["amount"])
            total += unit * quantity
            items.append({"price": self._shown(price), "quantity": quantity, "proration": None})
            line_items.append(
                {
                    "id": new_id("txnitm_"),
                    "price_id": price["id"],
                    "quantity": quantity,
                    "proration": None,
                    "tax_rate": str(self.tax_rate),
                    "unit_totals": self._totals(unit),
                    "totals": self._totals(unit * quantity),
                    "product": self._shown(price["_product"]),
                }
            )
        totals = {
            **self._totals(total),
            "credit": "0",
            "credit_to_balance": "0",
            "balance": str(total),
            "grand_total": str(total),
            "fee": None,
            "earnings": None,
            "currency_code": currency,
        }
        link = (body.get("checkout") or {}).get("url") or self.default_payment_link
        now = now_iso()
        transaction: Json = {
            "id": transaction_id,
            "status": "draft",
            "customer_id": None,
            "address_id": None,
            "business_id": None,
            "custom_data": body.get("custom_data"),
            "origin": "api",
            "collection_mode": body.get("collection_mode", "automatic"),
            "subscription_id": None,
            "invoice_id": None,
            "invoice_number": None,
            "billing_details": None,
            "billing_period": None,
            "currency_code": currency,
            "discount_id": None,
            "created_at": now,
            "updated_at": now,
            "billed_at": None,
            "revised_at": None,
            "items": items,
            "details": {
                "tax_rates_used": [{"tax_rate": str(self.tax_rate), "totals": self._totals(total)}],
                "totals": totals,
                "adjusted_totals": {
                    **self._totals(total),
                    "grand_total": str(total),
                    "fee": "0",
                    "earnings": "0",
                    "currency_code": currency,
                },
                "payout_totals": None,
                "adjusted_payout_totals": None,
                "line_items": line_items,
            },
            "payments": [],
            "checkout": {"url": f"{link}?_ptxn={transaction_id}"},
        }
        self.transactions[transaction_id] = transaction
        self._emit("transaction.created", transaction)
        return 201, {"data": copy.deepcopy(transaction)}

    def _get_transaction(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        transaction = self.transactions.get(params["transaction_id"])
        if transaction is None:
            raise PaddleError("not_found")
        return 200, {"data": copy.deepcopy(transaction)}

    def _page(self, found: list[Json], query: dict[str, str], path: str) -> Json:
        per_page = int(query.get("per_page", "50"))
        return {
            "data": copy.deepcopy(found[:per_page]),
            "meta": {
                "pagination": {
                    "per_page": per_page,
                    "next": f"https://sandbox-api.paddle.com{path}?per_page={per_page}",
                    "has_more": len(found) > per_page,
                    "estimated_total": len(found),
                }
            },
        }

    def _list_transactions(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        # Newest first (Paddle's ids are time-ordered, so id[DESC] is creation order).
        found = list(reversed(self.transactions.values()))
        if "subscription_id" in query:
            wanted = set(query["subscription_id"].split(","))
            found = [t for t in found if t["subscription_id"] in wanted]
        return 200, self._page(found, query, "/transactions")

    # -- adjustments -----------------------------------------------------------------------

    def _refunds_of(self, transaction_id: str) -> list[Json]:
        return [
            a
            for a in self.adjustments.values()
            if a["transaction_id"] == transaction_id and a["action"] == "refund"
        ]

    def _create_adjustment(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        transaction = self.transactions.get(body["transaction_id"])
        if transaction is None:
            raise PaddleError("not_found")
        if body["action"] != "refund":
            raise PaddleError("bad_request")  # the fake makes refunds only
        if transaction["status"] != "completed":
            raise PaddleError("adjustment_transaction_invalid_status_for_refund")
        earlier = [a for a in self._refunds_of(transaction["id"]) if a["status"] != "rejected"]
        if any(a["status"] == "pending_approval" for a in earlier):
            raise PaddleError("adjustment_pending_refund_request")
        line_items = {item["id"]: item for item in transaction["details"]["line_items"]}
        taken: dict[str, int] = {}
        for previous in earlier:
            for item in previous["items"]:
                taken[item["item_id"]] = taken.get(item["item_id"], 0) + int(item["amount"])
        adjusted = []
        if body.get("type") == "full":
            if earlier:
                raise PaddleError("adjustment_amount_above_remaining_allowed")
            requested = [
                {"item_id": i, "type": "full", "amount": item["totals"]["total"]}
                for i, item in line_items.items()
            ]
        else:
            if not body.get("items"):
                raise PaddleError("bad_request")
            requested = body["items"]
        for item in requested:
            line = line_items.get(item["item_id"])
            if line is None:
                raise PaddleError("not_found")
            amount = int(item.get("amount") or line["totals"]["total"])
            if amount <= 0 or amount + taken.get(item["item_id"], 0) > int(line["totals"]["total"]):
                raise PaddleError("adjustment_amount_above_remaining_allowed")
            adjusted.append(
                {
                    "id": new_id("adjitm_"),
                    "item_id": item["item_id"],
                    "type": item["type"],
                    "amount": str(amount),
                    "proration": None,
                    "totals": self._adjustment_item_totals(amount),
                }
            )
        total = sum(int(item["amount"]) for item in adjusted)
        currency = transaction["currency_code"]
        fee = self._part(total, Decimal("0.05"))
        totals = {
            **self._adjustment_item_totals(total),
            "fee": str(fee),
            "earnings": str(total - self._tax_of(total) - fee),
            "currency_code": currency,
        }
        now = now_iso()
        adjustment: Json = {
            "id": new_id("adj_"),
            "action": "refund",
            "type": body.get("type", "partial"),
            "transaction_id": transaction["id"],
            "subscription_id": None,
            "customer_id": transaction["customer_id"],
            "reason": body["reason"],
            "credit_applied_to_balance": None,
            "currency_code": currency,
            "status": "pending_approval",
            "items": adjusted,
            "totals": totals,
            "payout_totals": {**totals},
            "tax_rates_used": [],
            "created_at": now,
            "updated_at": now,
        }
        self.adjustments[adjustment["id"]] = adjustment
        self._emit("adjustment.created", adjustment)
        return 201, {"data": copy.deepcopy(adjustment)}

    def _adjustment_item_totals(self, amount: int) -> Json:
        tax = self._tax_of(amount)
        return {"subtotal": str(amount - tax), "tax": str(tax), "total": str(amount)}

    def _list_adjustments(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        found = list(self.adjustments.values())
        for name in ("transaction_id", "id", "action", "status"):
            if name in query:
                wanted = set(query[name].split(","))
                found = [a for a in found if a[name] in wanted]
        found.sort(key=lambda a: a["created_at"], reverse=True)
        return 200, self._page(found, query, "/adjustments")

    def _decide(self, adjustment_id: str, status: str) -> Json:
        with self._lock:
            adjustment = self.adjustments[adjustment_id]
            if adjustment["status"] != "pending_approval":
                raise ValueError(f"adjustment {adjustment_id} is {adjustment['status']}")
            adjustment["status"] = status
            self._touch(adjustment)
            self._emit("adjustment.updated", adjustment)
            return copy.deepcopy(adjustment)


@contextmanager
def running_fake_paddle(**kwargs: Any) -> Iterator[FakePaddle]:
    fake = FakePaddle(**kwargs)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.release_hangs()
