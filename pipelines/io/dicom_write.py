"""Write a reconstruction as a derived DICOM MR series (MR Image Storage, explicit VR little endian).

**Axes and geometry.** A volume is a real array of shape ``(slices, rows, cols)``:
``volume[k, j, i]`` is the pixel in row ``j``, column ``i`` of slice ``k``. The affine maps voxel
index ``(i, j, k) = (column, row, slice)`` to RAS mm, like nibabel's for an image of shape
``(cols, rows, slices)``::

    [x_R, y_A, z_S, 1]^T = affine @ [i, j, k, 1]^T

DICOM's patient coordinates are LPS, so the writer flips the first two world axes
(``L = diag(-1, -1, 1) @ affine[:3]``). With ``c_i, c_j, c_k`` the columns of ``L[:, :3]`` and
``t = L[:, 3]``:

- ``ImageOrientationPatient = [c_i / |c_i|, c_j / |c_j|]`` (row direction, then column direction),
- ``PixelSpacing = [|c_j|, |c_i|]`` (between rows, between columns),
- ``ImagePositionPatient`` of slice ``k`` ``= t + k c_k``,
- ``SpacingBetweenSlices = |c_k|`` and, unless given, ``SliceThickness = |c_k|``.

DICOM needs ``c_i`` and ``c_j`` orthogonal and ``c_k`` along their normal (either sign); other
affines are rejected.

**Quantisation.** Pixels are stored as uint16 ``q`` with ``value = RescaleSlope * q +
RescaleIntercept``. The intercept is the volume's minimum rounded down and the slope
``(max - intercept) / 65535`` rounded up, both to as many significant digits as a DICOM decimal
string holds (16 characters: 8 to 15 digits), so ``q`` spans ``[0, 65535]`` and every value is
recovered within

    |value - (RescaleSlope * q + RescaleIntercept)| <= RescaleSlope / 2,

with ``RescaleSlope <= (max - min + 1e-7 |min|) (1 + 1e-7) / 65535``: about ``7.6e-6`` of the
volume's range (plus float64 rounding).

**Identity and provenance.** Study, Patient and Frame of Reference come from ``reference`` (the
series the reconstruction came from) when it is given; otherwise they are synthesised (empty patient
attributes, as DICOM allows). Every UID that kscan creates is deterministic: ``generate_uid`` with
entropy from the reference series UID, the provenance (without its ``created`` time), the series
description, and SHA-256 hashes of the volume and the affine. The provenance record
(:func:`kscan.pipelines.provenance.provenance_record`) is written into ``DerivationDescription``
(method and parameters), ``ImageComments`` (version and command) and, complete as JSON, the
private block of creator ``"kscan"`` in group ``0x0011`` (element ``0x01``, UT).

**Atomicity.** Each file is written with :func:`kscan.pipelines.atomic.atomic_path` inside a hidden
temporary folder beside ``out_dir``, which is renamed to ``out_dir`` once every slice is written.
An interrupted run leaves no partial series at ``out_dir`` (a killed process may leave the hidden
``.<name>.*.tmp`` folder; a failure that Python sees removes it).
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, Context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

import kscan
from kscan.errors import ConfigError, FileFormatError, InvalidDataError, ShapeError
from kscan.physics.checks import require_finite, require_ndim
from kscan.pipelines.atomic import atomic_path

PRIVATE_GROUP = 0x0011
"""Group of kscan's private block (in MR series and SEG objects)."""
PRIVATE_CREATOR = "kscan"
"""Private creator of kscan's block."""
PROVENANCE_ELEMENT = 0x01
"""Element offset in kscan's private block holding the provenance record as JSON (UT)."""

_UINT16_MAX = 65535
_DS_MIN_DIGITS = 8  # significant digits that always fit a 16-character decimal string
_ORTHOGONALITY_TOL = 1e-4

# Attributes copied unchanged from the reference series: Patient, General Study, Frame of
# Reference, and the acquisition attributes of the MR Image module that the reconstruction shares.
_PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
)
_STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
_FRAME_OF_REFERENCE_KEYWORDS = ("FrameOfReferenceUID", "PositionReferenceIndicator")
_ACQUISITION_KEYWORDS = (
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "EchoTrainLength",
    "InversionTime",
    "FlipAngle",
    "MagneticFieldStrength",
    "ImagedNucleus",
    "ImagingFrequency",
    "BodyPartExamined",
    "PatientPosition",
)
# Type 2 attributes (present, possibly empty) of the modules above, used when nothing is copied.
_SYNTHESISED_EMPTY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PositionReferenceIndicator",
    "ScanOptions",
    "MRAcquisitionType",
    "RepetitionTime",
    "EchoTime",
    "EchoTrainLength",
)


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array from an array-like or a (possibly GPU) torch tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def array_sha256(a: np.ndarray) -> str:
    """SHA-256 of an array's shape and float64 little-endian values."""
    digest = hashlib.sha256(repr(a.shape).encode())
    digest.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return digest.hexdigest()


