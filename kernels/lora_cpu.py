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

The library is compiled once per source/compiler/CPU with the system C compiler (`$CC`, else
`cc`) into `<cache>/kernels/` ($LORAPLEX_CACHE, else ~/.cache/loraplex), atomically.
`cpu_kernel_error()` says why it cannot be used (no compiler, build failure); callers choose.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.lora import GROUPS, GroupViews, LoRABatchMeta, LoRASegment, lora_apply_torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.c")
# included by SOURCE: part of the build key
HEADERS = (Path(__file__).with_name("lora_vec.h"), Path(__file__).with_name("lora_amx.h"))
CALL_SOURCE = Path(__file__).with_name("lora_call.c")  # the CPython entry; optional
REC = 11  # int64 fields per (segment, layer, group) record; see lora_cpu.c
MAX_MODULES = max(len(m) for m in GROUPS.values())
MAX_GROUPS = 8  # lora_cpu.c's lora_step_t.in_dims
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
# Longer segments go to the torch path, whose GEMMs win there (crossovers measured on the bench
# shapes, 8 segments of ranks 8-64, 2-core Xeon: float32 ~110 rows, bfloat16 ~130 rows).
MAX_ROWS = {torch.float32: 96, torch.bfloat16: 128}
# bfloat16 segments of at least this many rows take the AMX path when the CPU has it (below, the
# vector path: decode rows are memory-bound and tiles of 16 rows would mostly multiply padding),
# up to AMX_MAX_ROWS; longer ones go to the torch path, whose oneDNN GEMMs win there (even at
# ~384 rows, 1.2-1.5x faster at 512-1024; docs/benchmarks.md).
AMX_ROWS, AMX_MAX_ROWS = 16, 384

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_amx = False
_call_mod: object = None  # the lora_call.c module; False: it cannot be built here


def _cpu_id() -> str:
    """What -march=native depends on: the machine and the CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def _compile(cc: str, out: Path) -> None:
    """Best flags first; without OpenMP (e.g. Apple clang) the kernel runs on one thread."""
    base = [cc, "-O3", "-shared", "-fPIC", str(SOURCE), "-o", str(out)]
    errors = []
    for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            if "-fopenmp" not in extra:
                logger.warning("CPU LoRA kernel built without OpenMP: it runs on one thread")
            return
        errors.append(proc.stderr.strip()[-2000:])
    raise RuntimeError(f"{cc} failed to build {SOURCE.name}:\n" + "\n".join(errors))


def _cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache/loraplex") / "kernels"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    return cc


def _built(stem: str, key: bytes, build: Callable[[Path], None]) -> Path:
    """`<cache>/<stem>-<hash of key>.so`, built by `build(tmp)` unless already there. Written
    atomically: a concurrent builder's identical file may win, and a failed build leaves
    nothing behind."""
    path = _cache_dir() / f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            build(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        logger.info("built %s", path)
    return path


def _load() -> ctypes.CDLL:
    cc = _compiler()
    sources = b"".join(p.read_bytes() for p in (SOURCE, *HEADERS))
    path = _built(
        "lora_cpu",
        sources + f"|{os.path.realpath(cc)}|{_cpu_id()}".encode(),
        lambda out: _compile(cc, out),
    )
    lib = ctypes.CDLL(str(path))
    for name in ("lora_step_f32", "lora_step_bf16"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        # x, ldx, y, ldy, step, layer_group: few arguments, as ctypes converts each on every call
        fn.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int32,
        ]  # fmt: skip
    lib.lora_amx_init.restype = ctypes.c_int
    lib.lora_amx_init.argtypes = []
    return lib


def library() -> ctypes.CDLL:
    """The compiled kernel library (built on first use). RuntimeError says why it is not."""
    global _lib, _error, _amx
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _load()
                _amx = bool(_lib.lora_amx_init())  # built with AMX and granted by the OS
                logger.info("CPU LoRA kernel: AMX path for bfloat16 segments %s",
                            "on" if _amx else "off")  # fmt: skip
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _error = str(e)
        if _lib is None:
            raise RuntimeError(f"CPU LoRA kernel unavailable: {_error}")
        return _lib


def amx_available() -> bool:
    """Whether the kernel's AMX path can run here (CPU, compiler and OS all allow it)."""
    return cpu_kernel_error() is None and _amx


