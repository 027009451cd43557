"""The CPU RMSNorm and rotary kernels (kernels/norm_rope_cpu.c via kernels/norm_rope_cpu.py)
against the torch functions they replace (engine/layers.py)."""

from __future__ import annotations

import pytest
import torch

from loraplex.engine.layers import Rotary, add_rms_norm, apply_rotary, rms_norm
from loraplex.kernels.cpu_build import cpu_kernel_error
from loraplex.kernels.norm_rope_cpu import add_rms_norm_cpu, rms_norm_cpu, rotary_cpu

pytestmark = pytest.mark.skipif(cpu_kernel_error() is not None, reason="no C kernels here")
DTYPES = [torch.float32, torch.bfloat16]


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """bfloat16: bit for bit. float32: the sum of squares runs in another order than torch's,
    so the scale may differ in its last bits."""
    if got.dtype is torch.bfloat16:
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# rows: one, a decode batch, more than the kernel's 64-row threshold for threads;
# dims: vector bodies only (512), bodies and a scalar tail (100), tails only (8)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 512), (17, 512), (70, 100), (5, 8), (0, 64)])
def test_rms_norm_matches_torch(dtype, rows, dim):
    h = _rand(rows, dim, dtype=dtype, seed=rows + dim) * 3
    w = _rand(dim, dtype=dtype, seed=1)
    before = h.clone()
    _same(rms_norm_cpu(h, w, 1e-5), rms_norm(h, w, 1e-5))
    assert torch.equal(h, before)  # the plain norm leaves its input alone
    _same(rms_norm_cpu(h, w, 0.5), rms_norm(h, w, 0.5))  # eps is used


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(17, 512), (70, 100), (3, 40)])
def test_add_rms_norm_updates_the_residual_in_place(dtype, rows, dim):
    h = _rand(rows, dim, dtype=dtype, seed=dim)
    d = _rand(rows, dim, dtype=dtype, seed=dim + 1)
    w = _rand(dim, dtype=dtype, seed=2)
    h_ref, d_before = h.clone(), d.clone()
    want = add_rms_norm(h_ref, d, w, 1e-6)
    got = add_rms_norm_cpu(h, d, w, 1e-6)
    assert torch.equal(h, h_ref)  # h + d, rounded to the dtype, stored back
    assert torch.equal(d, d_before)
    _same(got, want)


def test_norm_rows_do_not_depend_on_their_neighbours():
    h = _rand(70, 512, dtype=torch.bfloat16, seed=5)
    w = _rand(512, dtype=torch.bfloat16, seed=6)
    together = rms_norm_cpu(h, w, 1e-5)
    alone = torch.cat([rms_norm_cpu(h[i : i + 1], w, 1e-5) for i in range(70)])
    assert torch.equal(together, alone)


def _qkv(rows, heads, kv_heads, head_dim, dtype, seed):
    """A fused qkv buffer [rows, (heads + 2 kv_heads) * head_dim] and its q, k views."""
    x = _rand(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
    q = x[:, : heads * head_dim].view(rows, heads, head_dim)
    k = x[:, heads * head_dim : (heads + kv_heads) * head_dim].view(rows, kv_heads, head_dim)
    return x, q, k


# head_dim 128 and 64: vector bodies; 40: a body of 32 and a tail; 16: tails only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [128, 64, 40, 16])
@pytest.mark.parametrize("rows", [1, 9, 70])
def test_rotary_matches_torch_bit_for_bit(dtype, head_dim, rows):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    rot = Rotary(head_dim, 300, 500000.0, scaling, dtype, "cpu")
    positions = torch.randint(0, 300, (rows,), generator=torch.Generator().manual_seed(rows))
    x, q, k = _qkv(rows, 8, 2, head_dim, dtype, seed=head_dim)
    cos, sin = rot.tables(positions)
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    v_before = x[:, 10 * head_dim :].clone()
    rotary_cpu(x, positions, rot.cos, rot.sin, 10, head_dim)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(x[:, 10 * head_dim :], v_before)  # v is not a rotated head


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_reads_both_halves_of_any_table(dtype):
    """HF's tables repeat their first half; the kernel must follow torch for any table."""
    cos_t, sin_t = _rand(50, 40, dtype=dtype, seed=7), _rand(50, 40, dtype=dtype, seed=8)
    positions = torch.tensor([0, 49, 7, 7, 30])
    x, q, k = _qkv(5, 4, 4, 40, dtype, seed=9)
    want_q = apply_rotary(q, cos_t[positions].unsqueeze(1), sin_t[positions].unsqueeze(1))
    want_k = apply_rotary(k, cos_t[positions].unsqueeze(1), sin_t[positions].unsqueeze(1))
    rotary_cpu(x, positions, cos_t, sin_t, 8, 40)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_refusals_name_the_problem():
    h = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="one dtype"):
        rms_norm_cpu(h, torch.ones(64, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="one dtype"):
        rms_norm_cpu(h.half(), torch.ones(64).half(), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_cpu(h, torch.ones(32), 1e-5)
    with pytest.raises(ValueError, match=r"h \(2, 4, 64\)"):
        rms_norm_cpu(torch.zeros(2, 4, 64), torch.ones(64), 1e-5)
    with pytest.raises(ValueError, match="delta"):
        add_rms_norm_cpu(h, torch.zeros(4, 32), torch.ones(64), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm_cpu(torch.zeros(64, 4).t(), torch.ones(64), 1e-5)
    rot = Rotary(16, 32, 10000.0, None, torch.float32, "cpu")
    pos = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="rotary"):
        rotary_cpu(torch.zeros(4, 40), pos, rot.cos, rot.sin, 3, 16)  # 3 heads need 48 columns
    with pytest.raises(ValueError, match="rotary"):
        rotary_cpu(torch.zeros(4, 64), pos.int(), rot.cos, rot.sin, 4, 16)
    with pytest.raises(ValueError, match="one dtype"):
        rotary_cpu(torch.zeros(4, 64, dtype=torch.bfloat16), pos, rot.cos, rot.sin, 4, 16)
