"""The benchmark harness runs: ``python -m bench --smoke`` goes through every part of it (its
own redis-server, the service and the floor app under wrk with 1 and 2 workers, the Stripe
suite against the fake, receipt renders) with a few requests each, so that it cannot rot.

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
STRIPE_MEASURES = (
    "Stripe create-intent, fake answering in 50 ms",
    "Stripe webhooks, signed, first delivery (applied)",
    "Stripe webhooks, the same deliveries replayed (duplicates)",
)
NUMBER = re.compile(r"\d+(\.\d+)?")


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
        assert ratio == "n/a" or NUMBER.fullmatch(ratio), f"{measure!r}: ratio {ratio!r}"
        # Errors under load mean an endpoint answered something else than the bench expects.
        assert not result.startswith("INVALID"), f"{measure!r} ({workers} workers): {result}"

    def rows_for(measure: str) -> list[list[str]]:
        return [row for row in rows if row[0].startswith(measure)]

    for measure in CORE_MEASURES:
        assert {row[1] for row in rows_for(measure)} == {"1", "2"}, measure
        assert all(NUMBER.fullmatch(row[4]) for row in rows_for(measure)), measure
    for measure in RENDER_MEASURES:
        assert rows_for(measure), measure
        assert all(NUMBER.fullmatch(row[4]) for row in rows_for(measure)), measure
    if providers.available() is None:
        for measure in STRIPE_MEASURES:
            assert rows_for(measure), measure
        # The floor that makes the provider round trip itself answered every request.
        (bare,) = [row for row in rows_for(STRIPE_MEASURES[0]) if "bare httpx2" in row[3]]
        assert NUMBER.fullmatch(bare[4]), bare
