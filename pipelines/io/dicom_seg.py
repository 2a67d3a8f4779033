"""Segmentations as DICOM SEG objects (BINARY) through highdicom, and back.

A label volume ``labels`` of shape ``(slices, rows, cols)`` holds class ids (0 is background);
``labels[k]`` segments ``source_images[k]``, a single-frame image of the series it was computed from
(for example the files :func:`kscan.pipelines.io.dicom_write.write_mr_series` wrote, in slice
order), or frame ``k + 1`` of a single multi-frame (enhanced) source image. Against a multi-frame
source every frame of every segment is written, empty or not, so that the object says how many
frames the source has. Each named class becomes one segment. DICOM numbers segments 1, 2, ... without gaps, so
class ids are mapped to segment numbers in increasing order and the map is kept as JSON in
kscan's private block (creator ``"kscan"``, group ``0x0011``, element ``0x02``), next to the
provenance record (element ``0x01``). :func:`read_segmentation` restores the class ids from it
(a SEG from another tool, without the block, reads back with class id = segment number).

The Series and SOP Instance UIDs are deterministic: ``generate_uid`` with entropy from the source
SOP Instance UIDs, a SHA-256 of the labels, the class names and the provenance (without its
``created`` time). Files are written atomically (:func:`kscan.pipelines.atomic.atomic_path`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage, generate_uid

import kscan
from kscan.errors import ConfigError, FileFormatError, InvalidDataError, ShapeError
from kscan.physics.checks import require_ndim
from kscan.pipelines.atomic import atomic_path
from kscan.pipelines.io.dicom_write import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    add_provenance_block,
    array_sha256,
    as_numpy,
    stable_provenance,
)

CLASS_MAP_ELEMENT = 0x02
"""Element offset in kscan's private block holding ``{segment number: class id}`` as JSON (UT)."""

DEFAULT_PROPERTY = (codes.SCT.Tissue, codes.SCT.Tissue)
"""Segmented property (category, type) of a class that ``properties`` does not name."""


class SegmentationVolume(NamedTuple):
    """A label volume read back from a DICOM SEG object."""

    labels: np.ndarray
    """``(slices, rows, cols)`` class ids (uint8, or uint16 for ids above 255); 0 is background."""
    class_names: dict[int, str]
    """Class id -> segment label, for every segment of the object."""
    source_sop_instance_uids: list[str]
    """SOP Instance UID of the source image of each slice of ``labels``."""
    source_frame_numbers: list[int] | None = None
    """For a multi-frame source image, the frame (from 1) each slice of ``labels`` segments."""


def _check_labels(labels: Any, class_names: Mapping[int, str]) -> np.ndarray:
    lab = as_numpy(labels)
    require_ndim(lab, "labels", 3, "(slices, rows, cols)")
    if lab.dtype.kind not in "ui":
        raise ShapeError(f"labels: expected an integer array of class ids, got dtype {lab.dtype}")
    if not class_names:
        raise ConfigError("class_names: empty; expected a name for each class id > 0")
    for cid, name in class_names.items():
        if not isinstance(cid, (int, np.integer)) or not 0 < int(cid) <= 65535:
            raise ConfigError(
                f"class_names: key {cid!r}; expected class ids 1..65535 (0 is background)"
            )
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise ConfigError(
                f"class_names[{cid}]: {name!r}; expected a name of 1 to 64 characters"
            )
    present = np.unique(lab)
    unnamed = sorted(int(v) for v in present if v != 0 and int(v) not in class_names)
    if unnamed:
        raise InvalidDataError(
            f"labels: class ids {unnamed} have no name in class_names "
            f"(named: {sorted(int(c) for c in class_names)}); expected a name for every id > 0"
        )
    return lab


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def _check_sources(source_images: Sequence[Dataset], shape: tuple[int, ...]) -> list[Dataset]:
    sources = list(source_images)
    multiframe = len(sources) == 1 and isinstance(sources[0], Dataset) and _frames(sources[0]) > 1
    if multiframe and _frames(sources[0]) != shape[0]:
        raise ShapeError(
            f"source_images[0]: {_frames(sources[0])} frames for labels of {shape[0]} slices; "
            "expected one frame per slice"
        )
    if len(sources) != shape[0] and not multiframe:
        raise ShapeError(
            f"source_images: {len(sources)} images for labels of {shape[0]} slices; expected one per "
            "slice, or one multi-frame image with a frame per slice"
        )
    for n, ds in enumerate(sources):
        if not isinstance(ds, Dataset):
            raise ConfigError(
                f"source_images[{n}]: expected a pydicom Dataset, got {type(ds).__name__}"
            )
        size = (ds.get("Rows"), ds.get("Columns"))
        if size != tuple(shape[1:]):
            raise ShapeError(
                f"source_images[{n}]: {size[0]}x{size[1]} pixels; labels slices are {shape[1]}x{shape[2]}"
            )
    return sources


