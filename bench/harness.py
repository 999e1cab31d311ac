"""``python -m bench``: the service under load against its floor, and receipt rendering.

One run starts its own redis-server (free port, temporary directory, no persistence), then for
1 and 2 uvicorn workers the service (``app.main:app``) and, beside it, the floor app
(``bench/floor_app.py``) on the same server stack; wrk, a separate process, loads one of them
at a time over loopback for a fixed time. Receipt rendering is measured in this process after
the servers are stopped. Everything is compared as ratios measured in the same run.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.security import create_access_token
from app.settings import Settings

from . import providers
from .procs import ROOT, BenchError, RedisServer, UvicornServer
from .receipts import RenderConfig, RenderFigures, median, percentile, run_render_bench
from .report import Row, Target, command_line, document, now, render_table
from .wrk import Load, WrkResult, run_wrk, wrk_binary

API = "/api/v1/payment"
USER = "bench-user"
KEY_PREFIX = "bench:"

# The targets of issue 6, as ratios measured in one run.
CREATE_RPS = Target(0.70)
CREATE_P99 = Target(2.0, at_least=False)
VERIFY_RPS = Target(0.75)
RECEIPT_RPS = Target(0.75)
PDF_RPS = Target(0.60)
FIRST_RENDER_P50 = Target(1.2, at_least=False)
RENDER_RSS = Target(1.2, at_least=False)
RENDER_SCALING = Target(1.8)


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
        warmup_s=0,
        webhook_payments=1_000,
        webhook_warmup_payments=0,
    ),
)

NOTES = [
    "Each figure is a ratio of two measurements taken minutes apart in the same run on the "
    "same (shared, noisy) machine; absolute requests/s are not comparable across runs.",
    "The service runs as `python -m uvicorn app.main:app --workers N` and the floor app as "
    "`python -m uvicorn bench.floor_app:app --workers N`, both with `--loop uvloop --http "
    "httptools --no-access-log`, on 127.0.0.1, against one redis-server started by the bench "
    "(free port, temporary directory, no persistence).",
    "Service settings: ENVIRONMENT=development, LOG_LEVEL=WARNING, RECEIPT_WARM_UP=true, "
    "RECEIPT_RENDER_WORKERS=1, a 48-character JWT_SECRET_KEY, and RATE_LIMITS_ENABLED=false: "
    "all load comes from one user, who would be limited to 10 create-intents (30 verifies, 30 "
    "receipt reads, 10 PDFs) a minute, so with limits on the bench would measure 429s.",
    "The floor app does exactly the Redis work of each endpoint in one round trip and nothing "
    "else (no token check, no validation): create-intent is one Lua script that claims the "
    "idempotency key and writes the payment hash, its history entry, the sandbox session and "
    "the reference index; verify is one pipeline reading the payment and its sandbox session; "
    "receipt metadata is one HGETALL; the PDF is the same bytes answered from memory (and, for "
    "reference, through Starlette's FileResponse).",
    "Load: wrk (a separate process) with Lua scripts in bench/wrk/; create-intent sends a "
    "distinct Idempotency-Key per request; verify and receipt reads cycle through payments "
    "created and paid through the API first (POST /sandbox/checkout/{id}, outcome=succeeded). "
    "p50/p99 are wrk's latency percentiles.",
    "Each load figure is two runs of the same length per target in alternating order (service, "
    "baseline, baseline, service) after one warm-up run each; requests/s are totals over both "
    "runs, p50/p99 the mean of the two runs' percentiles.",
    "Stripe (provider latency, webhooks): 1 worker, the fake Stripe of tests/fakes/ served by a "
    "uvicorn process of its own (`python -m uvicorn bench.fake_stripe_proc:create_app --factory`, "
    "1 worker, same flags as the service: its state is in memory), which validates every request "
    "against Stripe's OpenAPI description and delays every answer by the stated latency; its "
    "ceiling row is wrk replaying the first Checkout Session request the service sent, straight "
    "to the fake, and a reference floor (`create-intent-http`) posts that same request to the "
    "fake with bare httpx2 before its Redis work, so that both sides pay for the fake's CPU. "
    "The service is "
    "configured with STRIPE_SECRET_KEY/STRIPE_WEBHOOK_SECRET/STRIPE_API_BASE pointing at it for "
    "the whole run (the sandbox stays the default provider). Webhooks are signed "
    "checkout.session.expired events, each for a distinct pending Stripe payment (written with "
    "the service's PaymentStore), then the same deliveries replayed: a completed session would "
    "also queue one receipt render per event in the background, which would compete for the "
    "CPU with every later measurement.",
    "Receipts: the service's side is ReceiptService with its process pool (fresh payment "
    "each time, so nothing is cached; the PDF is written to disk as in production); the bare "
    "side is receipt_render.init_worker/render_pdf called directly in the bench process. Memory "
    "is VmHWM (peak) and VmRSS of the pool's render process from /proc. The calibration row "
    "runs pure-Python CPU work in 1 and 2 processes alongside: what 2 processes can gain on this "
    "machine at that moment bounds the receipts-per-second ratio.",
]


@dataclass
class Run:
    mode: Mode
    workdir: Path
    log: Callable[[str], None]
    redis: RedisServer | None = None
    settings: Settings | None = None
    token: str = ""
    paid_ids: list[str] = field(default_factory=list)
    ids_file: Path | None = None
    pdf_id: str = ""
    pdf_bytes: int = 0
    stripe: providers.StripeSuite | None = None
    stripe_env: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    @property
    def load(self) -> Load:
        return Load(self.mode.threads, self.mode.connections, self.mode.duration_s)

    @property
    def warmup(self) -> Load:
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


def service_environment(run: Run, **extra: str) -> dict[str, str]:
    assert run.redis is not None and run.settings is not None
    env = _clean_environment()
    env.update(
        {
            "REDIS_URL": run.redis.url,
            "REDIS_KEY_PREFIX": KEY_PREFIX,
            "RATE_LIMITS_ENABLED": "false",
            "RECEIPTS_DIR": str(run.workdir / "receipts"),
            "RECEIPT_RENDER_WORKERS": "1",
            "RECEIPT_WARM_UP": "true",
            "JWT_SECRET_KEY": run.settings.jwt_secret_key.get_secret_value(),
            "ENVIRONMENT": "development",
            "LOG_LEVEL": "WARNING",
            "PAYMENT_PROVIDER": "sandbox",
            **run.stripe_env,
        }
    )
    env.update(extra)
    return env


def floor_environment(run: Run, **extra: str) -> dict[str, str]:
    assert run.redis is not None
    env = _clean_environment()
    env.update(
        {
            "REDIS_URL": run.redis.url,
            "REDIS_KEY_PREFIX": KEY_PREFIX,
            "FLOOR_PDF_PATH": str(run.workdir / "floor" / "receipt.pdf"),
            "FLOOR_SLEEP_MS": str(run.mode.stripe.latency_ms),
        }
    )
    if run.stripe_env:
        env["FLOOR_STRIPE_URL"] = run.stripe_env["STRIPE_API_BASE"]
        env["FLOOR_STRIPE_KEY"] = run.stripe_env["STRIPE_SECRET_KEY"]
    env.update(extra)
    return env


# -- setup through the API -------------------------------------------------------------------


def _auth(run: Run) -> dict[str, str]:
    return {"Authorization": f"Bearer {run.token}"}


def seed_paid_payments(run: Run, service: UvicornServer) -> None:
    """Create and pay ``paid_payments`` payments through the API, then wait until the service
    has rendered their receipts (renders in the background would steal CPU from the runs)."""
    count = run.mode.paid_payments
    run.log(f"creating and paying {count} payments through the API")
    tag = secrets.token_hex(4)
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
            run.paid_ids.append(payment_id)
    run.ids_file = run.workdir / "paid_ids.txt"
    run.ids_file.write_text("\n".join(run.paid_ids) + "\n")
    receipts = run.workdir / "receipts"
    deadline = time.monotonic() + 60 + count
    while len(list(receipts.rglob("*.pdf"))) < count:
        if time.monotonic() > deadline:
            raise BenchError("the service did not render the seeded receipts in time")
        time.sleep(0.1)
    run.pdf_id = run.paid_ids[0]
    with httpx.Client(base_url=service.url, timeout=30) as client:
        pdf = client.get(f"{API}/receipt/{run.pdf_id}/pdf", headers=_auth(run))
    if pdf.status_code != 200 or not pdf.content.startswith(b"%PDF"):
        raise BenchError(f"receipt download answered {pdf.status_code}")
    floor_pdf = run.workdir / "floor" / "receipt.pdf"
    floor_pdf.parent.mkdir(parents=True, exist_ok=True)
    floor_pdf.write_bytes(pdf.content)
    run.pdf_bytes = len(pdf.content)
    run.log(f"{count} paid payments; receipt PDF of {len(pdf.content):,} bytes")


def check_answers(run: Run, base_url: str, name: str, *, file_route: bool) -> None:
    """One request of each kind, so a broken endpoint stops the bench with its answer rather
    than producing a table of error figures."""
    checks: list[tuple[str, str, dict[str, object]]] = [
        ("POST", f"{API}/verify", {"json": {"payment_id": run.pdf_id}}),
        ("GET", f"{API}/receipt/{run.pdf_id}", {}),
        ("GET", f"{API}/receipt/{run.pdf_id}/pdf", {}),
    ]
    if file_route:
        checks.append(("GET", f"{API}/receipt/{run.pdf_id}/file", {}))
    with httpx.Client(base_url=base_url, timeout=30, headers=_auth(run)) as client:
        created = client.post(
            f"{API}/create-intent",
            json={"plan": "pro"},
            headers={"Idempotency-Key": f"check-{secrets.token_hex(8)}"},
        )
        if created.status_code != 201:
            raise BenchError(f"{name} create-intent answered {created.status_code}")
        for method, path, options in checks:
            answer = client.request(method, path, **options)  # type: ignore[arg-type]
            if answer.status_code != 200:
                raise BenchError(f"{name} {method} {path} answered {answer.status_code}")


# -- wrk runs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    label: str
    path: str  # path of the URL wrk is given
    script: str
    args: Callable[[Run], list[str]]


def scenarios(run: Run) -> dict[str, Scenario]:
    return {
        "create": Scenario(
            "create-intent",
            f"{API}/create-intent",
            "create_intent",
            lambda r: [r.token, f"run{secrets.token_hex(6)}", '{"plan": "pro"}'],
        ),
        "verify": Scenario(
            "verify (paid)", f"{API}/verify", "verify", lambda r: [r.token, str(r.ids_file)]
        ),
        "receipt": Scenario(
            "receipt metadata",
            f"{API}/receipt/",
            "get_ids",
            lambda r: [r.token, str(r.ids_file), f"{API}/receipt/", ""],
        ),
        "pdf": Scenario(
            "cached PDF download",
            f"{API}/receipt/{run.pdf_id}/pdf",
            "get_fixed",
            lambda r: [r.token],
        ),
        "file": Scenario(
            "cached PDF download",
            f"{API}/receipt/{run.pdf_id}/file",
            "get_fixed",
            lambda r: [r.token],
        ),
    }


def measure(run: Run, targets: list[tuple[str, str, Scenario]]) -> list[WrkResult]:
    """Load each (name, base URL, scenario) in turn for ``duration_s``, in ``rounds`` rounds
    that alternate the order (A B, B A, ...), so that a drift in the machine's load over the
    minute weighs on both sides alike. Each target gets one warm-up run first (full mode)."""
    mode = run.mode
    parts: dict[int, list[WrkResult]] = {index: [] for index in range(len(targets))}
    order = list(range(len(targets)))
    for round_ in range(mode.rounds):
        for index in order if round_ % 2 == 0 else order[::-1]:
            _name, base_url, scenario = targets[index]
            url = base_url + scenario.path
            if round_ == 0 and mode.warmup_each and mode.warmup_s:
                run_wrk(url, scenario.script, scenario.args(run), run.warmup, workdir=run.workdir)
            parts[index].append(
                run_wrk(url, scenario.script, scenario.args(run), run.load, workdir=run.workdir)
            )
    results = []
    for index, (name, _url, scenario) in enumerate(targets):
        result = combine(parts[index])
        run.log(f"  {scenario.label}, {name}: {result.describe()}")
        results.append(result)
    return results


def combine(results: list[WrkResult]) -> WrkResult:
    """Several runs of one target as one: counts add up; percentiles are averaged."""
    if len(results) == 1:
        return results[0]
    return WrkResult(
        requests=sum(r.requests for r in results),
        seconds=sum(r.seconds for r in results),
        p50_ms=sum(r.p50_ms for r in results) / len(results),
        p99_ms=sum(r.p99_ms for r in results) / len(results),
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors=sum(r.socket_errors for r in results),
    )


def _invalid(*results: WrkResult) -> str | None:
    bad = [r for r in results if r.errors]
    if not bad:
        return None
    return ", ".join(f"{r.non_2xx} non-2xx/{r.socket_errors} socket errors" for r in bad)


def throughput_row(
    label: str, workers: int, service: WrkResult, baseline: WrkResult, base: str, target: Target
) -> Row:
    return Row(
        measure=f"{label}: req/s",
        workers=str(workers),
        service=service.describe(),
        baseline=f"{base}: {baseline.describe()}",
        ratio=service.rps / baseline.rps if baseline.rps else None,
        target=target,
        invalid=_invalid(service, baseline),
    )


def http_rows(run: Run, workers: int, *, core: bool, stripe: bool) -> None:
    """Start the service and the floor app with ``workers`` workers each and load them: the
    core endpoints (part 1, cached PDF) and, when ``stripe``, the provider suite."""
    env = service_environment(run)
    service = UvicornServer(
        "service", "app.main:app", workers=workers, env=env, log_dir=run.workdir
    )
    floor = UvicornServer(
        "floor",
        "bench.floor_app:app",
        workers=workers,
        env=floor_environment(run),
        log_dir=run.workdir,
    )
    try:
        run.log(f"starting the service and the floor app, {workers} worker(s) each")
        service.launch()
        floor.launch()
        service.wait_ready(ready_path="/health")
        floor.wait_ready(ready_path="/health")
        if core:
            core_rows(run, service, floor, workers)
        if stripe and run.stripe is not None:
            run.rows.extend(run.stripe.run(service.url, floor.url, workers))
    finally:
        service.stop()
        floor.stop()


def core_rows(run: Run, service: UvicornServer, floor: UvicornServer, workers: int) -> None:
    if not run.paid_ids:
        seed_paid_payments(run, service)
    check_answers(run, service.url, "service", file_route=False)
    check_answers(run, floor.url, "floor", file_route=True)
    cases = scenarios(run)
    if run.mode.warmup_s and not run.mode.warmup_each:
        for server in (service, floor):
            run_wrk(
                server.url + cases["create"].path,
                cases["create"].script,
                cases["create"].args(run),
                run.warmup,
                workdir=run.workdir,
            )
    run.log(
        f"load runs, {workers} worker(s), {run.mode.rounds} x {run.mode.duration_s} s per target"
    )

    svc, flo = measure(
        run, [("service", service.url, cases["create"]), ("floor", floor.url, cases["create"])]
    )
    run.rows.append(throughput_row("create-intent", workers, svc, flo, "floor", CREATE_RPS))
    run.rows.append(
        Row(
            measure="create-intent: p99 latency",
            workers=str(workers),
            service=f"p99 {svc.p99_ms:.2f} ms",
            baseline=f"floor: p99 {flo.p99_ms:.2f} ms",
            ratio=svc.p99_ms / flo.p99_ms if flo.p99_ms else None,
            target=CREATE_P99,
            invalid=_invalid(svc, flo),
        )
    )
    for key, target in (("verify", VERIFY_RPS), ("receipt", RECEIPT_RPS)):
        svc, flo = measure(
            run, [("service", service.url, cases[key]), ("floor", floor.url, cases[key])]
        )
        run.rows.append(throughput_row(cases[key].label, workers, svc, flo, "floor", target))

    svc, mem, fil = measure(
        run,
        [
            ("service", service.url, cases["pdf"]),
            ("floor, from memory", floor.url, cases["pdf"]),
            ("floor, FileResponse", floor.url, cases["file"]),
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
            invalid=_invalid(svc, fil),
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
            _env_file=None,  # type: ignore[call-arg]
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
        if "render" in parts:
            log("receipt rendering (servers stopped)")
            figures = asyncio.run(run_render_bench(run.settings, mode.render, workdir, log))
            render_rows(run, figures)
    finally:
        if run.redis is not None:
            run.redis.stop()
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


def _replace(mode: Mode, **changes: object) -> Mode:
    from dataclasses import replace

    return replace(mode, **changes)  # type: ignore[arg-type]
