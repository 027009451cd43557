"""GPU micro-benchmark of the Triton kernels: `python -m loraplex.kernels.bench [--quick]`.

1. Device copy bandwidth (a 1 GiB device-to-device copy: bytes read + written per second).
2. LoRA, one decoder layer of Llama-2-7B shapes (hidden 4096, intermediate 11008, 32 heads of
   128, all seven modules targeted): shrink + expand of the four groups, for T tokens spread
   evenly over D distinct adapters (ranks cycling 8, 16, 32, 64; pages of each adapter in the
   pool, adapters in shuffled order). Columns: the Triton path (time, achieved GB/s over the
   bytes that must move: each distinct adapter's weights once, x once, y read and written
   once; % of the measured copy bandwidth), the torch path (`lora_apply_torch`) and a padded
   torch.bmm baseline (weights padded to rank 64, gathered per token). Per-step cost is about
   num_layers times the per-layer time.
3. Paged decode attention (one layer, 32 heads of 128, MHA, block 16, shuffled pages): time and
   GB/s over the K/V bytes read, beside the torch path.
Times are medians of `triton.testing.do_bench` (L2 flushed between runs). Needs CUDA.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass

import torch

from loraplex.kernels.attention import build_attention_meta, paged_attention, triton_q_tile
from loraplex.kernels.lora import (
    GROUPS,
    LoRABatchMeta,
    LoRASegment,
    blob_views,
    build_triton_lora_meta,
    lora_apply_torch,
    lora_layout,
    module_dims,
)

LLAMA2_7B = dict(hidden=4096, q_dim=4096, kv_dim=4096, inter=11008, heads=32, head_dim=128)
RANKS = (8, 16, 32, 64)


@dataclass
class LoRACase:
    """One layer's LoRA batch: T rows, `distinct` adapters (rows grouped by adapter)."""

    dims: dict[str, tuple[int, int]]
    meta: LoRABatchMeta  # torch segments (views into the pool) + Triton metadata
    token_adapter: torch.Tensor  # [T] adapter of each row (long, on the device)
    scales: torch.Tensor  # [distinct] float32
    weight_bytes: int  # bytes of the distinct adapters' weights (one layer)
    T: int


