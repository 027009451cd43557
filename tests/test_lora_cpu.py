"""The CPU LoRA kernel (kernels/lora_cpu.c via kernels/lora_cpu.py) against the per-token
reference and the torch path. (Building the CPU kernels and the engine's fallbacks:
test_cpu_build.py.)"""

from __future__ import annotations

import gc
import logging
import random
import shutil
from dataclasses import replace

import pytest
import torch

import loraplex.kernels.cpu_build as cpu_build
from loraplex.engine.llm import LLM
from loraplex.kernels.lora import (
    GROUPS,
    LoRABatchMeta,
    LoRASegment,
    blob_views,
    lora_apply_torch,
    lora_layout,
    module_dims,
    pack_blob,
)
from loraplex.kernels.lora_cpu import (
    AMX_MAX_ROWS,
    AMX_ROWS,
    MAX_ROWS,
    adapter_records,
    amx_available,
    build_cpu_lora_meta,
    lora_apply_cpu,
)

# Widths chosen to hit the kernel's tails: KV_DIM and INTER are not multiples of its 32-element
# step, and INTER is wider than one 512-column expand item.
HIDDEN, Q_DIM, KV_DIM, INTER, LAYERS = 96, 96, 40, 600, 2
DIMS = module_dims(HIDDEN, Q_DIM, KV_DIM, INTER)
ALL = tuple(DIMS)
GROUP_DIMS = {"qkv": (HIDDEN, Q_DIM + 2 * KV_DIM), "o": (Q_DIM, HIDDEN),
              "gate_up": (HIDDEN, 2 * INTER), "down": (INTER, HIDDEN)}  # fmt: skip


def _batch(specs, dtype, gen, n_base=2, dims=DIMS):
    """specs: (rank, targets, rows) per adapter. Returns (segments, weights, token_adapter, keep)
    with every adapter's blob packed in one shared pool tensor (gaps between them)."""
    layouts, weights = [], []
    for rank, targets, _ in specs:
        A = {(l, m): torch.randn(rank, dims[m][0], generator=gen) / 4 for l in range(LAYERS)
             for m in targets}  # fmt: skip
        B = {(l, m): torch.randn(dims[m][1], rank, generator=gen) / 4 for l in range(LAYERS)
             for m in targets}  # fmt: skip
        layouts.append(lora_layout(rank, targets, LAYERS, dims))
        weights.append((A, B, 0.5 + rank / 16))
    pool = torch.zeros(sum(lay.num_elems + 7 for lay in layouts), dtype=dtype)
    segments, token_adapter, offset, row = [], [-1] * n_base, 0, n_base
    for idx, ((rank, _, rows), lay, (A, B, scale)) in enumerate(
        zip(specs, layouts, weights, strict=True)
    ):
        blob = pool[offset + 7 : offset + 7 + lay.num_elems]
        pack_blob(lay, A, B, blob)
        offset += lay.num_elems + 7
        segments.append(LoRASegment(row, row + rows, idx, rank, scale, blob_views(lay, blob)))
        token_adapter += [idx] * rows
        row += rows
    return segments, weights, token_adapter, pool


def _reference(x, layer, group, weights, token_adapter, dtype, dims=DIMS, rounded=()):
    """Per-token float32 delta of the group's fused output (modules an adapter lacks: 0), and a
    bound on what rounding v = scale * A x to bfloat16 may change (sum_k |B_nk v_k| 2^-8).
    Rows in `rounded` get v rounded to bfloat16 first, as the kernel does for bfloat16."""
    out_dim = sum(dims[m][1] for m in GROUPS[group])
    delta, bound = torch.zeros(x.shape[0], out_dim), torch.zeros(x.shape[0], out_dim)
    for t, idx in enumerate(token_adapter):
        if idx < 0:
            continue
        A, B, scale = weights[idx]
        lo = 0
        for m in GROUPS[group]:
            width = dims[m][1]
            if (layer, m) in A:
                a, b = A[layer, m].to(dtype).float(), B[layer, m].to(dtype).float()
                v = scale * (a @ x[t].float())
                if t in rounded:
                    v = v.to(torch.bfloat16).float()
                delta[t, lo : lo + width] = b @ v
                bound[t, lo : lo + width] = (b.abs() @ v.abs()) * 2**-8
            lo += width
    return delta, bound


