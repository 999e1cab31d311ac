"""A fake of the Vipps MobilePay ePayment API, for tests: the real ``MobilePayProvider`` talks
to it over loopback.

It follows the vendor's pages: the Access Token API (``POST /accesstoken/get`` with
``client_id``, ``client_secret``, ``Ocp-Apim-Subscription-Key`` and
``Merchant-Serial-Number`` headers, answering ``access_token`` and ``expires_in`` as a string),
the ePayment API (create, get, event log, capture, cancel, refund; ``Idempotency-Key``
replaying the first answer; ``Problem`` bodies with a ``traceId``), and the Webhooks API's
"Request authentication" (HMAC-SHA256 over ``POST\\n{path}\\n{date};{host};{hash}``) for the
deliveries it signs.

Every ePayment request is checked against ``../shared/specs/vipps-mobilepay/epayment.v1.yml``
with openapi-core, and every answer too; departures are kept in ``violations`` (and the
request is answered 400). Quirks of that description, handled here explicitly:

1. ``security`` (Bearer) is dropped before validating; the fake checks tokens itself.
2. ``/accesstoken/get`` is not in the description (it is the Access Token API's): it is
   checked by hand, headers as that API's reference names them.
3. ``PaymentEvent.required`` names ``paymentAction``, a field the schema does not have (the
   event's ``name`` is meant): ``name`` is required instead, so that a true answer validates.
4. ``AdjustResponse`` (capture, cancel, refund) is described as
   ``application/problem+json``; the answer is validated against that schema whatever its
   media type.
5. Request bodies are also checked for fields the description does not name.

Controls: ``authorize`` (the customer approves in the app), ``abort``, ``expire``,
``refund_in_portal``, ``fail_next`` (500, 503, 429, 401, a hang before or after the work),
``expire_tokens``; ``signed_delivery`` turns an event into the body and headers of a webhook
delivery, signed as the Webhooks API signs them.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import cache
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.openapi_check import Violation, drop_security, openapi_messages, unknown_fields
from tests.fakes.server import serve_in_thread
from tests.fakes.specs import specs_dir

Json = dict[str, Any]
FaultKind = Literal[
    "server_error", "unavailable", "rate_limit", "unauthorized", "hang", "hang_after"
]
SPEC_HOST = "https://apitest.vipps.no"
MODIFICATIONS = ("capture", "cancel", "refund")


@cache
def _spec() -> tuple[dict[str, Any], OpenAPI]:
    path = specs_dir() / "vipps-mobilepay" / "epayment.v1.yml"
    spec: dict[str, Any] = yaml.safe_load(path.read_text())
    drop_security(spec)  # quirk 1
    event = spec["components"]["schemas"]["PaymentEvent"]  # quirk 3
    event["required"] = ["name" if r == "paymentAction" else r for r in event["required"]]
    adjust = spec["components"]["responses"]["AdjustResponse"]["content"]  # quirk 4
    adjust["application/json"] = adjust["application/problem+json"]
    return spec, OpenAPI.from_dict(spec)


def webhook_event_schema() -> Json:
    spec, _ = _spec()
    return {"components": spec["components"], "$ref": "#/components/schemas/WebhookEvent"}


def hmac_signature(secret: str, path_and_query: str, date: str, host: str, digest: str) -> str:
    text = f"POST\n{path_and_query}\n{date};{host};{digest}"
    return base64.b64encode(
        hmac.new(secret.encode(), text.encode(), hashlib.sha256).digest()
    ).decode()


class FakeError(Exception):
    def __init__(self, status: int, detail: str = "", headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class Fault:
    kind: FaultKind
    path_prefix: str | None


@dataclass
class FakeMobilePay:
    client_id: str
    client_secret: str
    subscription_key: str
    msn: str
    url: str = ""
    token_ttl_s: int = 3600
    hang_limit_s: float = 10.0
    payments: dict[str, Json] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._faults: deque[Fault] = deque()
        self._tokens: dict[str, float] = {}
        self._idempotency: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._release = threading.Event()
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])

    # -- controls for tests ----------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self._release.set()
            self.payments.clear()
            self.requests.clear()
            self.violations.clear()
            self._faults.clear()
            self._tokens.clear()
            self._idempotency.clear()
            self.token_ttl_s = 3600
            self._release = threading.Event()

    def fail_next(self, kind: FaultKind, times: int = 1, *, path_prefix: str | None = None) -> None:
        with self._lock:
            for _ in range(times):
                self._faults.append(Fault(kind, path_prefix))

    def release_hangs(self) -> None:
        self._release.set()

    def expire_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    @property
    def token_fetches(self) -> int:
        return len(self.calls("POST", "/accesstoken/get"))

    def calls(self, method: str, path: str | None = None) -> list[Recorded]:
        with self._lock:
            return [
                r for r in self.requests if r.method == method and (path is None or r.path == path)
            ]

    def payment(self, reference: str) -> Json:
        with self._lock:
            return copy.deepcopy(self.payments[reference])

    def authorize(self, reference: str) -> None:
        """The customer approves the payment in the app."""
        with self._lock:
            payment = self.payments[reference]
            if payment["state"] != "CREATED":
                raise ValueError(f"payment {reference} is {payment['state']}")
            payment["state"] = "AUTHORIZED"
            payment["aggregate"]["authorizedAmount"]["value"] = payment["amount"]["value"]
            payment["paymentMethod"] = {"type": "WALLET"}
            self._event(payment, "AUTHORIZED", payment["amount"]["value"], None)

    def abort(self, reference: str) -> None:
        """The customer cancels in the app instead of approving."""
        self._end(reference, "ABORTED")

    def expire(self, reference: str) -> None:
        """The customer did nothing before the payment timed out."""
        self._end(reference, "EXPIRED")

    def _end(self, reference: str, state: str) -> None:
        with self._lock:
            payment = self.payments[reference]
            if payment["state"] != "CREATED":
                raise ValueError(f"payment {reference} is {payment['state']}")
            payment["state"] = state
            self._event(payment, state, payment["amount"]["value"], None)

    def refund_in_portal(self, reference: str, value: int) -> Json:
        """The merchant refunds in the business portal (no key of ours)."""
        with self._lock:
            payment = self.payments[reference]
            self._refund(payment, value, f"portal-{secrets.token_hex(8)}")
            return copy.deepcopy(payment["events"][-1])

    def events(self, reference: str) -> list[Json]:
        with self._lock:
            return copy.deepcopy(self.payments[reference]["events"])

    def webhook_body(self, event: Json) -> Json:
        """What the Webhooks API posts for one entry of the event log."""
        return {"msn": self.msn, **{k: v for k, v in event.items()}}

    def signed_delivery(
        self,
        body: Json | bytes,
        *,
        secret: str,
        url: str,
        date: datetime | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """The body and headers of a delivery to ``url``, signed with ``secret``."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        stamp = format_datetime(date or datetime.now(UTC), usegmt=True)
        digest = base64.b64encode(hashlib.sha256(raw).digest()).decode()
        signature = hmac_signature(secret, path, stamp, parts.netloc, digest)
        return raw, {
            "Content-Type": "application/json",
            "Host": parts.netloc,
            "x-ms-date": stamp,
            "x-ms-content-sha256": digest,
            "Authorization": (
                "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256"
                f"&Signature={signature}"
            ),
        }

    # -- state ------------------------------------------------------------------------------

    def _event(self, payment: Json, name: str, value: int, key: str | None) -> None:
        payment["events"].append(
            {
                "reference": payment["reference"],
                "pspReference": str(secrets.randbelow(10**10)),
                "name": name,
                "amount": {"currency": payment["amount"]["currency"], "value": value},
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "idempotencyKey": key,
                "success": True,
            }
        )

    def _view(self, payment: Json) -> Json:
        return {k: copy.deepcopy(v) for k, v in payment.items() if k != "events"}

    def _modification(self, payment: Json) -> Json:
        view = self._view(payment)
        return {k: view[k] for k in ("amount", "state", "aggregate", "pspReference", "reference")}

    def _refund(self, payment: Json, value: int, key: str) -> None:
        aggregate = payment["aggregate"]
        left = aggregate["capturedAmount"]["value"] - aggregate["refundedAmount"]["value"]
        if value > left:
            raise FakeError(400, "Refund amount is larger than the captured amount not refunded")
        aggregate["refundedAmount"]["value"] += value
        self._event(payment, "REFUNDED", value, key)

    # -- handlers ---------------------------------------------------------------------------

    def _create(self, body: Json, params: dict[str, str], key: str) -> tuple[int, Json]:
        reference = body["reference"]
        if reference in self.payments:
            raise FakeError(409, "A payment with this reference already exists")
        currency = body["amount"]["currency"]

        def money(value: int = 0) -> Json:
            return {"currency": currency, "value": value}

        token = secrets.token_urlsafe(16)
        self.payments[reference] = {
            "aggregate": {
                "authorizedAmount": money(),
                "cancelledAmount": money(),
                "capturedAmount": money(),
                "refundedAmount": money(),
            },
            "amount": money(body["amount"]["value"]),
            "state": "CREATED",
            "paymentMethod": {"type": "WALLET"},
            "profile": {},
            "pspReference": str(secrets.randbelow(10**10)),
            "redirectUrl": f"https://landing.vipps.no/?token={token}",
            "reference": reference,
            "metadata": body.get("metadata"),
            "events": [],
        }
        self._event(self.payments[reference], "CREATED", body["amount"]["value"], key)
        return 201, {
            "redirectUrl": f"https://landing.vipps.no/?token={token}",
            "reference": reference,
        }

    def _found(self, params: dict[str, str]) -> Json:
        payment = self.payments.get(params["reference"])
        if payment is None:
            raise FakeError(404, "Payment not found")
        return payment

    def _get(self, body: Json | None, params: dict[str, str], key: str | None) -> tuple[int, Any]:
        return 200, self._view(self._found(params))

    def _events(
        self, body: Json | None, params: dict[str, str], key: str | None
    ) -> tuple[int, Any]:
        return 200, copy.deepcopy(self._found(params)["events"])

    def _capture(self, body: Json, params: dict[str, str], key: str) -> tuple[int, Json]:
        payment = self._found(params)
        aggregate = payment["aggregate"]
        if payment["state"] != "AUTHORIZED":
            raise FakeError(400, f"Cannot capture a payment in state {payment['state']}")
        value = body["modificationAmount"]["value"]
        left = (
            aggregate["authorizedAmount"]["value"]
            - aggregate["capturedAmount"]["value"]
            - aggregate["cancelledAmount"]["value"]
        )
        if value > left or value <= 0:
            raise FakeError(400, "Capture amount is larger than the reserved amount left")
        aggregate["capturedAmount"]["value"] += value
        self._event(payment, "CAPTURED", value, key)
        return 200, self._modification(payment)

    def _cancel(self, body: Json | None, params: dict[str, str], key: str) -> tuple[int, Json]:
        payment = self._found(params)
        aggregate = payment["aggregate"]
        state = payment["state"]
        if state == "CREATED":
            payment["state"] = "TERMINATED"
            self._event(payment, "TERMINATED", payment["amount"]["value"], key)
        elif state == "AUTHORIZED":
            left = (
                aggregate["authorizedAmount"]["value"]
                - aggregate["capturedAmount"]["value"]
                - aggregate["cancelledAmount"]["value"]
            )
            if aggregate["capturedAmount"]["value"] == 0:
                payment["state"] = "TERMINATED"
            if left > 0:
                aggregate["cancelledAmount"]["value"] += left
                self._event(payment, "CANCELLED", left, key)
        elif state != "TERMINATED":
            raise FakeError(400, f"Cannot cancel a payment in state {state}")
        return 200, self._modification(payment)

    def _refund_call(self, body: Json, params: dict[str, str], key: str) -> tuple[int, Json]:
        payment = self._found(params)
        self._refund(payment, body["modificationAmount"]["value"], key)
        return 200, self._modification(payment)

    # -- the server -------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        path, method = request.url.path, request.method
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = Recorded(method, path, headers, body)
        with self._lock:
            self.requests.append(record)
        extra: dict[str, str] = {}
        check = True
        try:
            await self._fault(path, after=False)
            if path == "/accesstoken/get":
                status, answer = self._token(method, headers, raw)
                check = False
            else:
                self._authenticate(headers)
                status, answer, check = self._api(
                    method, path, request.url.query, headers, raw, body
                )
            await self._fault(path, after=True)
            content = json.dumps(answer).encode()
        except FakeError as error:
            status, extra = error.status, error.headers
            content = json.dumps(
                {
                    "type": "https://developer.vippsmobilepay.com/docs/knowledge-base/errors",
                    "title": "Bad Request" if status == 400 else "Error",
                    "detail": error.detail or "error",
                    "status": status,
                    "traceId": secrets.token_hex(8),
                }
            ).encode()
            check = check and status in (400, 404, 409)
        record.status = status
        if check and path != "/accesstoken/get":
            _, api = _spec()
            mock = MockRequest(SPEC_HOST, method.lower(), path, headers=headers, data=raw or None)
            media = "application/json" if status < 400 else "application/problem+json"
            try:
                api.validate_response(
                    mock, MockResponse(content, status_code=status, content_type=media)
                )
            except Exception as error:  # openapi-core's errors share no useful base
                with self._lock:
                    self.violations.append(
                        Violation(method, path, f"response {status}: {openapi_messages(error)}")
                    )
        media_type = "application/json" if status < 400 else "application/problem+json"
        return Response(content, status_code=status, headers=extra, media_type=media_type)

    def _api(
        self, method: str, path: str, query: str, headers: dict[str, str], raw: bytes, body: Any
    ) -> tuple[int, Any, bool]:
        spec, api = _spec()
        mock = MockRequest(
            SPEC_HOST,
            method.lower(),
            path,
            headers=headers,
            data=raw or None,
            content_type=headers.get("content-type", "application/json").split(";")[0],
        )
        problems: list[str] = []
        try:
            api.validate_request(mock)
        except Exception as error:
            problems.append(openapi_messages(error))
        parts = path.strip("/").split("/")
        # /epayment/v1/payments[/{reference}[/events|capture|cancel|refund]]
        if parts[:3] != ["epayment", "v1", "payments"] or len(parts) > 5:
            problems.append("not a path the fake serves")
        if isinstance(body, dict):
            template = (
                "/epayment/v1/payments"
                if len(parts) == 3
                else f"/epayment/v1/payments/{{reference}}/{parts[-1]}"
            )
            media = (
                (
                    (spec["paths"].get(template, {}).get(method.lower()) or {}).get("requestBody")
                    or {}
                )
                .get("content", {})
                .get("application/json")
            )
            if media:
                problems.extend(
                    f"body {where}: field not in the description"
                    for where in unknown_fields(body, media["schema"], spec)
                )
        if problems:
            with self._lock:
                self.violations.extend(Violation(method, path, p) for p in problems)
            raise FakeError(400, "The request does not follow the API description")
        params = {"reference": parts[3]} if len(parts) > 3 else {}
        key = headers.get("idempotency-key")
        action = parts[4] if len(parts) == 5 else None
        with self._lock:
            if method == "GET":
                status, answer = (self._events if action == "events" else self._get)(
                    body, params, key
                )
                return status, answer, True
            assert key is not None  # the description requires it, checked above
            saved = self._idempotency.get((path, key))
            if saved is not None:
                return saved[0], json.loads(saved[1]), True
            handler = {
                None: self._create,
                "capture": self._capture,
                "cancel": self._cancel,
                "refund": self._refund_call,
            }[action]
            status, answer = handler(body, params, key)
            self._idempotency[(path, key)] = (status, json.dumps(answer).encode())
            return status, answer, True

    def _token(self, method: str, headers: dict[str, str], raw: bytes) -> tuple[int, Json]:
        problems = []
        if method != "POST":
            problems.append("the token endpoint takes POST")
        for name in (
            "client_id",
            "client_secret",
            "ocp-apim-subscription-key",
            "merchant-serial-number",
        ):
            if name not in headers:
                problems.append(f"the token request lacks the {name} header")
        if raw:
            problems.append("the token request has no body")
        if problems:
            with self._lock:
                self.violations.extend(Violation(method, "/accesstoken/get", p) for p in problems)
            raise FakeError(400, "bad token request")
        if (
            headers["client_id"] != self.client_id
            or headers["client_secret"] != self.client_secret
            or headers["ocp-apim-subscription-key"] != self.subscription_key
        ):
            raise FakeError(401, "invalid client")
        token = "eyJ0eXAi" + secrets.token_urlsafe(24)
        now = int(time.time())
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_ttl_s
        return 200, {
            "token_type": "Bearer",
            "expires_in": str(self.token_ttl_s),
            "ext_expires_in": str(self.token_ttl_s),
            "expires_on": str(now + self.token_ttl_s),
            "not_before": str(now),
            "resource": "00000002-0000-0000-c000-000000000000",
            "access_token": token,
        }

    def _authenticate(self, headers: dict[str, str]) -> None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        with self._lock:
            expires = self._tokens.get(token)
        if scheme != "Bearer" or expires is None or expires <= time.monotonic():
            raise FakeError(401, "Unauthorized")
        if headers.get("ocp-apim-subscription-key") != self.subscription_key:
            raise FakeError(401, "Access denied due to invalid subscription key")
        if headers.get("merchant-serial-number") != self.msn:
            raise FakeError(403, "The MSN is not connected to this key")

    async def _fault(self, path: str, *, after: bool) -> None:
        with self._lock:
            fault = next(
                (
                    f
                    for f in self._faults
                    if f.path_prefix is None or path.startswith(f.path_prefix)
                ),
                None,
            )
            if fault is None or (fault.kind == "hang_after") != after:
                return
            self._faults.remove(fault)
            release = self._release
        if fault.kind in ("hang", "hang_after"):
            await asyncio.get_running_loop().run_in_executor(None, release.wait, self.hang_limit_s)
            raise FakeError(504, "hung")
        status = {"server_error": 500, "unavailable": 503, "rate_limit": 429, "unauthorized": 401}[
            fault.kind
        ]
        raise FakeError(status, "injected", {"Retry-After": "1"} if status == 429 else None)


@contextmanager
def running_fake_mobilepay(
    *, client_id: str, client_secret: str, subscription_key: str, msn: str
) -> Iterator[FakeMobilePay]:
    fake = FakeMobilePay(
        client_id=client_id, client_secret=client_secret, subscription_key=subscription_key, msn=msn
    )
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake
