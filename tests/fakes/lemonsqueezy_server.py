"""A fake of LemonSqueezy's REST API, for tests: the real ``LemonSqueezyProvider`` talks to it
over loopback.

LemonSqueezy publishes no machine-readable description of its API, so this fake follows its
API reference, page by page (https://docs.lemonsqueezy.com/api/...):

- getting-started/requests: every request carries ``Accept: application/vnd.api+json``,
  ``Content-Type: application/vnd.api+json`` and ``Authorization: Bearer {api_key}``;
  request bodies are JSON:API documents.
- getting-started/responses: answers are JSON:API documents (``jsonapi``, ``links``,
  ``data``); a 4xx carries a JSON:API ``errors`` array (``detail``, ``status``, ``title``).
- getting-started/rate-limits: 300 calls a minute; over it, 429.
- checkouts/create-checkout and checkouts/the-checkout-object: ``POST /v1/checkouts`` with
  ``data.type = "checkouts"``, ``attributes`` (``custom_price``, ``product_options``,
  ``checkout_options``, ``checkout_data`` with ``custom``, ``expires_at``, ``preview``,
  ``test_mode``) and ``relationships`` ``store`` and ``variant``; answers 201 with the checkout,
  whose ``attributes.url`` is the page the customer pays on. checkouts/retrieve-checkout.
- orders/the-order-object, orders/retrieve-order, orders/list-all-orders (filters
  ``store_id`` and ``user_email`` only, pages ``page[number]``, ``page[size]``) and
  orders/issue-refund (``POST /v1/orders/{id}/refund``, ``data.type = "orders"``, ``data.id``,
  optional ``attributes.amount`` in cents; answers the order with ``refunded_amount`` raised:
  a refund is made when it is answered).
- stores/retrieve-store (``GET /v1/stores/{id}``) and users/retrieve-the-authenticated-user
  (``GET /v1/users/me``).
- help/webhooks/signing-requests and api/webhooks (webhook requests): a delivery is a POST of
  the JSON:API resource with ``meta.event_name`` and ``meta.custom_data`` (the checkout's
  ``checkout_data.custom``), headers ``X-Event-Name`` and ``X-Signature``, the hex HMAC-SHA256
  of the raw body with the webhook's signing secret; help/webhooks/event-types for the names.
  LemonSqueezy publishes no worked example (secret, body, signature) to test against.

Every request is checked strictly (headers, credentials, the body's shape and types, query
parameters); a departure is kept in ``violations`` and answered as LemonSqueezy would (400 or
422 with an ``errors`` array). Tests assert that ``violations`` is empty.

Controls for tests: ``pay`` stands in for the customer on the checkout page (an order is made,
tax added as configured, and ``order_created`` emitted), ``refund_in_dashboard`` for the
merchant, ``fail_next`` makes the next calls answer 429/500/503/401 or hang (before the work,
or after it so that the answer is lost), ``signed_delivery`` turns an event into the body and
headers LemonSqueezy would POST. The server runs in another thread: every change holds one lock.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.openapi_check import Violation
from tests.fakes.server import serve_in_thread

Json = dict[str, Any]
JSON_API = "application/vnd.api+json"
FaultKind = Literal[
    "rate_limit", "server_error", "unavailable", "unauthorized", "hang", "hang_after"
]

CHECKOUT_ATTRIBUTES = frozenset(
    {
        "custom_price",
        "product_options",
        "checkout_options",
        "checkout_data",
        "expires_at",
        "preview",
        "test_mode",
    }
)
PRODUCT_OPTIONS = frozenset(
    {
        "name",
        "description",
        "media",
        "redirect_url",
        "receipt_button_text",
        "receipt_link_url",
        "receipt_thank_you_note",
        "enabled_variants",
        "confirmation_title",
        "confirmation_message",
        "confirmation_button_text",
    }
)
CHECKOUT_OPTIONS = frozenset(
    {
        "embed",
        "media",
        "logo",
        "desc",
        "discount",
        "skip_trial",
        "subscription_preview",
        "button_color",
        "dark",
    }
)
CHECKOUT_DATA = frozenset(
    {
        "email",
        "name",
        "billing_address",
        "tax_number",
        "discount_code",
        "custom",
        "variant_quantities",
    }
)
ORDER_FILTERS = frozenset({"store_id", "user_email"})


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LemonError(Exception):
    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}

    def document(self) -> Json:
        titles = {
            400: "Bad Request",
            401: "Unauthenticated",
            404: "Not Found",
            422: "Unprocessable Entity",
            429: "Too Many Requests",
            500: "Server Error",
            503: "Service Unavailable",
        }
        return {
            "jsonapi": {"version": "1.0"},
            "errors": [
                {
                    "detail": self.detail,
                    "status": str(self.status),
                    "title": titles.get(self.status, "Error"),
                }
            ],
        }


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Json | None
    status: int = 0


@dataclass
class Fault:
    kind: FaultKind
    path_prefix: str | None
    retry_after: int | None


@dataclass
class FakeLemonSqueezy:
    """LemonSqueezy's API, in memory, for one store. ``url`` is set once it is served."""

    api_key: str
    store_id: str
    variants: dict[str, int]  # variant id -> its price in cents (what a checkout without
    # custom_price would charge)
    webhook_secret: str
    currency: str = "EUR"
    url: str = ""
    hang_limit_s: float = 10.0
    checkouts: dict[str, Json] = field(default_factory=dict)
    orders: dict[str, Json] = field(default_factory=dict)
    events: list[Json] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._faults: deque[Fault] = deque()
        self._release = threading.Event()
        self._custom: dict[str, Json] = {}  # checkout id -> checkout_data.custom
        self._order_custom: dict[str, Json] = {}  # order id -> its checkout's custom data
        self._next_order = 1
        self.app = Starlette(
            routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PATCH", "DELETE"])]
        )
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., tuple[int, Json]]]] = [
            ("POST", re.compile(r"^/v1/checkouts$"), self._create_checkout),
            ("GET", re.compile(r"^/v1/checkouts/([^/]+)$"), self._get_checkout),
            ("GET", re.compile(r"^/v1/orders$"), self._list_orders),
            ("GET", re.compile(r"^/v1/orders/([^/]+)$"), self._get_order),
            ("POST", re.compile(r"^/v1/orders/([^/]+)/refund$"), self._refund_order),
            ("GET", re.compile(r"^/v1/stores/([^/]+)$"), self._get_store),
            ("GET", re.compile(r"^/v1/users/me$"), self._get_me),
        ]

    # -- controls for tests --------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.release_hangs()
            self.checkouts.clear()
            self.orders.clear()
            self.events.clear()
            self.requests.clear()
            self.violations.clear()
            self._faults.clear()
            self._custom.clear()
            self._order_custom.clear()
            self._next_order = 1
            self._release = threading.Event()

    def fail_next(
        self,
        kind: FaultKind,
        times: int = 1,
        *,
        path_prefix: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        with self._lock:
            for _ in range(times):
                self._faults.append(Fault(kind, path_prefix, retry_after))

    def release_hangs(self) -> None:
        self._release.set()

    def calls(self, method: str, path: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r for r in self.requests if r.method == method and (path is None or r.path == path)
            ]

    def pay(
        self,
        checkout_id: str,
        *,
        email: str = "buyer@example.com",
        status: str = "paid",
        tax_rate_percent: int = 0,
        tax_inclusive: bool = True,
        discount: int = 0,
    ) -> Json:
        """The customer pays on the checkout's page: an order is made (with tax added on top
        when ``tax_inclusive`` is False) and ``order_created`` emitted. ``status`` failed or
        fraudulent stands for a declined card or LemonSqueezy's fraud checks."""
        with self._lock:
            checkout = self.checkouts[checkout_id]
            attributes = checkout["attributes"]
            variant_id = attributes["variant_id"]
            price = attributes["custom_price"] or self.variants[str(variant_id)]
            net = price - discount
            if tax_inclusive:
                tax = net * tax_rate_percent // (100 + tax_rate_percent)
                total = net
            else:
                tax = net * tax_rate_percent // 100
                total = net + tax
            order_id = str(self._next_order)
            self._next_order += 1
            stamp = now_iso()
            order = {
                "type": "orders",
                "id": order_id,
                "attributes": {
                    "store_id": int(self.store_id),
                    "customer_id": 1,
                    "identifier": str(uuid.uuid4()),
                    "order_number": int(order_id),
                    "user_name": "Test Buyer",
                    "user_email": attributes["checkout_data"].get("email") or email,
                    "currency": self.currency,
                    "currency_rate": "1.0000",
                    "subtotal": price,
                    "setup_fee": 0,
                    "discount_total": discount,
                    "tax": tax,
                    "total": total,
                    "refunded_amount": 0,
                    "subtotal_usd": price,
                    "setup_fee_usd": 0,
                    "discount_total_usd": discount,
                    "tax_usd": tax,
                    "total_usd": total,
                    "refunded_amount_usd": 0,
                    "tax_name": "VAT" if tax_rate_percent else None,
                    "tax_rate": f"{tax_rate_percent}.00",
                    "tax_inclusive": tax_inclusive,
                    "status": status,
                    "status_formatted": status.replace("_", " ").title(),
                    "refunded": False,
                    "refunded_at": None,
                    "first_order_item": {
                        "id": int(order_id),
                        "order_id": int(order_id),
                        "product_id": 1,
                        "variant_id": variant_id,
                        "product_name": "Plan",
                        "variant_name": "Default",
                        "price": price,
                        "quantity": 1,
                        "created_at": stamp,
                        "updated_at": stamp,
                        "test_mode": True,
                    },
                    "urls": {"receipt": f"{self.url}/my-orders/{order_id}"},
                    "created_at": stamp,
                    "updated_at": stamp,
                    "test_mode": True,
                },
                "relationships": {},
                "links": {"self": f"{self.url}/v1/orders/{order_id}"},
            }
            self.orders[order_id] = order
            self._order_custom[order_id] = self._custom.get(checkout_id, {})
            self._emit("order_created", order_id)
            return copy.deepcopy(order)

    def refund_in_dashboard(self, order_id: str, amount: int | None = None) -> Json:
        """The merchant refunds in LemonSqueezy's dashboard (``amount`` cents, or all left)."""
        with self._lock:
            self._refund(order_id, amount)
            return copy.deepcopy(self.orders[order_id])

    def events_of(self, name: str) -> list[Json]:
        with self._lock:
            return [copy.deepcopy(e) for e in self.events if e["meta"]["event_name"] == name]

    def signed_delivery(
        self, event: Json | bytes, *, secret: str | None = None, event_name: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """The body and headers of LemonSqueezy's POST of ``event``, signed with the webhook's
        signing secret (or ``secret``, to forge one)."""
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        name = event_name
        if name is None and isinstance(event, dict):
            name = event["meta"]["event_name"]
        key = (secret or self.webhook_secret).encode()
        return body, {
            "Content-Type": "application/json",
            "X-Event-Name": name or "",
            "X-Signature": hmac.new(key, body, hashlib.sha256).hexdigest(),
        }

    # -- the server ----------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        method, path, query = request.method, request.url.path, request.url.query
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = RecordedRequest(method, path, query, headers, None)
        with self._lock:
            self.requests.append(record)
        extra: dict[str, str] = {}
        try:
            await self._inject_fault(path, after=False)
            self._check_headers(method, path, headers, raw)
            body = self._parse_body(method, path, raw)
            record.body = body
            for route_method, pattern, handler in self._routes:
                match = pattern.match(path)
                if match and route_method == method:
                    with self._lock:
                        status, answer = handler(body, dict(parse_qsl(query)), *match.groups())
                    break
            else:
                self._violation(method, path, "no such endpoint in the API reference")
                raise LemonError(404, "Not found")
            await self._inject_fault(path, after=True)
        except LemonError as error:
            status, answer, extra = error.status, error.document(), error.headers
        record.status = status
        return Response(
            json.dumps(answer).encode(), status_code=status, headers=extra, media_type=JSON_API
        )

    def _violation(self, method: str, path: str, problem: str) -> None:
        with self._lock:
            self.violations.append(Violation(method, path, problem))

    def _check_headers(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> None:
        if headers.get("accept") != JSON_API:
            self._violation(method, path, f"Accept is {headers.get('accept')!r}, not {JSON_API}")
        if headers.get("content-type") != JSON_API:
            self._violation(
                method, path, f"Content-Type is {headers.get('content-type')!r}, not {JSON_API}"
            )
        if method == "GET" and raw:
            self._violation(method, path, "a GET with a body")
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise LemonError(401, "Unauthenticated.")

    def _parse_body(self, method: str, path: str, raw: bytes) -> Json | None:
        if method != "POST":
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            self._violation(method, path, "the body is not JSON")
            raise LemonError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            self._violation(method, path, "the body is not a JSON:API document with data")
            raise LemonError(400, "The data field is required.")
        return body

    async def _inject_fault(self, path: str, *, after: bool) -> None:
        with self._lock:
            fault = next(
                (
                    f
                    for f in self._faults
                    if (f.kind == "hang_after") == after
                    and (f.path_prefix is None or path.startswith(f.path_prefix))
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
            raise LemonError(429, "Too Many Attempts.", headers=headers)
        if fault.kind == "server_error":
            raise LemonError(500, "Server Error")
        if fault.kind == "unavailable":
            raise LemonError(503, "Service Unavailable")
        if fault.kind == "unauthorized":
            raise LemonError(401, "Unauthenticated.")
        await asyncio.to_thread(release.wait, self.hang_limit_s)

    def _invalid(self, method: str, path: str, problem: str) -> LemonError:
        self._violation(method, path, problem)
        return LemonError(422, problem)

    # -- checkouts -----------------------------------------------------------------------------

    def _create_checkout(self, body: Json, query: dict[str, str]) -> tuple[int, Json]:
        where = ("POST", "/v1/checkouts")
        data = body["data"]
        if set(data) - {"type", "attributes", "relationships"}:
            raise self._invalid(*where, f"unknown members {sorted(set(data))}")
        if data.get("type") != "checkouts":
            raise self._invalid(*where, "data.type must be 'checkouts'")
        attributes = data.get("attributes", {})
        if not isinstance(attributes, dict) or set(attributes) - CHECKOUT_ATTRIBUTES:
            raise self._invalid(*where, "unknown checkout attributes")
        price = attributes.get("custom_price")
        if price is not None and (
            not isinstance(price, int) or isinstance(price, bool) or price <= 0
        ):
            raise self._invalid(*where, "custom_price must be a positive integer in cents")
        for name, allowed in (
            ("product_options", PRODUCT_OPTIONS),
            ("checkout_options", CHECKOUT_OPTIONS),
            ("checkout_data", CHECKOUT_DATA),
        ):
            value = attributes.get(name, {})
            if not isinstance(value, dict) or set(value) - allowed:
                raise self._invalid(*where, f"{name} has members the reference does not name")
        custom = attributes.get("checkout_data", {}).get("custom", {})
        if not isinstance(custom, dict):
            raise self._invalid(*where, "checkout_data.custom must be an object")
        redirect = attributes.get("product_options", {}).get("redirect_url")
        if redirect is not None and not (
            isinstance(redirect, str) and redirect.startswith(("https://", "http://"))
        ):
            raise self._invalid(*where, "product_options.redirect_url must be a URL")
        relationships = data.get("relationships")
        ids: dict[str, str] = {}
        for name, kind in (("store", "stores"), ("variant", "variants")):
            related = relationships.get(name) if isinstance(relationships, dict) else None
            related = related.get("data") if isinstance(related, dict) else None
            if (
                not isinstance(related, dict)
                or related.get("type") != kind
                or not isinstance(related.get("id"), str)
            ):
                raise self._invalid(*where, f"relationships.{name} must be {{type: {kind}, id}}")
            ids[name] = related["id"]
        if ids["store"] != self.store_id:
            raise LemonError(404, "The store does not exist or is not yours.")
        if ids["variant"] not in self.variants:
            raise LemonError(422, "The variant does not exist in this store.")
        checkout_id = str(uuid.uuid4())
        stamp = now_iso()
        checkout = {
            "type": "checkouts",
            "id": checkout_id,
            "attributes": {
                "store_id": int(self.store_id),
                "variant_id": int(ids["variant"]),
                "custom_price": price,
                "product_options": {"redirect_url": "", **attributes.get("product_options", {})},
                "checkout_options": {"discount": True, **attributes.get("checkout_options", {})},
                "checkout_data": {"email": "", "custom": [], **attributes.get("checkout_data", {})},
                "expires_at": attributes.get("expires_at"),
                "created_at": stamp,
                "updated_at": stamp,
                "test_mode": True,
                "url": f"{self.url}/checkout/custom/{checkout_id}?signature={uuid.uuid4().hex}",
            },
            "relationships": {},
            "links": {"self": f"{self.url}/v1/checkouts/{checkout_id}"},
        }
        self.checkouts[checkout_id] = checkout
        self._custom[checkout_id] = dict(custom)
        return 201, self._document(checkout)

    def _get_checkout(
        self, body: None, query: dict[str, str], checkout_id: str
    ) -> tuple[int, Json]:
        checkout = self.checkouts.get(checkout_id)
        if checkout is None:
            raise LemonError(404, "Not found")
        return 200, self._document(checkout)

    # -- orders --------------------------------------------------------------------------------

    def _document(self, resource: Json) -> Json:
        return {
            "jsonapi": {"version": "1.0"},
            "links": {"self": resource["links"]["self"]},
            "data": copy.deepcopy(resource),
        }

    def _get_order(self, body: None, query: dict[str, str], order_id: str) -> tuple[int, Json]:
        order = self.orders.get(order_id)
        if order is None:
            raise LemonError(404, "Not found")
        return 200, self._document(order)

    def _list_orders(self, body: None, query: dict[str, str]) -> tuple[int, Json]:
        filters = {k[len("filter[") : -1]: v for k, v in query.items() if k.startswith("filter[")}
        others = set(query) - {f"filter[{k}]" for k in filters} - {"page[number]", "page[size]"}
        if set(filters) - ORDER_FILTERS or others:
            self._violation("GET", "/v1/orders", f"unknown query parameters {sorted(query)}")
            raise LemonError(400, "Invalid filter.")
        found = [
            o
            for o in self.orders.values()
            if str(o["attributes"]["store_id"])
            == filters.get("store_id", str(o["attributes"]["store_id"]))
            and o["attributes"]["user_email"]
            == filters.get("user_email", o["attributes"]["user_email"])
        ]
        found.sort(key=lambda o: o["attributes"]["created_at"], reverse=True)
        return 200, {
            "meta": {"page": {"currentPage": 1, "lastPage": 1, "total": len(found)}},
            "jsonapi": {"version": "1.0"},
            "links": {},
            "data": copy.deepcopy(found),
        }

    def _refund_order(self, body: Json, query: dict[str, str], order_id: str) -> tuple[int, Json]:
        where = ("POST", f"/v1/orders/{order_id}/refund")
        data = body["data"]
        if data.get("type") != "orders" or data.get("id") != order_id:
            raise self._invalid(*where, "data must be {type: orders, id: <the order's id>}")
        attributes = data.get("attributes", {})
        if not isinstance(attributes, dict) or set(attributes) - {"amount"}:
            raise self._invalid(*where, "attributes may only hold amount")
        amount = attributes.get("amount")
        if amount is not None and (
            not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0
        ):
            raise self._invalid(*where, "amount must be a positive integer in cents")
        if order_id not in self.orders:
            raise LemonError(404, "Not found")
        self._refund(order_id, amount)
        return 200, self._document(self.orders[order_id])

    def _refund(self, order_id: str, amount: int | None) -> None:
        attributes = self.orders[order_id]["attributes"]
        if attributes["status"] not in ("paid", "partial_refund"):
            raise LemonError(422, "This order cannot be refunded.")
        left = attributes["total"] - attributes["refunded_amount"]
        amount = left if amount is None else amount
        if amount > left:
            raise LemonError(422, "The amount is greater than the refundable amount.")
        attributes["refunded_amount"] += amount
        attributes["refunded_amount_usd"] = attributes["refunded_amount"]
        full = attributes["refunded_amount"] == attributes["total"]
        attributes["status"] = "refunded" if full else "partial_refund"
        attributes["status_formatted"] = "Refunded" if full else "Partial Refund"
        attributes["refunded"] = full
        attributes["refunded_at"] = now_iso() if full else None
        attributes["updated_at"] = now_iso()
        self._emit("order_refunded", order_id)

    def _get_store(self, body: None, query: dict[str, str], store_id: str) -> tuple[int, Json]:
        if store_id != self.store_id:
            raise LemonError(404, "Not found")
        store = {
            "type": "stores",
            "id": self.store_id,
            "attributes": {"name": "Test store", "slug": "test", "currency": self.currency},
            "links": {"self": f"{self.url}/v1/stores/{self.store_id}"},
        }
        return 200, self._document(store)

    def _get_me(self, body: None, query: dict[str, str]) -> tuple[int, Json]:
        user = {
            "type": "users",
            "id": "1",
            "attributes": {"name": "Merchant", "email": "merchant@example.com"},
            "links": {"self": f"{self.url}/v1/users/1"},
        }
        return 200, {"meta": {"test_mode": True}, **self._document(user)}

    def _emit(self, name: str, order_id: str) -> None:
        self.events.append(
            {
                "meta": {
                    "test_mode": True,
                    "event_name": name,
                    "webhook_id": "7b7f4a6e-8b6c-4a4c-9a0e-2f1f0e4c1d11",
                    "custom_data": copy.deepcopy(self._order_custom.get(order_id, {})),
                },
                "data": copy.deepcopy(self.orders[order_id]),
            }
        )


@contextmanager
def running_fake_lemonsqueezy(**kwargs: Any) -> Iterator[FakeLemonSqueezy]:
    fake = FakeLemonSqueezy(**kwargs)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.release_hangs()
