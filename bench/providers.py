"""Provider benchmarks (issue 6, parts 2 and 4, as revised): Stripe, against a canned fake.

Part 2, provider latency: the fake answers every Checkout Session create after ``latency_ms``
and wrk keeps ``in_flight`` create-intents (provider stripe, hosted Checkout) in flight, with
1 worker. The target's baseline is the floor making the same call with the same client: the
redis-py floor (bench/floor_redispy.py) builds the same parameters with the provider's own
transformer, sends them through ``stripe.StripeClient`` over the provider's httpx2-backed
``HTTPClient`` (services/payment_providers/stripe/provider.py), then does create-intent's one
EVALSHA. The service and that floor are loaded in alternating rounds; the service must reach
``PROVIDER_LATENCY_RPS`` of the floor's requests/s with a p50 at most ``PROVIDER_LATENCY_P50_MS``
above the floor's. For reference: the ideal (in_flight / latency), the floor awaiting the
same latency instead of calling (what the SDK client costs), and the fake alone under wrk
replaying the service's first Checkout Session request (its ceiling).

The fake (bench/fake_stripe_proc.py) is a canned responder in a uvicorn process of its own: it
answers Stripe's sample session under a fresh ID after the latency, and validates nothing
(checking requests against Stripe's API description is the tests' job), so that the bench
measures the service and not the fake.

Part 4, webhooks: signed ``checkout.session.expired`` events, each for a distinct pending
Stripe payment (applied: pending -> expired), then the same deliveries replayed (each answered
``duplicate``). Expired, not completed: a completed session makes the service queue a receipt
render per event in the background, and thousands of queued renders would compete for the CPU
with every later measurement (see the notes in the report). The payments are written with the
service's own ``PaymentStore`` (what create-intent stores), so that thousands can be made in
seconds; the events are built from Stripe's sample objects and signed as Stripe signs them.

Only used when the Stripe provider and the test suite's Stripe fixtures exist: ``available()``
says why not otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from . import fake_stripe_proc
from .procs import ROOT, BenchError, UvicornServer
from .report import Row, Target
from .wrk import Load, Side, WrkResult, alternate, compare_row, invalid, run_wrk

STRIPE_SECRET_KEY = "sk_test_bench_0123456789abcdefghijklmnop"
STRIPE_PUBLISHABLE_KEY = "pk_test_bench0123456789abcdefghijklmnop"
STRIPE_WEBHOOK_SECRET = "whsec_bench_0123456789abcdefghijklmnop"
API = "/api/v1/payment"
# With the provider answering in 50 ms and 64 calls in flight, against the floor making the
# same call with the same client: at least 0.85 of its requests/s, and a p50 within 5 ms of its.
PROVIDER_LATENCY_RPS = Target(0.85)
PROVIDER_LATENCY_P50_MS = Target(5.0, at_least=False, unit="ms")
SKELETON = (
    "FastAPI floor: the same call with the same client between the idempotency claim and the "
    "store's create, through the service's store"
)


@dataclass(frozen=True)
class StripeConfig:
    latency_ms: int  # how long the fake Stripe takes to answer each call
    in_flight: int  # wrk connections for the provider-latency runs
    duration_s: int
    rounds: int  # measured runs of the service and its floor, in alternating order
    warmup_s: int  # 0: no warm-up runs
    webhook_payments: int  # pending Stripe payments made for the webhook runs
    webhook_warmup_payments: int  # of which this many are spent on the warm-up run


def available() -> str | None:
    """None when the Stripe provider and its fake are there and import; else why not."""
    needed = (
        ROOT / "tests" / "fakes" / "stripe_server.py",
        ROOT / "services" / "payment_providers" / "stripe" / "__init__.py",
    )
    missing = [str(path.relative_to(ROOT)) for path in needed if not path.exists()]
    if missing:
        return "not there yet: " + ", ".join(missing)
    try:
        import services.payment_providers.stripe  # noqa: F401
        import tests.fakes.stripe_server  # noqa: F401
    except Exception as error:  # any failure to import means: cannot run
        return f"does not import: {error!r}"
    return None


@dataclass
class FakeStripeServer:
    """The fake Stripe's server process (bench/fake_stripe_proc.py), seen from the bench."""

    process: UvicornServer

    @property
    def url(self) -> str:
        return self.process.url

    def session_body(self) -> bytes | None:
        """The raw body of the first Checkout Session create the fake received, if any."""
        with httpx.Client(base_url=self.url, timeout=10) as client:
            answer = client.get("/_bench/session-body")
        if answer.status_code == 404:
            return None
        answer.raise_for_status()
        return answer.content


