"""Paddle Billing's subscriptions in the fake Paddle: products, recurring prices, the
subscription a paid checkout transaction makes, its renewals, changes, cancellation, the
customer portal, and the events they send.

Requests and answers are checked against Paddle's published OpenAPI description like every
other (the fake's ``_api`` does it around the handlers here). Behaviour follows Paddle's
guides: "Create a subscription" (a transaction with recurring items, paid on Checkout, makes
the subscription and copies the transaction's ``custom_data`` to it), "Cancel a subscription"
(``effective_from``: a scheduled change at the next billing period, or now), "Remove a
scheduled change" (``PATCH`` ``scheduled_change: null``), "Change billing / proration"
(``proration_billing_mode``), "Customer portal sessions". Paddle's ids are time-ordered, the
fake's random: ``order_by=id[DESC]`` is served in creation order.

Test controls stand in for the customer and Paddle's clock: ``pay`` (FakePaddle's) on a
subscription checkout makes the subscription; ``renew`` bills the next period (paid, or
failed: past due), ending one set to cancel at the period's end.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

Json = dict[str, Any]
Handler = Callable[[Json | None, dict[str, str], dict[str, str]], tuple[int, Json]]
DAYS = {"day": 1, "week": 7, "month": 30, "year": 365}


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class PaddleBilling:
    """Mixed into ``FakePaddle``, which holds the lock, transactions, prices and events."""

    _lock: threading.RLock
    transactions: dict[str, Json]
    prices: dict[str, Json]
    _emit: Callable[[str, Json], None]
    _product: Callable[..., Json]
    _price: Callable[..., Json]
    _shown: Callable[[Json], Json]
    _totals: Callable[[int], Json]
    _page: Callable[[list[Json], dict[str, str], str], Json]

    def _init_billing(self) -> None:
        self.products: dict[str, Json] = {}
        self.subscriptions: dict[str, Json] = {}
        self.portal_sessions: dict[str, Json] = {}
        self._decline_next_charge = False

    def _reset_billing(self) -> None:
        for store in (self.products, self.subscriptions, self.portal_sessions):
            store.clear()
        self._decline_next_charge = False

    def _billing_routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("post", "/products"): self._create_product,
            ("get", "/products"): self._list_products,
            ("post", "/prices"): self._create_price,
            ("get", "/prices"): self._list_prices,
            ("get", "/prices/{price_id}"): self._get_price,
            ("get", "/subscriptions/{subscription_id}"): self._get_subscription,
            ("patch", "/subscriptions/{subscription_id}"): self._update_subscription,
            ("post", "/subscriptions/{subscription_id}/cancel"): self._cancel_subscription,
            ("post", "/subscriptions/{subscription_id}/resume"): self._resume_subscription,
            ("post", "/customers/{customer_id}/portal-sessions"): self._create_portal_session,
        }

    @staticmethod
    def _error(code: str) -> Exception:
        from tests.fakes.paddle_server import PaddleError

        return PaddleError(code)

    @staticmethod
    def _new_id(prefix: str) -> str:
        from tests.fakes.paddle_server import new_id

        return new_id(prefix)

    # -- controls for tests ----------------------------------------------------------------

    def archive_price(self, price_id: str) -> None:
        with self._lock:
            self.prices[price_id]["status"] = "archived"

    def renew(self, subscription_id: str, *, succeed: bool = True) -> Json:
        """Paddle's clock reaches ``next_billed_at``."""
        with self._lock:
            subscription = self.subscriptions[subscription_id]
            if subscription["status"] == "canceled":
                raise ValueError(f"subscription {subscription_id} is canceled")
            now = datetime.now(UTC)
            scheduled = subscription["scheduled_change"]
            if scheduled is not None and scheduled["action"] == "cancel":
                self._end(subscription, now)
                return copy.deepcopy(subscription)
            price = self.prices[subscription["items"][0]["price"]["id"]]
            self._start_period(subscription, price, now)
            if subscription["status"] == "trialing":
                subscription["first_billed_at"] = iso(now)
            subscription["items"][0]["status"] = "active"
            transaction = self._subscription_transaction(
                subscription, int(price["unit_price"]["amount"]), origin="subscription_recurring"
            )
            self._collect(subscription, transaction, succeed=succeed)
            return copy.deepcopy(subscription)

    def decline_next_charge(self) -> None:
        """The next charge Paddle makes for a subscription change is declined."""
        with self._lock:
            self._decline_next_charge = True

    # -- subscriptions made by checkout ----------------------------------------------------

    def _subscribe(self, transaction: Json) -> None:
        """Called by ``pay`` once a checkout transaction with recurring items is paid: the
        subscription Paddle makes of it (trialing when its price has a trial)."""
        item = transaction["items"][0]
        price = self.prices.get(item["price"]["id"])
        if price is None or price.get("billing_cycle") is None:
            return
        now = datetime.now(UTC)
        subscription_id = self._new_id("sub_")
        trial = price.get("trial_period")
        subscription: Json = {
            "id": subscription_id,
            "status": "trialing" if trial else "active",
            "customer_id": transaction["customer_id"],
            "address_id": transaction["address_id"],
            "business_id": None,
            "currency_code": transaction["currency_code"],
            "created_at": iso(now),
            "updated_at": iso(now),
            "started_at": iso(now),
            "first_billed_at": None if trial else iso(now),
            "next_billed_at": None,
            "paused_at": None,
            "canceled_at": None,
            "discount": None,
            "collection_mode": "automatic",
            "billing_details": None,
            "current_billing_period": None,
            "billing_cycle": copy.deepcopy(price["billing_cycle"]),
            "scheduled_change": None,
            "management_urls": {
                "update_payment_method": f"https://buyer-portal.paddle.com/subscriptions/{subscription_id}/update-payment-method",
                "cancel": f"https://buyer-portal.paddle.com/subscriptions/{subscription_id}/cancel",
            },
            "items": [self._item(price, now, trialing=bool(trial))],
            "custom_data": copy.deepcopy(transaction["custom_data"]),
            "import_meta": None,
        }
        self._start_period(subscription, price, now, trial=trial)
        self.subscriptions[subscription_id] = subscription
        transaction["subscription_id"] = subscription_id
        transaction["billing_period"] = copy.deepcopy(subscription["current_billing_period"])
        self._emit("subscription.created", subscription)
        self._emit("subscription.trialing" if trial else "subscription.activated", subscription)

    def _item(self, price: Json, now: datetime, *, trialing: bool) -> Json:
        return {
            "status": "trialing" if trialing else "active",
            "quantity": 1,
            "recurring": True,
            "created_at": iso(now),
            "updated_at": iso(now),
            "previously_billed_at": None if trialing else iso(now),
            "next_billed_at": None,
            "trial_dates": None,
            "price": self._shown(price),
            "product": self._shown(price["_product"]),
        }

    def _start_period(
        self, subscription: Json, price: Json, now: datetime, *, trial: Json | None = None
    ) -> None:
        length = trial or price["billing_cycle"]
        end = now + timedelta(days=DAYS[length["interval"]] * length["frequency"])
        subscription["current_billing_period"] = {"starts_at": iso(now), "ends_at": iso(end)}
        subscription["next_billed_at"] = iso(end)
        subscription["items"][0]["next_billed_at"] = iso(end)
        if trial:
            subscription["items"][0]["trial_dates"] = {"starts_at": iso(now), "ends_at": iso(end)}
        subscription["updated_at"] = iso(now)

    def _subscription_transaction(self, subscription: Json, amount: int, *, origin: str) -> Json:
        price = self.prices[subscription["items"][0]["price"]["id"]]
        now = iso(datetime.now(UTC))
        transaction_id = self._new_id("txn_")
        currency = subscription["currency_code"]
        transaction: Json = {
            "id": transaction_id,
            "status": "billed",
            "customer_id": subscription["customer_id"],
            "address_id": subscription["address_id"],
            "business_id": None,
            "custom_data": copy.deepcopy(subscription["custom_data"]),
            "origin": origin,
            "collection_mode": "automatic",
            "subscription_id": subscription["id"],
            "invoice_id": None,
            "invoice_number": None,
            "billing_details": None,
            "billing_period": copy.deepcopy(subscription["current_billing_period"]),
            "currency_code": currency,
            "discount_id": None,
            "created_at": now,
            "updated_at": now,
            "billed_at": now,
            "revised_at": None,
            "items": [{"price": self._shown(price), "quantity": 1, "proration": None}],
            "details": {
                "tax_rates_used": [],
                "totals": {
                    **self._totals(amount),
                    "credit": "0",
                    "credit_to_balance": "0",
                    "balance": str(amount),
                    "grand_total": str(amount),
                    "fee": None,
                    "earnings": None,
                    "currency_code": currency,
                },
                "adjusted_totals": {
                    **self._totals(amount),
                    "grand_total": str(amount),
                    "fee": "0",
                    "earnings": "0",
                    "currency_code": currency,
                },
                "payout_totals": None,
                "adjusted_payout_totals": None,
                "line_items": [],
            },
            "payments": [],
            "checkout": None,
        }
        self.transactions[transaction_id] = transaction
        self._emit("transaction.created", transaction)
        self._emit("transaction.billed", transaction)
        return transaction

    def _collect(self, subscription: Json, transaction: Json, *, succeed: bool) -> None:
        if succeed:
            transaction["status"] = "paid"
            self._emit("transaction.paid", transaction)
            transaction["status"] = "completed"
            self._emit("transaction.completed", transaction)
            previous = subscription["status"]
            subscription["status"] = "active"
            self._emit(
                "subscription.activated" if previous == "trialing" else "subscription.updated",
                subscription,
            )
            return
        transaction["status"] = "past_due"
        self._emit("transaction.payment_failed", transaction)
        self._emit("transaction.past_due", transaction)
        subscription["status"] = "past_due"
        self._emit("subscription.past_due", subscription)

    def _end(self, subscription: Json, when: datetime) -> None:
        subscription.update(
            {
                "status": "canceled",
                "canceled_at": iso(when),
                "next_billed_at": None,
                "scheduled_change": None,
                "current_billing_period": None,
                "updated_at": iso(when),
            }
        )
        subscription["items"][0]["status"] = "inactive"
        self._emit("subscription.canceled", subscription)

    # -- endpoints -------------------------------------------------------------------------

    def _create_product(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        product = self._product(body["name"], custom=False, tax_category=body["tax_category"])
        product.update(
            {"description": body.get("description"), "custom_data": body.get("custom_data")}
        )
        self.products[product["id"]] = product
        self._emit("product.created", product)
        return 201, {"data": copy.deepcopy(product)}

    def _list_products(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        found = [p for p in self.products.values() if query.get("status") in (None, p["status"])]
        return 200, self._page(found, query, "/products")

    def _create_price(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        product = self.products.get(body["product_id"])
        if product is None:
            raise self._error("not_found")
        price = self._price(
            description=body["description"],
            name=body.get("name"),
            amount=int(body["unit_price"]["amount"]),
            currency=body["unit_price"]["currency_code"],
            product=product,
        )
        price.update(
            {
                "type": "standard",
                "billing_cycle": body.get("billing_cycle"),
                "trial_period": body.get("trial_period"),
                "tax_mode": body.get("tax_mode", "account_setting"),
                "custom_data": body.get("custom_data"),
            }
        )
        self.prices[price["id"]] = price
        self._emit("price.created", self._shown(price))
        return 201, {"data": self._shown(price)}

    def _list_prices(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        found = [
            self._shown(p)
            for p in self.prices.values()
            if query.get("product_id") in (None, p["product_id"])
            and query.get("status") in (None, p["status"])
            and (query.get("recurring") != "true" or p["billing_cycle"] is not None)
        ]
        return 200, self._page(found, query, "/prices")

    def _get_price(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        price = self.prices.get(params["price_id"])
        if price is None:
            raise self._error("not_found")
        return 200, {"data": self._shown(price)}

    def _subscription(self, subscription_id: str) -> Json:
        subscription = self.subscriptions.get(subscription_id)
        if subscription is None:
            raise self._error("not_found")
        return subscription

    def _get_subscription(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        return 200, {"data": copy.deepcopy(self._subscription(params["subscription_id"]))}

    def _cancel_subscription(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        subscription = self._subscription(params["subscription_id"])
        if subscription["status"] == "canceled":
            raise self._error("bad_request")
        now = datetime.now(UTC)
        effective = (body or {}).get("effective_from") or "next_billing_period"
        if effective == "immediately":
            self._end(subscription, now)
        else:
            subscription["scheduled_change"] = {
                "action": "cancel",
                "effective_at": subscription["next_billed_at"],
                "resume_at": None,
            }
            subscription["updated_at"] = iso(now)
            self._emit("subscription.updated", subscription)
        return 200, {"data": copy.deepcopy(subscription)}

    def _resume_subscription(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        subscription = self._subscription(params["subscription_id"])
        if subscription["status"] != "paused":
            raise self._error("bad_request")
        subscription.update({"status": "active", "paused_at": None})
        self._emit("subscription.resumed", subscription)
        return 200, {"data": copy.deepcopy(subscription)}

    def _update_subscription(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        subscription = self._subscription(params["subscription_id"])
        if subscription["status"] == "canceled":
            raise self._error("bad_request")
        if "scheduled_change" in body:
            if body["scheduled_change"] is not None:
                raise self._error("bad_request")  # only removing one is documented
            subscription["scheduled_change"] = None
        if "items" in body:
            self._change_items(subscription, body)
        subscription["updated_at"] = iso(datetime.now(UTC))
        self._emit("subscription.updated", subscription)
        return 200, {"data": copy.deepcopy(subscription)}

    def _change_items(self, subscription: Json, body: Json) -> None:
        mode = body.get("proration_billing_mode")
        if mode is None:
            raise self._error("bad_request")  # required for changes that impact billing
        (wanted,) = body["items"]
        price = self.prices.get(wanted["price_id"])
        if price is None or price["status"] != "active" or price["billing_cycle"] is None:
            raise self._error("not_found")
        old = self.prices[subscription["items"][0]["price"]["id"]]
        now = datetime.now(UTC)
        charge = 0
        if mode == "full_immediately":
            charge = int(price["unit_price"]["amount"])
        elif mode == "prorated_immediately":
            period = subscription["current_billing_period"]
            start = datetime.fromisoformat(period["starts_at"])
            end = datetime.fromisoformat(period["ends_at"])
            left = max((end - now).total_seconds(), 0) / max((end - start).total_seconds(), 1)
            difference = int(price["unit_price"]["amount"]) - int(old["unit_price"]["amount"])
            charge = max(round(difference * left), 0)
        elif mode != "do_not_bill":
            raise self._error("bad_request")  # the fake bills no other mode
        if charge and self._decline_next_charge:
            self._decline_next_charge = False
            if body.get("on_payment_failure", "prevent_change") == "prevent_change":
                raise self._error("bad_request")
        subscription["items"][0] = self._item(price, now, trialing=False)
        subscription["items"][0]["next_billed_at"] = subscription["next_billed_at"]
        if charge:
            transaction = self._subscription_transaction(
                subscription, charge, origin="subscription_update"
            )
            self._collect(subscription, transaction, succeed=True)

    @staticmethod
    def _deep_link(base: str, action: str, subscription_id: str) -> str:
        return f"{base}?action={action}&subscription_id={subscription_id}&token=pga_fake"

    def _create_portal_session(
        self, body: Json | None, params: dict[str, str], query: dict[str, str]
    ) -> tuple[int, Json]:
        customer = params["customer_id"]
        wanted = (body or {}).get("subscription_ids") or []
        if not any(s["customer_id"] == customer for s in self.subscriptions.values()):
            raise self._error("not_found")
        session_id = self._new_id("cpls_")
        base = f"https://customer-portal.paddle.com/cpl_{session_id[5:]}"
        session = {
            "id": session_id,
            "customer_id": customer,
            "urls": {
                "general": {"overview": f"{base}?action=overview&token=pga_fake"},
                "subscriptions": [
                    {
                        "id": sub,
                        "cancel_subscription": self._deep_link(base, "cancel_subscription", sub),
                        "update_subscription_payment_method": self._deep_link(
                            base, "update_subscription_payment_method", sub
                        ),
                    }
                    for sub in wanted
                ],
            },
            "created_at": iso(datetime.now(UTC)),
        }
        self.portal_sessions[session_id] = session
        return 201, {"data": copy.deepcopy(session)}
