"""Base-model linear layers stored in the layout the device's GEMM runs fastest at decode sizes.

`F.linear(x, W)` with W [out, in] is what HF runs. On the CPU, at the few rows of a decode step
(M ~ 1-64), that is not the fast way to multiply (measured on a 2-core Xeon, M = 16, the bench
model's shapes; the git history of docs/benchmarks.md has the runs):
  float32:  x @ W^T with W^T stored contiguous ([in, out]) is ~2x faster than F.linear and gives
            the same numbers (MKL takes its no-transpose path).
  bfloat16: oneDNN with the weight reordered once into its blocked layout
            (`torch.ops.mkldnn._reorder_linear_weight`) is ~1.8x faster than F.linear, which
            reorders the weight on every call.
So `Linear` keeps one copy of each weight in that layout (the [out, in] original is not kept)
and multiplies with the matching call. CUDA and float16 use F.linear. The oneDNN ops are
private torch API, so each packed weight is checked against F.linear once when it is built; any
failure there falls back to F.linear for good (logged).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_onednn_ok: bool | None = None


def _onednn_bf16_usable() -> bool:
    """oneDNN packed bf16 linears exist in this torch and this CPU runs bf16 natively."""
    global _onednn_ok
    if _onednn_ok is None:
        try:
            _onednn_ok = bool(
                torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            )
        except (AttributeError, RuntimeError):
            _onednn_ok = False
    return _onednn_ok


class Linear:
    """y = x @ W^T + b for x [T, in] -> y [T, out] (dense, unit column stride).

    Built from W [out, in] and bias [out] (or None); `mode` says how it multiplies:
    "linear" (F.linear, the original W), "transposed" (addmm on W^T [in, out] contiguous) or
    "onednn" (W reordered once for oneDNN). `pack_rows` is the row count oneDNN tunes the
    layout for (any row count works). `shared=True` (a weight also used elsewhere, e.g. tied
    embeddings) keeps F.linear on the original rather than hold a second copy.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        pack_rows: int = 16,
        shared: bool = False,
    ) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.mode = "linear"
        self.weight = weight
        if weight.device.type != "cpu" or shared:
            return
        if weight.dtype == torch.float32:
            self.mode, self.weight = "transposed", weight.t().contiguous()
        elif weight.dtype == torch.bfloat16 and _onednn_bf16_usable():
            packed = self._pack(weight, pack_rows)
            if packed is not None:
                self.mode, self.weight = "onednn", packed

    def _pack(self, weight: torch.Tensor, pack_rows: int) -> torch.Tensor | None:
        global _onednn_ok
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, pack_rows)
            x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
            x = x.to(weight.dtype)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            want = F.linear(x, weight)
            if got.shape != want.shape or not torch.allclose(
                got.float(), want.float(), rtol=2e-2, atol=1e-2
            ):
                raise RuntimeError("packed result differs from F.linear")
        except (RuntimeError, AttributeError) as e:
            _onednn_ok = False
            logger.info("oneDNN packed bf16 linears unavailable (%s); using F.linear", e)
            return None
        return packed

    def input_grad(self, grad_y: torch.Tensor) -> torch.Tensor:
        """grad_y [T, out] @ W [out, in] -> [T, in]: the gradient w.r.t. x of `self(x)` (the
        weight is frozen). The oneDNN layout has no transposed multiply, so that mode unpacks
        the weight for this call only (a transient copy of one matrix, freed on return)."""
        if self.mode == "transposed":
            return torch.mm(grad_y, self.weight.t())
        if self.mode == "onednn":
            return torch.mm(grad_y, self.weight.to_dense())
        return torch.mm(grad_y, self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transposed":
            if self.bias is None:
                return torch.mm(x, self.weight)
            return torch.addmm(self.bias, x, self.weight)
        if self.mode == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
