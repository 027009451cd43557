"""Tests of memory/: seeded random allocate/free/load/evict sequences against a shadow model,
integrity checked after every operation."""

from __future__ import annotations

import random

import pytest
from memory_helpers import make, owners

from loraplex.memory.adapter_store import AdapterStore
from loraplex.memory.integrity import check_all
from loraplex.memory.pool import PoolExhausted

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
