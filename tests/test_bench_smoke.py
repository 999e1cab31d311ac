"""The benchmark harness runs: ``python -m bench --smoke`` goes through every part of it (its
own redis-server and 3-master Redis Cluster, the service and both floors under wrk with 1 and
2 workers, the service and the redis-py floor on the cluster, the Stripe suite against the
canned fake, receipt renders) with a few requests each, so that it cannot rot.

Not a timing test: it checks that the run completes and that every row carries figures, never
what the figures are or whether a target was met.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import providers

ROOT = Path(__file__).resolve().parent.parent

# Every measure the smoke run must report (the first column of the table).
CORE_MEASURES = (
    "create-intent: req/s",
    "create-intent: p99 latency",
    "verify (paid): req/s",
    "receipt metadata: req/s",
    "cached PDF download",
)
RENDER_MEASURES = (
    "first render of a receipt: p50 (p95)",
    "first render of a receipt: p95",
    "first receipt after start-up",
    "render process peak RSS (VmHWM)",
    "receipts rendered per second, many in flight",
)
CLUSTER_MEASURES = (
    "create-intent on a 3-master Redis Cluster: req/s",
    "verify (paid) on a 3-master Redis Cluster: req/s",
)
STRIPE_MEASURES = (
    "Stripe create-intent, fake answering in 50 ms",
    "Stripe webhooks, signed, first delivery (applied)",
    "Stripe webhooks, the same deliveries replayed (duplicates)",
)
NUMBER = re.compile(r"\d+(\.\d+)?")
# A ratio, or a signed difference with its unit (latency allowances).
FIGURE = re.compile(r"\d+(\.\d+)?|[+-]\d+(\.\d+)? ms")


def _table(report: str) -> list[list[str]]:
    rows = []
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| Measure"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not installed: `make test` installs it (scripts/system-deps.sh test)",
)
def test_bench_smoke_run_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = out.read_text()
    assert "## Machine" in report and "nproc" in report and "--smoke" in report

    rows = _table(report)
    assert rows, report
    for measure, workers, service, _baseline, ratio, _target, result in rows:
        assert NUMBER.search(service), f"no figure for {measure!r}: {service!r}"
        assert ratio == "n/a" or FIGURE.fullmatch(ratio), f"{measure!r}: ratio {ratio!r}"
        # Errors under load mean an endpoint answered something else than the bench expects.
        assert not result.startswith("INVALID"), f"{measure!r} ({workers} workers): {result}"

    def rows_for(measure: str) -> list[list[str]]:
        return [row for row in rows if row[0].startswith(measure)]

    for measure in CORE_MEASURES:
        assert {row[1] for row in rows_for(measure)} == {"1", "2"}, measure
        assert all(NUMBER.fullmatch(row[4]) for row in rows_for(measure)), measure
    for measure in ("create-intent: req/s", "verify (paid): req/s"):
        # Graded against the redis-py floor at 1 worker; the FastAPI floor for reference.
        (graded,) = [r for r in rows_for(measure) if r[1] == "1" and r[5]]
        assert graded[3].startswith("redis-py floor"), graded
        assert any(r[3].startswith("FastAPI floor") for r in rows_for(measure)), measure
    three = [r for r in rows_for("create-intent: req/s") if "3 round trips" in r[2] + r[3]]
    assert {r[1] for r in three} == {"1", "2"} and all(NUMBER.fullmatch(r[4]) for r in three)
    for measure in CLUSTER_MEASURES:
        found = rows_for(measure)
        assert {row[1] for row in found} == {"1"}, measure
        assert any("service on one Redis" in row[3] for row in found), measure
        assert all(NUMBER.fullmatch(row[4]) for row in found), measure
    for measure in RENDER_MEASURES:
        assert rows_for(measure), measure
        assert all(NUMBER.fullmatch(row[4]) for row in rows_for(measure)), measure
    if providers.available() is None:
        for measure in STRIPE_MEASURES:
            assert rows_for(measure), measure
        # The floor making the same SDK call answered every request; both targets are graded.
        latency = rows_for(STRIPE_MEASURES[0])
        (rps,) = [r for r in latency if r[0].endswith("req/s") and r[5] == ">= 0.85"]
        (p50,) = [r for r in latency if r[0].endswith("p50 latency") and r[5]]
        assert "StripeClient" in rps[3] and NUMBER.fullmatch(rps[4]), rps
        assert p50[5] == "<= 5 ms" and FIGURE.fullmatch(p50[4]), p50
        # The design's own floor for it (claim, the same call, the store's create) answered
        # every request too.
        skeleton = [r for r in latency if "between the idempotency claim" in r[2] + r[3]]
        assert len(skeleton) == 3 and all(FIGURE.fullmatch(r[4]) for r in skeleton), skeleton
