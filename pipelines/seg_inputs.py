"""The inputs of ``kscan segment``: any image volume kscan reads, as ``(slices, H, W)`` and an affine.

=====================  ==========================================================================
input                  volume and geometry
=====================  ==========================================================================
NIfTI ``.nii[.gz]``    the array ``(W, H, slices)`` as ``(slices, H, W)``
                       (:func:`~kscan.pipelines.io.nifti.nifti_array_to_volume`), its affine
DICOM series folder    :func:`~kscan.pipelines.io.dicom.read_series` (MR), the series' affine;
                       the files of its slices, in slice order, for a DICOM SEG
DICOM file             the same for one file, of any name, recognised by the ``DICM`` marker of
                       its preamble: one image (one slice) or an enhanced multi-frame image (a
                       slice per frame; the slice of each frame, for a DICOM SEG of the file)
HDF5 ``.h5``           ``reconstruction`` (``kscan reconstruct``, fastMRI submissions) or the
                       fastMRI target ``reconstruction_rss`` / ``reconstruction_esc``
                       ``(slices, H, W)``; an axial affine
                       (:func:`~kscan.pipelines.io.nifti.axial_affine`) of the voxel size from
                       the ISMRMRD header's recon field of view when the file has one, else 1 mm
PNG / JPEG             one slice ``(1, H, W)`` (colour images as luminance, PIL's ``L``);
                       an axial affine of 1 mm voxels
=====================  ==========================================================================

A folder is one DICOM series when it holds no subfolder and no file of the suffixes above;
otherwise it is a folder of inputs: those files and its subfolders (each a DICOM series), sorted by
name, hidden entries skipped. DICOM files are inputs of their own only when given as the input
path: inside a folder they make up its series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.misc import is_dicom

from kscan.errors import FileFormatError, ShapeError
from kscan.pipelines.io.dicom import read_series
from kscan.pipelines.io.fastmri import TARGET_KEYS, header_voxel_size_mm
from kscan.pipelines.io.nifti import axial_affine, nifti_array_to_volume, read_nifti

NIFTI_SUFFIXES = (".nii", ".nii.gz")
H5_SUFFIXES = (".h5",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXPECTED = "a NIfTI, HDF5, PNG, JPEG or DICOM file, or a DICOM series folder"
RECONSTRUCTION = "reconstruction"
"""The dataset ``kscan reconstruct`` (fastMRI's submission layout) writes."""


@dataclass(frozen=True)
class SegInput:
    """One input of ``kscan segment``.

    Attributes:
        path: the file or DICOM folder.
        kind: ``nifti``, ``dicom``, ``h5`` or ``image``.
        volume: ``(slices, H, W)`` float32, ``volume[k, j, i]`` row ``j``, column ``i`` of slice ``k``.
        affine: ``(4, 4)`` RAS affine of the NIfTI array ``volume.transpose(2, 1, 0)``.
        files: the files read (for the provenance).
        nifti_shape: the input NIfTI's array shape (so labels are written in it), else None.
        dicom_slices: DICOM inputs of single-frame images: the file of each slice, in order.
        dicom_frames: a DICOM input of one multi-frame file: the slice of each frame, in frame
            order.
    """

    path: Path
    kind: str
    volume: np.ndarray
    affine: np.ndarray
    files: tuple[Path, ...]
    nifti_shape: tuple[int, ...] | None = None
    dicom_slices: tuple[Path, ...] | None = None
    dicom_frames: tuple[int, ...] | None = None


def _kind(path: Path) -> str | None:
    """The input kind of a file by its suffix (None for other files)."""
    name = path.name.lower()
    for kind, suffixes in (
        ("nifti", NIFTI_SUFFIXES),
        ("h5", H5_SUFFIXES),
        ("image", IMAGE_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return kind
    return None


def list_inputs(path: str | Path) -> list[Path]:
    """The inputs under ``path``: itself (a file or a DICOM series folder) or a folder's inputs."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file or folder")
    if path.is_file():
        if _kind(path) is None and not is_dicom(path):
            raise FileFormatError(f"{path}: unknown input; expected {EXPECTED}")
        return [path]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    inputs = [p for p in entries if p.is_dir() or (p.is_file() and _kind(p) is not None)]
    return inputs or [path]


def read_input(path: str | Path) -> SegInput:
    """Read one input (see the module docstring)."""
    path = Path(path)
    kind = _kind(path)
    if path.is_dir() or (kind is None and path.is_file() and is_dicom(path)):
        return _read_dicom(path)
    if kind == "nifti":
        return _read_nifti(path)
    if kind == "h5":
        return _read_h5(path)
    if kind == "image":
        return _read_image(path)
    raise FileFormatError(f"{path}: unknown input; expected {EXPECTED}")


def _real_volume(volume: np.ndarray, path: Path) -> np.ndarray:
    if volume.ndim == 2:
        volume = volume[np.newaxis]
    if volume.ndim != 3 or volume.dtype.kind not in "biuf" or 0 in volume.shape:
        raise ShapeError(
            f"{path}: {volume.dtype} array of shape {volume.shape}; expected a real, non-empty "
            "(slices, H, W) image volume"
        )
    return np.ascontiguousarray(volume, dtype=np.float32)


def _read_nifti(path: Path) -> SegInput:
    nifti = read_nifti(path)
    volume = _real_volume(nifti_array_to_volume(nifti.array, path), path)
    return SegInput(path, "nifti", volume, nifti.affine, (path,), nifti_shape=nifti.array.shape)


def _read_dicom(path: Path) -> SegInput:
    series = read_series(path)
    volume = _real_volume(nifti_array_to_volume(series.array, path), path)
    frames = [source.frame for source in series.slices]
    single_frame = all(frame is None for frame in frames)
    one_multiframe = len(series.info.files) == 1 and None not in frames
    return SegInput(
        path,
        "dicom",
        volume,
        series.affine,
        series.info.files,
        dicom_slices=tuple(source.path for source in series.slices) if single_frame else None,
        # the slice of each frame: the inverse of the frame order of the slices
        dicom_frames=tuple(int(k) for k in np.argsort(frames)) if one_multiframe else None,
    )


def _read_h5(path: Path) -> SegInput:
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            key = next(
                (
                    k
                    for k in (RECONSTRUCTION, *TARGET_KEYS.values())
                    if isinstance(f.get(k), h5py.Dataset)
                ),
                None,
            )
            if key is None:
                raise FileFormatError(
                    f"{path}: no '{RECONSTRUCTION}' or fastMRI target "
                    f"({', '.join(TARGET_KEYS.values())}) dataset; found {keys}"
                )
            volume = _real_volume(np.asarray(f[key]), path)
    except OSError as err:
        raise FileFormatError(f"{path}: not a readable HDF5 file ({err})") from None
    voxel = header_voxel_size_mm(path) or (1.0, 1.0, 1.0)
    return SegInput(path, "h5", volume, axial_affine(volume.shape, voxel), (path,))


def _read_image(path: Path) -> SegInput:
    try:
        with Image.open(path) as image:
            gray = image if image.mode in ("L", "I", "I;16", "F") else image.convert("L")
            array = np.asarray(gray)
    except (UnidentifiedImageError, OSError) as err:
        raise FileFormatError(f"{path}: unreadable image ({type(err).__name__})") from None
    volume = _real_volume(array, path)
    return SegInput(path, "image", volume, axial_affine(volume.shape, (1.0, 1.0, 1.0)), (path,))
