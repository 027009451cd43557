"""Iteration-level continuous batching with adapter-aware admission.

Each `schedule()` builds one step: running sequences first (decodes, then unfinished prefill
chunks), then waiting requests admitted FCFS within the token budget and `max_num_seqs` (between
tenants, the least served tenant's oldest request first: scheduler/fairness.py).
Admission charges the unified pool for the chunk's KV pages plus the adapter's pages when it is
not resident; idle adapters are evicted (LRU) to make room. A request that cannot be admitted now
is skipped, not waited on, unless it is older than `starvation_steps`: then nothing younger is
admitted until it is (a bounded wait for a cold adapter under a hot-adapter flood). When a
running sequence cannot get a KV page, the newest other running sequence is preempted by
recompute (its pages freed, it goes back to the head of the queue). Requests that could never
fit are refused in `add`, so the loop cannot deadlock.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass

from loraplex.memory.adapter_store import AdapterStore
from loraplex.memory.kv_cache import KVCacheManager
from loraplex.scheduler.fairness import FairShare
from loraplex.scheduler.sequence import (
    FinishReason,
    ScheduledBatch,
    ScheduledSeq,
    Sequence,
    SequenceStatus,
    StepOutput,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    starvation_steps: int = 32
    max_scan: int = 256  # waiting requests looked at per step (bounds Python work)


class Batcher:
    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager, store: AdapterStore) -> None:
        self.cfg = cfg
        self.kv = kv
        self.store = store
        self.pool = kv.pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order (oldest first)
        self.step_no = 0
        self.num_preemptions = 0
        self.admitted_last_step: list[Sequence] = []  # waiting -> running in the last schedule()
        self.fair = FairShare()  # admission order between tenants (scheduler/fairness.py)

    # -- requests ----------------------------------------------------------------------------

    def pages_needed(self, seq: Sequence) -> int:
        """Worst-case pool pages for the whole request (full KV + its adapter)."""
        total = min(seq.num_prompt_tokens + seq.params.max_tokens, self.cfg.max_model_len)
        adapter = self.store.num_pages(seq.adapter_uid) if seq.adapter_uid is not None else 0
        return self.kv.blocks_for(total) + adapter

    def add(self, seq: Sequence) -> None:
        """Queue a request. ValueError (nothing queued) if it could never run."""
        if seq.num_prompt_tokens >= self.cfg.max_model_len:
            raise ValueError(
                f"request {seq.request_id!r}: prompt has {seq.num_prompt_tokens} tokens, the "
                f"context allows at most {self.cfg.max_model_len - 1} before generating"
            )
        need = self.pages_needed(seq)
        usable = self.pool.num_pages - self.store.pinned_pages(exclude=seq.adapter_uid)
        if need > usable:
            raise ValueError(
                f"request {seq.request_id!r} needs {need} pool pages (KV + adapter) but the pool "
                f"has only {usable} not held by pinned adapters (of {self.pool.num_pages}); "
                f"lower max_tokens or raise --pool-bytes"
            )
        seq.arrival_step = self.step_no
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.fair.arrive(seq.tenant)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is and free everything it holds."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._finish(seq, FinishReason.ABORT)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._release(seq)
                self._finish(seq, FinishReason.ABORT)
                return seq
        return None

    def fail(self, batch: ScheduledBatch, reason: str) -> list[StepOutput]:
        """End every sequence of a batch whose step failed: free its pages and adapter
        reference, finish it with ERROR and report `reason`. Sequences outside the batch keep
        their state (the failed step changed nothing of theirs)."""
        outputs = []
        for item in batch.items:
            seq = item.seq
            if seq in self.running:
                self.running.remove(seq)
                self._release(seq)
            self._finish(seq, FinishReason.ERROR)
            outputs.append(
                StepOutput(seq.request_id, [], [], [], True, FinishReason.ERROR,
                           seq.num_prompt_tokens, seq.num_output_tokens, error=reason)
            )  # fmt: skip
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def uses_adapter(self, uid: int) -> bool:
        return any(s.adapter_uid == uid for s in (*self.waiting, *self.running))

    # -- scheduling --------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        self.step_no += 1
        self.admitted_last_step = []
        budget = self.cfg.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        scheduled: set[int] = set()
        loaded: list[int] = []
        # 1. Running sequences: decodes first, then unfinished prefill chunks.
        decodes = [s for s in self.running if len(s) - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if len(s) - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0 or seq.status is not SequenceStatus.RUNNING:
                continue
            n = min(len(seq) - seq.num_computed_tokens, budget)
            if not self._reserve_kv(seq, seq.num_computed_tokens + n, scheduled):
                continue  # seq itself was preempted
            items.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            scheduled.add(seq.seq_id)
            self.fair.charge(seq.tenant, n)
            budget -= n
        # 2. Admit waiting requests.
        budget = self._admit(budget, items, scheduled, loaded)
        if not items:
            return None
        items.sort(key=lambda it: -1 if it.seq.adapter_uid is None else it.seq.adapter_uid)
        loaded = [uid for uid in loaded if self.store.is_resident(uid)]
        return ScheduledBatch(items=items, step=self.step_no, loaded_adapters=loaded)

    def _reserve_kv(self, seq: Sequence, num_tokens: int, scheduled: set[int]) -> bool:
        """Give `seq` KV pages for `num_tokens`, evicting idle adapters, then preempting the
        newest unscheduled running sequences. False if `seq` itself had to be preempted."""
        need = self.kv.extra_blocks_needed(seq.seq_id, num_tokens)
        while self.pool.num_free < need and not self.store.make_room(need):
            victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        self.kv.ensure(seq.seq_id, num_tokens)
        seq.block_table = self.kv.table(seq.seq_id)
        return True

    def _admit(self, budget: int, items, scheduled: set[int], loaded: list[int]) -> int:
        """Admit waiting requests in arrival order while the token budget and max_num_seqs
        allow. One whose pages (KV chunk + adapter) cannot be had now is skipped, unless it has
        waited more than starvation_steps: then admission stops at it, so nothing younger takes
        the pages it waits for. Every request that fits is admitted, starving or not (a backlog
        of old requests is admitted as fast as a fresh one)."""
        # Look at the first max_scan requests only: Python work per step stays bounded however
        # long the queue is (a copy, since admitted requests leave the deque meanwhile). Between
        # tenants, the least served goes first (scheduler/fairness.py).
        scan = list(itertools.islice(self.waiting, self.cfg.max_scan))
        for seq in self.fair.order(scan):
            if budget == 0 or len(self.running) >= self.cfg.max_num_seqs:
                break
            n = min(len(seq), budget)
            uid = seq.adapter_uid
            need = self.kv.blocks_for(n) + (
                self.store.pages_to_acquire(uid) if uid is not None else 0
            )
            if self.pool.num_free + self.store.evictable_pages(exclude=uid) < need:
                if self.step_no - seq.arrival_step > self.cfg.starvation_steps:
                    break  # hold admission for it (the queue is in arrival order)
                continue
            ok = self.store.make_room(need, exclude=uid)
            assert ok, "make_room failed although enough pages were evictable"
            if uid is not None and self.store.acquire(uid):
                loaded.append(uid)
            self.kv.ensure(seq.seq_id, n)
            seq.block_table = self.kv.table(seq.seq_id)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.admitted_last_step.append(seq)
            items.append(ScheduledSeq(seq, 0, n))
            scheduled.add(seq.seq_id)
            self.fair.charge(seq.tenant, n)
            budget -= n
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Back into the queue by arrival, so the head is always the oldest waiting request
        # (the starvation guard looks only at the head).
        pos = next(
            (i for i, w in enumerate(self.waiting) if w.seq_id > seq.seq_id),
            len(self.waiting),
        )
        self.waiting.insert(pos, seq)
        logger.debug("preempted %s (%d tokens) by recompute", seq.request_id, len(seq))

    def _release(self, seq: Sequence) -> None:
        """Free a sequence's KV pages and its adapter reference (back to zero computed)."""
        self.kv.free(seq.seq_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        if seq.adapter_uid is not None:
            self.store.release(seq.adapter_uid)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.fair.leave(seq.tenant)

    # -- after the forward -------------------------------------------------------------------

    def postprocess(self, batch: ScheduledBatch, sampled) -> list[StepOutput]:
        """Advance every scheduled sequence; append sampled tokens (one per sampling item, in
        batch order); finish, free and report. `sampled` has token_ids, logprobs, top_logprobs."""
        outputs = []
        j = 0
        for item in batch.items:
            seq = item.seq
            seq.num_computed_tokens = item.start + item.num_tokens
            if not item.samples:
                continue
            token = sampled.token_ids[j]
            seq.token_ids.append(token)
            seq.output_logprobs.append(sampled.logprobs[j])
            top = sampled.top_logprobs[j] if sampled.top_logprobs else []
            seq.output_top_logprobs.append(top)
            j += 1
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._release(seq)
                self._finish(seq, reason)
            outputs.append(
                StepOutput(
                    request_id=seq.request_id,
                    new_token_ids=[token],
                    new_logprobs=[seq.output_logprobs[-1]],
                    new_top_logprobs=[top],
                    finished=reason is not None,
                    finish_reason=reason,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_output_tokens=seq.num_output_tokens,
                )
            )
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                return FinishReason.STOP
            if not p.ignore_eos and token in seq.eos_token_ids:
                return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.cfg.max_model_len:
            return FinishReason.LENGTH
        return None
