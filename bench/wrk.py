"""Load from a separate process on loopback: wrk with a Lua script, always bounded in time."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