def _check_against_reference(segments, weights, token_adapter, meta, dtype, gen, dims=DIMS):
    """y after the kernel vs the reference, every layer and group. bfloat16: one rounding of y,
    and of v (every path of the kernel rounds v to bfloat16 before the expand, as torch does)."""
    T = len(token_adapter)
    rounded = set(range(T)) if dtype == torch.bfloat16 else set()
    for layer in range(LAYERS):
        for group in GROUPS:
            d_in = dims[GROUPS[group][0]][0]
            d_out = sum(dims[m][1] for m in GROUPS[group])
            x = torch.randn(T, d_in, generator=gen).to(dtype)
            y0 = torch.randn(T, d_out, generator=gen).to(dtype)
            y = y0.clone()
            lora_apply_cpu(x, y, layer, group, meta)
            delta, bound = _reference(x, layer, group, weights, token_adapter, dtype, dims, rounded)
            want = y0.float() + delta
            base = [t for t, a in enumerate(token_adapter) if a < 0]
            assert torch.equal(y[base], y0[base]), "base-only rows were touched"
            if dtype == torch.float32:
                scale = want.abs().max().item()  # float32 sums differ in order only
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6 * scale)
            else:  # one bf16 rounding of a float32 sum (and of v: ties may round either way)
                tol = want.abs() * 2**-8 + 1e-2 + bound
                assert ((y.float() - want).abs() <= tol).all(), f"layer {layer} {group}"


