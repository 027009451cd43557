"""Tests of memory/: the page pool and KV block tables."""

from __future__ import annotations

import time

import pytest
from memory_helpers import make, owners

from loraplex.memory.adapter_store import AdapterStore
from loraplex.memory.integrity import check_all
from loraplex.memory.kv_cache import KVCacheManager
from loraplex.memory.pool import IntegrityError, PagePool, PoolExhausted

# -- PagePool ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3])
def test_pool_rejects_bad_size(bad):
    with pytest.raises(ValueError):
        PagePool(bad)


def test_alloc_lowest_first_and_reuse():
    pool = PagePool(8)
    assert pool.alloc(3, "kv", 1) == [0, 1, 2]
    assert pool.alloc(0, "kv", 1) == []
    assert pool.num_free == 5 and pool.pages_used("kv") == 3 and pool.pages_used("adapter") == 0
    pool.free([1], "kv", 1)
    assert pool.alloc(2, "kv", 2) == [1, 3]
    assert pool.owner_of(1) == ("kv", 2) and pool.owner_of(0) == ("kv", 1)
    assert pool.owner_of(7) is None and pool.is_free(7)
    pool.check_integrity()


def test_alloc_exhaustion_leaves_state_unchanged():
    pool = PagePool(6)
    pool.alloc(4, "kv", 1)
    before = (owners(pool), pool.num_free, pool.pages_used("kv"))
    with pytest.raises(PoolExhausted, match="asked for 3 pages, 2 free") as ei:
        pool.alloc(3, "kv", 2)
    assert (ei.value.asked, ei.value.free) == (3, 2)
    assert (owners(pool), pool.num_free, pool.pages_used("kv")) == before
    pool.check_integrity()


def test_bad_kind_and_negative_count():
    pool = PagePool(4)
    with pytest.raises(ValueError):
        pool.alloc(1, "weights", 1)
    with pytest.raises(ValueError):
        pool.pages_used("nope")
    with pytest.raises(ValueError):
        pool.alloc(-1, "kv", 1)
    with pytest.raises(ValueError):
        pool.owner_of(4)
    assert pool.num_free == 4


def test_alloc_run_from_the_top():
    pool = PagePool(10)
    assert pool.alloc_run(3, "adapter", 7) == [7, 8, 9]
    assert pool.alloc_run(2, "adapter", 8) == [5, 6]
    assert pool.pages_used("adapter") == 5
    # KV still takes the lowest ids, skipping the stale heap entries of run pages.
    assert pool.alloc(5, "kv", 1) == [0, 1, 2, 3, 4]
    with pytest.raises(PoolExhausted):
        pool.alloc(1, "kv", 1)
    pool.free([8], "adapter", 7)
    assert pool.alloc(1, "kv", 2) == [8]
    pool.check_integrity()


def test_alloc_run_picks_highest_run_that_fits():
    pool = PagePool(10)
    pool.alloc(10, "kv", 1)
    pool.free([0, 1, 2, 3, 8], "kv", 1)  # free runs: [0..3] and [8]
    assert pool.alloc_run(2, "adapter", 5) == [2, 3]
    assert pool.alloc_run(1, "adapter", 6) == [8]
    assert pool.alloc_run(3, "adapter", 7) is None
    pool.check_integrity()


def test_alloc_run_none_on_fragmentation_state_unchanged():
    pool = PagePool(8)
    pool.alloc(8, "kv", 1)
    pool.free([0, 2, 4, 6], "kv", 1)
    before = (owners(pool), pool.num_free)
    assert pool.alloc_run(2, "adapter", 3) is None
    assert pool.alloc_run(5, "adapter", 3) is None  # more than free
    assert (owners(pool), pool.num_free) == before
    assert pool.alloc_run(1, "adapter", 3) == [6]
    with pytest.raises(ValueError):
        pool.alloc_run(0, "adapter", 3)
    pool.check_integrity()


def test_free_errors_free_nothing():
    pool = PagePool(8)
    a = pool.alloc(3, "kv", 1)
    pool.alloc_run(2, "adapter", 9)
    before = (owners(pool), pool.num_free)
    with pytest.raises(ValueError, match="page 6"):
        pool.free([0, 6], "kv", 1)  # page 6 belongs to the adapter
    with pytest.raises(ValueError, match="page 2"):
        pool.free([2], "kv", 2)  # wrong owner
    with pytest.raises(ValueError, match="page 2"):
        pool.free([2], "adapter", 1)  # wrong kind
    with pytest.raises(ValueError, match="page 1 listed twice"):
        pool.free([1, 1], "kv", 1)
    with pytest.raises(ValueError, match="page 8"):
        pool.free([0, 8], "kv", 1)
    assert (owners(pool), pool.num_free) == before
    pool.free(a, "kv", 1)
    with pytest.raises(ValueError, match="page 0"):
        pool.free([0], "kv", 1)  # double free
    assert pool.num_free == 6
    pool.check_integrity()


def test_pool_integrity_detects_corruption():
    pool = PagePool(8)
    pool.alloc(2, "kv", 1)
    pool.check_integrity()
    pool._used["kv"] = 3
    with pytest.raises(IntegrityError, match="3"):
        pool.check_integrity()
    pool._used["kv"] = 2
    pool._free_flags[5] = 0  # a "used" page without owner
    with pytest.raises(IntegrityError, match="page 5"):
        pool.check_integrity()


