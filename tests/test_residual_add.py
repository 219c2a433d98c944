"""The residual stream's adds and the float32 LayerNorm give the values of their written-out forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matrixgame_env.nn.attention import FloatLayerNorm
from matrixgame_env.nn.fusion import residual_add


@pytest.mark.parametrize("branch_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_residual_add_equals_the_branch_cast_then_added_in_the_streams_dtype(branch_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 32, generator=g) * 7
    y = (torch.randn(2, 32, 6, generator=g) * 3).to(branch_dtype).transpose(1, 2)  # a strided branch
    before = x.clone()
    out = residual_add(x, y)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, x + y.to(torch.float32))  # widening is exact: the same sums, bit for bit
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()  # a new tensor: the stream is not written


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("affine", [True, False])
def test_float_layer_norm_normalises_in_float32_and_returns_the_inputs_dtype(dtype, affine):
    g = torch.Generator().manual_seed(1)
    norm = FloatLayerNorm(24, eps=1e-5, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(24, generator=g))
            norm.bias.copy_(torch.randn(24, generator=g))
    x = (torch.randn(3, 5, 24, generator=g) * 4 + 2).to(dtype)
    out = norm(x)
    weight, bias = (norm.weight.float(), norm.bias.float()) if affine else (None, None)
    assert out.dtype == dtype
    assert torch.equal(out, F.layer_norm(x.float(), (24,), weight, bias, 1e-5).to(dtype))
    x64 = x.double()
    centred = x64 - x64.mean(-1, keepdim=True)
    ref = centred / (centred.square().mean(-1, keepdim=True) + 1e-5).sqrt()
    if affine:
        ref = ref * norm.weight.double() + norm.bias.double()
    tolerance = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    assert ((out.double() - ref).abs() <= tolerance * (1 + ref.abs())).all()
