"""``python -m bench``: the service under load against its floors, and receipt rendering.

One run starts its own redis-server and its own 3-master Redis Cluster (free ports, temporary
directories, no persistence), then for 1 and 2 uvicorn workers the service (``app.main:app``)
and, beside it, two floors on the same server stack: the redis-py floor
(``bench/floor_redispy.py``, bare Starlette, one redis-py call per endpoint: create-intent's
and verify's targets) and the FastAPI floor (``bench/floor_app.py``: receipts' targets, and a
reference for the others). At 1 worker a second service and a second redis-py floor run on
the cluster, and create-intent and verify are loaded there too. wrk, a separate process, loads
one server at a time over loopback for a fixed time. Receipt rendering is measured in this
process after the servers are stopped. Everything is compared as ratios measured in the same
run.

``--smoke`` goes through every code path with a few requests and renders (well under a
minute) and writes its table to a temporary file: ``make test`` runs it so the harness cannot
rot. Targets that are missed are reported, never raised: the exit status is 0 whenever the
bench itself could run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx

from app.security import create_access_token
from app.settings import Settings

from . import providers
from .procs import ROOT, BenchError, RedisClusterServers, RedisServer, UvicornServer
from .receipts import RenderConfig, RenderFigures, median, percentile, run_render_bench
from .report import Row, Target, command_line, document, now, render_table
from .wrk import Load, Side, WrkResult, alternate, compare_row, invalid, run_wrk, wrk_binary

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

API = "/api/v1/payment"
USER = "bench-user"
KEY_PREFIX = "bench:"

# The targets, as ratios measured in one run. create-intent and verify are graded at
# GRADED_WORKERS against the redis-py floor (this round's issue); the rest as in issue 6,
# against the FastAPI floor.
GRADED_WORKERS = 1
CREATE_RPS = Target(0.40)
VERIFY_RPS = Target(0.40)
CREATE_P99 = Target(2.0, at_least=False)
RECEIPT_RPS = Target(0.75)
PDF_RPS = Target(0.60)
FIRST_RENDER_P50 = Target(1.2, at_least=False)
RENDER_RSS = Target(1.2, at_least=False)
RENDER_SCALING = Target(1.8)

REDISPY_FLOOR = "redis-py floor"
FASTAPI_FLOOR = "FastAPI floor"
ROUND_TRIP_FLOOR = "FastAPI floor, create-intent's 3 round trips through the service's store"


@dataclass(frozen=True)
class Mode:
    name: str
    duration_s: int  # each measured wrk run
    rounds: int  # measured runs per target, alternating the order of service and baseline
    warmup_s: int  # each warm-up wrk run (0: none)
    warmup_each: bool  # warm up before every measured run (else once per server)
    threads: int
    connections: int
    workers: tuple[int, ...]
    cluster_workers: tuple[int, ...]  # worker counts at which the cluster is loaded too
    paid_payments: int  # paid through the API first; verify and receipts cycle through them
    render: RenderConfig
    stripe: providers.StripeConfig


FULL = Mode(
    name="full",
    duration_s=10,
    rounds=2,
    warmup_s=3,
    warmup_each=True,
    threads=1,
    connections=32,
    workers=(1, 2),
    cluster_workers=(1,),
    paid_payments=200,
    render=RenderConfig(
        first_render_samples=60,
        rss_early=10,
        rss_late=1000,
        throughput_receipts=120,
        throughput_rounds=2,
    ),
    stripe=providers.StripeConfig(
        latency_ms=50,
        in_flight=64,
        duration_s=10,
        rounds=2,
        warmup_s=3,
        webhook_payments=20_000,
        webhook_warmup_payments=4_000,
    ),
)
SMOKE = Mode(
    name="smoke",
    duration_s=1,
    rounds=1,
    warmup_s=0,
    warmup_each=False,
    threads=1,
    connections=4,
    workers=(1, 2),
    cluster_workers=(1,),
    paid_payments=12,
    render=RenderConfig(
        first_render_samples=6,
        rss_early=10,
        rss_late=20,
        throughput_receipts=6,
        throughput_rounds=1,
    ),
    stripe=providers.StripeConfig(
        latency_ms=50,
        in_flight=8,
        duration_s=1,
        rounds=1,
        warmup_s=0,
        webhook_payments=1_000,
        webhook_warmup_payments=0,
    ),
)

NOTES = [
    "Each figure is a ratio of two measurements taken minutes apart in the same run on the "
    "same (shared, noisy) machine; absolute requests/s are not comparable across runs.",
    "The service runs as `python -m uvicorn app.main:app --workers N`, the floors as `python -m "
    "uvicorn bench.floor_redispy:app` and `python -m uvicorn bench.floor_app:app` with the same "
    "N, all with `--loop uvloop --http httptools --no-access-log`, on 127.0.0.1, against one "
    "redis-server started by the bench (free port, temporary directory, no persistence).",
    "Service settings: ENVIRONMENT=development, LOG_LEVEL=WARNING, RECEIPT_WARM_UP=true, "
    "RECEIPT_RENDER_WORKERS=1, a 48-character JWT_SECRET_KEY, and RATE_LIMITS_ENABLED=false: "
    "all load comes from one user, who would be limited to 10 create-intents (30 verifies, 30 "
    "receipt reads, 10 PDFs) a minute, so with limits on the bench would measure 429s.",
    "The redis-py floor (create-intent's and verify's targets, at 1 worker) is a bare "
    "Starlette app doing each endpoint's Redis work in one call through redis-py's public API, "
    "with the service's own client constructor (services/payment_store.py): create-intent is "
    "one EVALSHA of a script registered with register_script, which claims the idempotency "
    "key, stores the answer to replay and writes the payment hash, its history entry, the "
    "sandbox session and the reference (every key under the payment's hash tag, so that it is "
    "one EVALSHA on a cluster too); verify is one HGETALL of the payment. No token check, no "
    "validation, no provider layer.",
    "The FastAPI floor (receipts' targets; create-intent and verify for reference, and "
    "create-intent's p99 target, as before this round) is a bare FastAPI app: create-intent is "
    "one Lua script writing the same data; verify one pipeline reading the payment and its "
    "sandbox session; receipt metadata one HGETALL; the PDF the same bytes answered from memory "
    "(and, for reference, through Starlette's FileResponse).",
    "The three-round-trip floor (reference, create-intent and Stripe): the same FastAPI app "
    "doing only the Redis work the design asks of create-intent, through the service's own "
    "client and PaymentStore, in its three round trips: the idempotency claim, the sandbox's "
    "session (or, for Stripe, the same call with the same client as the redis-py floor's), then "
    "PaymentStore.create with the answer to replay and the reconciliation entry. No token, "
    "validation, catalogue, tax, provider layer or middleware of ours. Its ratio to the "
    "redis-py floor is the most a service with this design under FastAPI could reach.",
    "Redis Cluster: at 1 worker, a second service (REDIS_CLUSTER=true, REDIS_URL one node's) and "
    "a second redis-py floor run on a 3-master cluster (no replicas) started by the bench on "
    "loopback as the test suite starts its own; the service's verify payments there are "
    "created and paid through that service. Its create-intent and verify runs alternate with "
    "the standalone ones in the same rounds; the rows give the service on the cluster against "
    "the service on one node (the cluster / single ratio), against the redis-py floor on the "
    "cluster, and that floor's own cluster / single ratio.",
    "Load: wrk (a separate process) with Lua scripts in bench/wrk/; create-intent sends a "
    "distinct Idempotency-Key per request (a fresh key prefix for every run); verify and "
    "receipt reads cycle through payments created and paid through the API first (POST "
    "/sandbox/checkout/{id}, outcome=succeeded). p50/p99 are wrk's latency percentiles.",
    "Each load figure is two runs of the same length per target in alternating order (A B C, "
    "C B A) after one warm-up run each; requests/s are totals over both runs, p50/p99 the mean "
    "of the two runs' percentiles.",
    "Stripe (provider latency, webhooks): 1 worker, against a canned fake Stripe "
    "(bench/fake_stripe_proc.py, `python -m uvicorn bench.fake_stripe_proc:create_app "
    "--factory`, a process of its own, same flags) that answers every Checkout Session create "
    "after 50 ms with Stripe's sample session under a fresh ID and validates nothing (checking "
    "requests against Stripe's API description is the tests' job). The target's floor is the "
    "redis-py floor making the same call with the same client: the Stripe provider's own "
    "parameter builder, stripe.StripeClient over the provider's httpx2-backed HTTPClient, then "
    "one EVALSHA; the service and that floor alternate as above. References: the ideal "
    "(in flight / latency), the floor awaiting the latency instead of calling, and the fake "
    "alone under wrk replaying the service's first Checkout Session request (its ceiling). The "
    "service is configured with STRIPE_SECRET_KEY/STRIPE_WEBHOOK_SECRET/STRIPE_API_BASE "
    "pointing at it for the whole run (the sandbox stays the default provider). Webhooks are "
    "signed checkout.session.expired events, each for a distinct pending Stripe payment "
    "(written with the service's PaymentStore), then the same deliveries replayed: a completed "
    "session would also queue one receipt render per event in the background, which would "
    "compete for the CPU with every later measurement.",
    "Receipts: the service's side is ReceiptService with its process pool (fresh payment "
    "each time, so nothing is cached; its receipt number allocated beforehand, untimed, as the "
    "service does when a payment succeeds, so each render's one ledger round trip is its "
    "chain entry; the PDF is written to disk as in production); the bare "
    "side is receipt_render.init_worker/render_pdf called directly in the bench process. Memory "
    "is VmHWM (peak) and VmRSS of the pool's render process from /proc. The calibration row "
    "runs pure-Python CPU work in 1 and 2 processes alongside: what 2 processes can gain on this "
    "machine at that moment bounds the receipts-per-second ratio.",
]


@dataclass
class Seeded:
    """Payments created and paid through one service, which verify and receipts cycle
    through."""

    ids: list[str]
    ids_file: Path


@dataclass
class Run:
    mode: Mode
    workdir: Path
    log: Callable[[str], None]
    redis: RedisServer | None = None
    cluster: RedisClusterServers | None = None
    settings: Settings | None = None
    token: str = ""
    seeded: dict[str, Seeded] = field(default_factory=dict)  # by Redis: standalone, cluster
    pdf_id: str = ""
    pdf_bytes: int = 0
    stripe: providers.StripeSuite | None = None
    stripe_env: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    @property
    def load(self) -> Load:
        return Load(self.mode.threads, self.mode.connections, self.mode.duration_s)

    @property
    def warmup(self) -> Load | None:
        if not (self.mode.warmup_s and self.mode.warmup_each):
            return None
        return Load(self.mode.threads, self.mode.connections, self.mode.warmup_s)


def _clean_environment() -> dict[str, str]:
    """This process's environment without anything that configures the service."""
    prefixes = (
        "STRIPE_",
        "PAYPAL_",
        "PAYMENT_",
        "REDIS_",
        "JWT_",
        "RECEIPT",
        "MERCHANT_",
        "PROVIDER_",
        "BREAKER_",
        "SANDBOX_",
        "RATE_LIMITS",
        "FLOOR_",
    )
    names = {"ENVIRONMENT", "PUBLIC_BASE_URL", "PORT", "LOG_LEVEL"}
    return {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith(prefixes) and key.upper() not in names
    }


