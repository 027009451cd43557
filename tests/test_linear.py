"""kernels/linear.py: each storage mode multiplies like F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import loraplex.kernels.linear as linear
from loraplex.kernels.linear import Linear


@pytest.mark.parametrize("rows", [1, 5, 16, 70])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_uses_the_transposed_copy_and_matches(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(48, 40, generator=gen), torch.randn(48, generator=gen)
    lin = Linear(w, b if with_bias else None)
    assert lin.mode == "transposed" and lin.weight.shape == (40, 48)
    assert lin.weight.is_contiguous()
    x = torch.randn(rows, 40, generator=gen)
    want = F.linear(x, w, b if with_bias else None)
    torch.testing.assert_close(lin(x), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lin(x[:, :]), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_matches_f_linear(with_bias):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 32, generator=gen).bfloat16()
    b = torch.randn(64, generator=gen).bfloat16() if with_bias else None
    lin = Linear(w, b)
    expected_mode = "onednn" if linear._onednn_bf16_usable() else "linear"
    assert lin.mode == expected_mode
    for rows in (1, 16, 33):
        x = torch.randn(rows, 32, generator=gen).bfloat16()
        got, want = lin(x), F.linear(x, w, b)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_shared_weights_and_other_dtypes_keep_f_linear(monkeypatch):
    w = torch.randn(8, 4)
    tied = Linear(w, None, shared=True)
    assert tied.mode == "linear" and tied.weight is w
    half = Linear(w.half(), None)
    assert half.mode == "linear"
    monkeypatch.setattr(linear, "_onednn_ok", False)  # no oneDNN bf16 here
    assert Linear(w.bfloat16(), None).mode == "linear"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_grad_is_the_gradient_of_f_linear_in_every_mode(dtype):
    """What the training forward backpropagates through a frozen base linear."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 40, generator=gen).to(dtype)
    lin = Linear(w, torch.randn(48, generator=gen).to(dtype))
    x = torch.randn(7, 40, generator=gen).to(dtype).requires_grad_()
    grad_y = torch.randn(7, 48, generator=gen).to(dtype)
    F.linear(x, w).backward(grad_y)
    got = lin.input_grad(grad_y)
    assert got.shape == x.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, x.grad, rtol=1e-6, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), x.grad.float(), rtol=2e-2, atol=5e-2)
