"""The server side of the load tests: `loraplex` subprocesses and CPU accounting.

Contracts:
- `loraplex_exe()` is this environment's `loraplex` script (next to the interpreter, else on
  PATH; SystemExit if there is none).
- `ServerProcess` runs `loraplex serve` as a subprocess on 127.0.0.1 (ready once `/health`
  answers, stopped with SIGTERM); `CpuMeter` measures the CPU the client, the server and
  everything else used; `free_port()` is a free loopback port; `process_cpu_seconds(pid)` reads
  a process's (or thread's) CPU time from /proc.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)


def loraplex_exe() -> str:
    """The `loraplex` script of this environment (next to the interpreter), else on PATH."""
    here = Path(sys.executable).with_name("loraplex")
    exe = str(here) if here.is_file() else shutil.which("loraplex")
    if not exe:
        raise SystemExit("no `loraplex` executable found (pip install -e .)")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a live process, or of its thread `tid` (Linux /proc), NaN
    elsewhere."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


class ServerProcess:
    """`loraplex serve FLAGS` on 127.0.0.1 as a subprocess (output to `log_dir`/server.log).

    `with` starts it and waits until `/health` answers 200 (SystemExit with the log's tail if it
    exits first or `start_timeout` passes), then reads the base model's id (`base_id`) from
    `/v1/models` (with `api_key` for a server that has keys). Leaving sends SIGTERM and waits
    for the graceful exit (SIGKILL after `stop_timeout` seconds); `returncode` is then set (0 on
    a clean stop)."""

    def __init__(self, exe: str, flags: list[str], port: int, log_dir: str,
                 start_timeout: float = 180.0, stop_timeout: float = 30.0,
                 api_key: str | None = None) -> None:  # fmt: skip
        self.argv = [exe, "--log-level", "WARNING", "serve", *flags, "--host", "127.0.0.1"]
        self.port = port or free_port()
        self.log_path = Path(log_dir) / "server.log"
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.base_id: str | None = None
        self.returncode: int | None = None
        self.api_key = api_key

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _fail(self, why: str) -> None:
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"loraplex serve {why}:\n{tail}")

    def __enter__(self) -> ServerProcess:
        with open(self.log_path, "w") as log:
            argv = [*self.argv, "--port", str(self.port)]
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + self.start_timeout
            while True:
                if self.proc.poll() is not None:
                    self._fail(f"exited with status {self.proc.returncode} before it was ready")
                try:
                    if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self._fail(f"was not healthy after {self.start_timeout:.0f} s")
                time.sleep(0.2)
            auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            models = httpx.get(f"{self.url}/v1/models", headers=auth)
            self.base_id = models.json()["data"][0]["id"]
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int:
        if self.proc is None or self.returncode is not None:
            return self.returncode or 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "loraplex serve ignored SIGTERM for %.0f s: killing it", self.stop_timeout
            )
            self.proc.kill()
            self.returncode = self.proc.wait()
        if self.returncode != 0:
            logger.warning("loraplex serve exited with status %d", self.returncode)
        return self.returncode

    def __exit__(self, *exc) -> None:
        self.stop()


class CpuMeter:
    """Wall time of a block and CPU use meanwhile, in cores: this process (`own_cores`), the
    server process (`server_cores`) and its main thread, where uvicorn runs the event loop
    (`server_loop_cores`: the HTTP side's own work; the engine runs on other threads), and
    everything else on the machine (`other_load`: /proc/stat busy time minus this process and
    the server, as in `loraplex bench throughput`; None off Linux)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def _sample(self) -> tuple[float, float, float, float]:
        t = os.times()
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            busy = (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            busy = math.nan
        pid = self.server_pid
        own = t.user + t.system
        return busy, own, process_cpu_seconds(pid), process_cpu_seconds(pid, tid=pid)

    def __enter__(self) -> CpuMeter:
        self.s0, self.t0 = self._sample(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        (b0, o0, s0, l0), (b1, o1, s1, l1) = self.s0, self._sample()
        self.own_cores = (o1 - o0) / self.wall
        self.server_cores = (s1 - s0) / self.wall
        self.server_loop_cores = (l1 - l0) / self.wall
        other = ((b1 - b0) - (o1 - o0) - (s1 - s0)) / self.wall
        self.other_load = None if math.isnan(other) else max(0.0, other)
