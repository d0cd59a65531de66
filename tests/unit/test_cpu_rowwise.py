"""The row-wise C++ passes (`server/engine/cpu/rowwise.py`): the rotary embedding gives ATen's bits, the
bfloat16 RMS norm transformers' to within a rounding, each row's result independent of the others, and
the fused residual add and norm the bits of the two ops; on each instruction set this CPU has, alike."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from server.engine.cpu import rowwise
from server.engine.lean_forward import _rotate
from tests.conftest import each_isa


@pytest.fixture(params=rowwise.ISAS)
def isa(request, cpu_kernels_built):
    """Each instruction set the passes are built for, where this CPU has it."""
    yield from each_isa(rowwise.isa, request)


def _norm(hidden: int, seed: int) -> LlamaRMSNorm:
    g = torch.Generator().manual_seed(seed)
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    norm.weight.data = torch.randn(hidden, generator=g) * 0.5 + 1
    return norm.to(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, heads, head_dim", [(1, 8, 64), (64, 4, 64), (300, 3, 10)])
def test_rotary_gives_atens_bits(dtype, tokens, heads, head_dim, isa):
    g = torch.Generator().manual_seed(tokens)
    x = (torch.randn(tokens, heads, head_dim, generator=g) * 4).to(dtype)
    angles = torch.randn(tokens, 1, head_dim, generator=g) * 10
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    assert torch.equal(rowwise.rotary(x, cos, sin), _rotate(x, cos, sin))
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous: taken as its values
    assert torch.equal(rowwise.rotary(strided, cos, sin), _rotate(x, cos, sin))


@pytest.mark.parametrize("hidden", [512, 100])  # 100: a tail past the 16 partial sums
def test_bfloat16_rms_norm_is_transformers_within_a_rounding_and_row_by_row(hidden, isa):
    norm = _norm(hidden, hidden)
    x = (torch.randn(257, hidden, generator=torch.Generator().manual_seed(hidden)) * 3).to(torch.bfloat16)
    got, want = rowwise.rms_norm(norm, x), norm(x)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    ulp = want.float().abs() * 2 ** -7  # one bfloat16 rounding of the normalized row, then of the product
    assert torch.all((got.float() - want.float()).abs() <= 2 * ulp + 1e-30)
    assert torch.equal(torch.cat([rowwise.rms_norm(norm, x[i:i + 1]) for i in range(len(x))]), got)
    with rowwise.isa("baseline"):  # every instruction set sums in the same order
        assert torch.equal(rowwise.rms_norm(norm, x), got)


@pytest.mark.parametrize("hidden", [512, 100])
def test_the_residual_add_and_norm_in_one_pass_give_the_two_ops_bits(hidden, isa):
    g = torch.Generator().manual_seed(hidden + 1)
    norm = _norm(hidden, hidden)
    x, delta = ((torch.randn(130, hidden, generator=g) * 3).to(torch.bfloat16) for _ in range(2))
    delta[0, :3] = torch.tensor([float("inf"), -x[0, 1].item(), 1e-3])  # an overflow, a zero sum, a tiny addend
    total, normed = torch.ops.softprompt.add_rms_norm_bf16(x, delta, norm.weight, norm.variance_epsilon)
    assert torch.equal(total, x + delta)
    assert torch.equal(normed[1:], rowwise.rms_norm(norm, x + delta)[1:])
    assert torch.equal(normed.isnan(), rowwise.rms_norm(norm, x + delta).isnan())  # the row with inf: NaN alike
    for bad in (x[:, :-1], x.float()):
        with pytest.raises(RuntimeError, match="expected"):
            torch.ops.softprompt.add_rms_norm_bf16(x, bad, norm.weight, 1e-5)


def test_an_unknown_instruction_set_is_refused(cpu_kernels_built):
    with pytest.raises(RuntimeError, match="auto, avx512, avx2 or baseline, not avx9"):
        with rowwise.isa("avx9"):
            pass


def test_float32_rms_norm_is_the_modules_own(isa):
    norm = LlamaRMSNorm(64, eps=1e-6)
    x = torch.randn(5, 64)
    assert torch.equal(rowwise.rms_norm(norm, x), norm(x))


@pytest.mark.parametrize("rows, width", [(1, 1360), (64, 1360), (7, 37)])  # 37: a masked tail of 5
def test_silu_mul_is_atens_within_a_last_bit(rows, width, isa):
    """bfloat16: ATen's silu then multiply, each rounded as ATen rounds; its own exponential may move a
    product across a rounding edge (its last bfloat16 bit), rarely. float32: ATen's own, bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    gate = torch.randn(rows, width) * 6
    gate[0, :4] = torch.tensor([-120.0, 95.0, 0.0, -0.0])  # e^-x past float's range both ways, and zeros
    up = torch.randn(rows, width)
    ops = torch.ops.softprompt
    assert torch.equal(ops.silu_mul(gate, up), torch.nn.functional.silu(gate) * up)
    g, u = gate.bfloat16(), up.bfloat16()
    ours, aten = ops.silu_mul(g, u), torch.nn.functional.silu(g) * u
    differ = ours != aten
    assert differ.float().mean() < 1e-3
    torch.testing.assert_close(ours, aten, atol=0, rtol=2 ** -7)  # at most a bfloat16 last bit
    config = type("C", (), {"hidden_size": width, "intermediate_size": 16, "hidden_act": "silu",
                            "mlp_bias": False})()
    mlp = LlamaMLP(config).bfloat16()
    x = torch.randn(rows, width).bfloat16()
    torch.testing.assert_close(rowwise.mlp(mlp, x), mlp(x), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_silu_mul_take_columns_of_a_merged_output(dtype, isa):
    """A merged projection's outputs are column ranges of one tensor (rows strided): both kernels read
    them in place and give the bits they give on contiguous copies."""
    torch.manual_seed(0)
    ops = torch.ops.softprompt
    qkv = (torch.randn(9, 4 * 16 + 2 * 2 * 16) * 3).to(dtype)  # 9 tokens: 4 query heads, 2 key and 2 value heads of 16
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    angles = torch.randn(9, 1, 16)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    for x in (q.view(9, 4, 16), k.view(9, 2, 16)):
        assert not x.is_contiguous()
        assert torch.equal(ops.rotary(x, cos, sin), ops.rotary(x.contiguous(), cos, sin))
    gate_up = (torch.randn(7, 2 * 40) * 4).to(dtype)
    gate, up = gate_up.split([40, 40], dim=-1)
    got = ops.silu_mul(gate, up)
    assert got.is_contiguous() and torch.equal(got, ops.silu_mul(gate.contiguous(), up.contiguous()))
