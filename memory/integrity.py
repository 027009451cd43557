"""The whole-memory check: pool, KV block tables and adapter residency agree with each other.

Bookkeeping only (plain ints and lists of page ids); the engine owns the tensor storage. See
``memory/pool.py`` for the page geometry.
"""

from __future__ import annotations

from loraplex.memory.adapter_store import AdapterStore
from loraplex.memory.kv_cache import KVCacheManager
from loraplex.memory.pool import IntegrityError, PagePool


def check_all(pool: PagePool, kv: KVCacheManager, store: AdapterStore) -> None:
    """Run all three integrity checks and check that free + kv + adapter pages == num_pages.

    Raises IntegrityError with the numbers.
    """
    if kv.pool is not pool or store.pool is not pool:
        raise IntegrityError("kv cache and adapter store must share the given pool")
    pool.check_integrity()
    kv.check_integrity()
    store.check_integrity()
    kv_pages = kv.pages_used
    adapter_pages = sum(store.num_pages(u) for u in store.resident_uids())
    if pool.num_free + kv_pages + adapter_pages != pool.num_pages:
        raise IntegrityError(
            f"free {pool.num_free} + kv {kv_pages} + adapter {adapter_pages} "
            f"!= num_pages {pool.num_pages}"
        )
