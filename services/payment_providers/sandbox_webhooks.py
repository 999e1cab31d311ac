"""The sandbox's pushed webhooks: signed events delivered to the service over real HTTP, with
the delivery faults a developer asks for (duplicated, delayed, reordered, badly signed), so
that the service's webhook handling is proven against a vendor that misbehaves the way real
ones do. Deliveries run in the background; nothing about them can slow down or fail the change
that caused them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, cast

import httpx2

from models.payment import SandboxWebhooks
from services.errors import InvalidWebhookSignature

if TYPE_CHECKING:
    from .base import ProviderKeyValue

log = logging.getLogger("payments.sandbox")

# KEYS: held-events list. ARGV: event body, TTL. With `reorder`, a payment's events wait here:
# when none is waiting, this one is held (answers {}); otherwise the waiting ones are taken
# (and answered), to go out after this newer one.
_HOLD_LUA = """
local held = redis.call('LRANGE', KEYS[1], 0, -1)
if #held == 0 then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {}
end
redis.call('DEL', KEYS[1])
return held
"""

SESSION_TTL_S = 30 * 24 * 3600  # as long as the sandbox keeps a payment's records

WEBHOOK_PATH = "/api/v1/payment/webhook/sandbox"
# A delivery is tried this many times while the endpoint is unreachable or answers 408, 429 or
# 5xx, waiting RETRY_BASE_S, then 3x longer each time. Any other 4xx is the receiver's final word
# (a refused signature stays refused), so it is not retried.
WEBHOOK_ATTEMPTS = 4
WEBHOOK_RETRY_BASE_S = 0.25
# With `reorder`, an event that no later one overtakes goes out alone after this long.
REORDER_HOLD_S = 3.0
DELIVERY_LOG_LENGTH = 100

SIGNATURE_HEADER = "Sandbox-Signature"
SIGNATURE_TOLERANCE_S = 300


def sign_webhook(secret: str, body: bytes, *, timestamp: int | None = None) -> str:
    """The Sandbox-Signature header for ``body``: ``t=<unix time>,v1=<hex HMAC-SHA256>`` of
    ``"<t>.<body>"``, the scheme Stripe uses, so clients can reuse what they know."""
    moment = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{moment}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={moment},v1={digest}"


def verify_webhook_signature(secret: str, body: bytes, header: str | None, *, now: float) -> None:
    """Raise InvalidWebhookSignature unless ``header`` signs ``body`` recently with ``secret``."""
    if not secret:
        raise InvalidWebhookSignature("No webhook secret is configured; events are refused")
    if not header:
        raise InvalidWebhookSignature(f"Missing {SIGNATURE_HEADER} header")
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        raise InvalidWebhookSignature("Malformed signature header") from None
    if abs(now - timestamp) > SIGNATURE_TOLERANCE_S:
        raise InvalidWebhookSignature("Signature timestamp outside the tolerance")
    expected = sign_webhook(secret, body, timestamp=timestamp).split("v1=", 1)[1]
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
    given = parts.get("v1", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(expected.encode(), given):
        raise InvalidWebhookSignature("Signature does not match")


class SandboxWebhookPusher:
    """Delivers one sandbox's events, for the payments that asked for webhooks."""

    def __init__(
        self,
        store: ProviderKeyValue,
        http: httpx2.AsyncClient | None,
        *,
        secret: str,
        key_of: Callable[[str], str],
        enabled: bool,
    ) -> None:
        self._store = store
        self._http = http  # without a client the sandbox sends none
        self._webhook_secret = secret
        self._key_of = key_of  # a payment's record key (its slot); its webhook keys sit beside
        self._enabled = enabled
        self._hold = store.script(_HOLD_LUA)
        # Deliveries run in the background; kept to be cancelled on close.
        self._deliveries: set[asyncio.Task[None]] = set()

    async def deliveries(self, payment_id: str) -> list[dict[str, Any]]:
        """Every delivery attempt of this payment's webhooks, oldest first: event id and type,
        attempt number, the HTTP status (None when unreachable), and the service's outcome."""
        entries = await self._store.read_list(f"{self._key_of(payment_id)}:deliveries")
        return [json.loads(entry) for entry in entries]

    async def emit(
        self,
        payment_id: str,
        event_type: str,
        *,
        refund: Mapping[str, Any] | None = None,
        fields: Mapping[str, str] | None = None,
        amount_captured: int | None = None,
    ) -> None:
        """Queue one event for delivery, if this payment asked for webhooks.

        ``fields``: the payment's record, when the caller has just read it (saves a read).
        ``amount_captured``: what a capture of part of the amount took, for the event to say.
        The event is put in order here, in the request that changed the sandbox's record, so
        that events leave in the order things happened (unless `reorder` says otherwise). The
        delivery itself runs in the background: nothing about it can slow down or fail the
        change that caused it, which has already happened.
        """
        try:
            if fields is not None:  # the caller has just read the record
                raw, url = fields.get("webhooks"), fields.get("webhook_url")
            else:
                raw, url = await self._store.read_hash_fields(
                    self._key_of(payment_id), ["webhooks", "webhook_url"]
                )
            if not raw or not url or self._http is None:
                return
            plan = SandboxWebhooks.model_validate_json(raw)
            data: dict[str, Any] = {"payment_id": payment_id}
            if refund is not None:
                data["refund"] = dict(refund)
            if amount_captured is not None:
                data["amount_captured"] = amount_captured
            event = {
                "id": f"evt_sb_{secrets.token_hex(12)}",
                "type": event_type,
                "created": int(time.time()),
                "data": data,
            }
            body = json.dumps(event, separators=(",", ":"))
            batch = [body]
            if plan.reorder:
                held = cast(
                    list[str],
                    await self._hold(
                        keys=[f"{self._key_of(payment_id)}:held"], args=[body, SESSION_TTL_S]
                    ),
                )
                if not held:
                    self.spawn(self._release_held(payment_id, url, body, plan))
                    return
                batch.extend(held)  # the newer event overtakes the ones that were waiting
        except Exception:  # the change has happened; only its webhook is lost, and logged
            log.exception("sandbox.webhook.enqueue_failed", extra={"payment_id": payment_id})
            return
        self.spawn(self._deliver(payment_id, url, batch, plan))

    def spawn(self, delivery: Coroutine[Any, Any, None]) -> None:
        if not self._enabled:  # never reached in production; a second lock on the door
            delivery.close()
            return
        task = asyncio.create_task(delivery)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _release_held(
        self, payment_id: str, url: str, body: str, plan: SandboxWebhooks
    ) -> None:
        await asyncio.sleep(REORDER_HOLD_S)
        # Whoever removes the held event sends it: a newer event may have taken it meanwhile.
        try:
            taken = await self._store.remove_from_list(f"{self._key_of(payment_id)}:held", body)
        except Exception:
            log.exception("sandbox.webhook.release_failed", extra={"payment_id": payment_id})
            return
        if taken:
            await self._deliver(payment_id, url, [body], plan)

    async def _deliver(
        self, payment_id: str, url: str, bodies: list[str], plan: SandboxWebhooks
    ) -> None:
        try:
            if plan.delay_ms:
                await asyncio.sleep(plan.delay_ms / 1000)
            for body in bodies:
                for _ in range(plan.duplicate):
                    await self._post(payment_id, url, body, plan)
        except Exception:
            log.exception("sandbox.webhook.delivery_failed", extra={"payment_id": payment_id})

    async def _post(self, payment_id: str, url: str, body: str, plan: SandboxWebhooks) -> None:
        """One delivery of one event, retried while the endpoint is away or failing."""
        assert self._http is not None
        event = json.loads(body)
        content = body.encode()
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            # Signed afresh on each attempt, as vendors do; with bad_signature, by a stranger.
            key = secrets.token_hex(16) if plan.bad_signature else self._webhook_secret
            headers = {
                SIGNATURE_HEADER: sign_webhook(key, content),
                "Content-Type": "application/json",
            }
            status: int | None = None
            outcome: str | None = None
            try:
                response = await self._http.post(url, content=content, headers=headers)
            except httpx2.HTTPError as error:
                outcome = type(error).__name__
            else:
                status = response.status_code
                outcome = _delivery_outcome(response)
            entry = {
                "event_id": event["id"],
                "type": event["type"],
                "attempt": attempt,
                "status": status,
                "outcome": outcome,
            }
            log.info("sandbox.webhook.delivered", extra={"payment_id": payment_id, **entry})
            await self._record_delivery(payment_id, entry)
            if status is not None and status < 500 and status not in _RETRYABLE:
                return
            if attempt < WEBHOOK_ATTEMPTS:
                await asyncio.sleep(WEBHOOK_RETRY_BASE_S * 3 ** (attempt - 1))

    async def _record_delivery(self, payment_id: str, entry: dict[str, Any]) -> None:
        await self._store.append_capped(
            f"{self._key_of(payment_id)}:deliveries",
            json.dumps(entry),
            keep=DELIVERY_LOG_LENGTH,
            ttl_s=SESSION_TTL_S,
        )

    async def wait_for_deliveries(self, grace_s: float) -> bool:
        """Wait until no delivery is under way here (held events included), for at most
        ``grace_s`` seconds; True when none is left."""
        deadline = asyncio.get_running_loop().time() + grace_s
        while self._deliveries:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            await asyncio.wait(list(self._deliveries), timeout=left)
        return True

    async def aclose(self) -> None:
        """Drop deliveries still under way: a vendor going away loses its retries too."""
        tasks = list(self._deliveries)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


_RETRYABLE = frozenset({408, 429})


def _delivery_outcome(response: httpx2.Response) -> str | None:
    """The service's word on a delivery: its ack's ``outcome``, or its problem ``code``."""
    try:
        answer = response.json()
    except ValueError:
        return None
    if isinstance(answer, dict):
        word = answer.get("outcome") or answer.get("code")
        return str(word) if word is not None else None
    return None
