"""The CPU decode attention kernel (kernels/attention_cpu.c via kernels/attention_cpu.py) against
the dense reference and the torch paged path, on scattered pages; and how it refuses what it
cannot read."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.kernels.attention import (
    attention_reference,
    build_attention_meta,
    paged_attention,
    write_kv,
)
from loraplex.kernels.attention_cpu import decode_kernel_refusal, paged_attention_cpu
from loraplex.kernels.cpu_build import cpu_kernel_error

pytestmark = pytest.mark.skipif(cpu_kernel_error() is not None, reason="no C compiler")


def _case(seqs, block_size, heads, kv_heads, hd, dtype, seed, num_layers=2, layer=1):
    """A pool laid out as the engine's ([pages, layers, 2, block, kv_heads, hd]), each
    sequence's context on shuffled pages (page 0 unused), new keys written by write_kv.
    seqs: (context length, query length). Returns (q, k_cache, v_cache, meta, full_k, full_v)."""
    gen = torch.Generator().manual_seed(seed)
    need = sum(-(-ctx // block_size) for ctx, _ in seqs)
    num_pages = need + 3
    pool = torch.randn(num_pages, num_layers, 2, block_size, kv_heads, hd, generator=gen)
    pool = pool.to(dtype)
    k_cache, v_cache = pool[:, layer, 0], pool[:, layer, 1]
    free = list(range(1, num_pages))
    random.Random(seed).shuffle(free)
    tables, full_k, full_v = [], [], []
    for ctx, q_len in seqs:
        table = [free.pop() for _ in range(-(-ctx // block_size))]
        table += [free[-1]] * random.Random(ctx).randint(0, 1)  # a table may run past ctx
        tables.append(table)
        k = torch.randn(ctx, kv_heads, hd, generator=gen).to(dtype)
        v = torch.randn(ctx, kv_heads, hd, generator=gen).to(dtype)
        for pos in range(ctx - q_len):
            k_cache[table[pos // block_size], pos % block_size] = k[pos]
            v_cache[table[pos // block_size], pos % block_size] = v[pos]
        full_k.append(k)
        full_v.append(v)
    q_lens, ctxs = [q for _, q in seqs], [c for c, _ in seqs]
    meta = build_attention_meta(
        q_lens, ctxs, tables, block_size, "cpu", triton_fields=False, decode_tables=True
    )
    new_k = torch.cat([k[c - q :] for (c, q), k in zip(seqs, full_k, strict=True)])
    new_v = torch.cat([v[c - q :] for (c, q), v in zip(seqs, full_v, strict=True)])
    write_kv(k_cache, v_cache, new_k, new_v, meta)
    q = torch.randn(sum(q_lens), heads, hd, generator=gen).to(dtype)
    return q, k_cache, v_cache, meta, full_k, full_v


def _check(seqs, out, q, full_k, full_v, scale, dtype):
    row = 0
    for (_ctx, q_len), k, v in zip(seqs, full_k, full_v, strict=True):
        ref = attention_reference(q[row : row + q_len].float(), k.float(), v.float(), scale)
        got = out[row : row + q_len].float()
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-6)
        elif q_len == 1:  # the kernel: inputs widen exactly, only the output is rounded
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=2**-8)
        else:  # prefill rows, torch's bf16 SDPA (which rounds inside)
            torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
        row += q_len


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,kv_heads,hd,block_size",
    [(4, 4, 32, 4), (4, 2, 16, 1), (8, 1, 64, 16), (16, 1, 48, 4), (12, 4, 128, 8)],
)
def test_decode_kernel_matches_dense_reference(heads, kv_heads, hd, block_size, dtype):
    # decodes (one query) between prefill chunks: the kernel's rows are not contiguous
    seqs = [(9, 1), (1, 1), (13, 5), (6, 1), (40, 1), (17, 1), (4, 3), (block_size * 3, 1)]
    q, k_cache, v_cache, meta, full_k, full_v = _case(
        seqs, block_size, heads, kv_heads, hd, dtype, seed=heads + hd + block_size
    )
    assert meta.decode_tables is not None and len(meta.groups) == 1  # prefills: torch group
    assert meta.decode_tables.rows.tolist() == [0, 1, 7, 8, 9, 13]  # token rows
    out = paged_attention_cpu(q, k_cache, v_cache, meta, hd**-0.5)
    _check(seqs, out, q, full_k, full_v, hd**-0.5, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_items_of_part_of_a_sequences_heads(dtype):
    """Work items cover some of a sequence's kv heads: with more query heads than one item
    holds (64 heads over 8 kv heads), and with fewer sequences than threads (one sequence,
    its kv heads split between threads)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for heads, kv_heads, seqs in [(64, 8, [(37, 1), (20, 1), (5, 2)]), (4, 4, [(50, 1)])]:
            q, k_cache, v_cache, meta, full_k, full_v = _case(
                seqs, 4, heads, kv_heads, 16, dtype, seed=heads
            )
            out = paged_attention_cpu(q, k_cache, v_cache, meta, 0.25)
            _check(seqs, out, q, full_k, full_v, 0.25, dtype)
    finally:
        torch.set_num_threads(threads)


