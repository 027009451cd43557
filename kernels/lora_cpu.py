"""Batched multi-adapter LoRA on the CPU: a small C kernel (kernels/lora_cpu.c) bound by ctypes.

Why: on the CPU the torch path (`lora_apply_torch`) issues one shrink and one expand per
(adapter segment, layer, module); at decode each covers a row or two, so a step of 8 adapters is
~700 tiny matmuls whose fixed cost dominates. The kernel applies every short segment of one
(layer, group) in one call, reading each adapter's weights in place (the same blobs, at their
true rank), threaded over (segment, block) work items in one OpenMP region.

Long segments (prefill chunks): in bfloat16 on CPUs with AMX (and Linux granting it), segments
of `AMX_ROWS` to `AMX_MAX_ROWS` rows go to the kernel's AMX tile path (kernels/lora_amx.h).
Otherwise segments longer than `MAX_ROWS[dtype]` (`AMX_MAX_ROWS` with AMX) stay on the torch
path, where the GEMM libraries beat the kernel; a step may use both. float32 and bfloat16
(float16 uses the torch path).

Building and loading the library (and `cpu_kernel_error()`, `amx_available()`) live in
kernels/cpu_build.py.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraplex.kernels.cpu_build import (  # noqa: F401  (re-exported: callers import them from here)
    DTYPES,
    amx_available,
    call_entry_available,
    caller,
    cpu_kernel_error,
    library,
)
from loraplex.kernels.lora import GROUPS, GroupViews, LoRABatchMeta, LoRASegment, lora_apply_torch

REC = 11  # int64 fields per (segment, layer, group) record; see lora_cpu.c
MAX_MODULES = max(len(m) for m in GROUPS.values())
MAX_GROUPS = 8  # lora_cpu.c's lora_step_t.in_dims
# Longer segments go to the torch path, whose GEMMs win there (crossovers measured on the bench
# shapes, 8 segments of ranks 8-64, 2-core Xeon: float32 ~110 rows, bfloat16 ~130 rows).
MAX_ROWS = {torch.float32: 96, torch.bfloat16: 128}
# bfloat16 segments of at least this many rows take the AMX path when the CPU has it (below, the
# vector path: decode rows are memory-bound and tiles of 16 rows would mostly multiply padding),
# up to AMX_MAX_ROWS; longer ones go to the torch path, whose oneDNN GEMMs win there (even at
# ~384 rows, 1.2-1.5x faster at 512-1024; docs/benchmarks.md).
AMX_ROWS, AMX_MAX_ROWS = 16, 384


def adapter_records(views: list[dict[str, GroupViews]]) -> torch.Tensor:
    """[num_layers, len(GROUPS), REC] int64 records of one adapter (see lora_cpu.c): weight
    addresses of its views (valid while those views' storage lives) and output columns."""
    recs = torch.zeros(len(views), len(GROUPS), REC, dtype=torch.int64)
    for layer, groups in enumerate(views):
        for gi, name in enumerate(GROUPS):
            g = groups.get(name)
            if g is None:
                continue  # nmod 0: this adapter skips the group
            # The kernel reads raw memory: A_cat [n * r, in] and each B^T [r, out] row-major.
            if not (g.a_t.t().is_contiguous() and all(bt.is_contiguous() for bt in g.b_t)):
                raise ValueError(f"layer {layer} {name}: adapter views are not row-major blobs")
            if g.a_t.device.type != "cpu" or g.a_t.dtype not in DTYPES:
                raise ValueError(f"CPU LoRA kernel: weights on {g.a_t.device} {g.a_t.dtype}")
            row = [g.a_t.data_ptr(), len(g.b_t)] + [0] * (3 * MAX_MODULES)
            for m, (bt, (lo, hi)) in enumerate(zip(g.b_t, g.out_slices, strict=True)):
                if bt.shape[1] != hi - lo:
                    raise ValueError(f"layer {layer} {name}: B^T width {bt.shape[1]} != {hi - lo}")
                row[2 + m] = bt.data_ptr()
                row[2 + MAX_MODULES + m] = lo
                row[2 + 2 * MAX_MODULES + m] = hi
            recs[layer, gi] = torch.tensor(row, dtype=torch.int64)
    return recs


class StepArgs(ctypes.Structure):
    """lora_step_t of lora_cpu.c: one step's constant kernel inputs."""

    _fields_ = [
        ("segs", ctypes.c_void_p),
        ("records", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("work", ctypes.c_void_p),
        ("nseg", ctypes.c_int32),
        ("ngroups", ctypes.c_int32),
        ("nthreads", ctypes.c_int32),
        ("amx_rows", ctypes.c_int32),
        ("in_dims", ctypes.c_int32 * MAX_GROUPS),
    ]


@dataclass
class CpuLoRAMeta:
    """One step's kernel inputs for the short segments (host tensors, kept alive by the meta).

    segs [S, 3] int64 (row_start, row_end, rank); scales [S] float32;
    records [num_layers, len(GROUPS), S, REC] int64; work: float32 scratch, big enough for the
    widest group; keep: tensors whose storage the records point into (the adapters' views).
    `args` holds their addresses for C once per step, so a call (~30 per step) passes only x,
    y and the (layer, group).
    """

    segs: torch.Tensor
    scales: torch.Tensor
    records: torch.Tensor
    work: torch.Tensor
    keep: list[torch.Tensor]
    dtype: torch.dtype = torch.float32  # of the weights: x and y must have it too
    num_threads: int = 1
    amx_rows: int = 0  # segments of at least this many rows take the AMX path (0: none)
    # Bounds each call checks before handing raw pointers to C (a mismatch would read or write
    # out of bounds): rows the segments span, each group's input width (0: no adapter has the
    # group, and the call does nothing) and the end of its widest output slice.
    rows: int = 0
    in_dims: tuple[int, ...] = ()
    out_ends: tuple[int, ...] = ()
    num_layers: int = 0  # layers the records cover
    args: StepArgs | None = None
    args_ptr: int = 0
    kernel: ctypes._CFuncPtr | None = None  # caller(dtype): the entry, and what calls it
    call: Callable[..., int] | None = None

    def __post_init__(self) -> None:
        L, G, S, _ = self.records.shape
        if len(self.in_dims) != G or G > MAX_GROUPS:
            raise ValueError(f"{len(self.in_dims)} input widths for {G} groups (max {MAX_GROUPS})")
        self.rows, self.num_layers = int(self.segs[:, 1].max()), L
        self.out_ends = tuple(int(v) for v in self.records[..., 8:11].amax(dim=(0, 2, 3)))
        self.num_threads = torch.get_num_threads()
        self.args = StepArgs(
            self.segs.data_ptr(), self.records.data_ptr(), self.scales.data_ptr(),
            self.work.data_ptr(), S, G, self.num_threads, self.amx_rows,
            (ctypes.c_int32 * MAX_GROUPS)(*self.in_dims),
        )  # fmt: skip
        self.args_ptr = ctypes.addressof(self.args)
        self.kernel, self.call = caller(self.dtype)


def build_cpu_lora_meta(
    segments: list[LoRASegment],
    records: list[torch.Tensor],
    *,
    max_rows: int | None = None,
    amx_rows: int | None = None,
) -> LoRABatchMeta:
    """Split a step's segments: those of at most `max_rows` rows go to the kernel
    (`records[i]` = `adapter_records(segments[i].views)`), longer ones stay on the torch path.
    Inside the kernel, bfloat16 segments of at least `amx_rows` rows take the AMX path (0: off).
    Defaults: with AMX (bfloat16, `amx_available()`), amx_rows = AMX_ROWS and max_rows =
    AMX_MAX_ROWS (MAX_ROWS if some input width is not a multiple of 32); otherwise no AMX and
    max_rows = MAX_ROWS of the weights' dtype."""
    if not segments:
        return LoRABatchMeta([])
    dtype = _first_view(segments[0]).dtype  # one pool, one dtype
    amx_ok = dtype == torch.bfloat16 and amx_available()
    if amx_rows is None:
        amx_rows = AMX_ROWS if amx_ok else 0
    if amx_rows > 0 and not amx_ok:
        raise ValueError(f"the AMX path needs bfloat16 weights and an AMX CPU (have {dtype})")
    in_dims = [0] * len(GROUPS)  # each group's input width (0: no adapter of the step has it)
    for s in segments:
        for name, g in s.views[0].items():
            gi = GROUP_POS[name]
            if in_dims[gi] not in (0, g.a_t.shape[0]):
                raise ValueError(f"group {name}: adapters disagree on its input width")
            in_dims[gi] = g.a_t.shape[0]
    if max_rows is None:
        # AMX needs input widths that are multiples of 32 (else those groups run on the vector
        # path, which should not get segments past MAX_ROWS)
        tiles_fit = all(d % 32 == 0 for d in in_dims)
        max_rows = AMX_MAX_ROWS if amx_rows > 0 and tiles_fit else MAX_ROWS.get(dtype, 0)
    short = [i for i, s in enumerate(segments) if s.end - s.start <= max_rows]
    long = [s for s in segments if s.end - s.start > max_rows]
    if not short:
        return LoRABatchMeta(long)
    segs = torch.tensor(
        [[segments[i].start, segments[i].end, segments[i].rank] for i in short], dtype=torch.int64
    )
    work = sum((segments[i].end - segments[i].start) * segments[i].rank for i in short)
    meta = CpuLoRAMeta(
        in_dims=tuple(in_dims),
        segs=segs,
        scales=torch.tensor([float(segments[i].scale) for i in short], dtype=torch.float32),
        records=torch.stack([records[i] for i in short], dim=2).contiguous(),
        work=torch.empty(work * MAX_MODULES, dtype=torch.float32),
        keep=[_first_view(segments[i]) for i in short],
        dtype=dtype,
        amx_rows=amx_rows,
    )
    return LoRABatchMeta(long, cpu=meta)


def _first_view(seg: LoRASegment) -> torch.Tensor:
    """A view into the segment's blob (its storage holds every weight the records point at)."""
    return next(iter(seg.views[0].values())).a_t


def lora_apply_cpu(
    x: torch.Tensor, y: torch.Tensor, layer: int, group: str, meta: LoRABatchMeta
) -> None:
    """Same effect as `lora_apply_torch` (y[rows, slice_m] += scale * x A_m^T B_m^T in place),
    short segments through the kernel and long ones through torch.

    x: [T, in] group input; y: [T, out_total] fused base output (unit column stride, modified).
    Called ~30 times per step, so the checks below are what a call costs: each tensor attribute
    read is a Python-to-C++ round trip.
    """
    cpu = meta.cpu
    if cpu is not None:
        gi = GROUP_POS[group]
        in_dim = cpu.in_dims[gi]
        if in_dim:  # 0: no segment's adapter has this group
            xst, yst = x.stride(), y.stride()
            if xst[-1] != 1:
                x = x.contiguous()
                xst = x.stride()
            xs, ys = x.shape, y.shape
            if (
                x.dtype is not cpu.dtype
                or y.dtype is not cpu.dtype
                or y.is_cuda
                or len(xs) != 2
                or len(ys) != 2
                or yst[1] != 1
                or xs[1] != in_dim
                or xs[0] < cpu.rows
                or ys[0] < cpu.rows
                or ys[1] < cpu.out_ends[gi]
                or not 0 <= layer < cpu.num_layers
            ):
                _refuse(x, y, layer, group, cpu)
            if cpu.call(x.data_ptr(), xst[0], y.data_ptr(), yst[0], cpu.args_ptr, layer * NG + gi):
                raise MemoryError("CPU LoRA kernel: out of memory for its work list")
    if meta.segments:
        lora_apply_torch(x, y, layer, group, meta)


def _refuse(x: torch.Tensor, y: torch.Tensor, layer: int, group: str, cpu: CpuLoRAMeta) -> None:
    """Raise the ValueError that says why x and y (or the layer) cannot go to the kernel."""
    if x.dtype != cpu.dtype or y.dtype != cpu.dtype or y.stride(-1) != 1 or y.is_cuda:
        raise ValueError(
            f"CPU LoRA kernel: unsupported y {y.dtype} {tuple(y.stride())} on {y.device} "
            f"(x {x.dtype}; the weights are {cpu.dtype}, float32 and bfloat16 only)"
        )
    if not 0 <= layer < cpu.num_layers:
        raise ValueError(f"CPU LoRA kernel: layer {layer} of {cpu.num_layers}")
    gi = GROUP_POS[group]
    raise ValueError(
        f"CPU LoRA kernel, {group}: x {tuple(x.shape)} / y {tuple(y.shape)} do not fit "
        f"the segments (rows {cpu.rows}, in {cpu.in_dims[gi]}, out {cpu.out_ends[gi]})"
    )


GROUP_POS = {name: i for i, name in enumerate(GROUPS)}
NG = len(GROUPS)
