"""Building and loading the CPU kernels: LoRA (kernels/lora_cpu.c), paged decode attention
(kernels/attention_cpu.c) and RMSNorm / rotary (kernels/norm_rope_cpu.c), one library, and the
LoRA kernel's CPython call entry (kernels/lora_call.c). kernels/lora_cpu.py,
kernels/attention_cpu.py and kernels/norm_rope_cpu.py build the per-step inputs and make the
calls.

The library is compiled once per source/compiler/CPU with the system C compiler (`$CC`, else
`cc`) into `<cache>/kernels/` ($LORAPLEX_CACHE, else ~/.cache/loraplex), atomically.
`cpu_kernel_error()` says why it cannot be used (no compiler, build failure); callers choose.
The call entry is optional: without Python's headers, calls go through ctypes.
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
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(n) for n in ("lora_cpu.c", "attention_cpu.c", "norm_rope_cpu.c")
)
# included by SOURCES: part of the build key
HEADERS = tuple(Path(__file__).with_name(n) for n in ("cpu_common.h", "lora_vec.h", "lora_amx.h"))
CALL_SOURCE = Path(__file__).with_name("lora_call.c")  # the CPython entry; optional
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_amx = False
_call_mod: object = None  # the lora_call.c module; False: it cannot be built here
_FUNCS: dict[torch.dtype, ctypes._CFuncPtr] = {}  # the library's entry per dtype
_CALLERS: dict[torch.dtype, tuple[ctypes._CFuncPtr, Callable[..., int]]] = {}  # caller(dtype)


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
    base = [cc, "-O3", "-shared", "-fPIC", *map(str, SOURCES), "-o", str(out)]
    errors = []
    for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            if "-fopenmp" not in extra:
                logger.warning("CPU kernels built without OpenMP: they run on one thread")
            return
        errors.append(proc.stderr.strip()[-2000:])
    names = " ".join(p.name for p in SOURCES)
    raise RuntimeError(f"{cc} failed to build {names}:\n" + "\n".join(errors))


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
    sources = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    path = _built(
        "cpu_kernels",
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
    for name in ("decode_attention_f32", "decode_attention_bf16"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        # q, ldq, out, ldo, k, v, page_stride, slot_stride, tables, max_blocks, ctx, rows, nseq,
        # H, KH, D, block_size, scale, nthreads (attention_cpu.c)
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        fn.argtypes = [
            ptr, i64, ptr, i64, ptr, ptr, i64, i64, ptr, i32, ptr, ptr, i32, i32, i32, i32, i32,
            ctypes.c_float, i32,
        ]  # fmt: skip
    for dt in ("f32", "bf16"):
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        norm, rope = getattr(lib, f"rms_norm_{dt}"), getattr(lib, f"rotary_{dt}")
        norm.restype = rope.restype = None
        # h, ldh, d, ldd, w, out, ldo, rows, dim, eps, nthreads (norm_rope_cpu.c)
        norm.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_float, i32]
        # x, ldx, positions, cos, sin, rows, heads, D, nthreads
        rope.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i32, i32, i32]
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
            raise RuntimeError(f"CPU kernels unavailable: {_error}")
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


def caller(dtype: torch.dtype) -> tuple[ctypes._CFuncPtr, Callable[..., int]]:
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


def _kernel(dtype: torch.dtype) -> ctypes._CFuncPtr:
    fn = _FUNCS.get(dtype)
    if fn is None:
        if dtype not in DTYPES:
            raise ValueError(f"CPU LoRA kernel: no {dtype} version (float32, bfloat16)")
        fn = _FUNCS[dtype] = getattr(library(), f"lora_step_{DTYPES[dtype]}")
    return fn