def stable_provenance(provenance: Mapping[str, Any] | None) -> str:
    """The provenance record as canonical JSON without its ``created`` time (UID entropy)."""
    record = {k: v for k, v in (provenance or {}).items() if k != "created"}
    return json.dumps(record, sort_keys=True, default=str)


def add_provenance_block(ds: Dataset, provenance: Mapping[str, Any] | None) -> None:
    """Store the provenance record as JSON in kscan's private block of ``ds``."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PROVENANCE_ELEMENT, "UT", json.dumps(dict(provenance or {}), default=str))


def read_provenance_block(ds: Dataset) -> dict[str, Any] | None:
    """The provenance record stored by :func:`add_provenance_block`, or None if absent."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        return json.loads(block[PROVENANCE_ELEMENT].value)
    except KeyError:
        return None


def _ds_rounded(x: float, rounding: str) -> str:
    """``x`` with as many significant digits as fit a 16-character decimal string (8 at least),
    rounded towards ``rounding`` (``ROUND_FLOOR`` or ``ROUND_CEILING``)."""
    texts = (
        str(Context(prec=digits, rounding=rounding).create_decimal(float(x)))
        for digits in range(15, _DS_MIN_DIGITS - 1, -1)
    )
    return next(text for text in texts if len(text) <= 16)


def rescale_uint16(volume: np.ndarray) -> tuple[np.ndarray, str, str]:
    """Quantise ``volume`` to uint16: returns ``(q, RescaleSlope, RescaleIntercept)``.

    ``q = clip(round((volume - b) / m), 0, 65535)`` with ``b`` = min rounded down and ``m`` =
    ``(max - b) / 65535`` rounded up, to decimal strings of at least 8 significant digits, so
    ``|volume - (m q + b)| <= m / 2``. A constant volume gets ``m = 1``.
    """
    vmin, vmax = float(volume.min()), float(volume.max())
    intercept = _ds_rounded(vmin, ROUND_FLOOR)
    b = float(intercept)
    slope = _ds_rounded((vmax - b) / _UINT16_MAX, ROUND_CEILING) if vmax > b else "1"
    m = float(slope)
    q = np.clip(np.rint((volume.astype(np.float64) - b) / m), 0, _UINT16_MAX).astype(np.uint16)
    return q, slope, intercept


def _ds(x: float) -> str:
    return format_number_as_ds(float(x))


