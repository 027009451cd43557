"""Tests of memory/: page pool, KV block tables, adapter residency (LRU, refcounts, pins)."""

from __future__ import annotations

import random
import time

import pytest

from memory import (
    AdapterStore,
    IntegrityError,
    KVCacheManager,
    PagePool,
    PoolExhausted,
    check_all,
)


def make(num_pages: int = 16, block_size: int = 4):
    pool = PagePool(num_pages)
    return pool, KVCacheManager(pool, block_size), AdapterStore(pool)


def owners(pool: PagePool) -> list:
    return [pool.owner_of(p) for p in range(pool.num_pages)]


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


# -- seeded random operations against a shadow model ------------------------------------------


def snapshot(pool, kv, store):
    res = {u: store.pages(u) for u in store.resident_uids()}
    tables = {s: list(kv.table(s)) for s in kv.seq_ids()}
    counts = (store.loads, store.evictions, store.num_registered)
    return owners(pool), pool.num_free, tables, res, store.resident_uids(), counts


class Shadow:
    """Independent model of which adapters are held/pinned and of the LRU order."""

    def __init__(self, store: AdapterStore):
        self.store = store
        self.refs: dict[int, int] = {}
        self.pinned: set[int] = set()
        self.lru: list[int] = []  # resident uids, least recent first

    def touch(self, uid):
        if uid in self.lru:
            self.lru.remove(uid)
        self.lru.append(uid)

    def idle(self, uid):
        return self.refs.get(uid, 0) == 0 and uid not in self.pinned

    def expected_evictions(self, need_free, free, exclude=None):
        """The LRU prefix of idle adapters evicted to reach need_free, or None if unreachable."""
        out = []
        for u in self.lru:
            if free >= need_free:
                break
            if u != exclude and self.idle(u):
                out.append(u)
                free += self.store.num_pages(u)
        return out if free >= need_free else None


def _load(pool, kv, store, sh, uid, op):
    """acquire or pin ``uid``, checking success/failure and the evicted set against the shadow."""
    resident = store.is_resident(uid)
    need = 0 if resident else store.num_pages(uid)
    expect = sh.expected_evictions(need, pool.num_free, exclude=uid)
    before = snapshot(pool, kv, store)
    if expect is None:
        with pytest.raises(PoolExhausted):
            getattr(store, op)(uid)
        assert snapshot(pool, kv, store) == before
        return "exhausted"
    prev = set(sh.lru)
    assert getattr(store, op)(uid) is (not resident)
    evicted = prev - set(store.resident_uids())
    assert evicted == set(expect)
    sh.lru = [u for u in sh.lru if u not in evicted]
    sh.touch(uid)
    if op == "acquire":
        sh.refs[uid] = sh.refs.get(uid, 0) + 1
    else:
        sh.pinned.add(uid)
    return "scattered" if not store.is_contiguous(uid) else "ok"


@pytest.mark.parametrize("seed", range(6))
def test_random_ops_keep_integrity(seed):
    rng = random.Random(seed)
    pool, kv, store = make(rng.randint(24, 64), rng.choice([1, 2, 4]))
    sh = Shadow(store)
    tokens: dict[int, int] = {}
    next_uid, next_seq = 0, 0
    stats = {"exhausted": 0, "scattered": 0, "ok": 0}
    for _ in range(12):
        store.register(next_uid, rng.randint(1, pool.num_pages // 3))
        next_uid += 1
    ops = ["grow", "grow", "free_seq", "acquire", "acquire", "release", "release", "pin",
           "unpin", "make_room", "unregister", "register", "huge"]  # fmt: skip
    for _ in range(2000):
        op = rng.choice(ops)
        uids = list(range(next_uid))
        uid = rng.choice(uids) if uids else None
        if op == "grow":
            if tokens and rng.random() < 0.7:
                seq = rng.choice(list(tokens))
            else:
                seq, next_seq = next_seq, next_seq + 1
            want = tokens.get(seq, 0) + rng.randint(1, 12)
            old = list(kv.table(seq)) if kv.has(seq) else None
            extra = kv.blocks_for(want) - len(old or [])
            before = snapshot(pool, kv, store)
            if extra > pool.num_free:
                with pytest.raises(PoolExhausted):
                    kv.ensure(seq, want)
                assert snapshot(pool, kv, store) == before
                stats["exhausted"] += 1
            else:
                kv.ensure(seq, want)
                tokens[seq] = want
                assert kv.table(seq)[: len(old or [])] == (old or [])
                assert len(kv.table(seq)) == kv.blocks_for(want)
        elif op == "huge":
            seq = rng.choice(list(tokens)) if tokens else 0
            before = snapshot(pool, kv, store)
            with pytest.raises(PoolExhausted):
                kv.ensure(seq, (pool.num_pages + 1) * kv.block_size)
            assert snapshot(pool, kv, store) == before
        elif op == "free_seq" and tokens:
            seq = rng.choice(list(tokens))
            n, free0 = len(kv.table(seq)), pool.num_free
            kv.free(seq)
            del tokens[seq]
            assert pool.num_free == free0 + n and not kv.has(seq)
        elif op in ("acquire", "pin") and uid is not None and store.is_registered(uid):
            stats[_load(pool, kv, store, sh, uid, op)] += 1
        elif op == "release" and any(sh.refs.values()):
            u = rng.choice([u for u, r in sh.refs.items() if r > 0])
            store.release(u)
            sh.refs[u] -= 1
            sh.touch(u)
        elif op == "unpin" and sh.pinned:
            u = rng.choice(sorted(sh.pinned))
            store.unpin(u)
            sh.pinned.discard(u)
        elif op == "make_room":
            n = rng.randint(0, pool.num_pages)
            expect = sh.expected_evictions(n, pool.num_free)
            prev = set(sh.lru)
            assert store.make_room(n) is (expect is not None)
            evicted = prev - set(store.resident_uids())
            assert evicted == set(expect or [])
            sh.lru = [u for u in sh.lru if u not in evicted]
        elif op == "unregister" and uid is not None and store.is_registered(uid):
            if sh.refs.get(uid, 0) > 0:
                before = snapshot(pool, kv, store)
                with pytest.raises(RuntimeError):
                    store.unregister(uid)
                assert snapshot(pool, kv, store) == before
            else:
                held = store.num_pages(uid) if store.is_resident(uid) else 0
                free0 = pool.num_free
                store.unregister(uid)
                assert pool.num_free == free0 + held and not store.is_registered(uid)
                sh.pinned.discard(uid)
                sh.lru = [u for u in sh.lru if u != uid]
        elif op == "register":
            store.register(next_uid, rng.randint(1, pool.num_pages // 2))
            next_uid += 1
        check_all(pool, kv, store)
        # Held and pinned adapters are always resident; the store's LRU order is the shadow's.
        for u, r in sh.refs.items():
            assert store.refcount(u) == r if store.is_registered(u) else r == 0
            assert r == 0 or store.is_resident(u)
        assert all(store.is_resident(u) for u in sh.pinned)
        assert store.resident_uids() == sh.lru
    assert stats["exhausted"] > 0 and stats["ok"] > 0 and stats["scattered"] > 0
