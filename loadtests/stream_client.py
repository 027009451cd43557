"""Streaming OpenAI-API clients for the load tests: one streamed request (`stream_one`), the
replay of a workload trace (`replay`), and the latency statistics (`summarize`).

Contracts:
- `stream_one(...)` sends one streamed request and parses its server-sent events as they
  arrive. Output tokens are counted exactly from the final `usage` chunk
  (`stream_options.include_usage`); with `logprobs` in the body the per-token strings and
  log-probabilities are collected too. A non-200 answer, an error event or a stream cut before
  `[DONE]` raises `StreamError`. The clients are aiohttp's (C HTTP parser): on a small machine
  the load generator shares the server's cores, and httpx took 2.5x the CPU per streamed chunk
  (measured 2026-11; the git history of docs/benchmarks.md has the runs).
- `replay(base_url, trace, ...)` sends a `workloads.Trace` (greedy, `ignore_eos`,
  `max_tokens = output_len`, usage chunk), as completions with the token-id prompt or, with
  `chat=True`, as chat completions whose one user message is the prompt's ids as text
  ("12 7 391 ..."; no tokenizer here, so a chat prompt's length in tokens is the server's
  tokenization of that text, not `len(prompt)`). Closed loop (`spec.arrival == "closed"`):
  `spec.concurrency` workers take the requests in order. Gamma (open loop): each request is sent
  at `arrival_s * time_scale` seconds from the start whatever is in flight (up to
  `OPEN_LOOP_CONNECTIONS` connections). A failed request never stops the run: its
  `StreamResult.error` says why (HTTP status and body, error event, cut stream, connection
  error). Returns (wall seconds, results in trace order); `on_done(result)` runs as each ends.
- Times are `time.perf_counter()` seconds. A chunk counts (TTFT, `chunk_times`) when it carries
  a choice with output: chat's first role-only chunk does not. A chunk may carry several
  tokens, so inter-token latencies (ITL) are gaps between chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from loraplex.loadtests.workloads import Trace

logger = logging.getLogger(__name__)

OPEN_LOOP_CONNECTIONS = 1024  # the open loop's only cap on requests in flight


class StreamError(RuntimeError):
    """A request failed: bad status, an error event in the stream, or a malformed stream."""


@dataclass
class StreamResult:
    index: int
    t_start: float  # perf_counter when the request was sent
    t_first: float | None = None  # first chunk carrying output
    t_end: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # chunks carrying output
    completion_tokens: int = 0  # from the usage chunk
    text: str = ""
    tokens: list[str] = field(default_factory=list)  # with logprobs only (completions)
    token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # replay only: why this request failed (None: it succeeded)

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_start

    @property
    def e2e(self) -> float:
        """Seconds from sending the request to the end of its stream (or its failure)."""
        return self.t_end - self.t_start

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive output chunks."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


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


def chat_body(model: str, prompt: list[int], max_tokens: int) -> dict:
    """A streamed greedy chat completion whose user message is the prompt's ids as text."""
    body = completion_body(model, [], max_tokens, False)
    del body["prompt"]
    body["messages"] = [{"role": "user", "content": " ".join(map(str, prompt))}]
    return body


class StreamReader:
    """Reads one request's SSE stream into `result`: `feed(bytes)` as data arrives (split
    anywhere: events end with a blank line), then `finish()`. StreamError on an error event
    (from `feed`) or an incomplete stream (from `finish`)."""

    def __init__(self, result: StreamResult, logprobs: bool = False) -> None:
        self.result, self.logprobs = result, logprobs
        self.pending, self.done = b"", False

    def feed(self, chunk: bytes) -> None:
        *events, self.pending = (self.pending + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
        for raw in events:
            if not raw.startswith(b"data: "):
                continue
            data = raw[6:]
            if data == b"[DONE]":
                self.done = True
                continue
            _take_event(self.result, self.result.index, json.loads(data), time.perf_counter())

    def finish(self) -> StreamResult:
        """Sets `t_end`; StreamError unless [DONE] came after output and a usage chunk."""
        res = self.result
        res.t_end = time.perf_counter()
        if not self.done or res.t_first is None or not res.completion_tokens:
            raise StreamError(
                f"request {res.index}: the stream ended without tokens, usage or [DONE]"
            )
        if self.logprobs and len(res.tokens) != res.completion_tokens:
            raise StreamError(
                f"request {res.index}: {len(res.tokens)} tokens streamed, usage says "
                f"{res.completion_tokens}"
            )
        return res


async def stream_one(
    session: aiohttp.ClientSession,
    index: int,
    body: dict,
    headers: dict | None = None,
    path: str = "/v1/completions",
) -> StreamResult:
    """One streamed completion (or chat completion at `path`); parses the SSE events as they
    arrive. StreamError on a non-200 answer, an error event or an incomplete stream."""
    res = StreamResult(index, time.perf_counter())
    await _stream_into(session, res, body, headers, path)
    return res


async def _stream_into(
    session: aiohttp.ClientSession, res: StreamResult, body: dict, headers: dict | None, path: str
) -> None:
    reader = StreamReader(res, body.get("logprobs") is not None)
    async with session.post(path, json=body, headers=headers) as r:
        if r.status != 200:
            detail = (await r.read()).decode(errors="replace")[:500]
            raise StreamError(f"request {res.index}: HTTP {r.status}: {detail}")
        async for chunk in r.content.iter_any():
            reader.feed(chunk)
    reader.finish()


def _take_event(res: StreamResult, index: int, event: dict, t: float) -> None:
    if "error" in event:
        raise StreamError(f"request {index}: error event: {event['error']}")
    for choice in event.get("choices") or []:
        delta = choice.get("delta")
        if delta is not None:  # chat: the first chunk only says role "assistant"
            text = delta.get("content") or ""
            if not text and not choice.get("finish_reason") and not choice.get("logprobs"):
                continue
        else:
            text = choice.get("text") or ""
        if res.t_first is None:
            res.t_first = t
        res.chunk_times.append(t)
        res.text += text
        lp = choice.get("logprobs")
        if lp and delta is None:
            res.tokens += lp["tokens"]
            res.token_logprobs += lp["token_logprobs"]
        res.finish_reason = choice.get("finish_reason") or res.finish_reason
    if event.get("usage"):
        res.completion_tokens = event["usage"]["completion_tokens"]


def _timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=600.0)