def write_segmentation(
    out_path: str | os.PathLike[str],
    labels: Any,
    source_images: Sequence[Dataset],
    class_names: Mapping[int, str],
    provenance: Mapping[str, Any] | None = None,
    properties: Mapping[int, tuple[Code, Code]] | None = None,
    series_description: str = "kscan segmentation",
    series_number: int | None = None,
) -> Path:
    """Write ``labels`` as a BINARY DICOM SEG object referencing ``source_images``; returns its path.

    Args:
        out_path: the ``.dcm`` file to write.
        labels: integer array or tensor ``(slices, rows, cols)``; ``labels[k]`` segments
            ``source_images[k]``. Every id > 0 must be named in ``class_names``.
        source_images: the single-frame images segmented, one per slice, with their geometry;
            or one multi-frame image whose frame ``k + 1`` ``labels[k]`` segments.
        class_names: class id (> 0) -> segment label; every named class becomes a segment, also
            when it is absent from ``labels``.
        provenance: a :func:`~kscan.pipelines.provenance.provenance_record`; its ``parameters``
            become the algorithm parameters, the whole record goes into kscan's private block.
        properties: class id -> (segmented property category, type) codes, e.g.
            ``(codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion)``;
            default :data:`DEFAULT_PROPERTY` (SCT Tissue, Tissue).
        series_description: ``SeriesDescription`` of the SEG series.
        series_number: defaults to the source's ``SeriesNumber + 1000`` (else 2000).
    """
    if len(series_description) > 64:
        raise ConfigError(
            f"series_description: {len(series_description)} characters; DICOM allows at most 64"
        )
    lab = _check_labels(labels, class_names)
    extra = sorted(set(properties or {}) - set(class_names))
    if extra:
        raise ConfigError(f"properties: class ids {extra} are not in class_names")
    sources = _check_sources(source_images, lab.shape)
    prov = dict(provenance or {"kscan_version": kscan.__version__})
    class_ids = sorted(int(c) for c in class_names)
    segment_of = np.zeros(max(class_ids) + 1, dtype=np.uint16)
    segment_of[class_ids] = np.arange(1, len(class_ids) + 1)
    # ids > max(class_ids) are absent: _check_labels rejected unnamed ids.
    pixels = segment_of[lab.astype(np.int64)]
    pixels = pixels.astype(np.uint8) if len(class_ids) <= 255 else pixels

    algorithm = hd.AlgorithmIdentificationSequence(
        name="kscan",
        family=codes.cid7162.ArtificialIntelligence,
        version=str(prov.get("kscan_version", kscan.__version__)),
        parameters={str(k): str(v) for k, v in dict(prov.get("parameters", {})).items()} or None,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=class_names[cid],
            segmented_property_category=(properties or {}).get(cid, DEFAULT_PROPERTY)[0],
            segmented_property_type=(properties or {}).get(cid, DEFAULT_PROPERTY)[1],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for n, cid in enumerate(class_ids, start=1)
    ]
    entropy = [
        "kscan segmentation",
        *(str(ds.get("SOPInstanceUID", "")) for ds in sources),
        array_sha256(lab),
        json.dumps({str(c): class_names[c] for c in class_ids}),
        stable_provenance(prov),
    ]
    if series_number is None:
        source_number = sources[0].get("SeriesNumber")
        series_number = int(source_number) + 1000 if source_number not in (None, "") else 2000
    try:
        seg = _segmentation(sources, pixels, descriptions, entropy, series_number)
    except ValueError as err:  # highdicom's checks of the source images (same series, geometry)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InvalidDataError(f"source_images: rejected by highdicom: {reason}") from None
    seg.SeriesDescription = series_description
    add_provenance_block(seg, prov)
    block = seg.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    block.add_new(
        CLASS_MAP_ELEMENT, "UT", json.dumps({str(n): c for n, c in enumerate(class_ids, 1)})
    )
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return out_path


