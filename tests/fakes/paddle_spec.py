"""Checks requests and responses against Paddle's published OpenAPI description
(../shared/specs/paddle/openapi.yaml: Paddle Billing API, OpenAPI 3.1, May 2025).

Paddle speaks JSON, so ``openapi-core`` validates path, method, query parameters and bodies
directly. What needs handling, each explicitly:

1. Security: every operation names the ``bearerAuth`` scheme. It is dropped; the fake checks
   the Bearer API key itself (and answers as Paddle does when it is wrong).
2. Most objects are open (no ``additionalProperties: false``), so a misspelt field would pass
   although Paddle would ignore it, silently. Request bodies are also checked for fields the
   description does not name (``unknown_fields``). Paddle's items are a ``oneOf`` of three
   shapes: a field counts as unknown only when no shape names it.
3. Responses Paddle sends but the description does not declare are not validated: 429 (no
   operation lists it; its body is the ordinary error envelope). See ``UNDECLARED_STATUSES``.
4. The description is a 36 000-line YAML file: it is parsed once per test session.

Nothing newer than the description is allowed: the provider sends only fields it names.
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

from tests.fakes.paypal_spec import _branches
from tests.fakes.specs import specs_dir

SPEC_FILE = "paddle/openapi.yaml"
# The host the description names as its server; requests are checked as if sent there.
SPEC_HOST = "https://sandbox-api.paddle.com"
UNDECLARED_STATUSES = frozenset({429})


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
    path = specs_dir() / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"Paddle's OpenAPI description not found at {path}; set PAYMENT_SPECS_DIR to the "
            "directory holding paddle/openapi.yaml (CI clones shared/ beside the repo)"
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec: dict[str, Any] = yaml.load(path.read_text(), Loader=loader)  # noqa: S506  # safe loader
    return spec


def _messages(error: BaseException) -> str:
    """openapi-core's error with the schema errors under it, one line."""
    parts = [str(error).split(": Value ")[0]]
    cause = error.__cause__
    schema_errors = getattr(cause, "schema_errors", None) or ()
    for schema_error in schema_errors:
        where = "/".join(str(p) for p in getattr(schema_error, "absolute_path", ())) or "(root)"
        parts.append(f"{where}: {schema_error.message}")
    if not schema_errors and cause is not None:
        parts.append(str(cause))
    return "; ".join(parts)


def unknown_fields(
    value: Any, schema: Mapping[str, Any], spec: Mapping[str, Any], where: str = ""
) -> list[str]:
    """JSON pointers of object members that no branch of ``schema`` names."""
    branches = list(_branches(schema, spec))
    if isinstance(value, dict):
        properties: dict[str, list[Mapping[str, Any]]] = {}
        open_object = False
        named_any = False
        for branch in branches:
            extra = branch.get("additionalProperties")
            if extra is True or isinstance(extra, Mapping):
                open_object = True
            for name, sub in branch.get("properties", {}).items():
                named_any = True
                properties.setdefault(name, []).append(sub)
        if not named_any:
            return []  # a free-form object (like custom_data)
        found: list[str] = []
        for key, item in value.items():
            pointer = f"{where}/{key}"
            if key not in properties:
                if not open_object:
                    found.append(pointer)
                continue
            # Unknown below only if unknown to every schema that names this member.
            verdicts = [unknown_fields(item, sub, spec, pointer) for sub in properties[key]]
            found.extend(min(verdicts, key=len))
        return found
    if isinstance(value, list):
        for branch in branches:
            if "items" in branch:
                return [
                    pointer
                    for index, item in enumerate(value)
                    for pointer in unknown_fields(item, branch["items"], spec, f"{where}/{index}")
                ]
    return []


class PaddleSpec:
    """The description, without its security requirements, and checks against it."""

    def __init__(self, spec: dict[str, Any]) -> None:
        spec.pop("security", None)  # quirk 1
        for item in spec["paths"].values():
            for operation in item.values():
                if isinstance(operation, dict):
                    operation.pop("security", None)
        self._spec = spec
        self._api = OpenAPI.from_dict(spec)
        self._routes: list[tuple[re.Pattern[str], str]] = []
        for template in spec["paths"]:
            pattern = re.sub(r"\\\{([^}]+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            self._routes.append((re.compile(f"^{pattern}$"), template))
        # Literal paths before templated ones.
        self._routes.sort(key=lambda route: route[0].pattern.count("(?P<"))

    @classmethod
    @cache
    def load(cls) -> PaddleSpec:
        return cls(_load())

    def operation(self, method: str, path: str) -> Operation | None:
        for pattern, template in self._routes:
            match = pattern.match(path)
            if match and method.lower() in self._spec["paths"][template]:
                return Operation(method.lower(), template, match.groupdict())
        return None

    @staticmethod
    def _mock_request(
        method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
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
        """The operation ``method path`` is, and every way the request departs from it."""
        operation = self.operation(method, path)
        if operation is None:
            known = any(pattern.match(path) for pattern, _ in self._routes)
            problem = "method not allowed on this path" if known else "unknown path"
            return None, [Violation(method, path, problem)]
        problems: list[str] = []
        try:
            self._api.validate_request(self._mock_request(method, path, query, headers, body))
        except Exception as error:  # openapi-core's errors share no useful base
            problems.append(_messages(error))
        if body:
            try:
                decoded = json.loads(body)
            except ValueError:
                problems.append("the body is not JSON")
            else:
                schema = self._body_schema(operation)
                if schema is not None:
                    problems.extend(
                        f"body {where}: field not in Paddle's description"
                        for where in unknown_fields(decoded, schema, self._spec)
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
        response_headers: Mapping[str, str] | None = None,
    ) -> list[Violation]:
        """Every way the fake's own answer departs from the description."""
        if self.operation(method, path) is None or status in UNDECLARED_STATUSES:
            return []
        request = self._mock_request(method, path, query, headers, body)
        response = MockResponse(
            response_body, status_code=status, headers=dict(response_headers or {})
        )
        try:
            self._api.validate_response(request, response)
        except Exception as error:
            return [Violation(method, path, f"response {status}: {_messages(error)}")]
        return []

    def _body_schema(self, operation: Operation) -> dict[str, Any] | None:
        definition = self._spec["paths"][operation.template][operation.method]
        content = (definition.get("requestBody") or {}).get("content", {})
        media = content.get("application/json")
        return media["schema"] if media else None

    def schema(self, name: str) -> dict[str, Any]:
        """A schema of the description's components, by name."""
        found: dict[str, Any] = self._spec["components"]["schemas"][name]
        return found
