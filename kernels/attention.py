"""Paged attention over the unified pool's KV pages: torch path (CPU fast path and reference).

Cache view per layer: `k_cache`, `v_cache` are [num_pages, block_size, kv_heads, head_dim]
(strided views into the pool; see memory/pool.py for the page geometry). A token at position
p of a sequence lives at (block_table[p // block_size], p % block_size).

A step's sequences are split into at most two groups (decodes: one query each; prefill chunks:
several), each computed with one padded scaled-dot-product call. All index and mask tensors are
built once per step (`build_attention_meta`) and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnGroup:
    """G sequences padded to Q queries and L keys.

    q_index [G, Q]: token row of each query (padding points at row 0);
    valid [G*Q] bool: which padded queries are real (rows are written back only for those);
    out_rows [n_valid]: token rows of the real queries, in padded order;
    key_pages, key_offsets [G, L]: where each key lives in the cache (padding -> page 0, slot 0);
    mask [G, 1, Q, L] bool: True = attend (causal within the context, padding masked).
    """

    q_index: torch.Tensor
    valid: torch.Tensor
    out_rows: torch.Tensor
    key_pages: torch.Tensor
    key_offsets: torch.Tensor
    mask: torch.Tensor


@dataclass
class AttentionMeta:
    slot_pages: torch.Tensor  # [T] page of each new token's K/V
    slot_offsets: torch.Tensor  # [T] slot inside that page
    groups: list[AttnGroup]


def build_attention_meta(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str,
) -> AttentionMeta:
    """Per-step metadata. Sequence i contributes `query_lens[i]` consecutive token rows (in
    order) whose positions are `context_lens[i] - query_lens[i] ... context_lens[i] - 1`."""
    slot_pages, slot_offsets = [], []
    starts = []
    row = 0
    for q_len, ctx, table in zip(query_lens, context_lens, block_tables, strict=True):
        starts.append(row)
        row += q_len
        for pos in range(ctx - q_len, ctx):
            slot_pages.append(table[pos // block_size])
            slot_offsets.append(pos % block_size)
    groups = []
    for members in (
        [i for i, q in enumerate(query_lens) if q == 1],
        [i for i, q in enumerate(query_lens) if q > 1],
    ):
        if members:
            groups.append(
                _build_group(members, starts, query_lens, context_lens, block_tables, block_size)
            )
    as_long = dict(dtype=torch.long, device=device)
    for g in groups:
        for name in ("q_index", "valid", "out_rows", "key_pages", "key_offsets", "mask"):
            setattr(g, name, getattr(g, name).to(device))
    return AttentionMeta(
        torch.tensor(slot_pages, **as_long), torch.tensor(slot_offsets, **as_long), groups
    )


def _build_group(members, starts, query_lens, context_lens, block_tables, block_size) -> AttnGroup:
    G = len(members)
    Q = max(query_lens[i] for i in members)
    L = max(context_lens[i] for i in members)
    q_index = torch.zeros(G, Q, dtype=torch.long)
    valid = torch.zeros(G, Q, dtype=torch.bool)
    key_pages = torch.zeros(G, L, dtype=torch.long)
    key_offsets = torch.zeros(G, L, dtype=torch.long)
    mask = torch.ones(G, 1, Q, L, dtype=torch.bool)  # padded query rows attend everywhere (no NaN)
    keys = torch.arange(L)
    for g, i in enumerate(members):
        q_len, ctx = query_lens[i], context_lens[i]
        q_index[g, :q_len] = torch.arange(starts[i], starts[i] + q_len)
        valid[g, :q_len] = True
        pos = torch.arange(ctx)
        table = torch.tensor(block_tables[i][: (ctx + block_size - 1) // block_size])
        key_pages[g, :ctx] = table[pos // block_size]
        key_offsets[g, :ctx] = pos % block_size
        q_pos = torch.arange(ctx - q_len, ctx).unsqueeze(1)  # [q_len, 1]
        mask[g, 0, :q_len] = keys.unsqueeze(0) <= q_pos
    valid = valid.reshape(-1)
    return AttnGroup(q_index, valid, q_index.reshape(-1)[valid], key_pages, key_offsets, mask)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMeta,
) -> None:
    """Store new keys/values [T, kv_heads, head_dim] into their pages (in place)."""
    k_cache[meta.slot_pages, meta.slot_offsets] = k
    v_cache[meta.slot_pages, meta.slot_offsets] = v


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMeta,
    scale: float,
) -> torch.Tensor:
    """q [T, heads, head_dim] -> out [T, heads, head_dim]. New K/V must already be written."""
    out = torch.empty_like(q)
    for g in meta.groups:
        qg = q[g.q_index].transpose(1, 2)  # [G, heads, Q, hd]
        kg = k_cache[g.key_pages, g.key_offsets].transpose(1, 2)  # [G, kv_heads, L, hd]
        vg = v_cache[g.key_pages, g.key_offsets].transpose(1, 2)
        og = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=kg.shape[1] != qg.shape[1]
        )  # [G, heads, Q, hd]
        og = og.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])[g.valid]
        out[g.out_rows] = og
    return out


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense causal reference for one sequence whose queries are the last q.shape[0] of the
    keys. q [Q, heads, hd], k/v [L, kv_heads, hd] -> [Q, heads, hd], float32."""
    Q, H, _ = q.shape
    L, KH, _ = k.shape
    rep = H // KH
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    q_pos = torch.arange(L - Q, L).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(L).unsqueeze(0) > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vf)
