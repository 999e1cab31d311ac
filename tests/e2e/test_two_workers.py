"""Promises about workers, kept by `uvicorn --workers 2`: a provider change reaches every worker
within a second, rate limits are counted across them, and one of them reconciles and sweeps
the event outboxes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RedisServer
from tests.e2e.conftest import ServiceProcess, bearer, running_service
from tests.fakes.server import free_port

pytestmark = pytest.mark.e2e

# A fresh connection for every request: the kernel hands each new connection to either worker.
FRESH = httpx.Limits(max_keepalive_connections=0)
REQUESTS = 24


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def two_workers(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, metrics_port: int
) -> Iterator[ServiceProcess]:
    # As `payments serve --workers 2` runs them: metrics in multiprocess mode, and both
    # workers on the token-free metrics port.
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("metrics")),
        "METRICS_PORT": str(metrics_port),
    }
    with running_service(redis_server, workers=2, key_prefix="e2e2:", extra_env=env) as service:
        yield service


@pytest.fixture(scope="module")
def admin(two_workers: ServiceProcess) -> dict[str, str]:
    made = two_workers.cli("token", "--sub", "ops", "--admin")
    assert made.returncode == 0, made.stderr
    return bearer(made.stdout.strip())


def _client(service: ServiceProcess) -> httpx.Client:
    return httpx.Client(base_url=service.base_url, timeout=15, trust_env=False, limits=FRESH)


def _workers_seen(http: httpx.Client, admin: dict[str, str], *, at_most: int = 200) -> set[str]:
    """Which worker processes answer (each reports its own reconciler's ID); asks until two
    have, or ``at_most`` times."""
    seen = set()
    for _ in range(at_most):
        answer = http.get("/api/v1/providers/reconciliation", headers=admin)
        assert answer.status_code == 200, answer.text
        seen.add(answer.json()["this_worker"])
        if len(seen) == 2:
            break
    return seen


def _defaults(http: httpx.Client, admin: dict[str, str]) -> list[Any]:
    return [
        http.get("/api/v1/providers/routing", headers=admin).json()["default"]
        for _ in range(REQUESTS)
    ]


def test_both_workers_answer(two_workers: ServiceProcess, admin: dict[str, str]) -> None:
    with _client(two_workers) as http:
        assert len(_workers_seen(http, admin)) == 2


def test_a_routing_change_reaches_every_worker_within_a_second(
    two_workers: ServiceProcess, admin: dict[str, str]
) -> None:
    with _client(two_workers) as http:
        assert set(_defaults(http, admin)) == {"sandbox"}
        # Forced: Stripe has no key here (unforced, that is refused).
        changed = http.put(
            "/api/v1/providers/routing",
            headers=admin,
            json={"default": "stripe"},
            params={"force": "true"},
        )
        assert changed.status_code == 200, changed.text
        time.sleep(1.0)
        assert set(_defaults(http, admin)) == {"stripe"}
        # Stripe has no key here: every worker now refuses new payments the same way...
        for _ in range(6):
            refused = http.post("/api/v1/payment/create-intent", json={"plan": "basic"})
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "provider_not_configured"
        # ...until the default goes back, again everywhere within a second.
        restored = http.put("/api/v1/providers/routing", headers=admin, json={"default": "sandbox"})
        assert restored.status_code == 200, restored.text
        time.sleep(1.0)
        assert set(_defaults(http, admin)) == {"sandbox"}


def test_rate_limits_are_counted_across_workers(two_workers: ServiceProcess) -> None:
    made = two_workers.cli("token", "--sub", "limited-user")
    user = bearer(made.stdout.strip())
    with _client(two_workers) as http:
        codes = [
            http.post("/api/v1/payment/create-intent", json={"plan": "basic"}, headers=user)
            for _ in range(12)
        ]
    assert [c.status_code for c in codes] == [201] * 10 + [429] * 2
    assert int(codes[-1].headers["Retry-After"]) >= 1


def test_one_worker_reconciles(two_workers: ServiceProcess, admin: dict[str, str]) -> None:
    with _client(two_workers) as http:
        leaders = set()
        for _ in range(REQUESTS):
            stats = http.get("/api/v1/providers/reconciliation", headers=admin).json()
            leaders.add(stats["leader"])
    assert len(leaders) == 1 and None not in leaders


def test_one_worker_sweeps_the_outboxes(two_workers: ServiceProcess) -> None:
    # Both workers look for the sweep's lease at start; one takes it and keeps it.
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in two_workers.log().splitlines() if '"events.' in line]
        taken = [line["worker"] for line in lines if line["event"] == "events.sweep_lead_taken"]
        if taken or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(taken) == 1, taken
    assert not [line for line in lines if line["event"] == "events.sweep_lead_lost"]


def test_payments_serve_logs_json_from_its_supervisor_too(redis_server: RedisServer) -> None:
    # `payments serve --workers 2`, as the Docker image runs it: the supervising process's
    # lines (where it listens, its workers) in the same JSON as the workers'.
    with running_service(redis_server, workers=2, key_prefix="e2e3:", cli=True) as service:
        lines = [json.loads(line) for line in service.log().splitlines() if line.strip()]
    events = [line["event"] for line in lines]
    assert any(event.startswith("Started parent process") for event in events), events
    assert any(event.startswith("Uvicorn running on") for event in events), events


CREATED = 8  # under a user's create-intent limit (10 a minute)


def _created_count(text: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == "payments_http_requests":
            return sum(
                sample.value
                for sample in family.samples
                if sample.name == "payments_http_requests_total"
                and sample.labels["route"] == "/api/v1/payment/create-intent"
                and sample.labels["status"] == "201"
            )
    return 0.0


def test_metrics_count_every_worker(
    two_workers: ServiceProcess, admin: dict[str, str], metrics_port: int
) -> None:
    with _client(two_workers) as http:
        before = _created_count(http.get("/metrics", headers=admin).text)
        assert len(_workers_seen(http, admin)) == 2
        # A user of its own: the other tests' anonymous creates count against the address.
        made = two_workers.cli("token", "--sub", "metrics-counter")
        user = bearer(made.stdout.strip())
        for _ in range(CREATED):
            created = http.post("/api/v1/payment/create-intent", json={"plan": "pro"}, headers=user)
            assert created.status_code == 201, created.text
        # Whichever worker answers, it counts the requests both workers served.
        for _ in range(4):
            after = _created_count(http.get("/metrics", headers=admin).text)
            assert after - before == CREATED
    # And without a token on the metrics port, which both workers share.
    with httpx.Client(timeout=15, trust_env=False, limits=FRESH) as plain:
        scraped = plain.get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert scraped.status_code == 200
    assert _created_count(scraped.text) - before == CREATED
    assert "payments_breaker_state" in scraped.text