async def replay(
    base_url: str,
    trace: Trace,
    *,
    model_for: Callable[[str | None], str],
    headers: dict | None = None,
    chat: bool = False,
    on_done: Callable[[StreamResult], None] | None = None,
    time_scale: float = 1.0,
) -> tuple[float, list[StreamResult]]:
    """(wall seconds, one result per trace request in trace order); see the module docstring."""
    if not time_scale >= 0:
        raise ValueError(f"time_scale must be >= 0 (got {time_scale})")
    reqs = trace.requests
    results: list[StreamResult | None] = [None] * len(reqs)
    path = "/v1/chat/completions" if chat else "/v1/completions"

    async def send(session: aiohttp.ClientSession, i: int) -> None:
        req = reqs[i]
        model = model_for(req.adapter)
        if chat:
            body = chat_body(model, req.prompt, req.output_len)
        else:
            body = completion_body(model, req.prompt, req.output_len, False)
        res = results[i] = StreamResult(i, time.perf_counter())
        try:
            await _stream_into(session, res, body, headers, path)
        except (StreamError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            res.t_end = time.perf_counter()
            res.error = str(e) or type(e).__name__
            logger.debug("request %d failed: %s", i, res.error)
        if on_done is not None:
            on_done(res)

    closed = trace.spec.arrival == "closed"
    limit = max(1, trace.spec.concurrency) if closed else OPEN_LOOP_CONNECTIONS
    connector = aiohttp.TCPConnector(limit=limit)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=_timeout()) as session:
        t0 = time.perf_counter()
        if closed:
            todo = iter(range(len(reqs)))

            async def worker() -> None:
                for i in todo:  # shared: each request is taken by exactly one worker
                    await send(session, i)

            tasks = [asyncio.ensure_future(worker()) for _ in range(limit)]
        else:
            tasks = []
            for i, req in enumerate(reqs):
                delay = t0 + (req.arrival_s or 0.0) * time_scale - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(send(session, i)))
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


def _stats(prefix: str, values: list[float]) -> dict:
    out = {f"{prefix}_mean": sum(values) / len(values) if values else None}
    out.update({f"{prefix}_p{q}": percentile(values, q) for q in (50, 90, 99)})
    return out


def summarize(results: list[StreamResult], wall: float) -> dict:
    """Totals and latencies (seconds) of a run that took `wall` seconds.

    Keys: requests (all), errors (those with `error`), req_per_s and output_tok_per_s (the
    successful requests and their usage tokens per wall second), then ttft_, itl_ and e2e_ each
    with mean, p50, p90, p99 (None without values) over the successful requests; ITL over every
    gap between output chunks."""
    ok = [r for r in results if r.error is None]
    out = {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "req_per_s": len(ok) / wall if wall > 0 else None,
        "output_tok_per_s": sum(r.completion_tokens for r in ok) / wall if wall > 0 else None,
    }
    out.update(_stats("ttft", [r.ttft for r in ok]))
    out.update(_stats("itl", [gap for r in ok for gap in r.itls]))
    out.update(_stats("e2e", [r.e2e for r in ok]))
    return out


def slo_attainment(results: list[StreamResult], ttft_slo_s: float) -> float:
    """Share of all requests that succeeded with TTFT <= `ttft_slo_s` (failed ones are misses);
    0.0 for no requests."""
    if not results:
        return 0.0
    met = sum(1 for r in results if r.error is None and r.t_first is not None
              and r.ttft <= ttft_slo_s)  # fmt: skip
    return met / len(results)
