"""One pool of fixed-size pages shared by the KV cache and device-resident LoRA adapters.

Unified paging (S-LoRA), with a geometry that survives GQA and MLP adapters:

* The engine owns one tensor ``[num_pages, page_elems]`` of the model dtype. This module only
  does the bookkeeping: page ids are plain ints ``0 .. num_pages - 1``.
* ``page_elems = num_layers * 2 * block_size * kv_dim`` with ``kv_dim = num_kv_heads * head_dim``.
  One KV page holds K and V of ``block_size`` consecutive tokens of one sequence for ALL layers,
  so a sequence's block table is a single list of page ids valid for every layer. GQA only
  changes ``kv_dim``, never the hidden size.
* One load of an adapter is laid out as one flat blob: per layer, per module group (q/k/v,
  o, gate/up, down), the stacked A rows ``[n_modules * r, in]`` of the targeted modules, then
  each module's B^T rows ``[r, out]`` (kernels/lora.py). Rows are not aligned to pages (a row
  may continue on the next page), so any row width fits: hidden size, GQA's narrower k/v width,
  or the MLP's intermediate size. The blob is cut into pages, so an adapter
  takes ``ceil(blob_elems / page_elems)`` pages with
  ``blob_elems = r * sum over target modules of (in + out) * num_layers``: pages are proportional
  to the adapter's true rank (no padding to a maximum rank).
* Adapters prefer a contiguous run of page ids (the CPU path can then view the blob without a
  copy); if no run is free they take scattered pages, read through their page table.
* KV allocates the lowest free ids (:meth:`PagePool.alloc`), adapters take runs from the highest
  end (:meth:`PagePool.alloc_run`), so the two rarely fragment each other.

Every page is either free or owned by exactly one ``(kind, owner)`` where kind is ``"kv"``
(owner = seq_id), ``"adapter"`` (owner = adapter uid) or ``"train"`` (owner = a fine-tuning
job's number: its optimizer state and activation budget, memory/train_pages.py). Failed
operations leave the pool unchanged.
"""

from __future__ import annotations

import heapq
import logging

logger = logging.getLogger(__name__)

KINDS = ("kv", "adapter", "train")


class PoolExhausted(RuntimeError):
    """Not enough free pages for a request; the pool was left unchanged."""

    def __init__(self, asked: int, free: int, what: str = "pages", note: str = "") -> None:
        super().__init__(f"page pool exhausted: asked for {asked} {what}, {free} free{note}")
        self.asked = asked
        self.free = free


