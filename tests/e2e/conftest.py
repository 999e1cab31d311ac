"""A real uvicorn process serving ``app.main:app`` from environment settings, as deployed.

One process for the whole session (it takes a second or two to start); each test gets the
same process and checks that the server logged no unhandled error while the test ran.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import RedisServer
from tests.fakes.server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]

# Long enough for any production check; only this suite knows it.
E2E_JWT_SECRET = "e2e-test-secret-5f0c1a7e-9b2d-4c3e-8a61-0123456789ab"
STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0

# What the service must never write to its log while a test runs.
_UNHANDLED_MARKERS = ("Traceback (most recent call last)", "request.unhandled_error")


@dataclass
class ServiceProcess:
    """A uvicorn process this suite started and owns."""

    base_url: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def log(self, since: int = 0) -> str:
        with self.log_path.open("rb") as handle:
            handle.seek(since)
            return handle.read().decode("utf-8", "replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def client(self) -> httpx.Client:
        # trust_env=False: a proxy set in the environment must not see loopback traffic.
        return httpx.Client(base_url=self.base_url, timeout=15, trust_env=False)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `payments ARGS` (as `python -m app.cli`) with the service's settings."""
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


def service_env(redis_url: str, receipts_dir: Path) -> dict[str, str]:
    """The process's environment: the machine's, minus anything that configures the service."""
    # tests/conftest.py already removed the service's variables from os.environ.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"))
    }
    env.update(
        {
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": "e2e:",
            "RECEIPTS_DIR": str(receipts_dir),
            "JWT_SECRET_KEY": E2E_JWT_SECRET,
            "ENVIRONMENT": "test",
            # Where the tests send customers back: a named shop, or the local one the browser
            # tests serve on loopback.
            "RETURN_URL_HOSTS": "shop.example,127.0.0.1",
            "RECEIPT_WARM_UP": "false",
            "PAYMENT_PROVIDER": "sandbox",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
    return process.returncode


def _wait_until_healthy(service: ServiceProcess) -> None:
    assert service.process is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with service.client() as http:
        while True:
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"uvicorn exited with {service.process.returncode} before it was healthy:\n"
                    f"{service.log()}"
                )
            try:
                if http.get("/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"uvicorn not healthy in {STARTUP_TIMEOUT_S} s:\n{service.log()}"
                )
            time.sleep(0.05)


@contextlib.contextmanager
def running_service(
    redis_server: RedisServer,
    *,
    workers: int = 1,
    key_prefix: str = "e2e:",
    extra_env: Mapping[str, str] | None = None,
    cli: bool = False,
) -> Iterator[ServiceProcess]:
    """`uvicorn app.main:app` (or, with ``cli``, `payments serve`) with ``workers`` processes
    on a free loopback port, configured only by its environment (plus ``extra_env``); stopped
    with SIGTERM, and failed if it did not stop cleanly."""
    directory = Path(tempfile.mkdtemp(prefix="payments-e2e-"))
    port = free_port()
    service = ServiceProcess(
        base_url=f"http://127.0.0.1:{port}",
        env={
            **service_env(redis_server.url, directory / "receipts"),
            "REDIS_KEY_PREFIX": key_prefix,
            **(extra_env or {}),
        },
        log_path=directory / "uvicorn.log",
    )
    if cli:
        command = [sys.executable, "-m", "app.cli", "serve"]
    else:
        command = [sys.executable, "-m", "uvicorn", "app.main:app"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        command += ["--workers", str(workers)]
    with service.log_path.open("wb") as log_file:
        service.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=service.env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_healthy(service)
        yield service
    finally:
        code = _stop(service.process)
        log = service.log()
        shutil.rmtree(directory, ignore_errors=True)
    # SIGTERM is a graceful shutdown that runs the lifespan's cleanup; uvicorn then exits 0 or
    # (0.29+) re-raises the signal it caught.
    clean = code in {0, -signal.SIGTERM} and "Application shutdown complete." in log
    if not clean or any(marker in log for marker in _UNHANDLED_MARKERS):
        pytest.fail(f"uvicorn did not shut down cleanly (exit {code}):\n{log}", pytrace=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the end-to-end tests' own: the others flush theirs between tests,
    which would pull data from under a service process that outlives a test (a receipt it is
    still rendering in the background, say)."""
    directory = Path(tempfile.mkdtemp(prefix="payments-e2e-redis-"))
    server = RedisServer(port=free_port(), directory=directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def uvicorn_service(redis_server: RedisServer) -> Iterator[ServiceProcess]:
    with running_service(redis_server) as service:
        yield service


@pytest.fixture
def service(uvicorn_service: ServiceProcess) -> Iterator[ServiceProcess]:
    """The shared process; fails the test if the server logged an unhandled error meanwhile."""
    start = uvicorn_service.log_size()
    yield uvicorn_service
    new = uvicorn_service.log(since=start)
    if any(marker in new for marker in _UNHANDLED_MARKERS):
        pytest.fail(f"the service logged an unhandled error:\n{new}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if report.failed and "uvicorn_service" in getattr(item, "funcargs", {}):
        service: ServiceProcess = item.funcargs["uvicorn_service"]
        if service.log_path.exists():
            report.sections.append(("uvicorn log", service.log()[-20_000:]))
    return report


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def alice_token(uvicorn_service: ServiceProcess) -> str:
    """A token from `payments token --sub alice`, signed with the service's secret."""
    result = uvicorn_service.cli("token", "--sub", "alice")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2, result.stdout
    return token
