"""Block tables of sequences on the shared :class:`~memory.pool.PagePool`.

A sequence's block table is one list of page ids valid for every layer (see ``memory/pool.py``
for the page geometry): token position ``pos`` lives in page ``table[pos // block_size]`` at
slot ``pos % block_size``. Pages are owned in the pool by ``("kv", seq_id)``.
"""

from __future__ import annotations

import logging

from loraplex.memory.pool import IntegrityError, PagePool

logger = logging.getLogger(__name__)


class KVCacheManager:
    """Block tables per sequence on the pool. owner = seq_id."""

    def __init__(self, pool: PagePool, block_size: int) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.pool = pool
        self.block_size = block_size
        self._tables: dict[int, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` slots: ``ceil(num_tokens / block_size)``."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: int) -> list[int]:
        """The live block table of ``seq_id`` (same list object every call; created empty).

        Callers may read it (and hand it to the runner) but must not mutate it.
        """
        t = self._tables.get(seq_id)
        if t is None:
            t = self._tables[seq_id] = []
        return t

    def has(self, seq_id: int) -> bool:
        """Whether ``seq_id`` has a table (possibly empty)."""
        return seq_id in self._tables

    def num_blocks(self, seq_id: int) -> int:
        """Current table length of ``seq_id`` (0 if unknown)."""
        t = self._tables.get(seq_id)
        return 0 if t is None else len(t)

    def capacity(self, seq_id: int) -> int:
        """Token slots the table of ``seq_id`` covers now (0 if unknown)."""
        return self.num_blocks(seq_id) * self.block_size

    def extra_blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Pages to add so the table of ``seq_id`` covers ``num_tokens`` slots (>= 0)."""
        return max(0, self.blocks_for(num_tokens) - self.num_blocks(seq_id))

    def ensure(self, seq_id: int, num_tokens: int) -> None:
        """Grow the table of ``seq_id`` in place so it covers ``num_tokens`` slots.

        Never shrinks; creates an empty table for an unknown ``seq_id``. Raises PoolExhausted
        with pool and tables unchanged (no table is created for an unknown ``seq_id``) if there
        are not enough free pages.
        """
        need = self.extra_blocks_needed(seq_id, num_tokens)
        if need == 0:
            self.table(seq_id)
            return
        pages = self.pool.alloc(need, "kv", seq_id)
        self.table(seq_id).extend(pages)

    def free(self, seq_id: int) -> None:
        """Free all pages of ``seq_id`` and forget it (no-op if unknown).

        The live list returned by :meth:`table` is cleared, so stale holders see no pages.
        """
        t = self._tables.pop(seq_id, None)
        if t:
            self.pool.free(t, "kv", seq_id)
            # Clear the live list so a stale reference held elsewhere cannot reach freed pages.
            t.clear()

    @property
    def num_seqs(self) -> int:
        """Number of sequences with a table (including empty ones)."""
        return len(self._tables)

    @property
    def pages_used(self) -> int:
        """Sum of table lengths."""
        return sum(len(t) for t in self._tables.values())

    def seq_ids(self) -> list[int]:
        """Ids of the sequences with a table."""
        return list(self._tables)

    def check_integrity(self) -> None:
        """Raise IntegrityError unless every table page is owned by ``("kv", seq_id)``, no page
        is in two tables, and the pool's kv page count equals the sum of table lengths."""
        seen: dict[int, int] = {}
        total = 0
        for seq_id, t in self._tables.items():
            total += len(t)
            for p in t:
                if p in seen:
                    raise IntegrityError(f"page {p} is in the tables of seqs {seen[p]}, {seq_id}")
                seen[p] = seq_id
                owner = self.pool.owner_of(p)
                if owner != ("kv", seq_id):
                    raise IntegrityError(f"page {p} of seq {seq_id} is owned by {owner} in pool")
        used = self.pool.pages_used("kv")
        if used != total:
            raise IntegrityError(f"pool has {used} kv pages but tables hold {total}")