# -- the servers on one Redis ----------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One Redis the servers run on: the standalone server or the cluster."""

    key: str  # "standalone" or "cluster"
    url: str
    cluster: bool

    @property
    def described(self) -> str:
        return "a 3-master Redis Cluster" if self.cluster else "one Redis"


def standalone(run: Run) -> Backend:
    assert run.redis is not None
    return Backend("standalone", run.redis.url, cluster=False)


def clustered(run: Run) -> Backend:
    assert run.cluster is not None
    return Backend("cluster", run.cluster.url, cluster=True)


def receipts_dir(run: Run, backend: Backend) -> Path:
    return run.workdir / f"receipts-{backend.key}"


def service_server(run: Run, backend: Backend, workers: int) -> UvicornServer:
    assert run.settings is not None
    env = _clean_environment()
    env.update(
        {
            "REDIS_URL": backend.url,
            "REDIS_CLUSTER": "true" if backend.cluster else "false",
            "REDIS_KEY_PREFIX": KEY_PREFIX,
            "RATE_LIMITS_ENABLED": "false",
            "RECEIPTS_DIR": str(receipts_dir(run, backend)),
            "RECEIPT_RENDER_WORKERS": "1",
            "RECEIPT_WARM_UP": "true",
            "JWT_SECRET_KEY": run.settings.jwt_secret_key.get_secret_value(),
            "ENVIRONMENT": "development",
            "LOG_LEVEL": "WARNING",
            "PAYMENT_PROVIDER": "sandbox",
            **run.stripe_env,
        }
    )
    return UvicornServer(
        f"service-{backend.key}", "app.main:app", workers=workers, env=env, log_dir=run.workdir
    )


