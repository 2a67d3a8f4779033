"""Coil expansion, reduction and combination.

With coil sensitivities ``S`` of shape ``(batch, coil, H, W)`` and an image ``x`` of shape
``(batch, H, W)``:

- expand:  ``E(x)_c = S_c x``                        -> ``(batch, coil, H, W)``
- reduce:  ``R(y) = sum_c conj(S_c) y_c``            -> ``(batch, H, W)`` (the adjoint of E)
- RSS:     ``sqrt(sum_c |y_c|^2)``                   -> ``(batch, H, W)``, real

``reduce`` is the SENSE coil combination; it equals the image when ``sum_c |S_c|^2 = 1``.
"""

from __future__ import annotations

import torch


def expand(image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Coil images ``S_c x``: ``(batch, H, W)`` and maps ``(batch, coil, H, W)`` -> ``(batch, coil, H, W)``."""
    return maps * image.unsqueeze(-3)


def reduce(coil_images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """SENSE combination ``sum_c conj(S_c) y_c``: ``(batch, coil, H, W)`` -> ``(batch, H, W)``."""
    return (maps.conj() * coil_images).sum(dim=-3)


def rss(coil_images: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Root sum of squares over the coil dimension: ``sqrt(sum_c |y_c|^2)``, a real tensor."""
    if coil_images.is_complex():
        power = coil_images.real.square() + coil_images.imag.square()
    else:
        power = coil_images.square()
    return power.sum(dim=dim).sqrt()
