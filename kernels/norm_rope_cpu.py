"""RMSNorm (with the residual add folded in) and rotary embeddings through the C kernels of
kernels/norm_rope_cpu.c: the CPU model's per-layer elementwise work in one call each.

The torch functions they replace are engine/layers.py's `rms_norm` and `apply_rotary`; the
results are the same (bfloat16 rotary bit for bit; see the C file for the rest). float32 and
bfloat16, CPU tensors whose rows are contiguous.
"""

from __future__ import annotations

import torch

from loraplex.kernels.cpu_build import library

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _refuse(name: str, tensors) -> None:
    raise ValueError(
        f"{name}: CPU float32 or bfloat16 tensors of one dtype with contiguous rows, got "
        f"{[(str(t.device), t.dtype, t.stride()) for t in tensors]}"
    )


def _entry(name: str, tensors) -> object:
    """The kernel entry for the tensors' dtype; raw-pointer reads, so every tensor must be on the
    CPU, in that one supported dtype, with contiguous rows."""
    dtype = tensors[0].dtype
    for t in tensors:
        if t.dtype is not dtype or t.device.type != "cpu" or t.stride(-1) != 1:
            _refuse(name, tensors)
    suffix = _SUFFIX.get(dtype)
    if suffix is None:
        _refuse(name, tensors)
    return getattr(library(), f"{name}_{suffix}")


def _norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    rows, dim = h.shape if h.dim() == 2 else (0, -1)
    if weight.shape != (dim,) or (delta is not None and delta.shape != h.shape):
        raise ValueError(
            f"rms_norm: h {tuple(h.shape)}, weight {tuple(weight.shape)}"
            + ("" if delta is None else f", delta {tuple(delta.shape)}")
        )
    fn = _entry("rms_norm", (h, weight) if delta is None else (h, weight, delta))
    out = torch.empty_like(h)
    fn(
        h.data_ptr(), h.stride(0),
        None if delta is None else delta.data_ptr(), 0 if delta is None else delta.stride(0),
        weight.data_ptr(), out.data_ptr(), out.stride(0), rows, dim, eps,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def rms_norm_cpu(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(h) [T, dim] -> a new [T, dim]; h is not changed."""
    return _norm(h, None, weight, eps)


def add_rms_norm_cpu(
    h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """h += delta in place (the residual stream), then rms_norm(h) as a new [T, dim]."""
    return _norm(h, delta, weight, eps)


def rotary_cpu(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    head_dim: int,
) -> None:
    """Rotate, in place, the first `heads` heads of every row of x [T, >= heads * head_dim]
    (e.g. q and k at the start of a fused qkv row). positions [T] int64 index the
    [max_positions, head_dim] cos / sin tables (x's dtype); the caller guarantees they lie in
    [0, max_positions) (the model checks once per forward, not once per layer)."""
    rows = x.shape[0]
    if (
        x.dim() != 2
        or x.shape[1] < heads * head_dim
        or head_dim % 2
        or positions.shape != (rows,)
        or positions.dtype is not torch.int64
        or positions.device.type != "cpu"
        or cos.shape != sin.shape
        or cos.dim() != 2
        or cos.shape[1] != head_dim
        or not (cos.is_contiguous() and sin.is_contiguous() and positions.is_contiguous())
    ):
        raise ValueError(
            f"rotary: x {tuple(x.shape)}, positions {tuple(positions.shape)} {positions.dtype}, "
            f"tables {tuple(cos.shape)} / {tuple(sin.shape)}, {heads} heads of {head_dim}"
        )
    fn = _entry("rotary", (x, cos, sin))
    fn(
        x.data_ptr(), x.stride(0), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows,
        heads, head_dim, torch.get_num_threads(),
    )  # fmt: skip
