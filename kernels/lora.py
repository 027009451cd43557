"""Batched heterogeneous-rank LoRA: blob layout, batch metadata and the torch path.

The torch path is both the CPU fast path and the reference the Triton kernels are tested
against. It applies every adapter at its true rank to a contiguous segment of token rows (the
runner orders a batch by adapter, so no token permutation is needed) and never touches rows
without an adapter.

Blob layout (one load of one adapter, stored in unified-pool pages; offsets in elements):
for each layer, for each module group (in `GROUPS` order) that the adapter targets:
  A_cat  [n_targeted * r, in]      the targeted modules' A stacked (they share the group input)
  then for each targeted module m:  B_m^T [r, out_m]
so a group's shrink is one matmul and each expand writes straight into its slice of the fused
base output. Total elements = r * sum_m (in_m + out_m) * num_layers: proportional to the true
rank, no padding.

The Triton path (kernels/lora_triton.py) reads the same blobs in place through each adapter's
page table; its per-step metadata is `TritonLoRAMeta` (`build_triton_lora_meta`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Module groups: modules of one group share their input, and their outputs are slices of one
# fused base projection (qkv_proj = [q; k; v], gate_up_proj = [gate; up]).
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass(frozen=True)
class GroupLayout:
    """Where one (layer, group) of an adapter lives in its blob."""

    in_dim: int
    a_offset: int  # A_cat [len(modules) * rank, in_dim], row-major
    modules: tuple[str, ...]  # targeted modules of the group, canonical order
    b_offsets: tuple[int, ...]  # B_m^T [rank, out_m], row-major, one per module
    out_slices: tuple[tuple[int, int], ...]  # (lo, hi) of each module in the fused output


@dataclass(frozen=True)
class LoRALayout:
    rank: int
    num_elems: int
    layers: tuple[dict[str, GroupLayout], ...]  # per layer: group name -> layout


def lora_layout(
    rank: int,
    target_modules: tuple[str, ...] | list[str],
    num_layers: int,
    module_dims: dict[str, tuple[int, int]],
) -> LoRALayout:
    """Compute the blob layout. `module_dims[m] = (in_features, out_features)`."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    unknown = set(target_modules) - {m for ms in GROUPS.values() for m in ms}
    if unknown:
        raise ValueError(f"unsupported target modules {sorted(unknown)}")
    offset = 0
    layers = []
    for _ in range(num_layers):
        groups: dict[str, GroupLayout] = {}
        for gname, gmods in GROUPS.items():
            mods = tuple(m for m in gmods if m in target_modules)
            if not mods:
                continue
            in_dim = module_dims[mods[0]][0]
            a_offset = offset
            offset += len(mods) * rank * in_dim
            b_offsets, out_slices = [], []
            lo = 0
            for m in gmods:  # slices are positions in the fused output, targeted or not
                out = module_dims[m][1]
                if m in mods:
                    b_offsets.append(offset)
                    offset += rank * out
                    out_slices.append((lo, lo + out))
                lo += out
            groups[gname] = GroupLayout(in_dim, a_offset, mods, tuple(b_offsets), tuple(out_slices))
        layers.append(groups)
    return LoRALayout(rank=rank, num_elems=offset, layers=tuple(layers))


def pack_blob(
    layout: LoRALayout,
    A: dict[tuple[int, str], torch.Tensor],
    B: dict[tuple[int, str], torch.Tensor],
    out: torch.Tensor,
) -> None:
    """Write an adapter's A [r, in] / B [out, r] matrices into `out` (flat, >= num_elems)."""
    r = layout.rank
    for layer, groups in enumerate(layout.layers):
        for g in groups.values():
            a_rows = torch.cat([A[(layer, m)] for m in g.modules], dim=0)
            out[g.a_offset : g.a_offset + a_rows.numel()].copy_(a_rows.reshape(-1))
            for m, b_off in zip(g.modules, g.b_offsets, strict=True):
                bt = B[(layer, m)].t()  # [r, out]
                out[b_off : b_off + bt.numel()].copy_(bt.reshape(-1))
    assert all(A[k].shape[0] == r for k in A), "rank mismatch between layout and weights"


@dataclass
class GroupViews:
    """Views of one (layer, group) of one adapter, ready for matmul."""

    a_t: torch.Tensor  # [in, n*r] (transposed view of A_cat)
    b_t: tuple[torch.Tensor, ...]  # each [r, out_m]
    out_slices: tuple[tuple[int, int], ...]


def blob_views(layout: LoRALayout, blob: torch.Tensor) -> list[dict[str, GroupViews]]:
    """Per-layer views into a contiguous flat blob (no copies)."""
    r = layout.rank
    result = []
    for groups in layout.layers:
        views = {}
        for name, g in groups.items():
            n = len(g.modules) * r
            a = blob[g.a_offset : g.a_offset + n * g.in_dim].view(n, g.in_dim)
            bts = tuple(
                blob[off : off + r * (hi - lo)].view(r, hi - lo)
                for off, (lo, hi) in zip(g.b_offsets, g.out_slices, strict=True)
            )
            views[name] = GroupViews(a.t(), bts, g.out_slices)
        result.append(views)
    return result


