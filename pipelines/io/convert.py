"""Convert between DICOM series and NIfTI volumes.

DICOM -> NIfTI runs dcm2niix (the ``dcm2niix`` PyPI package ships the binary) or kscan's own
pydicom reader (:func:`kscan.pipelines.io.dicom.read_series`). Both place every voxel at the same
world position; dcm2niix may store the voxel axes flipped or permuted relative to kscan's
``(columns, rows, slices)`` layout, and keeps the stored integers with ``scl_slope`` /
``scl_inter`` where kscan writes rescaled float32. Compare outputs through their affines.

NIfTI -> DICOM writes a derived MR series with :func:`kscan.pipelines.io.dicom_write.write_mr_series`.

DICOM SEG -> NIfTI (:func:`segmentation_to_nifti`) writes the label volume of a segmentation in
the voxel grid of the series it segments (``reference``), matching each SEG frame to its slice by
the source image's SOP Instance UID (and frame number); ``like`` (a NIfTI of that series, written
by either converter) gives the voxel-axis layout, so that labels and image align voxel for voxel.

Every output is written atomically with a JSON provenance sidecar (``vol.nii.gz`` -> ``vol.json``,
``series_dir`` -> ``series_dir.json``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from kscan.errors import ConfigError, FileFormatError, ShapeError
from kscan.pipelines.atomic import atomic_path
from kscan.pipelines.io.dicom import SeriesInfo, read_series, read_series_layout, select_series
from kscan.pipelines.io.dicom_seg import read_segmentation
from kscan.pipelines.io.dicom_write import write_mr_series
from kscan.pipelines.io.nifti import read_nifti, volume_to_nifti_array, write_nifti
from kscan.pipelines.provenance import provenance_record, write_sidecar

Method = Literal["auto", "dcm2niix", "pydicom"]
_METHODS = ("auto", "dcm2niix", "pydicom")
_DCM2NIIX_TIMEOUT_S = 600


def dcm2niix_binary() -> str | None:
    """Path of the dcm2niix executable: the ``dcm2niix`` package's, else one on PATH, else None."""
    if importlib.util.find_spec("dcm2niix") is not None:
        import dcm2niix

        if os.access(dcm2niix.bin, os.X_OK):
            return str(dcm2niix.bin)
    return shutil.which("dcm2niix")


