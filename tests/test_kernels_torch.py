"""The torch paths of kernels/ against their plain per-token references."""

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
from loraplex.kernels.lora import (
    GROUPS,
    LoRABatchMeta,
    LoRASegment,
    blob_views,
    lora_apply_torch,
    lora_layout,
    lora_reference,
    module_dims,
    pack_blob,
)

HIDDEN, Q_DIM, KV_DIM, INTER, LAYERS = 32, 32, 16, 48, 2
DIMS = module_dims(HIDDEN, Q_DIM, KV_DIM, INTER)
ALL = tuple(DIMS)


def _adapter(rank, targets, gen):
    A = {
        (l, m): torch.randn(rank, DIMS[m][0], generator=gen) for l in range(LAYERS) for m in targets
    }
    B = {
        (l, m): torch.randn(DIMS[m][1], rank, generator=gen) for l in range(LAYERS) for m in targets
    }
    return A, B


def test_layout_is_proportional_to_rank_and_covers_blob():
    lay8 = lora_layout(8, ALL, LAYERS, DIMS)
    lay16 = lora_layout(16, ALL, LAYERS, DIMS)
    per_rank = sum(i + o for i, o in DIMS.values()) * LAYERS
    assert lay8.num_elems == 8 * per_rank
    assert lay16.num_elems == 2 * lay8.num_elems
    qv = lora_layout(4, ("q_proj", "v_proj"), LAYERS, DIMS)
    assert qv.num_elems == 4 * LAYERS * (HIDDEN + Q_DIM + HIDDEN + KV_DIM)
    assert set(qv.layers[0]) == {"qkv"}
    assert qv.layers[0]["qkv"].out_slices == ((0, Q_DIM), (Q_DIM + KV_DIM, Q_DIM + 2 * KV_DIM))
    with pytest.raises(ValueError, match="lm_head"):
        lora_layout(4, ("lm_head",), LAYERS, DIMS)


