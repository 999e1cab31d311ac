"""OpenAPI descriptions of the problem responses each endpoint can give."""

from __future__ import annotations

from typing import Any

from models.payment import Problem

_DESCRIPTIONS = {
    400: "Bad request or unverifiable webhook",
    401: "Missing, invalid or expired bearer token",
    402: "Payment declined",
    403: "Not an administrator",
    404: "Payment not found (or not yours)",
    409: "The payment is not in a state that allows this",
    413: "Request body too large",
    422: "Invalid request",
    429: "Rate limited; see Retry-After",
    502: "The provider answered with an error",
    503: "Store or provider unavailable; see Retry-After",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "model": Problem,
            "description": _DESCRIPTIONS[status],
            "content": {"application/problem+json": {}},
        }
        for status in statuses
    }
