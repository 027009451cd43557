"""Workloads for the load tests: seeded synthetic workloads (arrivals, adapter popularity,
lengths) replayable as JSONL traces.

Contracts:
- `make_trace(spec, adapters, vocab_size)` is a pure function of its arguments (numpy
  `default_rng`). Each aspect draws from its own child of `SeedSequence(spec.seed)`: arrivals,
  base-model choice, adapter index, prompt lengths, output lengths, prompt tokens. So two specs
  that differ in one aspect (say `alpha`) get the same arrivals, lengths and prompts.
- Arrivals: "closed" has none (`arrival_s` None; `concurrency` users send back to back);
  "gamma" gaps ~ Gamma(shape 1/cv^2, scale cv^2/rate): mean 1/rate, coefficient of variation
  `cv` (1 = Poisson), the first request at its own gap.
- Adapters: with probability `base_share` the base model (None), else `adapters[i]` with i from
  the popularity law: "uniform"; "power" as S-LoRA's benchmark (`numpy.random.power(alpha)`:
  i = floor(n * u**(1/alpha)), u ~ U[0, 1), so P(i <= k) = ((k+1)/n)**alpha; alpha 1 is
  uniform, smaller alpha is more skewed towards index 0); "zipf": P(rank k) ∝ 1/k**s over
  k = 1..n (i = k - 1). No adapters: every request goes to the base model.
- Lengths: `(lo, hi)` is uniform over [lo, hi); `(n, n)` (or `(n, n + 1)`) is exactly n.
  Prompt tokens are uniform over [4, vocab_size) (the demo tokenizer's 4 special ids skipped;
  [0, vocab_size) for vocabularies of 64 or less), as in `loraplex bench throughput`.
- Trace files (JSONL): line 1 `{"trace": 1, "spec": {...}, "adapters": [...]}`, then one
  `{"index", "arrival_s", "adapter", "prompt", "output_len"}` object per request, in order.
  `Trace.load` checks every line and raises ValueError "PATH:LINE: problem" on the first bad
  one (not JSON, a missing, unknown or ill-typed field, an index out of order, a bad header).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ARRIVALS = ("closed", "gamma")
POPULARITY = ("uniform", "power", "zipf")
TRACE_VERSION = 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass(frozen=True)
class WorkloadSpec:
    """A synthetic workload (see the module docstring); ValueError naming the field if invalid.
    `rate` is required with arrival "gamma" and refused with "closed". Lengths may be given as
    any 2-sequence of ints (a JSON list); they are stored as tuples."""

    num_requests: int
    arrival: str = "closed"
    rate: float | None = None
    cv: float = 1.0
    concurrency: int = 16
    popularity: str = "uniform"
    alpha: float = 1.0
    zipf_s: float = 1.1
    base_share: float = 0.0
    prompt_len: tuple[int, int] = (64, 64)
    output_len: tuple[int, int] = (64, 64)
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"WorkloadSpec.{name}: {why} (got {getattr(self, name)!r})")

        if not _is_int(self.num_requests) or self.num_requests < 1:
            bad("num_requests", "must be an integer >= 1")
        if self.arrival not in ARRIVALS:
            bad("arrival", f"must be one of {ARRIVALS}")
        if self.arrival == "gamma" and (not _is_num(self.rate) or self.rate <= 0):
            bad("rate", "arrival 'gamma' needs a rate > 0 (requests/s)")
        if self.arrival == "closed" and self.rate is not None:
            bad("rate", "only for arrival 'gamma' (a closed loop has no rate)")
        if not _is_num(self.cv) or self.cv <= 0:
            bad("cv", "must be a number > 0")
        if not _is_int(self.concurrency) or self.concurrency < 1:
            bad("concurrency", "must be an integer >= 1")
        if self.popularity not in POPULARITY:
            bad("popularity", f"must be one of {POPULARITY}")
        if not _is_num(self.alpha) or self.alpha <= 0:
            bad("alpha", "must be a number > 0")
        if not _is_num(self.zipf_s) or self.zipf_s <= 0:
            bad("zipf_s", "must be a number > 0")
        if not _is_num(self.base_share) or not 0.0 <= self.base_share <= 1.0:
            bad("base_share", "must be a number in [0, 1]")
        for name in ("prompt_len", "output_len"):
            v = getattr(self, name)
            if isinstance(v, str | bytes) or not hasattr(v, "__len__") or len(v) != 2:
                bad(name, "must be (lo, hi): uniform over [lo, hi), or (n, n) for exactly n")
            lo, hi = v
            if not (_is_int(lo) and _is_int(hi)) or lo < 1 or hi < lo:
                bad(name, "must be integers with 1 <= lo <= hi")
            object.__setattr__(self, name, (lo, hi))
        if not _is_int(self.seed) or self.seed < 0:
            bad("seed", "must be an integer >= 0")

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float | None  # seconds from the start (gamma); None in a closed loop
    adapter: str | None  # adapter name; None = base model
    prompt: list[int]  # token ids
    output_len: int  # exact number of tokens to generate (requests use ignore_eos)


@dataclass
class Trace:
    spec: WorkloadSpec
    adapters: list[str]  # the adapter names it draws from
    requests: list[TraceRequest]

    def save(self, path) -> None:
        """Write the JSONL trace (module docstring)."""
        head = {"trace": TRACE_VERSION, "spec": self.spec.to_json(), "adapters": self.adapters}
        lines = [json.dumps(head)]
        lines += [json.dumps(dataclasses.asdict(r)) for r in self.requests]
        Path(path).write_text("\n".join(lines) + "\n")

    @classmethod
    def load(cls, path) -> Trace:
        """Read a JSONL trace; ValueError "PATH:LINE: problem" on the first bad line."""
        text = Path(path).read_text()
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not text.strip():
            raise ValueError(f"{path}:1: empty trace file (no header)")
        spec, adapters = _header(path, lines[0])
        requests = [_request(path, n, line, n - 2) for n, line in enumerate(lines[1:], start=2)]
        return cls(spec, adapters, requests)


def _json_object(path, n: int, line: str, what: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{n}: {what} must be a JSON object")
    return obj


def _check_keys(path, n: int, obj: dict, keys: tuple, what: str) -> None:
    missing = [k for k in keys if k not in obj]
    unknown = sorted(set(obj) - set(keys))
    if missing:
        raise ValueError(f"{path}:{n}: {what} misses field {missing[0]!r}")
    if unknown:
        raise ValueError(f"{path}:{n}: {what} has unknown field {unknown[0]!r}")


def _header(path, line: str) -> tuple[WorkloadSpec, list[str]]:
    head = _json_object(path, 1, line, "the header")
    _check_keys(path, 1, head, ("trace", "spec", "adapters"), "the header")
    if head["trace"] != TRACE_VERSION or isinstance(head["trace"], bool):
        raise ValueError(f"{path}:1: not a version {TRACE_VERSION} trace: {head['trace']!r}")
    adapters = head["adapters"]
    if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
        raise ValueError(f"{path}:1: 'adapters' must be a list of names")
    if not isinstance(head["spec"], dict):
        raise ValueError(f"{path}:1: 'spec' must be an object")
    known = {f.name for f in dataclasses.fields(WorkloadSpec)}
    unknown = sorted(set(head["spec"]) - known)
    if unknown:
        raise ValueError(f"{path}:1: 'spec' has unknown field {unknown[0]!r}")
    try:
        spec = WorkloadSpec(**head["spec"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}:1: bad spec: {e}") from None
    return spec, adapters


def _request(path, n: int, line: str, index: int) -> TraceRequest:
    obj = _json_object(path, n, line, "a request")
    keys = tuple(f.name for f in dataclasses.fields(TraceRequest))
    _check_keys(path, n, obj, keys, "the request")

    def bad(name: str, why: str) -> None:
        raise ValueError(f"{path}:{n}: {name!r} {why} (got {obj[name]!r})")

    if obj["index"] != index or not _is_int(obj["index"]):
        bad("index", f"out of order: expected {index}")
    arrival = obj["arrival_s"]
    if arrival is not None and (not _is_num(arrival) or arrival < 0):
        bad("arrival_s", "must be null or a number >= 0")
    if obj["adapter"] is not None and not isinstance(obj["adapter"], str):
        bad("adapter", "must be null or a name")
    prompt = obj["prompt"]
    if not isinstance(prompt, list) or not prompt or not all(_is_int(t) and t >= 0 for t in prompt):
        bad("prompt", "must be a non-empty list of token ids")
    if not _is_int(obj["output_len"]) or obj["output_len"] < 1:
        bad("output_len", "must be an integer >= 1")
    return TraceRequest(index, None if arrival is None else float(arrival), obj["adapter"],
                        prompt, obj["output_len"])  # fmt: skip


def gamma_arrivals(n: int, rate: float, cv: float, rng) -> list[float]:
    """Arrival times (seconds from the start) of `n` requests: cumulative Gamma gaps of mean
    1/rate and coefficient of variation `cv`; the first request arrives at its own gap."""
    gaps = rng.gamma(shape=1.0 / cv**2, scale=cv**2 / rate, size=n)
    return np.cumsum(gaps).tolist()


def power_law_indices(n_requests: int, n_adapters: int, alpha: float, rng) -> list[int]:
    """S-LoRA's power law: floor(n_adapters * u**(1/alpha)), u ~ U[0, 1) (module docstring)."""
    u = rng.random(n_requests)
    idx = np.floor(n_adapters * u ** (1.0 / alpha)).astype(np.int64)
    return np.minimum(idx, n_adapters - 1).tolist()


