"""What the fakes share to check requests and answers against a vendor's OpenAPI description
(../shared/specs): the violation record, openapi-core's errors as one line, the check for body
fields a description does not name, and, for a vendor described by one JSON document,
``OpenAPIDescription``, which finds the operation a request is for and checks both ways.

Each vendor's quirks (a description that is wrong or older than the vendor's reference) stay
in the vendor's own ``*_spec.py`` or fake, patched into the description before it is used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from tests.fakes.specs import specs_dir


@dataclass(frozen=True)
class Violation:
    """One way a request (or the fake's own answer) departs from the vendor's description."""

    method: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.method} {self.path}: {self.problem}"


@dataclass(frozen=True)
class Operation:
    method: str  # lower case, as the description's keys
    template: str  # the description's path, e.g. /transaction/verify/{reference}
    path_params: dict[str, str]


def load_description(relative: str, vendor: str) -> dict[str, Any]:
    """The YAML (or JSON) description at ``specs_dir() / relative``; a clear error when the
    shared specs are not beside the repo."""
    path: Path = specs_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{vendor}'s OpenAPI description not found at {path}; set PAYMENT_SPECS_DIR to the "
            f"directory holding {relative} (CI clones shared/ beside the repo)"
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec: dict[str, Any] = yaml.load(path.read_text(), Loader=loader)  # noqa: S506  # safe loader
    return spec


def drop_security(spec: dict[str, Any]) -> None:
    """Remove the description's security requirements: a fake checks the credentials itself
    and answers as the vendor does, which openapi-core cannot."""
    spec.pop("security", None)
    for item in spec["paths"].values():
        for operation in item.values():
            if isinstance(operation, dict):
                operation.pop("security", None)


def path_pattern(template: str) -> re.Pattern[str]:
    """A regex that matches the paths of a description's ``template``, naming its
    parameters (``/orders/{id}`` matches ``/orders/O-1`` with ``id`` = ``O-1``)."""
    pattern = re.sub(r"\\\{([^}]+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    return re.compile(f"^{pattern}$")


def mock_request(
    host: str, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
) -> MockRequest:
    """The request as openapi-core reads it, as if sent to ``host``."""
    return MockRequest(
        host,
        method.lower(),
        path,
        args=dict(parse_qsl(query, keep_blank_values=True)),
        headers=dict(headers),
        data=body or None,
        content_type=headers.get("content-type", "application/json").split(";")[0],
    )


def json_body_schema(spec: Mapping[str, Any], operation: Operation) -> dict[str, Any] | None:
    """The JSON request body's schema of ``operation``, if it takes one."""
    definition = spec["paths"][operation.template][operation.method]
    content = (definition.get("requestBody") or {}).get("content", {})
    media = content.get("application/json")
    return media["schema"] if media else None


def openapi_messages(error: BaseException) -> str:
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


def _resolve(schema: Mapping[str, Any], spec: Mapping[str, Any]) -> Mapping[str, Any]:
    seen = 0
    while "$ref" in schema and seen < 50:
        node: Any = spec
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
        seen += 1
    return schema


def _branches(schema: Mapping[str, Any], spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """``schema`` and every schema it is composed of (allOf/anyOf/oneOf), resolved."""
    schema = _resolve(schema, spec)
    yield schema
    for combinator in ("allOf", "anyOf", "oneOf"):
        for option in schema.get(combinator, ()):
            yield from _branches(option, spec)


def unknown_fields(
    value: Any, schema: Mapping[str, Any], spec: Mapping[str, Any], where: str = ""
) -> list[str]:
    """JSON pointers of object members that no branch of ``schema`` names. Descriptions
    leave objects open (no ``additionalProperties: false``), so a misspelt field would pass
    openapi-core although the vendor would ignore it."""
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
            return []  # a free-form object (metadata, custom data)
        found: list[str] = []
        for key, item in value.items():
            pointer = f"{where}/{key}"
            if key not in properties:
                if not open_object:
                    found.append(pointer)
                continue
            # Unknown below only if unknown to every schema that names this member.
            verdicts = [unknown_fields(item, sub, spec, pointer) for sub in properties[key]]
            fewest: list[str] = min(verdicts, key=len)
            found.extend(fewest)
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


class OpenAPIDescription:
    """One vendor description (already patched for its quirks), and the checks against it.

    ``host`` is the server the description names (openapi-core matches on it);
    ``undeclared_statuses`` are answers the vendor gives that no operation declares (a 429),
    whose bodies are not checked; with ``check_query``, query parameters the operation does
    not declare are violations too (openapi-core lets them pass).
    """

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        vendor: str,
        host: str,
        undeclared_statuses: frozenset[int] = frozenset({429}),
        check_query: bool = False,
    ) -> None:
        self._spec = spec
        self._vendor = vendor
        self._host = host
        self._undeclared = undeclared_statuses
        self._check_query = check_query
        self._api = OpenAPI.from_dict(spec)
        self._routes: list[tuple[re.Pattern[str], str]] = []
        for template in spec["paths"]:
            self._routes.append((path_pattern(template), template))
        # Literal paths before templated ones.
        self._routes.sort(key=lambda route: route[1].count("{"))

    def operation(self, method: str, path: str) -> Operation | None:
        for pattern, template in self._routes:
            match = pattern.match(path)
            if match and method.lower() in self._spec["paths"][template]:
                return Operation(method.lower(), template, match.groupdict())
        return None

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
            self._api.validate_request(mock_request(self._host, method, path, query, headers, body))
        except Exception as error:  # openapi-core's errors share no useful base
            problems.append(openapi_messages(error))
        definition = self._spec["paths"][operation.template][operation.method]
        if self._check_query:
            declared = {
                p["name"] for p in definition.get("parameters", []) if p.get("in") == "query"
            }
            problems.extend(
                f"query parameter {name!r} not in {self._vendor}'s description"
                for name, _ in parse_qsl(query, keep_blank_values=True)
                if name not in declared
            )
        if body:
            try:
                decoded = json.loads(body)
            except ValueError:
                problems.append("the body is not JSON")
            else:
                schema = self.body_schema(operation)
                if schema is not None:
                    problems.extend(
                        f"body {where}: field not in {self._vendor}'s description"
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
        if self.operation(method, path) is None or status in self._undeclared:
            return []
        request = mock_request(self._host, method, path, query, headers, body)
        response = MockResponse(
            response_body, status_code=status, headers=dict(response_headers or {})
        )
        try:
            self._api.validate_response(request, response)
        except Exception as error:
            return [Violation(method, path, f"response {status}: {openapi_messages(error)}")]
        return []

    def body_schema(self, operation: Operation) -> dict[str, Any] | None:
        """The JSON request body's schema of ``operation``, if it takes one."""
        return json_body_schema(self._spec, operation)

    def schema(self, name: str) -> dict[str, Any]:
        """A schema of the description's components, by name."""
        found: dict[str, Any] = self._spec["components"]["schemas"][name]
        return found
