"""The shared vocabulary of a request's life: sampling parameters, the `Sequence`, step outputs.

One `Sequence` carries one request's whole state. The batcher owns its status and block table;
the runner only reads it. `adapter_id` is the public name a user typed (None = base model);
`adapter_uid` identifies one load of that adapter (a reload gets a new uid, so nothing computed
with old weights is ever reused). Slots inside one batch are called `adapter_idx` elsewhere.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

_seq_counter = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. `temperature == 0` means greedy.

    `logprobs` is the number of top alternatives to return per generated token (0 = only the
    chosen token's log-probability, which is always returned).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV pages and no adapter reference
    RUNNING = "running"  # holds KV pages for its computed tokens and a reference on its adapter
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # aborted by the caller
    ERROR = "error"  # the step that ran it failed (an internal error); its pages are freed


@dataclass
class Sequence:
    """One request. `token_ids` = prompt followed by generated tokens.

    Invariants: `num_computed_tokens <= len(token_ids)`; a RUNNING sequence's block table covers
    at least `num_computed_tokens` slots; a WAITING sequence has an empty block table and
    `num_computed_tokens == 0` (preemption is by recompute).
    """

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None
    adapter_uid: int | None = None
    tenant: str | None = None  # whose request: admission is fair between tenants
    eos_token_ids: tuple[int, ...] = ()
    arrival_step: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt has no tokens")
        if self.num_prompt_tokens == 0:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class ScheduledSeq:
    """A sequence and the tokens it runs this step: `token_ids[start:start+num_tokens]`."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so a token is sampled."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


@dataclass
class ScheduledBatch:
    """What one step runs: prefill chunks and decodes together, ordered by adapter_uid
    (base-only first) so each adapter's tokens form one contiguous segment."""

    items: list[ScheduledSeq]
    step: int
    loaded_adapters: list[int] = field(default_factory=list)  # uids made resident this step:
    # the runner copies their weights into their pages before the forward

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    new_top_logprobs: list[list[tuple[int, float]]]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
