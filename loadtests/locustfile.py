"""Locust users that stream completions and chat completions from `loraplex serve` (or any
OpenAI-compatible server) and record what locust cannot see: time to first token, inter-token
latency, end-to-end latency and output tokens.

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 \\
        -u 8 -r 8 -t 30s --csv results/loadtest [OPTIONS]
    make loadtest [URL=...] [USERS=8] [RATE=8] [DURATION=30s] [LOCUST_ARGS="OPTIONS"]

Options (on locust's command line after `-f loadtests/locustfile.py`, or from the environment
variable named; `locust --help` does not list them, it runs before the locustfile is read):
  --trace FILE         LORAPLEX_TRACE        replay a `workloads.Trace` JSONL file: each user
                       sends the next request in order when its last stream ends (a closed loop
                       whatever the trace's arrival times); the run stops after the last one.
                       Meant for one locust process (in distributed mode every worker replays
                       the whole trace). Adapter None goes to the base model.
  --popularity P       LORAPLEX_POPULARITY   without a trace, requests draw their model from
                       every id `GET /v1/models` lists (the base model first, then the
                       adapters in the server's order) by "uniform" (default), "power" (S-LoRA's
                       law, --alpha) or "zipf" (--zipf-s) popularity
  --alpha A            LORAPLEX_ALPHA        power law exponent (1 = uniform; smaller = more
                       skewed to the first ids), default 1.0
  --zipf-s S           LORAPLEX_ZIPF_S       zipf exponent, default 1.1
  --prompt-len N|LO:HI LORAPLEX_PROMPT_LEN   prompt tokens: exactly N, or uniform in [LO, HI);
                       default 64
  --output-len N|LO:HI LORAPLEX_OUTPUT_LEN   output tokens (exact: requests set ignore_eos),
                       default 64
  --vocab-size V       LORAPLEX_VOCAB_SIZE   prompt token ids are drawn from [4, V) (the server
                       is not asked for its vocabulary), default 256: valid for every model
                       with at least 256 tokens, the demo's included
  --chat-share S       LORAPLEX_CHAT_SHARE   share of requests sent to /v1/chat/completions,
                       default 0.5 (trace replays too); a chat prompt is one user message
                       holding the token ids as text ("12 7 391 ..."), tokenized by the server
  --seed N             LORAPLEX_SEED         the workload's seed, default 0
  --api-key KEY        LORAPLEX_API_KEY      sent as `Authorization: Bearer KEY`

Every request is streamed, greedy, `ignore_eos`, with `stream_options.include_usage`. Locust
rows (Type, Name), Name being the endpoint (`/v1/completions` or `/v1/chat/completions`):
  POST  locust's own: time to the response headers
  TTFT  time to the first chunk carrying output (one event per request)
  ITL   gap between consecutive output chunks (one event per gap; a chunk may carry several
        tokens)
  E2E   request sent to stream end; its "content size" is the output token count (usage), so
        the average size column is the mean output tokens per request
A failed request (non-200, error event, a stream cut or without [DONE]/usage) is a failure of
both its POST and its E2E row, with the reason; `locust` then exits with status 1.
Generated workloads come in blocks of 256 requests with seeds seed, seed + 1, ...
(`workloads.make_trace`, closed loop); users take them in order.
"""

from __future__ import annotations

import logging
import random
import time
from types import SimpleNamespace

import gevent
import gevent.lock
import locust.stats
from locust import HttpUser, constant, events, task
from locust.exception import StopUser

from loraplex.loadtests.stream_client import (
    StreamError,
    StreamReader,
    StreamResult,
    chat_body,
    completion_body,
)
from loraplex.loadtests.workloads import Trace, TraceRequest, WorkloadSpec, make_trace

logger = logging.getLogger(__name__)

BLOCK = 256  # generated requests per make_trace call
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("loraplex workload")
    g.add_argument("--trace", env_var="LORAPLEX_TRACE", default="", help="replay this trace")
    g.add_argument("--popularity", env_var="LORAPLEX_POPULARITY", default="uniform",
                   choices=("uniform", "power", "zipf"), help="adapter popularity")  # fmt: skip
    g.add_argument("--alpha", env_var="LORAPLEX_ALPHA", type=float, default=1.0)
    g.add_argument("--zipf-s", env_var="LORAPLEX_ZIPF_S", type=float, default=1.1)
    g.add_argument("--prompt-len", env_var="LORAPLEX_PROMPT_LEN", default="64")
    g.add_argument("--output-len", env_var="LORAPLEX_OUTPUT_LEN", default="64")
    g.add_argument("--vocab-size", env_var="LORAPLEX_VOCAB_SIZE", type=int, default=256)
    g.add_argument("--chat-share", env_var="LORAPLEX_CHAT_SHARE", type=float, default=0.5)
    g.add_argument("--seed", env_var="LORAPLEX_SEED", type=int, default=0)
    g.add_argument("--api-key", env_var="LORAPLEX_API_KEY", default="", help="bearer token")


@events.quitting.add_listener
def _last_csv_write(environment, **_kw) -> None:
    """locust rewrites its CSVs every CSV_STATS_INTERVAL_SEC and not once more at exit (locust
    issues #1806, #2299): wait for one more write, so that they hold every request."""
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.25)