def cpu_kernel_error() -> str | None:
    """None when the kernel can be used here, else the reason."""
    try:
        library()
    except RuntimeError as e:
        return str(e)
    return None


def _call_module():
    """The CPython entry of lora_call.c (built on first use), or None where it cannot be built:
    no Python headers, no compiler; calls then go through ctypes."""
    global _call_mod
    with _lock:
        if _call_mod is None:
            _call_mod = False
            try:
                include = sysconfig.get_paths()["include"]
                if not (Path(include) / "Python.h").is_file():
                    raise RuntimeError(f"no Python.h in {include}")
                cc = _compiler()
                key = (
                    CALL_SOURCE.read_bytes()
                    + (
                        f"|{os.path.realpath(cc)}|{include}|{sys.implementation.cache_tag}"
                        f"|{sysconfig.get_config_var('EXT_SUFFIX')}"
                    ).encode()
                )

                def build(out: Path) -> None:
                    cmd = [cc, "-O2", "-shared", "-fPIC", f"-I{include}", str(CALL_SOURCE)]
                    proc = subprocess.run(
                        [*cmd, "-o", str(out)], capture_output=True, text=True, timeout=300
                    )
                    if proc.returncode != 0:
                        raise RuntimeError(proc.stderr.strip()[-2000:])

                path = str(_built("lora_call", key, build))
                loader = importlib.machinery.ExtensionFileLoader("_lora_call", path)
                spec = importlib.util.spec_from_file_location("_lora_call", path, loader=loader)
                module = importlib.util.module_from_spec(spec)
                loader.exec_module(module)
                _call_mod = module
            except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
                logger.info("CPU LoRA kernel calls go through ctypes (%s)", e)
        return _call_mod or None


def call_entry_available() -> bool:
    """Build (once per cache) and load the CPython call entry; False where kernel calls go
    through ctypes instead. The engine calls it at start, so no step pays for the build."""
    return _call_module() is not None


def _caller(dtype: torch.dtype) -> tuple[ctypes._CFuncPtr, Callable[..., int]]:
    """(kernel, f): f(x, ldx, y, ldy, step, layer_group) -> status runs the dtype's kernel entry
    through the CPython module when it builds here, else it is the ctypes function itself. Hold
    `kernel` as long as f: it keeps the library (the address f calls) loaded."""
    kernel = _kernel(dtype)
    cached = _CALLERS.get(dtype)
    if cached is None or cached[0] is not kernel:  # a rebuilt library has a new kernel
        module = _call_module()
        if module is not None:
            fn = functools.partial(module.call, ctypes.cast(kernel, ctypes.c_void_p).value)
        else:
            fn = kernel
        cached = _CALLERS[dtype] = (kernel, fn)
    return cached


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
    kernel: ctypes._CFuncPtr | None = None  # _caller(dtype): the entry, and what calls it
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
        self.kernel, self.call = _caller(self.dtype)


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
_FUNCS: dict[torch.dtype, ctypes._CFuncPtr] = {}
_CALLERS: dict[torch.dtype, tuple[ctypes._CFuncPtr, Callable[..., int]]] = {}


def _kernel(dtype: torch.dtype) -> ctypes._CFuncPtr:
    fn = _FUNCS.get(dtype)
    if fn is None:
        if dtype not in DTYPES:
            raise ValueError(f"CPU LoRA kernel: no {dtype} version (float32, bfloat16)")
        fn = _FUNCS[dtype] = getattr(library(), f"lora_step_{DTYPES[dtype]}")
    return fn
