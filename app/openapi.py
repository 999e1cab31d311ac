"""The OpenAPI document, made true to what the service answers.

FastAPI's generator describes a 422 as ``application/json`` with its own validation-error
schema, and knows nothing of the errors our middleware and handlers send; here every error
response becomes ``application/problem+json`` with the ``Problem`` schema, every operation
that reads a body documents 400 (malformed), 413 (too large) and 422 (invalid), and the plan
and provider fields of create-intent list the values this deployment accepts.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.settings import Settings
from services.payment_providers.factory import discover_provider_classes

PROBLEM = {"$ref": "#/components/schemas/Problem"}
_BODY_ERRORS = {
    "400": "Malformed request body (invalid_body, invalid_json)",
    "413": "Request body too large",
    "422": "Invalid request",
}
# For the routes where a bearer token is optional (an anonymous caller is served, a bad token
# is still a 401): FastAPI documents every security dependency as required; this extra
# requirement, the empty one, is merged into the operation's list and says "or none".
OPTIONAL_TOKEN: dict[str, Any] = {"security": [{}]}
# For the routes whose request the sender's signature authenticates (provider webhooks): no
# bearer token is read there at all (Authorization may carry the vendor's own scheme).
SIGNATURE_ONLY: dict[str, Any] = {"x-authentication": "signature of the sender"}


def install(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            _problems_everywhere(schema)
            _catalogue_values(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way


def _problems_everywhere(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            if "x-authentication" in operation:
                operation["security"] = []
            responses = operation.setdefault("responses", {})
            if "requestBody" in operation:
                for status, description in _BODY_ERRORS.items():
                    responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    response["content"] = {"application/problem+json": {"schema": PROBLEM}}
    # FastAPI's own validation-error models: nothing answers with them.
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _catalogue_values(schema: dict[str, Any], settings: Settings) -> None:
    """create-intent's ``plan`` and ``provider`` as this deployment's plans and providers."""
    body = schema["components"]["schemas"].get("CreateIntentRequest")
    if body is None:
        return
    properties = body["properties"]
    properties["plan"]["enum"] = sorted(settings.payment_plans)
    providers = sorted(discover_provider_classes())
    for name in ("provider", "payment_method"):
        field = properties.get(name)
        if field is None:
            continue
        for branch in field.get("anyOf", [field]):
            if branch.get("type") == "string":
                branch["enum"] = providers
