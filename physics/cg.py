"""Batched conjugate gradient for Hermitian positive (semi-)definite systems.

Solves ``op(x) = b`` for every item of a batch at once. ``b`` and ``x`` are complex (or real)
tensors ``(batch, ...)``; ``op`` maps such a tensor to one of the same shape and is Hermitian
positive (semi-)definite per item. Inner products ``<u, v> = sum conj(u) v`` are reduced over every
dimension but the batch, so each item has its own step sizes::

    r_0 = b - op(x_0),  p_0 = r_0
    alpha_k = <r_k, r_k> / <p_k, op(p_k)>
    x_k+1 = x_k + alpha_k p_k,   r_k+1 = r_k - alpha_k op(p_k)
    beta_k = <r_k+1, r_k+1> / <r_k, r_k>,   p_k+1 = r_k+1 + beta_k p_k

An item stops (its updates are frozen) once its relative residual ``||r|| / ||b||`` drops below
``tol``, or when ``<p, op(p)> <= 0`` (breakdown on a semi-definite system); the loop ends when every
item has stopped or after ``max_iter`` iterations. A frozen item is not changed by later
iterations, so a batch gives the same result as its items solved one by one. For ``b = 0`` the
residual is measured in absolute terms (``||b||`` is replaced by 1).

Everything is out of place, so the unrolled iterations are differentiable under autograd; wrap the
call in ``torch.no_grad()`` when no gradient is wanted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kscan.errors import ConfigError, ShapeError


class CGResult(NamedTuple):
    """Solution ``(batch, ...)`` and relative residual per iteration ``(iterations, batch)``."""

    solution: torch.Tensor
    history: torch.Tensor


def batch_dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``<u, v> = sum conj(u) v`` over all dimensions but the first: ``(batch, ...)`` -> ``(batch,)``."""
    return (u.conj() * v).flatten(1).sum(dim=1)


def batch_vector_norm(u: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each item: ``(batch, ...)`` -> real ``(batch,)``."""
    return torch.linalg.vector_norm(u.flatten(1), dim=1)


def per_item(scalar: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``(batch,)`` to ``(batch, 1, ..., 1)`` so that it broadcasts against ``like``."""
    return scalar.reshape(scalar.shape + (1,) * (like.ndim - 1))


def _safe_divide(num: torch.Tensor, den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``ok``, else 0, without NaN in either branch (keeps gradients finite)."""
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def conjugate_gradient(
    op: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    max_iter: int = 50,
    tol: float = 1e-6,
    callback: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> CGResult:
    """Solve ``op(x) = b`` per batch item by conjugate gradient.

    Args:
        op: Hermitian positive (semi-)definite operator, ``(batch, ...)`` -> ``(batch, ...)``.
        b: right-hand side ``(batch, ...)``, complex or real.
        x0: initial guess shaped like ``b`` (zeros when ``None``).
        max_iter: most iterations (0 returns ``x0``).
        tol: stop an item when ``||b - op(x)|| / ||b|| < tol``.
        callback: called after every iteration with the iterate ``x`` and its residual ``r``
            (for example to record another convergence measure).

    Returns:
        ``CGResult(solution, history)``: the solution ``(batch, ...)`` and the relative residual
        after each iteration, a real tensor ``(iterations, batch)`` (frozen items repeat their
        last value).
    """
    if b.ndim < 1:
        raise ShapeError(
            f"b: expected a batched tensor (batch, ...), got a scalar of shape {tuple(b.shape)}"
        )
    if max_iter < 0 or tol < 0:
        raise ConfigError(
            f"conjugate_gradient: expected max_iter >= 0 and tol >= 0, got {max_iter} and {tol}"
        )
    if x0 is not None and x0.shape != b.shape:
        raise ShapeError(f"x0: expected the shape of b {tuple(b.shape)}, got {tuple(x0.shape)}")
    x = torch.zeros_like(b) if x0 is None else x0
    r = b - op(x) if x0 is not None else b
    p = r
    rs = batch_dot(r, r).real
    b_norm = batch_vector_norm(b)
    b_norm = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    active = rs.sqrt() / b_norm >= tol
    history = []
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        ap = op(p)
        pap = batch_dot(p, ap).real
        step = active & (pap > 0)
        alpha = per_item(_safe_divide(rs, pap, step), b)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = batch_dot(r, r).real
        beta = per_item(_safe_divide(rs_new, rs, step), b)
        p = torch.where(per_item(step, b), r + beta * p, p)
        rs = torch.where(step, rs_new, rs)
        relative = rs.sqrt() / b_norm
        history.append(relative)
        if callback is not None:
            callback(x, r)
        active = step & (relative >= tol)
    stacked = torch.stack(history) if history else b_norm.new_zeros((0, b.shape[0]))
    return CGResult(x, stacked)
