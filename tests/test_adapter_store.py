"""Tests of memory/: adapter residency in the pool (LRU, refcounts, pins, eviction)."""

from __future__ import annotations

import pytest
from memory_helpers import make, owners

from loraplex.memory.integrity import check_all
from loraplex.memory.pool import IntegrityError, PagePool, PoolExhausted

# -- AdapterStore -----------------------------------------------------------------------------


def test_register_errors_and_lookups():
    _, _, store = make(8)
    store.register(1, 3, payload="host-1")
    for uid, n in [(1, 2), (2, 0), (3, 9)]:
        with pytest.raises(ValueError):
            store.register(uid, n)
    assert store.num_registered == 1 and store.payload(1) == "host-1" and store.num_pages(1) == 3
    assert store.is_registered(1) and not store.is_registered(2) and not store.is_resident(2)
    with pytest.raises(KeyError):
        store.acquire(2)
    with pytest.raises(ValueError):
        store.pages(1)  # registered, not resident
    assert store.pages_to_acquire(1) == 3


def test_acquire_release_contiguous_from_top():
    pool, _, store = make(10)
    store.register(1, 3)
    assert store.acquire(1) is True
    assert store.acquire(1) is False  # already resident
    assert store.pages(1) == [7, 8, 9] and store.is_contiguous(1)
    assert store.refcount(1) == 2 and store.loads == 1 and store.pages_to_acquire(1) == 0
    assert pool.owner_of(8) == ("adapter", 1) and pool.pages_used("adapter") == 3
    store.release(1)
    store.release(1)
    with pytest.raises(ValueError):
        store.release(1)
    assert store.is_resident(1) and store.evictable_pages() == 3
    assert store.evictable_pages(exclude=1) == 0
    store.check_integrity()


def test_lru_eviction_order():
    pool, _, store = make(10)
    for uid in (1, 2, 3, 4):
        store.register(uid, 3)
    for uid in (1, 2, 3):
        store.acquire(uid)
        store.release(uid)
    store.acquire(1)  # touch 1: LRU order is now 2, 3, 1
    store.release(1)
    assert store.resident_uids() == [2, 3, 1] and pool.num_free == 1
    assert store.acquire(4) is True
    assert not store.is_resident(2) and store.is_resident(3) and store.is_resident(1)
    assert store.evictions == 1 and store.pages(4) == [4, 5, 6]  # 2's former run
    store.acquire(2)  # evicts 3 (LRU idle), not 4 (held)
    assert not store.is_resident(3) and store.is_resident(1) and store.evictions == 2
    assert store.pages(2) == [1, 2, 3] and store.resident_uids() == [1, 4, 2]
    store.check_integrity()


def test_refcounted_and_pinned_never_evicted():
    pool, kv, store = make(10)
    store.register(1, 3)
    store.register(2, 3)
    store.register(3, 5)
    store.acquire(1)  # held: [7, 8, 9]
    assert store.pin(2) is True and store.pin(2) is False and store.is_pinned(2)
    assert store.pages(2) == [4, 5, 6] and store.evictable_pages() == 0
    before = (owners(pool), store.resident_uids(), store.loads, store.evictions)
    with pytest.raises(PoolExhausted, match="5 pages for adapter 3, 4 free"):
        store.acquire(3)
    assert store.make_room(5) is False
    assert (owners(pool), store.resident_uids(), store.loads, store.evictions) == before
    assert store.refcount(3) == 0 and not store.is_resident(3)
    store.release(1)
    assert store.acquire(3) is True  # evicts 1 (idle), never 2 (pinned)
    assert not store.is_resident(1) and store.is_resident(2) and store.evictions == 1
    assert store.pages(3) == [0, 1, 2, 3, 7] and not store.is_contiguous(3)  # no run of 5
    check_all(pool, kv, store)


def test_pin_unpin_then_evictable():
    _, _, store = make(6)
    store.register(1, 3)
    store.register(2, 4)
    store.pin(1)
    assert store.refcount(1) == 0 and store.evictable_pages() == 0
    with pytest.raises(PoolExhausted):
        store.acquire(2)
    store.unpin(1)
    with pytest.raises(ValueError):
        store.unpin(1)
    assert store.evictable_pages() == 3 and store.is_resident(1)
    assert store.acquire(2) is True and not store.is_resident(1) and store.evictions == 1


def test_unregister():
    pool, _, store = make(8)
    store.register(1, 3)
    store.register(2, 2)
    store.acquire(1)
    store.pin(2)
    with pytest.raises(RuntimeError):
        store.unregister(1)
    assert store.is_registered(1) and pool.num_free == 3
    store.release(1)
    store.unregister(1)
    store.unregister(2)  # pinned but idle: allowed
    assert pool.num_free == 8 and store.num_registered == 0 and store.num_resident == 0
    assert store.evictions == 0
    store.register(1, 8)  # the uid is free again
    assert store.acquire(1) and store.pages(1) == list(range(8))
    store.check_integrity()


def test_scattered_fallback_when_no_run():
    pool, kv, store = make(8, 1)
    for s in range(8):
        kv.ensure(s, 1)  # seq s holds page s
    for s in (1, 3, 4, 6):
        kv.free(s)
    store.register(1, 3)
    assert store.acquire(1) is True
    assert store.pages(1) == [1, 3, 4] and not store.is_contiguous(1)
    check_all(pool, kv, store)


def test_make_room():
    pool, kv, store = make(10)
    for uid in (1, 2, 3):
        store.register(uid, 3)
        store.acquire(uid)
        store.release(uid)
    store.acquire(3)  # held
    assert pool.num_free == 1 and store.evictable_pages() == 6
    assert store.make_room(8) is False and store.num_resident == 3  # unreachable: evict nothing
    assert store.make_room(1) is True and store.evictions == 0
    assert store.make_room(4, exclude=1) is True
    assert store.is_resident(1) and not store.is_resident(2) and pool.num_free == 4
    assert store.make_room(7) is True and store.num_resident == 1 and store.evictions == 2
    check_all(pool, kv, store)


def test_evict_explicit():
    _, _, store = make(8)
    store.register(1, 2)
    assert store.evict(1) is False
    store.acquire(1)
    with pytest.raises(ValueError):
        store.evict(1)
    store.release(1)
    assert store.evict(1) is True and not store.is_resident(1) and store.evictions == 1


def test_store_and_check_all_detect_corruption():
    pool, kv, store = make(8)
    store.register(1, 2)
    store.acquire(1)
    check_all(pool, kv, store)
    store._entries[1].refcount = -1
    with pytest.raises(IntegrityError, match="refcount -1"):
        store.check_integrity()
    store._entries[1].refcount = 1
    pool.alloc(1, "adapter", 5)  # adapter pages nobody holds
    with pytest.raises(IntegrityError, match="3 adapter pages"):
        check_all(pool, kv, store)
    with pytest.raises(IntegrityError, match="share"):
        check_all(PagePool(8), kv, store)