def dicom_to_nifti(
    src: str | Path,
    out: str | Path,
    series: int | str | None = None,
    *,
    method: Method = "auto",
    require_mr: bool = True,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Convert one DICOM series under ``src`` to the NIfTI file ``out`` (``.nii`` or ``.nii.gz``).

    ``series`` selects the series as in :func:`~kscan.pipelines.io.dicom.select_series`.
    ``method``: ``"dcm2niix"``, ``"pydicom"``, or ``"auto"`` (dcm2niix when its binary is
    found, else pydicom). ``provenance`` defaults to a record of the method, the series index and
    the input files' hashes. Returns ``out``.
    """
    if method not in _METHODS:
        raise ConfigError(f"method: got {method!r}; expected one of {', '.join(_METHODS)}")
    out = Path(out)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise FileFormatError(f"{out}: expected a .nii or .nii.gz output path")
    binary = dcm2niix_binary()
    if method == "dcm2niix" and binary is None:
        raise ConfigError(
            "method: 'dcm2niix' requested but no dcm2niix binary found (pip install dcm2niix)"
        )
    if method == "pydicom" or binary is None:
        volume = read_series(src, series, require_mr=require_mr)
        record = (
            provenance
            if provenance is not None
            else _dicom_provenance(volume.info, "pydicom", series)
        )
        return write_nifti(out, volume.array, volume.affine, record)
    info = select_series(src, series)
    if require_mr and info.modality != "MR":
        raise FileFormatError(
            f"{info.files[0]}: Modality is {info.modality!r}, expected 'MR' "
            "(pass require_mr=False to convert other modalities)"
        )
    record = provenance if provenance is not None else _dicom_provenance(info, "dcm2niix", series)
    with tempfile.TemporaryDirectory(prefix="kscan-dcm2niix-") as tmp:
        result = _run_dcm2niix(binary, info, Path(tmp), Path(src))
        with atomic_path(out) as target:
            _copy_nifti(result, target)
    write_sidecar(out, record)
    return out


def nifti_to_dicom(
    src: str | Path,
    out_dir: str | Path,
    *,
    reference: str | Path | None = None,
    reference_series: int | str | None = None,
    series_description: str = "kscan conversion",
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the 3D NIfTI ``src`` as a derived MR series in ``out_dir``; returns its files.

    The NIfTI array ``(i, j, k)`` becomes slices ``k`` of ``rows = j`` by ``columns = i``, with
    the geometry of the NIfTI affine (which must have orthogonal in-plane axes and a slice axis
    along their normal). ``reference`` (a DICOM folder or file, series chosen by
    ``reference_series``) supplies Patient, Study and Frame of Reference. The provenance record
    (default: input hash) goes into the DICOM tags and the sidecar ``out_dir.json``.
    """
    volume = read_nifti(src)
    if volume.array.ndim != 3:
        raise ShapeError(f"{src}: NIfTI of shape {volume.array.shape}; expected a 3D volume")
    ref = None
    if reference is not None:
        ref_file = select_series(reference, reference_series).files[0]
        ref = pydicom.dcmread(ref_file, stop_before_pixels=True)
    record = dict(
        provenance
        if provenance is not None
        else provenance_record(parameters={"conversion": "nifti_to_dicom"}, inputs=[src])
    )
    files = write_mr_series(
        out_dir,
        volume.array.transpose(2, 1, 0),
        volume.affine,
        reference=ref,
        series_description=series_description,
        provenance=record,
        overwrite=overwrite,
    )
    write_sidecar(out_dir, record)
    return files


def _dicom_provenance(info: SeriesInfo, method: str, series: int | str | None) -> dict[str, Any]:
    """Default record: method, which series (as given), and each input file's name and hash."""
    parameters: dict[str, Any] = {
        "conversion": "dicom_to_nifti",
        "method": method,
        "series": series,
    }
    if method == "dcm2niix":
        import dcm2niix

        parameters["dcm2niix_package_version"] = getattr(dcm2niix, "__version__", None)
    return provenance_record(parameters=parameters, inputs=list(info.files))


def _run_dcm2niix(binary: str, info: SeriesInfo, tmp: Path, src: Path) -> Path:
    """Convert exactly the files of ``info`` (linked into ``tmp/in``) with dcm2niix.

    Options: ignore the user's defaults file (``-g i``), no BIDS sidecar (``-b n``), empty
    comment field (``-c ""``), uncompressed output (``-z n``). Returns the one ``.nii`` written.
    """
    inbox, outbox = tmp / "in", tmp / "out"
    inbox.mkdir()
    outbox.mkdir()
    for n, file in enumerate(info.files):
        (inbox / f"{n:06d}.dcm").symlink_to(file.resolve())
    command = [
        binary,
        "-g",
        "i",
        "-b",
        "n",
        "-c",
        "",
        "-z",
        "n",
        "-f",
        "volume",
        "-o",
        str(outbox),
        str(inbox),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_DCM2NIIX_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise FileFormatError(f"{src}: dcm2niix ran longer than {_DCM2NIIX_TIMEOUT_S} s") from err
    written = sorted(outbox.glob("*.nii"))
    if done.returncode != 0 or len(written) != 1:
        errors = [
            line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")
        ]
        detail = errors[-1] if errors else f"wrote {len(written)} volumes for one series"
        raise FileFormatError(
            f"{src}: dcm2niix failed (exit status {done.returncode}: {detail}); "
            "method='pydicom' uses kscan's reader"
        )
    return written[0]


def _copy_nifti(source: Path, target: Path) -> None:
    """Copy a ``.nii`` file to ``target``, gzip-compressing it when ``target`` ends in ``.gz``."""
    if target.name.endswith(".gz"):
        with open(source, "rb") as raw, gzip.open(target, "wb") as packed:
            shutil.copyfileobj(raw, packed)
    else:
        shutil.copyfile(source, target)


def segmentation_to_nifti(
    src: str | Path,
    out: str | Path,
    reference: str | Path,
    *,
    reference_series: int | str | None = None,
    like: str | Path | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the DICOM SEG ``src`` as a label NIfTI ``out`` in the grid of the series it segments.

    ``reference``: the DICOM folder (or file) of that series, chosen by ``reference_series``; its
    slices are matched to the SEG's frames by SOP Instance UID and frame number, slices the SEG
    does not cover get label 0. ``like``: a NIfTI of the same series whose voxel-axis order and
    directions the labels take (their affine must then equal it); default kscan's reader's
    ``(columns, rows, slices)`` layout. Class ids as :func:`read_segmentation` restores them;
    the class names go into the provenance sidecar. Returns ``out``.
    """
    src, out = Path(src), Path(out)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise FileFormatError(f"{out}: expected a .nii or .nii.gz output path")
    seg = read_segmentation(src)
    series = read_series_layout(reference, reference_series)
    slice_keys = [
        (source.sop_uid, None if source.frame is None else source.frame + 1)
        for source in series.slices
    ]
    frames = seg.source_frame_numbers or [None] * len(seg.source_sop_instance_uids)
    seg_keys = list(zip(seg.source_sop_instance_uids, frames, strict=True))
    unknown = set(seg_keys) - set(slice_keys)
    if unknown:
        raise FileFormatError(
            f"{src}: references {len(unknown)} of its {len(seg_keys)} source images outside the "
            f"series of {reference}; expected a segmentation of that series"
        )
    row_of = {key: n for n, key in enumerate(seg_keys)}
    rows, cols = seg.labels.shape[1:]
    volume = np.zeros((len(slice_keys), rows, cols), dtype=seg.labels.dtype)
    for k, key in enumerate(slice_keys):
        if key in row_of:
            volume[k] = seg.labels[row_of[key]]
    array, affine = volume_to_nifti_array(volume), series.affine
    if like is not None:
        image = read_nifti(like)
        array, affine = _in_layout_of(array, affine, image.affine, like)
        if array.shape != image.array.shape[:3]:
            raise ShapeError(
                f"{like}: shape {image.array.shape}; the series' labels have {array.shape}; "
                "expected a NIfTI of the same series"
            )
    record = dict(
        provenance
        if provenance is not None
        else provenance_record(
            parameters={
                "conversion": "segmentation_to_nifti",
                "class_names": {str(c): name for c, name in seg.class_names.items()},
            },
            inputs=[src, *series.info.files],
        )
    )
    write_nifti(out, array, affine, provenance=record)
    write_sidecar(out, record)
    return out


def _in_layout_of(
    array: np.ndarray, affine: np.ndarray, target: np.ndarray, like: str | Path
) -> tuple[np.ndarray, np.ndarray]:
    """``array`` with its voxel axes permuted and flipped so that its affine becomes ``target``
    (nibabel's orientation transforms); an error naming ``like`` when the grids differ."""
    transform = ornt_transform(io_orientation(affine), io_orientation(target))
    moved = apply_orientation(array, transform)
    moved_affine = affine @ inv_ornt_aff(transform, array.shape)
    if not np.allclose(moved_affine, target, atol=1e-3):
        raise ShapeError(
            f"{like}: its voxel grid differs from the series' (affine {np.round(target, 3).tolist()} "
            f"against {np.round(moved_affine, 3).tolist()}); expected a NIfTI of the same series"
        )
    return np.ascontiguousarray(moved), target
