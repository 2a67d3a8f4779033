"""Data-consistency steps against their formulas, dense solves and gradcheck."""

from __future__ import annotations

import pytest
import torch

from kscan.errors import ConfigError
from kscan.physics.consistency import (
    CGDC,
    ProximalDC,
    SoftDC,
    cg_dc,
    hard_dc,
    proximal_dc,
    soft_dc,
)
from kscan.physics.sense import SenseOperator

C128 = torch.complex128


def crandn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=C128, generator=torch.Generator().manual_seed(seed))


def line_mask(width: int, lines: list[int]) -> torch.Tensor:
    mask = torch.zeros(width, dtype=torch.float64)
    mask[lines] = 1
    return mask


@pytest.fixture
def kspace_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Estimate k, measured y (zero off the mask) and a 1D mask, shapes (2, 3, 5, 6)."""
    mask = line_mask(6, [0, 2, 3])
    return crandn(2, 3, 5, 6, seed=0), crandn(2, 3, 5, 6, seed=1) * mask, mask


def sense_problem(batch: int = 2, coils: int = 3, h: int = 6, w: int = 5, seed: int = 0):
    maps = crandn(batch, coils, h, w, seed=seed)
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()
    mask = line_mask(w, [0, 2, 3])
    op = SenseOperator(maps, mask)
    y = op.forward(crandn(batch, h, w, seed=seed + 1))
    return op, y


def dense_normal_solve(
    op: SenseOperator, y: torch.Tensor, z: torch.Tensor, lam: float
) -> torch.Tensor:
    """``(A^H A + lam I)^-1 (A^H y + lam z)`` with ``A`` built column by column."""
    b, h, w = op.image_shape
    n = h * w
    basis = torch.eye(n, dtype=C128).reshape(n, h, w)
    out = []
    for i in range(b):
        single = SenseOperator(op.maps[i : i + 1], op.mask)
        a = torch.stack([single.forward(e.unsqueeze(0)).flatten() for e in basis], dim=1)
        rhs = a.mH @ y[i].flatten() + lam * z[i].flatten()
        out.append(torch.linalg.solve(a.mH @ a + lam * torch.eye(n, dtype=C128), rhs).reshape(h, w))
    return torch.stack(out)


def test_soft_and_hard_steps_follow_their_formulas(kspace_pair) -> None:
    k, y, mask = kspace_pair
    m = mask.bool()
    out = soft_dc(k, y, mask, 0.3)
    torch.testing.assert_close(out[..., m], k[..., m] - 0.3 * (k[..., m] - y[..., m]))
    torch.testing.assert_close(out[..., ~m], k[..., ~m])
    hard = hard_dc(k, y, mask)
    torch.testing.assert_close(hard[..., m], y[..., m])
    torch.testing.assert_close(hard[..., ~m], k[..., ~m])
    torch.testing.assert_close(soft_dc(k, y, mask, 1.0), hard)


def test_proximal_step_formula_optimality_and_limit(kspace_pair) -> None:
    k, y, mask = kspace_pair
    lam = 0.7
    out = proximal_dc(k, y, mask, lam)
    torch.testing.assert_close(out, (y + lam * k) / (mask + lam))
    # Optimality of argmin_u ||M u - y||^2 + lam ||u - k||^2: M (M u - y) + lam (u - k) = 0.
    torch.testing.assert_close(
        mask * (mask * out - y) + lam * (out - k), torch.zeros_like(k), rtol=0, atol=1e-12
    )
    # lambda -> 0: hard replacement on sampled points, the estimate elsewhere.
    torch.testing.assert_close(
        proximal_dc(k, y, mask, 1e-10), hard_dc(k, y, mask), rtol=1e-8, atol=1e-8
    )
    with pytest.raises(ConfigError, match="lam"):
        proximal_dc(k, y, mask, 0.0)


def test_gradcheck_of_kspace_steps() -> None:
    mask = line_mask(3, [0, 2])
    k = crandn(1, 2, 2, 3, seed=2).requires_grad_(True)
    y = (crandn(1, 2, 2, 3, seed=3) * mask).requires_grad_(True)
    weight = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k, y, eta: soft_dc(k, y, mask, eta), (k, y, weight))
    assert torch.autograd.gradcheck(lambda k, y: hard_dc(k, y, mask), (k, y))
    assert torch.autograd.gradcheck(lambda k, y, lam: proximal_dc(k, y, mask, lam), (k, y, weight))


def test_cg_step_solves_the_regularised_normal_equations() -> None:
    op, y = sense_problem()
    z = crandn(2, 6, 5, seed=5)
    x = cg_dc(z, y, op, lam=0.05, max_iter=200, tol=1e-12)
    torch.testing.assert_close(x, dense_normal_solve(op, y, z, 0.05), rtol=1e-8, atol=1e-9)
    module = CGDC(lam=0.05, max_iter=200, tol=1e-12).double()
    torch.testing.assert_close(module(z, y, op), x)


def test_gradcheck_of_cg_step() -> None:
    maps = crandn(1, 2, 3, 3, seed=6)
    mask = line_mask(3, [0, 2])
    z = crandn(1, 3, 3, seed=7).requires_grad_(True)
    y = (crandn(1, 2, 3, 3, seed=8) * mask).requires_grad_(True)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    m = maps.clone().requires_grad_(True)

    def step(z, y, lam, m):
        return cg_dc(z, y, SenseOperator(m, mask), lam, max_iter=4, tol=0.0)

    assert torch.autograd.gradcheck(step, (z, y, lam, m))


def test_modules_hold_their_weights() -> None:
    soft, prox, cg = SoftDC(0.5), ProximalDC(2.0), CGDC(0.1)
    assert [n for n, _ in soft.named_parameters()] == ["eta"]
    assert [n for n, _ in prox.named_parameters()] == ["lam"]
    assert [n for n, _ in cg.named_parameters()] == ["lam"]
    fixed = SoftDC(0.5, learnable=False)
    assert list(fixed.parameters()) == [] and float(fixed.state_dict()["eta"]) == 0.5
    with pytest.raises(ConfigError, match="lam"):
        ProximalDC(0.0)
    with pytest.raises(ConfigError, match="lam"):
        CGDC(-1.0)


def test_gradients_reach_the_learned_weights(kspace_pair) -> None:
    k, y, mask = kspace_pair
    op, y_sense = sense_problem()
    z = crandn(2, 6, 5, seed=9)
    soft, prox, cg = SoftDC(0.5).double(), ProximalDC(2.0).double(), CGDC(0.1, max_iter=5).double()
    loss = (
        soft(k, y, mask).abs().sum() + prox(k, y, mask).abs().sum() + cg(z, y_sense, op).abs().sum()
    )
    loss.backward()
    for module in (soft, prox, cg):
        (param,) = module.parameters()
        assert param.grad is not None and float(param.grad.abs()) > 0