@contextmanager
def fake_stripe(latency_ms: int, log_dir: Path) -> Iterator[FakeStripeServer]:
    """The canned fake Stripe served by a uvicorn process of its own (free loopback port, own
    process group, log in ``log_dir``), answering every call after ``latency_ms``; stopped
    when the block ends, however it ends."""
    env = dict(os.environ)  # PAYMENT_SPECS_DIR, if set, says where Stripe's fixtures are
    env[fake_stripe_proc.LATENCY_ENV] = str(latency_ms)
    process = UvicornServer(
        "fake-stripe",
        "bench.fake_stripe_proc:create_app",
        workers=1,
        env=env,
        log_dir=log_dir,
        extra_args=("--factory",),
    )
    try:
        process.start(ready_path="/_bench/health")
        yield FakeStripeServer(process)
    finally:
        process.stop()


def service_environment(server: FakeStripeServer) -> dict[str, str]:
    return {
        "STRIPE_SECRET_KEY": STRIPE_SECRET_KEY,
        "STRIPE_PUBLISHABLE_KEY": STRIPE_PUBLISHABLE_KEY,
        "STRIPE_WEBHOOK_SECRET": STRIPE_WEBHOOK_SECRET,
        "STRIPE_API_BASE": server.url,
    }


# -- part 4: payments and signed events ------------------------------------------------------


async def _seed_pending(redis_url: str, prefix: str, count: int) -> list[tuple[str, str]]:
    """``count`` pending Stripe Checkout payments in the service's store: (id, reference)."""
    from models.payment import PaymentRecord, PaymentStatus
    from services.payment_store import PaymentStore

    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        store = PaymentStore(redis, prefix=prefix)
        made: list[tuple[str, str]] = []
        now = datetime.now(UTC)

        async def one() -> None:
            payment_id = f"cs_test_{secrets.token_hex(28)}"
            reference = f"ord_{secrets.token_hex(12)}"
            record = PaymentRecord(
                payment_id=payment_id,
                provider="stripe",
                reference=reference,
                plan="pro",
                amount=2900,
                currency="EUR",
                status=PaymentStatus.PENDING,
                owner="bench-user",
                redirect_url=f"https://checkout.stripe.com/c/pay/{payment_id}",
                created_at=now,
                updated_at=now,
            )
            if not await store.create(record, cause="bench:seed"):
                raise BenchError(f"payment {payment_id} existed already")
            made.append((payment_id, reference))

        # 50 at a time: redis-py's pool refuses more than 100 connections by default.
        for start in range(0, count, 50):
            await asyncio.gather(*(one() for _ in range(min(50, count - start))))
        return made
    finally:
        await redis.aclose()


async def _count_status(redis_url: str, prefix: str, payment_ids: list[str], status: str) -> int:
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        found = 0
        for start in range(0, len(payment_ids), 1000):
            async with redis.pipeline(transaction=False) as pipe:
                for payment_id in payment_ids[start : start + 1000]:
                    pipe.hget(f"{prefix}pay:{{{payment_id}}}", "status")
                values = await pipe.execute()
            found += sum(1 for value in values if value == status)
        return found
    finally:
        await redis.aclose()


def _session_object(template: dict[str, Any], payment_id: str, reference: str) -> dict[str, Any]:
    session = dict(template)
    session.update(
        {
            "id": payment_id,
            "amount_subtotal": 2900,
            "amount_total": 2900,
            "currency": "eur",
            "client_reference_id": reference,
            "metadata": {"reference": reference},
            "payment_intent": None,
            "payment_status": "unpaid",
            "status": "expired",
            "expires_at": int(time.time()),
        }
    )
    return session