def lora_case(
    T: int,
    distinct: int,
    dims: dict[str, tuple[int, int]],
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    ranks: tuple[int, ...] = RANKS,
    page_elems: int = 1 << 20,
    seed: int = 0,
) -> LoRACase:
    """Random adapters (all modules, one layer) in a pool; each adapter's pages are a run so
    the torch path can view them, the runs are in shuffled order."""
    distinct = min(distinct, T)
    gen = torch.Generator(device=device).manual_seed(seed)
    layouts = [lora_layout(ranks[i % len(ranks)], tuple(dims), 1, dims) for i in range(distinct)]
    n_pages = [-(-lay.num_elems // page_elems) for lay in layouts]
    order = list(range(distinct))
    random.Random(seed).shuffle(order)
    first, nxt = [0] * distinct, 0
    for i in order:
        first[i], nxt = nxt, nxt + n_pages[i]
    pool = torch.randn(nxt, page_elems, generator=gen, device=device, dtype=dtype).mul_(0.02)
    flat = pool.view(-1)
    bounds = [T * i // distinct for i in range(distinct + 1)]
    segments, tri, token_adapter = [], [], torch.empty(T, dtype=torch.long)
    for i, lay in enumerate(layouts):
        lo, hi = bounds[i], bounds[i + 1]
        blob = flat[first[i] * page_elems : first[i] * page_elems + lay.num_elems]
        scale = 2.0 / lay.rank
        segments.append(LoRASegment(lo, hi, i, lay.rank, scale, blob_views(lay, blob)))
        tri.append((lay.rank, scale, lay, list(range(first[i], first[i] + n_pages[i]))))
        token_adapter[lo:hi] = i
    meta = LoRABatchMeta(
        segments,
        triton=build_triton_lora_meta(
            [(s.start, s.end, s.adapter_idx) for s in segments], tri, 1, page_elems, device,
            pool=pool,
        ),
    )  # fmt: skip
    return LoRACase(
        dims=dims,
        meta=meta,
        token_adapter=token_adapter.to(device),
        scales=torch.tensor([s.scale for s in segments], device=device),
        weight_bytes=sum(lay.num_elems for lay in layouts) * pool.element_size(),
        T=T,
    )


def group_shapes(dims: dict[str, tuple[int, int]], group: str) -> tuple[int, int]:
    mods = GROUPS[group]
    return dims[mods[0]][0], sum(dims[m][1] for m in mods)


def activation_bytes(case: LoRACase, elem: int) -> int:
    """x read once and y read + written once, summed over the four groups."""
    total = 0
    for group in GROUPS:
        in_dim, out = group_shapes(case.dims, group)
        total += case.T * (in_dim + 2 * out) * elem
    return total


class PaddedBMM:
    """Baseline: every adapter's A [in, R] and B^T [R, out] padded to the batch's max rank R,
    gathered per token and applied with torch.bmm (one call per module and step)."""

    def __init__(self, case: LoRACase) -> None:
        segs = case.meta.segments
        R = max(s.rank for s in segs)
        self.case, self.A, self.B = case, {}, {}
        for group in GROUPS:
            for j, _ in enumerate(GROUPS[group]):
                g0 = segs[0].views[0][group]
                in_dim, out = g0.a_t.shape[0], g0.b_t[j].shape[1]
                a = g0.a_t.new_zeros(len(segs), in_dim, R)
                b = g0.a_t.new_zeros(len(segs), R, out)
                for i, s in enumerate(segs):
                    g = s.views[0][group]
                    a[i, :, : s.rank] = g.a_t[:, j * s.rank : (j + 1) * s.rank]
                    b[i, : s.rank] = g.b_t[j]
                self.A[group, j], self.B[group, j] = a, b

    def gather_bytes(self, group: str) -> int:
        """Temporary bytes of one group's per-token weight gathers."""
        T = self.case.T
        return sum(
            T * (self.A[group, j][0].numel() + self.B[group, j][0].numel()) * 2
            for j, _ in enumerate(GROUPS[group])
        )

    def apply(self, x: torch.Tensor, y: torch.Tensor, group: str) -> None:
        idx, lo = self.case.token_adapter, 0
        scale = self.case.scales[idx].to(y.dtype).view(-1, 1)
        for j, _ in enumerate(GROUPS[group]):
            v = torch.bmm(x.unsqueeze(1), self.A[group, j][idx])  # [T, 1, R]
            d = torch.bmm(v, self.B[group, j][idx]).squeeze(1)  # [T, out]
            y[:, lo : lo + d.shape[1]] += d * scale
            lo += d.shape[1]


def make_inputs(case: LoRACase, dtype: torch.dtype, device) -> dict[str, tuple]:
    xs = {}
    for group in GROUPS:
        in_dim, out = group_shapes(case.dims, group)
        xs[group] = (
            torch.randn(case.T, in_dim, device=device, dtype=dtype),
            torch.zeros(case.T, out, device=device, dtype=dtype),
        )
    return xs


def decode_case(batch: int, ctx: int, heads: int, kv_heads: int, head_dim: int, dtype, device):
    """A decode step: `batch` sequences of `ctx` cached tokens (the last one new), KV of one
    layer in shuffled pages of block 16 (page stride = K and V of the block)."""
    block = 16
    nb = -(-ctx // block)
    pages = list(range(batch * nb))
    random.Random(0).shuffle(pages)
    cache = torch.randn(batch * nb, 2, block, kv_heads, head_dim, device=device).to(dtype)
    tables = [pages[i * nb : (i + 1) * nb] for i in range(batch)]
    meta = build_attention_meta(
        [1] * batch, [ctx] * batch, tables, block, device, q_tile=triton_q_tile(heads, kv_heads)
    )  # both paths' fields
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    kv_bytes = batch * ctx * kv_heads * head_dim * 2 * cache.element_size()
    return q, cache[:, 0], cache[:, 1], meta, kv_bytes


def bench(fn) -> float:
    """Median milliseconds of fn (L2 flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def fmt_row(cells, widths) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))


def run_lora(dtype, device, bw: float, quick: bool) -> None:
    from loraplex.kernels.lora_triton import lora_apply_triton

    dims = module_dims(**{k: LLAMA2_7B[k] for k in ("hidden", "q_dim", "kv_dim", "inter")})
    widths = (5, 5, 10, 8, 6, 10, 10)
    print(fmt_row(("T", "D", "triton_us", "GB/s", "%bw", "torch_us", "bmm_us"), widths))
    free = torch.cuda.mem_get_info()[0]
    for T in (1, 16, 64, 256) if quick else (1, 16, 64, 256, 2048):
        for D in sorted({min(d, T) for d in (1, 8, 64, T)}):
            case = lora_case(T, D, dims, dtype, device)
            xs = make_inputs(case, dtype, device)
            meta = case.meta

            def triton_path(meta=meta, xs=xs):
                for group, (x, y) in xs.items():
                    lora_apply_triton(x, y, 0, group, meta)

            def torch_path(meta=meta, xs=xs):
                for group, (x, y) in xs.items():
                    lora_apply_torch(x, y, 0, group, meta)

            ms = bench(triton_path)
            moved = case.weight_bytes + activation_bytes(case, xs["o"][0].element_size())
            gbs = moved / ms / 1e6
            torch_ms = bench(torch_path)
            bmm_us = "skip"  # padded weights or per-token gathers would not fit
            pad = PaddedBMM(case) if case.weight_bytes * 4 < free // 4 else None
            if pad is not None and max(pad.gather_bytes(g) for g in GROUPS) < free // 4:

                def bmm_path(pad=pad, xs=xs):
                    for group, (x, y) in xs.items():
                        pad.apply(x, y, group)

                bmm_us = f"{bench(bmm_path) * 1e3:.1f}"
            cells = (T, D, f"{ms * 1e3:.1f}", f"{gbs:.0f}", f"{100 * gbs / bw:.0f}",
                     f"{torch_ms * 1e3:.1f}", bmm_us)  # fmt: skip
            print(fmt_row(cells, widths), flush=True)
            del case, xs, pad
            torch.cuda.empty_cache()


def run_attention(dtype, device, bw: float, quick: bool) -> None:
    from loraplex.kernels.attention_triton import paged_attention_triton

    heads, hd = LLAMA2_7B["heads"], LLAMA2_7B["head_dim"]
    widths = (5, 6, 10, 8, 6, 10)
    print(fmt_row(("batch", "ctx", "triton_us", "GB/s", "%bw", "torch_us"), widths))
    for batch in (1, 32) if quick else (1, 32, 128):
        for ctx in (512, 4096):
            q, k_cache, v_cache, meta, kv_bytes = decode_case(
                batch, ctx, heads, heads, hd, dtype, device
            )
            args = (q, k_cache, v_cache, meta, hd**-0.5)
            ms = bench(lambda args=args: paged_attention_triton(*args))
            gbs = kv_bytes / ms / 1e6
            torch_ms = bench(lambda args=args: paged_attention(*args))
            cells = (batch, ctx, f"{ms * 1e3:.1f}", f"{gbs:.0f}", f"{100 * gbs / bw:.0f}",
                     f"{torch_ms * 1e3:.1f}")  # fmt: skip
            print(fmt_row(cells, widths), flush=True)
            del q, k_cache, v_cache, meta, args
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    p.add_argument("--only", choices=("lora", "attention"), default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernels.bench needs a CUDA GPU (torch.cuda.is_available() is False); nothing run")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    device = torch.device("cuda")
    torch.manual_seed(0)
    bw = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {bw:.0f} GB/s  dtype: {dtype}")
    if args.only in (None, "lora"):
        print("\nLoRA, one layer, Llama-2-7B shapes, all modules, ranks 8/16/32/64 (D adapters)")
        run_lora(dtype, device, bw, args.quick)
    if args.only in (None, "attention"):
        print("\nPaged decode attention, one layer, 32 heads x 128, block 16")
        run_attention(dtype, device, bw, args.quick)


if __name__ == "__main__":
    main()
