"""Orthonormal 2D Fourier transforms over the last two dimensions, and the real layout.

The centered transform (fastMRI's and DIRECT's fastMRI convention) keeps the zero frequency at
index ``n // 2``::

    fft2c(x)  = fftshift(fft2(ifftshift(x), norm="ortho"))
    ifft2c(k) = fftshift(ifft2(ifftshift(k), norm="ortho"))

The uncentered transform (``centered=False``, the Calgary-Campinas convention) is the plain
orthonormal ``fft2``. Both are unitary, so ``ifft2c(fft2c(x)) == x`` and adjoints are inverses.
The convention is always an explicit argument: nothing here guesses it from the data.
"""

from __future__ import annotations

import torch

from kscan.errors import ShapeError

_DIMS = (-2, -1)


def fft2c(x: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """Orthonormal 2D FFT of a complex tensor ``(..., H, W)`` over its last two dimensions."""
    if not centered:
        return torch.fft.fft2(x, dim=_DIMS, norm="ortho")
    x = torch.fft.ifftshift(x, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.fft2(x, dim=_DIMS, norm="ortho"), dim=_DIMS)


def ifft2c(k: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """Orthonormal 2D inverse FFT of a complex tensor ``(..., H, W)``; the inverse of fft2c."""
    if not centered:
        return torch.fft.ifft2(k, dim=_DIMS, norm="ortho")
    k = torch.fft.ifftshift(k, dim=_DIMS)
    return torch.fft.fftshift(torch.fft.ifft2(k, dim=_DIMS, norm="ortho"), dim=_DIMS)


def complex_to_real(x: torch.Tensor) -> torch.Tensor:
    """Complex ``(...)`` to the real layout ``(..., 2)`` (real, imaginary) used by fastMRI/DIRECT."""
    if not x.is_complex():
        raise ShapeError(f"complex_to_real: expected a complex tensor, got {x.dtype}")
    return torch.view_as_real(x)


def real_to_complex(x: torch.Tensor) -> torch.Tensor:
    """The real layout ``(..., 2)`` to a complex tensor ``(...)``."""
    if x.is_complex() or x.ndim == 0 or x.shape[-1] != 2:
        raise ShapeError(
            f"real_to_complex: expected a real tensor of shape (..., 2), got {x.dtype} {tuple(x.shape)}"
        )
    return torch.view_as_complex(x.contiguous())
