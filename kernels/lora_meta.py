"""Per-step metadata of the Triton LoRA kernels: where each adapter's weights are in the pool
(page tables, blob offsets per layer and group) and which rows use which adapter (chunks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.kernels.lora import GROUPS, LoRALayout

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
