"""Building the engine's pieces: the pool tensor's size and storage, the kernel backends that
build here, the tokenizer."""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import torch

from loraplex.engine.config import EngineConfig
from loraplex.engine.loader import ModelSpec

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_POOL_FRACTION, CPU_POOL_CAP = 0.25, 4 << 30
GPU_POOL_FRACTION = 0.90


def default_pool_bytes(device: torch.device) -> int:
    """Pool size when none is given: 90% of free GPU memory (after the weights), or on the CPU
    a quarter of available memory capped at 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_POOL_FRACTION)
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(avail * CPU_POOL_FRACTION, CPU_POOL_CAP))


def cpu_backend(config: EngineConfig, name: str, spec: ModelSpec) -> str:
    """config.backend(name) for "lora" or "attention", checked: a "cpu" kernel must build here
    (and attention's must handle the model's heads). auto falls back to the torch path (same
    results, slower) with a warning; an explicit "cpu" is an error."""
    backend = config.backend(name)
    if backend != "cpu":
        return backend
    from loraplex.kernels.cpu_build import call_entry_available, cpu_kernel_error

    error = cpu_kernel_error()
    if error is None and name == "attention":
        from loraplex.kernels.attention_cpu import decode_kernel_refusal

        refusal = decode_kernel_refusal(
            spec.num_heads, spec.num_kv_heads, spec.head_dim, DTYPES[config.dtype]
        )
        error = refusal and f"the decode kernel does not handle {refusal}"
    if error is None:
        if name == "lora":
            call_entry_available()  # built now rather than in the first step
        return backend
    if getattr(config, f"{name}_backend") == "cpu":
        raise RuntimeError(f"{name}_backend 'cpu': {error}")
    logger.warning("using the torch %s path (slower): %s", name, error)
    return "torch"


def zeroed_pool(
    num_pages: int, page_elems: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The pool tensor [num_pages, page_elems], all zeros (padding slots of the KV cache are read
    before being masked, so they must never hold NaN). On the CPU it is backed by an anonymous
    mmap: the kernel hands out zero pages on first touch, so a large pool costs nothing until
    used (torch.zeros would write every byte at start)."""
    if device.type != "cpu":
        return torch.zeros(num_pages, page_elems, dtype=dtype, device=device)
    nbytes = num_pages * page_elems * torch.finfo(dtype).bits // 8
    # private: a shared anonymous mapping is shmem, which gets no transparent huge pages
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # Every decode step streams each running adapter's weights out of the pool: 2 MiB pages
        # spare TLB misses and let the hardware prefetchers run past 4 KiB boundaries
        # (the git history of docs/benchmarks.md). Only a hint; /proc/<pid>/smaps
        # AnonHugePages shows it took.
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError as e:
            logger.debug("no transparent huge pages for the pool: %s", e)
    return torch.frombuffer(buf, dtype=dtype).view(num_pages, page_elems)


def load_tokenizer(model_dir: str):
    d = Path(model_dir)
    if not any(
        (d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
