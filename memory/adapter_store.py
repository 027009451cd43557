"""Registered adapters and their device residency in pages of the shared pool.

Any number of adapters (thousands) may be registered, each with its page count (see
``memory/pool.py`` for how the count follows from the rank) and an opaque host ``payload`` (the
engine keeps the host tensors there). Only some are resident in pool pages at a time. Resident
adapters form an LRU; an adapter with a reference count > 0 (used by a running sequence) or
pinned is never evicted. Pages are owned in the pool by ``("adapter", uid)``.

Unknown uids raise KeyError everywhere except :meth:`AdapterStore.is_registered` and
:meth:`AdapterStore.is_resident`, which return False.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from loraplex.memory.pool import IntegrityError, PagePool, PoolExhausted

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    num_pages: int
    payload: object
    pages: list[int] | None = None  # None when not resident
    refcount: int = 0
    pinned: bool = False


class AdapterStore:
    """Host-registered adapters (any number: thousands) and their device residency in pool pages.

    The device-resident set is LRU with reference counts: an adapter with refcount > 0 (used by a
    running sequence) or pinned is never evicted. owner in the pool = uid.
    """

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self._entries: dict[int, _Entry] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident uids, least recent first
        self.loads = 0
        self.evictions = 0
        # Pages of resident, idle (refcount 0), unpinned adapters: kept up to date on every
        # change so that admission asks "how much could be evicted?" in O(1).
        self._idle_pages = 0
        # Pages of pinned adapters (pinned implies resident), for the per-request check in O(1).
        self._pinned_pages = 0

    # -- registry ---------------------------------------------------------------------------

    def register(self, uid: int, num_pages: int, payload: object = None) -> None:
        """Register ``uid`` needing ``num_pages`` pages when resident. Not made resident.

        ValueError if ``uid`` is known, ``num_pages < 1`` or ``num_pages > pool.num_pages``.
        """
        if uid in self._entries:
            raise ValueError(f"adapter uid {uid} is already registered")
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"adapter {uid}: num_pages must be an int >= 1, got {num_pages!r}")
        if num_pages > self.pool.num_pages:
            raise ValueError(
                f"adapter {uid} needs {num_pages} pages but the pool has {self.pool.num_pages}"
            )
        self._entries[uid] = _Entry(num_pages, payload)

    def unregister(self, uid: int) -> None:
        """Forget ``uid``, freeing its pages if resident (pinned or not).

        RuntimeError (nothing changed) if its refcount is > 0.
        """
        e = self._get(uid)
        if e.refcount > 0:
            raise RuntimeError(f"adapter {uid} is in use (refcount {e.refcount})")
        if e.pages is not None:
            self._drop(uid, e)
        del self._entries[uid]

    def is_registered(self, uid: int) -> bool:
        return uid in self._entries

    def is_resident(self, uid: int) -> bool:
        e = self._entries.get(uid)
        return e is not None and e.pages is not None

    def num_pages(self, uid: int) -> int:
        return self._get(uid).num_pages

    def payload(self, uid: int) -> object:
        return self._get(uid).payload

    def refcount(self, uid: int) -> int:
        return self._get(uid).refcount

    def is_pinned(self, uid: int) -> bool:
        return self._get(uid).pinned

    def pages(self, uid: int) -> list[int]:
        """A copy of the resident pages of ``uid`` in blob order; ValueError if not resident."""
        e = self._get(uid)
        if e.pages is None:
            raise ValueError(f"adapter {uid} is not resident")
        return list(e.pages)

    def is_contiguous(self, uid: int) -> bool:
        """Whether the resident pages of ``uid`` form one ascending run (ValueError if not
        resident)."""
        pages = self.pages(uid)
        return pages == list(range(pages[0], pages[0] + len(pages)))

    @property
    def num_registered(self) -> int:
        return len(self._entries)

    @property
    def num_resident(self) -> int:
        return len(self._lru)

    def resident_uids(self) -> list[int]:
        """Resident uids, least recently used first."""
        return list(self._lru)

    # -- residency --------------------------------------------------------------------------

    def pages_to_acquire(self, uid: int) -> int:
        """Pages an :meth:`acquire` of ``uid`` would take from the pool: 0 if resident."""
        e = self._get(uid)
        return 0 if e.pages is not None else e.num_pages

    def can_acquire(self, uid: int) -> bool:
        """Whether :meth:`acquire` of ``uid`` would succeed now (possibly by evicting)."""
        need = self.pages_to_acquire(uid)
        return need == 0 or self.pool.num_free + self.evictable_pages(exclude=uid) >= need

    def acquire(self, uid: int) -> bool:
        """Make ``uid`` resident if needed, then refcount += 1 and mark it most recently used.

        Loading prefers a contiguous run (highest ids), else scattered pages (lowest ids); idle
        unpinned adapters are evicted in LRU order first if the pool lacks free pages. Returns
        True iff it was loaded just now (the caller then copies the weights into its pages).
        Raises PoolExhausted with all state unchanged if it cannot be made resident.
        """
        e = self._get(uid)
        before = self._idle(e)
        loaded = self._ensure_resident(uid, e)
        e.refcount += 1
        self._idle_pages += self._idle(e) - before
        self._lru.move_to_end(uid)
        return loaded

    def release(self, uid: int) -> None:
        """refcount -= 1 (ValueError if already 0). Stays resident, as most recently used."""
        e = self._get(uid)
        if e.refcount <= 0:
            raise ValueError(f"adapter {uid} released more often than acquired")
        before = self._idle(e)
        e.refcount -= 1
        self._idle_pages += self._idle(e) - before
        self._lru.move_to_end(uid)

    def pin(self, uid: int) -> bool:
        """Pin ``uid`` (never evicted), making it resident like :meth:`acquire` without a
        reference. Idempotent. Returns True iff it was loaded just now; PoolExhausted with state
        unchanged if it cannot be made resident."""
        e = self._get(uid)
        before = self._idle(e)
        loaded = self._ensure_resident(uid, e)
        if not e.pinned:
            self._pinned_pages += e.num_pages
        e.pinned = True
        self._idle_pages += self._idle(e) - before
        self._lru.move_to_end(uid)
        return loaded

    def unpin(self, uid: int) -> None:
        """Unpin ``uid`` (ValueError if not pinned). It stays resident until evicted."""
        e = self._get(uid)
        if not e.pinned:
            raise ValueError(f"adapter {uid} is not pinned")
        before = self._idle(e)
        e.pinned = False
        self._pinned_pages -= e.num_pages
        self._idle_pages += self._idle(e) - before

    def evictable_pages(self, exclude: int | None = None) -> int:
        """Pages held by resident, idle (refcount 0), unpinned adapters other than ``exclude``.
        O(1)."""
        e = self._entries.get(exclude) if exclude is not None else None
        return self._idle_pages - (self._idle(e) if e is not None else 0)

    def pinned_pages(self, exclude: int | None = None) -> int:
        """Pages held by pinned adapters other than ``exclude``: never available to anyone else.
        O(1) (asked once per request, whatever the number of registered adapters)."""
        e = self._entries.get(exclude) if exclude is not None else None
        return self._pinned_pages - (e.num_pages if e is not None and e.pinned else 0)

    def make_room(self, n_free: int, exclude: int | None = None) -> bool:
        """Evict idle unpinned adapters (not ``exclude``) in LRU order until
        ``pool.num_free >= n_free``. Returns success; evicts nothing if ``n_free`` is out of
        reach."""
        pool = self.pool
        if pool.num_free >= n_free:
            return True
        if pool.num_free + self.evictable_pages(exclude) < n_free:
            return False
        for uid in list(self._lru):
            if pool.num_free >= n_free:
                break
            e = self._entries[uid]
            if uid != exclude and e.refcount == 0 and not e.pinned:
                self._drop(uid, e)
                self.evictions += 1
                logger.debug("evicted adapter %d (%d pages)", uid, e.num_pages)
        return True

    def evict(self, uid: int) -> bool:
        """Evict ``uid`` now. False if it was not resident; ValueError if in use or pinned."""
        e = self._get(uid)
        if e.pages is None:
            return False
        if e.refcount > 0 or e.pinned:
            raise ValueError(f"adapter {uid} is in use or pinned; cannot evict")
        self._drop(uid, e)
        self.evictions += 1
        return True

    def check_integrity(self) -> None:
        """Raise IntegrityError unless resident pages are owned by ``("adapter", uid)``, the
        pool's adapter page count equals the sum over resident adapters, the LRU holds exactly
        the resident uids, refcounts are >= 0 and non-resident adapters are idle and unpinned."""
        total = 0
        seen: set[int] = set()
        resident = set()
        for uid, e in self._entries.items():
            if e.refcount < 0:
                raise IntegrityError(f"adapter {uid} has refcount {e.refcount}")
            if e.pages is None:
                if e.refcount or e.pinned:
                    raise IntegrityError(
                        f"adapter {uid} is not resident but refcount={e.refcount} pinned={e.pinned}"
                    )
                continue
            resident.add(uid)
            if len(e.pages) != e.num_pages:
                raise IntegrityError(
                    f"adapter {uid} holds {len(e.pages)} pages, needs {e.num_pages}"
                )
            for p in e.pages:
                if p in seen:
                    raise IntegrityError(f"page {p} held by two adapters (one is {uid})")
                seen.add(p)
                owner = self.pool.owner_of(p)
                if owner != ("adapter", uid):
                    raise IntegrityError(f"page {p} of adapter {uid} is owned by {owner}")
            total += len(e.pages)
        if resident != set(self._lru) or len(self._lru) != len(resident):
            raise IntegrityError(
                f"LRU has {len(self._lru)} uids but {len(resident)} adapters are resident"
            )
        pinned = sum(e.num_pages for e in self._entries.values() if e.pinned)
        if pinned != self._pinned_pages:
            raise IntegrityError(
                f"pinned-page counter says {self._pinned_pages}, pinned adapters hold {pinned}"
            )
        idle = sum(self._idle(e) for e in self._entries.values())
        if idle != self._idle_pages:
            raise IntegrityError(
                f"idle-page counter says {self._idle_pages}, resident idle adapters hold {idle}"
            )
        used = self.pool.pages_used("adapter")
        if used != total:
            raise IntegrityError(
                f"pool has {used} adapter pages but resident adapters hold {total}"
            )

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _idle(e: _Entry) -> int:
        """Pages `e` contributes to `_idle_pages`."""
        return e.num_pages if e.pages is not None and e.refcount == 0 and not e.pinned else 0

    def _get(self, uid: int) -> _Entry:
        e = self._entries.get(uid)
        if e is None:
            raise KeyError(f"adapter uid {uid} is not registered")
        return e

    def _ensure_resident(self, uid: int, e: _Entry) -> bool:
        if e.pages is not None:
            return False
        n = e.num_pages
        pool = self.pool
        if not self.make_room(n, exclude=uid):
            raise PoolExhausted(
                n,
                pool.num_free,
                f"pages for adapter {uid}",
                f" (+{self.evictable_pages(uid)} evictable)",
            )
        pages = pool.alloc_run(n, "adapter", uid)
        if pages is None:
            pages = pool.alloc(n, "adapter", uid)
        e.pages = pages
        self._lru[uid] = None
        self.loads += 1
        logger.debug("loaded adapter %d into %d pages starting at %d", uid, n, pages[0])
        return True

    def _drop(self, uid: int, e: _Entry) -> None:
        assert e.pages is not None
        self._idle_pages -= self._idle(e)
        if e.pinned:
            self._pinned_pages -= e.num_pages
        self.pool.free(e.pages, "adapter", uid)
        e.pages = None
        e.pinned = False
        del self._lru[uid]
