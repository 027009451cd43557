"""Triton path of batched heterogeneous-rank LoRA: one shrink and one expand launch per
(layer, group) for the whole batch, weights read in place from the unified pool's pages.

Contract: `lora_apply_triton(x, y, layer, group, meta)` does what `kernels.lora.lora_apply_torch`
does (y[rows, slice_m] += scale * (x[rows] @ A_m^T) @ B_m^T for every adapter's rows, in place;
rows of no adapter untouched bit for bit), from `meta.triton` (`build_triton_lora_meta`).

* Shrink: programs (chunk, rank-block, k-split); a program whose rank-block lies past its
  adapter's n_targeted * rank returns at once, so work follows each adapter's true rank. x @
  A_cat^T accumulates in fp32; each K-split writes its own [T, max_cols] fp32 partial (no
  atomics: results are deterministic, and the split count depends on the input width only).
* Expand: programs (chunk, module slot, out-block): one launch covers q/k/v (or gate/up), each
  slot with its own width (GQA) and its own B^T; slots the adapter does not target and blocks
  past a slot's width return at once. The rank loop stops at the adapter's rank. The shrink
  partials are summed in split order, rounded to the weight dtype (as the torch path rounds
  its shrink output) and multiplied with fp32 accumulation.
* Weights: element e of an adapter's blob is read at page_table[a, e // P] * P + e % P
  (P = page_elems, a compile-time constant), so scattered pages cost no copy.
Under the Triton interpreter (TRITON_INTERPRET=1) the matmul inputs are upcast to fp32 (its
bf16 `tl.dot` is broken); fp32 models use IEEE fp32 dots on the GPU as well.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels.lora import GROUP_INDEX, MAX_SLOTS, LoRABatchMeta
from loraplex.kernels.triton_common import mma

BLOCK_R = 16  # rank-block (shrink output columns / expand reduction step)
BLOCK_K = 64  # shrink reduction step over the input features
BLOCK_N = 64  # expand output columns per program
SPLIT_K = 1024  # input features per shrink K-split (hidden 4096 -> 4 splits, 11008 -> 11)


@triton.jit
def _shrink_kernel(
    x_ptr, v_ptr, pool_ptr, table_ptr, offsets_ptr, group_cols_ptr,
    chunk_start_ptr, chunk_len_ptr, chunk_adapter_ptr,
    in_dim, k_per_split, stride_xm, stride_xk, stride_vs, stride_vm, table_stride, off_stride,
    off_index, group,
    PAGE_ELEMS: tl.constexpr, NUM_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    rb = tl.program_id(1)
    split = tl.program_id(2)
    a = tl.load(chunk_adapter_ptr + c)
    n_cols = tl.load(group_cols_ptr + a * NUM_GROUPS + group)
    if rb * BLOCK_R >= n_cols:  # past this adapter's n_targeted * rank (or group not targeted)
        return
    a_off = tl.load(offsets_ptr + a * off_stride + off_index)
    row0 = tl.load(chunk_start_ptr + c)
    m_len = tl.load(chunk_len_ptr + c)
    rows = tl.arange(0, BLOCK_M)
    cols = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < m_len
    col_mask = cols < n_cols
    x_rows = x_ptr + (row0 + rows).to(tl.int64)[:, None] * stride_xm
    w_rows = a_off + cols[:, None] * in_dim  # blob element of each A_cat row, int32
    table = table_ptr + a.to(tl.int64) * table_stride
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, in_dim)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_hi
        xt = tl.load(x_rows + ks[None, :] * stride_xk, row_mask[:, None] & k_mask[None, :], 0.0)
        e = w_rows + ks[None, :]
        w_mask = col_mask[:, None] & k_mask[None, :]
        page = tl.load(table + e // PAGE_ELEMS, w_mask, 0).to(tl.int64)
        w = tl.load(pool_ptr + page * PAGE_ELEMS + e % PAGE_ELEMS, w_mask, 0.0)
        acc += mma(xt, tl.trans(w), UPCAST)
    v_rows = v_ptr + split * stride_vs + (row0 + rows).to(tl.int64)[:, None] * stride_vm
    tl.store(v_rows + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _expand_kernel(
    v_ptr, y_ptr, pool_ptr, table_ptr, offsets_ptr, slot_cols_ptr, out_slices_ptr,
    ranks_ptr, scales_ptr, chunk_start_ptr, chunk_len_ptr, chunk_adapter_ptr,
    num_splits, stride_vs, stride_vm, stride_ym, stride_yn, table_stride, off_stride, off_index,
    group,
    PAGE_ELEMS: tl.constexpr, NUM_GROUPS: tl.constexpr, MAX_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    s = tl.program_id(1)
    nb = tl.program_id(2)
    a = tl.load(chunk_adapter_ptr + c)
    b_off = tl.load(offsets_ptr + a * off_stride + off_index + 1 + s)
    if b_off < 0:  # the adapter does not target this module
        return
    slot = group * MAX_SLOTS + s
    width = tl.load(out_slices_ptr + slot * 2 + 1)
    if nb * BLOCK_N >= width:  # past this module's output width (k/v under GQA)
        return
    lo = tl.load(out_slices_ptr + slot * 2)
    rank = tl.load(ranks_ptr + a)
    v_col = tl.load(slot_cols_ptr + a * (NUM_GROUPS * MAX_SLOTS) + slot)
    scale = tl.load(scales_ptr + a)
    row0 = tl.load(chunk_start_ptr + c)
    m_len = tl.load(chunk_len_ptr + c)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < m_len
    ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < width
    v_rows = v_ptr + (row0 + rows).to(tl.int64)[:, None] * stride_vm + v_col
    table = table_ptr + a.to(tl.int64) * table_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_mask = rs < rank
        v_mask = row_mask[:, None] & r_mask[None, :]
        vt = tl.load(v_rows + rs[None, :], v_mask, 0.0)
        for sp in range(1, num_splits):  # fixed order: deterministic
            vt += tl.load(v_rows + sp * stride_vs + rs[None, :], v_mask, 0.0)
        e = b_off + rs[:, None] * width + ns[None, :]
        w_mask = r_mask[:, None] & n_mask[None, :]
        page = tl.load(table + e // PAGE_ELEMS, w_mask, 0).to(tl.int64)
        w = tl.load(pool_ptr + page * PAGE_ELEMS + e % PAGE_ELEMS, w_mask, 0.0)
        acc += mma(vt.to(w.dtype), w, UPCAST)
    y_rows = y_ptr + (row0 + rows).to(tl.int64)[:, None] * stride_ym
    y_ptrs = y_rows + (lo + ns)[None, :] * stride_yn
    y_mask = row_mask[:, None] & n_mask[None, :]
    old = tl.load(y_ptrs, y_mask, 0.0)
    tl.store(y_ptrs, (old.to(tl.float32) + acc * scale).to(old.dtype), mask=y_mask)


INTERPRETED = not isinstance(_shrink_kernel, triton.runtime.JITFunction)


def lora_apply_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    layer: int,
    group: str,
    meta: LoRABatchMeta,
    *,
    split_k: int | None = None,
) -> None:
    """y[rows, slice_m] += scale * (x[rows] @ A_m^T) @ B_m^T for every chunk, in place.

    x: [T, in] group input; y: [T, out_total] fused base output (any strides), same dtype as
    the pool. `split_k` overrides the number of shrink K-splits (default: in / SPLIT_K)."""
    tm = meta.triton
    if tm is None:
        raise ValueError("LoRABatchMeta.triton is not set: build it with build_triton_lora_meta")
    g = GROUP_INDEX[group]
    max_cols = tm.max_cols[g]
    if tm.num_chunks == 0 or max_cols == 0:
        return
    pool = tm.pool
    if not 0 <= layer < tm.num_layers:
        raise IndexError(f"layer {layer} of {tm.num_layers}")
    T, in_dim = x.shape
    if x.dtype != pool.dtype or y.shape[0] != T:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} / y {tuple(y.shape)} / pool {pool.dtype}")
    rb = triton.cdiv(max_cols, BLOCK_R)
    splits = split_k or triton.cdiv(in_dim, SPLIT_K)
    k_per_split = triton.cdiv(triton.cdiv(in_dim, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(in_dim, k_per_split)  # every split gets >= 1 feature
    v = torch.empty((splits, T, max_cols), dtype=torch.float32, device=x.device)
    upcast = INTERPRETED or pool.dtype == torch.float32
    off_stride = tm.offsets.stride(0)
    off_index = layer * tm.offsets.stride(1) + g * tm.offsets.stride(2)
    chunks = (tm.chunk_start, tm.chunk_len, tm.chunk_adapter)
    _shrink_kernel[(tm.num_chunks, rb, splits)](
        x, v, pool, tm.page_table, tm.offsets, tm.group_cols, *chunks,
        in_dim, k_per_split, x.stride(0), x.stride(1), v.stride(0), v.stride(1),
        tm.page_table.stride(0), off_stride, off_index, g,
        PAGE_ELEMS=tm.page_elems, NUM_GROUPS=tm.group_cols.shape[1], BLOCK_M=tm.chunk,
        BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, UPCAST=upcast,
    )  # fmt: skip
    grid = (tm.num_chunks, MAX_SLOTS, triton.cdiv(tm.max_width[g], BLOCK_N))
    _expand_kernel[grid](
        v, y, pool, tm.page_table, tm.offsets, tm.slot_cols, tm.out_slices, tm.ranks, tm.scales,
        *chunks, splits, v.stride(0), v.stride(1), y.stride(0), y.stride(1),
        tm.page_table.stride(0), off_stride, off_index, g,
        PAGE_ELEMS=tm.page_elems, NUM_GROUPS=tm.group_cols.shape[1], MAX_SLOTS=MAX_SLOTS,
        BLOCK_M=tm.chunk, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, UPCAST=upcast,
    )  # fmt: skip


def aot_compile(
    kernel,
    args: dict[str, object],
    constexprs: dict[str, object],
    *,
    num_warps: int = 4,
    capability: int = 90,
) -> str:
    """Compile a kernel for an NVIDIA GPU of compute `capability` with no GPU present (Triton's
    bundled ptxas) and return cuobjdump's resource line ("REG:.. STACK:.." ; "" without
    cuobjdump). Run it in a process without TRITON_INTERPRET. `args`: a pointer type string
    ("*bf16") per pointer, a sample value per scalar (ints divisible by 16 get the JIT's
    divisibility hint, as at run time); unlisted scalars are ints with no hint."""
    import os
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = args.get(name, 3)
        if name in constexprs:
            sig[name] = "constexpr"
        elif isinstance(value, str):
            sig[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=num_warps)
    )
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True)
    lines = [ln.strip() for ln in out.stdout.decode().splitlines() if "REG:" in ln]
    return lines[0].split(" SHARED")[0] if lines else ""


def compile_all(
    capability: int = 90, dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")
) -> dict[str, str]:
    """AOT-compile both LoRA kernels at the default launch configuration for 16-bit and fp32
    pools (CI check without a GPU); returns name -> resource usage."""
    usage = {}
    for dt in dtypes:
        ptrs = {n: "*i32" for n in _shrink_kernel.arg_names if n.endswith("_ptr")}
        ptrs.update(x_ptr=f"*{dt}", pool_ptr=f"*{dt}", v_ptr="*fp32", stride_xk=1)
        ptrs.update(in_dim=4096, k_per_split=1024, stride_xm=4096, stride_vm=96, table_stride=147)
        consts = dict(PAGE_ELEMS=1 << 20, NUM_GROUPS=4, BLOCK_M=16, BLOCK_R=BLOCK_R,
                      BLOCK_K=BLOCK_K, UPCAST=dt == "fp32")  # fmt: skip
        usage[f"shrink {dt}"] = aot_compile(_shrink_kernel, ptrs, consts, capability=capability)
        ptrs = {n: "*i32" for n in _expand_kernel.arg_names if n.endswith("_ptr")}
        ptrs.update(y_ptr=f"*{dt}", pool_ptr=f"*{dt}", v_ptr="*fp32", scales_ptr="*fp32")
        ptrs.update(stride_vm=96, stride_ym=6144, table_stride=147)
        consts = dict(PAGE_ELEMS=1 << 20, NUM_GROUPS=4, MAX_SLOTS=MAX_SLOTS, BLOCK_M=16,
                      BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, UPCAST=dt == "fp32")  # fmt: skip
        usage[f"expand {dt}"] = aot_compile(
            _expand_kernel, dict(ptrs, stride_yn=1), consts, capability=capability
        )
    return usage
