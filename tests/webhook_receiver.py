"""A merchant's backend for the events tests: a real HTTP server on loopback that keeps what
it is sent and answers as the test says (failing for a while, then recovering)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.fakes.server import serve_in_thread


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    url: str = ""
    fail_next: int = 0  # answer 500 to this many requests first
    down: bool = False  # answer 503 until set back
    redirect_to: str | None = None
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self) -> int:
        with self.lock:
            if self.down:
                return 503
            if self.fail_next > 0:
                self.fail_next -= 1
                return 500
            return 204

    def accepted(self) -> list[Received]:
        with self.lock:
            return [item for item in self.requests if 200 <= item.answered < 300]

    def all(self) -> list[Received]:
        with self.lock:
            return list(self.requests)


@contextmanager
def running_receiver(path: str = "/hooks") -> Iterator[Receiver]:
    receiver = Receiver()

    async def hook(request: Request) -> Response:
        body = await request.body()
        if receiver.redirect_to:
            status = 307
            response: Response = Response(
                status_code=307, headers={"location": receiver.redirect_to}
            )
        else:
            status = receiver.answer()
            response = PlainTextResponse("x" * 5000 if status >= 500 else "", status_code=status)
        with receiver.lock:
            receiver.requests.append(Received(dict(request.headers), body, status))
        return response

    app: Any = Starlette(routes=[Route(path, hook, methods=["POST"])])
    with serve_in_thread(app) as base:
        receiver.url = f"{base}{path}"
        yield receiver