def test_large_pool_is_fast():
    n = 100_000
    pool = PagePool(n)
    t0 = time.perf_counter()
    pool.alloc(n, "kv", 1)
    pool.free(list(range(0, n, 2)), "kv", 1)  # 50k runs of length 1
    assert pool.alloc_run(2, "adapter", 2) is None
    assert pool.alloc_run(1, "adapter", 2) == [n - 2]
    assert pool.alloc(3, "kv", 3) == [0, 2, 4]
    assert time.perf_counter() - t0 < 5.0
    pool.check_integrity()


# -- KVCacheManager ---------------------------------------------------------------------------


def test_blocks_for_and_extra_blocks():
    _, kv, _ = make(16, 4)
    assert [kv.blocks_for(t) for t in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert kv.extra_blocks_needed(1, 9) == 3
    assert kv.num_seqs == 0  # asking does not create a table
    kv.ensure(1, 5)
    assert kv.extra_blocks_needed(1, 9) == 1 and kv.extra_blocks_needed(1, 3) == 0
    with pytest.raises(ValueError):
        kv.blocks_for(-1)
    with pytest.raises(ValueError):
        KVCacheManager(PagePool(2), 0)


def test_table_is_live_and_grows_in_place():
    pool, kv, _ = make(16, 4)
    t = kv.table(7)
    assert t == [] and kv.table(7) is t and kv.num_seqs == 1
    kv.ensure(7, 6)
    kv.ensure(8, 1)
    kv.ensure(7, 9)
    assert kv.table(7) is t and t == [0, 1, 3] and kv.table(8) == [2]
    kv.ensure(7, 2)  # never shrinks
    assert t == [0, 1, 3] and kv.capacity(7) == 12 and kv.pages_used == 4
    assert pool.owner_of(3) == ("kv", 7)
    kv.check_integrity()


def test_ensure_exhaustion_leaves_state_unchanged():
    pool, kv, _ = make(4, 2)
    kv.ensure(1, 5)  # 3 pages
    before = (owners(pool), list(kv.table(1)), kv.num_seqs)
    with pytest.raises(PoolExhausted, match="asked for 2 pages, 1 free"):
        kv.ensure(2, 3)
    with pytest.raises(PoolExhausted):
        kv.ensure(1, 9)
    assert (owners(pool), list(kv.table(1)), kv.num_seqs) == before
    assert not kv.has(2)
    kv.check_integrity()


def test_kv_free():
    pool, kv, _ = make(8, 4)
    kv.ensure(1, 8)
    kv.ensure(2, 4)
    t1 = kv.table(1)
    kv.free(1)
    assert t1 == [] and not kv.has(1) and kv.num_seqs == 1 and pool.num_free == 7
    kv.free(1)  # unknown: no-op
    kv.free(99)
    assert pool.num_free == 7 and kv.table(2) == [2]
    kv.check_integrity()


def test_kv_integrity_detects_corruption():
    pool, kv, _ = make(8, 4)
    kv.ensure(1, 4)
    kv.ensure(2, 4)
    kv.table(2).append(kv.table(1)[0])
    with pytest.raises(IntegrityError, match="page 0"):
        kv.check_integrity()
    kv.table(2).pop()
    pool.alloc(1, "kv", 3)  # a kv page no table knows about
    with pytest.raises(IntegrityError, match="3 kv pages but tables hold 2"):
        kv.check_integrity()


def test_training_pages_reserve_all_or_nothing_and_release_everything():
    from loraplex.memory.train_pages import TrainingPages

    pool = PagePool(20)
    kv = KVCacheManager(pool, block_size=4)
    store = AdapterStore(pool)
    train = TrainingPages(pool)
    kv.ensure(1, 8)  # pages 0, 1
    res = train.reserve(7, state_pages=4, activation_pages=3)
    assert res.state == [16, 17, 18, 19] and res.activation == [2, 3, 4]
    check_all(pool, kv, store, train)
    with pytest.raises(ValueError, match="already holds"):
        train.reserve(7, 1, 0)
    with pytest.raises(PoolExhausted):
        train.reserve(8, 10, 5)  # 15 > 11 free
    # pages 5 and 10 taken, 6-9 and 11-15 free: 9 free pages but no run of 6
    pool.alloc(6, "kv", 99)  # pages 5-10
    pool.free([6, 7, 8, 9], "kv", 99)
    before = pool.num_free
    with pytest.raises(PoolExhausted, match="fragmented"):
        train.reserve(8, 6, 0)
    assert pool.num_free == before == 9 and train.jobs() == [7]
    pool.free([5, 10], "kv", 99)
    assert sorted(train.release(7)) == [2, 3, 4, 16, 17, 18, 19]
    assert pool.pages_used("train") == 0 and train.pages_used == 0
    train.check_integrity()
    # a page taken from a reservation behind its back is found
    res = train.reserve(3, 2, 1)
    pool.free(res.activation, "train", 3)
    with pytest.raises(IntegrityError, match=r"job 3: page \d+ is owned by None"):
        train.check_integrity()