@dataclass
class LoRASegment:
    """Token rows [start, end) of the batch use one adapter (batch slot `adapter_idx`)."""

    start: int
    end: int
    adapter_idx: int
    rank: int
    scale: float
    views: list[dict[str, GroupViews]]  # per layer


@dataclass
class LoRABatchMeta:
    """Per-step LoRA metadata, built once per step by the runner.

    `segments` cover only rows that use an adapter; rows outside every segment are base-only
    and are never touched. `has_lora` is the host-side flag that lets a base-only batch skip
    all LoRA work without looking at any tensor. `triton` is the device metadata of the Triton
    path (`build_triton_lora_meta`); None keeps the torch path alone (`segments` may then be
    empty on the Triton path: its chunks also set `has_lora`).
    """

    segments: list[LoRASegment]
    triton: TritonLoRAMeta | None = None

    @property
    def has_lora(self) -> bool:
        return bool(self.segments) or (self.triton is not None and self.triton.num_chunks > 0)


GROUP_INDEX = {name: i for i, name in enumerate(GROUPS)}
MAX_SLOTS = max(len(mods) for mods in GROUPS.values())  # modules per group (q, k, v)


@dataclass
class TritonLoRAMeta:
    """One step's metadata of the Triton LoRA kernels (kernels/lora_triton.py).

    Device tensors (all int32 but `scales`), A = adapters of the batch, L = layers, 4 = groups
    in `GROUPS` order, `MAX_SLOTS` = module slots of a group (position in `GROUPS[g]`):
      chunk_start/chunk_len/chunk_adapter [C]: rows [start, start + len) use adapter slot a;
          len <= `chunk`; chunks never span two adapters. Rows in no chunk are never touched.
      ranks [A]; scales [A] float32.
      page_table [A, max_pages]: element e of adapter a's blob is pool_flat[page_table[a,
          e // page_elems] * page_elems + e % page_elems] (padding entries are never read).
      offsets [A, L, 4, 1 + MAX_SLOTS]: blob offset of A_cat, then of B_s^T per slot; -1 absent.
      slot_cols [A, 4, MAX_SLOTS]: first column of slot s in the group's shrink output
          (its index among the adapter's targeted modules times the rank); -1 absent.
      group_cols [A, 4]: shrink width n_targeted * rank of each group (0 = not targeted).
      out_slices [4, MAX_SLOTS, 2]: (lo, width) of slot s in the group's fused output; width 0
          where no adapter of the batch targets the slot.
    pool: the unified pool, flat [num_pages * page_elems] view (the weights are read from it).
    Host ints size the launch grids without a device sync.
    """

    chunk_start: torch.Tensor
    chunk_len: torch.Tensor
    chunk_adapter: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    page_table: torch.Tensor
    offsets: torch.Tensor
    slot_cols: torch.Tensor
    group_cols: torch.Tensor
    out_slices: torch.Tensor
    pool: torch.Tensor
    num_chunks: int
    chunk: int
    page_elems: int
    num_layers: int
    max_cols: tuple[int, ...]  # per group: max over adapters of group_cols
    max_width: tuple[int, ...]  # per group: max slice width over targeted slots


