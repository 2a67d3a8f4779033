"""Read and write NIfTI volumes (nibabel) with their voxel-to-world affine.

The affine maps voxel indices ``(i, j, k, 1)`` to RAS+ world coordinates in mm (NIfTI's
convention). Writes are atomic and record provenance in a JSON sidecar
(``vol.nii.gz`` -> ``vol.json``, :mod:`kscan.pipelines.provenance`).

**Axes.** kscan's image volumes are ``(slices, H, W)``; on disk the NIfTI array is
``(W, H, slices)``: ``i`` = column (W), ``j`` = row (H), ``k`` = slice, the layout of
:func:`kscan.pipelines.io.dicom.read_series` and of :mod:`kscan.pipelines.io.dicom_write`
(``volume[k, j, i]`` is row ``j``, column ``i`` of slice ``k``). :func:`volume_to_nifti_array` and
:func:`nifti_array_to_volume` are that conversion, in one place.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

import kscan
from kscan.errors import FileFormatError, InvalidDataError, ShapeError
from kscan.pipelines.atomic import atomic_path
from kscan.pipelines.provenance import write_sidecar

_SUFFIXES = (".nii", ".nii.gz")
_SCANNER = 1  # NIfTI xform code: scanner-based anatomical coordinates


class NiftiVolume(NamedTuple):
    """``array`` with ``scl_slope`` / ``scl_inter`` applied (on-disk dtype when unscaled, float
    otherwise; native byte order), its (4, 4) RAS ``affine``, and a ``header`` summary: ``shape``, ``zooms``,
    ``dtype`` (on disk), ``units`` (space, time), ``qform_code``, ``sform_code``, ``description``."""

    array: np.ndarray
    affine: np.ndarray
    header: dict[str, Any]


def read_nifti(path: str | Path) -> NiftiVolume:
    """Read a ``.nii`` / ``.nii.gz`` file into memory (no memory map, so the file may be replaced).

    Raises :class:`FileFormatError` for a missing, non-NIfTI, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file; expected a NIfTI file (.nii or .nii.gz)")
    try:
        image = nib.load(path, mmap=False)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as err:
        raise _unreadable(path, err) from err
    if not isinstance(image, nib.Nifti1Pair):
        raise FileFormatError(
            f"{path}: {type(image).__name__} file; expected NIfTI (.nii or .nii.gz)"
        )
    try:
        array = np.asarray(image.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise _unreadable(path, err) from err
    header = image.header
    space, time = header.get_xyzt_units()
    info = {
        "shape": tuple(int(n) for n in image.shape),
        "zooms": tuple(float(z) for z in header.get_zooms()),
        "dtype": str(header.get_data_dtype()),
        "units": (space, time),
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
        "description": header["descrip"].item().decode("ascii", "replace"),
    }
    native = array.astype(array.dtype.newbyteorder("="), copy=False)  # torch needs native order
    return NiftiVolume(native, np.asarray(image.affine, dtype=np.float64), info)


def write_nifti(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write ``array`` (2 to 7 dims, NIfTI axis order) with its RAS ``affine`` (4, 4).

    qform and sform both hold ``affine`` (code 1, scanner), units are mm and s. Boolean arrays are
    stored as uint8, int64 as int32 (NIfTI readers rarely support 64-bit integers). When
    ``provenance`` is given (see :func:`kscan.pipelines.provenance.provenance_record`) it is
    written as the JSON sidecar, after the volume. Returns ``path``.
    """
    path = Path(path)
    if not path.name.endswith(_SUFFIXES):
        raise FileFormatError(f"{path}: expected a .nii or .nii.gz output path")
    data = _storable(np.asarray(array), path)
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise ShapeError(
            f"affine for {path}: expected a finite (4, 4) matrix, got shape {matrix.shape}"
        )
    image = nib.Nifti1Image(data, matrix)
    image.set_qform(matrix, code=_SCANNER)
    image.set_sform(matrix, code=_SCANNER)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = f"kscan {kscan.__version__}".encode()
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    if provenance is not None:
        write_sidecar(path, provenance)
    return path


def _unreadable(path: Path, err: Exception) -> FileFormatError:
    return FileFormatError(
        f"{path}: unreadable NIfTI ({type(err).__name__}); expected a complete .nii or .nii.gz file"
    )


def _storable(data: np.ndarray, path: Path) -> np.ndarray:
    """``data`` in a dtype NIfTI readers accept; rejects shapes NIfTI cannot hold."""
    if not 2 <= data.ndim <= 7:
        raise ShapeError(f"array for {path}: expected 2 to 7 dimensions, got shape {data.shape}")
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype == np.int64:
        info = np.iinfo(np.int32)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise InvalidDataError(f"array for {path}: int64 values outside the int32 range")
        return data.astype(np.int32)
    return data


def volume_to_nifti_array(volume: np.ndarray) -> np.ndarray:
    """kscan ``(slices, H, W)`` -> NIfTI ``(W, H, slices)`` (a transposed view, no copy)."""
    if volume.ndim != 3:
        raise ShapeError(f"volume: expected shape (slices, H, W), got {volume.shape}")
    return volume.transpose(2, 1, 0)


def nifti_array_to_volume(array: np.ndarray, path: str | Path = "array") -> np.ndarray:
    """NIfTI ``(W, H, slices)`` (or one slice ``(W, H)``) -> kscan ``(slices, H, W)`` (a view).

    Trailing singleton axes (e.g. a 4D ``(W, H, slices, 1)``) are dropped; ``path`` names the
    source in the error for any other shape.
    """
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim != 3:
        raise ShapeError(f"{path}: NIfTI array of shape {array.shape}; expected (W, H, slices)")
    return array.transpose(2, 1, 0)


def axial_affine(
    shape: tuple[int, int, int], voxel_size_mm: tuple[float, float, float]
) -> np.ndarray:
    """The (4, 4) RAS affine of a ``(slices, H, W)`` volume: axial, centred on the origin.

    For volumes with no geometry of their own (simulated data, fastMRI k-space, whose files
    carry only fields of view); ``voxel_size_mm = (dH, dW, dZ)``.

    ``(i, j, k, 1) -> (-dW (i - (W-1)/2), -dH (j - (H-1)/2), dZ (k - (S-1)/2))``.
    """
    slices, height, width = shape
    d_h, d_w, d_z = voxel_size_mm
    affine = np.diag([-d_w, -d_h, d_z, 1.0])
    affine[:3, 3] = [d_w * (width - 1) / 2, d_h * (height - 1) / 2, -d_z * (slices - 1) / 2]
    return affine