def redispy_floor_server(run: Run, backend: Backend, workers: int) -> UvicornServer:
    env = _clean_environment()
    env.update(
        {
            "REDIS_URL": backend.url,
            "REDIS_CLUSTER": "true" if backend.cluster else "false",
            "REDIS_KEY_PREFIX": KEY_PREFIX,
            "FLOOR_SLEEP_MS": str(run.mode.stripe.latency_ms),
        }
    )
    if run.stripe_env:
        env["FLOOR_STRIPE_URL"] = run.stripe_env["STRIPE_API_BASE"]
        env["FLOOR_STRIPE_KEY"] = run.stripe_env["STRIPE_SECRET_KEY"]
    return UvicornServer(
        f"floor-redispy-{backend.key}",
        "bench.floor_redispy:app",
        workers=workers,
        env=env,
        log_dir=run.workdir,
    )


def fastapi_floor_server(run: Run, backend: Backend, workers: int) -> UvicornServer:
    env = _clean_environment()
    env.update(
        {
            "REDIS_URL": backend.url,
            "REDIS_KEY_PREFIX": KEY_PREFIX,
            "FLOOR_PDF_PATH": str(run.workdir / "floor" / "receipt.pdf"),
        }
    )
    if run.stripe_env:
        env["FLOOR_STRIPE_URL"] = run.stripe_env["STRIPE_API_BASE"]
        env["FLOOR_STRIPE_KEY"] = run.stripe_env["STRIPE_SECRET_KEY"]
    return UvicornServer(
        f"floor-fastapi-{backend.key}",
        "bench.floor_app:app",
        workers=workers,
        env=env,
        log_dir=run.workdir,
    )


