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
   operation lists it; its body is the ordinary error envelope), ``OpenAPIDescription``'s
   default.
4. The description is a 36 000-line YAML file: it is parsed once per test session.

Nothing newer than the description is allowed: the provider sends only fields it names.
"""

from __future__ import annotations

from functools import cache

from tests.fakes.openapi_check import OpenAPIDescription, drop_security, load_description

# The host the description names as its server; requests are checked as if sent there.
SPEC_HOST = "https://sandbox-api.paddle.com"


class PaddleSpec(OpenAPIDescription):
    """The description, without its security requirements (quirk 1), and checks against it
    (quirk 2: body fields it does not name are violations)."""

    @classmethod
    @cache
    def load(cls) -> PaddleSpec:
        spec = load_description("paddle/openapi.yaml", "Paddle")
        drop_security(spec)
        return cls(spec, vendor="Paddle", host=SPEC_HOST)