def write_events(payments: list[tuple[str, str]], path: Path) -> None:
    """One signed delivery a line: ``<Stripe-Signature>\\t<body>``, as Stripe would POST it
    (bodies compact, so that one fits on a line; the signature covers the bytes sent)."""
    import stripe

    from tests.fakes.stripe_server import new_id
    from tests.fakes.stripe_spec import load_fixtures

    template = load_fixtures()["checkout.session"]
    lines = []
    for payment_id, reference in payments:
        event = {
            "id": new_id("evt_"),
            "object": "event",
            "api_version": stripe.api_version,
            "created": int(time.time()),
            "data": {"object": _session_object(template, payment_id, reference)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": "checkout.session.expired",
        }
        body = json.dumps(event, separators=(",", ":"))
        header = stripe.WebhookSignature.generate_signature_header(body, STRIPE_WEBHOOK_SECRET)
        lines.append(f"{header}\t{body}")
    path.write_text("\n".join(lines) + "\n")


# -- the suite --------------------------------------------------------------------------------


@dataclass
class StripeSuite:
    """Runs while the service and the redis-py floor, both configured for the fake, are up."""

    config: StripeConfig
    server: FakeStripeServer
    redis_url: str
    key_prefix: str
    token: str
    workdir: Path
    threads: int
    log: Callable[[str], None]

    def _load(self, seconds: int) -> Load:
        return Load(self.threads, self.config.in_flight, seconds)

    def _warm(self, url: str, script: str, args: list[str]) -> None:
        if self.config.warmup_s:
            run_wrk(url, script, args, self._load(self.config.warmup_s), workdir=self.workdir)

    def _wrk(self, url: str, script: str, args: Callable[[], list[str]]) -> WrkResult:
        """One warm-up run (when configured), then one measured run: each with fresh args."""
        self._warm(url, script, args())
        result = run_wrk(
            url, script, args(), self._load(self.config.duration_s), workdir=self.workdir
        )
        self.log(f"  {script} @ {url}: {result.describe()}")
        return result

    def run(self, service_url: str, floor_url: str, skeleton_url: str, workers: int) -> list[Row]:
        """``floor_url``: the redis-py floor (bench/floor_redispy.py), ``skeleton_url`` the
        FastAPI floor (bench/floor_app.py), both configured for the fake."""
        rows = self.provider_latency(service_url, floor_url, skeleton_url, workers)
        rows += self.webhooks(service_url, workers)
        return rows

    def provider_latency(
        self, service_url: str, floor_url: str, skeleton_url: str, workers: int
    ) -> list[Row]:
        cfg = self.config
        body = '{"plan": "pro", "provider": "stripe"}'
        for name, url in (
            ("service", f"{service_url}{API}/create-intent"),
            ("floor", f"{floor_url}{API}/create-intent-stripe"),
            ("three-round-trip floor", f"{skeleton_url}{API}/create-intent-stripe-3rt"),
        ):
            with httpx.Client(timeout=30) as client:
                answer = client.post(
                    url,
                    content=body,
                    headers={
                        "Authorization": f"Bearer {self.token}",
                        "Content-Type": "application/json",
                        "Idempotency-Key": f"check-{secrets.token_hex(8)}",
                    },
                )
            if answer.status_code != 201 or not answer.json()["payment_id"].startswith("cs_"):
                raise BenchError(
                    f"Stripe create-intent ({name}) answered {answer.status_code}: {answer.text}"
                )
        session_body = self.server.session_body()
        if session_body is None:
            raise BenchError("the fake Stripe saw no Checkout Session request")
        self.log(
            f"provider latency: fake Stripe answers in {cfg.latency_ms} ms, "
            f"{cfg.in_flight} requests in flight"
        )
        warmup = self._load(cfg.warmup_s) if cfg.warmup_s else None
        service, floor, skeleton = alternate(
            [
                Side(
                    "Stripe create-intent, service",
                    f"{service_url}{API}/create-intent",
                    "create_intent",
                    lambda: [self.token, f"stripe{secrets.token_hex(6)}", body],
                ),
                Side(
                    "Stripe create-intent, floor (same SDK call, same client)",
                    f"{floor_url}{API}/create-intent-stripe",
                    "create_intent",
                    lambda: [self.token, f"floor{secrets.token_hex(6)}", body],
                ),
                Side(
                    "Stripe create-intent, FastAPI floor in create-intent's 3 round trips",
                    f"{skeleton_url}{API}/create-intent-stripe-3rt",
                    "create_intent",
                    lambda: [self.token, f"skel{secrets.token_hex(6)}", body],
                ),
            ],
            self._load(cfg.duration_s),
            rounds=cfg.rounds,
            warmup=warmup,
            workdir=self.workdir,
            log=self.log,
        )
        sleep = self._wrk(
            f"{floor_url}{API}/create-intent-sleep",
            "create_intent",
            lambda: [self.token, f"sleep{secrets.token_hex(6)}", '{"plan": "pro"}'],
        )
        fake = self._wrk(
            f"{self.server.url}/v1/checkout/sessions",
            "create_intent",
            lambda: [
                STRIPE_SECRET_KEY,
                f"fake{secrets.token_hex(6)}",
                session_body.decode(),
                "application/x-www-form-urlencoded",
            ],
        )
        ideal = cfg.in_flight / (cfg.latency_ms / 1000)
        label = (
            f"Stripe create-intent, fake answering in {cfg.latency_ms} ms, "
            f"{cfg.in_flight} in flight"
        )
        floor_name = "floor, same call with the same client (StripeClient over our HTTPClient)"
        rps, p50 = f"{label}: req/s", f"{label}: p50 latency"
        floor_rps = (f"{floor_name}, then one EVALSHA", floor)
        return [
            compare_row(rps, workers, ("", service), floor_rps, PROVIDER_LATENCY_RPS),
            compare_row(
                p50, workers, ("", service), (floor_name, floor), PROVIDER_LATENCY_P50_MS, p50=True
            ),
            # Where the design alone leaves this target: the same call with the same client
            # under FastAPI, between the idempotency claim and the store's create (the
            # service's own store), and nothing else.
            compare_row(rps, workers, ("", service), (SKELETON, skeleton)),
            compare_row(rps, workers, (SKELETON, skeleton), floor_rps),
            compare_row(p50, workers, (SKELETON, skeleton), (floor_name, floor), p50=True),
            Row(
                measure=f"{label}: req/s",
                workers=str(workers),
                service=service.describe(),
                baseline=f"ideal {cfg.in_flight}/{cfg.latency_ms / 1000:g} s: {ideal:,.0f} req/s",
                ratio=service.rps / ideal,
                invalid=invalid(service),
            ),
            Row(
                measure=f"{label}: req/s",
                workers=str(workers),
                service=f"{floor_name}: {floor.describe()}",
                baseline=f"floor awaiting {cfg.latency_ms} ms instead, then one EVALSHA: "
                + sleep.describe(),
                ratio=floor.rps / sleep.rps if sleep.rps else None,
                invalid=invalid(floor, sleep),
            ),
            Row(
                measure=f"{label}: the canned fake Stripe alone (its ceiling)",
                workers="1 process",
                service=fake.describe(),
                baseline=f"ideal: {ideal:,.0f} req/s",
                ratio=fake.rps / ideal,
                invalid=invalid(fake),
            ),
        ]

    def webhooks(self, service_url: str, workers: int) -> list[Row]:
        cfg = self.config
        self.log(f"webhooks: {cfg.webhook_payments} pending Stripe payments, signed events")
        payments = asyncio.run(
            _seed_pending(self.redis_url, self.key_prefix, cfg.webhook_payments + 1)
        )
        check, payments = payments[0], payments[1:]
        warm, measured = (
            payments[: cfg.webhook_warmup_payments],
            payments[cfg.webhook_warmup_payments :],
        )
        files = {}
        for name, chunk in (("check", [check]), ("warm", warm), ("events", measured)):
            files[name] = self.workdir / f"stripe-{name}.txt"
            if chunk:
                write_events(chunk, files[name])
        signature, body = files["check"].read_text().rstrip("\n").split("\t", 1)
        with httpx.Client(base_url=service_url, timeout=30) as client:
            answer = client.post(
                f"{API}/webhook/stripe",
                content=body.encode(),
                headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
            )
        if answer.status_code != 200 or answer.json().get("outcome") != "applied":
            raise BenchError(f"Stripe webhook answered {answer.status_code}: {answer.text}")

        url = f"{service_url}{API}/webhook/stripe"
        threads = str(self.threads)
        if warm:
            self._warm(url, "webhooks", [str(files["warm"]), threads])
        applied = run_wrk(
            url,
            "webhooks",
            [str(files["events"]), threads],
            self._load(cfg.duration_s),
            workdir=self.workdir,
        )
        self.log(f"  webhooks (first deliveries) @ {url}: {applied.describe()}")
        ids = [payment_id for payment_id, _ in measured]
        moved = asyncio.run(_count_status(self.redis_url, self.key_prefix, ids, "expired"))
        # Replay only deliveries that surely arrived before (the last ones sent may not have):
        # each one is then a duplicate, however often the run goes round.
        sent = files["events"].read_text().splitlines()
        replay = files["events"].with_name("stripe-replay.txt")
        replay.write_text("\n".join(sent[: max(1, min(moved, len(sent)) - cfg.in_flight)]) + "\n")
        if warm:
            self._warm(url, "webhooks", [str(replay), threads])
        replayed = run_wrk(
            url,
            "webhooks",
            [str(replay), threads],
            self._load(cfg.duration_s),
            workdir=self.workdir,
        )
        self.log(f"  webhooks (replayed) @ {url}: {replayed.describe()}")

        note = ""
        if applied.requests > moved:
            note = (
                f"; {applied.requests - moved:,} of {applied.requests:,} were re-deliveries: "
                f"only {len(measured):,} events were prepared"
            )
        return [
            Row(
                measure="Stripe webhooks, signed, first delivery (applied): events/s",
                workers=str(workers),
                service=f"{applied.describe()}; {moved:,} payments moved{note}",
                baseline="",
                ratio=None,
                invalid=invalid(applied),
            ),
            Row(
                measure="Stripe webhooks, the same deliveries replayed (duplicates): events/s",
                workers=str(workers),
                service=replayed.describe(),
                baseline=f"first deliveries: {applied.rps:,.0f} events/s",
                ratio=replayed.rps / applied.rps if applied.rps else None,
                invalid=invalid(replayed),
            ),
        ]
