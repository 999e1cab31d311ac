"""Shared fixtures: a real redis-server on a free loopback port (and, for the tests that ask,
a 3-master Redis Cluster), the real app with its lifespan, an HTTP client over ASGI, tokens,
and one shared receipt render pool."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.main import create_app
from app.security import create_access_token
from app.settings import Settings
from bench.procs import RedisClusterServers
from services.receipt_service import new_render_pool
from tests.fakes.server import free_port
from tests.fakes.specs import specs_dir
from tests.fakes.stripe_server import FakeStripe, running_fake_stripe

JWT_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"

# Settings come only from what each test says, never from the machine's environment.
# PAYMENT_SPECS_DIR is the suite's own setting (where the API descriptions are), so it stays.
_ENV_PREFIXES = (
    *("STRIPE_", "PAYPAL_", "PAYMENT_", "REDIS_", "JWT_", "RECEIPT", "MERCHANT_"),
    *("SANDBOX_", "RECONCILE_", "PROVIDER_", "BREAKER_", "RATE_LIMITS"),
    *("PADDLE_", "LEMON_", "PAYSTACK_", "FLUTTERWAVE_", "AUTHORIZENET_", "MOBILEPAY_"),
    *("TAX_", "PRICES_INCLUDE_TAX", "REVERSE_CHARGE"),
)
_ENV_KEPT = {"PAYMENT_SPECS_DIR"}
_ENV_NAMES = {"ENVIRONMENT", "PUBLIC_BASE_URL", "PORT", "FORWARDED_ALLOW_IPS"}
for _name in list(os.environ):
    if _name in _ENV_KEPT:
        continue
    if _name.startswith(_ENV_PREFIXES) or _name in _ENV_NAMES:
        del os.environ[_name]


def pytest_sessionstart(session: pytest.Session) -> None:
    """The provider fakes check every request against the published API descriptions; without
    them, say so once instead of failing every provider test on its own."""
    where = specs_dir()
    if not (where / "stripe" / "spec3.json").is_file() or not (where / "paypal").is_dir():
        pytest.exit(
            f"The providers' API descriptions are not at {where}: check out the team's shared/ "
            "beside this repository (as CI does), or set PAYMENT_SPECS_DIR to its specs/.",
            returncode=4,
        )


@dataclass
class RedisServer:
    """A redis-server this suite started and owns."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make test`, which installs it")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def flush(self) -> None:
        client = redis.Redis(port=self.port)
        try:
            client.flushall()
        finally:
            client.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    directory = Path(tempfile.mkdtemp(prefix="payments-redis-"))
    server = RedisServer(port=free_port(), directory=directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


class RedisClusterNodes(RedisClusterServers):
    """A Redis Cluster of three masters (no replicas) that this suite started and owns: the
    bench's launcher (bench/procs.py), which the suite shares, plus a flush between tests."""

    def flush(self) -> None:
        for port in self.ports:
            node = redis.Redis(port=port)
            try:
                node.flushall()
            finally:
                node.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """Started once, by the first test that asks for it."""
    directory = Path(tempfile.mkdtemp(prefix="payments-cluster-"))
    cluster = RedisClusterNodes(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def render_pool() -> Iterator[ProcessPoolExecutor]:
    pool = new_render_pool(1)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def make_settings(redis_url: str, receipts_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "redis_url": redis_url,
        "redis_key_prefix": "test:",
        "jwt_secret_key": JWT_SECRET,
        "receipts_dir": receipts_dir,
        "receipt_warm_up": False,
        "redis_timeout_seconds": 1.0,
        # Where the tests' return and cancel URLs point (the shop, not this service).
        "return_url_hosts": ["shop.example"],
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module to change the app's settings."""
    return {}


@pytest.fixture
def settings(
    redis_server: RedisServer, tmp_path: Path, settings_overrides: dict[str, Any]
) -> Settings:
    redis_server.flush()
    return make_settings(redis_server.url, tmp_path / "receipts", **settings_overrides)


@pytest.fixture
async def app(settings: Settings, render_pool: ProcessPoolExecutor) -> AsyncIterator[Any]:
    application = create_app(settings, receipt_executor=render_pool)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@pytest.fixture
def token(settings: Settings) -> Any:
    def make(
        sub: str = "alice",
        *,
        admin: bool = False,
        minutes: int | None = None,
        email: str | None = None,
    ) -> str:
        return create_access_token(settings, sub, admin=admin, expires_minutes=minutes, email=email)

    return make


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create_payment(
    client: httpx.AsyncClient, *, plan: str = "pro", token: str | None = None, **body: Any
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/payment/create-intent",
        json={"plan": plan, **body},
        headers=bearer(token) if token else {},
    )
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def pay_in_sandbox(
    client: httpx.AsyncClient, payment_id: str, outcome: str = "succeeded"
) -> httpx.Response:
    """What the customer's click on the sandbox checkout page sends."""
    return await client.post(f"/sandbox/checkout/{payment_id}", data={"outcome": outcome})


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code, body
    assert body["title"] and body["detail"] and body["type"]
    return body


# -- one fake Stripe for the whole session -----------------------------------------------

STRIPE_SECRET_KEY = "sk_test_51FakeKeyForTheFakeStripe0123456789"


@pytest.fixture(scope="session")
def stripe_server() -> Iterator[FakeStripe]:
    with running_fake_stripe(api_key=STRIPE_SECRET_KEY) as fake:
        yield fake


@pytest.fixture
def fake_stripe(stripe_server: FakeStripe) -> Iterator[FakeStripe]:
    """The session's fake Stripe, reset before the test and checked after it for requests
    that Stripe's API description does not allow."""
    stripe_server.reset()
    yield stripe_server
    try:
        assert_no_violations(stripe_server)
    finally:
        stripe_server.reset()


def assert_no_violations(fake: FakeStripe) -> None:
    violations = list(fake.violations)
    assert not violations, "requests Stripe's API description does not allow:\n" + "\n".join(
        str(v) for v in violations
    )
