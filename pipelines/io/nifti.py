"""Read and write NIfTI volumes (nibabel) with their voxel-to-world affine.

The affine maps voxel indices ``(i, j, k, 1)`` to RAS+ world coordinates in mm (NIfTI's
convention). Writes are atomic and record provenance in a JSON sidecar
(``vol.nii.gz`` -> ``vol.json``, :mod:`kscan.pipelines.provenance`).
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
        raise FileFormatError(f"{path}: {type(image).__name__} file; expected NIfTI (.nii or .nii.gz)")
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
        raise ShapeError(f"affine for {path}: expected a finite (4, 4) matrix, got shape {matrix.shape}")
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