@contextlib.contextmanager
def serving(servers: list[UvicornServer]) -> Iterator[None]:
    """Start them all (side by side), wait until each is ready, stop them all at the end."""
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready(ready_path="/health")
        yield
    finally:
        for server in servers:
            server.stop()


# -- setup through the API -------------------------------------------------------------------


def _auth(run: Run) -> dict[str, str]:
    return {"Authorization": f"Bearer {run.token}"}


def seed_paid_payments(run: Run, service: UvicornServer, backend: Backend) -> Seeded:
    """Create and pay ``paid_payments`` payments through the API, then wait until the service
    has rendered their receipts (renders in the background would steal CPU from the runs)."""
    count = run.mode.paid_payments
    run.log(f"creating and paying {count} payments through the API ({backend.described})")
    tag = secrets.token_hex(4)
    ids: list[str] = []
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for index in range(count):
            created = client.post(
                f"{API}/create-intent",
                json={"plan": "pro"},
                headers={**_auth(run), "Idempotency-Key": f"seed-{tag}-{index}"},
            )
            if created.status_code != 201:
                raise BenchError(f"create-intent answered {created.status_code}: {created.text}")
            payment_id = created.json()["payment_id"]
            paid = client.post(f"/sandbox/checkout/{payment_id}", data={"outcome": "succeeded"})
            if paid.status_code not in (200, 303):
                raise BenchError(f"sandbox checkout answered {paid.status_code}: {paid.text}")
            ids.append(payment_id)
    ids_file = run.workdir / f"paid_ids-{backend.key}.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    receipts = receipts_dir(run, backend)
    deadline = time.monotonic() + 60 + count
    while len(list(receipts.rglob("*.pdf"))) < count:
        if time.monotonic() > deadline:
            raise BenchError("the service did not render the seeded receipts in time")
        time.sleep(0.1)
    return Seeded(ids, ids_file)


def fetch_receipt_pdf(run: Run, service: UvicornServer, payment_id: str) -> None:
    """One receipt PDF through the API: what the FastAPI floor answers from memory."""
    with httpx.Client(base_url=service.url, timeout=30) as client:
        pdf = client.get(f"{API}/receipt/{payment_id}/pdf", headers=_auth(run))
    if pdf.status_code != 200 or not pdf.content.startswith(b"%PDF"):
        raise BenchError(f"receipt download answered {pdf.status_code}")
    floor_pdf = run.workdir / "floor" / "receipt.pdf"
    floor_pdf.parent.mkdir(parents=True, exist_ok=True)
    floor_pdf.write_bytes(pdf.content)
    run.pdf_id = payment_id
    run.pdf_bytes = len(pdf.content)
    run.log(f"receipt PDF of {len(pdf.content):,} bytes")


def check_answers(run: Run, server: UvicornServer, payment_id: str, *, receipts: bool) -> None:
    """One request of each kind, so a broken endpoint stops the bench with its answer rather
    than producing a table of error figures."""
    checks: list[tuple[str, str, dict[str, object]]] = [
        ("POST", f"{API}/verify", {"json": {"payment_id": payment_id}}),
    ]
    if receipts:
        checks += [
            ("GET", f"{API}/receipt/{payment_id}", {}),
            ("GET", f"{API}/receipt/{payment_id}/pdf", {}),
        ]
        if server.name.startswith("floor-fastapi"):
            checks.append(("GET", f"{API}/receipt/{payment_id}/file", {}))
    with httpx.Client(base_url=server.url, timeout=30, headers=_auth(run)) as client:
        created = client.post(
            f"{API}/create-intent",
            json={"plan": "pro"},
            headers={"Idempotency-Key": f"check-{secrets.token_hex(8)}"},
        )
        if created.status_code != 201:
            raise BenchError(f"{server.name} create-intent answered {created.status_code}")
        if server.name.startswith("floor-fastapi"):
            key = {"Idempotency-Key": f"check-{secrets.token_hex(8)}"}
            first, again = (
                client.post(f"{API}/create-intent-3rt", json={"plan": "pro"}, headers=key)
                for _ in range(2)
            )
            if first.status_code != 201 or again.json() != first.json():
                raise BenchError(
                    f"{server.name} create-intent-3rt answered {first.status_code}, then "
                    f"{again.status_code}: {first.text} / {again.text}"
                )
        for method, path, options in checks:
            answer = client.request(method, path, **options)  # type: ignore[arg-type]
            if answer.status_code != 200:
                raise BenchError(f"{server.name} {method} {path} answered {answer.status_code}")


