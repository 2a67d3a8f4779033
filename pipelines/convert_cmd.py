"""``kscan convert SRC OUT``: DICOM to NIfTI, NIfTI to DICOM, MRD raw data to fastMRI HDF5.

The direction follows from the input's format (recognised by content, as ``kscan info`` does) and
the output's name:

- DICOM file or folder -> ``OUT.nii`` / ``OUT.nii.gz``: one series (``--series`` by index or
  SeriesInstanceUID when the folder holds several) through dcm2niix or kscan's pydicom reader
  (``--method``), :func:`kscan.pipelines.io.convert.dicom_to_nifti`;
- DICOM SEG file -> ``OUT.nii`` / ``OUT.nii.gz``: its label volume in the grid of the series it
  segments, ``--reference`` (that series' folder; ``--series`` picks it), laid out like the NIfTI
  ``--like`` when given (e.g. the series converted by either method),
  :func:`kscan.pipelines.io.convert.segmentation_to_nifti`;
- NIfTI -> a DICOM folder ``OUT`` (any other name): a derived MR series; ``--reference`` (a DICOM
  folder, its series chosen by ``--series``) supplies Patient, Study and Frame of Reference,
  :func:`kscan.pipelines.io.convert.nifti_to_dicom`;
- ISMRMRD / MRD -> ``OUT.h5`` / ``OUT.hdf5``: fastMRI's layout (the first repetition, contrast,
  phase and set), :func:`kscan.pipelines.io.mrd.mrd_to_fastmri`.

Every output is written atomically with a JSON provenance sidecar (``OUT.json``) recording the
kscan version, the command, the parameters and the inputs' SHA-256. An existing output is an error
unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import SegmentationStorage

from kscan.errors import ConfigError, FileFormatError
from kscan.pipelines.info import FORMATS, detect_format
from kscan.pipelines.io.convert import dicom_to_nifti, nifti_to_dicom, segmentation_to_nifti
from kscan.pipelines.io.mrd import mrd_to_fastmri
from kscan.pipelines.provenance import provenance_record, sidecar_path, write_sidecar

_NIFTI = (".nii", ".nii.gz")
_HDF5 = (".h5", ".hdf5")
_SOURCES = {"nifti": "dicom", "fastmri": "mrd", "dicom": "nifti"}
"""Output kind -> the input format that converts to it."""


def output_kind(out: str | Path) -> str:
    """``"nifti"`` (``.nii``, ``.nii.gz``), ``"fastmri"`` (``.h5``, ``.hdf5``) or ``"dicom"`` (a folder)."""
    name = Path(out).name
    if name.endswith(_NIFTI):
        return "nifti"
    if name.endswith(_HDF5):
        return "fastmri"
    return "dicom"


def parse_series(text: str) -> int | str:
    """``"2"`` / ``"-1"`` -> an index; anything else (``"1.2.840..."``) -> a SeriesInstanceUID."""
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def convert(
    src: str | Path,
    out: str | Path,
    *,
    series: int | str | None = None,
    method: str = "auto",
    reference: str | Path | None = None,
    like: str | Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Convert ``src`` to ``out`` in the direction given by their formats (module docstring).

    ``series`` picks the input DICOM series, or the ``reference`` series for NIfTI -> DICOM.
    Options that do not apply to the direction are rejected. Returns the files written (the
    volume or the series' slices), not counting the provenance sidecar.
    """
    src, out = Path(src), Path(out)
    kind = output_kind(out)
    fmt = detect_format(src)
    if fmt != _SOURCES[kind]:
        raise FileFormatError(
            f"{src}: {FORMATS[fmt]} input, but {out} asks for {kind} output, which is made from "
            f"{FORMATS[_SOURCES[kind]]}; convert writes NIfTI from DICOM, a DICOM folder from "
            "NIfTI, and fastMRI HDF5 (.h5) from MRD"
        )
    segmentation = kind == "nifti" and is_segmentation(src)
    _check_options(kind, series, method, reference, like, segmentation)
    if out.exists() and not overwrite:
        raise FileFormatError(f"{out}: already exists; pass --overwrite to replace it")
    if segmentation:
        return [segmentation_to_nifti(src, out, reference, reference_series=series, like=like)]  # type: ignore[arg-type]
    if kind == "nifti":
        return [dicom_to_nifti(src, out, series, method=method)]  # type: ignore[arg-type]
    if kind == "dicom":
        if out.exists() and not out.is_dir():
            raise FileFormatError(f"{out}: is a file; expected a DICOM series folder")
        return nifti_to_dicom(
            src, out, reference=reference, reference_series=series, overwrite=overwrite
        )
    written = mrd_to_fastmri(src, out)
    record = provenance_record(
        parameters={"conversion": "mrd_to_fastmri", "repetition": 0}, inputs=[src]
    )
    write_sidecar(written, record)
    return [written]