def build_triton_lora_meta(
    segments: list[tuple[int, int, int]],
    adapters: list[tuple[int, float, LoRALayout, list[int]]],
    num_layers: int,
    page_elems: int,
    device: torch.device | str,
    *,
    pool: torch.Tensor,
    chunk: int = 16,
) -> TritonLoRAMeta:
    """Build the Triton LoRA metadata of one step (host work O(adapters + pages + chunks)).

    segments: (row_start, row_end, adapter_idx) of rows using adapters[adapter_idx], disjoint.
    adapters: (rank, scale, layout, pages) per batch slot; `pages` are the adapter's pool pages
    in blob order (any order of page ids). `pool` is the unified pool ([num_pages, page_elems]
    or flat) on `device`, in the model dtype. `chunk` (a power of two >= 16) is the kernels'
    BLOCK_M: longer segments are cut into chunks of at most `chunk` rows. All device tensors
    travel in one host-to-device copy.
    """
    flat = pool.view(-1)
    if pool.dim() == 2 and pool.shape[1] != page_elems:
        raise ValueError(f"pool pages hold {pool.shape[1]} elements, not {page_elems}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    A, G, S = len(adapters), len(GROUPS), MAX_SLOTS
    starts, lens, owner = [], [], []
    for lo, hi, idx in segments:
        if not 0 <= idx < A:
            raise ValueError(f"segment ({lo}, {hi}) names adapter {idx} of {A}")
        for s in range(lo, hi, chunk):
            starts.append(s)
            lens.append(min(chunk, hi - s))
            owner.append(idx)
    base = torch.full((A, G, 1 + S), -1, dtype=torch.int64)
    slot_cols = torch.full((A, G, S), -1, dtype=torch.int32)
    group_cols = torch.zeros(A, G, dtype=torch.int32)
    out_slices = torch.zeros(G, S, 2, dtype=torch.int32)
    layer_elems = torch.zeros(A, dtype=torch.int64)
    max_pages = max((len(a[3]) for a in adapters), default=0)
    table = torch.zeros(A, max(1, max_pages), dtype=torch.int32)
    for a, (rank, _, layout, pages) in enumerate(adapters):
        if layout.rank != rank or len(layout.layers) != num_layers:
            raise ValueError(f"adapter slot {a}: layout does not match rank {rank}/layers")
        if layout.num_elems >= 2**31 or len(pages) * page_elems < layout.num_elems:
            raise ValueError(f"adapter slot {a}: blob of {layout.num_elems} elements does not fit")
        layer_elems[a] = layout.num_elems // num_layers
        table[a, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for name, g in layout.layers[0].items():
            gi, gmods = GROUP_INDEX[name], GROUPS[name]
            base[a, gi, 0] = g.a_offset
            group_cols[a, gi] = len(g.modules) * rank
            for j, (m, b_off, (lo, hi)) in enumerate(
                zip(g.modules, g.b_offsets, g.out_slices, strict=True)
            ):
                s = gmods.index(m)
                base[a, gi, 1 + s] = b_off
                slot_cols[a, gi, s] = j * rank
                if out_slices[gi, s, 1] and out_slices[gi, s].tolist() != [lo, hi - lo]:
                    raise ValueError(f"{m}: output slice differs between adapters")
                out_slices[gi, s] = torch.tensor([lo, hi - lo])
    # Layers repeat the same groups (lora_layout), so layer l is layer 0 + l * layer_elems.
    shift = torch.arange(num_layers).view(1, -1, 1, 1) * layer_elems.view(-1, 1, 1, 1)
    offsets = torch.where(base.unsqueeze(1) < 0, -1, base.unsqueeze(1) + shift)
    host = [
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor(lens, dtype=torch.int32),
        torch.tensor(owner, dtype=torch.int32),
        torch.tensor([a[0] for a in adapters], dtype=torch.int32),
        torch.tensor([float(a[1]) for a in adapters], dtype=torch.float32).view(torch.int32),
        table,
        offsets.to(torch.int32),
        slot_cols,
        group_cols,
        out_slices,
    ]
    packed = torch.cat([t.reshape(-1) for t in host]).to(device, non_blocking=True)
    views, pos = [], 0
    for t in host:
        views.append(packed[pos : pos + t.numel()].view(t.shape))
        pos += t.numel()
    views[4] = views[4].view(torch.float32)
    return TritonLoRAMeta(
        *views,
        pool=flat,
        num_chunks=len(starts),
        chunk=chunk,
        page_elems=page_elems,
        num_layers=num_layers,
        max_cols=tuple(int(c) for c in group_cols.amax(0).tolist()) if A else (0,) * G,
        max_width=tuple(int(w) for w in out_slices[:, :, 1].amax(1).tolist()),
    )


def lora_apply_torch(
    x: torch.Tensor, y: torch.Tensor, layer: int, group: str, meta: LoRABatchMeta
) -> None:
    """y[rows, slice_m] += scale * (x[rows] @ A_m^T) @ B_m^T for every segment, in place.

    x: [T, in] group input; y: [T, out_total] fused base output of the group.
    """
    for seg in meta.segments:
        g = seg.views[layer].get(group)
        if g is None:
            continue
        rows = slice(seg.start, seg.end)
        v = x[rows] @ g.a_t  # [n, n_mod * r] shrink, one matmul for the whole group
        r = seg.rank
        for j, (bt, (lo, hi)) in enumerate(zip(g.b_t, g.out_slices, strict=True)):
            y[rows, lo:hi].addmm_(v[:, j * r : (j + 1) * r], bt, alpha=seg.scale)  # expand


def lora_reference(
    x: torch.Tensor,
    token_adapter: list[int],
    A: list[torch.Tensor],
    B: list[torch.Tensor],
    scales: list[float],
) -> torch.Tensor:
    """Plain per-token reference in float32: delta[t] = scale * B @ (A @ x[t]) (0 for -1 rows).

    A[i]: [r_i, in], B[i]: [out, r_i]. Used by tests to check the segmented paths.
    """
    out_dim = B[0].shape[0] if B else 0
    delta = torch.zeros(x.shape[0], out_dim, dtype=torch.float32)
    for t, idx in enumerate(token_adapter):
        if idx < 0:
            continue
        delta[t] = scales[idx] * (B[idx].float() @ (A[idx].float() @ x[t].float()))
    return delta