# -- wrk runs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    label: str
    path: str  # path of the URL wrk is given
    script: str
    args: Callable[[Run, Path], list[str]]  # given the payment IDs file of the side's Redis


def scenarios(run: Run) -> dict[str, Scenario]:
    return {
        "create": Scenario(
            "create-intent",
            f"{API}/create-intent",
            "create_intent",
            lambda r, _ids: [r.token, f"run{secrets.token_hex(6)}", '{"plan": "pro"}'],
        ),
        "create3": Scenario(
            "create-intent",
            f"{API}/create-intent-3rt",
            "create_intent",
            lambda r, _ids: [r.token, f"run{secrets.token_hex(6)}", '{"plan": "pro"}'],
        ),
        "verify": Scenario(
            "verify (paid)", f"{API}/verify", "verify", lambda r, ids: [r.token, str(ids)]
        ),
        "receipt": Scenario(
            "receipt metadata",
            f"{API}/receipt/",
            "get_ids",
            lambda r, ids: [r.token, str(ids), f"{API}/receipt/", ""],
        ),
        "pdf": Scenario(
            "cached PDF download",
            f"{API}/receipt/{run.pdf_id}/pdf",
            "get_fixed",
            lambda r, _ids: [r.token],
        ),
        "file": Scenario(
            "cached PDF download",
            f"{API}/receipt/{run.pdf_id}/file",
            "get_fixed",
            lambda r, _ids: [r.token],
        ),
    }


@dataclass(frozen=True)
class Loaded:
    """One server loaded with one scenario: its name in the log and the table, and the
    payment IDs it cycles through."""

    name: str
    server: UvicornServer
    scenario: Scenario
    ids: Path


def measure(run: Run, targets: list[Loaded]) -> list[WrkResult]:
    """Load each target in turn for ``duration_s``, in ``rounds`` rounds that alternate the
    order, each after one warm-up run (full mode): see ``wrk.alternate``."""
    sides = [
        Side(
            f"{t.scenario.label}, {t.name}",
            t.server.url + t.scenario.path,
            t.scenario.script,
            lambda t=t: t.scenario.args(run, t.ids),  # type: ignore[misc]
        )
        for t in targets
    ]
    return alternate(
        sides, run.load, rounds=run.mode.rounds, warmup=run.warmup, workdir=run.workdir, log=run.log
    )


def throughput_row(
    label: str,
    workers: int,
    service: WrkResult,
    baseline: WrkResult,
    base: str,
    target: Target | None,
    *,
    served: str = "",
) -> Row:
    """The service's requests/s (``served``: where, when not the usual) against ``base``'s."""
    return compare_row(f"{label}: req/s", workers, (served, service), (base, baseline), target)


def http_rows(run: Run, workers: int, *, core: bool, stripe: bool) -> None:
    """Start the service and its floors with ``workers`` workers each (and, at the cluster's
    worker counts, a service and a redis-py floor on the cluster) and load them: the core
    endpoints and, when ``stripe``, the provider suite."""
    single = standalone(run)
    service = service_server(run, single, workers)
    floor = redispy_floor_server(run, single, workers)
    fastapi_floor = fastapi_floor_server(run, single, workers)
    servers = [service, floor, fastapi_floor]
    on_cluster = core and run.cluster is not None and workers in run.mode.cluster_workers
    if on_cluster:
        cluster = clustered(run)
        cluster_service = service_server(run, cluster, workers)
        cluster_floor = redispy_floor_server(run, cluster, workers)
        servers += [cluster_service, cluster_floor]
    what = "the service, the redis-py floor and the FastAPI floor"
    if on_cluster:
        what += ", and the service and the redis-py floor on the cluster"
    run.log(f"starting {what}, {workers} worker(s) each")
    with serving(servers):
        if core:
            if "standalone" not in run.seeded:
                run.seeded["standalone"] = seed_paid_payments(run, service, single)
                fetch_receipt_pdf(run, service, run.seeded["standalone"].ids[0])
            check_answers(run, service, run.pdf_id, receipts=True)
            check_answers(run, floor, run.pdf_id, receipts=False)
            check_answers(run, fastapi_floor, run.pdf_id, receipts=True)
            cluster_targets: list[tuple[UvicornServer, UvicornServer, Path]] = []
            if on_cluster:
                if "cluster" not in run.seeded:
                    run.seeded["cluster"] = seed_paid_payments(run, cluster_service, cluster)
                paid = run.seeded["cluster"]
                check_answers(run, cluster_service, paid.ids[0], receipts=True)
                check_answers(run, cluster_floor, paid.ids[0], receipts=False)
                cluster_targets.append((cluster_service, cluster_floor, paid.ids_file))
            core_rows(run, workers, service, floor, fastapi_floor, cluster_targets)
        if stripe and run.stripe is not None:
            run.rows.extend(run.stripe.run(service.url, floor.url, fastapi_floor.url, workers))


