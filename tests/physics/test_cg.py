"""Batched conjugate gradient against dense solves."""

from __future__ import annotations

import pytest
import torch

from kscan.errors import ConfigError, ShapeError
from kscan.physics.cg import conjugate_gradient

C128 = torch.complex128


def random_hpd(batch: int, n: int, condition: float, seed: int) -> torch.Tensor:
    """Hermitian positive definite matrices ``(batch, n, n)`` with eigenvalues in [1, condition]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=C128, generator=g))
    eig = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), n, dtype=torch.float64)
    return q @ torch.diag_embed(eig.to(C128)) @ q.mH


def matvec(a: torch.Tensor):
    return lambda x: (a @ x.unsqueeze(-1)).squeeze(-1)


def random_vector(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=C128, generator=torch.Generator().manual_seed(seed))


def test_solves_hpd_system_like_dense_solve() -> None:
    a = random_hpd(3, 24, condition=50.0, seed=0)
    b = random_vector((3, 24), seed=1)
    x, history = conjugate_gradient(matvec(a), b, max_iter=200, tol=1e-12)
    expected = torch.linalg.solve(a, b)
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-9)
    assert history.shape[1] == 3 and history.dtype == torch.float64
    assert bool((history[-1] < 1e-12).all())
    residual = torch.linalg.vector_norm(b - matvec(a)(x), dim=1) / torch.linalg.vector_norm(
        b, dim=1
    )
    torch.testing.assert_close(history[-1], residual, rtol=1e-3, atol=1e-14)


def test_items_converge_independently_and_match_single_solves() -> None:
    # Item 0 is well conditioned (few iterations), item 1 badly conditioned (many).
    a = torch.cat(
        [random_hpd(1, 30, condition=2.0, seed=2), random_hpd(1, 30, condition=1e3, seed=3)]
    )
    b = random_vector((2, 30), seed=4)
    x, history = conjugate_gradient(matvec(a), b, max_iter=100, tol=1e-8)
    singles = [
        conjugate_gradient(matvec(a[i : i + 1]), b[i : i + 1], max_iter=100, tol=1e-8)
        for i in range(2)
    ]
    stop = singles[0].history.shape[0]
    assert stop < 20 < history.shape[0] and abs(history.shape[0] - singles[1].history.shape[0]) <= 1
    assert bool((history[-1] < 1e-8).all())
    for i, single in enumerate(singles):
        torch.testing.assert_close(x[i : i + 1], single.solution, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-5, atol=1e-7)
    # The converged item is frozen: its residual stays at its final value.
    assert bool((history[stop - 1 :, 0] == history[stop - 1, 0]).all())
    torch.testing.assert_close(history[:stop, 0], singles[0].history[:, 0], rtol=1e-6, atol=0)


def test_multidimensional_items_and_initial_guess() -> None:
    """Items of shape (H, W) with a diagonal operator; an exact x0 needs no iteration."""
    g = torch.Generator().manual_seed(5)
    d = torch.rand(2, 6, 5, dtype=torch.float64, generator=g) + 0.5
    b = random_vector((2, 6, 5), seed=6)
    x, _ = conjugate_gradient(lambda v: d * v, b, max_iter=50, tol=1e-12)
    torch.testing.assert_close(x, b / d, rtol=1e-10, atol=1e-12)
    x, history = conjugate_gradient(lambda v: d * v, b, x0=b / d, max_iter=50, tol=1e-10)
    assert history.shape == (0, 2)
    torch.testing.assert_close(x, b / d)


def test_zero_right_hand_side_and_semidefinite_operator() -> None:
    a = random_hpd(2, 10, condition=10.0, seed=7)
    x, history = conjugate_gradient(
        matvec(a), torch.zeros(2, 10, dtype=C128), max_iter=20, tol=1e-10
    )
    assert history.shape[0] == 0 and bool((x == 0).all())
    # Rank-deficient PSD operator (projection onto the first 6 coordinates) with b in its range.
    p = torch.diag(torch.tensor([1.0] * 6 + [0.0] * 4, dtype=C128)).expand(2, 10, 10)
    b = p @ random_vector((2, 10, 1), seed=8)
    x, history = conjugate_gradient(matvec(p), b.squeeze(-1), max_iter=20, tol=1e-12)
    torch.testing.assert_close(x, b.squeeze(-1), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(history).all()


def test_gradients_match_the_implicit_derivative_of_the_solve() -> None:
    """The unrolled CG, run to convergence, differentiates like ``torch.linalg.solve``."""
    a = random_hpd(2, 8, condition=5.0, seed=9)
    b = random_vector((2, 8), seed=10)
    scale = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b1 = b.clone().requires_grad_(True)
    op = lambda v: matvec(a)(v) + scale.view(2, 1) * v  # noqa: E731
    x, _ = conjugate_gradient(op, b1, max_iter=50, tol=1e-14)
    x.abs().square().sum().backward()
    b2 = b.clone().requires_grad_(True)
    scale2 = scale.detach().clone().requires_grad_(True)
    full = a + scale2.view(2, 1, 1) * torch.eye(8, dtype=C128)
    torch.linalg.solve(full, b2).abs().square().sum().backward()
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(scale.grad, scale2.grad, rtol=1e-8, atol=1e-10)


def test_gradcheck_of_unrolled_iterations() -> None:
    a = random_hpd(1, 5, condition=4.0, seed=11)
    b = random_vector((1, 5), seed=12).requires_grad_(True)
    shift = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def solve(b: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return conjugate_gradient(
            lambda v: matvec(a)(v) + shift * v, b, max_iter=3, tol=0.0
        ).solution

    assert torch.autograd.gradcheck(solve, (b, shift))


def test_rejects_bad_arguments() -> None:
    b = torch.ones(2, 3, dtype=C128)
    with pytest.raises(ConfigError, match="max_iter"):
        conjugate_gradient(lambda v: v, b, max_iter=-1)
    with pytest.raises(ShapeError, match="x0"):
        conjugate_gradient(lambda v: v, b, x0=torch.ones(2, 4, dtype=C128))
