"""Paged attention on the CPU: decode queries through a small C kernel (kernels/attention_cpu.c),
prefill chunks through the torch path.

Why: the torch path (kernels/attention.py) first gathers every sequence's context into a padded
copy (`index_select` of K and V per layer) and then runs one masked SDPA over the padded batch;
at decode, with a few hundred keys per sequence, the copies and the op overheads cost ~3x what
reading the keys takes. The kernel reads K and V in place from the pool's pages through each
sequence's block table, one call per layer for all decode sequences. Prefill chunks (several
queries) stay on the torch path, whose SDPA is efficient there. float32 and bfloat16; the
metadata comes from `build_attention_meta(..., decode_tables=True)`.
"""

from __future__ import annotations

import torch

from loraplex.kernels.attention import AttentionMeta, attend_groups
from loraplex.kernels.cpu_build import library

MAX_HEAD_DIM = 128  # attention_cpu.c holds a head in at most 8 vectors of 16 floats
MAX_GROUP = 16  # query heads per KV head (attention_cpu.c)
_ENTRIES = {torch.float32: "decode_attention_f32", torch.bfloat16: "decode_attention_bf16"}


def decode_kernel_refusal(num_heads: int, num_kv_heads: int, head_dim: int, dtype) -> str | None:
    """None when the kernel handles this attention shape and dtype, else why not."""
    if dtype not in _ENTRIES:
        return f"dtype {dtype} (float32 and bfloat16 only)"
    if head_dim % 16 or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} (a multiple of 16, at most {MAX_HEAD_DIM})"
    if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        return f"{num_heads} query heads over {num_kv_heads} KV heads (at most {MAX_GROUP} each)"
    return None


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
) -> torch.Tensor:
    """Same contract as `paged_attention`: q [T, heads, head_dim] -> out [T, heads, head_dim],
    new K/V already written. Caches are [num_pages, block_size, kv_heads, head_dim] views with
    contiguous (kv_heads, head_dim) rows, as the pool lays them out."""
    out = torch.empty_like(q)
    dec = meta.decode_tables
    if dec is not None:
        T, H, D = q.shape
        _, block_size, KH, _ = k_cache.shape
        if (
            q.stride(2) != 1
            or q.stride(1) != D
            or k_cache.stride()[1:] != (KH * D, D, 1)
            or v_cache.stride() != k_cache.stride()
            or v_cache.shape != k_cache.shape
            or k_cache.dtype is not q.dtype
            or v_cache.dtype is not q.dtype
            or q.device.type != "cpu"
            or k_cache.shape[3] != D
            or dec.max_page >= k_cache.shape[0]
            or dec.max_row >= T
        ):
            _refuse(q, k_cache, v_cache, dec.max_page)
        refusal = decode_kernel_refusal(H, KH, D, q.dtype)
        if refusal is not None:
            raise ValueError(f"CPU attention kernel: {refusal}")
        fn = getattr(library(), _ENTRIES[q.dtype])
        S, width = dec.tables.shape
        status = fn(
            q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0),
            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
            dec.tables.data_ptr(), width, dec.ctx.data_ptr(), dec.rows.data_ptr(), S,
            H, KH, D, block_size, scale, torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise MemoryError("CPU attention kernel: out of memory for its scores")
    if meta.groups:
        attend_groups(q, k_cache, v_cache, meta.groups, scale, out)
    return out


def _refuse(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, max_page: int) -> None:
    raise ValueError(
        f"CPU attention kernel: q {q.dtype} {tuple(q.shape)} strides {q.stride()} on {q.device}, "
        f"caches {k_cache.dtype} {tuple(k_cache.shape)} / {v_cache.dtype} {tuple(v_cache.shape)} "
        f"strides {k_cache.stride()} / {v_cache.stride()}, largest page {max_page}: not a "
        f"layout the kernel reads (dense query rows, contiguous cache rows, same dtype)"
    )
