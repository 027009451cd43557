"""Workloads for HTTP load tests: the offline benchmark's prompts, driven through the
OpenAI-compatible API by concurrent streaming clients.

Contracts:
- `bench_prompts(n, prompt_len, vocab_size, seed)` returns exactly the token-id prompts that
  `loraplex bench throughput` generates for the same arguments (torch.randint over
  [4, vocab) with a CPU generator seeded `seed`; [0, vocab) for vocabularies of 64 or less).
  Request i of that benchmark uses adapter `names[i % len(names)]`.
- `run_streamed(...)` sends every request as a streamed `POST /v1/completions` (greedy,
  `ignore_eos`, `max_tokens`), `concurrency` at a time (closed loop: each client sends its next
  request when the previous stream ends), and returns the wall time of the whole run and one
  `StreamResult` per request, in request order. Output tokens are counted exactly from the
  final `usage` chunk (`stream_options.include_usage`); with `logprobs=True` the per-token
  strings and log-probabilities are collected too. Any non-200 answer, error event or missing
  usage raises `StreamError`. The clients are aiohttp's (C HTTP parser): on a small machine the
  load generator shares the server's cores, and httpx took 2.5x the CPU per streamed chunk
  (docs/benchmarks.md).
- `ServerProcess` runs `loraplex serve` as a subprocess (ready once `/health` answers, stopped
  with SIGTERM); `CpuMeter` measures the CPU the client, the server and everything else used.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

logger = logging.getLogger(__name__)


class StreamError(RuntimeError):
    """A request failed: bad status, an error event in the stream, or a malformed stream."""


def bench_prompts(num_requests: int, prompt_len: int, vocab_size: int, seed: int) -> list:
    """The offline benchmark's prompts (see the module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    low = 4 if vocab_size > 64 else 0  # the bench skips the demo tokenizer's special tokens
    shape = (num_requests, prompt_len)
    return torch.randint(low, vocab_size, shape, generator=gen).tolist()


def adapter_names(names: list[str], num_requests: int) -> list[str | None]:
    """Request i uses names[i % K]; without adapters every request goes to the base model."""
    return [names[i % len(names)] if names else None for i in range(num_requests)]


@dataclass
class StreamResult:
    index: int
    t_start: float  # perf_counter when the request was sent
    t_first: float | None = None  # first chunk carrying a choice
    t_end: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # chunks carrying a choice
    completion_tokens: int = 0  # from the usage chunk
    text: str = ""
    tokens: list[str] = field(default_factory=list)  # with logprobs only
    token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for a single token)."""
        if self.completion_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.t_first) / (self.completion_tokens - 1)


def completion_body(model: str, prompt: list[int], max_tokens: int, logprobs: bool) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if logprobs:
        body["logprobs"] = 0
    return body


async def stream_one(
    session: aiohttp.ClientSession, index: int, body: dict, headers: dict | None = None
) -> StreamResult:
    """One streamed completion; parses the SSE events as they arrive."""
    res = StreamResult(index, time.perf_counter())
    done = False
    async with session.post("/v1/completions", json=body, headers=headers) as r:
        if r.status != 200:
            detail = (await r.read()).decode(errors="replace")[:500]
            raise StreamError(f"request {index}: HTTP {r.status}: {detail}")
        pending = b""
        async for chunk in r.content.iter_any():
            # events end with a blank line; a chunk may hold several or part of one
            *events, pending = (pending + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
            for raw in events:
                if not raw.startswith(b"data: "):
                    continue
                data = raw[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                t = time.perf_counter()
                _take_event(res, index, json.loads(data), t)
    res.t_end = time.perf_counter()
    if not done or res.t_first is None or not res.completion_tokens:
        raise StreamError(f"request {index}: the stream ended without tokens, usage or [DONE]")
    if body.get("logprobs") is not None and len(res.tokens) != res.completion_tokens:
        raise StreamError(
            f"request {index}: {len(res.tokens)} tokens streamed, usage says "
            f"{res.completion_tokens}"
        )
    return res


def _take_event(res: StreamResult, index: int, event: dict, t: float) -> None:
    if "error" in event:
        raise StreamError(f"request {index}: error event: {event['error']}")
    for choice in event.get("choices") or []:
        if res.t_first is None:
            res.t_first = t
        res.chunk_times.append(t)
        res.text += choice.get("text") or ""
        lp = choice.get("logprobs")
        if lp:
            res.tokens += lp["tokens"]
            res.token_logprobs += lp["token_logprobs"]
        res.finish_reason = choice.get("finish_reason") or res.finish_reason
    if event.get("usage"):
        res.completion_tokens = event["usage"]["completion_tokens"]


async def run_streamed(
    base_url: str,
    prompts: list[list[int]],
    models: list[str],
    max_tokens: int,
    concurrency: int,
    logprobs: bool = False,
    headers: dict | None = None,
) -> tuple[float, list[StreamResult]]:
    """(wall seconds, results in request order); see the module docstring."""
    results: list[StreamResult | None] = [None] * len(prompts)
    todo = iter(range(len(prompts)))
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=600.0)

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in todo:  # a shared iterator: each index is taken by exactly one worker
            body = completion_body(models[i], prompts[i], max_tokens, logprobs)
            results[i] = await stream_one(session, i, body, headers)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(worker(session)) for _ in range(concurrency)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        wall = time.perf_counter() - t0
    return wall, results  # type: ignore[return-value]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation between order statistics)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * min(max(q, 0.0), 100.0) / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def latency_summary(results: list[StreamResult]) -> dict:
    """TTFT p50/p90, ITL p50/p90 (gaps between streamed chunks), TPOT p50, in seconds."""
    ttft = [r.ttft for r in results]
    itl = [b - a for r in results for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    tpot = [r.tpot for r in results if r.tpot is not None]
    return {
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "itl_p50": percentile(itl, 50),
        "itl_p90": percentile(itl, 90),
        "tpot_p50": percentile(tpot, 50),
    }


def run_cli(argv: list[str], what: str) -> str:
    """Run a command to completion; its stdout. SystemExit with its output's tail on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


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
    `/v1/models`. Leaving sends SIGTERM and waits for the graceful exit (SIGKILL after
    `stop_timeout` seconds); `returncode` is then set (0 on a clean stop)."""

    def __init__(self, exe: str, flags: list[str], port: int, log_dir: str,
                 start_timeout: float = 180.0, stop_timeout: float = 30.0) -> None:  # fmt: skip
        self.argv = [exe, "--log-level", "WARNING", "serve", *flags, "--host", "127.0.0.1"]
        self.port = port or free_port()
        self.log_path = Path(log_dir) / "server.log"
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.base_id: str | None = None
        self.returncode: int | None = None

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
            self.base_id = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]
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
