"""Triton helpers shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    """tl.dot, or an exact fp32 dot when UPCAST (fp32 models, and the interpreter, whose 16-bit
    dots are wrong in Triton 3.9)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)