def core_rows(
    run: Run,
    workers: int,
    service: UvicornServer,
    floor: UvicornServer,
    fastapi_floor: UvicornServer,
    cluster: list[tuple[UvicornServer, UvicornServer, Path]],
) -> None:
    cases = scenarios(run)
    ids = run.seeded["standalone"].ids_file
    if run.mode.warmup_s and not run.mode.warmup_each:
        for server in (service, floor, fastapi_floor):
            run_wrk(
                server.url + cases["create"].path,
                cases["create"].script,
                cases["create"].args(run, ids),
                Load(run.mode.threads, run.mode.connections, run.mode.warmup_s),
                workdir=run.workdir,
            )
    run.log(
        f"load runs, {workers} worker(s), {run.mode.rounds} x {run.mode.duration_s} s per target"
    )
    graded = workers == GRADED_WORKERS
    for key, target in (("create", CREATE_RPS), ("verify", VERIFY_RPS)):
        case = cases[key]
        targets = [
            Loaded("service", service, case, ids),
            Loaded(REDISPY_FLOOR, floor, case, ids),
            Loaded(FASTAPI_FLOOR, fastapi_floor, case, ids),
        ]
        if key == "create":
            targets.append(Loaded(ROUND_TRIP_FLOOR, fastapi_floor, cases["create3"], ids))
        for cluster_service, cluster_floor, cluster_ids in cluster:
            targets += [
                Loaded("service on the cluster", cluster_service, case, cluster_ids),
                Loaded(f"{REDISPY_FLOOR} on the cluster", cluster_floor, case, cluster_ids),
            ]
        svc, flo, fast, *rest = measure(run, targets)
        run.rows.append(
            throughput_row(case.label, workers, svc, flo, REDISPY_FLOOR, target if graded else None)
        )
        run.rows.append(throughput_row(case.label, workers, svc, fast, FASTAPI_FLOOR, None))
        if key == "create":
            three, *rest = rest
            # Where the design's round trips and FastAPI alone leave create-intent: the
            # service against that floor, and that floor against the redis-py floor (the
            # most any service doing those round trips under FastAPI could reach).
            run.rows.append(throughput_row(case.label, workers, svc, three, ROUND_TRIP_FLOOR, None))
            run.rows.append(
                compare_row(
                    f"{case.label}: req/s",
                    workers,
                    (ROUND_TRIP_FLOOR, three),
                    (REDISPY_FLOOR, flo),
                )
            )
            run.rows.append(
                Row(
                    measure="create-intent: p99 latency",
                    workers=str(workers),
                    service=f"p99 {svc.p99_ms:.2f} ms",
                    baseline=f"{FASTAPI_FLOOR}: p99 {fast.p99_ms:.2f} ms",
                    ratio=svc.p99_ms / fast.p99_ms if fast.p99_ms else None,
                    target=CREATE_P99,
                    invalid=invalid(svc, fast),
                )
            )
        if rest:
            svc_c, flo_c = rest
            label = f"{case.label} on a 3-master Redis Cluster"
            on = "on the cluster"
            run.rows += [
                throughput_row(label, workers, svc_c, svc, "service on one Redis", None, served=on),
                throughput_row(
                    label, workers, svc_c, flo_c, f"{REDISPY_FLOOR} on the cluster", None, served=on
                ),
                compare_row(
                    f"{label}: req/s",
                    workers,
                    (f"{REDISPY_FLOOR} on the cluster", flo_c),
                    (f"{REDISPY_FLOOR} on one Redis", flo),
                ),
            ]

    svc, flo = measure(
        run,
        [
            Loaded("service", service, cases["receipt"], ids),
            Loaded(FASTAPI_FLOOR, fastapi_floor, cases["receipt"], ids),
        ],
    )
    run.rows.append(
        throughput_row(cases["receipt"].label, workers, svc, flo, FASTAPI_FLOOR, RECEIPT_RPS)
    )

    svc, mem, fil = measure(
        run,
        [
            Loaded("service", service, cases["pdf"], ids),
            Loaded(f"{FASTAPI_FLOOR}, from memory", fastapi_floor, cases["pdf"], ids),
            Loaded(f"{FASTAPI_FLOOR}, FileResponse", fastapi_floor, cases["file"], ids),
        ],
    )
    label = f"cached PDF download ({run.pdf_bytes:,} B)"
    run.rows.append(throughput_row(label, workers, svc, mem, "same bytes from memory", PDF_RPS))
    run.rows.append(
        Row(
            measure=f"{label}: req/s",
            workers=str(workers),
            service=svc.describe(),
            baseline=f"Starlette FileResponse: {fil.describe()}",
            ratio=svc.rps / fil.rps if fil.rps else None,
            invalid=invalid(svc, fil),
        )
    )


