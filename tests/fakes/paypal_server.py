"""A fake of PayPal's REST API, for tests: the real ``PayPalProvider`` talks to it over
loopback.

It speaks PayPal's wire format: OAuth2 client credentials (``POST /v1/oauth2/token``, Basic
auth, Bearer tokens that expire), Orders v2 (create, get, capture), Payments v2 (get capture,
refund a capture, get refund), Webhooks v1 ``verify-webhook-signature`` and, for the sales that
bill subscriptions, Payments v1 (get and refund a sale, get a refund: ``paypal_billing``);
JSON bodies shaped like PayPal's, PayPal's error envelope (``name``, ``message``,
``details[].issue``, ``debug_id``) and a ``Paypal-Debug-Id`` header on every answer;
``PayPal-Request-Id`` idempotency (the same ID replays the first answer); ``Prefer:
return=minimal`` (PayPal's default) or ``return=representation``.

Every request is checked against PayPal's published OpenAPI descriptions and every answer
the fake gives is checked too (``tests/fakes/paypal_spec.py``); departures are kept in
``violations`` (a request that departs is answered 400 ``INVALID_REQUEST``, as PayPal
would). Tests assert that ``violations`` is empty.

It is stateful: an order waits for the buyer (``approve`` stands in for them, as does a GET
of the approval link), capture completes it with one capture, refunds add up on the capture
and an over-refund is refused with PayPal's issue code. State changes emit the webhook events
PayPal would send; ``signed_delivery`` turns one into the body and headers of a delivery,
signed the way PayPal signs them (RSA-SHA256 over ``transmission id|time|webhook id|CRC32 of
the body``) with a certificate of the fake's own, and ``verify-webhook-signature`` checks that
signature for real, so a forged or altered delivery fails as it would at PayPal.

Controls make the next calls fail (``fail_next``: 429 with Retry-After, 500, 503, or a hang
before or after the work is done), decline the next capture (``decline_next_capture``),
expire every token (``expire_tokens``) or void an order (``void``). The server runs in another
thread: every state change holds one lock.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import secrets
import string
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tests.fakes.openapi_check import Operation, Violation
from tests.fakes.paypal_billing import PayPalBilling, is_billing_path
from tests.fakes.paypal_spec import PayPalSpec, check_token_request
from tests.fakes.server import serve_in_thread

Json = dict[str, Any]
FaultKind = Literal["rate_limit", "server_error", "unavailable", "hang", "hang_after"]
CaptureOutcome = Literal["instrument_declined", "capture_declined"]
# A route: (the request, its JSON body, its path parameters) -> (status, answer).
Handler = Callable[[Request, Json | None, dict[str, str]], tuple[int, Json]]

_ID_ALPHABET = string.ascii_uppercase + string.digits
# PayPal's currencies and how many decimals it takes for each (developer.paypal.com, "Currency
# codes"): HUF, JPY and TWD take none, every other one two.
CURRENCY_DECIMALS = {
    **dict.fromkeys(
        ("AUD", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "EUR", "GBP", "HKD", "ILS"),
        2,
    ),
    **dict.fromkeys(("MXN", "MYR", "NOK", "NZD", "PHP", "PLN", "SEK", "SGD", "THB", "USD"), 2),
    "HUF": 0,
    "JPY": 0,
    "TWD": 0,
}
CERT_BASE = "https://api.sandbox.paypal.com/v1/notifications/certs"
MERCHANT = {"email_address": "merchant@example.com", "merchant_id": "7KNGBPH2U58GQ"}
BUYER = {
    "name": {"given_name": "John", "surname": "Doe"},
    "email_address": "buyer@example.com",
    "payer_id": "QYR5Z8XDVJNXQ",
    "address": {"country_code": "DE"},
}

# PayPal's error envelopes: (name, message) per status, worded as in its descriptions.
ERROR_NAMES: dict[int, tuple[str, str]] = {
    400: (
        "INVALID_REQUEST",
        "Request is not well-formed, syntactically incorrect, or violates schema.",
    ),
    401: (
        "AUTHENTICATION_FAILURE",
        "Authentication failed due to missing authorization header, or invalid authentication "
        "credentials.",
    ),
    404: ("RESOURCE_NOT_FOUND", "The specified resource does not exist."),
    422: (
        "UNPROCESSABLE_ENTITY",
        "The requested action could not be performed, semantically incorrect, or failed "
        "business validation.",
    ),
    429: ("RATE_LIMIT_REACHED", "Too many requests. Blocked due to rate limiting."),
    500: ("INTERNAL_SERVER_ERROR", "An internal server error occurred."),
    503: ("SERVICE_UNAVAILABLE", "Service Unavailable."),
}
# Issue descriptions, word for word as the descriptions list them (they are enums there).
ISSUES: dict[str, str] = {
    "ORDER_NOT_APPROVED": (
        "Payer has not yet approved the Order for payment. Please redirect the payer to the "
        "'rel':'approve' url returned as part of the HATEOAS links within the Create Order "
        "call or provide a valid `payment_source` in the request."
    ),
    "ORDER_ALREADY_CAPTURED": (
        "Order already captured.If 'intent=CAPTURE' only one capture per order is allowed."
    ),
    "INSTRUMENT_DECLINED": (
        "The instrument presented  was either declined by the processor or bank, or it can't "
        "be used for this payment."
    ),
    "INVALID_RESOURCE_ID": (
        "Specified resource ID does not exist. Please check the resource ID and try again."
    ),
    "REFUND_AMOUNT_EXCEEDED": (
        "The refund amount must be less than or equal to the capture amount that has not yet "
        "been refunded."
    ),
    "CAPTURE_FULLY_REFUNDED": "The capture has already been fully refunded",
    "REFUND_CAPTURE_CURRENCY_MISMATCH": "Refund must be in the same currency as the capture",
    "REFUND_NOT_ALLOWED": "Capture cannot be refunded.",
    "DECIMAL_PRECISION": (
        "If the currency supports decimals, only two decimal place precision is supported."
    ),
    "INVALID_CURRENCY_CODE": (
        "Currency code is invalid or is not currently supported. Please refer "
        "https://developer.paypal.com/api/rest/reference/currency-codes/ for list of supported "
        "currency codes."
    ),
    "CANNOT_BE_ZERO_OR_NEGATIVE": (
        "Must be greater than zero. If the currency supports decimals, only two decimal place "
        "precision is supported."
    ),
    "PAYPAL_REQUEST_ID_REQUIRED": (
        "A PayPal-Request-Id is required if you are trying to process payment for an Order. "
        "Please specify a PayPal-Request-Id or Create the Order without a 'payment_source' "
        "specified."
    ),
    "INVALID_PARAMETER_VALUE": "A parameter value is not valid.",
}


def new_id(length: int = 17) -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_minor(value: str, currency: str) -> int:
    """PayPal's decimal string in the currency's smallest PayPal unit (cents, or yen)."""
    return int(Decimal(value).scaleb(CURRENCY_DECIMALS[currency]))


def to_value(minor: int, currency: str) -> str:
    places = CURRENCY_DECIMALS[currency]
    return f"{Decimal(minor).scaleb(-places):.{places}f}"


def money(minor: int, currency: str) -> Json:
    return {"currency_code": currency, "value": to_value(minor, currency)}


class PayPalError(Exception):
    """Raised inside a handler: answered as PayPal's error envelope."""

    def __init__(
        self,
        status: int,
        *,
        issue: str | None = None,
        field: str | None = None,
        location: str = "body",
        headers: dict[str, str] | None = None,
        links: list[Json] | None = None,
    ) -> None:
        name, message = ERROR_NAMES[status]
        super().__init__(f"{status} {name} {issue or ''}")
        self.status = status
        self.body: Json = {"name": name, "message": message}
        if issue is not None:
            detail: Json = {"issue": issue, "description": ISSUES.get(issue, issue)}
            if field is not None:
                detail["field"] = field
                detail["location"] = location
            self.body["details"] = [detail]
        if links is not None:
            self.body["links"] = links
        self.headers = headers or {}


