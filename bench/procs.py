"""The processes a bench run owns: its redis-server, its 3-master Redis Cluster, the uvicorn
servers under load and the fake Stripe's server (also uvicorn, see bench/fake_stripe_proc.py).

Everything listens on 127.0.0.1 on a free port, lives in the run's temporary directory and is
stopped (by its own process id) when the run ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent

# Both the service and the floor app run on exactly this server stack.
UVICORN_FLAGS = (
    "--host",
    "127.0.0.1",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    # uvicorn's own lifecycle lines only (the access log is off): they say when every worker
    # has finished its startup.
    "--log-level",
    "info",
)
STARTUP_LINE = "Application startup complete."


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BenchError(RuntimeError):
    """The bench could not run (a process did not start, a setup request failed)."""


class RedisServer:
    """A redis-server of our own: free port, temporary directory, no persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server is not installed (scripts/system-deps.sh bench)")
        self.directory.mkdir(parents=True, exist_ok=True)
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
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise BenchError("redis-server did not start") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


CLUSTER_BUS_OFFSET = 10_000  # a cluster node talks to the others on its port + 10000


def _free_cluster_port(taken: set[int]) -> int:
    """A free loopback port whose cluster bus port is free too, neither in ``taken``."""
    for _ in range(200):
        port = free_port()
        bus = port + CLUSTER_BUS_OFFSET
        if bus > 65535 or {port, bus} & taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", bus))
            except OSError:
                continue
        return port
    raise BenchError("no free port whose cluster bus port is free too")


class RedisClusterServers:
    """A Redis Cluster of three masters (no replicas, no persistence): three
    ``--cluster-enabled`` servers on free loopback ports whose bus ports are free too, then
    ``redis-cli --cluster create``. The test suite starts its own cluster with this too."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.directory = directory
        self.ports: list[int] = []
        for _ in range(masters):
            taken = {*self.ports, *(p + CLUSTER_BUS_OFFSET for p in self.ports)}
            self.ports.append(_free_cluster_port(taken))
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """One node's URL: all the service is given; its client finds the other nodes."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise BenchError("redis-server/redis-cli are not installed (system-deps.sh bench)")
        self.directory.mkdir(parents=True, exist_ok=True)
        for port in self.ports:
            self.processes.append(
                subprocess.Popen(
                    [
                        *(binary, "--port", str(port), "--bind", "127.0.0.1"),
                        *("--dir", str(self.directory), "--cluster-enabled", "yes"),
                        *("--cluster-config-file", str(self.directory / f"nodes-{port}.conf")),
                        *("--save", "", "--appendonly", "no"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self._wait_on_every_node(lambda node: bool(node.ping()), "did not start")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        created = subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise BenchError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        self._wait_on_every_node(
            lambda node: node.execute_command("CLUSTER INFO")["cluster_state"] == "ok",  # type: ignore[no-untyped-call]
            "did not reach cluster_state:ok",
        )

    def _wait_on_every_node(self, ready: Callable[[redis.Redis], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        for port in self.ports:
            node = redis.Redis(port=port, socket_connect_timeout=0.2)
            try:
                while True:
                    try:
                        if ready(node):
                            break
                    except redis.ConnectionError:
                        pass
                    if time.monotonic() > deadline:
                        raise BenchError(f"Redis Cluster node {port} {what}")
                    time.sleep(0.02)
            finally:
                node.close()

    def stop(self) -> None:
        for process in self.processes:
            _stop(process)
        self.processes = []


class UvicornServer:
    """``python -m uvicorn <app> --workers N`` with the bench's flags, in its own process
    group so that stopping it also stops its workers and their render processes."""

    def __init__(
        self,
        name: str,
        app: str,
        *,
        workers: int,
        env: dict[str, str],
        log_dir: Path,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.app = app
        self.workers = workers
        self.env = env
        self.extra_args = extra_args  # more uvicorn options, e.g. --factory
        self.port = free_port()
        self.log_path = log_dir / f"{name}-{workers}w.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, ready_path: str, timeout_s: float = 60.0) -> None:
        self.launch()
        self.wait_ready(ready_path=ready_path, timeout_s=timeout_s)

    def launch(self) -> None:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            self.app,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            *UVICORN_FLAGS,
            *self.extra_args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, *, ready_path: str, timeout_s: float = 60.0) -> None:
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        # Every worker says when its lifespan startup is done; only then is it accepting.
        while self._log_text().count(STARTUP_LINE) < self.workers:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not start:\n{self._log_text()[-3000:]}")
            time.sleep(0.05)
        with httpx.Client(base_url=self.url, timeout=5) as client:
            response = client.get(ready_path)
            if response.status_code != 200:
                raise BenchError(f"{self.name} is not ready: {response.status_code}")

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def pids(self) -> list[int]:
        """The server's process and all its descendants (workers, render processes)."""
        if self.process is None:
            return []
        return [self.process.pid, *_descendants(self.process.pid)]

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process, group=True)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _stop(process: subprocess.Popen[bytes], *, group: bool = False) -> None:
    """SIGTERM to the process, as an operator would stop it (uvicorn passes it on to its
    workers, which shut their render pools down), then SIGKILL if it is still there after 40 s
    (the service lets renders in flight finish for up to 30 s). With ``group``, whatever is left
    of the process group we created is killed afterwards, so that no worker outlives a run."""

    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            if group:
                kill_group()
            else:
                process.kill()
            process.wait(timeout=10)
    if group:
        kill_group()


def read_memory_kb(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a process in kB: its peak and current resident set."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0])
    return values["VmHWM"], values["VmRSS"]
