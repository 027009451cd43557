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
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loraplex.kernels.lora_cpu import CpuLoRAMeta
    from loraplex.kernels.lora_meta import TritonLoRAMeta

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


def module_dims(hidden: int, q_dim: int, kv_dim: int, inter: int) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-targetable module of a Llama-family layer: the
    `module_dims` argument of `lora_layout`."""
    return {
        "q_proj": (hidden, q_dim),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (q_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


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
    empty on the Triton path: its chunks also set `has_lora`). `cpu` holds the short segments
    of the CPU kernel path (kernels/lora_cpu.py); `segments` then keeps only the long ones.
    """

    segments: list[LoRASegment]
    triton: TritonLoRAMeta | None = None
    cpu: CpuLoRAMeta | None = None

    @property
    def has_lora(self) -> bool:
        return (
            bool(self.segments)
            or self.cpu is not None
            or (self.triton is not None and self.triton.num_chunks > 0)
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


# The Triton path's metadata lives in kernels/lora_meta.py; re-exported for callers.
from loraplex.kernels.lora_meta import (  # noqa: E402
    GROUP_INDEX,
    MAX_SLOTS,
    TritonLoRAMeta,
    build_triton_lora_meta,
)

__all__ = [
    "GROUPS",
    "GROUP_INDEX",
    "MAX_SLOTS",
    "GroupLayout",
    "GroupViews",
    "LoRABatchMeta",
    "LoRALayout",
    "LoRASegment",
    "TritonLoRAMeta",
    "blob_views",
    "build_triton_lora_meta",
    "lora_apply_torch",
    "lora_layout",
    "lora_reference",
    "module_dims",
    "pack_blob",
]
