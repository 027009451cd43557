"""Shared set-up of the memory/ tests."""

from __future__ import annotations

from loraplex.memory.adapter_store import AdapterStore
from loraplex.memory.kv_cache import KVCacheManager
from loraplex.memory.pool import PagePool


def make(num_pages: int = 16, block_size: int = 4):
    """A fresh pool of `num_pages` pages with its KV manager and adapter store."""
    pool = PagePool(num_pages)
    return pool, KVCacheManager(pool, block_size), AdapterStore(pool)


def owners(pool: PagePool) -> list:
    """Every page's owner, by page index."""
    return [pool.owner_of(p) for p in range(pool.num_pages)]
