"""One HTTP attempt of a delivery, signed as the Standard Webhooks specification says.

Headers ``webhook-id`` (the event's ID, the same on every retry and replay, so the receiver
can de-duplicate), ``webhook-timestamp`` (seconds) and ``webhook-signature`` (``v1,<base64
HMAC-SHA256 of id.timestamp.body>``, one per secret in use, space-separated while a rotated
secret overlaps), made with the specification's own library, ``standardwebhooks``. The
connection goes to the address the URL guard checked; redirects are never followed.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx2
from standardwebhooks.webhooks import Webhook

from services.events.deliveries import EXCERPT_CHARS, Attempt
from services.events.urls import UrlGuard, WebhookUrlRefused

USER_AGENT = "payment-service-webhooks/1"


def signature_header(secrets: list[str], message_id: str, at: datetime, body: str) -> str:
    return " ".join(Webhook(secret).sign(message_id, at, body) for secret in secrets)


class Sender:
    def __init__(self, http: httpx2.AsyncClient, guard: UrlGuard, *, timeout_s: float) -> None:
        self._http = http
        self._guard = guard
        self._timeout_s = timeout_s

    async def send(self, url: str, message_id: str, body: str, secrets: list[str]) -> Attempt:
        at = datetime.now(UTC).replace(microsecond=0)
        started = time.perf_counter()
        try:
            target = await self._guard.resolve(url)
        except WebhookUrlRefused as refused:
            return Attempt(at, None, 0.0, "", f"url_refused: {refused.detail}")
        headers = {
            "host": target.host_header(),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": message_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signature_header(secrets, message_id, at, body),
        }
        request = self._http.build_request(
            "POST",
            target.connect_url(),
            content=body.encode(),
            headers=headers,
            timeout=self._timeout_s,
            extensions={"sni_hostname": target.host} if target.https else None,
        )
        try:
            response = await self._http.send(request, stream=True, follow_redirects=False)
            try:
                excerpt = await _excerpt(response)
            finally:
                await response.aclose()
        except httpx2.TimeoutException:
            return Attempt(at, None, _ms(started), "", "timeout")
        except httpx2.HTTPError as error:
            return Attempt(at, None, _ms(started), "", f"connection: {type(error).__name__}")
        return Attempt(at, response.status_code, _ms(started), excerpt, None)


async def _excerpt(response: httpx2.Response) -> str:
    """The start of the answer, never more: a receiver's huge body is not read."""
    taken = b""
    async for chunk in response.aiter_raw():
        taken += chunk
        if len(taken) >= EXCERPT_CHARS:
            break
    return taken[:EXCERPT_CHARS].decode("utf-8", "replace")


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
