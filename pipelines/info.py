"""``kscan info``: the format, layout and metadata of a k-space, DICOM or NIfTI file.

Formats are recognised by content, not by name:

- **HDF5** (``h5py.is_hdf5``): a complex ``kspace`` dataset is fastMRI's layout
  (:mod:`kscan.pipelines.io.fastmri`); a real ``kspace`` of shape ``(slices, H, W, 2 * coils)`` is
  Calgary-Campinas (:mod:`kscan.pipelines.io.calgary`); a group holding an ``xml`` header is
  ISMRMRD / MRD raw data (:mod:`kscan.pipelines.io.mrd`); a lone ``reconstruction`` dataset is the
  fastMRI submission layout (what ``kscan evaluate`` reads as predictions).
- **NIfTI**: a name ending in ``.nii`` / ``.nii.gz`` (:mod:`kscan.pipelines.io.nifti`).
- **DICOM**: a folder (its image series are listed) or a file pydicom recognises.

Patient identifiers are never printed: HDF5 attributes such as ``patient_id``, DICOM attributes
such as PatientName, PatientID or PatientBirthDate, and the MRD header's subject and study
information appear by name with the value ``<hidden>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from tabulate import tabulate

from kscan.errors import FileFormatError
from kscan.pipelines.io.calgary import CalgaryFile
from kscan.pipelines.io.dicom import list_series
from kscan.pipelines.io.fastmri import KSPACE, MASK, FastMRIFile
from kscan.pipelines.io.mrd import read_mrd
from kscan.pipelines.io.nifti import nifti_array_to_volume, read_nifti

HIDDEN = "<hidden>"
"""Shown instead of the value of every patient identifier."""

FORMATS = {
    "fastmri": "fastMRI HDF5",
    "calgary": "Calgary-Campinas HDF5",
    "mrd": "ISMRMRD / MRD HDF5",
    "reconstruction": "fastMRI submission HDF5 (reconstruction)",
    "dicom": "DICOM",
    "nifti": "NIfTI",
}
"""The formats :func:`detect_format` returns, with their display names."""

RECONSTRUCTION = "reconstruction"

_IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "PatientWeight", "PatientSize", "PatientAddress", "PatientTelephoneNumbers", "PatientComments",
    "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "IssuerOfPatientID", "MedicalRecordLocator", "EthnicGroup", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime",
    "ContentDate", "ContentTime", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord", "StationName",
    "DeviceSerialNumber", "DeviceID",
)  # fmt: skip
"""DICOM keywords (and, normalised, HDF5 / MRD names) whose values identify a patient or visit."""

_MRD_IDENTIFIERS = ("measurementID",)
"""MRD header names that identify a visit (a measurement id embeds the device serial and date)."""

_DICOM_TAGS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "SeriesNumber",
    "SeriesDescription", "ProtocolName", "ImageType", "Rows", "Columns", "NumberOfFrames",
    "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "ImageOrientationPatient",
    "RepetitionTime", "EchoTime", "FlipAngle", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept",
)  # fmt: skip
"""Technical DICOM attributes shown for the first image of a series."""


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_IDENTIFIERS = frozenset(_normalised(k) for k in (*_IDENTIFYING_KEYWORDS, *_MRD_IDENTIFIERS))


def is_identifier(name: str) -> bool:
    """Whether an attribute called ``name`` may identify a patient (``patient_id``,
    ``PatientName``, ``patientBirthdate``, ``AccessionNumber``, ...): any name starting with
    "patient" once lower-cased without separators, or a DICOM identifying keyword."""
    key = _normalised(name)
    return key.startswith(("patient", "otherpatient")) or key in _IDENTIFIERS


def _plain(value: Any) -> Any:
    """``value`` as JSON-serialisable Python (numpy scalars and small arrays, bytes, enums, tuples)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist()) if value.size <= 16 else f"array {value.shape} {value.dtype}"
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _redacted(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes with every identifier's value replaced by :data:`HIDDEN`."""
    return {k: HIDDEN if is_identifier(k) else _plain(v) for k, v in attrs.items()}


# --- detection ------------------------------------------------------------------------------------


def _mrd_group(f: h5py.File) -> str | None:
    """The first group holding an MRD ``xml`` header, if any."""
    for name, node in f.items():
        if isinstance(node, h5py.Group) and isinstance(node.get("xml"), h5py.Dataset):
            return name
    return None


def _hdf5_format(path: Path) -> str:
    try:
        with h5py.File(path, "r") as f:
            kspace = f.get(KSPACE)
            if isinstance(kspace, h5py.Dataset):
                calgary = (
                    np.issubdtype(kspace.dtype, np.floating)
                    and kspace.ndim == 4
                    and kspace.shape[-1] % 2 == 0
                )
                return "calgary" if calgary else "fastmri"
            if _mrd_group(f) is not None:
                return "mrd"
            if isinstance(f.get(RECONSTRUCTION), h5py.Dataset):
                return "reconstruction"
            keys = sorted(f.keys())
    except OSError as err:
        raise FileFormatError(f"{path}: not a readable HDF5 file ({err})") from err
    raise FileFormatError(
        f"{path}: HDF5 without 'kspace', 'reconstruction' or an MRD group; found {keys}"
    )


def _is_dicom(path: Path) -> bool:
    try:
        pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return False
    except Exception as err:  # pydicom raises many types on corrupt headers
        raise FileFormatError(f"{path}: unreadable DICOM header ({type(err).__name__})") from err
    return True


def detect_format(path: str | Path) -> str:
    """The format of ``path``, a key of :data:`FORMATS`; :class:`FileFormatError` when unknown."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file or folder")
    if path.name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if h5py.is_hdf5(path):
        return _hdf5_format(path)
    if _is_dicom(path):
        return "dicom"
    raise FileFormatError(
        f"{path}: unrecognised format; expected fastMRI, Calgary-Campinas or MRD HDF5, "
        "DICOM (file or folder) or NIfTI (.nii, .nii.gz)"
    )


# --- descriptions -------------------------------------------------------------------------------


def _dtype_name(dtype: np.dtype) -> str:
    if dtype.names:
        return f"compound({', '.join(dtype.names)})"
    if h5py.check_string_dtype(dtype) is not None:
        return "string"
    base = h5py.check_vlen_dtype(dtype)
    return f"vlen {base}" if base is not None else str(dtype)


def _hdf5_layout(path: Path) -> dict[str, Any]:
    """Every dataset (name, shape, dtype) and the root attributes, identifiers hidden."""
    datasets: list[dict[str, Any]] = []

    def visit(name: str, node: h5py.HLObject) -> None:
        if isinstance(node, h5py.Dataset):
            datasets.append(
                {"name": name, "shape": list(node.shape), "dtype": _dtype_name(node.dtype)}
            )

    with h5py.File(path, "r") as f:
        f.visititems(visit)
        attrs = _redacted(dict(f.attrs))
    return {"datasets": datasets, "attributes": attrs}


def _mask_summary(path: Path) -> dict[str, Any]:
    """Sampled phase-encode lines and the achieved acceleration ``W / lines`` of a stored mask."""
    with h5py.File(path, "r") as f:
        mask = np.asarray(f[MASK][()]) != 0
    lines = mask.any(axis=0) if mask.ndim == 2 else mask
    sampled = int(lines.sum())
    return {
        "mask_sampled_lines": sampled,
        "mask_acceleration": lines.size / sampled if sampled else "inf",
    }


def _describe_fastmri(path: Path) -> dict[str, Any]:
    with FastMRIFile(path) as f:
        metadata = f.metadata.as_dict()
    if metadata["has_mask"]:
        metadata.update(_mask_summary(path))
    return {"metadata": _plain(metadata)}


def _describe_calgary(path: Path) -> dict[str, Any]:
    with CalgaryFile(path) as f:
        return {"metadata": _plain(f.metadata.as_dict())}


def _fields(obj: Any, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The non-empty fields of an xsdata header object, identifiers hidden."""
    if obj is None:
        return {}
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    chosen = {
        k: v for k, v in values.items() if v not in (None, []) and (names is None or k in names)
    }
    return {k: HIDDEN if is_identifier(k) else _plain(v) for k, v in chosen.items()}


def _describe_mrd(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        group = _mrd_group(f)
    try:
        data = read_mrd(path, group=group)
    except FileFormatError as err:
        return {"metadata": {"group": group, "kspace": f"not readable as Cartesian k-space: {err}"}}
    header = data.header
    meta = dataclasses.asdict(data.metadata)
    metadata = {"group": group, "kspace_shape": list(data.kspace.shape), **_plain(meta)}
    metadata["sampled_fraction"] = float(data.mask.float().mean())
    encoding = header.encoding[0]
    metadata["trajectory"] = _plain(encoding.trajectory)
    metadata["encoding_fov_mm"] = _plain(dataclasses.astuple(encoding.encodedSpace.fieldOfView_mm))
    system = _fields(
        header.acquisitionSystemInformation,
        ("systemVendor", "systemModel", "systemFieldStrength_T", "receiverChannels",
         "institutionName", "stationName", "deviceID", "deviceSerialNumber"),
    )  # fmt: skip
    measurement = _fields(
        header.measurementInformation, ("protocolName", "sequenceName", "measurementID")
    )
    # Subject and study information identify the patient and the visit: names only.
    identifiers = {
        **{k: HIDDEN for k in _fields(header.subjectInformation)},
        **{k: HIDDEN for k in _fields(header.studyInformation)},
    }
    return {"metadata": metadata, "system": {**system, **measurement, **identifiers}}


def _describe_reconstruction(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        shape = f[RECONSTRUCTION].shape
    return {
        "metadata": {
            "layout": "reconstruction (slices, H, W)",
            "num_slices": shape[0] if shape else 0,
        }
    }


def _dicom_tags(file: Path) -> dict[str, Any]:
    ds = pydicom.dcmread(file, stop_before_pixels=True)
    tags = {k: _plain(ds.get(k)) for k in _DICOM_TAGS if k in ds}
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is not None:
        tags["TransferSyntax"] = getattr(syntax, "name", str(syntax))
    tags.update({k: HIDDEN for k in _IDENTIFYING_KEYWORDS if k in ds})
    return tags


def _describe_dicom(path: Path) -> dict[str, Any]:
    found = list_series(path)
    series = [
        {
            "index": n,
            "uid": s.uid,
            "number": s.number,
            "description": s.description,
            "modality": s.modality,
            "instances": s.n_instances,
            "shape (columns, rows, slices)": list(s.shape),
        }
        for n, s in enumerate(found)
    ]
    return {"series": series, "tags of series 0": _dicom_tags(found[0].files[0])}


def _describe_nifti(path: Path) -> dict[str, Any]:
    volume = read_nifti(path)
    header = dict(volume.header)
    finite = volume.array[np.isfinite(volume.array)] if volume.array.size else volume.array
    if finite.size:
        header["value_range"] = [float(finite.min()), float(finite.max())]
    if volume.array.ndim in (2, 3):
        header["kscan volume (slices, H, W)"] = list(
            nifti_array_to_volume(volume.array, path).shape
        )
    return {"header": _plain(header), "affine": _plain(np.round(volume.affine, 6).tolist())}


_DESCRIBE = {
    "fastmri": _describe_fastmri,
    "calgary": _describe_calgary,
    "mrd": _describe_mrd,
    "reconstruction": _describe_reconstruction,
    "dicom": _describe_dicom,
    "nifti": _describe_nifti,
}


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-serialisable description of ``path``: ``path``, ``format`` and per-format sections.

    HDF5 files: ``datasets`` (name, shape, dtype), ``attributes`` (root), ``metadata`` (what the
    reader derives: slices, coils, encoding / recon size, padding, mask acceleration, ...); MRD adds
    ``system``. DICOM: ``series`` (index, SeriesInstanceUID, number, description, modality,
    instances, shape) and the technical tags of the first image. NIfTI: ``header`` (shape, zooms,
    dtype, units, xform codes, value range) and ``affine``. Identifiers read ``<hidden>``.
    """
    path = Path(path)
    fmt = detect_format(path)
    info: dict[str, Any] = {"path": str(path), "format": FORMATS[fmt]}
    if fmt in ("fastmri", "calgary", "mrd", "reconstruction"):
        info.update(_hdf5_layout(path))
    info.update(_DESCRIBE[fmt](path))
    return info


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "(" + ", ".join(_cell(v) for v in value) + ")"
    return str(value)


def render(info: Mapping[str, Any]) -> str:
    """:func:`describe`'s output as readable text: scalars first, then one table per section."""
    lines = [
        f"{key}: {value}" for key, value in info.items() if not isinstance(value, (dict, list))
    ]
    for key, value in info.items():
        if isinstance(value, dict):
            rows = [[k, _cell(v)] for k, v in value.items()]
            table = tabulate(
                rows, headers=["name", "value"], tablefmt="simple", disable_numparse=True
            )
        elif value and isinstance(value[0], dict):
            rows = [[_cell(v) for v in item.values()] for item in value]
            table = tabulate(rows, headers=list(value[0]), tablefmt="simple", disable_numparse=True)
        elif value and isinstance(value[0], list):
            table = tabulate(
                [[_cell(v) for v in row] for row in value], tablefmt="plain", disable_numparse=True
            )
        else:
            continue
        lines += ["", key, table]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan info``."""
    parser = sub.add_parser(
        "info",
        help="format, layout and metadata of a fastMRI/Calgary/MRD HDF5, DICOM or NIfTI file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan info data/file1000001.h5 --json",
    )
    parser.add_argument("path", metavar="PATH", help="a file, or a DICOM folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else render(info))
