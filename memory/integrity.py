"""The whole-memory check: pool, KV block tables and adapter residency agree with each other.

Bookkeeping only (plain ints and lists of page ids); the engine owns the tensor storage. See
``memory/pool.py`` for the page geometry.
"""

from __future__ import annotations

from loraplex.memory.adapter_store import AdapterStore
from loraplex.memory.kv_cache import KVCacheManager
from loraplex.memory.pool import IntegrityError, PagePool
from loraplex.memory.train_pages import TrainingPages


def check_all(
    pool: PagePool,
    kv: KVCacheManager,
    store: AdapterStore,
    training: TrainingPages | None = None,
) -> None:
    """Run every integrity check and check that free + kv + adapter + train pages == num_pages.

    Raises IntegrityError with the numbers.
    """
    if kv.pool is not pool or store.pool is not pool:
        raise IntegrityError("kv cache and adapter store must share the given pool")
    if training is not None and training.pool is not pool:
        raise IntegrityError("training pages must share the given pool")
    pool.check_integrity()
    kv.check_integrity()
    store.check_integrity()
    train_pages = 0
    if training is not None:
        training.check_integrity()
        train_pages = training.pages_used
    kv_pages = kv.pages_used
    adapter_pages = sum(store.num_pages(u) for u in store.resident_uids())
    if pool.num_free + kv_pages + adapter_pages + train_pages != pool.num_pages:
        raise IntegrityError(
            f"free {pool.num_free} + kv {kv_pages} + adapter {adapter_pages} + train "
            f"{train_pages} != num_pages {pool.num_pages}"
        )