@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("num_adapters", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segmented_lora_matches_reference(rank, num_adapters, dtype):
    gen = torch.Generator().manual_seed(rank * 100 + num_adapters)
    rng = random.Random(rank + num_adapters)
    adapters, segments, token_adapter = [], [], []
    row = 0
    n_base = 3
    token_adapter += [-1] * n_base  # base-only rows first, as the runner orders them
    row = n_base
    for idx in range(num_adapters):
        r = rank if idx % 2 == 0 else max(1, rank // 2 + idx % 3)  # mixed ranks
        targets = ALL if idx % 3 else ("q_proj", "v_proj", "down_proj")
        A, B = _adapter(r, targets, gen)
        layout = lora_layout(r, targets, LAYERS, DIMS)
        blob = torch.empty(layout.num_elems, dtype=dtype)
        pack_blob(layout, A, B, blob)
        scale = 0.5 + idx / 10
        n = rng.randint(1, 5)
        segments.append(LoRASegment(row, row + n, idx, r, scale, blob_views(layout, blob)))
        adapters.append((A, B, scale, targets))
        token_adapter += [idx] * n
        row += n
    meta = LoRABatchMeta(segments)
    T = row
    for layer in range(LAYERS):
        for group, mods in GROUPS.items():
            in_dim = DIMS[mods[0]][0]
            out_dims = [DIMS[m][1] for m in mods]
            x = torch.randn(T, in_dim, generator=gen).to(dtype)
            y0 = torch.randn(T, sum(out_dims), generator=gen).to(dtype)
            y = y0.clone()
            lora_apply_torch(x, y, layer, group, meta)
            lo = 0
            for m, out in zip(mods, out_dims, strict=True):
                As = [a[0].get((layer, m), torch.zeros(1, in_dim)) for a in adapters]
                Bs = [a[1].get((layer, m), torch.zeros(out, 1)) for a in adapters]
                scales = [a[2] for a in adapters]
                ref = y0[:, lo : lo + out].float() + lora_reference(
                    x.to(dtype).float(),
                    token_adapter,
                    [a.to(dtype) for a in As],
                    [b.to(dtype) for b in Bs],
                    scales,
                )
                got = y[:, lo : lo + out].float()
                tol = 1e-4 if dtype == torch.float32 else 0.05 * max(1.0, ref.abs().max().item())
                torch.testing.assert_close(
                    got, ref, atol=tol, rtol=1e-2 if dtype != torch.float32 else 1e-5
                )
                lo += out
            # base-only rows are never touched: exact equality
            assert torch.equal(y[:n_base], y0[:n_base])


def test_no_adapter_batch_has_no_lora():
    assert not LoRABatchMeta([]).has_lora


def _paged_case(seqs, block_size, num_pages, kv_heads, heads, hd, gen):
    """Scatter each sequence's K/V into shuffled (non-contiguous) pages."""
    k_cache = torch.zeros(num_pages, block_size, kv_heads, hd)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(1, num_pages))  # page 0 left unused: padding must not matter
    random.Random(0).shuffle(free)
    tables, full_k, full_v = [], [], []
    for ctx, _ in seqs:
        nb = -(-ctx // block_size)
        tables.append([free.pop() for _ in range(nb)])
        full_k.append(torch.randn(ctx, kv_heads, hd, generator=gen))
        full_v.append(torch.randn(ctx, kv_heads, hd, generator=gen))
    return k_cache, v_cache, tables, full_k, full_v


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_paged_attention_matches_dense_reference(heads, kv_heads):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    hd, block_size = 8, 4
    seqs = [(9, 1), (1, 1), (13, 5), (6, 6), (17, 1), (4, 3)]  # (context length, query length)
    k_cache, v_cache, tables, full_k, full_v = _paged_case(
        seqs, block_size, 40, kv_heads, heads, hd, gen
    )
    # Pre-fill the cached context (positions before this step's queries).
    for (ctx, q_len), table, k, v in zip(seqs, tables, full_k, full_v, strict=True):
        for pos in range(ctx - q_len):
            k_cache[table[pos // block_size], pos % block_size] = k[pos]
            v_cache[table[pos // block_size], pos % block_size] = v[pos]
    meta = build_attention_meta(
        [q for _, q in seqs], [c for c, _ in seqs], tables, block_size, "cpu"
    )
    new_k = torch.cat([k[c - q :] for (c, q), k in zip(seqs, full_k, strict=True)])
    new_v = torch.cat([v[c - q :] for (c, q), v in zip(seqs, full_v, strict=True)])
    write_kv(k_cache, v_cache, new_k, new_v, meta)
    q = torch.randn(sum(q for _, q in seqs), heads, hd, generator=gen)
    out = paged_attention(q, k_cache, v_cache, meta, hd**-0.5)
    row = 0
    for (_ctx, q_len), k, v in zip(seqs, full_k, full_v, strict=True):
        ref = attention_reference(q[row : row + q_len], k, v, hd**-0.5)
        torch.testing.assert_close(out[row : row + q_len], ref, atol=1e-5, rtol=1e-5)
        row += q_len
    # write_kv placed every new token where the block table says
    for (ctx, _q_len), table, k in zip(seqs, tables, full_k, strict=True):
        for pos in range(ctx):
            assert torch.equal(k_cache[table[pos // block_size], pos % block_size], k[pos])


def _group_by_sequence(members, starts, query_lens, context_lens, tables, block_size):
    """The padded group tensors built one sequence at a time, as the docstring of AttnGroup
    states them: the reference for the whole-group builder."""
    G = len(members)
    Q = max(query_lens[i] for i in members)
    L = max(context_lens[i] for i in members)
    q_index = torch.zeros(G, Q, dtype=torch.long)
    valid = torch.zeros(G, Q, dtype=torch.bool)
    pages = torch.zeros(G, L, dtype=torch.long)
    offsets = torch.zeros(G, L, dtype=torch.long)
    mask = torch.ones(G, 1, Q, L, dtype=torch.bool)
    for g, i in enumerate(members):
        q_len, ctx = query_lens[i], context_lens[i]
        for q in range(q_len):
            q_index[g, q] = starts[i] + q
            valid[g, q] = True
            for key in range(L):
                mask[g, 0, q, key] = key <= ctx - q_len + q
        for pos in range(ctx):
            pages[g, pos] = tables[i][pos // block_size]
            offsets[g, pos] = pos % block_size
    return q_index, valid.reshape(-1), pages, offsets, mask


def test_attention_groups_match_per_sequence_construction():
    rng = random.Random(3)
    block_size = 4
    for _ in range(20):
        n = rng.randint(1, 7)
        query_lens = [rng.choice([1, 1, rng.randint(1, 9)]) for _ in range(n)]
        context_lens = [q + rng.randint(0, 14) for q in query_lens]
        tables = [rng.sample(range(1, 60), -(-c // block_size) + rng.randint(0, 2))
                  for c in context_lens]  # fmt: skip
        meta = build_attention_meta(
            query_lens, context_lens, tables, block_size, "cpu", triton_fields=False
        )
        starts = [sum(query_lens[:i]) for i in range(n)]
        decodes = [i for i, q in enumerate(query_lens) if q == 1]
        prefills = [i for i, q in enumerate(query_lens) if q > 1]
        assert len(meta.groups) == bool(decodes) + bool(prefills)
        for g, members in zip(meta.groups, [m for m in (decodes, prefills) if m], strict=True):
            q_index, valid, pages, offsets, mask = _group_by_sequence(
                members, starts, query_lens, context_lens, tables, block_size
            )
            assert torch.equal(g.q_index, q_index) and torch.equal(g.valid, valid)
            assert torch.equal(g.out_rows, q_index.reshape(-1)[valid])
            assert torch.equal(g.key_pages, pages) and torch.equal(g.key_offsets, offsets)
            assert torch.equal(g.mask, mask), (query_lens, context_lens)