def render_rows(run: Run, figures: RenderFigures) -> None:
    svc_p50, bare_p50 = median(figures.service_ms), median(figures.bare_ms)
    svc_p95, bare_p95 = percentile(figures.service_ms, 95), percentile(figures.bare_ms, 95)
    run.rows.append(
        Row(
            measure="first render of a receipt: p50 (p95)",
            workers="1 render process",
            service=f"ReceiptService: p50 {svc_p50:.1f} ms (p95 {svc_p95:.1f} ms)",
            baseline=f"bare WeasyPrint: p50 {bare_p50:.1f} ms (p95 {bare_p95:.1f} ms)",
            ratio=svc_p50 / bare_p50 if bare_p50 else None,
            target=FIRST_RENDER_P50,
        )
    )
    run.rows.append(
        Row(
            measure="first render of a receipt: p95",
            workers="1 render process",
            service=f"p95 {svc_p95:.1f} ms",
            baseline=f"bare: p95 {bare_p95:.1f} ms",
            ratio=svc_p95 / bare_p95 if bare_p95 else None,
        )
    )
    run.rows.append(
        Row(
            measure="first receipt after start-up (warm-up done, nothing rendered yet)",
            workers="1 render process",
            service=f"{figures.cold_service_ms:.1f} ms",
            baseline=f"bare: {figures.cold_bare_ms:.1f} ms",
            ratio=(
                figures.cold_service_ms / figures.cold_bare_ms if figures.cold_bare_ms else None
            ),
        )
    )
    early, mid, late = figures.rss_counts
    hwm_early, hwm_late = figures.rss_early["VmHWM"], figures.rss_late["VmHWM"]
    run.rows.append(
        Row(
            measure="render process peak RSS (VmHWM)",
            workers="1 render process",
            service=(
                f"after {late:,} renders: {hwm_late / 1024:.1f} MiB "
                f"(after {mid:,}: {figures.rss_mid['VmHWM'] / 1024:.1f} MiB; "
                f"VmRSS now {figures.rss_late['VmRSS'] / 1024:.1f} MiB)"
            ),
            baseline=f"after {early:,} renders: {hwm_early / 1024:.1f} MiB",
            ratio=hwm_late / hwm_early if hwm_early else None,
            target=RENDER_RSS,
        )
    )
    one, two = figures.receipts_per_s(1), figures.receipts_per_s(2)
    run.rows.append(
        Row(
            measure="receipts rendered per second, many in flight",
            workers="2 vs 1 render processes",
            service=f"2 processes: {two:.1f} receipts/s",
            baseline=f"1 process: {one:.1f} receipts/s",
            ratio=two / one if one else None,
            target=RENDER_SCALING,
        )
    )
    spin_one, spin_two = figures.spins_per_s(1), figures.spins_per_s(2)
    run.rows.append(
        Row(
            measure="machine calibration: CPU-bound Python tasks per second (no I/O)",
            workers="2 vs 1 processes",
            service=f"2 processes: {spin_two:.1f} tasks/s",
            baseline=f"1 process: {spin_one:.1f} tasks/s",
            ratio=spin_two / spin_one if spin_one else None,
        )
    )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few requests and renders through every code path (well under a minute)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write the report (default: docs/benchmarks.md; with --smoke a temp file)",
    )
    parser.add_argument(
        "--workers", type=str, help="uvicorn worker counts to run, comma-separated (default 1,2)"
    )
    parser.add_argument("--duration", type=int, help="seconds per measured wrk run")
    parser.add_argument(
        "--only",
        choices=("http", "render", "stripe"),
        action="append",
        help="run only these parts (repeatable); the default runs all",
    )
    parser.add_argument(
        "--stripe-in-flight",
        type=int,
        help="requests in flight for the Stripe provider-latency runs (default 64)",
    )
    parser.add_argument("--no-cluster", action="store_true", help="skip the Redis Cluster runs")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, receipts)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    mode = SMOKE if options.smoke else FULL
    if options.workers:
        mode = _replace(mode, workers=tuple(int(w) for w in options.workers.split(",")))
    if options.duration:
        mode = _replace(mode, duration_s=options.duration)
    if options.no_cluster:
        mode = _replace(mode, cluster_workers=())
    if options.stripe_in_flight:
        mode = _replace(mode, stripe=_replace(mode.stripe, in_flight=options.stripe_in_flight))
    parts = set(options.only or ("http", "render", "stripe"))
    started = now()
    clock = time.monotonic()

    def log(message: str) -> None:
        print(f"[bench {time.monotonic() - clock:6.1f}s] {message}", file=sys.stderr, flush=True)

    if wrk_binary() is None and parts & {"http", "stripe"}:
        print("wrk is not installed: run `make bench` (scripts/system-deps.sh bench)")
        return 2
    if (ROOT / ".env").exists():
        log("note: .env exists; the variables the bench sets override it, others apply")
    workdir = Path(tempfile.mkdtemp(prefix="payments-bench-"))
    run = Run(mode=mode, workdir=workdir, log=log)
    try:
        run.settings = Settings(
            _env_file=None,
            jwt_secret_key=secrets.token_urlsafe(36),  # 48 characters
            receipts_dir=workdir / "receipts",
            receipt_warm_up=True,
            environment="development",
            log_level="WARNING",
        )
        run.token = create_access_token(run.settings, USER, expires_minutes=24 * 60)
        if parts & {"http", "stripe"}:
            run.redis = RedisServer(workdir / "redis")
            run.redis.start()
            log(f"redis-server on port {run.redis.port}")
        if "http" in parts and mode.cluster_workers:
            run.cluster = RedisClusterServers(workdir / "cluster")
            run.cluster.start()
            log(f"Redis Cluster, 3 masters, on ports {', '.join(map(str, run.cluster.ports))}")
        with contextlib.ExitStack() as stack:
            if "stripe" in parts:
                reason = providers.available()
                if reason is None:
                    server = stack.enter_context(
                        providers.fake_stripe(mode.stripe.latency_ms, workdir)
                    )
                    run.stripe_env = providers.service_environment(server)
                    run.stripe = providers.StripeSuite(
                        config=mode.stripe,
                        server=server,
                        redis_url=run.redis.url if run.redis else "",
                        key_prefix=KEY_PREFIX,
                        token=run.token,
                        workdir=workdir,
                        threads=mode.threads,
                        log=log,
                    )
                    log(f"fake Stripe on {server.url}, answering in {mode.stripe.latency_ms} ms")
                else:
                    log(f"Stripe benchmarks skipped: the Stripe provider is {reason}")
            for index, workers in enumerate(mode.workers):
                core, stripe = "http" in parts, run.stripe is not None and index == 0
                if core or stripe:
                    http_rows(run, workers, core=core, stripe=stripe)
        if run.redis is not None:
            run.redis.stop()
            run.redis = None
        if run.cluster is not None:
            run.cluster.stop()
            run.cluster = None
        if "render" in parts:
            log("receipt rendering (servers stopped; an idle redis-server for the ledger)")
            # The receipts' numbers and hash chain live in Redis: a fresh, idle server.
            ledger_redis = RedisServer(workdir / "redis-ledger")
            ledger_redis.start()
            try:
                figures = asyncio.run(
                    run_render_bench(run.settings, mode.render, workdir, log, ledger_redis.url)
                )
            finally:
                ledger_redis.stop()
            render_rows(run, figures)
    finally:
        if run.redis is not None:
            run.redis.stop()
        if run.cluster is not None:
            run.cluster.stop()
        if options.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    table = render_table(run.rows)
    print(table)
    out = options.out
    if out is None:
        if options.smoke:
            handle, name = tempfile.mkstemp(prefix="benchmarks-smoke-", suffix=".md")
            os.close(handle)
            out = Path(name)
        else:
            out = ROOT / "docs" / "benchmarks.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        document(run.rows, command=command_line(), notes=NOTES, mode=mode.name, started=started)
    )
    log(f"report written to {out}")
    return 0


def _replace(config: T, **changes: object) -> T:
    from dataclasses import replace

    return replace(config, **changes)
