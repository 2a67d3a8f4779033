"""An orthogonal 2D wavelet transform of complex images, for L1-wavelet compressed sensing.

Why not ptwt's convolution transform: it pads the boundary and is redundant, so it is not
orthogonal, and FISTA's soft-threshold is then not the exact proximal step. ptwt's matrix transform
with QR-orthogonalised boundary wavelets is (see :class:`Wavelet2d`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import ptwt
import pywt
import torch

from kscan.errors import ConfigError, ShapeError


@contextmanager
def _quiet_sparse_warnings() -> Iterator[None]:
    """Silence torch's notices about beta sparse support, raised when ptwt builds its matrices."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
        yield


class Wavelet2d:
    """Orthogonal 2D wavelet transform of complex images ``(batch, H, W)`` via ptwt's matrix FWT.

    ptwt's convolution transform (``ptwt.wavedec2``) pads the boundary and is redundant, so it is
    not orthogonal. Its matrix transform (``ptwt.MatrixWavedec2``) uses boundary wavelets
    orthogonalised by QR: with an orthogonal wavelet and ``H``, ``W`` divisible by ``2**levels``
    it is an orthogonal matrix ``W``; otherwise ptwt pads odd intermediate sizes and ``W`` is an
    isometry (``W^T W = I``, a tight frame) whose synthesis is still its exact adjoint. The real
    and imaginary parts are transformed alike.

    ``forward`` returns the coefficients flattened to ``(batch, N)`` complex, the ``H' x W'``
    approximation band first (``num_approx`` of them); ``adjoint`` is ``W^T``.
    """

    def __init__(self, shape: tuple[int, int], wavelet: str = "db4", levels: int = 4) -> None:
        try:
            self.wavelet = pywt.Wavelet(wavelet)
        except ValueError:
            raise ConfigError(
                f"wavelet: unknown wavelet {wavelet!r}; expected a pywt name such as 'db4'"
            ) from None
        if not self.wavelet.orthogonal:
            raise ConfigError(
                f"wavelet: {wavelet!r} is not orthogonal; expected e.g. 'haar', 'db4', 'sym8'"
            )
        deepest = self.max_levels(shape, self.wavelet.dec_len)
        if not 1 <= levels <= deepest:
            raise ShapeError(
                f"levels: expected 1 to {deepest} for images of shape {tuple(shape)} and {wavelet}, got {levels}"
            )
        self.shape = shape
        self._decompose = ptwt.MatrixWavedec2(self.wavelet, level=levels, orthogonalization="qr")
        self._reconstruct = ptwt.MatrixWaverec2(self.wavelet, orthogonalization="qr")
        self._layout: list[tuple[int, ...]] | None = None

    @staticmethod
    def max_levels(shape: tuple[int, int], filter_length: int) -> int:
        """Deepest decomposition with every band at least ``filter_length`` wide before it is split."""
        h, w = shape
        levels = 0
        while h >= filter_length and w >= filter_length:
            h, w, levels = math.ceil(h / 2), math.ceil(w / 2), levels + 1
        return levels

    @property
    def num_approx(self) -> int:
        """Number of approximation coefficients (known after the first ``forward``)."""
        if self._layout is None:
            raise RuntimeError("Wavelet2d.num_approx: call forward first")
        return math.prod(self._layout[0][-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W x``: complex ``(batch, H, W)`` -> complex coefficients ``(batch, N)``."""
        parts = torch.stack([x.real, x.imag], dim=1)
        with _quiet_sparse_warnings():
            coeffs = self._decompose(parts)
        bands = [coeffs[0]] + [band for detail in coeffs[1:] for band in detail]
        self._layout = [tuple(band.shape[1:]) for band in bands]
        flat = torch.cat([band.flatten(2) for band in bands], dim=2)
        return torch.complex(flat[:, 0], flat[:, 1])

    def adjoint(self, c: torch.Tensor) -> torch.Tensor:
        """``W^T c``: complex ``(batch, N)`` -> complex ``(batch, H, W)``."""
        if self._layout is None:
            raise RuntimeError(
                "Wavelet2d.adjoint: call forward first to fix the coefficient layout"
            )
        flat = torch.stack([c.real, c.imag], dim=1)
        sizes = [math.prod(shape[-2:]) for shape in self._layout]
        bands = [
            chunk.reshape(c.shape[0], *shape)
            for chunk, shape in zip(flat.split(sizes, dim=2), self._layout, strict=True)
        ]
        details = [tuple(bands[i : i + 3]) for i in range(1, len(bands), 3)]
        with _quiet_sparse_warnings():
            parts = self._reconstruct([bands[0], *details])
        return torch.complex(parts[:, 0], parts[:, 1])
