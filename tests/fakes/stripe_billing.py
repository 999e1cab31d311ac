"""Stripe Billing in the fake Stripe: products, recurring prices, Checkout in subscription
mode, subscriptions, their invoices and the customer portal.

Requests are checked against the published description like every other (the fake's
``_handle`` does it before any handler here runs). Objects are shaped as the API version the
SDK pins (2026-10-28) sends them, which differs from the 2022 fixtures in three places that
matter here: a subscription's ``current_period_start/end`` are on its items, an invoice names
its subscription under ``parent.subscription_details`` and its payments under ``payments``
(the PaymentIntent that paid it), with no ``invoice.subscription`` / ``payment_intent``.

Test controls stand in for the customer and for Stripe's clock: ``complete_subscription_
checkout`` (the customer subscribes on the Checkout page), ``renew`` (the period ends: the
renewal invoice is paid or fails, or a subscription set to cancel at period end ends).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.stripe_server import StripeErrorResponse

Json = dict[str, Any]
DAY_S = 24 * 3600
INTERVAL_S = {"day": DAY_S, "week": 7 * DAY_S, "month": 30 * DAY_S, "year": 365 * DAY_S}


class StripeBilling:
    """Mixed into ``FakeStripe``: it holds the lock, the event list, the fixtures and the
    PaymentIntent machinery this uses."""

    _lock: threading.RLock
    payment_intents: dict[str, Json]

    # supplied by FakeStripe
    _fixture: Callable[[str], Json]
    _emit: Callable[..., None]
    _respond: Callable[[Json, Json], Json]
    _new_intent: Callable[..., Json]
    _confirm: Callable[..., None]

    def _init_billing(self) -> None:
        self.products: dict[str, Json] = {}
        self.prices: dict[str, Json] = {}
        self.subscriptions: dict[str, Json] = {}
        self.invoices: dict[str, Json] = {}
        self.portal_sessions: dict[str, Json] = {}

    def _reset_billing(self) -> None:
        for store in (
            self.products,
            self.prices,
            self.subscriptions,
            self.invoices,
            self.portal_sessions,
        ):
            store.clear()

    def _billing_routes(self) -> dict[tuple[str, str], Callable[[Json, dict[str, str]], Json]]:
        return {
            ("post", "/v1/products"): self._create_product,
            ("get", "/v1/products/{id}"): self._retrieve_product,
            ("post", "/v1/prices"): self._create_price,
            ("get", "/v1/prices"): self._list_prices,
            ("get", "/v1/prices/{price}"): self._retrieve_price,
            ("get", "/v1/subscriptions/{subscription_exposed_id}"): self._retrieve_subscription,
            ("post", "/v1/subscriptions/{subscription_exposed_id}"): self._update_subscription,
            ("delete", "/v1/subscriptions/{subscription_exposed_id}"): self._cancel_subscription,
            ("get", "/v1/invoices/{invoice}"): self._retrieve_invoice,
            ("post", "/v1/billing_portal/sessions"): self._create_portal_session,
        }

    @staticmethod
    def _error() -> type[StripeErrorResponse]:
        from tests.fakes.stripe_server import StripeErrorResponse

        return StripeErrorResponse

    @staticmethod
    def _new_id(prefix: str) -> str:
        from tests.fakes.stripe_server import new_id

        return new_id(prefix)

    def _missing(self, kind: str, object_id: str, param: str = "id") -> Exception:
        return self._error()(
            404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param
        )

    # -- controls for tests ----------------------------------------------------------------

    def complete_subscription_checkout(
        self, session_id: str, payment_method: str = "pm_card_visa"
    ) -> Json:
        """The customer subscribes on the Checkout page of ``session_id``: a customer and a
        subscription are made (trialing, or active with its first invoice paid), then
        ``checkout.session.completed``. Returns the subscription."""
        with self._lock:
            session = self.sessions[session_id]  # type: ignore[attr-defined]
            if session["mode"] != "subscription" or session["status"] != "open":
                raise ValueError(f"session {session_id} is not an open subscription checkout")
            private = self._session_private[session_id]  # type: ignore[attr-defined]
            data = private.get("subscription_data") or {}
            price = self.prices[private["line_items"][0]["price"]]
            now = int(time.time())
            customer = self._new_id("cus_")
            trial_days = int(data.get("trial_period_days") or 0)
            subscription = self._fixture("subscription")
            subscription_id = self._new_id("sub_1")
            period_end = now + (trial_days * DAY_S if trial_days else self._period_s(price))
            subscription.update(
                {
                    "id": subscription_id,
                    "billing_cycle_anchor": period_end if trial_days else now,
                    "cancel_at": None,
                    "cancel_at_period_end": False,
                    "canceled_at": None,
                    "created": now,
                    "customer": customer,
                    "ended_at": None,
                    "latest_invoice": None,
                    "metadata": dict(data.get("metadata") or {}),
                    "start_date": now,
                    "status": "trialing" if trial_days else "active",
                    "trial_start": now if trial_days else None,
                    "trial_end": period_end if trial_days else None,
                }
            )
            for gone in ("current_period_start", "current_period_end"):
                subscription.pop(gone, None)  # on the items since API version 2025-03-31
            subscription["items"] = {
                "object": "list",
                "data": [self._item(subscription_id, price, now, period_end)],
                "has_more": False,
                "url": f"/v1/subscription_items?subscription={subscription_id}",
            }
            self.subscriptions[subscription_id] = subscription
            self._emit("customer.subscription.created", subscription)
            self._invoice(
                subscription,
                amount=0 if trial_days else price["unit_amount"],
                reason="subscription_create",
                payment_method=payment_method,
            )
            session.update(
                {
                    "status": "complete",
                    "payment_status": "no_payment_required" if trial_days else "paid",
                    "customer": customer,
                    "subscription": subscription_id,
                }
            )
            self._emit("checkout.session.completed", session)
            return copy.deepcopy(subscription)

    def renew(self, subscription_id: str, *, succeed: bool = True) -> Json:
        """Stripe's clock reaches the end of the period: a subscription set to cancel at
        period end ends (``customer.subscription.deleted``); any other is invoiced for the
        next period, the invoice paid (``invoice.paid``, active) or not
        (``invoice.payment_failed``, past_due). Returns the subscription."""
        with self._lock:
            subscription = self._subscription(subscription_id)
            if subscription["status"] in ("canceled", "incomplete_expired"):
                raise ValueError(f"subscription {subscription_id} is {subscription['status']}")
            item = subscription["items"]["data"][0]
            start = item["current_period_end"]
            if subscription["cancel_at_period_end"]:
                subscription.update({"status": "canceled", "ended_at": start, "canceled_at": start})
                self._emit("customer.subscription.deleted", subscription)
                return copy.deepcopy(subscription)
            previous = {"status": subscription["status"]}
            price = item["price"]
            item["current_period_start"] = start
            item["current_period_end"] = start + self._period_s(price)
            invoice = self._invoice(
                subscription,
                amount=price["unit_amount"],
                reason="subscription_cycle",
                payment_method="pm_card_visa" if succeed else "pm_card_chargeDeclined",
            )
            subscription["status"] = "active" if invoice["status"] == "paid" else "past_due"
            self._emit("customer.subscription.updated", subscription, previous)
            return copy.deepcopy(subscription)

    # -- objects ---------------------------------------------------------------------------

    @staticmethod
    def _period_s(price: Json) -> int:
        recurring = price["recurring"]
        return int(INTERVAL_S[recurring["interval"]] * recurring["interval_count"])

    def _item(self, subscription_id: str, price: Json, start: int, end: int) -> Json:
        return {
            "id": self._new_id("si_"),
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": start,
            "current_period_start": start,
            "current_period_end": end,
            "metadata": {},
            "price": copy.deepcopy(price),
            "quantity": 1,
            "subscription": subscription_id,
            "tax_rates": [],
        }

    def _subscription(self, subscription_id: str) -> Json:
        subscription = self.subscriptions.get(subscription_id)
        if subscription is None:
            raise self._missing("subscription", subscription_id, "subscription_exposed_id")
        return subscription

    def _invoice(
        self, subscription: Json, *, amount: int, reason: str, payment_method: str
    ) -> Json:
        """An invoice of ``subscription`` for ``amount``, finalized and charged at once with
        ``payment_method`` (a zero invoice is paid without a charge)."""
        item = subscription["items"]["data"][0]
        price = item["price"]
        invoice = self._fixture("invoice")
        for gone in ("subscription", "payment_intent", "charge", "paid"):
            invoice.pop(gone, None)  # moved or removed since API version 2025-03-31
        invoice_id = self._new_id("in_1")
        now = int(time.time())
        invoice.update(
            {
                "id": invoice_id,
                "amount_due": amount,
                "amount_paid": 0,
                "amount_remaining": amount,
                "attempt_count": 0,
                "attempted": False,
                "billing_reason": reason,
                "created": now,
                "currency": price["currency"],
                "customer": subscription["customer"],
                "lines": {
                    "object": "list",
                    "data": [
                        {
                            "id": self._new_id("il_1"),
                            "object": "line_item",
                            "amount": amount,
                            "currency": price["currency"],
                            "period": {
                                "start": item["current_period_start"],
                                "end": item["current_period_end"],
                            },
                            "quantity": 1,
                        }
                    ],
                    "has_more": False,
                },
                "parent": {
                    "type": "subscription_details",
                    "quote_details": None,
                    "subscription_details": {
                        "metadata": dict(subscription["metadata"]),
                        "subscription": subscription["id"],
                    },
                },
                "payments": {"object": "list", "data": [], "has_more": False},
                "period_start": item["current_period_start"],
                "period_end": item["current_period_end"],
                "status": "open",
                "subtotal": amount,
                "total": amount,
            }
        )
        self.invoices[invoice_id] = invoice
        subscription["latest_invoice"] = invoice_id
        self._emit("invoice.created", invoice)
        self._emit("invoice.finalized", invoice)
        if amount == 0:
            self._mark_paid(invoice)
            return invoice
        intent = self._new_intent(
            amount=amount,
            currency=price["currency"],
            capture_method="automatic_async",
            metadata={},
            description="Subscription update" if reason != "subscription_cycle" else None,
        )
        self._confirm(intent, payment_method)
        invoice["attempt_count"], invoice["attempted"] = 1, True
        invoice["payments"]["data"].append(
            {
                "id": self._new_id("inpay_1"),
                "object": "invoice_payment",
                "amount_paid": amount if intent["status"] == "succeeded" else None,
                "amount_requested": amount,
                "currency": price["currency"],
                "invoice": invoice_id,
                "is_default": True,
                "payment": {"type": "payment_intent", "payment_intent": intent["id"]},
                "status": "paid" if intent["status"] == "succeeded" else "open",
            }
        )
        if intent["status"] == "succeeded":
            self._mark_paid(invoice)
        else:
            self._emit("invoice.payment_failed", invoice)
        return invoice

    def _mark_paid(self, invoice: Json) -> None:
        invoice.update(
            {
                "status": "paid",
                "amount_paid": invoice["amount_due"],
                "amount_remaining": 0,
                "status_transitions": {
                    **(invoice.get("status_transitions") or {}),
                    "paid_at": int(time.time()),
                },
            }
        )
        self._emit("invoice.paid", invoice)

    # -- checkout in subscription mode ------------------------------------------------------

    def _create_subscription_session(self, body: Json) -> Json:
        items = body.get("line_items") or []
        error = self._error()
        if len(items) != 1 or "price" not in items[0]:
            raise error(
                400,
                "The fake serves subscription Checkout with one line item naming a price",
                param="line_items",
            )
        price = self.prices.get(items[0]["price"])
        if price is None:
            raise self._missing("price", items[0]["price"], "line_items[0][price]")
        if price["type"] != "recurring":
            raise error(
                400,
                "You must specify at least one recurring price in `subscription` mode when "
                "using prices.",
                param="line_items",
            )
        if not price["active"]:
            raise error(400, f"The price specified is inactive: {price['id']}", param="price")
        data = body.get("subscription_data") or {}
        trial = bool(data.get("trial_period_days"))
        session = self._fixture("checkout.session")
        session_id = self._new_id("cs_test_b1")
        session.update(
            {
                "id": session_id,
                "amount_subtotal": price["unit_amount"],
                "amount_total": 0 if trial else price["unit_amount"],
                "cancel_url": body.get("cancel_url"),
                "client_reference_id": body.get("client_reference_id"),
                "created": int(time.time()),
                "currency": price["currency"],
                "customer": None,
                "customer_email": body.get("customer_email"),
                "expires_at": int(time.time()) + DAY_S,
                "metadata": body.get("metadata") or {},
                "mode": "subscription",
                "payment_intent": None,
                "payment_status": "unpaid",
                "status": "open",
                "subscription": None,
                "success_url": body.get("success_url"),
                "ui_mode": "hosted",
                "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            }
        )
        self.sessions[session_id] = session  # type: ignore[attr-defined]
        self._session_private[session_id] = {  # type: ignore[attr-defined]
            "subscription_data": data,
            "line_items": items,
        }
        return self._respond(session, body)

    # -- endpoints -------------------------------------------------------------------------

    def _create_product(self, body: Json, path: dict[str, str]) -> Json:
        product_id = body.get("id") or self._new_id("prod_")
        if product_id in self.products:
            raise self._error()(
                400,
                f"Product already exists: {product_id}",
                code="resource_already_exists",
                param="id",
            )
        product = self._fixture("product")
        product.update(
            {
                "id": product_id,
                "active": body.get("active", True),
                "created": int(time.time()),
                "description": body.get("description"),
                "metadata": body.get("metadata") or {},
                "name": body["name"],
                "updated": int(time.time()),
            }
        )
        self.products[product_id] = product
        self._emit("product.created", product)
        return self._respond(product, body)

    def _retrieve_product(self, body: Json, path: dict[str, str]) -> Json:
        product = self.products.get(path["id"])
        if product is None:
            raise self._missing("product", path["id"])
        return self._respond(product, body)

    def _create_price(self, body: Json, path: dict[str, str]) -> Json:
        product_id = body.get("product")
        if product_id not in self.products:
            raise self._missing("product", str(product_id), "product")
        recurring = body.get("recurring")
        lookup_key = body.get("lookup_key")
        for other in self.prices.values():
            if lookup_key and other["lookup_key"] == lookup_key:
                if not body.get("transfer_lookup_key"):
                    raise self._error()(
                        400,
                        f"A price (`{other['id']}`) already uses that lookup key.",
                        param="lookup_key",
                    )
                other["lookup_key"] = None
        price = self._fixture("price")
        price.update(
            {
                "id": self._new_id("price_1"),
                "active": body.get("active", True),
                "created": int(time.time()),
                "currency": body["currency"],
                "lookup_key": lookup_key,
                "metadata": body.get("metadata") or {},
                "nickname": body.get("nickname"),
                "product": product_id,
                "recurring": (
                    {
                        "interval": recurring["interval"],
                        "interval_count": recurring.get("interval_count", 1),
                        "trial_period_days": None,
                        "usage_type": "licensed",
                        "meter": None,
                    }
                    if recurring
                    else None
                ),
                "type": "recurring" if recurring else "one_time",
                "unit_amount": body["unit_amount"],
                "unit_amount_decimal": str(body["unit_amount"]),
            }
        )
        self.prices[price["id"]] = price
        self._emit("price.created", price)
        return self._respond(price, body)

    def _list_prices(self, body: Json, path: dict[str, str]) -> Json:
        found = list(self.prices.values())
        if "lookup_keys" in body:
            keys = set(body["lookup_keys"])
            found = [p for p in found if p["lookup_key"] in keys]
        if "active" in body:
            found = [p for p in found if p["active"] is body["active"]]
        limit = int(body.get("limit", 10))
        return {
            "object": "list",
            "data": found[:limit],
            "has_more": len(found) > limit,
            "url": "/v1/prices",
        }

    def _retrieve_price(self, body: Json, path: dict[str, str]) -> Json:
        price = self.prices.get(path["price"])
        if price is None:
            raise self._missing("price", path["price"], "price")
        return self._respond(price, body)

    def archive_price(self, price_id: str) -> None:
        """Someone archives the price in Stripe's dashboard."""
        with self._lock:
            self.prices[price_id]["active"] = False

    def _retrieve_subscription(self, body: Json, path: dict[str, str]) -> Json:
        return self._respond(self._subscription(path["subscription_exposed_id"]), body)

    def _retrieve_invoice(self, body: Json, path: dict[str, str]) -> Json:
        invoice = self.invoices.get(path["invoice"])
        if invoice is None:
            raise self._missing("invoice", path["invoice"], "invoice")
        return self._respond(invoice, body)

    def _update_subscription(self, body: Json, path: dict[str, str]) -> Json:
        subscription = self._subscription(path["subscription_exposed_id"])
        error = self._error()
        if subscription["status"] in ("canceled", "incomplete_expired"):
            raise error(
                400,
                "A canceled subscription can only update its cancellation_details and metadata.",
            )
        previous: Json = {}
        if "cancel_at_period_end" in body:
            previous["cancel_at_period_end"] = subscription["cancel_at_period_end"]
            subscription["cancel_at_period_end"] = body["cancel_at_period_end"]
            subscription["cancel_at"] = (
                subscription["items"]["data"][0]["current_period_end"]
                if body["cancel_at_period_end"]
                else None
            )
        if "metadata" in body:
            subscription["metadata"].update(body["metadata"])
        if "items" in body:
            self._change_items(subscription, body, previous)
        if previous:
            self._emit("customer.subscription.updated", subscription, previous)
        return self._respond(subscription, body)

    def _change_items(self, subscription: Json, body: Json, previous: Json) -> None:
        error = self._error()
        changes = body["items"]
        item = subscription["items"]["data"][0]
        if len(changes) != 1 or changes[0].get("id") != item["id"] or "price" not in changes[0]:
            raise error(400, "The fake changes the one item's price, by item id", param="items")
        price = self.prices.get(changes[0]["price"])
        if price is None:
            raise self._missing("price", changes[0]["price"], "items[0][price]")
        old = item["price"]
        if price["currency"] != old["currency"]:
            raise error(
                400,
                "Cannot combine currencies on a single customer.",
                param="items[0][price]",
            )
        # The 2022 description types the anchor as a string; the SDK's pinned version sends
        # an object {type}. stripe_spec.ALLOWED_UNDOCUMENTED lets the object through, so the
        # fake checks its shape here.
        anchor = body.get("billing_cycle_anchor")
        if anchor is not None and anchor not in ({"type": "now"}, {"type": "unchanged"}):
            raise error(400, "Invalid billing_cycle_anchor", param="billing_cycle_anchor")
        proration = body.get("proration_behavior", "create_prorations")
        now = int(time.time())
        previous["items"] = copy.deepcopy(subscription["items"])
        start, end = item["current_period_start"], item["current_period_end"]
        item["price"] = copy.deepcopy(price)
        charge: tuple[int, str] | None = None
        if anchor == {"type": "now"}:
            item["current_period_start"] = now
            item["current_period_end"] = now + self._period_s(price)
            subscription["billing_cycle_anchor"] = now
            if proration == "none":
                charge = (price["unit_amount"], "subscription_update")
        if proration == "always_invoice":
            left = max(end - now, 0) / max(end - start, 1)
            difference = round((price["unit_amount"] - old["unit_amount"]) * left)
            if difference > 0:
                charge = (difference, "subscription_update")
        if charge is not None:
            self._invoice(
                subscription, amount=charge[0], reason=charge[1], payment_method="pm_card_visa"
            )

    def _cancel_subscription(self, body: Json, path: dict[str, str]) -> Json:
        subscription = self._subscription(path["subscription_exposed_id"])
        if subscription["status"] == "canceled":
            raise self._error()(
                404,
                f"No such subscription: '{subscription['id']}'",
                code="resource_missing",
                param="subscription_exposed_id",
            )
        now = int(time.time())
        subscription.update(
            {
                "status": "canceled",
                "canceled_at": now,
                "ended_at": now,
                "cancel_at_period_end": False,
            }
        )
        self._emit("customer.subscription.deleted", subscription)
        return self._respond(subscription, body)

    def _create_portal_session(self, body: Json, path: dict[str, str]) -> Json:
        customer = body["customer"]
        if not any(s["customer"] == customer for s in self.subscriptions.values()):
            raise self._missing("customer", customer, "customer")
        portal = self._fixture("billing_portal.session")
        portal_id = self._new_id("bps_1")
        portal.update(
            {
                "id": portal_id,
                "created": int(time.time()),
                "customer": customer,
                "livemode": False,
                "return_url": body.get("return_url"),
                "url": f"https://billing.stripe.com/p/session/test_{portal_id}",
            }
        )
        self.portal_sessions[portal_id] = portal
        return self._respond(portal, body)
