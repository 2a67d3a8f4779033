"""Read DICOM MR series (single-frame files or enhanced multi-frame) into a volume and its affine.

A folder (searched recursively) may hold several series and files that are not DICOM; the latter
are skipped quietly. :func:`list_series` reads headers only (``stop_before_pixels=True``);
:func:`read_series` reads one series, chosen by index (in :func:`list_series` order) or by
SeriesInstanceUID.

**Geometry.** DICOM places pixel ``(r, c)`` of a slice at (mm, patient LPS coordinates)

    x = P + c * dc * X + r * dr * Y

where ``P`` is ImagePositionPatient, ``X`` / ``Y`` are the row / column direction cosines
(ImageOrientationPatient[:3] / [3:]) and ``(dr, dc)`` is PixelSpacing (row spacing, column
spacing). Slices are sorted by their position projected on the slice normal ``n = X x Y``,
``d = P . n``, ascending; they must be evenly spaced by ``s`` along ``n``.

**Returned layout**, NIfTI's: ``array[i, j, k]`` with ``i`` the column index ``c``, ``j`` the row
index ``r`` and ``k`` the sorted slice index, i.e. shape ``(columns, rows, slices)`` (the DICOM
pixel matrix transposed). The 4x4 affine maps ``(i, j, k, 1)`` to RAS+ world coordinates in mm,
the convention of nibabel and NIfTI; DICOM's LPS is converted by negating the first two rows:

    A = diag(-1, -1, 1, 1) @ [[dc X, dr Y, s n, P_0], [0, 0, 0, 1]]

so ``nibabel.Nifti1Image(array, A)`` is a correct NIfTI of the series. Because ``k`` always runs
along ``+n``, ``det A > 0``; a series written with its slice axis along ``-n`` reads back with its
slices reversed (same world positions). dcm2niix writes the same voxels at the same world
positions but may flip or permute the voxel axes; compare through the affines, e.g. with
:mod:`nibabel.orientations`.

A single-slice series uses SpacingBetweenSlices, else SliceThickness, else 1 mm as ``s``.

Values are ``RescaleSlope * stored + RescaleIntercept`` as float32, per slice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from kscan.errors import FileFormatError

_COSINE_TOL = 1e-4  # direction cosines of one series agree to this
_POSITION_TOL = 1e-3  # mm: positions closer than this along the normal are duplicates
_SPACING_RTOL = 1e-2  # slice positions may deviate from an even stack by 1 % of the spacing
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder, described from its headers (no pixel data read).

    ``shape`` is ``(columns, rows, slices)``, the shape of :func:`read_series`'s array; ``slices``
    counts frames, so an enhanced multi-frame file contributes all its frames.
    """

    uid: str
    description: str
    modality: str
    number: int | None
    n_instances: int
    shape: tuple[int, int, int]
    files: tuple[Path, ...] = field(repr=False)


class SliceSource(NamedTuple):
    """Where one slice of a series comes from: its file, its frame (from 0) in a multi-frame file
    (None for a single-frame file) and the file's SOP Instance UID."""

    path: Path
    frame: int | None
    sop_uid: str


class SeriesLayout(NamedTuple):
    """A series' geometry without its pixels: RAS ``affine`` (4, 4) of the ``(columns, rows,
    slices)`` array, ``info``, and ``slices[k]``, the source of slice ``k``."""

    affine: np.ndarray
    info: SeriesInfo
    slices: tuple[SliceSource, ...]


class DicomVolume(NamedTuple):
    """A series as a volume: ``array`` (columns, rows, slices) float32, RAS ``affine`` (4, 4);
    ``slices[k]``: the source of slice ``k``."""

    array: np.ndarray
    affine: np.ndarray
    info: SeriesInfo
    slices: tuple[SliceSource, ...] = ()


@dataclass(frozen=True)
class _Frame:
    """One 2D image: a single-frame file (``index`` None) or frame ``index`` of a multi-frame file."""

    path: Path
    index: int | None
    rows: int
    cols: int
    position: np.ndarray  # (3,) ImagePositionPatient, mm, LPS
    orientation: np.ndarray  # (6,) ImageOrientationPatient: row cosine X, column cosine Y
    spacing: np.ndarray  # (2,) PixelSpacing: (row spacing dr, column spacing dc), mm
    slice_spacing: float | None  # SpacingBetweenSlices or SliceThickness, for one-slice series
    slope: float
    intercept: float


