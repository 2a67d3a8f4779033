"""Calgary-Campinas multi-channel k-space files (read only).

Layout: one HDF5 file per volume with a single dataset ::

    kspace   (slices, H, W, 2 * coils) float32

holding coil ``c``'s real part at index ``2c`` and its imaginary part at ``2c + 1`` of the last
axis, in the *uncentered* convention: the zero frequency sits at index 0, so the image is the plain
orthonormal ``ifft2`` (``kscan.physics.fft.ifft2c(k, centered=False)``), with no shifts.

What DIRECT does with these files (``direct/data/datasets.py``, ``CalgaryCampinasDataset``, read
for this module): it reads ``kspace[i]`` of shape ``(H, W, 2 * coils)``, forms
``kspace[..., ::2] + 1j * kspace[..., 1::2]`` (so the last axis is interleaved, as above) and
transposes to ``(coils, H, W)``. It applies no shift and no normalisation there. It additionally
zeroes the columns ``W >= ceil(0.85 W)`` ("sampling rate in the slice-encode direction": the
second in-plane axis is partial-Fourier sampled, and those columns hold no acquired data), reports
``padding_left = 0`` and ``padding_right`` = the first all-zero column, and can drop the outer 50
slices at each end (``crop_outer_slices``, used for the challenge's validation). Its Calgary-Campinas
models use the uncentered FFT. This reader returns the stored values unchanged (no zeroing) and
reports ``centered=False``; the partial-Fourier extent is visible as all-zero columns.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from kscan.errors import FileFormatError
from kscan.pipelines.io.fastmri import KSPACE, H5VolumeFile


@dataclass(frozen=True)
class CalgaryMetadata:
    """Per-file metadata of a Calgary-Campinas volume; ``matrix_size`` is ``(H, W)``."""

    num_slices: int
    num_coils: int
    matrix_size: tuple[int, int]
    centered: bool = False
    multicoil: bool = True

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def interleaved_to_complex(data: np.ndarray) -> np.ndarray:
    """``(..., H, W, 2 * coils)`` real, imaginary interleaved -> ``(..., coils, H, W)`` complex64.

    The (real, imaginary) float32 pairs are viewed as complex64 in place; the only copy is the
    transpose that moves the coil axis in front of ``(H, W)``.
    """
    pairs = np.ascontiguousarray(data, dtype=np.float32)
    pairs = pairs.reshape(*pairs.shape[:-1], pairs.shape[-1] // 2, 2)
    complex_last = pairs.view(np.complex64)[..., 0]
    return np.ascontiguousarray(np.moveaxis(complex_last, -1, -3))


class CalgaryFile(H5VolumeFile):
    """Lazy reader of one Calgary-Campinas volume; each call reads only the slices it returns.

    Example::

        with CalgaryFile("e14089s3_P53248.7.h5") as f:
            kspace = f.read_slice(100)["kspace"]   # (coils, H, W) complex64, uncentered
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        try:
            self.metadata = self._check_layout()
        except BaseException:
            self.close()
            raise

    def _check_layout(self) -> CalgaryMetadata:
        kspace = self._dataset(KSPACE)
        if not np.issubdtype(kspace.dtype, np.floating):
            raise FileFormatError(
                f"{self.path}: 'kspace' has dtype {kspace.dtype}; expected float32 with real/imaginary "
                "interleaved on the last axis (complex k-space is the fastMRI layout: "
                "kscan.pipelines.io.fastmri.FastMRIFile)"
            )
        if kspace.ndim != 4 or kspace.shape[-1] % 2 or 0 in kspace.shape:
            raise FileFormatError(
                f"{self.path}: 'kspace' has shape {kspace.shape}; expected non-empty "
                "(slices, H, W, 2 * coils) with an even last axis"
            )
        slices, height, width, channels = kspace.shape
        return CalgaryMetadata(
            num_slices=int(slices),
            num_coils=int(channels // 2),
            matrix_size=(int(height), int(width)),
        )

    def read_slice(self, index: int) -> dict[str, torch.Tensor]:
        """``{"kspace": (coils, H, W) complex64}`` of slice ``index``, uncentered, unchanged."""
        data = self._read(KSPACE, self._slice_index(index, self.num_slices))
        return {KSPACE: torch.from_numpy(interleaved_to_complex(data))}

    def read_volume(self) -> dict[str, torch.Tensor]:
        """``{"kspace": (slices, coils, H, W) complex64}`` of the whole volume."""
        return {KSPACE: torch.from_numpy(interleaved_to_complex(self._read(KSPACE)))}