def parse_len(text: str) -> tuple[int, int]:
    """ "N" -> (N, N); "LO:HI" -> (LO, HI)."""
    lo, _, hi = str(text).partition(":")
    return (int(lo), int(hi or lo))


class Source:
    """The requests, in order: (index, TraceRequest, model id, chat?) or None when a trace is
    exhausted. Shared by the users of one locust process (gevent: no preemption)."""

    def __init__(self, opts, ids: list[str], base_id: str) -> None:
        self.opts, self.ids, self.base_id = opts, ids, base_id
        if not 0.0 <= opts.chat_share <= 1.0:
            raise ValueError(f"--chat-share must be in [0, 1] (got {opts.chat_share})")
        self.trace = Trace.load(opts.trace) if opts.trace else None
        self.chat_rng = random.Random(opts.seed)
        self.block: list[TraceRequest] = []
        if self.trace is None:  # the first block now: bad options fail before any request
            self.block = make_trace(self._spec(opts.seed), ids, opts.vocab_size).requests
        self.next = 0

    def _spec(self, seed: int) -> WorkloadSpec:
        o = self.opts
        return WorkloadSpec(
            num_requests=BLOCK, popularity=o.popularity, alpha=o.alpha, zipf_s=o.zipf_s,
            prompt_len=parse_len(o.prompt_len), output_len=parse_len(o.output_len), seed=seed,
        )  # fmt: skip

    def take(self) -> tuple[int, TraceRequest, str, bool] | None:
        i = self.next
        if self.trace is not None:
            if i >= len(self.trace.requests):
                return None
            req = self.trace.requests[i]
        else:
            if i % BLOCK == 0 and i > 0:
                spec = self._spec(self.opts.seed + i // BLOCK)
                self.block = make_trace(spec, self.ids, self.opts.vocab_size).requests
            req = self.block[i % BLOCK]
        self.next += 1
        chat = self.chat_rng.random() < self.opts.chat_share
        return i, req, req.adapter if req.adapter is not None else self.base_id, chat


_STATE = SimpleNamespace(source=None, in_flight=0, stopping=False)
_LOCK = gevent.lock.BoundedSemaphore()


class LoraplexUser(HttpUser):
    """Closed loop: sends its next request when the previous stream ends (no think time)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        key = getattr(opts, "api_key", "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        with _LOCK:
            if _STATE.source is None:
                _STATE.source = self._make_source(opts)

    def _make_source(self, opts) -> Source:
        r = self.client.get("/v1/models", headers=self.headers)  # a failure if not 2xx
        if r.status_code != 200:
            self._stop_run(f"GET /v1/models answered {r.status_code}")
        data = r.json()["data"]
        ids = [m["id"] for m in data]
        base = next((m["id"] for m in data if m.get("parent") is None), ids[0])
        try:
            source = Source(opts, ids, base)
        except (OSError, ValueError) as e:
            self._stop_run(f"bad workload: {e}")
        logger.info("loraplex workload: %s over %s", opts.trace or "generated", ids)
        return source

    def _stop_run(self, why: str) -> None:
        if not _STATE.stopping:
            _STATE.stopping = True
            logger.error("stopping the run: %s", why)
            gevent.spawn(self.environment.runner.quit)
        raise StopUser()

    @task
    def request(self) -> None:
        item = _STATE.source.take()
        if item is None:  # the trace is done: the last user to finish stops the run
            if _STATE.in_flight == 0 and not _STATE.stopping:
                _STATE.stopping = True
                logger.info("trace replayed: stopping the run")
                gevent.spawn(self.environment.runner.quit)
            raise StopUser()
        _STATE.in_flight += 1
        try:
            self._send(*item)
        finally:
            _STATE.in_flight -= 1

    def _send(self, index: int, req: TraceRequest, model: str, chat: bool) -> None:
        path = CHAT if chat else COMPLETIONS
        if chat:
            body = chat_body(model, req.prompt, req.output_len)
        else:
            body = completion_body(model, req.prompt, req.output_len, False)
        res = StreamResult(index, time.perf_counter())
        start = time.time()
        error: Exception | None = None
        with self.client.post(path, json=body, headers=self.headers, stream=True,
                              catch_response=True) as resp:  # fmt: skip
            try:
                if resp.status_code != 200:
                    detail = getattr(resp, "error", None) or (resp.text or "")[:300]
                    raise StreamError(f"HTTP {resp.status_code}: {detail}")
                reader = StreamReader(res)
                for chunk in resp.iter_content(chunk_size=None):
                    reader.feed(chunk)
                reader.finish()
            except Exception as e:  # StreamError, a cut connection, bad JSON: all failures
                res.t_end = res.t_end or time.perf_counter()
                error = e
                resp.failure(str(e))
            else:
                resp.success()
        self._record(path, res, error, start)

    def _record(self, name: str, res: StreamResult, error: Exception | None, start: float) -> None:
        fire = self.environment.events.request.fire

        def event(kind: str, seconds: float, length: int = 0, exc=None) -> None:
            fire(request_type=kind, name=name, response_time=seconds * 1000.0,
                 response_length=length, exception=exc, context={}, response=None,
                 start_time=start, url=name)  # fmt: skip

        if error is None:
            event("TTFT", res.ttft)
            for gap in res.itls:
                event("ITL", gap)
        event("E2E", res.e2e, res.completion_tokens if error is None else 0, error)
