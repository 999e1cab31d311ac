"""A fake of Stripe's API, for tests: the real SDK talks to it over loopback.

It speaks Stripe's wire format (form-encoded bodies in bracket notation, Bearer auth, JSON
objects shaped like Stripe's, Stripe's error envelope with a ``Request-Id`` header, idempotency
keys) and checks every request against Stripe's published OpenAPI description
(``tests/fakes/stripe_spec.py``); departures are kept in ``violations`` and answered with a 400
as Stripe would. Tests assert that ``violations`` is empty.

It is stateful, with the behaviour of the API version the SDK pins (2022-11-15 and later): a
PaymentIntent carries ``latest_charge`` and no ``charges`` list, and a Checkout Session in
payment mode gets its PaymentIntent only when the customer pays.

Methods on ``FakeStripe`` stand in for the customer and for Stripe's own clock (``pay``,
``complete_action``, ``expire_session``), make the next calls fail (``fail_next``), and build
signed webhook deliveries from the events the state changes produced (``signed_delivery``).
The server runs in another thread: every state change holds one lock.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import secrets
import string
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.openapi_check import Violation
from tests.fakes.server import serve_in_thread
from tests.fakes.stripe_billing import StripeBilling
from tests.fakes.stripe_spec import (
    DecodeError,
    StripeSpec,
    decode_brackets,
    decode_form,
    load_fixtures,
)

Json = dict[str, Any]
FaultKind = Literal["decline", "rate_limit", "server_error", "hang"]

# Stripe's test payment methods and what confirming with them does.
CARD_OUTCOMES: dict[str, tuple[str, str | None]] = {
    "pm_card_visa": ("succeeds", None),
    "pm_card_mastercard": ("succeeds", None),
    "pm_card_chargeDeclined": ("declines", "generic_decline"),
    "pm_card_chargeDeclinedInsufficientFunds": ("declines", "insufficient_funds"),
    "pm_card_chargeDeclinedLostCard": ("declines", "lost_card"),
    "pm_card_threeDSecure2Required": ("requires_action", None),
    "pm_card_authenticationRequired": ("requires_action", None),
}
DECLINE_MESSAGES = {
    "generic_decline": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "lost_card": "Your card was declined.",
}
# Fields that `expand` may replace by the object, per object type: (field, stored as).
EXPANDABLE: dict[str, dict[str, str]] = {
    "checkout.session": {"payment_intent": "payment_intent", "subscription": "subscription"},
    "payment_intent": {"latest_charge": "charge"},
    "subscription": {"latest_invoice": "invoice"},
    "charge": {"payment_intent": "payment_intent"},
    "refund": {"charge": "charge", "payment_intent": "payment_intent"},
}
_ALPHABET = string.ascii_letters + string.digits
# Ids need to be unique and shaped like Stripe's, not unpredictable: a PRNG seeded once from
# the OS. (``secrets.choice`` per character, a system call each, was a sixth of the fake's CPU
# per Checkout Session under the bench's load.)
_ID_RANDOM = random.Random()


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(_ID_RANDOM.choices(_ALPHABET, k=length))


class StripeErrorResponse(Exception):
    """Raised inside a handler: answered as Stripe's error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error: Json = {"type": type, "message": message, **fields}
        if code:
            self.error["code"] = code
            self.error["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
        if param:
            self.error["param"] = param
        self.headers = headers or {}


@dataclass
class Fault:
    kind: FaultKind
    path_prefix: str | None = None
    retry_after: int | None = None
    decline_code: str = "insufficient_funds"


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: Json
    body: Json
    idempotency_key: str | None
    stripe_version: str | None
    status: int = 0
    replayed: bool = False


@dataclass
class _Saved:
    method: str
    path: str
    params: str
    status: int
    body: bytes


@dataclass
class FakeStripe(StripeBilling):
    """Stripe's API, in memory. ``app`` is the ASGI app; ``url`` is set once it is served.
    Billing (products, prices, subscriptions, invoices) is in ``tests.fakes.stripe_billing``."""

    api_key: str = "sk_test_fake_0123456789"
    url: str = ""
    hang_limit_s: float = 10.0
    payment_intents: dict[str, Json] = field(default_factory=dict)
    sessions: dict[str, Json] = field(default_factory=dict)
    charges: dict[str, Json] = field(default_factory=dict)
    refunds: dict[str, Json] = field(default_factory=dict)
    refunds_pending: bool = False  # new refunds start pending (an asynchronous method)
    events: list[Json] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._faults: deque[Fault] = deque()
        self._release = threading.Event()
        self._idempotency: dict[tuple[str, str], _Saved] = {}
        # What Stripe keeps about a session but does not show, and which intents sessions made.
        self._session_private: dict[str, Json] = {}
        self._intent_session: dict[str, str] = {}
        self._init_billing()
        self._spec = StripeSpec.load()
        self._fixtures = load_fixtures()
        self.app = Starlette(
            routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "DELETE"])]
        )
        self._routes: dict[tuple[str, str], Callable[[Json, dict[str, str]], Json]] = {
            ("post", "/v1/payment_intents"): self._create_payment_intent,
            ("get", "/v1/payment_intents/{intent}"): self._retrieve_payment_intent,
            ("post", "/v1/payment_intents/{intent}/capture"): self._capture_payment_intent,
            ("post", "/v1/payment_intents/{intent}/cancel"): self._cancel_payment_intent,
            ("post", "/v1/checkout/sessions"): self._create_session,
            ("get", "/v1/checkout/sessions/{session}"): self._retrieve_session,
            ("post", "/v1/checkout/sessions/{session}/expire"): self._expire_session_api,
            ("post", "/v1/refunds"): self._create_refund,
            ("get", "/v1/refunds/{refund}"): self._retrieve_refund,
            ("get", "/v1/charges/{charge}"): self._retrieve_charge,
            ("get", "/v1/balance"): self._retrieve_balance,
            **self._billing_routes(),
        }

    # -- controls for tests ----------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything, as a fresh account would."""
        with self._lock:
            self.release_hangs()
            self.payment_intents.clear()
            self.sessions.clear()
            self.charges.clear()
            self.refunds.clear()
            self.events.clear()
            self.requests.clear()
            self.violations.clear()
            self._faults.clear()
            self.refunds_pending = False
            self._idempotency.clear()
            self._session_private.clear()
            self._intent_session.clear()
            self._reset_billing()
            self._release = threading.Event()

    def fail_next(
        self,
        kind: FaultKind,
        times: int = 1,
        *,
        path_prefix: str | None = None,
        retry_after: int | None = None,
        decline_code: str = "insufficient_funds",
    ) -> None:
        """Make the next ``times`` API calls (optionally only those under ``path_prefix``)
        decline (402 card_error), rate-limit (429, with ``Retry-After`` when given), fail
        (500) or hang until ``release_hangs`` (or ``hang_limit_s``)."""
        with self._lock:
            for _ in range(times):
                self._faults.append(Fault(kind, path_prefix, retry_after, decline_code))

    def release_hangs(self) -> None:
        self._release.set()

    def settle_refund(self, refund_id: str, *, succeed: bool) -> Json:
        """End a pending refund as Stripe would: succeeded (refund.updated) or failed
        (refund.failed, the charge's refunded amount given back)."""
        with self._lock:
            refund = self.refunds[refund_id]
            refund["status"] = "succeeded" if succeed else "failed"
            if not succeed:
                refund["failure_reason"] = "expired_or_canceled_card"
                charge = self.charges[refund["charge"]]
                charge["amount_refunded"] -= refund["amount"]
                charge["refunded"] = charge["amount_refunded"] >= charge["amount_captured"]
            self._emit("refund.updated" if succeed else "refund.failed", refund)
            return copy.deepcopy(refund)

    def clear_faults(self) -> None:
        """Drop the faults still queued by ``fail_next``: Stripe is well again."""
        with self._lock:
            self._faults.clear()

    def calls(self, method: str, path: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    def pay(self, payment_id: str, payment_method: str = "pm_card_visa") -> Json:
        """The customer pays ``payment_id`` (a Checkout Session or a PaymentIntent) with one
        of Stripe's test payment methods. Returns the PaymentIntent."""
        with self._lock:
            if payment_id.startswith("cs_"):
                session = self._session(payment_id)
                if session["status"] != "open":
                    raise ValueError(f"session {payment_id} is {session['status']}")
                intent = self._session_intent(session)
            else:
                intent = self._intent(payment_id)
            self._confirm(intent, payment_method)
            return copy.deepcopy(intent)

    def complete_action(self, payment_id: str, *, succeed: bool = True) -> Json:
        """The customer finishes (or fails) 3-D Secure on a ``requires_action`` payment."""
        with self._lock:
            intent = self._intent_for(payment_id)
            if intent["status"] != "requires_action":
                raise ValueError(f"payment intent {intent['id']} is {intent['status']}")
            self._confirm(
                intent, "pm_card_visa" if succeed else "pm_card_chargeDeclined", authenticated=True
            )
            return copy.deepcopy(intent)

    def expire_session(self, session_id: str) -> Json:
        """Stripe's clock: the session's 24 hours are over."""
        with self._lock:
            return copy.deepcopy(self._expire(self._session(session_id)))

    def set_charge_metadata(self, payment_id: str, metadata: dict[str, str]) -> None:
        with self._lock:
            intent = self._intent_for(payment_id)
            self.charges[intent["latest_charge"]]["metadata"] = dict(metadata)

    def events_of(self, event_type: str) -> list[Json]:
        with self._lock:
            return [copy.deepcopy(e) for e in self.events if e["type"] == event_type]

    def last_event(self, event_type: str) -> Json:
        found = self.events_of(event_type)
        if not found:
            seen = sorted({e["type"] for e in self.events})
            raise LookupError(f"no {event_type} event; the fake emitted {seen}")
        return found[-1]

    def build_event(self, event_type: str, obj: Json) -> Json:
        """An event of any type around ``obj``, shaped as Stripe sends them."""
        return {
            "id": new_id("evt_"),
            "object": "event",
            "api_version": stripe.api_version,
            "created": int(time.time()),
            "data": {"object": copy.deepcopy(obj)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }

    @staticmethod
    def signed_delivery(
        event: Json, secret: str, *, timestamp: int | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """The body and headers of Stripe's POST delivering ``event`` to an endpoint whose
        signing secret is ``secret``."""
        payload = json.dumps(event, indent=2)  # Stripe pretty-prints its deliveries
        header = stripe.WebhookSignature.generate_signature_header(
            payload, secret, timestamp=timestamp
        )
        return payload.encode(), {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": header,
        }

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        request_id = new_id("req_", 14)
        headers = {"Request-Id": request_id}
        method = request.method.lower()
        path = request.url.path
        raw_body = await request.body()
        record = RecordedRequest(
            method=request.method,
            path=path,
            query={},
            body={},
            idempotency_key=request.headers.get("idempotency-key"),
            stripe_version=request.headers.get("stripe-version"),
        )
        with self._lock:
            self.requests.append(record)
        try:
            self._authenticate(request.headers.get("authorization"))
            query_pairs = list(request.query_params.multi_items())
            try:
                query = decode_brackets(query_pairs)
                body = decode_form(raw_body) if raw_body else {}
            except (DecodeError, UnicodeDecodeError, ValueError) as error:
                with self._lock:
                    self.violations.append(Violation(request.method, path, str(error)))
                raise StripeErrorResponse(400, f"Invalid request: {error}") from None
            operation, query, body, violations = self._spec.validate(
                request.method, path, query, body
            )
            record.query, record.body = query, body
            if violations:
                with self._lock:
                    self.violations.extend(violations)
                if operation is None:
                    raise StripeErrorResponse(
                        404, f"Unrecognized request URL ({request.method}: {path})."
                    )
                raise StripeErrorResponse(
                    400, "; ".join(v.problem for v in violations), code="parameter_unknown"
                )
            assert operation is not None
            await self._inject_fault(path)
            handler = self._routes.get((method, operation.template))
            if handler is None:
                with self._lock:
                    self.violations.append(
                        Violation(request.method, path, "valid, but the fake does not serve it")
                    )
                raise StripeErrorResponse(501, "Not implemented by the fake", type="api_error")
            status, content, replayed = self._idempotent(
                method,
                path,
                {**query, **body},
                record.idempotency_key,
                lambda params: handler(params, operation.path_params),
            )
            record.replayed = replayed
            if replayed:
                headers["Idempotent-Replayed"] = "true"
        except StripeErrorResponse as error:
            status = error.status
            error.error["request_log_url"] = (
                f"https://dashboard.stripe.com/test/logs/{request_id}?t={int(time.time())}"
            )
            content = json.dumps({"error": error.error}, indent=2).encode()
            headers.update(error.headers)
        record.status = status
        if record.idempotency_key:
            headers["Idempotency-Key"] = record.idempotency_key
        if record.stripe_version:
            headers["Stripe-Version"] = record.stripe_version
        return Response(content, status_code=status, headers=headers, media_type="application/json")

    def _authenticate(self, authorization: str | None) -> None:
        if not authorization:
            raise StripeErrorResponse(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY').",
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key, self.api_key):
            masked = f"{key[:8]}{'*' * max(len(key) - 12, 0)}{key[-4:]}" if key else ""
            raise StripeErrorResponse(401, f"Invalid API Key provided: {masked}")

    async def _inject_fault(self, path: str) -> None:
        with self._lock:
            fault = next(
                (
                    f
                    for f in self._faults
                    if f.path_prefix is None or path.startswith(f.path_prefix)
                ),
                None,
            )
            if fault is not None:
                self._faults.remove(fault)
            release = self._release
        if fault is None:
            return
        if fault.kind == "rate_limit":
            raise StripeErrorResponse(
                429,
                "Request rate limit exceeded. Learn more about rate limits here "
                "https://stripe.com/docs/rate-limits.",
                code="rate_limit",
                headers={"Retry-After": str(fault.retry_after)}
                if fault.retry_after is not None
                else {},
            )
        if fault.kind == "server_error":
            raise StripeErrorResponse(
                500,
                "An unknown error occurred",
                type="api_error",
                headers={"Stripe-Should-Retry": "true"},
            )
        if fault.kind == "decline":
            raise StripeErrorResponse(
                402,
                DECLINE_MESSAGES.get(fault.decline_code, "Your card was declined."),
                type="card_error",
                code="card_declined",
                decline_code=fault.decline_code,
                charge=new_id("ch_"),
            )
        # hang: answer nothing until released; the client is expected to time out first
        await asyncio.to_thread(release.wait, self.hang_limit_s)
        raise StripeErrorResponse(500, "An unknown error occurred", type="api_error")

    def _idempotent(
        self,
        method: str,
        path: str,
        params: Json,
        key: str | None,
        handler: Callable[[Json], Json],
    ) -> tuple[int, bytes, bool]:
        """Run ``handler`` once per idempotency key: the same key with the same parameters
        replays the first answer; with other parameters or another endpoint it is refused."""
        fingerprint = json.dumps(params, sort_keys=True)
        with self._lock:
            saved = self._idempotency.get((self.api_key, key)) if key and method == "post" else None
            if saved is not None:
                if (saved.method, saved.path) != (method, path):
                    raise StripeErrorResponse(
                        400,
                        "Keys for idempotent requests can only be used for the same endpoint "
                        "they were first used for.",
                        type="idempotency_error",
                    )
                if saved.params != fingerprint:
                    raise StripeErrorResponse(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters "
                        f"they were first used with. Try using a key other than '{key}' if you "
                        "meant to execute a different request.",
                        type="idempotency_error",
                    )
                return saved.status, saved.body, True
            try:
                status, content = 200, handler(params)
                encoded = json.dumps(content, indent=2).encode()
            except StripeErrorResponse as error:
                # Stripe saves the result of a request that began executing, errors included.
                status = error.status
                encoded = json.dumps({"error": error.error}, indent=2).encode()
                if key and method == "post":
                    self._idempotency[(self.api_key, key)] = _Saved(
                        method, path, fingerprint, status, encoded
                    )
                raise
            if key and method == "post":
                self._idempotency[(self.api_key, key)] = _Saved(
                    method, path, fingerprint, status, encoded
                )
            return status, encoded, False

    # -- objects ---------------------------------------------------------------------------

    def _fixture(self, name: str) -> Json:
        return copy.deepcopy(self._fixtures[name])

    def _emit(self, event_type: str, obj: Json, previous: Json | None = None) -> None:
        event = self.build_event(event_type, obj)
        if previous:
            event["data"]["previous_attributes"] = previous
        self.events.append(event)

    def _intent(self, intent_id: str) -> Json:
        intent = self.payment_intents.get(intent_id)
        if intent is None:
            raise StripeErrorResponse(
                404,
                f"No such payment_intent: '{intent_id}'",
                code="resource_missing",
                param="intent",
            )
        return intent

    def _session(self, session_id: str) -> Json:
        session = self.sessions.get(session_id)
        if session is None:
            raise StripeErrorResponse(
                404,
                f"No such checkout.session: '{session_id}'",
                code="resource_missing",
                param="session",
            )
        return session

    def _intent_for(self, payment_id: str) -> Json:
        if payment_id.startswith("cs_"):
            intent_id = self._session(payment_id)["payment_intent"]
            if intent_id is None:
                raise ValueError(f"session {payment_id} has no payment intent yet")
            return self._intent(intent_id)
        return self._intent(payment_id)

    def _expand(self, obj: Json, paths: list[str]) -> Json:
        if not paths:
            # Answers are serialized under the lock that guards every change to the objects.
            return obj
        result = copy.deepcopy(obj)
        for path in paths:
            self._expand_one(result, path.split("."), path)
        return result

    def _expand_one(self, obj: Json, parts: list[str], full: str) -> None:
        head, rest = parts[0], parts[1:]
        stored_as = EXPANDABLE.get(obj.get("object", ""), {}).get(head)
        if stored_as is None:
            raise StripeErrorResponse(
                400, f"This property cannot be expanded ({full}).", param="expand"
            )
        value = obj.get(head)
        if isinstance(value, str):
            store = {
                "payment_intent": self.payment_intents,
                "charge": self.charges,
                "subscription": self.subscriptions,
                "invoice": self.invoices,
            }[stored_as]
            value = copy.deepcopy(store[value])
            obj[head] = value
        if rest and isinstance(value, dict):
            self._expand_one(value, rest, full)

    def _new_intent(
        self,
        *,
        amount: int,
        currency: str,
        capture_method: str,
        metadata: dict[str, str],
        description: str | None = None,
        automatic_payment_methods: Json | None = None,
    ) -> Json:
        intent = self._fixture("payment_intent")
        intent.pop("charges", None)  # gone since API version 2022-11-15
        intent_id = new_id("pi_3")
        intent.update(
            {
                "id": intent_id,
                "amount": amount,
                "amount_capturable": 0,
                "amount_received": 0,
                "automatic_payment_methods": automatic_payment_methods,
                "canceled_at": None,
                "capture_method": capture_method,
                "client_secret": f"{intent_id}_secret_{new_id('', 25)}",
                "created": int(time.time()),
                "currency": currency.lower(),
                "description": description,
                "latest_charge": None,
                "metadata": dict(metadata),
                "status": "requires_payment_method",
            }
        )
        self.payment_intents[intent_id] = intent
        self._emit("payment_intent.created", intent)
        return intent

    def _session_intent(self, session: Json) -> Json:
        """A session's PaymentIntent, created when the customer first confirms."""
        if session["payment_intent"] is not None:
            return self._intent(session["payment_intent"])
        private = self._session_private[session["id"]]
        data = private.get("payment_intent_data", {})
        intent = self._new_intent(
            amount=session["amount_total"],
            currency=session["currency"],
            capture_method=data.get("capture_method", "automatic_async"),
            metadata=data.get("metadata", {}),
            description=data.get("description"),
        )
        self._intent_session[intent["id"]] = session["id"]
        session["payment_intent"] = intent["id"]
        return intent

    def _new_charge(self, intent: Json, *, outcome: str, decline_code: str | None) -> Json:
        charge = self._fixture("charge")
        charge.pop("refunds", None)  # no longer included since API version 2022-11-15
        succeeded = outcome == "succeeds"
        captured = succeeded and intent["capture_method"] != "manual"
        charge.update(
            {
                "id": new_id("ch_3"),
                "amount": intent["amount"],
                "amount_captured": intent["amount"] if captured else 0,
                "amount_refunded": 0,
                "balance_transaction": new_id("txn_3") if captured else None,
                "captured": captured,
                "created": int(time.time()),
                "currency": intent["currency"],
                "description": intent["description"],
                "failure_code": None if succeeded else "card_declined",
                "failure_message": None if succeeded else DECLINE_MESSAGES[decline_code or ""],
                "metadata": {},  # Stripe does not copy the intent's metadata to its charges
                "outcome": {
                    "network_status": "approved_by_network" if succeeded else "declined_by_network",
                    "reason": None if succeeded else decline_code,
                    "risk_level": "normal",
                    "seller_message": "Payment complete." if succeeded else "The bank declined.",
                    "type": "authorized" if succeeded else "issuer_declined",
                },
                "paid": succeeded,
                "payment_intent": intent["id"],
                "payment_method": new_id("pm_1"),
                "refunded": False,
                "status": "succeeded" if succeeded else "failed",
            }
        )
        self.charges[charge["id"]] = charge
        return charge

    def _confirm(self, intent: Json, payment_method: str, *, authenticated: bool = False) -> None:
        if intent["status"] not in ("requires_payment_method", "requires_action"):
            raise ValueError(f"payment intent {intent['id']} is {intent['status']}")
        outcome, decline_code = CARD_OUTCOMES[payment_method]
        if outcome == "requires_action" and not authenticated:
            intent.update(
                {
                    "status": "requires_action",
                    "payment_method": new_id("pm_1"),
                    "next_action": {
                        "type": "use_stripe_sdk",
                        "use_stripe_sdk": {"type": "three_d_secure_redirect"},
                    },
                }
            )
            self._emit("payment_intent.requires_action", intent)
            return
        if outcome == "requires_action":
            outcome = "succeeds"
        charge = self._new_charge(intent, outcome=outcome, decline_code=decline_code)
        intent.update({"latest_charge": charge["id"], "payment_method": charge["payment_method"]})
        intent["next_action"] = None
        if outcome == "declines":
            intent["status"] = "requires_payment_method"  # the customer may try again
            intent["last_payment_error"] = {
                "charge": charge["id"],
                "code": "card_declined",
                "decline_code": decline_code,
                "doc_url": "https://stripe.com/docs/error-codes/card-declined",
                "message": DECLINE_MESSAGES[decline_code or ""],
                "type": "card_error",
            }
            self._emit("charge.failed", charge)
            self._emit("payment_intent.payment_failed", intent)
            return
        intent["last_payment_error"] = None
        if intent["capture_method"] == "manual":
            intent.update({"status": "requires_capture", "amount_capturable": intent["amount"]})
            self._emit("charge.succeeded", charge)
            self._emit("payment_intent.amount_capturable_updated", intent)
        else:
            intent.update({"status": "succeeded", "amount_received": intent["amount"]})
            self._emit("charge.succeeded", charge)
            self._emit("payment_intent.succeeded", intent)
        session_id = self._intent_session.get(intent["id"])
        if session_id:
            session = self.sessions[session_id]
            session.update(
                {
                    "status": "complete",
                    "payment_status": "paid" if intent["status"] == "succeeded" else "unpaid",
                    "customer_details": {
                        "address": None,
                        "email": session["customer_email"] or "customer@example.com",
                        "name": "Jenny Rosen",
                        "phone": None,
                        "tax_exempt": "none",
                        "tax_ids": [],
                    },
                }
            )
            self._emit("checkout.session.completed", session)

    def _expire(self, session: Json) -> Json:
        if session["status"] != "open":
            raise StripeErrorResponse(
                400,
                f'Only Checkout Sessions with a status in ["open"] can be expired. This Checkout '
                f"Session has a status of {session['status']}.",
            )
        session.update({"status": "expired", "url": None})
        if session["payment_intent"]:
            intent = self._intent(session["payment_intent"])
            if intent["status"] in ("requires_payment_method", "requires_action"):
                intent.update(
                    {
                        "status": "canceled",
                        "canceled_at": int(time.time()),
                        "cancellation_reason": "abandoned",
                    }
                )
                self._emit("payment_intent.canceled", intent)
        self._emit("checkout.session.expired", session)
        return session

    # -- endpoints: (body, path params, headers) -> object ---------------------------------

    def _create_payment_intent(self, body: Json, path: dict[str, str]) -> Json:
        if body["amount"] < 50:
            raise StripeErrorResponse(
                400,
                "Amount must be at least €0.50 eur",
                code="amount_too_small",
                param="amount",
            )
        if body.get("confirm"):
            raise StripeErrorResponse(501, "confirm=true is not faked", type="api_error")
        intent = self._new_intent(
            amount=body["amount"],
            currency=body["currency"],
            capture_method=body.get("capture_method", "automatic_async"),
            metadata=body.get("metadata") or {},
            description=body.get("description"),
            automatic_payment_methods=(
                {"allow_redirects": "always", **body["automatic_payment_methods"]}
                if "automatic_payment_methods" in body
                else None
            ),
        )
        return self._respond(intent, body)

    def _respond(self, obj: Json, params: Json) -> Json:
        return self._expand(obj, list(params.get("expand", [])))

    def _retrieve_payment_intent(self, body: Json, path: dict[str, str]) -> Json:
        return self._respond(self._intent(path["intent"]), body)

    def _capture_payment_intent(self, body: Json, path: dict[str, str]) -> Json:
        intent = self._intent(path["intent"])
        if intent["status"] != "requires_capture":
            raise StripeErrorResponse(
                400,
                f"This PaymentIntent could not be captured because it has a status of "
                f"{intent['status']}. Only a PaymentIntent with one of the following statuses "
                "may be captured: requires_capture.",
                code="payment_intent_unexpected_state",
                payment_intent=intent,
            )
        # amount_to_capture: part of the authorization (the rest is released), never more.
        # Stripe's refusal as merchants have logged it: amount_too_large, with the intent
        # (still requires_capture).
        amount = body.get("amount_to_capture", intent["amount_capturable"])
        if amount > intent["amount_capturable"]:
            raise StripeErrorResponse(
                400,
                "The payment could not be captured because the requested capture amount is "
                "greater than the authorized amount. If you are trying to collect a tip or "
                "over-capture, your account might not be configured for those features. Contact "
                "us via https://support.stripe.com/contact/",
                code="amount_too_large",
                param="amount_to_capture",
                payment_intent=intent,
            )
        charge = self.charges[intent["latest_charge"]]
        charge.update(
            {
                "captured": True,
                "amount_captured": amount,
                "balance_transaction": new_id("txn_3"),
            }
        )
        intent.update({"status": "succeeded", "amount_received": amount, "amount_capturable": 0})
        self._emit("charge.captured", charge)
        self._emit("payment_intent.succeeded", intent)
        session_id = self._intent_session.get(intent["id"])
        if session_id:
            self.sessions[session_id]["payment_status"] = "paid"
        return self._respond(intent, body)

    def _cancel_payment_intent(self, body: Json, path: dict[str, str]) -> Json:
        intent = self._intent(path["intent"])
        cancelable = (
            "requires_payment_method",
            "requires_capture",
            "requires_confirmation",
            "requires_action",
            "processing",
        )
        if intent["status"] not in cancelable:
            raise StripeErrorResponse(
                400,
                f"You cannot cancel this PaymentIntent because it has a status of "
                f"{intent['status']}. Only a PaymentIntent with one of the following statuses "
                f"may be canceled: {', '.join(cancelable)}.",
                code="payment_intent_unexpected_state",
                payment_intent=intent,
            )
        if self._intent_session.get(intent["id"]) and intent["status"] != "requires_capture":
            raise StripeErrorResponse(
                400,
                f"You cannot cancel this PaymentIntent because it has a status of "
                f"{intent['status']}. You can only cancel a PaymentIntent created by a Checkout "
                "Session when the PaymentIntent has a status of requires_capture. Instead, "
                "expire the Checkout Session.",
                code="payment_intent_unexpected_state",
                payment_intent=intent,
            )
        if intent["status"] == "requires_capture":
            # The authorization is released: the uncaptured charge shows as refunded.
            charge = self.charges[intent["latest_charge"]]
            charge.update({"amount_refunded": charge["amount"], "refunded": True})
        intent.update(
            {
                "status": "canceled",
                "amount_capturable": 0,
                "canceled_at": int(time.time()),
                "cancellation_reason": body.get("cancellation_reason", "requested_by_customer"),
            }
        )
        self._emit("payment_intent.canceled", intent)
        return self._respond(intent, body)

    def _create_session(self, body: Json, path: dict[str, str]) -> Json:
        mode = body.get("mode")
        if mode == "subscription":
            return self._create_subscription_session(body)
        if mode != "payment":
            raise StripeErrorResponse(
                400, "The fake serves Checkout Sessions in payment mode only", param="mode"
            )
        items = body.get("line_items") or []
        if not items:
            raise StripeErrorResponse(
                400,
                "You must provide at least one line item in `payment` mode.",
                param="line_items",
            )
        total, currencies = 0, set()
        for index, item in enumerate(items):
            price = item.get("price_data")
            if price is None or "unit_amount" not in price or "product_data" not in price:
                raise StripeErrorResponse(
                    400,
                    "The fake needs price_data with unit_amount and product_data",
                    param=f"line_items[{index}][price_data]",
                )
            total += price["unit_amount"] * item.get("quantity", 1)
            currencies.add(price["currency"].lower())
        if len(currencies) != 1:
            raise StripeErrorResponse(
                400, "All line items must share one currency", param="line_items"
            )
        session = self._fixture("checkout.session")
        session_id = new_id("cs_test_a1", 56)
        session.update(
            {
                "id": session_id,
                "amount_subtotal": total,
                "amount_total": total,
                "cancel_url": body.get("cancel_url"),
                "client_reference_id": body.get("client_reference_id"),
                "created": int(time.time()),
                "currency": currencies.pop(),
                "customer_email": body.get("customer_email"),
                "expires_at": int(time.time()) + 24 * 3600,
                "metadata": body.get("metadata") or {},
                "mode": "payment",
                "payment_intent": None,  # created when the customer confirms
                "payment_status": "unpaid",
                "status": "open",
                "success_url": body.get("success_url"),
                "ui_mode": "hosted",
                "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            }
        )
        self.sessions[session_id] = session
        self._session_private[session_id] = {
            "payment_intent_data": body.get("payment_intent_data") or {},
            "line_items": items,
        }
        return self._respond(session, body)

    def _retrieve_session(self, body: Json, path: dict[str, str]) -> Json:
        return self._respond(self._session(path["session"]), body)

    def _expire_session_api(self, body: Json, path: dict[str, str]) -> Json:
        return self._respond(self._expire(self._session(path["session"])), body)

    def _create_refund(self, body: Json, path: dict[str, str]) -> Json:
        if "payment_intent" in body:
            intent = self._intent(body["payment_intent"])
            charge_id = intent["latest_charge"]
            charge = self.charges.get(charge_id) if charge_id else None
            if charge is None or intent["status"] != "succeeded":
                raise StripeErrorResponse(
                    400,
                    f"This PaymentIntent ({intent['id']}) does not have a successful charge "
                    "to refund.",
                    param="payment_intent",
                )
        elif "charge" in body:
            charge = self.charges.get(body["charge"])
            if charge is None:
                raise StripeErrorResponse(
                    404,
                    f"No such charge: '{body['charge']}'",
                    code="resource_missing",
                    param="charge",
                )
        else:
            raise StripeErrorResponse(
                400, "One of `charge` or `payment_intent` is required.", param="charge"
            )
        if charge["refunded"]:
            raise StripeErrorResponse(
                400,
                f"Charge {charge['id']} has already been refunded.",
                code="charge_already_refunded",
            )
        remaining = charge["amount_captured"] - charge["amount_refunded"]
        amount = body.get("amount", remaining)
        if amount <= 0:
            raise StripeErrorResponse(
                400, "Invalid positive integer", code="parameter_invalid_integer", param="amount"
            )
        if amount > remaining:
            symbol = "€" if charge["currency"] == "eur" else charge["currency"].upper() + " "
            raise StripeErrorResponse(
                400,
                f"Refund amount ({symbol}{amount / 100:.2f}) is greater than unrefunded amount "
                f"on charge ({symbol}{remaining / 100:.2f})",
                code="amount_too_large",
                param="amount",
            )
        refund = self._fixture("refund")
        refund.update(
            {
                "id": new_id("re_3"),
                "amount": amount,
                "charge": charge["id"],
                "created": int(time.time()),
                "currency": charge["currency"],
                "metadata": body.get("metadata") or {},
                "payment_intent": charge["payment_intent"],
                "reason": body.get("reason"),
                # Some methods refund asynchronously: pending until settle_refund says.
                "status": "pending" if self.refunds_pending else "succeeded",
            }
        )
        self.refunds[refund["id"]] = refund
        previous = {"amount_refunded": charge["amount_refunded"], "refunded": charge["refunded"]}
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] >= charge["amount_captured"]
        self._emit("refund.created", refund)
        self._emit("charge.refunded", charge, previous)
        return self._respond(refund, body)

    def _retrieve_refund(self, body: Json, path: dict[str, str]) -> Json:
        refund = self.refunds.get(path["refund"])
        if refund is None:
            raise StripeErrorResponse(
                404, f"No such refund: '{path['refund']}'", code="resource_missing", param="id"
            )
        return self._respond(refund, body)

    def _retrieve_charge(self, body: Json, path: dict[str, str]) -> Json:
        charge = self.charges.get(path["charge"])
        if charge is None:
            raise StripeErrorResponse(
                404, f"No such charge: '{path['charge']}'", code="resource_missing", param="id"
            )
        return self._respond(charge, body)

    def _retrieve_balance(self, body: Json, path: dict[str, str]) -> Json:
        return self._fixture("balance")


@contextmanager
def running_fake_stripe(api_key: str = "sk_test_fake_0123456789") -> Iterator[FakeStripe]:
    """A ``FakeStripe`` served on a free loopback port until the block ends."""
    fake = FakeStripe(api_key=api_key)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.release_hangs()  # a hung handler would hold the server's shutdown
