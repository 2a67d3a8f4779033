"""Forward finite differences of images and their exact adjoint (for total variation).

``D x = (x[i+1, j] - x[i, j], x[i, j+1] - x[i, j])`` with the Neumann boundary condition (the
difference at the last row or column is 0); ``D^H`` is minus the discrete divergence.
"""

from __future__ import annotations

import torch


def _forward_difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x[i+1] - x[i]`` along ``dim``, 0 at the last index (Neumann boundary)."""
    n = x.shape[dim]
    diff = x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)
    return torch.cat([diff, torch.zeros_like(x.narrow(dim, 0, 1))], dim=dim)


def _forward_difference_adjoint(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Adjoint of :func:`_forward_difference`: ``g[i-1] - g[i]`` with ``g[-1] = g[n-1] = 0``."""
    n = g.shape[dim]
    inner = g.narrow(dim, 0, n - 1)
    zero = torch.zeros_like(g.narrow(dim, 0, 1))
    return torch.cat([zero, inner], dim=dim) - torch.cat([inner, zero], dim=dim)


def finite_difference(x: torch.Tensor) -> torch.Tensor:
    """Image gradient ``D x``: ``(batch, H, W)`` -> ``(batch, 2, H, W)`` (along H, then along W).

    Forward differences ``x[i+1] - x[i]`` with the Neumann boundary condition: the difference at
    the last row (column) is 0.
    """
    return torch.stack([_forward_difference(x, -2), _forward_difference(x, -1)], dim=-3)


def finite_difference_adjoint(g: torch.Tensor) -> torch.Tensor:
    """``D^H g`` (minus the discrete divergence): ``(batch, 2, H, W)`` -> ``(batch, H, W)``."""
    return _forward_difference_adjoint(g[..., 0, :, :], -2) + _forward_difference_adjoint(
        g[..., 1, :, :], -1
    )
