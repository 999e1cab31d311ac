"""Checks requests and responses against PayPal's published OpenAPI descriptions
(../shared/specs/paypal: Orders v2, Payments v2, Webhooks v1).

PayPal speaks JSON, so ``openapi-core`` validates path, method, header and query parameters
and bodies directly. The descriptions have quirks that would make a correct client (or a
faithful fake) fail, or let a wrong one pass; each is handled here explicitly:

1. Security: every operation names an OAuth2 scheme, which openapi-core cannot check (it warns
   "Unsupported scheme type" on each request, an error under warnings-as-errors). The
   ``security`` entries are dropped; the fake checks Bearer tokens itself.
2. The token endpoint ``POST /v1/oauth2/token`` is in none of the three descriptions (they only
   name it as the OAuth2 ``tokenUrl``). The fake checks it by hand (``check_token_request``).
3. ``verify-webhook-signature`` sends back an event PayPal delivered, but every field of the
   ``event`` schema is ``readOnly`` and openapi-core refuses read-only properties in request
   bodies. ``readOnly`` is dropped inside that schema only.
4. ``transmission_sig`` has the pattern ``^(?!\\d+$)\\w+\\S+``, which refuses a base64
   signature that starts with ``+`` or ``/`` (1 in 32 of PayPal's own signatures). It is
   replaced by the base64 alphabet.
5. The descriptions leave every object open (no ``additionalProperties: false``), so a
   misspelt field would pass although PayPal would ignore it, silently. Request bodies are
   also checked for fields the description does not name (``unknown_fields``).
6. Responses PayPal sends but the descriptions do not declare are not validated: 429 (no
   operation lists it, and its ``RATE_LIMIT_REACHED`` body matches none of the error schemas
   of the ``default`` response). See ``UNDECLARED_STATUSES``.
7. Custom formats (``ppaas_date_time_v3``, ``ppaas_common_currency_code_v2``, ...) are unknown
   to the validators and ignored; the patterns next to them still apply.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from functools import cache
from typing import Any
from urllib.parse import parse_qsl

from openapi_core import OpenAPI
from openapi_core.testing import MockResponse

from tests.fakes.openapi_check import (
    Operation,
    Violation,
    drop_security,
    json_body_schema,
    mock_request,
    openapi_messages,
    path_pattern,
    unknown_fields,
)
from tests.fakes.specs import specs_dir

SPEC_FILES = (
    "checkout_orders_v2.json",
    "payments_payment_v2.json",
    "notifications_webhooks_v1.json",
)
# The host the descriptions name as their server; requests are checked as if sent there.
SPEC_HOST = "https://api-m.sandbox.paypal.com"
# Statuses PayPal really answers that the descriptions do not declare (quirk 6).
UNDECLARED_STATUSES = frozenset({429})
BASE64_PATTERN = r"^[A-Za-z0-9+/]+={0,2}$"


def _load(name: str) -> dict[str, Any]:
    path = specs_dir() / "paypal" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"PayPal's OpenAPI description not found at {path}; set PAYMENT_SPECS_DIR to the "
            "directory holding paypal/*.json (CI clones shared/ beside the repo)"
        )
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec


def _drop_read_only(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_drop_read_only(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: _drop_read_only(value) for key, value in schema.items() if key != "readOnly"}


def _patch_webhooks(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    # Quirk 3: the event we send back is PayPal's own, read-only fields and all. The request
    # schema gets its own copy of `event`, without readOnly.
    schemas["event_as_sent_back"] = _drop_read_only(copy.deepcopy(schemas["event"]))
    schemas["link_description_as_sent_back"] = _drop_read_only(
        copy.deepcopy(schemas["link_description"])
    )
    links = schemas["event_as_sent_back"]["properties"]["links"]
    links["items"] = {"$ref": "#/components/schemas/link_description_as_sent_back"}
    verify = schemas["verify_webhook_signature"]
    verify["properties"]["webhook_event"] = {"$ref": "#/components/schemas/event_as_sent_back"}
    # Quirk 4.
    verify["properties"]["transmission_sig"]["pattern"] = BASE64_PATTERN


class PayPalSpec:
    """The three descriptions, patched for their quirks, and checks against them."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        self._apis: list[tuple[OpenAPI, dict[str, Any]]] = []
        self._routes: list[tuple[re.Pattern[str], str, dict[str, Any], OpenAPI]] = []
        for spec in specs:
            drop_security(spec)  # quirk 1
            if "/v1/notifications/verify-webhook-signature" in spec["paths"]:
                _patch_webhooks(spec)
            api = OpenAPI.from_dict(spec)
            self._apis.append((api, spec))
            for template in spec["paths"]:
                self._routes.append((path_pattern(template), template, spec, api))
        # Literal paths before templated ones.
        self._routes.sort(key=lambda route: route[1].count("{"))

    @classmethod
    @cache
    def load(cls) -> PayPalSpec:
        return cls([_load(name) for name in SPEC_FILES])

    def _find(self, method: str, path: str) -> tuple[Operation, dict[str, Any], OpenAPI] | None:
        for pattern, template, spec, api in self._routes:
            match = pattern.match(path)
            if match and method.lower() in spec["paths"][template]:
                return Operation(method.lower(), template, match.groupdict()), spec, api
        return None

    def operation(self, method: str, path: str) -> Operation | None:
        found = self._find(method, path)
        return found[0] if found else None

    def check_request(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[Operation | None, list[Violation]]:
        """The operation ``method path`` is, and every way the request departs from it."""
        found = self._find(method, path)
        if found is None:
            known = any(pattern.match(path) for pattern, *_ in self._routes)
            problem = "method not allowed on this path" if known else "unknown path"
            return None, [Violation(method, path, problem)]
        operation, spec, api = found
        problems: list[str] = []
        request = mock_request(SPEC_HOST, method, path, query, headers, body)
        try:
            api.validate_request(request)
        except Exception as error:  # openapi-core's errors share no useful base
            problems.append(openapi_messages(error))
        if body:
            try:
                decoded = json.loads(body)
            except ValueError:
                problems.append("the body is not JSON")
            else:
                schema = json_body_schema(spec, operation)
                if schema is not None:
                    problems.extend(  # quirk 5
                        f"body {where}: field not in PayPal's description"
                        for where in unknown_fields(decoded, schema, spec)
                    )
        return operation, [Violation(method, path, problem) for problem in problems]

    def check_response(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        status: int,
        response_body: bytes,
    ) -> list[Violation]:
        """Every way the fake's own answer departs from the description."""
        found = self._find(method, path)
        if found is None or status in UNDECLARED_STATUSES:
            return []
        _, _, api = found
        request = mock_request(SPEC_HOST, method, path, query, headers, body)
        response = MockResponse(response_body, status_code=status)
        try:
            api.validate_response(request, response)
        except Exception as error:
            return [Violation(method, path, f"response {status}: {openapi_messages(error)}")]
        return []


# -- the token endpoint (quirk 2) -----------------------------------------------------------


def check_token_request(
    method: str, headers: Mapping[str, str], body: bytes
) -> tuple[dict[str, str], list[str]]:
    """PayPal's ``POST /v1/oauth2/token``, as its docs describe it: Basic auth, a form body
    with ``grant_type=client_credentials``. Returns the form and the problems."""
    problems = []
    if method.upper() != "POST":
        problems.append("the token endpoint takes POST")
    content_type = headers.get("content-type", "").split(";")[0].strip()
    if content_type != "application/x-www-form-urlencoded":
        problems.append(f"the token request must be a form, not {content_type or 'nothing'}")
    try:
        form = dict(parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True))
    except (UnicodeDecodeError, ValueError):
        return {}, [*problems, "the token request body is not a form"]
    if form.get("grant_type") != "client_credentials":
        problems.append("grant_type must be client_credentials")
    unknown = set(form) - {"grant_type"}  # the only field client credentials need
    if unknown:
        problems.append(f"unknown token request fields {sorted(unknown)}")
    if not headers.get("authorization", "").startswith("Basic "):
        problems.append("the token request must use HTTP Basic authentication")
    return form, problems