def zipf_indices(n_requests: int, n_adapters: int, s: float, rng) -> list[int]:
    """Index k - 1 with P(rank k) ∝ 1/k**s over k = 1..n_adapters (finite, normalised)."""
    weights = 1.0 / np.arange(1, n_adapters + 1, dtype=np.float64) ** s
    return rng.choice(n_adapters, size=n_requests, p=weights / weights.sum()).tolist()


def uniform_indices(n_requests: int, n_adapters: int, rng) -> list[int]:
    return rng.integers(0, n_adapters, size=n_requests).tolist()


def _lengths(bounds: tuple[int, int], n: int, rng) -> list[int]:
    lo, hi = bounds
    if hi <= lo + 1:
        return [lo] * n
    return rng.integers(lo, hi, size=n).tolist()


def make_trace(spec: WorkloadSpec, adapters: list[str], vocab_size: int) -> Trace:
    """The trace of `spec` over `adapters` with token ids below `vocab_size` (module docstring)."""
    if not _is_int(vocab_size) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer (got {vocab_size!r})")
    adapters = list(adapters)
    n = spec.num_requests
    r_arrival, r_base, r_adapter, r_plen, r_olen, r_tokens = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(6)
    )
    arrivals = (
        gamma_arrivals(n, spec.rate, spec.cv, r_arrival) if spec.arrival == "gamma" else [None] * n
    )
    on_base = (r_base.random(n) < spec.base_share).tolist()
    k = len(adapters)
    if k == 0:
        idx = [0] * n
    elif spec.popularity == "power":
        idx = power_law_indices(n, k, spec.alpha, r_adapter)
    elif spec.popularity == "zipf":
        idx = zipf_indices(n, k, spec.zipf_s, r_adapter)
    else:
        idx = uniform_indices(n, k, r_adapter)
    plens = _lengths(spec.prompt_len, n, r_plen)
    olens = _lengths(spec.output_len, n, r_olen)
    low = 4 if vocab_size > 64 else 0
    requests = [
        TraceRequest(
            index=i,
            arrival_s=arrivals[i],
            adapter=None if k == 0 or on_base[i] else adapters[idx[i]],
            prompt=r_tokens.integers(low, vocab_size, size=plens[i]).tolist(),
            output_len=olens[i],
        )
        for i in range(n)
    ]
    return Trace(spec, adapters, requests)
