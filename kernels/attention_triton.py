"""Triton paged attention over the unified pool's KV pages (same contracts as the torch path in
kernels/attention.py, read from the Triton fields of `AttentionMeta`).

* `write_kv_triton`: one program per new token stores its K and V (all KV heads) at
  (slot_pages[t], slot_offsets[t]).
* `paged_attention_triton`: one program per (query tile, KV head, KV split). A tile holds up
  to `meta.q_tile` consecutive queries of one sequence times the GQA group of query heads that
  share the KV head, so each K/V block is read once per group. Keys are visited BLOCK_N at a
  time through the sequence's block table (any block size, any page order), causally masked,
  with an online softmax in fp32 (exp2). Decodes and prefill chunks mix freely in one launch.
* Decode-only batches with too few tiles to fill the GPU split each sequence's keys into
  `num_splits` ranges (flash-decoding); a second small kernel merges the partial results.
The caches are strided views ([num_pages, block_size, kv_heads, head_dim], page stride =
page_elems); all strides are passed, only head_dim must be contiguous. Under the Triton
interpreter the matmul inputs are upcast to fp32 (its bf16 `tl.dot` is broken).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from loraplex.kernels.attention import AttentionMeta
from loraplex.kernels.triton_common import mma

BLOCK_N = 64  # keys per inner step
TARGET_PROGRAMS = 264  # about two waves of an H100's SMs
MIN_KEYS_PER_SPLIT = 256
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": masked rows never produce NaN


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, pages_ptr, offs_ptr,
    sk_t, sk_h, sv_t, sv_h, skc_p, skc_s, skc_h, svc_p, svc_s, svc_h,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    page = tl.load(pages_ptr + t).to(tl.int64)
    slot = tl.load(offs_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + t * sk_t + h[:, None] * sk_h + d[None, :], mask)
    v = tl.load(v_ptr + t * sv_t + h[:, None] * sv_h + d[None, :], mask)
    kc = kc_ptr + page * skc_p + slot * skc_s + h[:, None] * skc_h + d[None, :]
    vc = vc_ptr + page * svc_p + slot * svc_s + h[:, None] * svc_h + d[None, :]
    tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask)
    tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask)


@triton.jit
def _attn_kernel(
    q_ptr, kc_ptr, vc_ptr, o_ptr, part_o_ptr, part_ml_ptr,
    tables_ptr, ctx_ptr, qlen_ptr, qstart_ptr, work_seq_ptr, work_q_ptr,
    scale_log2, sq_t, sq_h, so_t, so_h, skc_p, skc_s, skc_h, svc_p, svc_s, svc_h, st_s,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, Q_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    w = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(work_seq_ptr + w)
    q0 = tl.load(work_q_ptr + w)
    ctx = tl.load(ctx_ptr + seq)
    q_len = tl.load(qlen_ptr + seq)
    row0 = tl.load(qstart_ptr + seq)
    m = tl.arange(0, BLOCK_M)  # row m = (query q0 + m // GROUP, head kvh * GROUP + m % GROUP)
    qi = q0 + m // GROUP
    head = kvh * GROUP + m % GROUP
    row_ok = (m < Q_TILE * GROUP) & (qi < q_len)
    q_pos = ctx - q_len + qi  # causal limit of each row
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    tok = (row0 + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                row_ok[:, None] & d_ok[None, :], 0.0)  # fmt: skip
    kv_end = tl.minimum(ctx, ctx - q_len + q0 + Q_TILE)  # keys any row of the tile may see
    lo = 0
    hi = kv_end
    if NUM_SPLITS > 1:
        per = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per
        hi = tl.minimum(lo + per, kv_end)
    table = tables_ptr + seq.to(tl.int64) * st_s
    m_i = tl.full([BLOCK_M], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        page = tl.load(table + j // BLOCK_SIZE, j_ok, 0).to(tl.int64)
        slot = (j % BLOCK_SIZE).to(tl.int64)
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + page[:, None] * skc_p + slot[:, None] * skc_s + kvh * skc_h
                    + d[None, :], kv_mask, 0.0)  # fmt: skip
        s = mma(q, tl.trans(k), UPCAST) * scale_log2
        ok = j_ok[None, :] & (j[None, :] <= q_pos[:, None])
        s = tl.where(ok, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(ok, tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + page[:, None] * svc_p + slot[:, None] * svc_s + kvh * svc_h
                    + d[None, :], kv_mask, 0.0)  # fmt: skip
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = o_ptr + tok[:, None] * so_t + head[:, None] * so_h + d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), out_mask)
    else:  # partials [T, heads, NUM_SPLITS, BLOCK_D] and [T, heads, NUM_SPLITS, 2] (m, l)
        part = (tok * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_o_ptr + part[:, None] * BLOCK_D + d[None, :], acc, out_mask)
        tl.store(part_ml_ptr + part * 2, m_i, row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, row_ok)


@triton.jit
def _merge_kernel(
    part_o_ptr, part_ml_ptr, o_ptr, so_t, so_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    base = (t * NUM_HEADS + h) * NUM_SPLITS + sp
    m_s = tl.load(part_ml_ptr + base * 2)
    l_s = tl.load(part_ml_ptr + base * 2 + 1)
    w = tl.exp2(m_s - tl.max(m_s, 0))  # empty splits have l = 0: they add nothing
    o_s = tl.load(part_o_ptr + base[:, None] * BLOCK_D + d[None, :])
    out = tl.sum(o_s * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(o_ptr + t * so_t + h * so_h + d, out.to(o_ptr.dtype.element_ty), d < HEAD_DIM)


INTERPRETED = not isinstance(_attn_kernel, triton.runtime.JITFunction)


def _attn_warps(block_m: int) -> int:
    return 8 if block_m >= 64 else 4


def write_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMeta,
) -> None:
    """Store new keys/values [T, kv_heads, head_dim] into their pages (in place)."""
    T, kv_heads, head_dim = k.shape
    if T == 0:
        return
    _check_inner(k, v, k_cache, v_cache)
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, meta.slot_pages, meta.slot_offsets,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


def _check_inner(*tensors: torch.Tensor) -> None:
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("head_dim must be the contiguous (stride 1) dimension")


def decode_splits(meta: AttentionMeta, kv_heads: int) -> int:
    """KV splits per tile: 1 unless the batch is decode-only with too few programs for the
    GPU and long enough contexts; then a power of two <= 16."""
    programs = meta.work_seq.numel() * kv_heads
    if meta.max_query_len != 1 or programs >= TARGET_PROGRAMS:
        return 1
    want = min(TARGET_PROGRAMS // programs, meta.max_context_len // MIN_KEYS_PER_SPLIT, 16)
    return 1 << (max(1, want).bit_length() - 1)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> out [T, heads, head_dim]. New K/V must already be written.
    `num_splits` (a power of two) overrides `decode_splits` (tests)."""
    if meta.work_seq is None:
        raise ValueError("AttentionMeta has no Triton fields: use build_attention_meta")
    T, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    _check_inner(q, k_cache, v_cache)
    out = torch.empty_like(q)
    W = meta.work_seq.numel()
    if W == 0:
        return out
    group = heads // kv_heads
    splits = num_splits or decode_splits(meta, kv_heads)
    if splits & (splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {splits}")
    block_m = max(16, triton.next_power_of_2(meta.q_tile * group))
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    if splits > 1:
        part_o = torch.empty(T, heads, splits, block_d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(T, heads, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = out  # unused
    _attn_kernel[(W, kv_heads, splits)](
        q, k_cache, v_cache, out, part_o, part_ml,
        meta.block_tables, meta.context_lens, meta.query_lens, meta.query_starts,
        meta.work_seq, meta.work_qstart,
        scale * math.log2(math.e), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], meta.block_tables.stride(0),
        NUM_HEADS=heads, GROUP=group, Q_TILE=meta.q_tile, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], NUM_SPLITS=splits, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        BLOCK_D=block_d, UPCAST=INTERPRETED or q.dtype == torch.float32,
        num_warps=_attn_warps(block_m),
    )  # fmt: skip
    if splits > 1:
        _merge_kernel[(T, heads)](
            part_o, part_ml, out, out.stride(0), out.stride(1),
            NUM_HEADS=heads, HEAD_DIM=head_dim, NUM_SPLITS=splits, BLOCK_D=block_d,
        )  # fmt: skip
    return out


def compile_all(capability: int = 90, dtypes: tuple[str, ...] = ("bf16", "fp16")) -> dict[str, str]:
    """AOT-compile the attention kernels at their launch configurations for Llama-like shapes
    (head_dim 128, block 16; MHA and GQA; with and without KV splits) with no GPU present (run
    without TRITON_INTERPRET); returns name -> resource usage (see lora_triton.aot_compile)."""
    from loraplex.kernels.lora_triton import aot_compile

    usage = {}
    for dt in dtypes:
        ptrs = {n: "*i32" for n in _attn_kernel.arg_names if n.endswith("_ptr")}
        ptrs.update(q_ptr=f"*{dt}", kc_ptr=f"*{dt}", vc_ptr=f"*{dt}", o_ptr=f"*{dt}")
        ptrs.update(part_o_ptr="*fp32", part_ml_ptr="*fp32", scale_log2=0.1, st_s=33)
        # strides as the engine has them (q: view of the fused qkv output; caches: pool views)
        ptrs.update(sq_t=6144, sq_h=128, so_t=4096, so_h=128, skc_p=1 << 20, skc_s=1024)
        ptrs.update(skc_h=128, svc_p=1 << 20, svc_s=1024, svc_h=128)
        for group, q_tile, splits in ((1, 1, 1), (1, 1, 8), (1, 64, 1), (4, 16, 1), (8, 1, 4)):
            block_m = max(16, triton.next_power_of_2(q_tile * group))
            consts = dict(NUM_HEADS=32, GROUP=group, Q_TILE=q_tile, HEAD_DIM=128, BLOCK_SIZE=16,
                          NUM_SPLITS=splits, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=128,
                          UPCAST=False)  # fmt: skip
            usage[f"attention {dt} group={group} q_tile={q_tile} splits={splits}"] = aot_compile(
                _attn_kernel, ptrs, consts, num_warps=_attn_warps(block_m), capability=capability
            )
        consts = dict(NUM_HEADS=32, HEAD_DIM=128, NUM_SPLITS=8, BLOCK_D=128)
        ptrs = dict(part_o_ptr="*fp32", part_ml_ptr="*fp32", o_ptr=f"*{dt}", so_t=4096, so_h=128)
        usage[f"merge {dt}"] = aot_compile(_merge_kernel, ptrs, consts, capability=capability)
        ptrs = dict(k_ptr=f"*{dt}", v_ptr=f"*{dt}", kc_ptr=f"*{dt}", vc_ptr=f"*{dt}")
        ptrs.update(pages_ptr="*i64", offs_ptr="*i64", sk_t=6144, sk_h=128, sv_t=6144, sv_h=128)
        ptrs.update(skc_p=1 << 20, skc_s=1024, skc_h=128, svc_p=1 << 20, svc_s=1024, svc_h=128)
        consts = dict(KV_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128)
        usage[f"write_kv {dt}"] = aot_compile(_write_kv_kernel, ptrs, consts, capability=capability)
    return usage
