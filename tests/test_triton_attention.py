"""Triton paged attention and KV write against the dense reference and the torch path.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before
triton is imported; the module is skipped if triton was imported earlier without it). The caches
are strided views of a pool laid out like the engine's ([pages, layers, 2, block, kv_heads, hd]).
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:  # its own @jit helpers (tl.max, tl.cdiv) are compiled-mode now
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set: set it in tests/conftest.py",
            allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from triton_compile import assert_compiles_for_hopper, needs_ptxas  # noqa: E402

from loraplex.kernels import attention_triton  # noqa: E402
from loraplex.kernels.attention import (  # noqa: E402
    attention_reference,
    build_attention_meta,
    paged_attention,
    triton_q_tile,
    write_kv,
)

DEVICE = "cuda" if CUDA else "cpu"


def make_case(seqs, heads, kv_heads, hd, block_size, dtype, seed, layers=2, extra_pages=5):
    """seqs: (context length, query length) per sequence. K/V of the cached context are in
    shuffled pages of layer 1 of an engine-shaped pool (other slots NaN); returns the caches,
    the new K/V and q (token rows in sequence order), the full K/V and the block tables."""
    gen = torch.Generator().manual_seed(seed)
    n_blocks = [-(-ctx // block_size) for ctx, _ in seqs]
    num_pages = sum(n_blocks) + extra_pages
    pool = torch.full((num_pages, layers, 2, block_size, kv_heads, hd), float("nan"), dtype=dtype)
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]  # strided: page stride = whole page
    free = list(range(num_pages))
    random.Random(seed).shuffle(free)
    tables, full_k, full_v = [], [], []
    for (ctx, q_len), nb in zip(seqs, n_blocks, strict=True):
        table = [free.pop() for _ in range(nb)]
        k = torch.randn(ctx, kv_heads, hd, generator=gen).to(dtype)
        v = torch.randn(ctx, kv_heads, hd, generator=gen).to(dtype)
        for pos in range(ctx - q_len):
            k_cache[table[pos // block_size], pos % block_size] = k[pos]
            v_cache[table[pos // block_size], pos % block_size] = v[pos]
        tables.append(table)
        full_k.append(k)
        full_v.append(v)
    new_k = torch.cat([k[c - q :] for (c, q), k in zip(seqs, full_k, strict=True)])
    new_v = torch.cat([v[c - q :] for (c, q), v in zip(seqs, full_v, strict=True)])
    q = torch.randn(sum(q for _, q in seqs), heads, hd, generator=gen).to(dtype)
    return dict(pool=pool, tables=tables, full_k=full_k, full_v=full_v, new_k=new_k,
                new_v=new_v, q=q)  # fmt: skip


def run_case(seqs, heads, kv_heads, hd, block_size, dtype, seed, q_tile=16, num_splits=None):
    c = make_case(seqs, heads, kv_heads, hd, block_size, dtype, seed)
    meta = build_attention_meta(
        [q for _, q in seqs], [ctx for ctx, _ in seqs], c["tables"], block_size, DEVICE,
        q_tile=q_tile,
    )  # fmt: skip
    pool = c["pool"].to(DEVICE)
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
    attention_triton.write_kv_triton(
        k_cache, v_cache, c["new_k"].to(DEVICE), c["new_v"].to(DEVICE), meta
    )
    pool_cpu = pool.cpu()
    for (ctx, _), table, k, v in zip(seqs, c["tables"], c["full_k"], c["full_v"], strict=True):
        for pos in range(ctx):  # every token where its block table says, bit for bit
            page, slot = table[pos // block_size], pos % block_size
            assert torch.equal(pool_cpu[page, 1, 0, slot], k[pos])
            assert torch.equal(pool_cpu[page, 1, 1, slot], v[pos])
    assert pool_cpu[:, 0].isnan().all(), "write_kv touched another layer"
    scale = hd**-0.5
    out = attention_triton.paged_attention_triton(
        c["q"].to(DEVICE), k_cache, v_cache, meta, scale, num_splits=num_splits
    ).cpu()
    assert out.dtype == dtype and out.shape == c["q"].shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    row = 0
    for (_, q_len), k, v in zip(seqs, c["full_k"], c["full_v"], strict=True):
        ref = attention_reference(c["q"][row : row + q_len], k, v, scale)
        torch.testing.assert_close(out[row : row + q_len].float(), ref, **tol)
        row += q_len
    return out, c, meta


MIXED = [(9, 1), (1, 1), (13, 5), (6, 6), (70, 1), (40, 3), (33, 33)]  # (context, queries)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_decode_prefill_matches_reference(heads, kv_heads, dtype):
    """Decodes, prefill chunks over cached context, whole prefills (33 > q_tile queries),
    contexts over many blocks, GQA groups 1/2/8/2 with 6 heads."""
    run_case(MIXED, heads, kv_heads, 8, 4, dtype, heads * 10 + kv_heads)


def test_matches_torch_path_and_odd_head_dim():
    """Head dim 12 (padded to 16), block size 3, q_tile 4: agrees with the torch path."""
    seqs = [(10, 1), (20, 7), (5, 5), (1, 1)]
    out, c, meta = run_case(seqs, 4, 2, 12, 3, torch.float32, 5, q_tile=4)
    assert meta.q_tile == 4 and meta.work_seq.tolist() == [0, 1, 1, 2, 2, 3]
    assert meta.work_qstart.tolist() == [0, 0, 4, 0, 4, 0]
    k_cache, v_cache = c["pool"][:, 1, 0], c["pool"][:, 1, 1]
    write_kv(k_cache, v_cache, c["new_k"], c["new_v"], meta)
    ref = paged_attention(c["q"], k_cache, v_cache, meta, 12**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [None, 4])
def test_decode_splits(num_splits):
    """Decode-only batch: long contexts split over programs (heuristic and forced), merged."""
    seqs = [(300, 1), (5, 1), (129, 1)]
    _, c, meta = run_case(seqs, 4, 2, 16, 16, torch.float32, 9, num_splits=num_splits)
    assert meta.max_query_len == 1 and meta.q_tile == 1
    assert attention_triton.decode_splits(meta, 2) == 1  # 300 keys: below MIN_KEYS_PER_SPLIT
    long = dict(meta.__dict__, max_context_len=4096)
    assert attention_triton.decode_splits(type(meta)(**long), 2) == 16


def test_split_keys_with_prefill_rows():
    """Forced splits also hold for prefill tiles (rows whose causal limit ends in an early
    split see empty later splits)."""
    run_case([(70, 20), (9, 1)], 4, 4, 8, 4, torch.float32, 3, num_splits=2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_contexts(dtype):
    seqs = [(257, 1), (200, 64), (130, 130), (3, 1)]
    run_case(seqs, 8, 2, 16, 16, dtype, 4)
    run_case([(600, 1), (333, 1)], 8, 2, 16, 8, dtype, 5, num_splits=8)


def test_meta_fields_and_q_tile():
    meta = build_attention_meta([1, 3, 2], [5, 3, 9], [[7, 2], [4], [1, 8, 3]], 4, "cpu", q_tile=2)
    assert meta.block_tables.tolist() == [[7, 2, 0], [4, 0, 0], [1, 8, 3]]
    assert meta.query_starts.tolist() == [0, 1, 4, 6]
    assert meta.context_lens.tolist() == [5, 3, 9] and meta.query_lens.tolist() == [1, 3, 2]
    assert (meta.work_seq.tolist(), meta.work_qstart.tolist()) == ([0, 1, 1, 2], [0, 0, 2, 0])
    assert (meta.max_query_len, meta.max_context_len) == (3, 9)
    assert len(meta.groups) == 2
    assert build_attention_meta([1], [5], [[7, 2]], 4, "cpu", torch_groups=False).groups == []
    assert [triton_q_tile(32, 32), triton_q_tile(32, 8), triton_q_tile(28, 4)] == [64, 16, 8]
    assert triton_q_tile(64, 1) == 1
    empty = build_attention_meta([], [], [], 4, "cpu")
    q = torch.zeros(0, 4, 8)
    cache = torch.zeros(2, 4, 4, 8)
    assert attention_triton.paged_attention_triton(q, cache, cache, empty, 1.0).shape == (0, 4, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_shapes(dtype):
    """Llama-2-7B (32 x 128, MHA) and a GQA (32 q / 8 kv) layer at block size 16 on the GPU."""
    seqs = [(1000, 1), (517, 1), (300, 300), (2100, 64), (17, 1)]
    for heads, kv_heads in ((32, 32), (32, 8)):
        run_case(seqs, heads, kv_heads, 128, 16, dtype, 1, q_tile=triton_q_tile(heads, kv_heads))
        run_case([(4096, 1), (3000, 1)], heads, kv_heads, 128, 16, dtype, 2)  # splits


@needs_ptxas
def test_kernels_compile_for_hopper(tmp_path):
    assert_compiles_for_hopper("loraplex.kernels.attention_triton", ("bf16",), tmp_path)


def test_bench_decode_case():
    """kernels.bench's decode case: both paths agree and the K/V byte count is right."""
    from loraplex.kernels import bench

    q, k_cache, v_cache, meta, kv_bytes = bench.decode_case(3, 40, 4, 2, 16, torch.float32, DEVICE)
    assert kv_bytes == 3 * 40 * 2 * 16 * 2 * 4 and meta.q_tile == 1
    out = attention_triton.paged_attention_triton(q, k_cache, v_cache, meta, 0.25)
    ref = paged_attention(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
