"""Paged attention over the unified pool's KV pages: torch path (CPU fast path and reference).

Cache view per layer: `k_cache`, `v_cache` are [num_pages, block_size, kv_heads, head_dim]
(strided views into the pool; see memory/pool.py for the page geometry). A token at position
p of a sequence lives at (block_table[p // block_size], p % block_size).

A step's sequences are split into at most two groups (decodes: one query each; prefill chunks:
several), each computed with one padded scaled-dot-product call. All index and mask tensors are
built once per step (`build_attention_meta`) and reused by every layer. The same metadata also
carries what the Triton kernels (kernels/attention_triton.py) read: block tables, lengths and
the list of query tiles; and, for the CPU kernel (kernels/attention_cpu.py), the decode
sequences' block tables in place of their padded group.
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
    key_rows: tuple[int, torch.Tensor] | None = None  # (rows_per_page, flat row index [G*L])


@dataclass
class DecodeTables:
    """The decode sequences of a step for kernels that read K/V pages in place (host int32):
    tables [S, max_blocks] (padded with page 0), ctx [S] context lengths (>= 1, the new key
    included), rows [S] each query's token row; max_page, max_row: the largest page id in
    `tables` and row in `rows` (for bounds checks without reading the tensors)."""

    tables: torch.Tensor
    ctx: torch.Tensor
    rows: torch.Tensor
    max_page: int
    max_row: int


@dataclass
class AttentionMeta:
    """Per-step attention metadata. The torch path reads `slot_*` and `groups`; the Triton path
    reads `slot_*` and the fields below (defaults: not built). Device tensors are int32 but
    `slot_*` (int64):
      block_tables [S, max_blocks] (padded with 0), context_lens / query_lens [S],
      query_starts [S + 1] (first token row of each sequence, then T),
      work_seq / work_qstart [W]: the query tiles, tile w = queries work_qstart[w] ...
          + q_tile - 1 (clipped to the sequence) of sequence work_seq[w]; decodes are one tile.
    Host ints: max_query_len, max_context_len, q_tile (queries per tile).
    """

    slot_pages: torch.Tensor  # [T] page of each new token's K/V
    slot_offsets: torch.Tensor  # [T] slot inside that page
    groups: list[AttnGroup]
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    query_lens: torch.Tensor | None = None
    query_starts: torch.Tensor | None = None
    work_seq: torch.Tensor | None = None
    work_qstart: torch.Tensor | None = None
    max_query_len: int = 0
    max_context_len: int = 0
    q_tile: int = 1
    decode_tables: DecodeTables | None = None  # with decode_tables=True: the decodes, not a group


def triton_q_tile(num_heads: int, num_kv_heads: int, rows: int = 64) -> int:
    """Queries per Triton attention tile so that a tile holds about `rows` (query, head) rows
    of one KV head's group (a power of two, >= 1). Pass it to build_attention_meta."""
    tile = max(1, rows // max(1, num_heads // num_kv_heads))
    return 1 << (tile.bit_length() - 1)


def build_attention_meta(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str,
    *,
    q_tile: int = 16,
    torch_groups: bool = True,
    triton_fields: bool = True,
    decode_tables: bool = False,
) -> AttentionMeta:
    """Per-step metadata. Sequence i contributes `query_lens[i]` consecutive token rows (in
    order) whose positions are `context_lens[i] - query_lens[i] ... context_lens[i] - 1`.

    `q_tile`: queries per Triton tile (`triton_q_tile`); `torch_groups=False` skips the padded
    index/mask tensors that only the torch path reads (`groups` is then empty);
    `triton_fields=False` skips the block tables and tiles that only the Triton path reads;
    `decode_tables=True` (with torch_groups) puts the one-query sequences in `decode_tables`
    instead of a padded group, for the CPU kernel."""
    slot_pages, slot_offsets = [], []
    starts = []
    row = 0
    for i, (q_len, ctx, table) in enumerate(
        zip(query_lens, context_lens, block_tables, strict=True)
    ):
        if not 1 <= q_len <= ctx <= len(table) * block_size:  # kernels reading pages trust these
            raise ValueError(
                f"sequence {i}: {q_len} queries, context of {ctx} keys, block table of "
                f"{len(table)} pages of {block_size}"
            )
        starts.append(row)
        row += q_len
        for pos in range(ctx - q_len, ctx):
            slot_pages.append(table[pos // block_size])
            slot_offsets.append(pos % block_size)
    groups, tables = [], None
    if torch_groups:
        decodes = [i for i, q in enumerate(query_lens) if q == 1]
        if decode_tables and decodes:
            tables = _decode_tables(decodes, starts, context_lens, block_tables, block_size)
            decodes = []
        for members in (decodes, [i for i, q in enumerate(query_lens) if q > 1]):
            if members:
                groups.append(
                    _build_group(
                        members, starts, query_lens, context_lens, block_tables, block_size
                    )
                )
    as_long = dict(dtype=torch.long, device=device)
    for g in groups:
        for name in ("q_index", "valid", "out_rows", "key_pages", "key_offsets", "mask"):
            setattr(g, name, getattr(g, name).to(device))
    meta = AttentionMeta(
        torch.tensor(slot_pages, **as_long),
        torch.tensor(slot_offsets, **as_long),
        groups,
        decode_tables=tables,
    )
    if triton_fields:
        _add_triton_fields(meta, query_lens, context_lens, block_tables, starts, q_tile, device)
    return meta


def _add_triton_fields(meta, query_lens, context_lens, block_tables, starts, q_tile, device):
    S = len(query_lens)
    max_q = max(query_lens, default=0)
    tile = max(1, min(q_tile, max_q))
    work_seq, work_q = [], []
    for i, q_len in enumerate(query_lens):
        for q0 in range(0, q_len, tile):
            work_seq.append(i)
            work_q.append(q0)
    width = max(1, max((len(t) for t in block_tables), default=0))
    flat: list[int] = []
    for t in block_tables:
        flat.extend(t)
        flat.extend([0] * (width - len(t)))
    tables = torch.tensor(flat, dtype=torch.int32).view(S, width)
    host = [
        tables,
        torch.tensor(context_lens, dtype=torch.int32),
        torch.tensor(query_lens, dtype=torch.int32),
        torch.tensor(starts + [sum(query_lens)], dtype=torch.int32),
        torch.tensor(work_seq, dtype=torch.int32),
        torch.tensor(work_q, dtype=torch.int32),
    ]
    packed = torch.cat([t.reshape(-1) for t in host]).to(device, non_blocking=True)
    pos = 0
    for name, t in zip(
        ("block_tables", "context_lens", "query_lens", "query_starts", "work_seq", "work_qstart"),
        host,
        strict=True,
    ):
        setattr(meta, name, packed[pos : pos + t.numel()].view(t.shape))
        pos += t.numel()
    meta.max_query_len = max_q
    meta.max_context_len = max(context_lens, default=0)
    meta.q_tile = tile


def _decode_tables(members, starts, context_lens, block_tables, block_size) -> DecodeTables:
    used = [block_tables[i][: -(-context_lens[i] // block_size)] for i in members]
    width = max(len(t) for t in used)
    flat = [p for t in used for p in (*t, *([0] * (width - len(t))))]
    return DecodeTables(
        tables=torch.tensor(flat, dtype=torch.int32).view(len(members), width),
        ctx=torch.tensor([context_lens[i] for i in members], dtype=torch.int32),
        rows=torch.tensor([starts[i] for i in members], dtype=torch.int32),
        max_page=max(flat),
        max_row=max(starts[i] for i in members),
    )


def _build_group(members, starts, query_lens, context_lens, block_tables, block_size) -> AttnGroup:
    """The group's padded tensors from a few whole-group ops (a per-sequence loop of small torch
    ops cost ~0.5 ms per decode step of 16 sequences)."""
    G = len(members)
    q_lens = torch.tensor([query_lens[i] for i in members])  # [G]
    ctxs = torch.tensor([context_lens[i] for i in members])  # [G]
    Q, L = int(q_lens.max()), int(ctxs.max())
    width = -(-L // block_size)
    tables = torch.zeros(G, width, dtype=torch.long)  # padded with page 0
    for g, i in enumerate(members):
        n = -(-context_lens[i] // block_size)
        tables[g, :n] = torch.tensor(block_tables[i][:n])
    q = torch.arange(Q)
    valid = q.unsqueeze(0) < q_lens.unsqueeze(1)  # [G, Q]
    first = torch.tensor([starts[i] for i in members])
    q_index = torch.where(valid, first.unsqueeze(1) + q, 0)
    keys = torch.arange(L)
    in_ctx = keys.unsqueeze(0) < ctxs.unsqueeze(1)  # [G, L]; padding keys -> page 0, slot 0
    key_pages = torch.where(in_ctx, tables[:, keys // block_size], 0)
    key_offsets = torch.where(in_ctx, keys % block_size, 0)
    # query q of sequence g sits at position ctx - q_len + q and sees keys up to it (causal);
    # padded query rows attend everywhere (their rows are never written back: no NaN)
    q_pos = torch.where(valid, (ctxs - q_lens).unsqueeze(1) + q, L)  # [G, Q]
    mask = (keys.view(1, 1, L) <= q_pos.unsqueeze(2)).unsqueeze(1)  # [G, 1, Q, L]
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
    if meta.decode_tables is not None:
        raise ValueError("decode_tables are for the CPU kernel (kernels/attention_cpu.py)")
    out = torch.empty_like(q)
    attend_groups(q, k_cache, v_cache, meta.groups, scale, out)
    return out


def attend_groups(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: list[AttnGroup],
    scale: float,
    out: torch.Tensor,
) -> None:
    """Write the attention output of every group's real query rows into `out` (in place)."""
    k_rows, v_rows = _token_rows(k_cache), _token_rows(v_cache)
    rows_per_page = k_cache.stride(0) // k_cache.stride(1)
    for g in groups:
        if g.key_rows is None or g.key_rows[0] != rows_per_page:  # once per step, not per layer
            g.key_rows = (rows_per_page, (g.key_pages * rows_per_page + g.key_offsets).view(-1))
        idx = g.key_rows[1]
        G, L = g.key_pages.shape
        qg = q[g.q_index].transpose(1, 2)  # [G, heads, Q, hd]
        kg = k_rows.index_select(0, idx).view(G, L, *k_cache.shape[2:]).transpose(1, 2)
        vg = v_rows.index_select(0, idx).view(G, L, *v_cache.shape[2:]).transpose(1, 2)
        # kg, vg: [G, kv_heads, L, hd]
        og = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=kg.shape[1] != qg.shape[1]
        )  # [G, heads, Q, hd]
        og = og.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])[g.valid]
        out[g.out_rows] = og


def _token_rows(cache: torch.Tensor) -> torch.Tensor:
    """[num_pages, block_size, kv_heads, hd] (page stride may be larger than a block, as in the
    unified pool) -> [rows, kv_heads, hd] where token (page p, slot s) is row
    p * rows_per_page + s: one `index_select` gathers a step's keys (two-tensor advanced
    indexing is several times slower on the CPU)."""
    if cache.stride(1) != cache.shape[2] * cache.stride(2) or cache.stride(3) != 1:
        raise ValueError(f"KV cache rows must be contiguous, got strides {cache.stride()}")
    rows_per_page = cache.stride(0) // cache.stride(1)
    n = (cache.shape[0] - 1) * rows_per_page + cache.shape[1]
    return cache.as_strided((n, cache.shape[2], cache.shape[3]), cache.stride()[1:])


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