class IntegrityError(RuntimeError):
    """A bookkeeping invariant does not hold (a bug, never a user error)."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


class PagePool:
    """Page ids, free structures and owners.

    Free pages are tracked by a bytearray of flags (1 = free) plus a min-heap of candidate ids
    with lazy deletion: ``_in_heap[p]`` says whether ``p`` has an entry in the heap, so the heap
    never holds duplicates and never grows beyond ``num_pages``. Pages taken by
    :meth:`alloc_run` leave stale heap entries that :meth:`alloc` skips.
    """

    def __init__(self, num_pages: int) -> None:
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be an int >= 1, got {num_pages!r}")
        self.num_pages = num_pages
        self._free_flags = bytearray(b"\x01") * num_pages
        self._in_heap = bytearray(b"\x01") * num_pages
        self._heap: list[int] = list(range(num_pages))  # sorted, hence a valid heap
        self._owner_kind: list[str | None] = [None] * num_pages
        self._owner_id: list[int] = [-1] * num_pages
        self._num_free = num_pages
        self._used = {k: 0 for k in KINDS}

    @property
    def num_free(self) -> int:
        """Number of free pages."""
        return self._num_free

    def pages_used(self, kind: str) -> int:
        """Number of pages owned by ``kind`` (one of KINDS)."""
        _check_kind(kind)
        return self._used[kind]

    def is_free(self, page: int) -> bool:
        """Whether ``page`` is free (ValueError if out of range)."""
        self._check_page(page)
        return bool(self._free_flags[page])

    def owner_of(self, page: int) -> tuple[str, int] | None:
        """``(kind, owner)`` of ``page``, or None if it is free (ValueError if out of range)."""
        self._check_page(page)
        kind = self._owner_kind[page]
        return None if kind is None else (kind, self._owner_id[page])

    def alloc(self, n: int, kind: str, owner: int) -> list[int]:
        """Take the ``n`` lowest free page ids, ascending, for ``(kind, owner)``.

        Raises PoolExhausted (pool unchanged) if ``n > num_free``. O(n log N) amortised.
        """
        _check_kind(kind)
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > self._num_free:
            raise PoolExhausted(n, self._num_free)
        out: list[int] = []
        heap, flags, in_heap = self._heap, self._free_flags, self._in_heap
        while len(out) < n:
            p = heapq.heappop(heap)
            in_heap[p] = 0
            if flags[p]:
                out.append(p)
                self._claim(p, kind, owner)
        return out

    def alloc_run(self, n: int, kind: str, owner: int) -> list[int] | None:
        """Take ``n`` contiguous free ids, ascending, for ``(kind, owner)``, or return None.

        The search starts at the highest ids: the result is the top ``n`` pages of the highest
        free run of length >= n. Cost: O(number of free runs above the result) C-level scans.
        Returns None (pool unchanged) if no such run exists.
        """
        _check_kind(kind)
        if n < 1:
            raise ValueError(f"a run needs at least one page, got {n}")
        if n > self._num_free:
            return None
        flags = self._free_flags
        end = self.num_pages  # exclusive end of the region still to search
        while end >= n:
            top = flags.rfind(1, 0, end)  # last free page below end
            if top < n - 1:
                return None
            end = top + 1
            below = flags.rfind(0, 0, end)  # last used page below the free run, or -1
            if end - below - 1 >= n:
                run = list(range(end - n, end))
                for p in run:
                    self._claim(p, kind, owner)
                return run
            end = below
        return None

    def free(self, pages: list[int], kind: str, owner: int) -> None:
        """Return ``pages`` to the pool.

        Every page must be owned by ``(kind, owner)`` and listed once; otherwise ValueError naming
        the offending page, and nothing is freed.
        """
        _check_kind(kind)
        seen: set[int] = set()
        for p in pages:
            self._check_page(p)
            if p in seen:
                raise ValueError(f"page {p} listed twice in free()")
            seen.add(p)
            if self._owner_kind[p] != kind or self._owner_id[p] != owner:
                raise ValueError(
                    f"page {p} is not owned by ({kind!r}, {owner}): owner is {self.owner_of(p)}"
                )
        flags, in_heap = self._free_flags, self._in_heap
        for p in pages:
            self._owner_kind[p] = None
            self._owner_id[p] = -1
            flags[p] = 1
            if not in_heap[p]:
                in_heap[p] = 1
                heapq.heappush(self._heap, p)
        self._num_free += len(pages)
        self._used[kind] -= len(pages)

    def check_integrity(self) -> None:
        """Raise IntegrityError unless free flags, heap, owners and counters all agree. O(N)."""
        n = self.num_pages
        flags, in_heap = self._free_flags, self._in_heap
        if len(flags) != n or len(in_heap) != n:
            raise IntegrityError(f"flag arrays have lengths {len(flags)}, {len(in_heap)} != {n}")
        if len(self._heap) != len(set(self._heap)):
            raise IntegrityError(f"heap has {len(self._heap) - len(set(self._heap))} duplicates")
        heap_set = set(self._heap)
        flagged = {p for p in range(n) if in_heap[p]}
        if heap_set != flagged:
            raise IntegrityError(
                f"heap entries ({len(heap_set)}) disagree with in-heap flags ({len(flagged)})"
            )
        counts = {k: 0 for k in KINDS}
        free = 0
        for p in range(n):
            kind = self._owner_kind[p]
            if flags[p]:
                free += 1
                if kind is not None:
                    raise IntegrityError(f"page {p} is flagged free but owned by {kind}")
                if not in_heap[p]:
                    raise IntegrityError(f"free page {p} is not in the heap")
            else:
                if kind not in counts:
                    raise IntegrityError(f"used page {p} has no valid owner kind ({kind!r})")
                counts[kind] += 1
        if free != self._num_free:
            raise IntegrityError(f"{free} pages flagged free but num_free = {self._num_free}")
        if counts != self._used:
            raise IntegrityError(f"owned pages per kind {counts} != counters {self._used}")
        if free + sum(counts.values()) != n:
            raise IntegrityError(f"free {free} + used {counts} != num_pages {n}")

    def _claim(self, p: int, kind: str, owner: int) -> None:
        self._free_flags[p] = 0
        self._owner_kind[p] = kind
        self._owner_id[p] = owner
        self._num_free -= 1
        self._used[kind] += 1

    def _check_page(self, page: int) -> None:
        if not isinstance(page, int) or not 0 <= page < self.num_pages:
            raise ValueError(f"page {page!r} out of range [0, {self.num_pages})")

    def __repr__(self) -> str:
        return (
            f"PagePool(num_pages={self.num_pages}, free={self._num_free}, "
            f"kv={self._used['kv']}, adapter={self._used['adapter']}, train={self._used['train']})"
        )