def is_segmentation(path: Path) -> bool:
    """Whether ``path`` is a DICOM Segmentation Storage file."""
    if not path.is_file():
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (OSError, InvalidDicomError):
        return False
    return ds.get("SOPClassUID") == SegmentationStorage


def _check_options(
    kind: str,
    series: int | str | None,
    method: str,
    reference: str | Path | None,
    like: str | Path | None,
    segmentation: bool,
) -> None:
    if segmentation:
        if reference is None:
            raise ConfigError(
                "--reference: a DICOM SEG converts in the grid of the series it segments; give "
                "that series' folder"
            )
        if method != "auto":
            raise ConfigError(f"--method {method}: applies to DICOM images -> NIfTI only")
        return
    if like is not None:
        raise ConfigError("--like: applies to DICOM SEG -> NIfTI only")
    if method != "auto" and kind != "nifti":
        raise ConfigError(f"--method {method}: applies to DICOM -> NIfTI only")
    if reference is not None and kind != "dicom":
        raise ConfigError("--reference: applies to NIfTI -> DICOM and DICOM SEG -> NIfTI only")
    if series is not None and kind == "fastmri":
        raise ConfigError("--series: applies to DICOM input or to --reference, not to MRD input")
    if series is not None and kind == "dicom" and reference is None:
        raise ConfigError(
            "--series: with NIfTI input it picks the --reference series; give --reference"
        )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan convert``."""
    parser = sub.add_parser(
        "convert",
        help="DICOM to NIfTI, NIfTI to a DICOM series, MRD raw data to fastMRI HDF5",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan convert dicom/series1 out/series1.nii.gz --method pydicom",
    )
    parser.add_argument("src", metavar="SRC", help="DICOM file or folder, NIfTI file, or MRD file")
    parser.add_argument(
        "out",
        metavar="OUT",
        help="OUT.nii(.gz) for NIfTI, OUT.h5 for fastMRI HDF5, else a DICOM folder",
    )
    parser.add_argument(
        "--series",
        type=parse_series,
        help="DICOM series by index (see kscan info) or SeriesInstanceUID; with NIfTI input, of --reference",
    )
    parser.add_argument(
        "--method",
        choices=("auto", "dcm2niix", "pydicom"),
        default="auto",
        help="DICOM -> NIfTI converter (default auto: dcm2niix when installed, else pydicom)",
    )
    parser.add_argument(
        "--reference",
        help="NIfTI -> DICOM: the DICOM folder whose Patient, Study and Frame of Reference the new "
        "series keeps; DICOM SEG -> NIfTI: the folder of the series the SEG segments",
    )
    parser.add_argument(
        "--like",
        help="DICOM SEG -> NIfTI: a NIfTI of the reference series whose voxel layout the labels take",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    written = convert(
        args.src,
        args.out,
        series=args.series,
        method=args.method,
        reference=args.reference,
        like=args.like,
        overwrite=args.overwrite,
    )
    what = f"{len(written)} DICOM files" if output_kind(args.out) == "dicom" else "1 file"
    print(f"wrote {args.out} ({what}); provenance in {sidecar_path(args.out)}")
