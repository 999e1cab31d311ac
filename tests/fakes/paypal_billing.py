"""PayPal Subscriptions in the fake PayPal: catalog products, billing plans, subscriptions,
their transactions and the events they send.

There is no published OpenAPI description of these APIs in ``shared/specs/paypal``. The fake
follows PayPal's API reference page by page, and checks each request against the fields
those pages list (required ones present, none unknown, enums respected), recording any
departure in ``violations`` and answering 400 ``INVALID_REQUEST`` as PayPal would:

- Catalog Products v1, "Create product" and "Show product details"
  (developer.paypal.com/docs/api/catalog-products/v1/#products_create, #products_get);
- Subscriptions v1, "Create plan", "List plans", "Show plan details" (#plans_create,
  #plans_list, #plans_get), "Create subscription", "Show subscription details", "Revise plan
  or quantity of subscription", "Suspend subscription", "Activate subscription", "Cancel
  subscription", "List transactions for subscription" (#subscriptions_create, _get, _revise,
  _suspend, _activate, _cancel, _transactions) at developer.paypal.com/docs/api/
  subscriptions/v1/;
- Webhook event names, "Subscriptions" and "Payments" (developer.paypal.com/api/rest/
  webhooks/event-names/): BILLING.SUBSCRIPTION.CREATED, .ACTIVATED, .UPDATED, .SUSPENDED,
  .CANCELLED, .EXPIRED, .PAYMENT.FAILED (resource: the subscription),
  PAYMENT.SALE.COMPLETED (resource: a Payments v1 sale with ``billing_agreement_id``) and
  PAYMENT.SALE.REFUNDED (resource: a Payments v1 refund with ``sale_id``);
- Payments v1, the sales that bill subscriptions: "Show sale details", "Refund sale", "Show
  refund details" (``sale.get``, ``sale.refund``, ``refund.get``). ``shared/specs`` has no
  description of them, but PayPal publishes one: github.com/paypal/paypal-rest-api-
  specifications, ``openapi/payments_payment_v1.json`` (version 1.12). Its ``refund_request``
  fields (``amount`` {``total``, ``currency``, ``details``}, ``description``, ``reason`` (30
  characters at most), ``invoice_number``), its ``PayPal-Request-Id`` limit (78 characters)
  and its refund states (``pending``, ``completed``, ``cancelled``, ``failed``) are what the
  fake checks and answers. An empty body refunds what is left. Its errors are Payments v1's:
  HTTP 400 with the error's ``name`` and no ``details`` (REFUND_EXCEEDED_TRANSACTION_AMOUNT
  above what is left, TRANSACTION_ALREADY_REFUNDED once nothing is; developer.paypal.com/
  docs/api/payments/v1/#errors), 404 INVALID_RESOURCE_ID for an unknown sale or refund.

Test controls stand in for the buyer and PayPal's clock: ``approve_subscription`` (the buyer
approves; PayPal activates and bills the first cycle unless there is a trial),
``approve_revision`` (the buyer consents to a plan change, effective from the next cycle),
``renew`` (the next cycle is billed, paid or failed; three failures suspend),
``pend_next_sale_refund`` (the next sale refund stays pending) and ``settle_sale_refund``
(PayPal completes or fails a pending one and says so with PAYMENT.SALE.REFUNDED).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

if TYPE_CHECKING:
    from tests.fakes.openapi_check import Violation

Json = dict[str, Any]
Handler = Callable[[Request, Json | None, dict[str, str]], tuple[int, Json]]

# What the reference pages list for each request body: field -> nested spec, "*" for a leaf;
# a list wraps the spec of its items. Fields in REQUIRED must be present.
_MONEY = {"currency_code": "*", "value": "*"}
_CONTEXT = {
    "brand_name": "*",
    "locale": "*",
    "shipping_preference": "*",
    "user_action": "*",
    "payment_method": "*",
    "return_url": "*",
    "cancel_url": "*",
}
BODIES: dict[tuple[str, str], Json] = {
    ("POST", "/v1/catalogs/products"): {
        "id": "*",
        "name": "*",
        "description": "*",
        "type": "*",
        "category": "*",
        "image_url": "*",
        "home_url": "*",
    },
    ("POST", "/v1/billing/plans"): {
        "product_id": "*",
        "name": "*",
        "status": "*",
        "description": "*",
        "billing_cycles": [
            {
                "frequency": {"interval_unit": "*", "interval_count": "*"},
                "tenure_type": "*",
                "sequence": "*",
                "total_cycles": "*",
                "pricing_scheme": {"fixed_price": _MONEY},
            }
        ],
        "payment_preferences": {
            "auto_bill_outstanding": "*",
            "setup_fee": _MONEY,
            "setup_fee_failure_action": "*",
            "payment_failure_threshold": "*",
        },
        "quantity_supported": "*",
    },
    ("POST", "/v1/billing/subscriptions"): {
        "plan_id": "*",
        "start_time": "*",
        "quantity": "*",
        "custom_id": "*",
        "subscriber": {"email_address": "*", "name": {"given_name": "*", "surname": "*"}},
        "application_context": _CONTEXT,
    },
    ("POST", "/v1/billing/subscriptions/{id}/revise"): {
        "plan_id": "*",
        "quantity": "*",
        "application_context": _CONTEXT,
    },
    ("POST", "/v1/billing/subscriptions/{id}/suspend"): {"reason": "*"},
    ("POST", "/v1/billing/subscriptions/{id}/activate"): {"reason": "*"},
    ("POST", "/v1/billing/subscriptions/{id}/cancel"): {"reason": "*"},
    ("POST", "/v1/payments/sale/{id}/refund"): {
        "amount": {"total": "*", "currency": "*", "details": "*"},
        "description": "*",
        "reason": "*",
        "invoice_number": "*",
    },
}
# Payments v1 length limits (payments_payment_v1.json, refund_request).
MAX_LENGTHS = {"description": 255, "reason": 30, "invoice_number": 127}
V1_REQUEST_ID_MAX = 78
# Payments v1 error messages, as the API reference words them.
V1_ERRORS = {
    "REFUND_EXCEEDED_TRANSACTION_AMOUNT": (
        "Refund refused - the requested refund amount would exceed the amount of transaction "
        "being refunded."
    ),
    "TRANSACTION_ALREADY_REFUNDED": (
        "Refund transaction refused - this transaction has already been refunded."
    ),
    "TRANSACTION_REFUSED": "This request was refused.",
}
REQUIRED: dict[tuple[str, str], tuple[str, ...]] = {
    ("POST", "/v1/catalogs/products"): ("name", "type"),
    ("POST", "/v1/billing/plans"): (
        "product_id",
        "name",
        "billing_cycles",
        "payment_preferences",
    ),
    ("POST", "/v1/billing/subscriptions"): ("plan_id",),
    ("POST", "/v1/billing/subscriptions/{id}/suspend"): ("reason",),
    ("POST", "/v1/billing/subscriptions/{id}/cancel"): ("reason",),
}
ENUMS: dict[str, frozenset[str]] = {
    "type": frozenset({"PHYSICAL", "DIGITAL", "SERVICE"}),
    "status": frozenset({"CREATED", "INACTIVE", "ACTIVE"}),
    "interval_unit": frozenset({"DAY", "WEEK", "MONTH", "YEAR"}),
    "tenure_type": frozenset({"REGULAR", "TRIAL"}),
    "user_action": frozenset({"CONTINUE", "SUBSCRIBE_NOW"}),
    "shipping_preference": frozenset({"GET_FROM_FILE", "NO_SHIPPING", "SET_PROVIDED_ADDRESS"}),
}
# Query parameters each GET takes.
QUERIES: dict[str, frozenset[str]] = {
    "/v1/billing/plans": frozenset(
        {"product_id", "plan_ids", "page_size", "page", "total_required"}
    ),
    "/v1/billing/subscriptions/{id}/transactions": frozenset({"start_time", "end_time"}),
}
ROUTES: list[tuple[str, str]] = [
    ("POST", "/v1/catalogs/products"),
    ("GET", "/v1/catalogs/products/{id}"),
    ("POST", "/v1/billing/plans"),
    ("GET", "/v1/billing/plans"),
    ("GET", "/v1/billing/plans/{id}"),
    ("POST", "/v1/billing/subscriptions"),
    ("GET", "/v1/billing/subscriptions/{id}"),
    ("POST", "/v1/billing/subscriptions/{id}/revise"),
    ("POST", "/v1/billing/subscriptions/{id}/suspend"),
    ("POST", "/v1/billing/subscriptions/{id}/activate"),
    ("POST", "/v1/billing/subscriptions/{id}/cancel"),
    ("GET", "/v1/billing/subscriptions/{id}/transactions"),
    ("GET", "/v1/payments/sale/{id}"),
    ("POST", "/v1/payments/sale/{id}/refund"),
    ("GET", "/v1/payments/refund/{id}"),
]
BILLING_PREFIXES = ("/v1/catalogs/", "/v1/billing/", "/v1/payments/sale/", "/v1/payments/refund/")
INTERVAL = {"DAY": 1, "WEEK": 7, "MONTH": 30, "YEAR": 365}


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def template_of(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    parts = path.rstrip("/").split("/")
    for route_method, template in ROUTES:
        expected = template.split("/")
        if route_method != method or len(expected) != len(parts):
            continue
        params: dict[str, str] = {}
        for want, got in zip(expected, parts, strict=True):
            if want == "{id}":
                params["id"] = got
            elif want != got:
                break
        else:
            return template, params
    return None


def check_body(spec: Any, value: Any, where: str) -> list[str]:
    """Every field of ``value`` the reference does not list, and every enum it breaks."""
    problems: list[str] = []
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{where}: an array is expected"]
        for index, item in enumerate(value):
            problems += check_body(spec[0], item, f"{where}/{index}")
        return problems
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{where}: an object is expected"]
        for key, item in value.items():
            if key not in spec:
                problems.append(f"{where}/{key}: field not in PayPal's reference")
                continue
            if key in ENUMS and isinstance(item, str) and item not in ENUMS[key]:
                problems.append(f"{where}/{key}: {item!r} is not one of {sorted(ENUMS[key])}")
            problems += check_body(spec[key], item, f"{where}/{key}")
    return problems


class PayPalBilling:
    """Mixed into ``FakePayPal``, which holds the lock, the events and the error type."""

    _lock: threading.RLock
    url: str
    violations: list[Violation]
    _emit: Callable[[str, str, Json, str], None]
    _link: Callable[[str, str, str], Json]

    def _init_billing(self) -> None:
        self.products: dict[str, Json] = {}
        self.plans: dict[str, Json] = {}
        self.subscriptions: dict[str, Json] = {}
        self.transactions: dict[str, list[Json]] = {}
        self._pending_plan: dict[str, str] = {}
        self._revision_waiting: dict[str, str] = {}
        self.sales: dict[str, Json] = {}
        self.sale_refunds: dict[str, Json] = {}
        self._pend_sale_refunds = 0

    def _reset_billing(self) -> None:
        self._pend_sale_refunds = 0
        for store in (
            self.sales,
            self.sale_refunds,
            self.products,
            self.plans,
            self.subscriptions,
            self.transactions,
            self._pending_plan,
            self._revision_waiting,
        ):
            store.clear()

    def _billing_routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("post", "/v1/catalogs/products"): self._create_product,
            ("get", "/v1/catalogs/products/{id}"): self._get_product,
            ("post", "/v1/billing/plans"): self._create_plan,
            ("get", "/v1/billing/plans"): self._list_plans,
            ("get", "/v1/billing/plans/{id}"): self._get_plan,
            ("post", "/v1/billing/subscriptions"): self._create_subscription,
            ("get", "/v1/billing/subscriptions/{id}"): self._get_subscription,
            ("post", "/v1/billing/subscriptions/{id}/revise"): self._revise,
            ("post", "/v1/billing/subscriptions/{id}/suspend"): self._suspend,
            ("post", "/v1/billing/subscriptions/{id}/activate"): self._activate,
            ("post", "/v1/billing/subscriptions/{id}/cancel"): self._cancel,
            ("get", "/v1/billing/subscriptions/{id}/transactions"): self._list_transactions,
            ("get", "/v1/payments/sale/{id}"): self._get_sale,
            ("post", "/v1/payments/sale/{id}/refund"): self._refund_sale,
            ("get", "/v1/payments/refund/{id}"): self._get_sale_refund,
        }

    def check_billing_request(
        self, method: str, path: str, query: str, body: Json | None
    ) -> tuple[str | None, dict[str, str], list[str]]:
        """The template, path parameters and problems of a request to these APIs."""
        from urllib.parse import parse_qsl

        found = template_of(method, path)
        if found is None:
            return None, {}, ["unknown path"]
        template, params = found
        problems: list[str] = []
        allowed_query = QUERIES.get(template, frozenset())
        for name, _ in parse_qsl(query, keep_blank_values=True):
            if name not in allowed_query:
                problems.append(f"unknown query parameter {name!r}")
        spec = BODIES.get((method, template))
        if spec is None:
            if body:
                problems.append("this operation takes no request body")
        else:
            if body is None and method == "POST" and REQUIRED.get((method, template)):
                problems.append("a JSON body is required")
            problems += check_body(spec, body or {}, "body")
            for name, limit in MAX_LENGTHS.items():
                value = (body or {}).get(name)
                if (
                    template.startswith("/v1/payments/")
                    and isinstance(value, str)
                    and len(value) > limit
                ):
                    problems.append(f"body/{name}: longer than {limit} characters")
            for name in REQUIRED.get((method, template), ()):
                if name not in (body or {}):
                    problems.append(f"body/{name}: required")
        return template, params, problems

    # -- errors ----------------------------------------------------------------------------

    @staticmethod
    def _fail(status: int, issue: str | None = None, field: str | None = None) -> Exception:
        from tests.fakes.paypal_server import PayPalError

        return PayPalError(status, issue=issue, field=field)

    def _subscription(self, subscription_id: str) -> Json:
        found = self.subscriptions.get(subscription_id)
        if found is None:
            raise self._fail(404, "INVALID_RESOURCE_ID")
        return found

    # -- controls for tests ----------------------------------------------------------------

    def approve_subscription(self, subscription_id: str) -> Json:
        """The buyer approves on PayPal: PayPal activates the subscription and bills its
        first cycle at once (a trial's first cycle is free and bills nothing)."""
        with self._lock:
            subscription = self._subscription(subscription_id)
            if subscription["status"] != "APPROVAL_PENDING":
                raise ValueError(f"subscription {subscription_id} is {subscription['status']}")
            plan = self.plans[subscription["plan_id"]]
            now = datetime.now(UTC)
            subscription.update(
                {
                    "status": "ACTIVE",
                    "status_update_time": iso(now),
                    "start_time": iso(now),
                    "subscriber": {
                        "email_address": "buyer@example.com",
                        "payer_id": "QYR5Z8XDVJNXQ",
                        "name": {"given_name": "John", "surname": "Doe"},
                    },
                    "billing_info": {
                        "outstanding_balance": {
                            "currency_code": self._regular(plan)["pricing_scheme"]["fixed_price"][
                                "currency_code"
                            ],
                            "value": "0.00",
                        },
                        "cycle_executions": [
                            {
                                "tenure_type": cycle["tenure_type"],
                                "sequence": cycle["sequence"],
                                "cycles_completed": 0,
                                "cycles_remaining": cycle["total_cycles"],
                                "total_cycles": cycle["total_cycles"],
                            }
                            for cycle in plan["billing_cycles"]
                        ],
                        "failed_payments_count": 0,
                    },
                    "links": [
                        self._link(f"/v1/billing/subscriptions/{subscription_id}", "self", "GET")
                    ],
                }
            )
            trial = next((c for c in plan["billing_cycles"] if c["tenure_type"] == "TRIAL"), None)
            self._emit(
                "BILLING.SUBSCRIPTION.ACTIVATED",
                "subscription",
                subscription,
                "Subscription activated",
            )
            if trial is not None:
                days = (
                    trial["frequency"]["interval_count"]
                    * INTERVAL[trial["frequency"]["interval_unit"]]
                )
                subscription["billing_info"]["next_billing_time"] = iso(now + timedelta(days=days))
            else:
                self._bill(subscription, now, succeed=True)
            return copy.deepcopy(subscription)

    def approve_revision(self, subscription_id: str) -> Json:
        """The buyer consents to the plan change on PayPal: the new plan bills from the next
        cycle."""
        with self._lock:
            subscription = self._subscription(subscription_id)
            plan_id = self._revision_waiting.pop(subscription_id)
            self._pending_plan[subscription_id] = plan_id
            self._emit(
                "BILLING.SUBSCRIPTION.UPDATED", "subscription", subscription, "Subscription updated"
            )
            return copy.deepcopy(subscription)

    def renew(self, subscription_id: str, *, succeed: bool = True) -> Json:
        """PayPal's clock reaches ``next_billing_time``: the next cycle is billed."""
        with self._lock:
            subscription = self._subscription(subscription_id)
            if subscription["status"] != "ACTIVE":
                raise ValueError(f"subscription {subscription_id} is {subscription['status']}")
            pending = self._pending_plan.pop(subscription_id, None)
            if pending is not None:
                subscription["plan_id"] = pending
            # The clock jumps to the renewal: it is billed now, the next one a period on.
            when = datetime.now(UTC)
            for execution in subscription["billing_info"]["cycle_executions"]:
                if execution["tenure_type"] == "TRIAL":
                    execution["cycles_completed"] = execution["total_cycles"]
                    execution["cycles_remaining"] = 0
            self._bill(subscription, when, succeed=succeed)
            return copy.deepcopy(subscription)

    # -- billing ---------------------------------------------------------------------------

    @staticmethod
    def _regular(plan: Json) -> Json:
        return next(c for c in plan["billing_cycles"] if c["tenure_type"] == "REGULAR")

    def _bill(self, subscription: Json, when: datetime, *, succeed: bool) -> None:
        from tests.fakes.paypal_server import new_id

        plan = self.plans[subscription["plan_id"]]
        regular = self._regular(plan)
        price = regular["pricing_scheme"]["fixed_price"]
        info = subscription["billing_info"]
        transaction_id = new_id()
        self.transactions.setdefault(subscription["id"], []).append(
            {
                "id": transaction_id,
                "status": "COMPLETED" if succeed else "DECLINED",
                "amount_with_breakdown": {
                    "gross_amount": dict(price),
                    "fee_amount": {"currency_code": price["currency_code"], "value": "0.00"},
                    "net_amount": dict(price),
                },
                "payer_name": {"given_name": "John", "surname": "Doe"},
                "payer_email": "buyer@example.com",
                "time": iso(when),
            }
        )
        if succeed:
            frequency = regular["frequency"]
            days = frequency["interval_count"] * INTERVAL[frequency["interval_unit"]]
            info["last_payment"] = {"amount": dict(price), "time": iso(when)}
            info["next_billing_time"] = iso(when + timedelta(days=days))
            info["failed_payments_count"] = 0
            info.pop("last_failed_payment", None)
            for execution in info["cycle_executions"]:
                if execution["tenure_type"] == "REGULAR":
                    execution["cycles_completed"] += 1
            sale = {
                "id": transaction_id,
                "state": "completed",
                "amount": {
                    "total": price["value"],
                    "currency": price["currency_code"],
                    "details": {"subtotal": price["value"]},
                },
                "payment_mode": "INSTANT_TRANSFER",
                "protection_eligibility": "ELIGIBLE",
                "transaction_fee": {"value": "0.00", "currency": price["currency_code"]},
                "billing_agreement_id": subscription["id"],
                "custom": subscription.get("custom_id"),
                "create_time": iso(when),
                "update_time": iso(when),
                "links": [
                    self._link(f"/v1/payments/sale/{transaction_id}", "self", "GET"),
                    self._link(f"/v1/payments/sale/{transaction_id}/refund", "refund", "POST"),
                ],
            }
            self.sales[transaction_id] = sale
            self._emit("PAYMENT.SALE.COMPLETED", "sale", sale, "Payment completed")
            return
        info["failed_payments_count"] += 1
        info["last_failed_payment"] = {
            "amount": dict(price),
            "time": iso(when),
            "reason_code": "PAYMENT_DENIED",
        }
        self._emit(
            "BILLING.SUBSCRIPTION.PAYMENT.FAILED", "subscription", subscription, "Payment failed"
        )
        threshold = plan["payment_preferences"].get("payment_failure_threshold", 0)
        if threshold and info["failed_payments_count"] >= threshold:
            subscription.update({"status": "SUSPENDED", "status_update_time": iso(when)})
            self._emit("BILLING.SUBSCRIPTION.SUSPENDED", "subscription", subscription, "Suspended")

    # -- endpoints -------------------------------------------------------------------------

    def _create_product(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        from tests.fakes.paypal_server import new_id

        product_id = body.get("id") or f"PROD-{new_id()}"
        if not 6 <= len(product_id) <= 50:
            raise self._fail(400, "INVALID_PARAMETER_SYNTAX", "/id")
        if product_id in self.products:
            raise self._fail(422, "DUPLICATE_RESOURCE_IDENTIFIER", "/id")
        now = iso(datetime.now(UTC))
        product = {
            "id": product_id,
            "name": body["name"],
            "description": body.get("description"),
            "type": body["type"],
            "create_time": now,
            "update_time": now,
            "links": [self._link(f"/v1/catalogs/products/{product_id}", "self", "GET")],
        }
        self.products[product_id] = product
        return 201, copy.deepcopy(product)

    def _get_product(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        product = self.products.get(params["id"])
        if product is None:
            raise self._fail(404, "INVALID_RESOURCE_ID")
        return 200, copy.deepcopy(product)

    def _create_plan(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        from tests.fakes.paypal_server import new_id

        if body["product_id"] not in self.products:
            raise self._fail(422, "INVALID_PRODUCT_ID", "/product_id")
        cycles = body["billing_cycles"]
        if sum(1 for c in cycles if c["tenure_type"] == "REGULAR") != 1:
            raise self._fail(422, "INVALID_BILLING_CYCLE", "/billing_cycles")
        for index, cycle in enumerate(cycles):
            fixed = (cycle.get("pricing_scheme") or {}).get("fixed_price")
            if cycle["tenure_type"] == "REGULAR" and fixed is None:
                raise self._fail(422, "INVALID_PRICING_SCHEME", f"/billing_cycles/{index}")
        plan_id = f"P-{new_id(24)}"
        now = iso(datetime.now(UTC))
        plan = {
            "id": plan_id,
            "product_id": body["product_id"],
            "name": body["name"],
            "status": body.get("status", "ACTIVE"),
            "description": body.get("description"),
            "usage_type": "LICENSED",
            "billing_cycles": copy.deepcopy(cycles),
            "payment_preferences": {
                "service_type": "PREPAID",
                "auto_bill_outstanding": True,
                "setup_fee_failure_action": "CANCEL",
                "payment_failure_threshold": 0,
                **copy.deepcopy(body["payment_preferences"]),
            },
            "quantity_supported": body.get("quantity_supported", False),
            "create_time": now,
            "update_time": now,
            "links": [self._link(f"/v1/billing/plans/{plan_id}", "self", "GET")],
        }
        self.plans[plan_id] = plan
        return 201, copy.deepcopy(plan)

    def _list_plans(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        query = request.query_params
        product_id = query.get("product_id")
        size = int(query.get("page_size", "10"))
        page = int(query.get("page", "1"))
        found = [p for p in self.plans.values() if product_id in (None, p["product_id"])]
        chosen = found[(page - 1) * size : page * size]
        summary = (
            "id",
            "product_id",
            "name",
            "status",
            "description",
            "usage_type",
            "create_time",
            "links",
        )
        return 200, {
            "plans": [{k: copy.deepcopy(p[k]) for k in summary} for p in chosen],
            "links": [self._link("/v1/billing/plans", "self", "GET")],
        }

    def _get_plan(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        plan = self.plans.get(params["id"])
        if plan is None:
            raise self._fail(404, "INVALID_RESOURCE_ID")
        return 200, copy.deepcopy(plan)

    def deactivate_plan(self, plan_id: str) -> None:
        """Someone deactivates the plan in PayPal's dashboard."""
        with self._lock:
            self.plans[plan_id]["status"] = "INACTIVE"

    def _create_subscription(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        from tests.fakes.paypal_server import new_id

        plan = self.plans.get(body["plan_id"])
        if plan is None:
            raise self._fail(422, "INVALID_RESOURCE_ID", "/plan_id")
        if plan["status"] != "ACTIVE":
            raise self._fail(422, "PLAN_STATUS_INVALID", "/plan_id")
        subscription_id = f"I-{new_id(12)}"
        now = iso(datetime.now(UTC))
        subscription = {
            "id": subscription_id,
            "plan_id": plan["id"],
            "status": "APPROVAL_PENDING",
            "status_update_time": now,
            "quantity": "1",
            "plan_overridden": False,
            "create_time": now,
            "links": [
                {
                    "href": f"https://www.sandbox.paypal.com/webapps/billing/subscriptions?ba_token=BA-{new_id()}",
                    "rel": "approve",
                    "method": "GET",
                },
                self._link(f"/v1/billing/subscriptions/{subscription_id}", "edit", "PATCH"),
                self._link(f"/v1/billing/subscriptions/{subscription_id}", "self", "GET"),
            ],
        }
        if "custom_id" in body:
            subscription["custom_id"] = body["custom_id"]
        if "subscriber" in body:
            subscription["subscriber"] = copy.deepcopy(body["subscriber"])
        self.subscriptions[subscription_id] = subscription
        self._private_context = getattr(self, "_private_context", {})
        self._private_context[subscription_id] = body.get("application_context") or {}
        self._emit(
            "BILLING.SUBSCRIPTION.CREATED", "subscription", subscription, "Subscription created"
        )
        return 201, copy.deepcopy(subscription)

    def application_context_of(self, subscription_id: str) -> Json:
        return copy.deepcopy(getattr(self, "_private_context", {}).get(subscription_id, {}))

    def _get_subscription(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        return 200, copy.deepcopy(self._subscription(params["id"]))

    def _status_change(
        self,
        subscription_id: str,
        allowed: tuple[str, ...],
        to: str,
        event: str,
        reason: str | None,
    ) -> tuple[int, Json]:
        subscription = self._subscription(subscription_id)
        if subscription["status"] not in allowed:
            raise self._fail(422, "SUBSCRIPTION_STATUS_INVALID")
        subscription.update({"status": to, "status_update_time": iso(datetime.now(UTC))})
        if reason is not None:
            subscription["status_change_note"] = reason
        if to == "CANCELLED":
            subscription["billing_info"].pop("next_billing_time", None)
        self._emit(event, "subscription", subscription, event)
        return 204, {}

    def _suspend(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        return self._status_change(
            params["id"], ("ACTIVE",), "SUSPENDED", "BILLING.SUBSCRIPTION.SUSPENDED", body["reason"]
        )

    def _activate(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        return self._status_change(
            params["id"],
            ("SUSPENDED",),
            "ACTIVE",
            "BILLING.SUBSCRIPTION.ACTIVATED",
            (body or {}).get("reason"),
        )

    def _cancel(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        return self._status_change(
            params["id"],
            ("ACTIVE", "SUSPENDED"),
            "CANCELLED",
            "BILLING.SUBSCRIPTION.CANCELLED",
            body["reason"],
        )

    def _revise(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        from tests.fakes.paypal_server import new_id

        subscription = self._subscription(params["id"])
        if subscription["status"] != "ACTIVE":
            raise self._fail(422, "SUBSCRIPTION_STATUS_INVALID")
        new_plan = self.plans.get(body["plan_id"])
        if new_plan is None or new_plan["status"] != "ACTIVE":
            raise self._fail(422, "INVALID_RESOURCE_ID", "/plan_id")
        old_plan = self.plans[subscription["plan_id"]]
        if new_plan["product_id"] != old_plan["product_id"]:
            # "You can upgrade or downgrade to subscription plans under the same product."
            raise self._fail(422, "INVALID_RESOURCE_ID", "/plan_id")
        self._revision_waiting[subscription["id"]] = new_plan["id"]
        return 200, {
            "plan_id": new_plan["id"],
            "plan_overridden": False,
            "links": [
                {
                    "href": f"https://www.sandbox.paypal.com/webapps/billing/subscriptions/update?ba_token=BA-{new_id()}",
                    "rel": "approve",
                    "method": "GET",
                }
            ],
        }

    def _list_transactions(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        self._subscription(params["id"])
        query = request.query_params
        if "start_time" not in query or "end_time" not in query:
            raise self._fail(400, "MISSING_REQUIRED_PARAMETER")
        start = datetime.fromisoformat(query["start_time"])
        end = datetime.fromisoformat(query["end_time"])
        found = [
            copy.deepcopy(t)
            for t in self.transactions.get(params["id"], [])
            if start <= datetime.fromisoformat(t["time"]) <= end
        ]
        return 200, {"transactions": found, "total_items": len(found), "total_pages": 1}

    # -- Payments v1: a subscription's sales and their refunds -----------------------------

    def pend_next_sale_refund(self, times: int = 1) -> None:
        """The next sale refunds stay ``pending`` (an eCheck, a review) until settled."""
        with self._lock:
            self._pend_sale_refunds += times

    def settle_sale_refund(self, refund_id: str, state: str = "completed") -> Json:
        """PayPal ends a pending sale refund (``completed`` or ``failed``) and sends
        PAYMENT.SALE.REFUNDED with the refund as it now is."""
        from tests.fakes.paypal_server import now_iso

        with self._lock:
            refund = self.sale_refunds[refund_id]
            if refund["state"] != "pending":
                raise ValueError(f"refund {refund_id} is {refund['state']}")
            refund["state"] = state
            refund["update_time"] = now_iso()
            self._update_sale_state(self.sales[refund["sale_id"]])
            self._emit("PAYMENT.SALE.REFUNDED", "refund", refund, "A sale was refunded")
            return copy.deepcopy(refund)

    def refund_sale_at_paypal(self, sale_id: str, total: str) -> Json:
        """The merchant refunds ``total`` of a sale in PayPal's own pages (no request id,
        no invoice number of ours): PayPal sends PAYMENT.SALE.REFUNDED."""
        from tests.fakes.paypal_server import new_id, now_iso

        with self._lock:
            sale = self._sale(sale_id)
            refund_id = new_id()
            refund: Json = {
                "id": refund_id,
                "create_time": now_iso(),
                "update_time": now_iso(),
                "state": "completed",
                "amount": {"total": total, "currency": sale["amount"]["currency"]},
                "sale_id": sale_id,
                "parent_payment": f"PAYID-{sale_id}",
                "links": [self._link(f"/v1/payments/refund/{refund_id}", "self", "GET")],
            }
            self.sale_refunds[refund_id] = refund
            self._update_sale_state(sale)
            self._emit("PAYMENT.SALE.REFUNDED", "refund", refund, "A sale was refunded")
            return copy.deepcopy(refund)

    def _sale(self, sale_id: str) -> Json:
        found = self.sales.get(sale_id)
        if found is None:
            raise self._fail(404, "INVALID_RESOURCE_ID")
        return found

    @staticmethod
    def _v1_error(name: str) -> Exception:
        """Payments v1's envelope: the error's name says it all, without ``details``."""
        from tests.fakes.paypal_server import PayPalError

        error = PayPalError(400)
        error.body = {
            "name": name,
            "message": V1_ERRORS[name],
            "information_link": f"https://developer.paypal.com/docs/api/payments/v1/#error-{name}",
        }
        return error

    def _held(self, sale_id: str) -> int:
        """What the sale's refunds take: completed and pending ones (money on its way back)."""
        from tests.fakes.paypal_server import to_minor

        return sum(
            to_minor(r["amount"]["total"], r["amount"]["currency"])
            for r in self.sale_refunds.values()
            if r["sale_id"] == sale_id and r["state"] in ("completed", "pending")
        )

    def _update_sale_state(self, sale: Json) -> None:
        from tests.fakes.paypal_server import now_iso, to_minor

        total = to_minor(sale["amount"]["total"], sale["amount"]["currency"])
        refunded = sum(
            to_minor(r["amount"]["total"], r["amount"]["currency"])
            for r in self.sale_refunds.values()
            if r["sale_id"] == sale["id"] and r["state"] == "completed"
        )
        if refunded:
            sale["state"] = "refunded" if refunded >= total else "partially_refunded"
            sale["update_time"] = now_iso()

    def _get_sale(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        return 200, copy.deepcopy(self._sale(params["id"]))

    def _get_sale_refund(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        refund = self.sale_refunds.get(params["id"])
        if refund is None:
            raise self._fail(404, "INVALID_RESOURCE_ID")
        return 200, copy.deepcopy(refund)

    def _refund_sale(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        from tests.fakes.openapi_check import Violation
        from tests.fakes.paypal_server import (
            CURRENCY_DECIMALS,
            PayPalError,
            new_id,
            now_iso,
            to_minor,
            to_value,
        )

        request_id = request.headers.get("paypal-request-id")
        if request_id is not None and len(request_id) > V1_REQUEST_ID_MAX:
            self.violations.append(
                Violation("POST", request.url.path, "PayPal-Request-Id longer than 78")
            )
            raise PayPalError(400, issue="INVALID_PARAMETER_VALUE")
        sale = self._sale(params["id"])
        currency = sale["amount"]["currency"]
        total = to_minor(sale["amount"]["total"], currency)
        if sale["state"] not in ("completed", "partially_refunded", "refunded"):
            raise self._v1_error("TRANSACTION_REFUSED")
        left = total - self._held(sale["id"])
        if left <= 0:
            raise self._v1_error("TRANSACTION_ALREADY_REFUNDED")
        requested = (body or {}).get("amount")
        if requested is None:
            amount = left  # an empty body: a full refund of what is left
        else:
            if requested.get("currency") != currency:
                raise self._v1_error("TRANSACTION_REFUSED")
            value = str(requested.get("total"))
            places = CURRENCY_DECIMALS[currency]
            if "." in value and len(value.split(".", 1)[1]) > places:
                raise self._v1_error("TRANSACTION_REFUSED")
            amount = to_minor(value, currency)
            if amount <= 0:
                raise self._v1_error("TRANSACTION_REFUSED")
            if amount > left:
                raise self._v1_error("REFUND_EXCEEDED_TRANSACTION_AMOUNT")
        pending = self._pend_sale_refunds > 0
        if pending:
            self._pend_sale_refunds -= 1
        refund_id = new_id()
        refund: Json = {
            "id": refund_id,
            "create_time": now_iso(),
            "update_time": now_iso(),
            "state": "pending" if pending else "completed",
            "amount": {"total": to_value(amount, currency), "currency": currency},
            "sale_id": sale["id"],
            "parent_payment": f"PAYID-{sale['id']}",
            "links": [
                self._link(f"/v1/payments/refund/{refund_id}", "self", "GET"),
                self._link(f"/v1/payments/sale/{sale['id']}", "sale", "GET"),
            ],
        }
        for name in ("description", "reason", "invoice_number"):
            if body and name in body:
                refund[name] = body[name]
        self.sale_refunds[refund_id] = refund
        if not pending:
            refund["total_refunded_amount"] = {
                "value": to_value(self._held(sale["id"]), currency),
                "currency": currency,
            }
            self._update_sale_state(sale)
            self._emit("PAYMENT.SALE.REFUNDED", "refund", refund, "A sale was refunded")
        return 201, copy.deepcopy(refund)


def is_billing_path(path: str) -> bool:
    return path.startswith(BILLING_PREFIXES)


def body_of(value: Mapping[str, Any] | None) -> Json | None:
    return dict(value) if value is not None else None
