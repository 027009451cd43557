"""Triton LoRA kernels against the fp32 per-token reference and the torch path.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before
triton is imported; the module is skipped if triton was imported earlier without it).
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

from loraplex.kernels import lora_triton  # noqa: E402
from loraplex.kernels.lora import (  # noqa: E402
    GROUPS,
    LoRABatchMeta,
    LoRASegment,
    blob_views,
    build_triton_lora_meta,
    lora_apply_torch,
    lora_layout,
    lora_reference,
    module_dims,
    pack_blob,
)

DEVICE = "cuda" if CUDA else "cpu"


# hidden > BLOCK_K and inter > BLOCK_N: partial reduction and output blocks; kv_dim < q_dim (GQA)
DIMS = module_dims(80, 80, 16, 96)
ALL = tuple(DIMS)
TARGETS = (("q_proj", "v_proj", "down_proj"), ALL, ("k_proj", "up_proj", "o_proj"))


def make_case(ranks, seg_lens, dims, layers, dtype, page_elems, seed, chunk=16):
    """Adapters i (rank ranks[i], TARGETS[i % 3]) packed into shuffled pool pages (free pages
    hold NaN), rows: 3 base rows, then per adapter a segment then a base row.
    Returns (case dict, LoRABatchMeta with both the torch segments and the Triton meta)."""
    gen = torch.Generator().manual_seed(seed)
    targets = [TARGETS[i % 3] if dims is DIMS else ALL for i in range(len(ranks))]
    layouts = [lora_layout(r, t, layers, dims) for r, t in zip(ranks, targets, strict=True)]
    n_pages = [-(-lay.num_elems // page_elems) for lay in layouts]
    free = list(range(sum(n_pages) + 7))
    random.Random(seed).shuffle(free)
    pool = torch.full((len(free), page_elems), float("nan"), dtype=dtype)
    weights, segments, tri_adapters, token_adapter = [], [], [], [-1] * 3
    row = 3
    for i, (r, t, lay, n) in enumerate(zip(ranks, targets, layouts, n_pages, strict=True)):
        A = {(l, m): torch.randn(r, dims[m][0], generator=gen) / dims[m][0] ** 0.5 for l in
             range(layers) for m in t}  # fmt: skip
        B = {(l, m): torch.randn(dims[m][1], r, generator=gen) / r**0.5 for l in
             range(layers) for m in t}  # fmt: skip
        blob = torch.zeros(n * page_elems, dtype=dtype)
        pack_blob(lay, A, B, blob)
        pages = [free.pop() for _ in range(n)]
        pool[pages] = blob.view(n, page_elems)
        scale = 0.5 + i / 10
        segments.append(LoRASegment(row, row + seg_lens[i], i, r, scale, blob_views(lay, blob)))
        tri_adapters.append((r, scale, lay, pages))
        weights.append((A, B, scale))
        token_adapter += [i] * seg_lens[i] + [-1]
        row += seg_lens[i] + 1
    pool = pool.to(DEVICE)
    tri = build_triton_lora_meta(
        [(s.start, s.end, s.adapter_idx) for s in segments],
        tri_adapters,
        layers,
        page_elems,
        DEVICE,
        pool=pool,
        chunk=chunk,
    )
    case = dict(weights=weights, token_adapter=token_adapter, T=row, dims=dims, dtype=dtype)
    case["adapters"] = tri_adapters  # (rank, scale, layout, pages) per slot
    return case, LoRABatchMeta(segments, triton=tri)


def check_group(case, meta, layer, group, seed, split_k=None, torch_path=True):
    gen = torch.Generator().manual_seed(seed)
    dims, dtype, T = case["dims"], case["dtype"], case["T"]
    mods = GROUPS[group]
    in_dim = dims[mods[0]][0]
    outs = [dims[m][1] for m in mods]
    x = torch.randn(T, in_dim, generator=gen).to(dtype)
    y0 = torch.randn(T, sum(outs), generator=gen).to(dtype)
    y = y0.clone().to(DEVICE)
    lora_triton.lora_apply_triton(x.to(DEVICE), y, layer, group, meta, split_k=split_k)
    y = y.cpu()
    if torch_path:  # the torch path on the same adapters (CPU views of the blobs)
        y_torch = y0.clone()
        lora_apply_torch(x, y_torch, layer, group, meta)
    lo = 0
    for m, out in zip(mods, outs, strict=True):
        As = [w[0].get((layer, m), torch.zeros(1, in_dim)).to(dtype) for w in case["weights"]]
        Bs = [w[1].get((layer, m), torch.zeros(out, 1)).to(dtype) for w in case["weights"]]
        scales = [w[2] for w in case["weights"]]
        ref = y0[:, lo : lo + out].float().clone()
        ref += lora_reference(x.float(), case["token_adapter"], As, Bs, scales)
        got = y[:, lo : lo + out].float()
        if dtype == torch.float32:
            tol = dict(atol=1e-4, rtol=1e-5)
        else:
            tol = dict(atol=2e-2 * max(1.0, ref.abs().max().item()), rtol=2e-2)
        torch.testing.assert_close(got, ref, **tol)
        if torch_path:
            torch.testing.assert_close(got, y_torch[:, lo : lo + out].float(), **tol)
        lo += out
    base = torch.tensor([a < 0 for a in case["token_adapter"]])
    assert torch.equal(y[base], y0[base]), "rows without an adapter must be untouched"


def mixed_ranks(rank, n):
    return [rank if i % 2 == 0 else max(1, rank // 2 + i % 3) for i in range(n)]


CASES = [(r, n, dt) for r in (1, 8, 16, 64) for n in (1, 3, 17) for dt in ("f32", "bf16")]


@pytest.mark.parametrize(
    "rank,num_adapters,dt",
    [c if c[0] < 16 or c[1] < 17 else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
)
def test_triton_lora_matches_reference(rank, num_adapters, dt):
    dtype = torch.float32 if dt == "f32" else torch.bfloat16
    seed = rank * 100 + num_adapters
    rng = random.Random(seed)
    seg_lens = [rng.randint(1, 4) for _ in range(num_adapters)]
    seg_lens[num_adapters // 2] = 37  # longer than a chunk: split into 16 + 16 + 5 rows
    case, meta = make_case(mixed_ranks(rank, num_adapters), seg_lens, DIMS, 2, dtype, 100, seed)
    assert meta.has_lora and meta.triton.num_chunks == num_adapters + 2
    for group in GROUPS:  # last layer: exercises the per-layer offsets
        check_group(case, meta, 1, group, seed)


@pytest.mark.slow
def test_triton_lora_every_layer_and_big_chunk():
    case, meta = make_case([8, 1, 64, 16], [5, 70, 3, 40], DIMS, 3, torch.float32, 64, 7, 32)
    for layer in range(3):
        for group in GROUPS:
            check_group(case, meta, layer, group, layer)


def test_triton_lora_split_k_and_adapter_order():
    """K split across programs (partials summed in the expand); segments listed out of adapter
    order and the last adapter slot used by two segments."""
    dims = module_dims(300, 32, 16, 40)
    case, meta = make_case([4, 16], [3, 18], dims, 1, torch.float32, 256, 3)
    segs = [(3, 6, 0), (7, 25, 1)]
    assert [(s.start, s.end, s.adapter_idx) for s in meta.segments] == segs
    for split_k in (None, 2, 4):  # default: one split of 300; 2 -> 192 + 108; 4 -> 3 x 128
        check_group(case, meta, 0, "qkv", 11, split_k=split_k)
    # Reorder: adapter 1 first, then adapter 0, then adapter 1 again on a later run of rows.
    case["token_adapter"] = [-1] * 3 + [1] * 3 + [-1] + [0] * 10 + [1] * 8 + [-1]
    segs = [(3, 6, 1), (7, 17, 0), (17, 25, 1)]
    tri = build_triton_lora_meta(segs, case["adapters"], 1, 256, DEVICE, pool=meta.triton.pool)
    meta2 = LoRABatchMeta([], triton=tri)
    assert meta2.has_lora
    check_group(case, meta2, 0, "gate_up", 12, torch_path=False)
    check_group(case, meta2, 0, "down", 13, torch_path=False)


def test_no_adapter_batch_skips_kernels():
    pool = torch.zeros(4, 64, device=DEVICE)
    meta = LoRABatchMeta([], triton=build_triton_lora_meta([], [], 2, 64, DEVICE, pool=pool))
    assert not meta.has_lora and meta.triton.num_chunks == 0
    x, y = torch.randn(5, 80, device=DEVICE), torch.randn(5, 112, device=DEVICE)
    y0 = y.clone()
    lora_triton.lora_apply_triton(x, y, 0, "qkv", meta)
    assert torch.equal(y, y0)
    with pytest.raises(ValueError, match="triton"):
        lora_triton.lora_apply_triton(x, y, 0, "qkv", LoRABatchMeta([]))


def test_meta_layout_follows_true_rank():
    case, meta = make_case([1, 8, 64], [1, 2, 3], DIMS, 2, torch.float32, 100, 5)
    tri = meta.triton
    assert tri.ranks.tolist() == [1, 8, 64]
    # adapter 0 targets q, v, down: qkv shrink width 2 * rank, slot k absent
    assert tri.group_cols[0].tolist() == [2, 0, 0, 1]
    assert tri.slot_cols[0, 0].tolist() == [0, -1, 1]
    assert tri.max_cols == (64, 64, 64, 8)  # adapter 2 (rank 64): k, up, o; rank 8: down
    assert tri.out_slices[0].tolist() == [[0, 80], [80, 16], [96, 16]]
    lay = lora_layout(8, ALL, 2, DIMS)
    assert tri.offsets[1, 1, 0, 0].item() == lay.layers[1]["qkv"].a_offset
    assert tri.offsets[1, 1, 0, 3].item() == lay.layers[1]["qkv"].b_offsets[2]  # v_proj B^T
    assert tri.offsets[0, 1, 2].tolist() == [-1] * 4  # adapter 0 does not target gate_up
    assert tri.offsets[0, 1, 0, 2].item() == -1  # nor k_proj
    with pytest.raises(ValueError, match="power of two"):
        build_triton_lora_meta([], [], 2, 100, DEVICE, pool=tri.pool, chunk=24)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_lora_real_shapes(dtype):
    """Llama-2-7B-like shapes (GQA kv 1024) on the GPU against the torch path."""
    dims = module_dims(4096, 4096, 1024, 11008)
    seg_lens = [1, 1, 40, 3, 1, 70, 2]
    case, meta = make_case([8, 64, 16, 32, 1, 64, 8], seg_lens, dims, 1, dtype, 1 << 20, 1)
    for group in GROUPS:
        gen = torch.Generator().manual_seed(0)
        in_dim = dims[GROUPS[group][0]][0]
        out = sum(dims[m][1] for m in GROUPS[group])
        x = torch.randn(case["T"], in_dim, generator=gen).to(dtype)
        y0 = torch.randn(case["T"], out, generator=gen).to(dtype)
        y_torch, y = y0.float().clone(), y0.cuda()
        lora_apply_torch(x.float(), y_torch, 0, group, _float_views(meta))
        lora_triton.lora_apply_triton(x.cuda(), y, 0, group, meta)
        torch.testing.assert_close(y.cpu().float(), y_torch.float(), atol=3e-2, rtol=2e-2)
        base = torch.tensor([a < 0 for a in case["token_adapter"]])
        assert torch.equal(y.cpu()[base], y0[base])


def _float_views(meta):
    """The torch path in float32 on the host copies (reference for the half-precision run)."""
    segs = []
    for s in meta.segments:
        views = [
            {
                n: type(g)(g.a_t.float(), tuple(b.float() for b in g.b_t), g.out_slices)
                for n, g in layer.items()
            }  # fmt: skip
            for layer in s.views
        ]
        segs.append(LoRASegment(s.start, s.end, s.adapter_idx, s.rank, s.scale, views))
    return LoRABatchMeta(segs)


@needs_ptxas
def test_kernels_compile_for_hopper(tmp_path):
    assert_compiles_for_hopper("loraplex.kernels.lora_triton", ("bf16", "fp32"), tmp_path)


def test_bench_case_paths_agree():
    """kernels.bench builds its LoRA case right: Triton, torch and the padded bmm baseline
    agree on a tiny case (and the byte counts are what the layout says)."""
    from loraplex.kernels import bench

    dims = module_dims(32, 32, 16, 48)
    case = bench.lora_case(40, 5, dims, torch.float32, DEVICE, ranks=(8, 1, 16), page_elems=96)
    assert [s.rank for s in case.meta.segments] == [8, 1, 16, 8, 1]
    assert case.weight_bytes == 4 * sum(
        lora_layout(r, ALL, 1, dims).num_elems for r in (8, 1, 16, 8, 1)
    )
    per_row = (32 + 2 * 64) + (32 + 2 * 32) + (32 + 2 * 96) + (48 + 2 * 32)  # x + 2 y per group
    assert bench.activation_bytes(case, 2) == 40 * 2 * per_row
    pad = bench.PaddedBMM(case)
    for group, (x, y) in bench.make_inputs(case, torch.float32, DEVICE).items():
        y_tri, y_torch, y_bmm = y.clone(), y.clone(), y.clone()
        lora_triton.lora_apply_triton(x, y_tri, 0, group, case.meta)
        lora_apply_torch(x, y_torch, 0, group, case.meta)
        pad.apply(x, y_bmm, group)
        assert y_torch.abs().max() > 0
        torch.testing.assert_close(y_tri, y_torch, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(y_bmm, y_torch, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(CUDA, reason="checks the message shown without CUDA")
def test_bench_exits_without_cuda():
    from loraplex.kernels import bench

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main([])
