"""Pool pages reserved by fine-tuning jobs: their optimizer state and their activation budget.

A job reserves everything it will ever need before its first micro-batch, so the KV cache,
adapters and training never oversubscribe the pool together:

* ``state`` pages: one contiguous run (``PagePool.alloc_run``, from the high end like adapters).
  The engine lays the job's float32 adapter weights, gradients and AdamW moments out in it,
  so they live in the pool's memory.
* ``activation`` pages: any free pages (``PagePool.alloc``). They are a budget, not storage:
  the activations autograd keeps for one micro-batch are allocated by torch, and the job never
  runs a micro-batch larger than the one these pages were sized for. Taking them out of the
  pool keeps the KV cache from growing into that memory.

Bookkeeping only (plain ints); the engine owns the tensor and zeroes a job's pages before they
are released (the KV cache reads unwritten slots before masking them, so no page may go back
holding NaN bit patterns). ``release`` returns every page of a job at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.memory.pool import IntegrityError, PagePool, PoolExhausted


@dataclass(frozen=True)
class Reservation:
    state: list[int]  # one contiguous ascending run
    activation: list[int]

    @property
    def num_pages(self) -> int:
        return len(self.state) + len(self.activation)


class TrainingPages:
    """The ``"train"`` pages of the pool, per job number (an int owner id)."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self._jobs: dict[int, Reservation] = {}

    def reserve(self, job: int, state_pages: int, activation_pages: int) -> Reservation:
        """Take both parts for `job`, or nothing: PoolExhausted (pool unchanged) when the pool
        has too few free pages or no free run of `state_pages`."""
        if job in self._jobs:
            raise ValueError(f"training job {job} already holds pages")
        if state_pages < 1 or activation_pages < 0:
            raise ValueError(f"bad page counts: state {state_pages}, activation {activation_pages}")
        need = state_pages + activation_pages
        if need > self.pool.num_free:
            raise PoolExhausted(need, self.pool.num_free)
        run = self.pool.alloc_run(state_pages, "train", job)
        if run is None:
            raise PoolExhausted(
                state_pages, self.pool.num_free, "contiguous pages",
                " (no free run that long: the pool is fragmented)",
            )  # fmt: skip
        activation = self.pool.alloc(activation_pages, "train", job)
        self._jobs[job] = res = Reservation(run, activation)
        return res

    def release(self, job: int) -> list[int]:
        """Free every page of `job` (KeyError if it holds none); returns them."""
        res = self._jobs.pop(job)
        pages = res.state + res.activation
        self.pool.free(pages, "train", job)
        return pages

    def get(self, job: int) -> Reservation | None:
        return self._jobs.get(job)

    def jobs(self) -> list[int]:
        return list(self._jobs)

    @property
    def pages_used(self) -> int:
        return sum(r.num_pages for r in self._jobs.values())

    def check_integrity(self) -> None:
        """Each job's pages are owned by ("train", job) in the pool, its state pages are one
        ascending run, and the pool's "train" count equals the reservations' total."""
        for job, res in self._jobs.items():
            s = res.state
            if s != list(range(s[0], s[0] + len(s))):
                raise IntegrityError(f"job {job}: state pages {s[:4]}... are not one run")
            for p in s + res.activation:
                if self.pool.owner_of(p) != ("train", job):
                    raise IntegrityError(
                        f"job {job}: page {p} is owned by {self.pool.owner_of(p)}, not ('train', "
                        f"{job})"
                    )
        used = self.pool.pages_used("train")
        if used != self.pages_used:
            raise IntegrityError(
                f"pool has {used} train pages, reservations hold {self.pages_used}"
            )
