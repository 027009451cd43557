"""One HTTP request's generation: prompts -> engine sequences -> per-choice text deltas.

`Generation` submits `len(prompts) * n` sequences as one group (choice index
`prompt_idx * n + i`), reads the group's queue, and turns each batch of step outputs into
`Delta`s: new text (incremental detokenization; stop strings cut the text and abort the
sequence), the new tokens' log-probabilities, and the finish reason. Everything queued at the
moment of reading is folded into one delta per choice, so a slow client gets fewer, larger
chunks instead of slowing anything down. Latency histograms are observed here, from the
engine's step timestamps. A client that goes away calls `abort()`: the engine frees the pages,
and `deltas()` ends with `ClientGone`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loraplex.engine.adapters import UnknownAdapterError
from loraplex.scheduler.sequence import FinishReason, SamplingParams
from loraplex.server.context import ServerContext
from loraplex.server.detokenize import TextStream
from loraplex.server.engine_requests import QueueFull, Submission, Unavailable
from loraplex.server.protocol import APIError
from loraplex.server.tenants import Tenant

_ABORTED = object()
_seq = itertools.count()


class ClientGone(Exception):
    """The client disconnected; the request was aborted."""


@dataclass
class Choice:
    index: int
    prompt_idx: int
    request_id: str
    text: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    output_text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    t_last: float | None = None
    num_chars: int = 0


@dataclass
class Delta:
    choice: Choice
    text: str
    start: int  # new tokens are choice.token_ids[start:end]
    end: int
    finish_reason: str | None
    offset: int  # characters of this choice's text before `text`


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def build_params(
    req, prompt_len: int, max_tokens: int | None, max_model_len: int, logprobs: int, seed_i: int
) -> SamplingParams:
    """SamplingParams for one choice; 400 if the prompt and max_tokens exceed the context."""
    if prompt_len >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens",
            param="prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
            f"{max_tokens} for the completion). Reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k, 0),
            seed=None if req.seed is None else req.seed + seed_i,
            min_tokens=req.min_tokens,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
        )
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=param if param.isidentifier() else None) from None


class Generation:
    def __init__(
        self,
        ctx: ServerContext,
        tenant: Tenant,
        prompts: list[list[int]],
        params: list[SamplingParams],
        adapter: str | None,
        stops: list[str],
        n: int,
        prefix: str,
    ) -> None:
        """`params[k]` belongs to choice k (len(prompts) * n of them)."""
        self.ctx = ctx
        self.tenant = tenant
        self.id = new_id(prefix)
        self.created = int(time.time())
        self.prompts = prompts
        tok = ctx.engine.tokenizer
        decode = ctx.decoder()
        self.choices: list[Choice] = []
        subs = []
        for k, p in enumerate(params):
            pi = k // n
            rid = f"{self.id}-{k}"
            self.choices.append(Choice(k, pi, rid, TextStream(tok, prompts[pi], stops, decode)))
            subs.append(Submission(rid, prompts[pi], p, adapter, tenant.name))
        self._subs = subs
        self._by_rid = {c.request_id: c for c in self.choices}
        self._group = None
        self._open = 0
        self.t_arrival = time.monotonic()
        self.aborted = False
        self._charged = 0  # tokens taken from the tenant's tokens_per_minute (rate_limits.py)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    async def start(self) -> None:
        """Charge the tenant's rate limits and queue every sequence; APIError (400/404/429/503)
        if either refuses (then nothing stays charged)."""
        limits = self.ctx.rate_limits
        most = sum(len(s.prompt_ids) + s.params.max_tokens for s in self._subs)
        self._charged = limits.take(self.tenant.name, most)
        try:
            await self._add()
        except BaseException:
            limits.give_back(self.tenant.name, self._charged)
            self._charged = 0
            raise

    async def _add(self) -> None:
        try:
            self._group = await self.ctx.aengine.add(self._subs)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except Unavailable as e:
            raise APIError(503, str(e), code="unavailable") from None
        except UnknownAdapterError:  # unloaded between lookup and queueing
            raise APIError(404, "The model does not exist", param="model") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        self.t_arrival = self._group.t_arrival
        self._open = len(self.choices)

    def abort(self) -> None:
        """Abort every unfinished choice (thread-safe, idempotent) and wake the reader."""
        if self.aborted or self._group is None:
            return
        self.aborted = True
        self.ctx.aengine.abort([c.request_id for c in self.choices if c.finish_reason is None])
        self._group.queue.put_nowait(_ABORTED)

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """Deltas as outputs arrive, until every choice has finished. Raises ClientGone after
        `abort()`, APIError(503) if the server stopped, APIError(500) if the engine step that
        ran a choice failed."""
        q = self._group.queue
        try:
            while self._open:
                items = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                yield self._fold(items)
        finally:
            if self._open and not self.aborted:
                self.abort()  # the consumer stopped early (cancelled, error)

    def _fold(self, items: list) -> list[Delta]:
        out: dict[int, Delta] = {}
        for item in items:
            if item is _ABORTED:
                raise ClientGone()
            step_out, t = item
            c = self._by_rid.get(step_out.request_id)
            if c is None or c.finish_reason is not None:
                continue
            if step_out.finish_reason is FinishReason.ERROR:
                raise APIError(500, step_out.error, code="internal_error")
            if step_out.error is not None:
                raise APIError(503, f"request aborted: {step_out.error}", code="unavailable")
            d = out.get(c.index)
            if d is None:
                n = len(c.token_ids)
                d = out[c.index] = Delta(c, "", n, n, None, c.num_chars)
            self._consume(c, step_out, t, d)
        return list(out.values())

    def _consume(self, c: Choice, o, t: float, d: Delta) -> None:
        m = self.ctx.metrics
        if o.new_token_ids:
            if c.t_last is None:
                m.ttft.observe(t - self.t_arrival)
            else:
                m.itl.observe(t - c.t_last)
            c.t_last = t
        c.token_ids.extend(o.new_token_ids)
        c.logprobs.extend(o.new_logprobs)
        c.top_logprobs.extend(o.new_top_logprobs)
        text = c.text.push(o.new_token_ids)
        if c.text.stopped:
            c.finish_reason = "stop"
            if not o.finished:
                self.ctx.aengine.abort([c.request_id])
        elif o.finished:
            text += c.text.finish()
            c.finish_reason = o.finish_reason.value
        d.text += text
        d.end = len(c.token_ids)
        c.output_text.append(text)
        c.num_chars += len(text)
        if c.finish_reason is not None:
            d.finish_reason = c.finish_reason
            self._open -= 1
            m.e2e.observe(t - self.t_arrival)

    async def collect(self) -> None:
        """Run to completion (non-streamed answers)."""
        async for _ in self.deltas():
            pass

    def record(self, status: int) -> None:
        """Count this request and its tokens for the tenant (call once, at the end)."""
        m = self.ctx.metrics
        m.count_request(self.tenant.name, status)
        prompt = self.num_prompt_tokens if self._group is not None else 0
        m.count_tokens(self.tenant.name, prompt, self.num_completion_tokens)
        used = prompt + self.num_completion_tokens
        self.ctx.rate_limits.give_back(self.tenant.name, self._charged - used)
        self._charged = 0
        u = self.tenant.usage
        u.requests += 1
        u.prompt_tokens += prompt
        u.completion_tokens += self.num_completion_tokens


async def watch_disconnect(request, gen: Generation) -> None:
    """Abort `gen` when the client disconnects (run as a task; cancel it when done)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.abort()
            return


async def run_until_done(request, gen: Generation) -> None:
    """Collect `gen` while watching for a disconnect (ClientGone if the client left)."""
    watcher = asyncio.ensure_future(watch_disconnect(request, gen))
    try:
        await gen.collect()
    finally:
        watcher.cancel()