def _check_affine(affine: Any) -> np.ndarray:
    a = as_numpy(affine).astype(np.float64)
    if a.shape != (4, 4):
        raise ShapeError(f"affine: expected a 4x4 voxel-to-RAS matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise InvalidDataError("affine: contains NaN or Inf; expected a finite 4x4 matrix")
    if not np.allclose(a[3], [0, 0, 0, 1]):
        raise InvalidDataError(f"affine: last row is {a[3].tolist()}; expected [0, 0, 0, 1]")
    return a


def _geometry(affine: np.ndarray, n_slices: int) -> dict[str, Any]:
    """DICOM image-plane attributes of every slice from a voxel-to-RAS affine (module docstring)."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
    c_i, c_j, c_k, origin = lps.T
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    if np.any(spacing <= 0):
        raise InvalidDataError(f"affine: voxel sizes {spacing.tolist()} mm; expected all > 0")
    row_dir, col_dir, slice_dir = c_i / spacing[0], c_j / spacing[1], c_k / spacing[2]
    if abs(row_dir @ col_dir) > _ORTHOGONALITY_TOL:
        raise InvalidDataError(
            f"affine: column and row axes make an angle of "
            f"{np.degrees(np.arccos(row_dir @ col_dir)):.4f} degrees; DICOM needs 90"
        )
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(np.cross(normal, slice_dir)) > _ORTHOGONALITY_TOL:
        raise InvalidDataError(
            "affine: the slice axis is not perpendicular to the image plane (sheared stack); "
            "DICOM image planes need an orthogonal slice axis"
        )
    positions = [origin + k * c_k for k in range(n_slices)]
    return {
        "orientation": [_ds(v) for v in (*row_dir, *col_dir)],
        "pixel_spacing": [_ds(spacing[1]), _ds(spacing[0])],
        "slice_spacing": float(spacing[2]),
        "positions": [[_ds(v) for v in p] for p in positions],
        "locations": [_ds(p @ normal) for p in positions],
    }


def _check_volume(volume: Any) -> np.ndarray:
    vol = as_numpy(volume)
    require_ndim(vol, "volume", 3, "(slices, rows, cols)")
    if vol.dtype.kind not in "biuf":
        raise ShapeError(f"volume: expected a real array, got dtype {vol.dtype}")
    if vol.size == 0:
        raise ShapeError(
            f"volume: expected a non-empty (slices, rows, cols) array, got {vol.shape}"
        )
    vol = vol.astype(np.float64)
    require_finite(torch.from_numpy(vol), "volume")
    return vol


def _reference_datasets(reference: Dataset | Sequence[Dataset] | None) -> list[Dataset]:
    refs = [reference] if isinstance(reference, Dataset) else list(reference or [])
    for n, ref in enumerate(refs):
        if not isinstance(ref, Dataset):
            raise ConfigError(
                f"reference[{n}]: expected a pydicom Dataset, got {type(ref).__name__}"
            )
        if "StudyInstanceUID" not in ref:
            raise InvalidDataError(f"reference[{n}]: no StudyInstanceUID; expected a DICOM image")
    series = {str(ref.get("SeriesInstanceUID", "")) for ref in refs}
    if len(series) > 1:
        raise InvalidDataError(f"reference: datasets of {len(series)} series; expected one series")
    return refs


def _dicom_date_time(created: Any) -> tuple[str, str] | None:
    """``(YYYYMMDD, HHMMSS)`` in UTC from the provenance's ISO 8601 ``created``, if parseable."""
    try:
        t = _dt.datetime.fromisoformat(str(created))
    except ValueError:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc)
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S")


def _series_template(
    ref: Dataset | None,
    entropy: list[str],
    identity: list[str],
    provenance: Mapping[str, Any],
    series_description: str,
    series_number: int | None,
) -> Dataset:
    """Attributes shared by every slice: patient, study, series, frame of reference, equipment."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for kw in _SYNTHESISED_EMPTY:
        setattr(ds, kw, "")
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*identity, "study"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[*identity, "frame-of-reference"])
    ds.ScanningSequence = "RM"  # research mode: the acquisition is not known
    ds.SequenceVariant = "NONE"
    if ref is not None:
        for kw in (
            *_PATIENT_KEYWORDS,
            *_STUDY_KEYWORDS,
            *_FRAME_OF_REFERENCE_KEYWORDS,
            *_ACQUISITION_KEYWORDS,
        ):
            if kw in ref:
                setattr(ds, kw, ref[kw].value)
    if series_number is None:
        ref_number = ref.get("SeriesNumber") if ref is not None else None
        series_number = int(ref_number) + 1000 if ref_number not in (None, "") else 1000
    ds.Modality = "MR"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Manufacturer = "kscan"
    ds.ManufacturerModelName = "kscan"
    ds.SoftwareVersions = f"kscan {kscan.__version__}"
    date_time = _dicom_date_time(provenance.get("created"))
    if date_time is not None:
        ds.SeriesDate = ds.ContentDate = date_time[0]
        ds.SeriesTime = ds.ContentTime = date_time[1]
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = _derivation_description(provenance)
    command = provenance.get("command")
    version = f"kscan {provenance.get('kscan_version', kscan.__version__)}"
    ds.ImageComments = (f"{version}; command: {command}" if command else version)[:10240]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SOPClassUID = MRImageStorage
    add_provenance_block(ds, provenance)
    return ds


def _derivation_description(provenance: Mapping[str, Any]) -> str:
    """``"kscan <version> <model>; parameters: <JSON>"``, cut to DICOM's 1024 characters."""
    model = provenance.get("model")
    params = json.dumps(provenance.get("parameters", {}), sort_keys=True, default=str)
    head = f"kscan {provenance.get('kscan_version', kscan.__version__)}" + (
        f" {model}" if model else ""
    )
    return f"{head}; parameters: {params}"[:1024]