def test_decode_only_batch_and_extreme_scores():
    """No torch group at all; huge score gaps (exp underflow to 0 for all but one key) and
    equal scores (uniform weights) both come out right."""
    seqs = [(70, 1), (33, 1), (1, 1)]
    q, k_cache, v_cache, meta, full_k, full_v = _case(seqs, 16, 4, 2, 32, torch.float32, seed=5)
    assert meta.groups == []
    for scale in (0.125, 60.0, 0.0):
        out = paged_attention_cpu(q, k_cache, v_cache, meta, scale)
        _check(seqs, out, q, full_k, full_v, scale, torch.float32)


def test_same_result_alone_and_in_a_batch():
    seqs = [(23, 1), (57, 1), (8, 4), (31, 1)]
    q, k_cache, v_cache, meta, _, _ = _case(seqs, 4, 8, 2, 64, torch.bfloat16, seed=9)
    batch = paged_attention_cpu(q, k_cache, v_cache, meta, 0.125)
    tables = meta.decode_tables
    alone = build_attention_meta(
        [1], [57], [tables.tables[1].tolist()], 4, "cpu", triton_fields=False, decode_tables=True
    )
    out = paged_attention_cpu(q[1:2], k_cache, v_cache, alone, 0.125)
    assert torch.equal(out[0], batch[1])


def test_refuses_what_it_cannot_read():
    seqs = [(10, 1), (5, 1)]
    q, k_cache, v_cache, meta, _, _ = _case(seqs, 4, 4, 2, 32, torch.float32, seed=1)
    with pytest.raises(ValueError, match="CPU attention kernel"):
        paged_attention_cpu(q.to(torch.bfloat16), k_cache, v_cache, meta, 0.1)  # dtypes differ
    with pytest.raises(ValueError, match="largest page"):
        paged_attention_cpu(q, k_cache[:2], v_cache[:2], meta, 0.1)  # pages past the cache
    with pytest.raises(ValueError, match="CPU attention kernel"):
        paged_attention_cpu(q[:1], k_cache, v_cache, meta, 0.1)  # a query row past q
    with pytest.raises(ValueError, match="decode_tables are for the CPU kernel"):
        paged_attention(q, k_cache, v_cache, meta, 0.1)
    # a table too short for the context, no keys, more queries than keys
    for q_len, ctx, table in ((1, 9, [3, 4]), (1, 0, [3]), (3, 2, [3])):
        with pytest.raises(ValueError, match=f"{q_len} queries, context of {ctx} keys, block"):
            build_attention_meta([q_len], [ctx], [table], 4, "cpu", decode_tables=True)
    assert decode_kernel_refusal(8, 2, 64, torch.float32) is None
    assert "head_dim 8" in decode_kernel_refusal(8, 2, 8, torch.float32)
    assert "head_dim 256" in decode_kernel_refusal(8, 2, 256, torch.bfloat16)
    assert "float16" in decode_kernel_refusal(8, 2, 64, torch.float16)
    assert "32 query heads over 1" in decode_kernel_refusal(32, 1, 64, torch.float32)


def test_engine_falls_back_for_heads_the_kernel_does_not_handle(tmp_path, caplog):
    """head_dim 8: auto uses the torch path with a warning naming why; an explicit "cpu" is an
    error. The supported tiny model gets the kernel."""
    import logging

    from fixtures import make_tiny_model

    from loraplex.engine.llm import LLM

    model = make_tiny_model(tmp_path / "m", hidden_size=32, num_heads=4, num_kv_heads=2)
    with caplog.at_level(logging.WARNING, logger="loraplex.engine.engine"):
        llm = LLM(model, pool_bytes=2 << 20)
    assert llm.engine.backends["attention"] == "torch"
    assert "torch attention path" in caplog.text and "head_dim 8" in caplog.text
    assert len(llm.generate([[1, 2, 3]])[0].token_ids) > 0
    with pytest.raises(RuntimeError, match="attention_backend 'cpu'.*head_dim 8"):
        LLM(model, pool_bytes=2 << 20, attention_backend="cpu")
