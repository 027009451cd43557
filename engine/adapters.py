"""Adapters by name: validated host copies, pool residency, and per-step weight views.

`adapter_id` (a name) maps to the `adapter_uid` of its current load; every load gets a fresh uid
so a reload under the same name never sees state of the old weights. The host copy of each
adapter is its packed blob (kernels.lora layout) in the model dtype, so making it resident is
one copy into its pool pages.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from loraplex.engine.adapter_loader import load_adapter
from loraplex.engine.loader import ModelSpec
from loraplex.kernels.lora import GroupViews, LoRALayout, blob_views, lora_layout, pack_blob
from loraplex.memory.adapter_store import AdapterStore

logger = logging.getLogger(__name__)


class UnknownAdapterError(KeyError):
    """A request named an adapter that is not registered (never served by the base model)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    uid: int
    path: str
    rank: int
    alpha: float
    scale: float
    target_modules: tuple[str, ...]
    num_bytes: int
    num_pages: int


@dataclass(frozen=True)
class PreparedAdapter:
    """A validated, packed adapter not yet registered (see `AdapterRegistry.prepare`)."""

    name: str
    path: str
    rank: int
    alpha: float
    scale: float
    target_modules: tuple[str, ...]
    layout: LoRALayout
    blob: torch.Tensor  # [layout.num_elems] model dtype, host memory
    num_pages: int


@dataclass
class _HostAdapter:
    info: AdapterInfo
    layout: LoRALayout
    blob: torch.Tensor  # [layout.num_elems] model dtype, host memory


