"""Vendors' webhook bodies, parsed within bounds.

A webhook body is read before anything in it can be trusted (PayPal's even before its
signature is checked, since the check needs the event's own fields), so reading it must cost
little and fail as a bad payload, whatever it holds. ``json.loads`` alone does neither: it
recurses once per level of nesting, so a body of 200 000 ``[`` (400 kB, well within the
webhook body limit) raises RecursionError, not ValueError; it reads ``1e999999`` as infinity
and ``NaN`` as a number; it keeps the last of two equal keys, where the vendor's parser may
have kept the first; and it turns a ``\\ud800`` escape into a string that no UTF-8 text can
hold, which fails later, wherever the string is written.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from services.errors import InvalidWebhookPayload

# Deeper than any vendor's event (Stripe's and PayPal's reach about ten levels, the sandbox's
# three) and far shallower than the interpreter's recursion limit.
MAX_DEPTH = 64
# The service's default limit on a webhook body (Settings.max_webhook_body_bytes), so that
# what a parse costs is bounded whoever calls it.
MAX_BYTES = 1024 * 1024

# A JSON string, its closing quote optional: an unterminated string then runs to the end of
# the body in one match, instead of each escaped quote in it starting a new, failing one
# (which would make the scan quadratic). The parser fails there anyway.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_A_BRACKET = bytes(byte for byte in range(256) if byte not in b"[]{}")
_OPENERS = frozenset(b"[{")
# Only a \uD800-\uDFFF escape can put a surrogate in a string parsed from UTF-8 text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def load_json(body: bytes, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Any:
    """The JSON value ``body`` holds.

    Raises InvalidWebhookPayload unless ``body`` is at most ``max_bytes`` of UTF-8 text
    holding one JSON value nested at most ``max_depth`` deep, whose numbers are finite, whose
    objects name each key once and whose strings are all Unicode text.
    """
    if len(body) > max_bytes:
        raise InvalidWebhookPayload(f"The webhook body is over {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidWebhookPayload("The webhook body is not UTF-8 text") from error
    if nests_deeper_than(body, max_depth):
        raise InvalidWebhookPayload(f"The webhook body nests deeper than {max_depth} levels")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
        if _SURROGATE_ESCAPE.search(text):
            # Rare (vendors send UTF-8 as it is), so the exact check runs only then.
            json.dumps(value, ensure_ascii=False).encode()
    except ValueError as error:  # JSONDecodeError, an integer too long, a lone surrogate
        raise InvalidWebhookPayload("The webhook body is not valid JSON") from error
    return value


def nests_deeper_than(body: bytes, max_depth: int) -> bool:
    """Whether the JSON text in ``body`` nests arrays and objects over ``max_depth`` deep.

    One pass that counts brackets outside strings, with no recursion: safe on any input.
    Where ``body`` is not JSON, the count is the parser's up to the point where the parser
    fails, so the parser never goes deeper than this allows.
    """
    depth = 0
    for byte in _STRING.sub(b"", body).translate(None, _NOT_A_BRACKET):
        if byte in _OPENERS:
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise InvalidWebhookPayload("The webhook body names a key twice in one object")
    return result


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise InvalidWebhookPayload("The webhook body has a number out of range")
    return number


def _no_constant(name: str) -> Any:
    raise InvalidWebhookPayload(f"The webhook body has {name}, which JSON does not allow")
