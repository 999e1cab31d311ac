"""Pure ASGI middleware: cheap guards that run before routing."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

WEBHOOK_PATH_PREFIX = "/api/v1/payment/webhook/"


class BodySizeLimit:
    """Refuse request bodies over the limit with 413, whether announced or streamed.

    Webhooks get a larger allowance: providers' events can be big, clients' requests cannot.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_webhook_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_webhook_bytes = max_webhook_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        limit = self.max_webhook_bytes if path.startswith(WEBHOOK_PATH_PREFIX) else self.max_bytes
        announced: int | None = None
        chunked = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    announced = -1
                if announced > limit or announced < 0:
                    await _reject(send, limit, path)
                    return
            elif name == b"transfer-encoding":
                chunked = True
        if announced is not None and not chunked:
            # The server delivers exactly the announced length (HTTP framing), which is within
            # the limit: nothing to count.
            await self.app(scope, receive, send)
            return
        received = 0
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer 413 ourselves and tell the app the client left, so that it stops
                    # reading; whatever it still sends is dropped below.
                    rejected = True
                    await _reject(send, limit, path)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def _reject(send: Send, limit: int, path: str) -> None:
    body = json.dumps(
        {
            "type": "https://errors.payments.example/payload_too_large",
            "title": "Request body too large",
            "status": 413,
            "detail": f"Request body over {limit} bytes",
            "code": "payload_too_large",
            "instance": path,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
