"""`EngineStats`: a snapshot of an engine's load, memory and health for metrics and /health,
cheap enough to take after every step."""

from __future__ import annotations

import time
from dataclasses import dataclass

ADAPTER_NAMES_TTL = 0.25  # seconds between refreshes of the adapter name sets (O(queue))


@dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    pages_total: int = 0
    pages_kv: int = 0
    pages_adapter: int = 0
    adapters_device: int = 0
    adapters_host: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0
    preemptions: int = 0  # running sequences sent back to the queue (KV pages ran out)
    pages_train: int = 0
    pages_evictable: int = 0  # idle adapters' pages: free for KV on demand
    finetune_running: int = 0
    finetune_queued: int = 0
    running_adapters: tuple[str, ...] = ()  # engine adapter names of running requests
    waiting_adapters: tuple[str, ...] = ()  # ... and of waiting ones
    max_num_seqs: int = 0
    step_failures: int = 0  # inference steps that raised since the start (their batch failed)
    failing: str | None = None  # the last inference step's error; None once a step succeeds
    taken_at: float = 0.0  # time.time() of the snapshot


class StatsTaker:
    """Takes `EngineStats` from an engine's parts. The adapter name sets walk the queue, so
    they are rebuilt only when the number of running or waiting requests changed or
    ADAPTER_NAMES_TTL passed (a swap of equal counts shows up within the TTL)."""

    def __init__(self, batcher, pool, store, training, max_num_seqs: int) -> None:
        self.batcher, self.pool, self.store, self.training = batcher, pool, store, training
        self.max_num_seqs = max_num_seqs
        self._names: tuple[float, tuple, tuple, tuple] = (0.0, (0, 0), (), ())

    def take(self, step_failures: int, failing: str | None) -> EngineStats:
        b, p, s = self.batcher, self.pool, self.store
        now = time.time()
        counts = (len(b.running), len(b.waiting))
        names_at, names_counts, running, waiting = self._names
        # Refreshed when a request joins or leaves (the counts change; an idle engine's snapshot
        # stays its last one until new work arrives) and at least every ADAPTER_NAMES_TTL.
        if counts != names_counts or now - names_at > ADAPTER_NAMES_TTL:
            running = tuple(sorted({q.adapter_id for q in b.running if q.adapter_id}))
            waiting = tuple(sorted({q.adapter_id for q in b.waiting if q.adapter_id}))
            self._names = (now, counts, running, waiting)
        return EngineStats(
            running=len(b.running),
            waiting=len(b.waiting),
            pages_total=p.num_pages,
            pages_kv=p.pages_used("kv"),
            pages_adapter=p.pages_used("adapter"),
            adapters_device=s.num_resident,
            adapters_host=s.num_registered,
            adapter_loads=s.loads,
            adapter_evictions=s.evictions,
            preemptions=b.num_preemptions,
            pages_train=p.pages_used("train"),
            pages_evictable=s.evictable_pages(),
            finetune_running=len(self.training.running()),
            finetune_queued=len(self.training.queued()),
            running_adapters=running,
            waiting_adapters=waiting,
            max_num_seqs=self.max_num_seqs,
            step_failures=step_failures,
            failing=failing,
            taken_at=now,
        )