class AdapterRegistry:
    def __init__(
        self,
        spec: ModelSpec,
        store: AdapterStore,
        pool: torch.Tensor,
        max_lora_rank: int,
    ) -> None:
        """`pool` is the unified pool tensor [num_pages, page_elems]."""
        self.spec = spec
        self.store = store
        self.pool = pool
        self.flat = pool.view(-1)
        self.page_elems = pool.shape[1]
        self.max_lora_rank = max_lora_rank
        self.module_dims = {
            m: spec.module_dims(m)
            for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        }
        self._uids = itertools.count(1)
        self.by_name: dict[str, int] = {}
        self.host: dict[int, _HostAdapter] = {}
        self._views: dict[int, list[dict[str, GroupViews]]] = {}

    def prepare(self, name: str, path: str) -> PreparedAdapter:
        """Read, validate and pack an adapter's files. Touches no registry or pool state, so it
        may run on any thread while the engine keeps stepping. AdapterError (a ValueError) with
        the reason if the files are bad."""
        weights = load_adapter(name, path, self.spec, self.max_lora_rank)
        layout = lora_layout(
            weights.rank, weights.target_modules, self.spec.num_layers, self.module_dims
        )
        num_pages = -(-layout.num_elems // self.page_elems)
        if num_pages > self.store.pool.num_pages:
            raise ValueError(
                f"adapter '{name}': needs {num_pages} pool pages but the pool has only "
                f"{self.store.pool.num_pages}; raise --pool-bytes"
            )
        blob = torch.empty(layout.num_elems, dtype=self.pool.dtype)
        pack_blob(layout, weights.A, weights.B, blob)
        weights.A.clear()  # the float32 copies go now: only the packed blob stays in memory
        weights.B.clear()
        if self.pool.is_cuda:
            blob = blob.pin_memory()
        return PreparedAdapter(
            name=name,
            path=str(path),
            rank=weights.rank,
            alpha=weights.alpha,
            scale=weights.scale,
            target_modules=weights.target_modules,
            layout=layout,
            blob=blob,
            num_pages=num_pages,
        )

    def register(
        self, prepared: PreparedAdapter, *, pinned: bool = False, quiet: bool = False
    ) -> AdapterInfo:
        """Make a prepared adapter usable under its name (host tier; device on first use).
        Cheap: no file I/O. ValueError if the name is taken (nothing registered then).
        `quiet`: its log line at DEBUG (bulk registration logs one summary line instead)."""
        p = prepared
        if p.name in self.by_name:
            raise ValueError(f"adapter '{p.name}': a loaded adapter already has this name")
        uid = next(self._uids)
        info = AdapterInfo(
            name=p.name,
            uid=uid,
            path=p.path,
            rank=p.rank,
            alpha=p.alpha,
            scale=p.scale,
            target_modules=p.target_modules,
            num_bytes=p.blob.numel() * p.blob.element_size(),
            num_pages=p.num_pages,
        )
        self.store.register(uid, p.num_pages, payload=None)
        self.host[uid] = _HostAdapter(info, p.layout, p.blob)
        self.by_name[p.name] = uid
        if pinned and self.store.pin(uid):
            self.write(uid)
        logger.log(
            logging.DEBUG if quiet else logging.INFO,
            "adapter %s: rank %d, %d bytes, %d pages",
            p.name,
            p.rank,
            info.num_bytes,
            p.num_pages,
        )
        return info

    def add(self, name: str, path: str, *, pinned: bool = False) -> AdapterInfo:
        """`prepare` then `register`: load, validate and register an adapter."""
        if name in self.by_name:  # fail before reading any file
            raise ValueError(f"adapter '{name}': a loaded adapter already has this name")
        return self.register(self.prepare(name, path), pinned=pinned)

    def remove(self, name: str) -> None:
        """Forget an adapter and free its host and pool memory. RuntimeError while in use."""
        uid = self.uid_of(name)
        self.store.unregister(uid)
        del self.by_name[name]
        del self.host[uid]
        self._views.pop(uid, None)

    def uid_of(self, name: str) -> int:
        try:
            return self.by_name[name]
        except KeyError:
            raise UnknownAdapterError(f"adapter '{name}' does not exist") from None

    def info(self, uid: int) -> AdapterInfo:
        return self.host[uid].info

    def layout(self, uid: int) -> LoRALayout:
        return self.host[uid].layout

    def list(self) -> list[AdapterInfo]:
        return [self.host[uid].info for uid in self.by_name.values()]

    def write(self, uid: int) -> None:
        """Copy the host blob into the adapter's (just allocated) pool pages."""
        h = self.host[uid]
        pages = self.store.pages(uid)
        pe, n = self.page_elems, h.layout.num_elems
        if len(self._views) > 2 * self.store.num_resident + 64:
            # Views of evicted adapters: keep only resident ones (amortized O(1) per write), so
            # this cache grows with the pool, not with the adapters ever used.
            self._views = {u: v for u, v in self._views.items() if self.store.is_resident(u)}
        if self.store.is_contiguous(uid):
            self.flat[pages[0] * pe : pages[0] * pe + n].copy_(h.blob, non_blocking=True)
            self._views[uid] = blob_views(h.layout, self.flat[pages[0] * pe : pages[0] * pe + n])
        else:
            for i, page in enumerate(pages):
                chunk = h.blob[i * pe : (i + 1) * pe]
                self.pool[page, : chunk.numel()].copy_(chunk, non_blocking=True)
            if self.pool.device.type == "cpu":
                # On the CPU the host blob is in the same memory, holds the same weights and is
                # contiguous: the kernels read it in place. Gathering the scattered pages into
                # a fresh copy every step cost 0.7x throughput once evictions had fragmented
                # the pool (bench serve, 2048 adapters). The pages stay charged and written.
                self._views[uid] = blob_views(h.layout, h.blob)
            else:
                self._views.pop(uid, None)

    def lasting_views(self, uid: int, views: list[dict[str, GroupViews]]) -> bool:
        """Whether `views` (from `views(uid)`) stay valid while the adapter stays resident:
        views into contiguous pages or the host blob do; a gathered copy of scattered pages,
        fresh each call, does not, and nobody should keep it (a second copy of the weights)."""
        return self._views.get(uid) is views

    def views(self, uid: int) -> list[dict[str, GroupViews]]:
        """Per-layer weight views of a resident adapter. Contiguous pages: views straight into
        the pool. Scattered pages: on the CPU, views into the host blob (see `write`); on a
        GPU, one gather into a contiguous copy (this step only; Triton reads pages in place)."""
        cached = self._views.get(uid)
        if cached is not None:
            return cached
        h = self.host[uid]
        blob = self.pool[self.store.pages(uid)].reshape(-1)[: h.layout.num_elems]
        return blob_views(h.layout, blob)
