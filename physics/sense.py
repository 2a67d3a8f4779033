"""The SENSE forward model of multi-coil Cartesian MRI.

``A = M F S``: coil sensitivities ``S`` (expand an image to coil images), the orthonormal 2D
Fourier transform ``F`` (centered or not) and the sampling mask ``M``. With ``x`` of shape
``(batch, H, W)`` and k-space ``y`` of shape ``(batch, coil, H, W)``::

    forward(x)  = M F (S x)                      (batch, coil, H, W)
    adjoint(y)  = sum_c conj(S_c) F^-1 (M y_c)   (batch, H, W)
    normal(x)   = adjoint(forward(x))            (batch, H, W)

Speed: the centered transform is ``F = P F0 P'`` with ``P = fftshift`` and ``P' = ifftshift``. A
shift commutes with point-wise products when both factors are shifted, so the operator stores
``P'(S)`` and ``P'(M)`` once and works in the shifted domain: ``normal`` shifts one image in and
one image out instead of shifting every coil image four times. ``kscan bench physics`` measures
the gain against the straightforward form.
"""

from __future__ import annotations

import torch

from kscan.errors import MaskError, ShapeError
from kscan.physics.checks import require_complex, require_ndim
from kscan.physics.coils import expand, reduce

_DIMS = (-2, -1)


def _ishift(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifftshift(x, dim=_DIMS)


def _shift(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(x, dim=_DIMS)


def check_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Validate a sampling mask (real or bool, values in {0, 1} or weights in [0, 1]) and return it real.

    Raises :class:`MaskError` when nothing is sampled or values are outside [0, 1].
    """
    if not isinstance(mask, torch.Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise ShapeError(f"{name}: expected a real or bool mask, got {mask.dtype}")
    mask = mask.to(torch.float32) if not mask.is_floating_point() else mask
    if mask.ndim < 1:
        raise ShapeError(
            f"{name}: expected a mask of shape (W,), (1, W) or (..., H, W), got a scalar"
        )
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise MaskError(
            f"{name}: values must lie in [0, 1], found min {float(mask.min())}, max {float(mask.max())}"
        )
    if not bool((mask > 0).any()):
        raise MaskError(f"{name}: samples no k-space point; at least one line must be sampled")
    return mask


class SenseOperator:
    """``A = M F S`` for coil maps ``(batch, coil, H, W)`` and a mask broadcastable to them.

    Args:
        maps: complex coil sensitivities ``(batch, coil, H, W)``.
        mask: real or bool mask broadcastable to ``(batch, coil, H, W)``, e.g. ``(1, W)`` for
            1D masks on the phase-encode axis or ``(batch, 1, H, W)``.
        centered: centered (fastMRI) or uncentered (Calgary-Campinas) FFT convention.
    """

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor, centered: bool = True) -> None:
        require_complex(maps, "maps")
        require_ndim(maps, "maps", 4, "(batch, coil, H, W)")
        mask = check_mask(mask).to(device=maps.device, dtype=maps.real.dtype)
        if mask.ndim == 1:  # (W,), as fastMRI's test files store it
            mask = mask.unsqueeze(0)
        try:
            torch.broadcast_shapes(mask.shape, maps.shape)
        except RuntimeError:
            raise ShapeError(
                f"mask: shape {tuple(mask.shape)} does not broadcast to the coil maps {tuple(maps.shape)}"
            ) from None
        if (mask.ndim >= 2 and mask.shape[-2] not in (1, maps.shape[-2])) or mask.shape[
            -1
        ] != maps.shape[-1]:
            raise ShapeError(
                f"mask: expected (..., H or 1, W={maps.shape[-1]}), got {tuple(mask.shape)}"
            )
        self.centered = centered
        self.maps = maps
        self.mask = mask
        # Stored in the shifted domain (see the module docstring).
        self._maps = _ishift(maps) if centered else maps
        self._mask = _ishift(mask) if centered else mask

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of the images the operator acts on: ``(batch, H, W)``."""
        b, _, h, w = self.maps.shape
        return (b, h, w)

    def _check_image(self, x: torch.Tensor) -> None:
        if x.shape[-2:] != self.maps.shape[-2:] or x.ndim != 3:
            raise ShapeError(f"image: expected shape {self.image_shape}, got {tuple(x.shape)}")

    def _check_kspace(self, y: torch.Tensor) -> None:
        if y.ndim != 4 or y.shape[-3:] != self.maps.shape[-3:]:
            raise ShapeError(
                f"kspace: expected shape {tuple(self.maps.shape)}, got {tuple(y.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``M F (S x)``: image ``(batch, H, W)`` -> masked k-space ``(batch, coil, H, W)``."""
        self._check_image(x)
        xs = _ishift(x) if self.centered else x
        k = torch.fft.fft2(expand(xs, self._maps), dim=_DIMS, norm="ortho") * self._mask
        return _shift(k) if self.centered else k

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``sum_c conj(S_c) F^-1(M y_c)``: k-space ``(batch, coil, H, W)`` -> image ``(batch, H, W)``."""
        self._check_kspace(y)
        ys = _ishift(y) if self.centered else y
        x = reduce(torch.fft.ifft2(ys * self._mask, dim=_DIMS, norm="ortho"), self._maps)
        return _shift(x) if self.centered else x

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``A^H A x``: image ``(batch, H, W)`` -> image ``(batch, H, W)``."""
        self._check_image(x)
        xs = _ishift(x) if self.centered else x
        k = torch.fft.fft2(expand(xs, self._maps), dim=_DIMS, norm="ortho") * self._mask
        out = reduce(torch.fft.ifft2(k, dim=_DIMS, norm="ortho"), self._maps)
        return _shift(out) if self.centered else out

    __call__ = forward