# -- webhook signing ---------------------------------------------------------------------------


class WebhookSigner:
    """An RSA key and a self-signed X.509 certificate, signing webhook deliveries the way
    PayPal documents: base64(RSA-SHA256("<transmission id>|<transmission time>|<webhook
    id>|<CRC32 of the body, decimal>")). The fake holds PayPal's own; a test can make another
    to forge with."""

    def __init__(self, common_name: str = "messageverificationcerts.paypal.com") -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.now(UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .sign(self._key, hashes.SHA256())
        )
        self.cert_id = f"CERT-{secrets.token_hex(4)}-{secrets.token_hex(4)}-{secrets.token_hex(4)}"

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(
        self, body: bytes, *, transmission_id: str, transmission_time: str, webhook_id: str
    ) -> str:
        message = f"{transmission_id}|{transmission_time}|{webhook_id}|{zlib.crc32(body)}"
        signature = self._key.sign(message.encode(), padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode()


def verify_transmission(
    certificate: x509.Certificate,
    body: bytes,
    *,
    transmission_id: str,
    transmission_time: str,
    webhook_id: str,
    signature: str,
) -> bool:
    message = f"{transmission_id}|{transmission_time}|{webhook_id}|{zlib.crc32(body)}"
    try:
        raw = base64.b64decode(signature, validate=True)
    except ValueError:
        return False
    public_key = certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        return False
    try:
        public_key.verify(raw, message.encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


_WS = re.compile(r"[ \t\n\r]*")


def raw_member(document: str, name: str) -> str | None:
    """The text of member ``name`` of the JSON object ``document``, exactly as written.

    verify-webhook-signature checks the CRC32 of the event's own bytes, so the fake reads
    them as they came rather than re-serializing what it parsed (which is why a client that
    re-serializes the event fails at PayPal too)."""
    decoder = json.JSONDecoder()
    index = _WS.match(document, 0).end()  # type: ignore[union-attr]
    if document[index : index + 1] != "{":
        return None
    index = _WS.match(document, index + 1).end()  # type: ignore[union-attr]
    while document[index : index + 1] == '"':
        key, index = json.decoder.scanstring(document, index + 1)  # type: ignore[attr-defined]
        index = _WS.match(document, index).end()  # type: ignore[union-attr]
        if document[index : index + 1] != ":":
            return None
        index = _WS.match(document, index + 1).end()  # type: ignore[union-attr]
        _, end = decoder.raw_decode(document, index)
        if key == name:
            return document[index:end]
        index = _WS.match(document, end).end()  # type: ignore[union-attr]
        if document[index : index + 1] != ",":
            return None
        index = _WS.match(document, index + 1).end()  # type: ignore[union-attr]
    return None


# -- the fake ----------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: FaultKind
    path_prefix: str | None = None
    retry_after: int | None = None


@dataclass
class RecordedRequest:
    method: str
    path: str
    request_id: str | None
    body: Json | None
    status: int = 0
    replayed: bool = False
    debug_id: str | None = None


@dataclass
class FakePayPal(PayPalBilling):
    """PayPal's API, in memory. ``app`` is the ASGI app; ``url`` is set once it is served.
    Subscriptions (catalog products, plans, subscriptions) are in ``tests.fakes.paypal_billing``,
    checked against PayPal's reference pages: ``shared/specs`` has no description of them."""

    client_id: str
    client_secret: str
    url: str = ""
    token_ttl_s: int = 32400
    # True: the API refuses every token, even fresh ones (the REST app lost its access).
    tokens_refused: bool = False
    hang_limit_s: float = 10.0
    orders: dict[str, Json] = field(default_factory=dict)
    captures: dict[str, Json] = field(default_factory=dict)
    refunds: dict[str, Json] = field(default_factory=dict)
    events: list[Json] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._faults: deque[Fault] = deque()
        self._capture_outcomes: deque[CaptureOutcome] = deque()
        self._release = threading.Event()
        self._tokens: dict[str, float] = {}
        self._idempotency: dict[tuple[str, str, str], tuple[int, bytes]] = {}
        # What PayPal keeps about an order without showing it.
        self._order_private: dict[str, Json] = {}
        self._order_of_capture: dict[str, str] = {}
        self._spec = PayPalSpec.load()
        self.signer = WebhookSigner()
        self._certificates: dict[str, x509.Certificate] = {
            self.signer.cert_id: self.signer.certificate
        }
        self.app = Starlette(
            routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PATCH", "DELETE"])]
        )
        self._routes: dict[tuple[str, str], Handler]
        self._routes = {
            ("post", "/v2/checkout/orders"): self._create_order,
            ("get", "/v2/checkout/orders/{id}"): self._get_order,
            ("post", "/v2/checkout/orders/{id}/capture"): self._capture_order,
            ("get", "/v2/payments/captures/{capture_id}"): self._get_capture,
            ("post", "/v2/payments/captures/{capture_id}/refund"): self._refund_capture,
            ("get", "/v2/payments/refunds/{refund_id}"): self._get_refund,
            ("post", "/v1/notifications/verify-webhook-signature"): self._verify_signature,
            **self._billing_routes(),
        }
        self._init_billing()

    # -- controls for tests --------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything, as a fresh account would (PayPal's own signing key stays)."""
        with self._lock:
            self.release_hangs()
            for store in (self.orders, self.captures, self.refunds, self._tokens):
                store.clear()
            self.events.clear()
            self.requests.clear()
            self.violations.clear()
            self._faults.clear()
            self._capture_outcomes.clear()
            self._idempotency.clear()
            self._order_private.clear()
            self._order_of_capture.clear()
            self._reset_billing()
            self.token_ttl_s = 32400
            self.tokens_refused = False
            self._release = threading.Event()

    def fail_next(
        self,
        kind: FaultKind,
        times: int = 1,
        *,
        path_prefix: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Make the next ``times`` calls (optionally only those under ``path_prefix``) answer
        429 (with ``Retry-After`` when given), 500, 503, or hang until ``release_hangs`` (or
        ``hang_limit_s``): ``hang`` before doing anything, ``hang_after`` once the work is
        done (the answer is what is lost)."""
        with self._lock:
            for _ in range(times):
                self._faults.append(Fault(kind, path_prefix, retry_after))

    def decline_next_capture(self, how: CaptureOutcome = "instrument_declined") -> None:
        """``instrument_declined``: the capture call answers 422 INSTRUMENT_DECLINED and the
        order stays approved (the buyer may pick another funding source). ``capture_declined``:
        the order completes with a capture whose status is DECLINED."""
        with self._lock:
            self._capture_outcomes.append(how)

    def release_hangs(self) -> None:
        self._release.set()

    def expire_tokens(self) -> None:
        """Every token issued so far stops working (as when PayPal revokes or ages them)."""
        with self._lock:
            self._tokens.clear()

    @property
    def token_calls(self) -> int:
        return len(self.calls("POST", "/v1/oauth2/token"))

    def calls(self, method: str, path: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r for r in self.requests if r.method == method and (path is None or r.path == path)
            ]

    def approve(self, order_id: str) -> Json:
        """The buyer logs in to PayPal and approves the order."""
        with self._lock:
            order = self._order(order_id)
            if order["status"] not in ("CREATED", "PAYER_ACTION_REQUIRED", "APPROVED"):
                raise ValueError(f"order {order_id} is {order['status']}")
            if order["status"] != "APPROVED":
                order["status"] = "APPROVED"
                order["payer"] = copy.deepcopy(BUYER)
                order["payment_source"] = {
                    "paypal": {
                        "email_address": BUYER["email_address"],
                        "account_id": BUYER["payer_id"],
                        "account_status": "VERIFIED",
                        "name": copy.deepcopy(BUYER["name"]),
                        "address": copy.deepcopy(BUYER["address"]),
                    }
                }
                order["links"] = [
                    self._link(f"/v2/checkout/orders/{order_id}", "self", "GET"),
                    self._link(f"/v2/checkout/orders/{order_id}", "update", "PATCH"),
                    self._link(f"/v2/checkout/orders/{order_id}/capture", "capture", "POST"),
                ]
                self._touch(order)
                self._emit(
                    "CHECKOUT.ORDER.APPROVED",
                    "checkout-order",
                    order,
                    "An order has been approved by buyer",
                )
            return copy.deepcopy(order)

    def void(self, order_id: str) -> Json:
        """PayPal voids the order (all its purchase units were voided)."""
        with self._lock:
            order = self._order(order_id)
            order["status"] = "VOIDED"
            order["links"] = [self._link(f"/v2/checkout/orders/{order_id}", "self", "GET")]
            self._touch(order)
            return copy.deepcopy(order)

    def events_of(self, event_type: str) -> list[Json]:
        with self._lock:
            return [copy.deepcopy(e) for e in self.events if e["event_type"] == event_type]

    def last_event(self, event_type: str) -> Json:
        found = self.events_of(event_type)
        if not found:
            seen = sorted({e["event_type"] for e in self.events})
            raise LookupError(f"no {event_type} event; the fake emitted {seen}")
        return found[-1]

    def build_event(
        self, event_type: str, resource: Json, *, resource_type: str, summary: str = ""
    ) -> Json:
        """An event of any type around ``resource``, shaped as PayPal sends them."""
        event_id = f"WH-{new_id()}-{new_id()}"
        return {
            "id": event_id,
            "event_version": "1.0",
            "create_time": datetime.now(UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "resource_type": resource_type,
            "resource_version": "2.0",
            "event_type": event_type,
            "summary": summary or event_type,
            "resource": copy.deepcopy(resource),
            "links": [
                {
                    "href": f"{self.url}/v1/notifications/webhooks-events/{event_id}",
                    "rel": "self",
                    "method": "GET",
                },
                {
                    "href": f"{self.url}/v1/notifications/webhooks-events/{event_id}/resend",
                    "rel": "resend",
                    "method": "POST",
                },
            ],
        }

    def cert_url(self, cert_id: str | None = None) -> str:
        """Where PayPal publishes a signing certificate (https, on PayPal's API host; the
        fake does not serve it: verification happens at verify-webhook-signature)."""
        return f"{CERT_BASE}/{cert_id or self.signer.cert_id}"

    def signed_delivery(
        self,
        event: Json | bytes,
        webhook_id: str,
        *,
        signer: WebhookSigner | None = None,
        cert_url: str | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """The body and headers of PayPal's POST delivering ``event`` to the webhook
        ``webhook_id``, signed with PayPal's key (or ``signer``'s, to forge one). PayPal's
        JSON is compact and keeps non-ASCII text as UTF-8, so a client that re-serializes
        the event with Python's defaults changes its bytes."""
        signer = signer or self.signer
        if isinstance(event, bytes):
            body = event
        else:
            body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        transmission_id = str(uuid.uuid1())
        transmission_time = now_iso()
        return body, {
            "Content-Type": "application/json",
            "User-Agent": "PayPal/AUHD-214.0-58697624",
            "PAYPAL-TRANSMISSION-ID": transmission_id,
            "PAYPAL-TRANSMISSION-TIME": transmission_time,
            "PAYPAL-TRANSMISSION-SIG": signer.sign(
                body,
                transmission_id=transmission_id,
                transmission_time=transmission_time,
                webhook_id=webhook_id,
            ),
            "PAYPAL-CERT-URL": cert_url or self.cert_url(signer.cert_id),
            "PAYPAL-AUTH-ALGO": "SHA256withRSA",
        }

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        if path == "/v1/oauth2/token":
            return await self._token_endpoint(request)
        if path == "/checkoutnow" and request.method == "GET":
            return self._buyer_approves(request)
        return await self._api(request)

    def _debug_headers(self) -> dict[str, str]:
        return {"Paypal-Debug-Id": secrets.token_hex(7)}

    def _error_response(self, error: PayPalError, debug: dict[str, str]) -> tuple[int, bytes]:
        if "name" not in error.body:  # OAuth's shape (the token endpoint, stale tokens)
            return error.status, json.dumps(error.body).encode()
        body = {**error.body, "debug_id": debug["Paypal-Debug-Id"]}
        if "links" not in body:
            issue = (body.get("details") or [{}])[0].get("issue", body["name"])
            body["links"] = [
                {
                    "href": f"https://developer.paypal.com/api/rest/reference/orders/v2/errors/#{issue}",
                    "rel": "information_link",
                    "method": "GET",
                }
            ]
        return error.status, json.dumps(body).encode()

    async def _api(self, request: Request) -> Response:
        method, path, query = request.method, request.url.path, request.url.query
        raw = await request.body()
        # verify-webhook-signature needs the bytes of the event as they came.
        request.scope["paypal.raw_body"] = raw
        headers = {k.lower(): v for k, v in request.headers.items()}
        request_id = headers.get("paypal-request-id")
        debug = self._debug_headers()
        record = RecordedRequest(
            method=method,
            path=path,
            request_id=request_id,
            body=None,
            debug_id=debug["Paypal-Debug-Id"],
        )
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
            await self._inject_fault(path, after=False)
            self._authenticate(headers.get("authorization"))
            if is_billing_path(path):
                operation, violations = self._check_billing(method, path, query, record.body)
                check_response = False  # no published description to check answers against
            else:
                operation, violations = self._spec.check_request(method, path, query, headers, raw)
            if violations:
                check_response = False  # the request is already a failure of the test
                with self._lock:
                    self.violations.extend(violations)
                if operation is None:
                    raise PayPalError(404)
                raise PayPalError(400, issue="INVALID_PARAMETER_VALUE")
            assert operation is not None
            handler = self._routes.get((operation.method, operation.template))
            if handler is None:
                with self._lock:
                    self.violations.append(
                        Violation(method, path, "valid, but the fake does not serve it")
                    )
                raise PayPalError(404)
            status, content, replayed = self._idempotent(
                method,
                path,
                request_id,
                lambda: self._run(handler, request, record.body, operation.path_params),
            )
            record.replayed = replayed
            if status == 204:
                content = b""  # No Content: suspend, activate, cancel
            if replayed and path.startswith(("/v2/checkout/orders", "/v1/payments/sale/")):
                # PayPal answers a replayed order request (or v1 sale refund: "a successful
                # idempotent request returns 200") with 200, not 201.
                status = 200
            await self._inject_fault(path, after=True)
        except PayPalError as error:
            status, content = self._error_response(error, debug)
            extra_headers = error.headers
        record.status = status
        if check_response:
            problems = self._spec.check_response(method, path, query, headers, raw, status, content)
            if problems:
                with self._lock:
                    self.violations.extend(problems)
        return Response(
            content,
            status_code=status,
            headers={**debug, **extra_headers},
            media_type="application/json",
        )

    def _check_billing(
        self, method: str, path: str, query: str, body: Json | None
    ) -> tuple[Operation | None, list[Violation]]:
        template, params, problems = self.check_billing_request(method, path, query, body)
        operation = Operation(method.lower(), template, params) if template is not None else None
        return operation, [Violation(method, path, problem) for problem in problems]

    def _run(
        self,
        handler: Handler,
        request: Request,
        body: Json | None,
        params: dict[str, str],
    ) -> tuple[int, bytes]:
        with self._lock:
            status, answer = handler(request, body, params)
        return status, json.dumps(answer).encode()

    def _idempotent(
        self,
        method: str,
        path: str,
        request_id: str | None,
        run: Callable[[], tuple[int, bytes]],
    ) -> tuple[int, bytes, bool]:
        """The same PayPal-Request-Id on the same call replays the first successful answer."""
        if request_id is None or method != "POST":
            status, content = run()
            return status, content, False
        key = (method, path, request_id)
        with self._lock:
            saved = self._idempotency.get(key)
            if saved is not None:
                return saved[0], saved[1], True
            status, content = run()
            if 200 <= status < 300:
                self._idempotency[key] = (status, content)
            return status, content, False

    def _authenticate(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme != "Bearer" or not token:
            raise PayPalError(401)
        with self._lock:
            expires = self._tokens.get(token)
            refused = self.tokens_refused
        if refused or expires is None or expires <= time.monotonic():
            # What PayPal answers for a token it no longer knows: OAuth's shape, not its own.
            error = PayPalError(401)
            error.body = {
                "error": "invalid_token",
                "error_description": "Token signature verification failed",
            }
            raise error

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
            raise PayPalError(
                429,
                headers={"Retry-After": str(fault.retry_after)}
                if fault.retry_after is not None
                else {},
            )
        if fault.kind == "server_error":
            raise PayPalError(500)
        if fault.kind == "unavailable":
            raise PayPalError(503)
        # Held in a worker thread so that the server keeps answering other requests.
        await asyncio.to_thread(release.wait, self.hang_limit_s)

    # -- the token endpoint ----------------------------------------------------------------

    async def _token_endpoint(self, request: Request) -> Response:
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        debug = self._debug_headers()
        record = RecordedRequest(
            method=request.method, path=request.url.path, request_id=None, body=None
        )
        with self._lock:
            self.requests.append(record)
        try:
            await self._inject_fault(request.url.path, after=False)
        except PayPalError as error:
            record.status, content = self._error_response(error, debug)
            return Response(
                content,
                record.status,
                headers={**debug, **error.headers},
                media_type="application/json",
            )
        form, problems = check_token_request(request.method, headers, raw)
        record.body = dict(form)
        if problems:
            with self._lock:
                self.violations.extend(
                    Violation(request.method, request.url.path, p) for p in problems
                )
            record.status = 400
            body = {"error": "invalid_request", "error_description": "; ".join(problems)}
            return Response(json.dumps(body), 400, headers=debug, media_type="application/json")
        try:
            user, _, password = (
                base64.b64decode(headers["authorization"][6:]).decode().partition(":")
            )
        except (ValueError, UnicodeDecodeError):
            user, password = "", ""
        if not (
            secrets.compare_digest(user, self.client_id)
            and secrets.compare_digest(password, self.client_secret)
        ):
            record.status = 401
            body = {"error": "invalid_client", "error_description": "Client Authentication failed"}
            return Response(json.dumps(body), 401, headers=debug, media_type="application/json")
        token = "A21AA" + secrets.token_urlsafe(48)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_ttl_s
            ttl = self.token_ttl_s
        record.status = 200
        answer: Json = {
            "scope": "https://uri.paypal.com/services/payments/payment "
            "https://uri.paypal.com/services/payments/refund "
            "https://uri.paypal.com/services/applications/webhooks",
            "access_token": token,
            "token_type": "Bearer",
            "app_id": "APP-80W284485P519543T",
            "expires_in": ttl,
            "nonce": f"{now_iso()}{secrets.token_urlsafe(16)}",
        }
        return Response(json.dumps(answer), 200, headers=debug, media_type="application/json")

    # -- the buyer's side ------------------------------------------------------------------

    def _buyer_approves(self, request: Request) -> Response:
        """PayPal's checkout page, reduced to its outcome: the buyer approves and is sent back
        to the merchant's return URL with ``token`` and ``PayerID``."""
        order_id = request.query_params.get("token", "")
        with self._lock:
            if order_id not in self.orders:
                return Response("unknown order", 404)
            self.approve(order_id)
            return_url = self._order_private[order_id].get("return_url")
        if not return_url:
            return Response("approved", 200)
        parts = urlsplit(return_url)
        query = urlencode(
            [*parse_qsl(parts.query), ("token", order_id), ("PayerID", BUYER["payer_id"])]
        )
        return RedirectResponse(urlunsplit(parts._replace(query=query)), 302)

    # -- helpers -------------------------------------------------------------------------------

    def _link(self, path: str, rel: str, method: str) -> Json:
        return {"href": f"{self.url}{path}", "rel": rel, "method": method}

    def _touch(self, obj: Json) -> None:
        obj["update_time"] = now_iso()

    def _order(self, order_id: str) -> Json:
        order = self.orders.get(order_id)
        if order is None:
            raise KeyError(f"no order {order_id}")
        return order

    def _emit(self, event_type: str, resource_type: str, resource: Json, summary: str) -> None:
        self.events.append(
            self.build_event(event_type, resource, resource_type=resource_type, summary=summary)
        )

    @staticmethod
    def _prefers_representation(request: Request) -> bool:
        return "return=representation" in request.headers.get("prefer", "")

    def _amount(self, amount: Json, field_path: str) -> tuple[int, str]:
        currency = amount["currency_code"]
        if currency not in CURRENCY_DECIMALS:
            raise PayPalError(
                422, issue="INVALID_CURRENCY_CODE", field=f"{field_path}/currency_code"
            )
        try:
            value = Decimal(amount["value"])
        except InvalidOperation:
            raise PayPalError(422, issue="DECIMAL_PRECISION", field=f"{field_path}/value") from None
        exponent = value.as_tuple().exponent
        assert isinstance(exponent, int)
        if -exponent > CURRENCY_DECIMALS[currency]:
            raise PayPalError(422, issue="DECIMAL_PRECISION", field=f"{field_path}/value")
        minor = to_minor(amount["value"], currency)
        if minor <= 0:
            raise PayPalError(422, issue="CANNOT_BE_ZERO_OR_NEGATIVE", field=f"{field_path}/value")
        return minor, currency

    # -- orders ----------------------------------------------------------------------------

    def _create_order(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        units = body["purchase_units"]
        if body["intent"] != "CAPTURE":
            raise PayPalError(422, issue="INVALID_PARAMETER_VALUE", field="/intent")
        for index, unit in enumerate(units):
            self._amount(unit["amount"], f"/purchase_units/{index}/amount")
        source = body.get("payment_source") or {}
        if source and not request.headers.get("paypal-request-id"):
            raise PayPalError(400, issue="PAYPAL_REQUEST_ID_REQUIRED", location="header")
        order_id = new_id()
        wallet = source.get("paypal")
        order: Json = {
            "id": order_id,
            "intent": body["intent"],
            "status": "PAYER_ACTION_REQUIRED" if wallet is not None else "CREATED",
            "purchase_units": [
                {
                    "reference_id": unit.get("reference_id", "default"),
                    "amount": copy.deepcopy(unit["amount"]),
                    "payee": copy.deepcopy(MERCHANT),
                    **{k: unit[k] for k in ("description", "custom_id", "invoice_id") if k in unit},
                }
                for unit in units
            ],
            "create_time": now_iso(),
        }
        approve = {"href": f"{self.url}/checkoutnow?token={order_id}", "method": "GET"}
        if wallet is not None:
            order["payment_source"] = {"paypal": {}}
            order["links"] = [
                self._link(f"/v2/checkout/orders/{order_id}", "self", "GET"),
                {**approve, "rel": "payer-action"},
            ]
        else:
            order["links"] = [
                self._link(f"/v2/checkout/orders/{order_id}", "self", "GET"),
                {**approve, "rel": "approve"},
                self._link(f"/v2/checkout/orders/{order_id}", "update", "PATCH"),
                self._link(f"/v2/checkout/orders/{order_id}/capture", "capture", "POST"),
            ]
        context = (wallet or {}).get("experience_context") or body.get("application_context") or {}
        self.orders[order_id] = order
        self._order_private[order_id] = {
            "return_url": context.get("return_url"),
            "cancel_url": context.get("cancel_url"),
        }
        if self._prefers_representation(request):
            return 201, copy.deepcopy(order)
        minimal = {k: copy.deepcopy(order[k]) for k in ("id", "status", "links")}
        if "payment_source" in order:
            minimal["payment_source"] = copy.deepcopy(order["payment_source"])
        return 201, minimal

    def _get_order(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        order = self.orders.get(params["id"])
        if order is None:
            raise PayPalError(404, issue="INVALID_RESOURCE_ID", location="path", field="id")
        return 200, copy.deepcopy(order)

    def _capture_order(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        order_id = params["id"]
        order = self.orders.get(order_id)
        if order is None:
            raise PayPalError(404, issue="INVALID_RESOURCE_ID", location="path", field="id")
        if order["status"] == "COMPLETED":
            raise PayPalError(422, issue="ORDER_ALREADY_CAPTURED")
        if order["status"] != "APPROVED":
            raise PayPalError(422, issue="ORDER_NOT_APPROVED")
        outcome = self._capture_outcomes.popleft() if self._capture_outcomes else None
        if outcome == "instrument_declined":
            raise PayPalError(
                422,
                issue="INSTRUMENT_DECLINED",
                links=[
                    {
                        "href": f"{self.url}/checkoutnow?token={order_id}",
                        "rel": "redirect",
                        "method": "GET",
                    },
                    {
                        "href": "https://developer.paypal.com/api/rest/reference/orders/v2/errors/#INSTRUMENT_DECLINED",
                        "rel": "information_link",
                        "method": "GET",
                    },
                ],
            )
        unit = order["purchase_units"][0]
        minor, currency = (
            to_minor(unit["amount"]["value"], unit["amount"]["currency_code"]),
            unit["amount"]["currency_code"],
        )
        fee = max(1, minor * 349 // 10000) if outcome is None else 0
        capture_id = new_id()
        capture: Json = {
            "id": capture_id,
            "status": "DECLINED" if outcome == "capture_declined" else "COMPLETED",
            "amount": money(minor, currency),
            "final_capture": True,
            "seller_protection": {
                "status": "ELIGIBLE",
                "dispute_categories": ["ITEM_NOT_RECEIVED", "UNAUTHORIZED_TRANSACTION"],
            },
            "links": [
                self._link(f"/v2/payments/captures/{capture_id}", "self", "GET"),
                self._link(f"/v2/payments/captures/{capture_id}/refund", "refund", "POST"),
                self._link(f"/v2/checkout/orders/{order_id}", "up", "GET"),
            ],
            "create_time": now_iso(),
            "update_time": now_iso(),
        }
        if outcome is None:
            capture["seller_receivable_breakdown"] = {
                "gross_amount": money(minor, currency),
                "paypal_fee": money(fee, currency),
                "net_amount": money(minor - fee, currency),
            }
        if "custom_id" in unit:
            capture["custom_id"] = unit["custom_id"]
        unit.setdefault("payments", {}).setdefault("captures", []).append(capture)
        order["status"] = "COMPLETED"
        order["links"] = [self._link(f"/v2/checkout/orders/{order_id}", "self", "GET")]
        self._touch(order)
        self.captures[capture_id] = capture
        self._order_of_capture[capture_id] = order_id
        if outcome == "capture_declined":
            self._emit(
                "PAYMENT.CAPTURE.DENIED",
                "capture",
                self._capture_view(capture_id),
                "A payment capture was denied",
            )
        else:
            self._emit(
                "PAYMENT.CAPTURE.COMPLETED",
                "capture",
                self._capture_view(capture_id),
                f"Payment completed for {capture['amount']['value']} {currency}",
            )
        if self._prefers_representation(request):
            return 201, copy.deepcopy(order)
        return 201, {
            "id": order_id,
            "status": order["status"],
            "payment_source": copy.deepcopy(order.get("payment_source", {})),
            "purchase_units": [
                {"reference_id": unit["reference_id"], "payments": copy.deepcopy(unit["payments"])}
            ],
            "payer": copy.deepcopy(order.get("payer", {})),
            "links": copy.deepcopy(order["links"]),
        }

    # -- captures and refunds ----------------------------------------------------------------

    def _capture_view(self, capture_id: str) -> Json:
        """A capture as the Payments API (and capture webhooks) show it: with the order it
        belongs to."""
        view = copy.deepcopy(self.captures[capture_id])
        view["supplementary_data"] = {
            "related_ids": {"order_id": self._order_of_capture[capture_id]}
        }
        view["payee"] = copy.deepcopy(MERCHANT)
        return view

    def _get_capture(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        if params["capture_id"] not in self.captures:
            raise PayPalError(404, issue="INVALID_RESOURCE_ID", location="path", field="capture_id")
        return 200, self._capture_view(params["capture_id"])

    def _get_refund(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        refund = self.refunds.get(params["refund_id"])
        if refund is None:
            raise PayPalError(404, issue="INVALID_RESOURCE_ID", location="path", field="refund_id")
        return 200, copy.deepcopy(refund)

    def _refund_capture(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        capture_id = params["capture_id"]
        capture = self.captures.get(capture_id)
        if capture is None:
            raise PayPalError(404, issue="INVALID_RESOURCE_ID", location="path", field="capture_id")
        currency = capture["amount"]["currency_code"]
        captured = to_minor(capture["amount"]["value"], currency)
        if capture["status"] == "REFUNDED":
            raise PayPalError(422, issue="CAPTURE_FULLY_REFUNDED")
        if capture["status"] not in ("COMPLETED", "PARTIALLY_REFUNDED"):
            raise PayPalError(422, issue="REFUND_NOT_ALLOWED")
        order_id = self._order_of_capture[capture_id]
        unit = self.orders[order_id]["purchase_units"][0]
        earlier = [r for r in unit["payments"].get("refunds", []) if r["status"] == "COMPLETED"]
        refunded = sum(to_minor(r["amount"]["value"], currency) for r in earlier)
        remaining = captured - refunded
        requested = (body or {}).get("amount")
        if requested is None:
            amount = remaining
        else:
            if requested["currency_code"] != currency:
                raise PayPalError(
                    422, issue="REFUND_CAPTURE_CURRENCY_MISMATCH", field="/amount/currency_code"
                )
            amount, _ = self._amount(requested, "/amount")
            if amount > remaining:
                raise PayPalError(422, issue="REFUND_AMOUNT_EXCEEDED", field="/amount/value")
        total = refunded + amount
        fee = capture["seller_receivable_breakdown"]["paypal_fee"]
        fee_back = to_minor(fee["value"], currency) * amount // captured
        refund_id = new_id()
        refund: Json = {
            "id": refund_id,
            "status": "COMPLETED",
            "amount": money(amount, currency),
            "seller_payable_breakdown": {
                "gross_amount": money(amount, currency),
                "paypal_fee": money(fee_back, currency),
                "net_amount": money(amount - fee_back, currency),
                "total_refunded_amount": money(total, currency),
            },
            "links": [
                self._link(f"/v2/payments/refunds/{refund_id}", "self", "GET"),
                self._link(f"/v2/payments/captures/{capture_id}", "up", "GET"),
            ],
            "create_time": now_iso(),
            "update_time": now_iso(),
        }
        if "custom_id" in capture:
            refund["custom_id"] = capture["custom_id"]
        # A custom_id in the request is the refund's own; without one, the capture's is kept.
        for field_name in ("custom_id", "invoice_id", "note_to_payer"):
            if body and field_name in body:
                refund[field_name] = body[field_name]
        self.refunds[refund_id] = refund
        unit["payments"].setdefault("refunds", []).append(copy.deepcopy(refund))
        capture["status"] = "REFUNDED" if total == captured else "PARTIALLY_REFUNDED"
        self._touch(capture)
        self._emit(
            "PAYMENT.CAPTURE.REFUNDED",
            "refund",
            refund,
            f"A {refund['amount']['value']} {currency} capture payment was refunded",
        )
        if self._prefers_representation(request):
            return 201, copy.deepcopy(refund)
        return 201, {
            "id": refund_id,
            "status": refund["status"],
            "links": copy.deepcopy(refund["links"]),
        }

    # -- webhooks ------------------------------------------------------------------------------

    def _verify_signature(
        self, request: Request, body: Json | None, params: dict[str, str]
    ) -> tuple[int, Json]:
        assert body is not None
        holds = self._signature_holds(request, body)
        return 200, {"verification_status": "SUCCESS" if holds else "FAILURE"}

    def _signature_holds(self, request: Request, body: Json) -> bool:
        if body["auth_algo"] != "SHA256withRSA":
            return False
        # Only PayPal's own certificates count, at the address PayPal serves them from.
        certificate = next(
            (
                cert
                for cert_id, cert in self._certificates.items()
                if body["cert_url"] == self.cert_url(cert_id)
            ),
            None,
        )
        if certificate is None:
            return False
        raw = request.scope.get("paypal.raw_body", b"")
        event = raw_member(raw.decode("utf-8"), "webhook_event") if raw else None
        if event is None:
            return False
        return verify_transmission(
            certificate,
            event.encode("utf-8"),
            transmission_id=body["transmission_id"],
            transmission_time=body["transmission_time"],
            webhook_id=body["webhook_id"],
            signature=body["transmission_sig"],
        )


@contextmanager
def running_fake_paypal(**kwargs: Any) -> Iterator[FakePayPal]:
    fake = FakePayPal(**kwargs)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.release_hangs()
