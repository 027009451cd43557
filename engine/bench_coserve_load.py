"""The loads and the job of `loraplex bench coserve` (engine/bench_coserve.py): seeded training
examples, a closed loop that saturates the engine, an open loop of Poisson arrivals below its
capacity, and a co-served job whose optimizer steps are stamped.

Requests (both loops): `--prompt-len` random token ids (seeded: every phase of a kind replays
the same prompts), greedy, `ignore_eos`, adapter i mod K for the i-th request. Each request's
`times` get one stamp per emitted token, the return of the step that sampled it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path


def make_examples(n: int, lengths: tuple[int, int], vocab: int, seed: int):
    """n seeded random examples: the first half of each untrained, the second half trained."""
    from loraplex.engine.finetune_data import Example

    rng, low = random.Random(seed), 4 if vocab > 64 else 0  # no demo special tokens
    out = []
    for i in range(n):
        ids = [rng.randrange(low, vocab) for _ in range(rng.randint(*lengths))]
        half = len(ids) // 2
        out.append(Example(ids, [-100] * half + ids[half:], i + 1))
    return out


@dataclass
class Req:
    submit: float  # when it arrived (closed loop: when it was added)
    times: list[float] = field(default_factory=list)


class _Load:
    def __init__(self, engine, names: list[str], args, tag: str, seed: int) -> None:
        self.engine, self.names, self.tag, self.n = engine, names, tag, 0
        self.prompt_len = args.prompt_len
        self.rng = random.Random(seed)
        self.low, self.vocab = (4 if engine.spec.vocab_size > 64 else 0), engine.spec.vocab_size
        self.active: dict[str, Req] = {}
        self.done: list[Req] = []

    def _add(self, params, submit: float) -> None:
        rid = f"{self.tag}-{self.n}"
        prompt = [self.rng.randrange(self.low, self.vocab) for _ in range(self.prompt_len)]
        name = self.names[self.n % len(self.names)] if self.names else None
        self.engine.add_request(rid, prompt, params, name)
        self.active[rid], self.n = Req(submit), self.n + 1

    def record(self, outputs, now: float) -> None:
        for out in outputs:
            req = self.active.get(out.request_id)
            if req is not None:
                req.times += [now] * len(out.new_token_ids)
                if out.finished:
                    self.done.append(self.active.pop(out.request_id))

    def stop(self) -> list[Req]:
        for rid in list(self.active):
            self.engine.abort(rid)
            self.done.append(self.active.pop(rid))
        return self.done


class ClosedLoop(_Load):
    """`concurrency` requests in the engine at all times (it never idles). The first C requests
    ask for output_len x (i + 1) / C tokens, later ones for output_len: finishes, and so the
    prefills of their replacements, stay spread evenly over the steps (as in a steady stream)
    instead of all C landing in one step."""

    offered = None  # tokens/s: as many as the engine takes

    def __init__(self, engine, names: list[str], args, tag: str) -> None:
        from loraplex.scheduler.sequence import SamplingParams

        super().__init__(engine, names, args, tag, args.seed)
        c, out = args.concurrency, args.output_len
        self.concurrency = c
        self.params = [SamplingParams(max_tokens=max(1, out * (i + 1) // c), temperature=0.0,
                                      ignore_eos=True) for i in range(c)]  # fmt: skip

    def fill(self, now: float) -> None:
        while len(self.active) < self.concurrency:
            self._add(self.params[min(self.n, self.concurrency - 1)], time.monotonic())

    def next_arrival(self) -> float:
        return 0.0  # always due


class OpenLoop(_Load):
    """Poisson arrivals at `rate` requests/s from the first `fill` (seeded exponential gaps:
    the same arrival times in every phase with the same seed), each asking for exactly
    `--output-len` tokens; offered load = rate x output_len tokens/s. A request is added at the
    first `fill` at or after its arrival time and its `submit` is that arrival time (TTFT counts
    the wait); beyond `max_num_seqs` it waits in the engine's queue."""

    def __init__(self, engine, names: list[str], args, tag: str, rate: float, seed: int) -> None:
        from loraplex.scheduler.sequence import SamplingParams

        if not rate > 0:
            raise ValueError(f"the open loop needs a positive arrival rate, got {rate}")
        super().__init__(engine, names, args, tag, seed)
        self.rate, self.offered = rate, rate * args.output_len
        self.params = SamplingParams(max_tokens=args.output_len, temperature=0.0,
                                     ignore_eos=True)  # fmt: skip
        self.gaps = random.Random(seed + 1)
        self.due: float | None = None

    def fill(self, now: float) -> None:
        if self.due is None:  # the first fill starts the clock
            self.due = now + self.gaps.expovariate(self.rate)
        while self.due <= now:
            self._add(self.params, self.due)
            self.due += self.gaps.expovariate(self.rate)

    def next_arrival(self) -> float:
        return self.due if self.due is not None else 0.0


class EngineJob:
    """A co-served job; `events` stamps each optimizer step when the step() that ended it
    returns."""

    def __init__(self, engine, job_id: str, config, examples, out_dir: Path) -> None:
        bs = config.batch_size
        batches = [examples[i : i + bs] for i in range(0, len(examples), bs)]
        self.padded = [len(b) * max(len(e.input_ids) for e in b) for b in batches]
        self.engine, self.job_id = engine, job_id
        self.job = engine.submit_finetune(job_id, config, examples, str(out_dir / job_id))
        self.events: list[tuple[float, int, int, float]] = []

    def poll(self, now: float) -> None:
        for e in self.job.log[len(self.events) :]:
            self.events.append((now, e.tokens, self.padded[(e.step - 1) % len(self.padded)],
                                e.loss))  # fmt: skip
        if self.job.status.value == "failed":
            raise RuntimeError(f"fine-tuning job {self.job_id} failed: {self.job.reason}")

    def stop(self) -> None:
        self.engine.cancel_finetune(self.job_id)