def list_series(path: str | Path) -> list[SeriesInfo]:
    """The image series under ``path`` (a folder, searched recursively, or one file).

    Ordered by SeriesNumber, then SeriesInstanceUID; this order defines series indices.
    Raises :class:`FileFormatError` when there is no DICOM image under ``path``.
    """
    return [info for info, _ in _scan(Path(path))]


def select_series(path: str | Path, series: int | str | None = None) -> SeriesInfo:
    """One series under ``path``: by index into :func:`list_series`, by SeriesInstanceUID, or
    the only one when ``series`` is None."""
    return _select(_scan(Path(path)), series, Path(path))[0]


def read_series(
    path: str | Path, series: int | str | None = None, *, require_mr: bool = True
) -> DicomVolume:
    """Read one series under ``path`` into a volume (see the module docstring for the layout).

    ``require_mr`` rejects files whose Modality is not MR. Raises :class:`FileFormatError` for
    files without pixel data, missing geometry tags, mixed orientations or matrix sizes,
    duplicate or unevenly spaced slice positions, and undecodable pixel data.
    """
    layout, frames, order = _layout(path, series, require_mr)
    return DicomVolume(_read_pixels(frames, order), *layout)


def read_series_layout(
    path: str | Path, series: int | str | None = None, *, require_mr: bool = True
) -> SeriesLayout:
    """:func:`read_series`'s geometry and slice sources, from the headers alone (no pixel data
    decoded); the same checks except those of the pixel data."""
    return _layout(path, series, require_mr)[0]


def _layout(
    path: str | Path, series: int | str | None, require_mr: bool
) -> tuple[SeriesLayout, list[_Frame], np.ndarray]:
    """The layout of one series, its frames and the slice order (``frames[order[k]]`` is slice
    ``k``)."""
    info, headers = _select(_scan(Path(path)), series, Path(path))
    if require_mr:
        for file, ds in zip(info.files, headers, strict=True):
            if ds.get("Modality") != "MR":
                raise FileFormatError(
                    f"{file}: Modality is {ds.get('Modality')!r}, expected 'MR' "
                    "(pass require_mr=False to read other modalities)"
                )
    frames = [
        frame for file, ds in zip(info.files, headers, strict=True) for frame in _frames(file, ds)
    ]
    order, affine = _stack_geometry(frames, Path(path))
    uid_of = {
        file: str(ds.get("SOPInstanceUID", ""))
        for file, ds in zip(info.files, headers, strict=True)
    }
    slices = tuple(
        SliceSource(frames[i].path, frames[i].index, uid_of[frames[i].path]) for i in order
    )
    return SeriesLayout(affine, info, slices), frames, order


def _scan(root: Path) -> list[tuple[SeriesInfo, list[Dataset]]]:
    """Headers of every DICOM image under ``root``, grouped by series and sorted."""
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        raise FileFormatError(f"{root}: no such file or folder; expected a DICOM folder or file")
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    n_other = 0
    for file in files:
        ds = _read_header(file)
        if ds is None:
            continue
        if "Rows" not in ds or "Columns" not in ds:
            n_other += 1
            continue
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            raise FileFormatError(f"{file}: image without SeriesInstanceUID")
        groups[str(uid)].append((file, ds))
    if not groups:
        raise FileFormatError(
            f"{root}: no DICOM images found ({len(files)} files, {n_other} DICOM objects without "
            "image data); expected a folder with a DICOM image series"
        )
    series = [_series_info(uid, members) for uid, members in groups.items()]
    series.sort(key=lambda s: (s[0].number is None, s[0].number or 0, s[0].uid))
    return series


