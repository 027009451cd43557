"""How much of each engine step co-served training may take (engine/training_jobs.py spends it).

Inference first; training fills what the steps leave, by one of two policies. Training runs in
units (half a decoder layer's forward, the head, or one half's backward: engine/train_forward.py
`MicroBatch`); each kind's cost is estimated from its measured time per padded token.

* Share (default): each decode-only step earns training a credit of `finetune_step_share` x
  its inference time (estimated: the last decode-only step's; 0.25: over any stretch of such
  steps, training adds about a quarter to the time inference alone would take). A unit starts
  only while the credit is positive; its measured cost is then taken off, so one unit may
  overrun the step's credit and leave a debt, which the next steps pay back by running no
  training until the credit is positive again. More units run in the same step while their
  estimated cost fits what is left. Credit never exceeds one step's earning (a quiet stretch
  buys no burst). Over a window, training seconds / inference seconds = the share, within one
  unit. Idle steps' training counts first: stretching decode steps is what costs inter-token
  latency, so a decode step earns its share only in proportion to what the idle steps of the
  last seconds (IDLE_WINDOW_SECONDS) left short of the time saturated steps would give
  training (share / (1 + share)): all of it when the engine never idles, none under a partial
  load whose idle gaps train at least that much (`idle_first`).
* ITL target (`finetune_itl_slo_ms`): each busy step trains while the step stays under the
  target: units run only while their estimate fits what the step leaves of it, nothing is
  carried between steps and nothing overruns. Steps shorter than the target (decodes) are
  filled; the long ones (prefills) get little or nothing. (A target relative to the measured
  p99 of steps' inference time was tried and dropped: the p99 it measures grows with the
  batches that training's delays build up, and the target ran away with it.)
* Either way, a step that prefills trains nothing: its tokens (the new requests' first, the
  running ones' next) are the long inter-token latencies already, the ones that set the p99.
* A micro-batch holds at most min(`finetune_max_tokens_per_step`, `max_num_batched_tokens` -
  the step's inference tokens) padded tokens, and no more than the step's credit pays for at
  the measured per-token cost of the costliest kind of unit, but at least one example: when
  even that costs more than a step earns, one step in every few runs a unit and the others
  none (share), or only the steps with room for it train (ITL target).
* With no inference running, training takes everything: a step runs one unit (a new request
  waits at most one unit) and any debt is forgiven (idle time was nobody's). Micro-batches
  grow to `finetune_max_tokens_per_step` (cheaper per token) once no step has run inference
  for IDLE_GROW_SECONDS; before that they keep the last busy step's size, so that a request
  arriving in a short lull meets units of about a step's credit, not a full micro-batch's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.engine.finetune_job import CoserveConfig, StepLoad

IDLE_GROW_SECONDS = 5.0  # idle this long, micro-batches grow to finetune_max_tokens_per_step
IDLE_WINDOW_SECONDS = 2.0  # the window over which idle steps' training time counts first


@dataclass(frozen=True)
class StepGrant:
    """What one step gives training: `earned` seconds of credit (None: the engine is idle, one
    unit and no debt) and the token cap of a new micro-batch."""

    earned: float | None
    tokens: int


class StepBudget:
    """The credit, the unit cost estimates and the idle history behind each step's grant."""

    def __init__(self, config: CoserveConfig) -> None:
        self.config = config
        self.cost: dict[str, float] = {}  # seconds per padded token of each unit kind (EMA)
        self.credit = 0.0  # seconds training may still spend; negative: a debt to pay back
        self.clock: Callable[[], float] = time.perf_counter  # times units (tests fake it)
        self._busy_at = -math.inf  # clock() of the last step that ran inference
        self._busy_tokens = config.max_tokens_per_step  # that step's micro-batch token cap
        # Share of recent time spent training in idle steps (a leaky integrator over
        # IDLE_WINDOW_SECONDS, updated at `_idle_at`): what decode steps need not give again.
        self.idle_share, self._idle_at = 0.0, None

    @property
    def strict(self) -> bool:
        """The ITL-target policy: only units that fit, no debt."""
        return self.config.itl_slo_ms is not None

    def plan(self, load: StepLoad) -> tuple[float | None, int]:
        """(seconds of credit the step earns, micro-batch token cap); None seconds = idle."""
        c = self.config
        if load.tokens == 0:  # full micro-batches only once the engine has been idle a while
            quiet = self.clock() - self._busy_at >= IDLE_GROW_SECONDS
            return None, c.max_tokens_per_step if quiet else self._busy_tokens
        self._busy_at = self.clock()
        target = None if c.itl_slo_ms is None else c.itl_slo_ms / 1000
        if load.prefill:  # its tokens are the long ITLs (and the new requests' TTFT): no more
            return 0.0, self._busy_tokens
        seconds = c.step_share * load.seconds if target is None else target - load.seconds
        if seconds <= 0:
            return 0.0, self._busy_tokens
        tokens = min(c.max_tokens_per_step, c.max_num_batched_tokens - load.tokens)
        per_token = max(self.cost.values(), default=0.0)  # the costliest kind of unit
        if per_token:  # that unit should cost about what one step earns
            tokens = min(tokens, int(seconds / per_token))
        self._busy_tokens = max(tokens, 1)
        if target is None:  # idle steps' training counts first (see `idle_first`)
            seconds *= self.idle_first()
        return seconds, self._busy_tokens

    def open(self, load: StepLoad) -> StepGrant | None:
        """The step's grant, its credit added; None when nothing may run (nothing earned, or
        a debt still being paid back)."""
        earned, tokens = self.plan(load)
        if earned is None:  # idle: one unit, no debt
            self.credit = 0.0
        else:
            self.credit = earned if self.strict else min(self.credit + earned, earned)
            if self.credit <= 0:
                return None
        return StepGrant(earned, tokens)

    def allows(self, grant: StepGrant, kind: str, num_tokens: int, ran: int) -> bool:
        """Whether the step may start a unit of `kind` over `num_tokens` after `ran` units."""
        if grant.earned is None:
            return ran == 0
        if ran or self.strict:
            return self.cost.get(kind, 0.0) * num_tokens <= self.credit
        return True  # the share policy's first unit starts on any positive credit

    def learn(self, kind: str, per_token: float) -> None:
        """A unit of `kind` took `per_token` seconds per padded token."""
        old = self.cost.get(kind)
        self.cost[kind] = per_token if old is None else 0.8 * old + 0.2 * per_token

    def spend(self, grant: StepGrant, seconds: float) -> None:
        """A unit (with its optimizer step and checkpoint, if any) took `seconds`."""
        if grant.earned is not None:
            self.credit -= seconds
        else:
            self._idle_share_now(seconds)

    def idle_first(self) -> float:
        """The part of its share a decode step still owes training: 1 when the engine had no
        idle time lately, 0 once idle steps gave training the share of time it would get from
        saturated steps (share / (1 + share)), linear between. Stretching decode steps is what
        costs inter-token latency; under a partial load the idle gaps train instead."""
        floor = self.config.step_share / (1.0 + self.config.step_share)
        return max(0.0, 1.0 - self._idle_share_now() / floor)

    def _idle_share_now(self, idle_seconds: float = 0.0) -> float:
        """Decay `idle_share` to now, add `idle_seconds` of idle-step training, return it."""
        now = self.clock()
        if self._idle_at is not None:
            self.idle_share *= math.exp(-max(0.0, now - self._idle_at) / IDLE_WINDOW_SECONDS)
        self._idle_at = now
        self.idle_share += idle_seconds / IDLE_WINDOW_SECONDS
        return self.idle_share
