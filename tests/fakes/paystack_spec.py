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

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import parse_qsl

import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from tests.fakes.paypal_spec import unknown_fields
from tests.fakes.specs import specs_dir

SPEC_HOST = "https://api.paystack.co"
UNDECLARED_STATUSES = frozenset({429})

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


@dataclass(frozen=True)
class Violation:
    method: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}: {self.problem}"


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    path_params: dict[str, str]


def _load() -> dict[str, Any]:
    path = specs_dir() / "paystack" / "paystack.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"Paystack's OpenAPI description not found at {path}; set PAYMENT_SPECS_DIR to the "
            "directory holding paystack/paystack.yaml (CI clones shared/ beside the repo)"
        )
    spec: dict[str, Any] = yaml.safe_load(path.read_text())
    return spec


def _patch(spec: dict[str, Any]) -> None:
    # Quirk 1.
    spec.pop("security", None)
    for item in spec["paths"].values():
        for operation in item.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
    # Quirk 2.
    for (method, template), parameters in ALLOWED_EXTRA_QUERY.items():
        operation = spec["paths"][template][method]
        operation.setdefault("parameters", []).extend(parameters)
    # Quirk 4.
    verify = spec["components"]["schemas"]["VerifyResponse"]["properties"]["data"]
    verify["properties"]["plan_object"].pop("oneOf", None)


def _messages(error: BaseException) -> str:
    parts = [str(error).split(": Value ")[0]]
    cause = error.__cause__
    schema_errors = getattr(cause, "schema_errors", None) or ()
    for schema_error in schema_errors:
        where = "/".join(str(p) for p in getattr(schema_error, "absolute_path", ())) or "(root)"
        parts.append(f"{where}: {schema_error.message}")
    if not schema_errors and cause is not None:
        parts.append(str(cause))
    return "; ".join(parts)


class PaystackSpec:
    """The description, patched for its quirks, and checks against it."""

    def __init__(self, spec: dict[str, Any]) -> None:
        _patch(spec)
        self._spec = spec
        self._api = OpenAPI.from_dict(spec)
        self._routes: list[tuple[re.Pattern[str], str]] = []
        for template in spec["paths"]:
            pattern = re.sub(r"\\\{([^}]+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            self._routes.append((re.compile(f"^{pattern}$"), template))
        self._routes.sort(key=lambda route: route[1].count("{"))  # literal paths first

    @classmethod
    @cache
    def load(cls) -> PaystackSpec:
        return cls(_load())

    def _find(self, method: str, path: str) -> Operation | None:
        for pattern, template in self._routes:
            match = pattern.match(path)
            if match and method.lower() in self._spec["paths"][template]:
                return Operation(method.lower(), template, match.groupdict())
        return None

    def _mock_request(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> MockRequest:
        return MockRequest(
            SPEC_HOST,
            method.lower(),
            path,
            args=dict(parse_qsl(query, keep_blank_values=True)),
            headers=dict(headers),
            data=body or None,
            content_type=headers.get("content-type", "application/json").split(";")[0],
        )

    def check_request(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[Operation | None, list[Violation]]:
        operation = self._find(method, path)
        if operation is None:
            known = any(pattern.match(path) for pattern, _ in self._routes)
            problem = "method not allowed on this path" if known else "unknown path"
            return None, [Violation(method, path, problem)]
        problems: list[str] = []
        try:
            self._api.validate_request(self._mock_request(method, path, query, headers, body))
        except Exception as error:  # openapi-core's errors share no useful base
            problems.append(_messages(error))
        definition = self._spec["paths"][operation.template][operation.method]
        declared = {p["name"] for p in definition.get("parameters", []) if p.get("in") == "query"}
        for name, _ in parse_qsl(query, keep_blank_values=True):
            if name not in declared:
                problems.append(f"query parameter {name!r} not in Paystack's description")
        if body:
            try:
                decoded = json.loads(body)
            except ValueError:
                problems.append("the body is not JSON")
            else:
                content = (definition.get("requestBody") or {}).get("content", {})
                media = content.get("application/json")
                if media is not None:
                    problems.extend(
                        f"body {where}: field not in Paystack's description"
                        for where in unknown_fields(decoded, media["schema"], self._spec)
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
        if self._find(method, path) is None or status in UNDECLARED_STATUSES:
            return []
        request = self._mock_request(method, path, query, headers, body)
        response = MockResponse(response_body, status_code=status)
        try:
            self._api.validate_response(request, response)
        except Exception as error:
            return [Violation(method, path, f"response {status}: {_messages(error)}")]
        return []