@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("num_adapters", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(rank, num_adapters, dtype):
    gen = torch.Generator().manual_seed(rank * 100 + num_adapters)
    rng = random.Random(rank + num_adapters)
    specs = []
    for idx in range(num_adapters):
        r = rank if idx % 2 == 0 else max(1, rank // 2 + idx % 3)  # mixed ranks
        targets = ALL if idx % 3 else ("q_proj", "v_proj", "down_proj")  # some skip groups
        specs.append((r, targets, rng.randint(1, MAX_ROWS[dtype])))
    segments, weights, token_adapter, _ = _batch(specs, dtype, gen)
    meta = build_cpu_lora_meta(segments, [adapter_records(s.views) for s in segments])
    assert meta.cpu is not None and meta.segments == [] and meta.has_lora
    _check_against_reference(segments, weights, token_adapter, meta, dtype, gen)


# The AMX path needs input widths that are multiples of 32 (INTER too); KV_DIM keeps odd output
# widths, and 608 columns span several tile groups with a tail.
AMX_DIMS = module_dims(HIDDEN, Q_DIM, KV_DIM, 608)
needs_amx = pytest.mark.skipif(not amx_available(), reason="no AMX (CPU, compiler or OS)")


@needs_amx
@pytest.mark.parametrize(
    "specs",
    [
        [(1, ALL, 16), (8, ALL, 17), (16, ALL, 40)],  # AMX_ROWS exactly, one row over, a few tiles
        [(64, ALL, 33), (72, ALL, 300), (8, ALL, 1), (5, ALL, 15)],  # 2 K tiles; 2 pieces; short
        [(32, ("q_proj", "v_proj", "down_proj"), 64), (3, ("o_proj",), 20), (16, ALL, 2)],
    ],
)
def test_amx_path_matches_reference(specs):
    """Long bf16 segments through AMX tiles (v rounded to bf16 once), short ones through the
    vector path, in the same calls; ranks that pad to 32 and to 96, rows that pad to 16."""
    gen = torch.Generator().manual_seed(len(specs) * 7 + specs[0][0])
    segments, weights, token_adapter, _ = _batch(specs, torch.bfloat16, gen, dims=AMX_DIMS)
    meta = build_cpu_lora_meta(segments, [adapter_records(s.views) for s in segments])
    assert meta.cpu.amx_rows == AMX_ROWS and meta.segments == []  # no torch path with AMX
    _check_against_reference(segments, weights, token_adapter, meta, torch.bfloat16, gen, AMX_DIMS)


@needs_amx
def test_amx_leaves_segments_over_its_limit_to_torch():
    gen = torch.Generator().manual_seed(17)
    specs = [(16, ALL, AMX_MAX_ROWS + 1), (8, ALL, AMX_MAX_ROWS), (4, ALL, 3)]
    segments, weights, token_adapter, _ = _batch(specs, torch.bfloat16, gen, dims=AMX_DIMS)
    meta = build_cpu_lora_meta(segments, [adapter_records(s.views) for s in segments])
    assert [s.adapter_idx for s in meta.segments] == [0]  # the torch path takes the longest
    assert meta.cpu.segs[:, 2].tolist() == [8, 4] and meta.cpu.amx_rows == AMX_ROWS
    _check_against_reference(segments, weights, token_adapter, meta, torch.bfloat16, gen, AMX_DIMS)
    # an input width the tiles cannot take (INTER 600 -> down_proj): the vector path's limit
    segments, _, _, _ = _batch([(8, ALL, MAX_ROWS[torch.bfloat16] + 1)], torch.bfloat16, gen)
    meta = build_cpu_lora_meta(segments, [adapter_records(segments[0].views)])
    assert meta.cpu is None and len(meta.segments) == 1


@needs_amx
def test_amx_rows_do_not_depend_on_their_neighbours():
    """Bitwise: an AMX row's result is the same whatever rows share its tiles or segment."""
    gen = torch.Generator().manual_seed(13)
    n, dims = 40, AMX_DIMS
    segments, _, _, _ = _batch([(24, ALL, n)], torch.bfloat16, gen, n_base=0, dims=dims)
    records = [adapter_records(segments[0].views)]
    x = torch.randn(n, HIDDEN, generator=gen).to(torch.bfloat16)
    y0 = torch.randn(n, 2 * 608, generator=gen).to(torch.bfloat16)
    together = y0.clone()
    lora_apply_cpu(x, together, 1, "gate_up", build_cpu_lora_meta(segments, records))
    for lo, hi in [(0, 16), (7, 24), (21, 40)]:
        seg = LoRASegment(0, hi - lo, 0, 24, segments[0].scale, segments[0].views)
        part = y0[lo:hi].clone()
        lora_apply_cpu(x[lo:hi], part, 1, "gate_up", build_cpu_lora_meta([seg], records))
        assert torch.equal(part, together[lo:hi]), f"rows {lo}:{hi}"


def test_amx_is_refused_where_it_cannot_run():
    gen = torch.Generator().manual_seed(2)
    segments, _, _, _ = _batch([(4, ALL, 20)], torch.float32, gen)
    with pytest.raises(ValueError, match="AMX path needs bfloat16"):
        build_cpu_lora_meta(segments, [adapter_records(segments[0].views)], amx_rows=16)
    assert build_cpu_lora_meta(segments, [adapter_records(segments[0].views)]).cpu.amx_rows == 0


def test_long_segments_stay_on_the_torch_path():
    gen = torch.Generator().manual_seed(3)
    limit = MAX_ROWS[torch.float32]
    specs = [(8, ALL, limit + 5), (16, ALL, 2), (4, ALL, limit), (32, ALL, limit + 8)]
    segments, weights, token_adapter, _ = _batch(specs, torch.float32, gen)
    meta = build_cpu_lora_meta(segments, [adapter_records(s.views) for s in segments])
    assert [s.adapter_idx for s in meta.segments] == [0, 3]
    assert meta.cpu.segs[:, 2].tolist() == [16, 4]
    _check_against_reference(segments, weights, token_adapter, meta, torch.float32, gen)
    only_long = build_cpu_lora_meta(segments[:1], [adapter_records(segments[0].views)])
    assert only_long.cpu is None and len(only_long.segments) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_its_neighbours(dtype):
    """Bitwise: row results are independent lanes (the engine's batch invariance leans on it),
    also between the register-strip path of long segments and the path of short ones."""
    gen = torch.Generator().manual_seed(5)
    n = 9  # >= LONG_ROWS: the long-segment path
    segments, _, _, _ = _batch([(16, ALL, n), (8, ALL, 1)], dtype, gen, n_base=1)
    records = [adapter_records(s.views) for s in segments]
    x = torch.randn(n + 2, HIDDEN, generator=gen).to(dtype)
    y0 = torch.randn(n + 2, 2 * INTER, generator=gen).to(dtype)
    together = y0.clone()
    lora_apply_cpu(x, together, 1, "gate_up", build_cpu_lora_meta(segments, records))
    for row in range(1, n + 1):  # each row of the long segment alone, in a batch of one row
        seg = LoRASegment(0, 1, 0, 16, segments[0].scale, segments[0].views)
        alone = y0[row : row + 1].clone()
        meta = build_cpu_lora_meta([seg], [records[0]])
        lora_apply_cpu(x[row : row + 1], alone, 1, "gate_up", meta)
        assert torch.equal(alone[0], together[row]), f"row {row}"


def test_records_keep_gathered_copies_alive():
    """Scattered adapters get views over a per-step gathered copy; the meta must keep it."""
    gen = torch.Generator().manual_seed(9)
    segments, weights, token_adapter, pool = _batch([(8, ALL, 3)], torch.float32, gen)
    lay = lora_layout(8, ALL, LAYERS, DIMS)
    gathered = pool[7 : 7 + lay.num_elems].clone()
    seg = LoRASegment(2, 5, 0, 8, segments[0].scale, blob_views(lay, gathered))
    meta = build_cpu_lora_meta([seg], [adapter_records(seg.views)])
    del seg, gathered
    pool.zero_()  # the kernel must read the copy, not the pool
    gc.collect()
    _check_against_reference(segments, weights, token_adapter, meta, torch.float32, gen)


def test_matches_torch_path_on_a_mixed_step():
    gen = torch.Generator().manual_seed(21)
    specs = [(64, ALL, 1), (1, ALL, 3), (16, ("o_proj",), 2), (8, ALL, 30)]
    segments, _, token_adapter, _ = _batch(specs, torch.float32, gen)
    meta = build_cpu_lora_meta(segments, [adapter_records(s.views) for s in segments])
    for group, (d_in, d_out) in GROUP_DIMS.items():
        x = torch.randn(len(token_adapter), d_in, generator=gen)
        y_cpu, y_torch = torch.zeros(x.shape[0], d_out), torch.zeros(x.shape[0], d_out)
        lora_apply_cpu(x, y_cpu, 0, group, meta)
        lora_apply_torch(x, y_torch, 0, group, LoRABatchMeta(segments))
        torch.testing.assert_close(y_cpu, y_torch, rtol=1e-5, atol=1e-5)


def test_python_entry_and_ctypes_give_the_same_result(monkeypatch, tmp_path):
    """Calls go through lora_call.c's CPython entry where it builds, else through ctypes: the
    same kernel either way, so the same bits."""
    gen = torch.Generator().manual_seed(22)
    segments, _, token_adapter, _ = _batch([(8, ALL, 2), (16, ALL, 3)], torch.bfloat16, gen)
    records = [adapter_records(s.views) for s in segments]
    fast = build_cpu_lora_meta(segments, records)
    if cpu_build._call_module() is None:
        pytest.skip("the CPython entry does not build here (no Python.h or no compiler)")
    assert fast.cpu.call is not fast.cpu.kernel
    monkeypatch.setattr(cpu_build, "_call_mod", None)
    monkeypatch.setattr(cpu_build, "_CALLERS", {})
    monkeypatch.setattr(cpu_build.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    slow = build_cpu_lora_meta(segments, records)
    assert slow.cpu.call is slow.cpu.kernel  # no Python.h: ctypes
    for group, (d_in, d_out) in GROUP_DIMS.items():
        x = torch.randn(len(token_adapter), d_in, generator=gen).to(torch.bfloat16)
        y0 = torch.randn(len(token_adapter), d_out, generator=gen).to(torch.bfloat16)
        y_fast, y_slow = y0.clone(), y0.clone()
        lora_apply_cpu(x, y_fast, 1, group, fast)
        lora_apply_cpu(x, y_slow, 1, group, slow)
        assert torch.equal(y_fast, y_slow) and not torch.equal(y_fast, y0), group
    call = fast.cpu.call
    with pytest.raises(TypeError, match="call"):
        call(1, 2)
    with pytest.raises(ValueError, match="null"):
        call(0, 0, 0, 0, fast.cpu.args_ptr, 0)


def test_unsupported_inputs_are_refused():
    gen = torch.Generator().manual_seed(1)
    segments, _, _, _ = _batch([(4, ALL, 2)], torch.float32, gen)
    meta = build_cpu_lora_meta(segments, [adapter_records(segments[0].views)])
    x = torch.randn(4, HIDDEN)
    with pytest.raises(ValueError, match="float16"):
        lora_apply_cpu(x.half(), torch.zeros(4, HIDDEN, dtype=torch.float16), 0, "o", meta)
    with pytest.raises(ValueError, match="unsupported y"):
        lora_apply_cpu(x, torch.zeros(HIDDEN, 4).t(), 0, "o", meta)
    # shapes that do not fit the segments would read or write out of bounds in C
    with pytest.raises(ValueError, match="do not fit"):
        lora_apply_cpu(x[:3], torch.zeros(3, HIDDEN), 0, "o", meta)  # rows 2..4 needed
    with pytest.raises(ValueError, match="do not fit"):
        lora_apply_cpu(torch.randn(4, HIDDEN + 1), torch.zeros(4, HIDDEN), 0, "o", meta)
    with pytest.raises(ValueError, match="do not fit"):
        lora_apply_cpu(x, torch.zeros(4, HIDDEN - 1), 0, "o", meta)
    with pytest.raises(ValueError, match=f"layer {LAYERS} of {LAYERS}"):
        lora_apply_cpu(x, torch.zeros(4, HIDDEN), LAYERS, "o", meta)  # records end there


def test_a_compiler_without_openmp_builds_a_one_thread_kernel(monkeypatch, tmp_path, caplog):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\n'
                       f'exec {cc} "$@"\n')  # fmt: skip
    wrapper.chmod(0o755)
    monkeypatch.setattr(cpu_build, "_lib", None)
    monkeypatch.setattr(cpu_build, "_error", None)
    monkeypatch.setattr(cpu_build, "_FUNCS", {})
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="loraplex.kernels.cpu_build"):
        assert cpu_build.cpu_kernel_error() is None
    assert "without OpenMP" in caplog.text
    gen = torch.Generator().manual_seed(13)
    specs = [(8, ALL, 3), (64, ALL, 12), (1, ("q_proj",), 1)]
    segments, weights, token_adapter, _ = _batch(specs, torch.float32, gen)
    meta = build_cpu_lora_meta(segments, [adapter_records(s.views) for s in segments])
    _check_against_reference(segments, weights, token_adapter, meta, torch.float32, gen)


def test_runner_reuses_the_step_meta_only_while_its_inputs_hold(tiny_llama):
    """Decode steps repeat the last step's segments, so the runner keeps that step's kernel meta;
    an adapter written again (other pages, or the same ones) must not reuse stale records."""
    from loraplex.scheduler.sequence import SamplingParams

    llm = LLM(tiny_llama["model_dir"], adapters=tiny_llama["adapters"], pool_bytes=8 << 20)
    eng = llm.engine
    assert eng.backends["lora"] == "cpu"
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    eng.add_request("a", [1, 2, 3], params, "r8_all")
    eng.add_request("b", [4, 5], params, "r4_attn")
    eng.step()  # both prompts prefilled
    batch = eng.batcher.schedule()  # decode: one row each
    first, _ = eng.runner.prepare(batch)
    again, _ = eng.runner.prepare(batch)
    assert first.lora.cpu is not None and again.lora is first.lora
    eng.adapters.write(eng.adapters.uid_of("r8_all"))  # fresh views of the same adapter
    rewritten, _ = eng.runner.prepare(batch)
    assert rewritten.lora is not first.lora
    assert torch.equal(rewritten.lora.cpu.records, first.lora.cpu.records)  # same pages here
    # a step with other rows (one sequence left) builds its own
    alone, _ = eng.runner.prepare(replace(batch, items=batch.items[:1], loaded_adapters=[]))
    assert alone.lora is not rewritten.lora and alone.lora.cpu.segs.shape[0] == 1