def _read_header(file: Path) -> Dataset | None:
    """The file's header without pixel data, or None when it is not a DICOM file."""
    try:
        return pydicom.dcmread(file, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except Exception as err:  # pydicom raises many types on corrupt headers
        raise FileFormatError(f"{file}: unreadable DICOM header ({type(err).__name__})") from err


def _series_info(uid: str, members: list[tuple[Path, Dataset]]) -> tuple[SeriesInfo, list[Dataset]]:
    first = members[0][1]
    number = first.get("SeriesNumber")
    info = SeriesInfo(
        uid=uid,
        description=str(first.get("SeriesDescription", "")),
        modality=str(first.get("Modality", "")),
        number=int(number) if number not in (None, "") else None,
        n_instances=len(members),
        shape=(
            int(first.Columns),
            int(first.Rows),
            sum(int(ds.get("NumberOfFrames") or 1) for _, ds in members),
        ),
        files=tuple(file for file, _ in members),
    )
    return info, [ds for _, ds in members]


def _select(
    found: list[tuple[SeriesInfo, list[Dataset]]], series: int | str | None, root: Path
) -> tuple[SeriesInfo, list[Dataset]]:
    """Pick one series by index, SeriesInstanceUID, or as the only one."""
    if series is None:
        if len(found) > 1:
            raise FileFormatError(
                f"{root}: {len(found)} series found; choose one by index (0-{len(found) - 1}) "
                "or SeriesInstanceUID (see list_series)"
            )
        return found[0]
    if isinstance(series, int):
        if not -len(found) <= series < len(found):
            raise FileFormatError(
                f"{root}: series index {series} out of range; found {len(found)} series"
            )
        return found[series]
    for item in found:
        if item[0].uid == series:
            return item
    raise FileFormatError(
        f"{root}: no series with SeriesInstanceUID {series}; found {len(found)} series (see list_series)"
    )


def _frames(file: Path, ds: Dataset) -> list[_Frame]:
    """The 2D images of one file with their geometry and rescale (enhanced files: per frame)."""
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise FileFormatError(
            f"{file}: {ds.SamplesPerPixel} samples per pixel; expected a grayscale (1 sample) image"
        )
    rows, cols = int(ds.Rows), int(ds.Columns)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if int(ds.get("NumberOfFrames") or 1) != 1:
            raise FileFormatError(
                f"{file}: {ds.NumberOfFrames} frames without per-frame functional groups; "
                "expected single-frame or enhanced multi-frame images"
            )
        return [_frame(file, None, rows, cols, [ds])]
    shared = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != int(ds.get("NumberOfFrames") or 1):
        raise FileFormatError(
            f"{file}: {len(per_frame)} per-frame functional groups for "
            f"{ds.get('NumberOfFrames')} frames; expected one per frame"
        )
    return [_frame(file, k, rows, cols, [group, shared[0]]) for k, group in enumerate(per_frame)]


def _frame(file: Path, index: int | None, rows: int, cols: int, sources: list[Dataset]) -> _Frame:
    """Gather one frame's tags; ``sources`` are searched in order (per-frame, then shared)."""
    where = file if index is None else f"{file} (frame {index + 1})"

    def get(macro: str | None, tag: str, required: bool) -> object:
        for source in sources:
            items = source.get(macro) if macro else [source]
            if items and tag in items[0] and items[0].get(tag) not in (None, ""):
                return items[0].get(tag)
        if required:
            raise FileFormatError(f"{where}: missing {tag}; expected image geometry tags")
        return None

    enhanced = index is not None
    position = get("PlanePositionSequence" if enhanced else None, "ImagePositionPatient", True)
    orientation = get(
        "PlaneOrientationSequence" if enhanced else None, "ImageOrientationPatient", True
    )
    measures = "PixelMeasuresSequence" if enhanced else None
    spacing = get(measures, "PixelSpacing", True)
    between = get(measures, "SpacingBetweenSlices", False) or get(measures, "SliceThickness", False)
    rescale = "PixelValueTransformationSequence" if enhanced else None
    slope = get(rescale, "RescaleSlope", False)
    intercept = get(rescale, "RescaleIntercept", False)
    return _Frame(
        path=file,
        index=index,
        rows=rows,
        cols=cols,
        position=_vector(position, 3, "ImagePositionPatient", where),
        orientation=_vector(orientation, 6, "ImageOrientationPatient", where),
        spacing=_vector(spacing, 2, "PixelSpacing", where),
        slice_spacing=float(between) if between is not None else None,
        slope=float(slope) if slope is not None else 1.0,
        intercept=float(intercept) if intercept is not None else 0.0,
    )


def _vector(value: object, length: int, tag: str, where: object) -> np.ndarray:
    """A multi-valued numeric tag as a float64 vector of the expected length."""
    try:
        values = np.asarray(value if isinstance(value, Sequence) else [value], dtype=np.float64)
    except ValueError:
        values = np.full(0, np.nan)
    if values.shape != (length,) or not np.isfinite(values).all():
        raise FileFormatError(f"{where}: {tag} has {values.size} values; expected {length} numbers")
    return values


def _stack_geometry(frames: list[_Frame], root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Sort the frames along the slice normal and build the RAS affine.

    Returns ``(order, affine)``: ``frames[order[k]]`` is slice ``k``.
    """
    first = frames[0]
    for frame in frames[1:]:
        if (frame.rows, frame.cols) != (first.rows, first.cols):
            raise FileFormatError(
                f"{frame.path}: {frame.rows}x{frame.cols} pixels, but {first.path} has "
                f"{first.rows}x{first.cols}; expected one matrix size per series"
            )
        if not np.allclose(frame.orientation, first.orientation, atol=_COSINE_TOL):
            raise FileFormatError(
                f"{frame.path}: ImageOrientationPatient differs from {first.path}; "
                "expected one orientation per series (mixed orientations, e.g. a localizer)"
            )
        if not np.allclose(frame.spacing, first.spacing, rtol=_COSINE_TOL):
            raise FileFormatError(
                f"{frame.path}: PixelSpacing {frame.spacing.tolist()} differs from {first.path} "
                f"{first.spacing.tolist()}; expected one pixel spacing per series"
            )
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.stack([frame.position for frame in frames])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    distance = (positions - positions[0]) @ normal
    gaps = np.diff(distance)
    if gaps.size and gaps.min() < _POSITION_TOL:
        k = int(np.argmin(gaps))
        a, b = frames[order[k]], frames[order[k + 1]]
        raise FileFormatError(
            f"{root}: {a.path} and {b.path} have the same slice position; expected one image per "
            "position (several echoes, time points or stacks in one series?)"
        )
    step = distance[-1] / (len(frames) - 1) if len(frames) > 1 else abs(first.slice_spacing or 1.0)
    expected = positions[0] + np.outer(np.arange(len(frames)) * step, normal)
    deviation = float(np.abs(positions - expected).max())
    if deviation > _POSITION_TOL + _SPACING_RTOL * step:
        raise FileFormatError(
            f"{root}: slice positions deviate {deviation:.3g} mm from an evenly spaced stack along "
            "the slice normal; expected equal spacing (missing slices?)"
        )
    dr, dc = first.spacing
    lps = np.eye(4)
    lps[:3, 0] = row_cos * dc
    lps[:3, 1] = col_cos * dr
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    return order, _LPS_TO_RAS @ lps


def _read_pixels(frames: list[_Frame], order: np.ndarray) -> np.ndarray:
    """Decode, rescale and stack the frames: (columns, rows, slices) float32.

    Each file is decoded once; frame ``order[k]`` goes to slice ``k``.
    """
    first = frames[0]
    volume = np.empty((first.cols, first.rows, len(frames)), dtype=np.float32)
    slot = np.empty(len(frames), dtype=np.int64)
    slot[order] = np.arange(len(frames))
    by_file: dict[Path, list[int]] = defaultdict(list)
    for n, frame in enumerate(frames):
        by_file[frame.path].append(n)
    for file, members in by_file.items():
        pixels = _pixel_array(file, multi_frame=frames[members[0]].index is not None)
        for n in members:
            frame = frames[n]
            image = pixels[frame.index] if frame.index is not None else pixels
            if image.shape != (first.rows, first.cols):
                raise FileFormatError(
                    f"{file}: pixel data has shape {image.shape}; expected "
                    f"({first.rows}, {first.cols}) from Rows and Columns"
                )
            volume[:, :, slot[n]] = (frame.slope * image.astype(np.float64) + frame.intercept).T
    return volume


def _pixel_array(file: Path, multi_frame: bool) -> np.ndarray:
    """Decoded pixel data: (rows, cols), or (frames, rows, cols) for a multi-frame file."""
    try:
        ds = pydicom.dcmread(file)
    except Exception as err:  # pydicom raises many types on corrupt files
        raise FileFormatError(f"{file}: unreadable DICOM file ({type(err).__name__})") from err
    if "PixelData" not in ds:
        raise FileFormatError(f"{file}: no PixelData; expected an image object")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # decoders raise many types
        name = getattr(syntax, "name", syntax)
        raise FileFormatError(
            f"{file}: cannot decode pixel data (transfer syntax {name}; {type(err).__name__})"
        ) from err
    if multi_frame and pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    return pixels
