"""Load from a separate process on loopback: wrk with a Lua script, always bounded in time."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .report import Row, Target

SCRIPTS = Path(__file__).resolve().parent / "wrk"
RESULT_MARK = "BENCH_RESULT "


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # responses that were not 2xx or 3xx
    socket_errors: int  # connect, read, write errors and timeouts

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    def describe(self) -> str:
        text = f"{self.rps:,.0f} req/s, p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms"
        if self.errors:
            text += f" ({self.non_2xx} non-2xx, {self.socket_errors} socket errors)"
        return text


@dataclass(frozen=True)
class Load:
    threads: int
    connections: int
    duration_s: int


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def script_path(name: str, workdir: Path) -> Path:
    """``bench/wrk/<name>.lua`` with the shared reporting function appended."""
    target = workdir / f"{name}.lua"
    if not target.exists():
        body = (SCRIPTS / f"{name}.lua").read_text()
        report = (SCRIPTS / "report.lua").read_text()
        target.write_text(body + "\n" + report)
    return target


def run_wrk(url: str, script: str, args: list[str], load: Load, *, workdir: Path) -> WrkResult:
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not installed (scripts/system-deps.sh bench)")
    command = [
        binary,
        f"-t{load.threads}",
        f"-c{load.connections}",
        f"-d{load.duration_s}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script_path(script, workdir)),
        url,
        "--",
        *args,
    ]
    finished = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=load.duration_s + 60,
        check=False,
    )
    for line in finished.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK) :])
            return WrkResult(
                requests=int(data["requests"]),
                seconds=int(data["duration_us"]) / 1e6,
                p50_ms=float(data["p50_us"]) / 1000,
                p99_ms=float(data["p99_us"]) / 1000,
                non_2xx=int(data["status"]),
                socket_errors=sum(int(data[k]) for k in ("connect", "read", "write", "timeout")),
            )
    raise RuntimeError(
        f"wrk gave no result (exit {finished.returncode}):\n"
        f"{finished.stdout[-2000:]}\n{finished.stderr[-2000:]}"
    )


@dataclass(frozen=True)
class Side:
    """One thing to load: a name for the log, the URL wrk is given, its script, and what makes
    its args (called for every run: a create run needs Idempotency-Keys no run used before)."""

    name: str
    url: str
    script: str
    args: Callable[[], list[str]]


def alternate(
    sides: list[Side],
    load: Load,
    *,
    rounds: int,
    warmup: Load | None,
    workdir: Path,
    log: Callable[[str], None] | None = None,
) -> list[WrkResult]:
    """Load each side in turn for ``load.duration_s``, in ``rounds`` rounds that alternate the
    order (A B C, C B A, ...), so that a drift in the machine's load over the minute weighs on
    every side alike; with ``warmup``, each side gets one warm-up run before its first
    measured one. One combined result per side."""
    parts: dict[int, list[WrkResult]] = {index: [] for index in range(len(sides))}
    order = list(range(len(sides)))
    for round_ in range(rounds):
        for index in order if round_ % 2 == 0 else order[::-1]:
            side = sides[index]
            if round_ == 0 and warmup is not None and warmup.duration_s:
                run_wrk(side.url, side.script, side.args(), warmup, workdir=workdir)
            parts[index].append(run_wrk(side.url, side.script, side.args(), load, workdir=workdir))
    results = [combine(parts[index]) for index in range(len(sides))]
    if log is not None:
        for side, result in zip(sides, results, strict=True):
            log(f"  {side.name}: {result.describe()}")
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


def invalid(*results: WrkResult) -> str | None:
    """Why these figures cannot be trusted (errors during the runs), or None."""
    bad = [r for r in results if r.errors]
    if not bad:
        return None
    return ", ".join(f"{r.non_2xx} non-2xx/{r.socket_errors} socket errors" for r in bad)


def _named(name: str, text: str) -> str:
    return f"{name}: {text}" if name else text


def compare_row(
    measure: str,
    workers: int,
    side: tuple[str, WrkResult],
    baseline: tuple[str, WrkResult],
    target: Target | None = None,
    *,
    p50: bool = False,
) -> Row:
    """One side's requests/s as a fraction of another's (with ``p50``: how far its p50
    latency is above the other's, in ms). Each side is (name, result); an empty name leaves
    the figures unnamed (the service's own)."""
    (name, result), (base_name, base) = side, baseline
    if p50:
        texts = f"p50 {result.p50_ms:.2f} ms", f"p50 {base.p50_ms:.2f} ms"
        ratio: float | None = result.p50_ms - base.p50_ms
    else:
        texts = result.describe(), base.describe()
        ratio = result.rps / base.rps if base.rps else None
    return Row(
        measure=measure,
        workers=str(workers),
        service=_named(name, texts[0]),
        baseline=_named(base_name, texts[1]),
        ratio=ratio,
        target=target,
        invalid=invalid(result, base),
        unit="ms" if p50 else "",
    )
