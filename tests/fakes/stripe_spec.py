"""Checks requests against Stripe's published OpenAPI description (../shared/specs/stripe).

Stripe sends form-encoded bodies and query strings in bracket notation
(``line_items[0][price_data][currency]=eur``). They are decoded here into nested objects,
scalars are coerced by the schema's types (everything arrives as a string), and the result is
validated with ``openapi-schema-validator`` (OAS 3.0). Generic OpenAPI request validators do
not understand Stripe's deepObject bodies, which is why this exists.

Stripe rejects unknown parameters at any depth ("Received unknown parameter: ..."), but the
description only closes the top level of each body (``additionalProperties: false``). Nested
objects that list their ``properties`` and say nothing about extra ones are closed here too,
so a misspelt nested parameter is caught as Stripe would catch it.

The description is from 2022 and the SDK pins a newer API version. A parameter the SDK sends
that the description lacks is a violation unless it is in ``ALLOWED_UNDOCUMENTED``, an
explicit and short list where each entry says why it is there.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from openapi_schema_validator import OAS30Validator

from tests.fakes.openapi_check import Violation, path_pattern
from tests.fakes.specs import specs_dir

# (method, path template, parameter path): parameters the SDK may send that the 2022
# description lacks. Keep it short; each entry needs a reason.
ALLOWED_UNDOCUMENTED: frozenset[tuple[str, str, str]] = frozenset(
    {
        # The 2022 description types billing_cycle_anchor as "now" | "unchanged"; SDK 16.1
        # (API version 2026-10-28) types it as an object {type: "now" | "unchanged"}
        # (SubscriptionUpdateParamsBillingCycleAnchor). The fake checks the object's shape.
        ("POST", "/v1/subscriptions/{subscription_exposed_id}", "billing_cycle_anchor"),
    }
)


def stripe_spec_path() -> Path:
    path = specs_dir() / "stripe" / "spec3.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"Stripe's OpenAPI description not found at {path}; set PAYMENT_SPECS_DIR to the "
            "directory holding stripe/spec3.json (CI clones shared/ beside the repo)"
        )
    return path


@cache
def load_fixtures() -> dict[str, Any]:
    """Stripe's sample objects (fixtures3.json), keyed by object type."""
    path = specs_dir() / "stripe" / "fixtures3.json"
    resources: dict[str, Any] = json.loads(path.read_text())["resources"]
    return resources


# -- bracket notation --------------------------------------------------------------------

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class DecodeError(ValueError):
    pass


