"""SENSE operator: adjoint identity (hypothesis), agreement with the textbook form, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kscan.errors import MaskError, ShapeError
from kscan.physics.coils import expand, reduce, rss
from kscan.physics.fft import fft2c, ifft2c
from kscan.physics.sense import SenseOperator


def _crandn(shape, gen, dtype):
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    return torch.complex(
        torch.randn(shape, generator=gen, dtype=real), torch.randn(shape, generator=gen, dtype=real)
    )


def _rel_inner_error(op, x, y):
    lhs = torch.vdot(op.forward(x).flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), op.adjoint(y).flatten())
    return float((lhs - rhs).abs() / lhs.abs().clamp_min(1e-30))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    coils=st.integers(1, 5),
    h=st.integers(4, 17),
    w=st.integers(4, 17),
    mask_2d=st.booleans(),
    centered=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_adjoint_identity(batch, coils, h, w, mask_2d, centered, double, seed):
    dtype = torch.complex128 if double else torch.complex64
    gen = torch.Generator().manual_seed(seed)
    maps = _crandn((batch, coils, h, w), gen, dtype)
    mask_shape = (batch, 1, h, w) if mask_2d else (1, w)
    mask = (torch.rand(mask_shape, generator=gen) < 0.5).to(torch.float32)
    mask[..., 0] = 1.0  # at least one sampled line
    op = SenseOperator(maps, mask, centered=centered)
    x = _crandn((batch, h, w), gen, dtype)
    y = _crandn((batch, coils, h, w), gen, dtype)
    assert _rel_inner_error(op, x, y) < (1e-12 if double else 1e-5)


@pytest.mark.parametrize("centered", [True, False])
def test_matches_textbook_form(centered):
    gen = torch.Generator().manual_seed(0)
    maps = _crandn((2, 4, 12, 10), gen, torch.complex128)
    mask = (torch.rand(1, 10, generator=gen) < 0.5).double()
    mask[0, 5] = 1
    x = _crandn((2, 12, 10), gen, torch.complex128)
    op = SenseOperator(maps, mask, centered=centered)
    k = mask * fft2c(maps * x[:, None], centered=centered)
    torch.testing.assert_close(op.forward(x), k)
    adj = (maps.conj() * ifft2c(mask * k, centered=centered)).sum(1)
    torch.testing.assert_close(op.adjoint(k), adj)
    torch.testing.assert_close(op.normal(x), adj)


def test_coil_helpers():
    gen = torch.Generator().manual_seed(1)
    maps = _crandn((1, 3, 5, 6), gen, torch.complex128)
    maps = maps / rss(maps, dim=1).unsqueeze(1)
    x = _crandn((1, 5, 6), gen, torch.complex128)
    torch.testing.assert_close(reduce(expand(x, maps), maps), x)
    np.testing.assert_allclose(rss(expand(x, maps)).numpy(), x.abs().numpy())


def test_differentiable():
    gen = torch.Generator().manual_seed(2)
    maps = _crandn((1, 2, 6, 5), gen, torch.complex128)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    x = _crandn((1, 6, 5), gen, torch.complex128).requires_grad_()
    maps.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, s: SenseOperator(s, mask).normal(a), (x, maps))


def test_bad_input():
    maps = torch.ones(1, 2, 8, 6, dtype=torch.complex64)
    with pytest.raises(MaskError, match="samples no k-space point"):
        SenseOperator(maps, torch.zeros(1, 6))
    with pytest.raises(MaskError, match=r"\[0, 1\]"):
        SenseOperator(maps, torch.full((1, 6), 2.0))
    with pytest.raises(ShapeError, match="does not broadcast"):
        SenseOperator(maps, torch.ones(1, 5))
    with pytest.raises(ShapeError, match="complex"):
        SenseOperator(maps.real, torch.ones(1, 6))
    with pytest.raises(ShapeError, match=r"\(batch, coil, H, W\)"):
        SenseOperator(maps[0], torch.ones(1, 6))
    op = SenseOperator(maps, torch.ones(1, 6))
    with pytest.raises(ShapeError, match=r"image: expected shape \(1, 8, 6\)"):
        op.forward(torch.ones(1, 8, 7, dtype=torch.complex64))
    with pytest.raises(ShapeError, match="kspace: expected shape"):
        op.adjoint(torch.ones(1, 3, 8, 6, dtype=torch.complex64))
