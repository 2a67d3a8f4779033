"""Data consistency: steps that pull an estimate towards the measured k-space.

With the current k-space estimate ``k`` and the measured, masked k-space ``y`` (both
``(batch, coil, H, W)``) and a mask ``M`` broadcastable to them:

- soft gradient step (VarNet, RecurrentVarNet):  ``k - eta M (k - y)``
- hard replacement:                              ``(1 - M) k + M y``
- proximal step:  ``argmin_u ||M u - y||^2 + lambda ||u - k||^2 = (M y + lambda k) / (M + lambda)``
  for a 0/1 mask (``M^2 = M``); with ``y`` zero off the mask this is ``(y + lambda k) / (M + lambda)``.
  It tends to hard replacement as ``lambda -> 0`` and leaves ``k`` unchanged off the mask.
- conjugate-gradient step (MoDL), in image space with ``A = M F S`` (:class:`SenseOperator`) and
  a regularised image ``z`` ``(batch, H, W)``:
  ``x = argmin_x ||A x - y||^2 + lambda ||x - z||^2 = (A^H A + lambda I)^-1 (A^H y + lambda z)``.

Every function is out of place and differentiable in all its tensor arguments. The modules
:class:`SoftDC`, :class:`ProximalDC` and :class:`CGDC` hold the weight (``eta`` or ``lambda``) as a
learned ``nn.Parameter``, or as a buffer when ``learnable=False``.
"""

from __future__ import annotations

import torch
from torch import nn

from kscan.errors import ConfigError
from kscan.physics.cg import conjugate_gradient
from kscan.physics.sense import SenseOperator

Weight = float | torch.Tensor


def soft_dc(k: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, eta: Weight) -> torch.Tensor:
    """Gradient step ``k - eta M (k - y)`` on ``(batch, coil, H, W)`` k-space."""
    return k - eta * mask * (k - y)


def hard_dc(k: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replacement ``(1 - M) k + M y``: measured samples replace the estimate where sampled."""
    return (1 - mask) * k + mask * y


def proximal_dc(k: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, lam: Weight) -> torch.Tensor:
    """Closed-form proximal step ``(M y + lambda k) / (M + lambda)`` for a 0/1 mask, ``lambda > 0``."""
    if isinstance(lam, (int, float)) and lam <= 0:
        raise ConfigError(f"lam: expected a positive weight for the proximal step, got {lam}")
    return (mask * y + lam * k) / (mask + lam)


def cg_dc(
    z: torch.Tensor,
    y: torch.Tensor,
    op: SenseOperator,
    lam: Weight,
    max_iter: int = 10,
    tol: float = 1e-6,
) -> torch.Tensor:
    """MoDL step ``(A^H A + lambda I)^-1 (A^H y + lambda z)`` by CG, started from ``z``.

    Args:
        z: regularised image ``(batch, H, W)``.
        y: measured k-space ``(batch, coil, H, W)``.
        op: the SENSE operator ``A = M F S``.
        lam: weight ``lambda >= 0`` of ``||x - z||^2`` (a float or a real tensor).
        max_iter, tol: CG iteration cap and relative-residual tolerance.

    Returns:
        The image ``(batch, H, W)``.
    """
    rhs = op.adjoint(y) + lam * z
    solution, _ = conjugate_gradient(
        lambda x: op.normal(x) + lam * x, rhs, x0=z, max_iter=max_iter, tol=tol
    )
    return solution


def _weight(module: nn.Module, name: str, value: float, learnable: bool) -> None:
    """Register a scalar weight as a parameter (learned) or a buffer (fixed, still saved)."""
    tensor = torch.tensor(float(value))
    if learnable:
        module.register_parameter(name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)


class SoftDC(nn.Module):
    """``k - eta M (k - y)`` with ``eta`` learned (initialised to ``eta``) or fixed."""

    def __init__(self, eta: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        _weight(self, "eta", eta, learnable)

    def forward(self, k: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return soft_dc(k, y, mask, self.eta)


class ProximalDC(nn.Module):
    """``(M y + lambda k) / (M + lambda)`` with ``lambda`` learned (initialised to ``lam``) or fixed."""

    def __init__(self, lam: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        if lam <= 0:
            raise ConfigError(f"lam: expected a positive initial weight for ProximalDC, got {lam}")
        _weight(self, "lam", lam, learnable)

    def forward(self, k: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return proximal_dc(k, y, mask, self.lam)


class CGDC(nn.Module):
    """MoDL step ``(A^H A + lambda I)^-1 (A^H y + lambda z)`` with ``lambda`` learned or fixed.

    The CG iterations are unrolled, so gradients flow to ``z``, ``y``, the coil maps and ``lambda``.
    """

    def __init__(
        self, lam: float = 0.05, learnable: bool = True, max_iter: int = 10, tol: float = 1e-6
    ) -> None:
        super().__init__()
        if lam < 0:
            raise ConfigError(f"lam: expected a non-negative initial weight for CGDC, got {lam}")
        _weight(self, "lam", lam, learnable)
        self.max_iter = max_iter
        self.tol = tol

    def forward(self, z: torch.Tensor, y: torch.Tensor, op: SenseOperator) -> torch.Tensor:
        return cg_dc(z, y, op, self.lam, max_iter=self.max_iter, tol=self.tol)
