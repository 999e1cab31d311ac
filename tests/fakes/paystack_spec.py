"""Checks requests and responses against Paystack's published OpenAPI description
(../shared/specs/paystack/paystack.yaml, PaystackOSS/openapi at 9678dea).

Paystack speaks JSON, so ``openapi-core`` validates paths, methods, query parameters and bodies
directly. Where the description and Paystack's API reference part ways, the difference is
handled here explicitly, each in one place:

1. Security: ``bearerAuth`` (the secret key as a Bearer token) is dropped from the description;
   the fake checks the key itself and answers 401 ``Invalid key`` as Paystack does.
2. Allow-list, newer than the description: ``GET /refund`` takes ``transaction`` (and
   ``currency``) to list one transaction's refunds (paystack.com/docs/api/refund/#list); the
   description names only perPage, page, from and to. Both are added to the operation.
3. The description leaves request objects open (no ``additionalProperties: false``), so a
   misspelt field would pass although Paystack would ignore it: request bodies are also
   checked for fields the description does not name (``unknown_fields``).
4. Responses: 429 is declared by no operation (its body is Paystack's usual error envelope).
   ``VerifyResponse.data.plan_object`` carries a generated ``oneOf`` that no object satisfies
   (both branches match an empty object), so it is dropped from that schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from tests.fakes.openapi_check import OpenAPIDescription, drop_security, load_description

SPEC_HOST = "https://api.paystack.co"

# Quirk 2: query parameters Paystack's API reference documents and the description lacks.
ALLOWED_EXTRA_QUERY: Mapping[tuple[str, str], list[dict[str, Any]]] = {
    ("get", "/refund"): [
        {
            "in": "query",
            "name": "transaction",
            "description": "ID or reference of the transaction whose refunds to list",
            "schema": {"type": "string"},
        },
        {"in": "query", "name": "currency", "schema": {"type": "string"}},
    ],
}


def _patch(spec: dict[str, Any]) -> None:
    drop_security(spec)  # quirk 1
    # Quirk 2.
    for (method, template), parameters in ALLOWED_EXTRA_QUERY.items():
        operation = spec["paths"][template][method]
        operation.setdefault("parameters", []).extend(parameters)
    # Quirk 4.
    verify = spec["components"]["schemas"]["VerifyResponse"]["properties"]["data"]
    verify["properties"]["plan_object"].pop("oneOf", None)


class PaystackSpec(OpenAPIDescription):
    """The description, patched for its quirks, and checks against it (quirk 3: body fields
    it does not name, and query parameters it does not declare, are violations)."""

    @classmethod
    @cache
    def load(cls) -> PaystackSpec:
        spec = load_description("paystack/paystack.yaml", "Paystack")
        _patch(spec)
        return cls(spec, vendor="Paystack", host=SPEC_HOST, check_query=True)