def _slice_dataset(
    template: Dataset,
    geometry: dict[str, Any],
    k: int,
    pixels: np.ndarray,
    slope: str,
    intercept: str,
    slice_thickness: float,
    sop_uid: str,
) -> Dataset:
    """Slice ``k``: the template plus instance, plane and pixel attributes, with file meta."""
    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = geometry["positions"][k]
    ds.ImageOrientationPatient = geometry["orientation"]
    ds.PixelSpacing = geometry["pixel_spacing"]
    ds.SliceThickness = _ds(slice_thickness)
    ds.SpacingBetweenSlices = _ds(geometry["slice_spacing"])
    ds.SliceLocation = geometry["locations"][k]
    ds.Rows, ds.Columns = pixels.shape
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.RescaleType = "US"  # unspecified: MR intensities have no physical unit
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"KSCAN_{kscan.__version__}"[:16]
    ds.file_meta = meta
    return ds


def _publish(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished series folder into place (replacing ``out_dir`` if allowed)."""
    if not out_dir.exists():
        os.rename(tmp_dir, out_dir)
        return
    if not overwrite or not out_dir.is_dir():
        raise FileFormatError(
            f"{out_dir}: already exists; expected a new series folder (overwrite=True replaces a folder)"
        )
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    os.rename(tmp_dir, out_dir)
    shutil.rmtree(old)


def write_mr_series(
    out_dir: str | os.PathLike[str],
    volume: Any,
    affine: Any,
    reference: Dataset | Sequence[Dataset] | None = None,
    series_description: str = "kscan reconstruction",
    provenance: Mapping[str, Any] | None = None,
    series_number: int | None = None,
    slice_thickness: float | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``volume`` as a derived MR series, one file per slice; returns the files in slice order.

    Args:
        out_dir: the series folder to create (``slice_0000.dcm``, ``slice_0001.dcm``, ...).
        volume: real array or tensor ``(slices, rows, cols)``; ``volume[k]`` is slice ``k``.
        affine: 4x4 map from voxel ``(column, row, slice)`` to RAS mm (module docstring).
        reference: dataset(s) of the series the volume came from: Patient, Study, Frame of
            Reference and MR acquisition attributes are copied from its first dataset.
        series_description: ``SeriesDescription`` (at most 64 characters).
        provenance: a :func:`~kscan.pipelines.provenance.provenance_record`; recorded in tags.
        series_number: defaults to the reference's ``SeriesNumber + 1000`` (else 1000).
        slice_thickness: mm; defaults to the slice spacing of the affine.
        overwrite: replace an existing ``out_dir`` (else an existing folder is an error).

    Each slice is stored as uint16 with ``RescaleSlope``/``RescaleIntercept`` (error at most
    ``RescaleSlope / 2``; see :func:`rescale_uint16`).
    """
    out_dir = Path(out_dir)
    vol = _check_volume(volume)
    aff = _check_affine(affine)
    if len(series_description) > 64:
        raise ConfigError(
            f"series_description: {len(series_description)} characters; DICOM allows at most 64"
        )
    if slice_thickness is not None and not slice_thickness > 0:
        raise ConfigError(
            f"slice_thickness: got {slice_thickness}; expected a positive number of mm"
        )
    refs = _reference_datasets(reference)
    ref = refs[0] if refs else None
    prov = dict(provenance or {"kscan_version": kscan.__version__})
    geometry = _geometry(aff, vol.shape[0])

    entropy = [
        "kscan derived MR series",
        str(ref.get("SeriesInstanceUID", "")) if ref is not None else "",
        stable_provenance(prov),
        series_description,
        array_sha256(vol),
        array_sha256(aff),
    ]
    input_hashes = [
        str(item.get("sha256")) for item in prov.get("inputs", []) if isinstance(item, Mapping)
    ]
    identity = ["kscan synthesised study", *input_hashes] if input_hashes else entropy
    template = _series_template(ref, entropy, identity, prov, series_description, series_number)
    q, slope, intercept = rescale_uint16(vol)
    thickness = slice_thickness if slice_thickness is not None else geometry["slice_spacing"]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    names = [f"slice_{k:04d}.dcm" for k in range(vol.shape[0])]
    try:
        for k, name in enumerate(names):
            sop_uid = generate_uid(entropy_srcs=[*entropy, "instance", str(k)])
            ds = _slice_dataset(template, geometry, k, q[k], slope, intercept, thickness, sop_uid)
            with atomic_path(tmp_dir / name) as tmp:
                ds.save_as(tmp, enforce_file_format=True)
        _publish(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return [out_dir / name for name in names]