def _segmentation(
    sources: list[Dataset],
    pixels: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    entropy: list[str],
    series_number: int,
) -> hd.seg.Segmentation:
    """The highdicom SEG object with deterministic UIDs (``entropy``) and kscan as its maker."""
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
        series_number=series_number,
        sop_instance_uid=generate_uid(entropy_srcs=[*entropy, "instance"]),
        instance_number=1,
        manufacturer="kscan",
        manufacturer_model_name="kscan",
        software_versions=f"kscan {kscan.__version__}",
        device_serial_number="none",
        # highdicom needs one frame at least; a multi-frame source keeps all (module docstring)
        omit_empty_frames=bool(pixels.any()) and _frames(sources[0]) == 1,
    )


def _class_map(seg: Dataset) -> dict[int, int]:
    """Segment number -> class id from kscan's private block; empty if the block is absent."""
    try:
        block = seg.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        return {int(n): int(c) for n, c in json.loads(block[CLASS_MAP_ELEMENT].value).items()}
    except KeyError:
        return {}


def read_segmentation(path: str | os.PathLike[str]) -> SegmentationVolume:
    """Read a DICOM SEG object into a label volume, in the order of its referenced source images."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (OSError, InvalidDicomError) as err:
        raise FileFormatError(f"{path}: cannot be read as DICOM ({type(err).__name__})") from None
    if ds.get("SOPClassUID") != SegmentationStorage:
        found = getattr(ds.get("SOPClassUID"), "name", None) or "no SOP class"
        raise FileFormatError(f"{path}: {found}; expected a Segmentation Storage object")
    seg = hd.seg.Segmentation.from_dataset(ds)
    uids = [str(sop) for _, _, sop in seg.get_source_image_uids()]
    frames = sorted(
        {
            int(source.ReferencedFrameNumber)
            for group in seg.PerFrameFunctionalGroupsSequence
            for derivation in group.get("DerivationImageSequence", [])
            for source in derivation.SourceImageSequence
            if "ReferencedFrameNumber" in source
        }
    )
    if len(uids) == 1 and frames:  # one multi-frame source
        segments = seg.get_pixels_by_source_frame(
            uids[0], frames, combine_segments=True, relabel=False
        )
        uids = uids * len(frames)
    else:
        frames = None
        segments = seg.get_pixels_by_source_instance(
            uids, combine_segments=True, relabel=False, assert_missing_frames_are_empty=True
        )
    numbers = [int(n) for n in seg.segment_numbers]
    class_of = _class_map(seg) or {n: n for n in numbers}
    lut = np.zeros(max(numbers) + 1, dtype=np.uint16 if max(class_of.values()) > 255 else np.uint8)
    lut[numbers] = [class_of[n] for n in numbers]
    names = {class_of[n]: str(seg.get_segment_description(n).segment_label) for n in numbers}
    return SegmentationVolume(lut[segments.astype(np.int64)], names, uids, frames)