def decode_brackets(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """``[("a[b][0]", "x")]`` -> ``{"a": {"b": {"0": "x"}}}``; ``a[]`` appends."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY.match(key)
        if match is None:
            raise DecodeError(f"malformed parameter name {key!r}")
        parts = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        node: dict[str, Any] = root
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if part == "":
                part = str(len(node))  # a[] appends: the next free index
            if last:
                if part in node:
                    raise DecodeError(f"parameter {key!r} given twice")
                node[part] = value
            else:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise DecodeError(f"parameter {key!r} is both a value and an object")
                node = child
    return root


def decode_form(body: bytes) -> dict[str, Any]:
    text = body.decode("utf-8")
    return decode_brackets(parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text)))


# -- coercion by schema ------------------------------------------------------------------


def _fits(value: Any, schema: Mapping[str, Any]) -> bool:
    return not any(True for _ in OAS30Validator(schema).iter_errors(value))


def coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    """Turn the strings of a decoded form into the types ``schema`` asks for."""
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            candidates = [coerce(value, option) for option in schema[combinator]]
            for option, candidate in zip(schema[combinator], candidates, strict=True):
                if _fits(candidate, option):
                    return candidate
            return candidates[0]
    kind = schema.get("type")
    if kind == "array" and isinstance(value, dict) and all(key.isdigit() for key in value):
        indexes = sorted(value, key=int)
        if [int(index) for index in indexes] == list(range(len(value))):
            value = [value[index] for index in indexes]
    if kind == "array" and isinstance(value, list):
        items = schema.get("items", {})
        return [coerce(item, items) for item in value]
    if kind == "object" and isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        result = {}
        for key, item in value.items():
            if key in properties:
                result[key] = coerce(item, properties[key])
            elif isinstance(extra, Mapping):
                result[key] = coerce(item, extra)
            else:
                result[key] = item
        return result
    if isinstance(value, str):
        if kind == "integer" and re.fullmatch(r"-?\d+", value):
            return int(value)
        if kind == "number" and re.fullmatch(r"-?\d+(\.\d+)?", value):
            return float(value)
        if kind == "boolean" and value in ("true", "false"):
            return value == "true"
    return value


def close_objects(schema: Any) -> Any:
    """A copy of ``schema`` where objects that list properties refuse unknown ones."""
    if isinstance(schema, list):
        return [close_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: close_objects(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


# -- the description -----------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    path_params: dict[str, str]
    spec: Mapping[str, Any]


class StripeSpec:
    def __init__(self, spec: Mapping[str, Any]) -> None:
        self._spec = spec
        self._routes: list[tuple[re.Pattern[str], str]] = []
        for template in spec["paths"]:
            self._routes.append((path_pattern(template), template))
        # Literal paths before templated ones: /v1/checkout/sessions before /v1/{x}/...
        self._routes.sort(key=lambda route: route[1].count("{"))
        self._body_schemas: dict[tuple[str, str], dict[str, Any] | None] = {}

    @classmethod
    @cache
    def load(cls) -> StripeSpec:
        return cls(json.loads(stripe_spec_path().read_text()))

    def operation(self, method: str, path: str) -> Operation | None:
        method = method.lower()
        for pattern, template in self._routes:
            match = pattern.match(path)
            if match and method in self._spec["paths"][template]:
                return Operation(
                    method, template, match.groupdict(), self._spec["paths"][template][method]
                )
        return None

    def path_exists(self, path: str) -> bool:
        return any(pattern.match(path) for pattern, _ in self._routes)

    def _body_schema(self, operation: Operation) -> dict[str, Any] | None:
        key = (operation.method, operation.template)
        if key not in self._body_schemas:
            content = (operation.spec.get("requestBody") or {}).get("content", {})
            form = content.get("application/x-www-form-urlencoded")
            self._body_schemas[key] = close_objects(form["schema"]) if form else None
        return self._body_schemas[key]

    def validate(
        self, method: str, path: str, query: Mapping[str, Any], body: Mapping[str, Any]
    ) -> tuple[Operation | None, dict[str, Any], dict[str, Any], list[Violation]]:
        """Check one decoded request. Returns the operation, the coerced query and body,
        and every way the request departs from the description."""
        problems: list[str] = []
        operation = self.operation(method, path)
        if operation is None:
            known = self.path_exists(path)
            problem = "method not allowed on this path" if known else "unknown path"
            return None, dict(query), dict(body), [Violation(method, path, problem)]

        # Allow-listed parameters skip validation but still reach the fake's handlers
        # (top-level ones, as sent: the handler checks their shape itself).
        passed_through = {
            name: value
            for name, value in body.items()
            if (method.upper(), operation.template, name) in ALLOWED_UNDOCUMENTED
        }
        query = _drop_allowed(method, operation.template, query)
        body = _drop_allowed(method, operation.template, body)

        parameters = operation.spec.get("parameters", [])
        for parameter in parameters:
            if parameter["in"] == "path":
                value = operation.path_params.get(parameter["name"], "")
                for error in OAS30Validator(parameter["schema"]).iter_errors(value):
                    problems.append(f"path parameter {parameter['name']}: {error.message}")
        query_schemas = {p["name"]: p for p in parameters if p["in"] == "query"}
        coerced_query: dict[str, Any] = {}
        for name, value in query.items():
            parameter = query_schemas.get(name)
            if parameter is None:
                problems.append(f"unknown query parameter {name!r}")
                coerced_query[name] = value
                continue
            coerced_query[name] = coerce(value, parameter["schema"])
            for error in OAS30Validator(parameter["schema"]).iter_errors(coerced_query[name]):
                problems.append(f"query parameter {name}: {error.message}")
        for name, parameter in query_schemas.items():
            if parameter.get("required") and name not in query:
                problems.append(f"missing required query parameter {name!r}")

        schema = self._body_schema(operation)
        coerced_body: dict[str, Any] = dict(body)
        if schema is None:
            if body:
                problems.append("this operation takes no request body")
        else:
            coerced_body = coerce(dict(body), schema)
            for error in OAS30Validator(schema).iter_errors(coerced_body):
                where = "/".join(str(part) for part in error.absolute_path) or "(body)"
                problems.append(f"body {where}: {error.message}")
        coerced_body.update(passed_through)
        return (
            operation,
            coerced_query,
            coerced_body,
            [Violation(method, path, problem) for problem in problems],
        )


def _drop_allowed(method: str, template: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Remove allow-listed undocumented parameters before validation (from a copy: ``values``
    is left as it was)."""
    allowed = [
        parameter
        for allowed_method, allowed_template, parameter in ALLOWED_UNDOCUMENTED
        if (allowed_method, allowed_template) == (method.upper(), template)
    ]
    if not allowed:
        # Nothing to remove, so nothing to copy: validating and coercing never change their input.
        return dict(values)
    kept = copy.deepcopy(dict(values))
    for parameter in allowed:
        *parents, leaf = parameter.split(".")
        node: Any = kept
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return kept
