"""DICOM SEG through highdicom: round trip, codes, deterministic UIDs, atomicity, bad input."""

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from kscan.errors import ConfigError, FileFormatError, InvalidDataError, ShapeError
from kscan.pipelines.io.dicom_seg import read_segmentation, write_segmentation
from kscan.pipelines.io.dicom_write import read_provenance_block, write_mr_series

SHAPE = (4, 10, 14)  # (slices, rows, cols)
CLASS_NAMES = {1: "outer tissue", 2: "inner tissue", 5: "lesion", 9: "fluid"}  # 9 absent below
PROVENANCE = {"kscan_version": "0.1.0", "model": "vmunet", "parameters": {"threshold": 0.5}}


def make_labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.array([0, 1, 2], dtype=np.uint8), size=SHAPE)
    labels[1, 3:5, 4:7] = 5
    labels[3] = 0  # an empty slice
    return labels


@pytest.fixture(scope="module")
def source_files(tmp_path_factory) -> list[Path]:
    affine = np.array(
        [[0.0, -0.8, 0.0, 40.0], [0.0, 0.0, -3.0, 10.0], [1.2, 0.0, 0.0, -5.0], [0, 0, 0, 1]]
    )
    volume = np.random.default_rng(1).uniform(0.0, 1.0, SHAPE)
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    return write_mr_series(
        tmp_path_factory.mktemp("mr") / "series", volume, affine, reference=reference
    )


@pytest.fixture(scope="module")
def sources(source_files) -> list[Dataset]:
    return [pydicom.dcmread(f) for f in source_files]


@pytest.fixture(scope="module")
def seg_path(tmp_path_factory, sources) -> Path:
    out = tmp_path_factory.mktemp("seg") / "seg.dcm"
    return write_segmentation(
        out,
        make_labels(),
        sources,
        CLASS_NAMES,
        provenance=PROVENANCE,
        properties={5: (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion)},
    )


def test_round_trip_labels_and_names(seg_path, sources):
    result = read_segmentation(seg_path)
    np.testing.assert_array_equal(result.labels, make_labels())
    assert result.labels.dtype == np.uint8
    assert result.class_names == CLASS_NAMES
    assert result.source_sop_instance_uids == [ds.SOPInstanceUID for ds in sources]


def test_seg_attributes_read_by_highdicom(seg_path, sources):
    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.PatientID == sources[0].PatientID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.get_segment_numbers() == [1, 2, 3, 4]
    lesion = seg.get_segment_description(3)
    assert lesion.segment_label == "lesion"
    assert lesion.segmented_property_type == codes.SCT.Lesion
    assert lesion.segmented_property_category == codes.SCT.MorphologicallyAbnormalStructure
    tissue = seg.get_segment_description(1)
    assert tissue.segmented_property_category == codes.SCT.Tissue
    assert tissue.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algorithm = tissue.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("kscan", "0.1.0")
    assert read_provenance_block(seg) == PROVENANCE


def test_uids_deterministic(tmp_path, seg_path, sources):
    first = pydicom.dcmread(seg_path)
    again = pydicom.dcmread(
        write_segmentation(
            tmp_path / "a.dcm", make_labels(), sources, CLASS_NAMES, provenance=PROVENANCE
        )
    )
    other = pydicom.dcmread(
        write_segmentation(
            tmp_path / "b.dcm", make_labels(seed=1), sources, CLASS_NAMES, provenance=PROVENANCE
        )
    )
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (
        first.SeriesInstanceUID,
        first.SOPInstanceUID,
    )
    assert not {other.SeriesInstanceUID, other.SOPInstanceUID} & {
        first.SeriesInstanceUID,
        first.SOPInstanceUID,
    }
    assert first.SeriesInstanceUID != sources[0].SeriesInstanceUID


def test_all_background_round_trip(tmp_path, sources):
    path = write_segmentation(
        tmp_path / "empty.dcm", np.zeros(SHAPE, np.uint8), sources, {1: "tissue"}
    )
    result = read_segmentation(path)
    assert result.labels.shape == SHAPE and not result.labels.any()
    assert result.class_names == {1: "tissue"}


def test_failed_write_leaves_no_file(tmp_path, sources, monkeypatch):
    def failing_save(self, *args, **kwargs):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(Dataset, "save_as", failing_save)
    with pytest.raises(RuntimeError):
        write_segmentation(tmp_path / "seg.dcm", make_labels(), sources, CLASS_NAMES)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("labels", "names", "n_sources", "error", "match"),
    [
        (
            make_labels()[0],
            CLASS_NAMES,
            4,
            ShapeError,
            r"labels: expected shape \(slices, rows, cols\)",
        ),
        (
            make_labels().astype(np.float32),
            CLASS_NAMES,
            4,
            ShapeError,
            "labels: expected an integer array",
        ),
        (
            make_labels(),
            {1: "a", 2: "b"},
            4,
            InvalidDataError,
            r"labels: class ids \[5\] have no name",
        ),
        (make_labels(), {0: "background", **CLASS_NAMES}, 4, ConfigError, "class_names: key 0"),
        (make_labels(), {}, 4, ConfigError, "class_names: empty"),
        (
            make_labels(),
            CLASS_NAMES,
            3,
            ShapeError,
            "source_images: 3 images for labels of 4 slices",
        ),
    ],
)
def test_bad_input_one_line_errors(tmp_path, sources, labels, names, n_sources, error, match):
    with pytest.raises(error, match=match) as info:
        write_segmentation(tmp_path / "seg.dcm", labels, sources[:n_sources], names)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_source_size_mismatch(tmp_path, sources):
    with pytest.raises(
        ShapeError, match=r"source_images\[0\]: 10x14 pixels; labels slices are 10x12"
    ):
        write_segmentation(tmp_path / "seg.dcm", make_labels()[..., :12], sources, CLASS_NAMES)


def test_sources_from_two_series_rejected(tmp_path, sources):
    mixed = [sources[0], sources[1], copy.deepcopy(sources[2]), sources[3]]
    mixed[2].SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(
        InvalidDataError, match="source_images: rejected by highdicom: .*same series"
    ):
        write_segmentation(tmp_path / "seg.dcm", make_labels(), mixed, CLASS_NAMES)
    assert list(tmp_path.iterdir()) == []


def test_read_rejects_non_seg_files(tmp_path, source_files):
    with pytest.raises(FileFormatError, match="MR Image Storage; expected a Segmentation Storage"):
        read_segmentation(source_files[0])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with pytest.raises(FileFormatError, match="junk.dcm: cannot be read as DICOM"):
        read_segmentation(junk)
    with pytest.raises(FileFormatError, match="missing.dcm: cannot be read"):
        read_segmentation(tmp_path / "missing.dcm")


def test_multiframe_source_round_trip_and_frame_count(tmp_path):
    """One enhanced source: ``labels[k]`` segments frame ``k + 1``; every frame is written, so an
    empty last frame still reads back; a frame count unlike the labels' slices is refused."""
    from tests.pipelines.io.test_dicom_read import make_slices, to_enhanced

    source = pydicom.dcmread(to_enhanced(make_slices(3), tmp_path / "enhanced.dcm"))
    labels = np.zeros((3, source.Rows, source.Columns), dtype=np.uint8)
    labels[0, 5:20, 5:30] = 1
    labels[1, 30:40, 10:12] = 2
    path = write_segmentation(tmp_path / "seg.dcm", labels, [source], {1: "a", 2: "b"})
    back = read_segmentation(path)
    np.testing.assert_array_equal(back.labels, labels)
    assert back.source_frame_numbers == [1, 2, 3]
    assert back.source_sop_instance_uids == [source.SOPInstanceUID] * 3
    with pytest.raises(ShapeError, match=r"source_images\[0\]: 3 frames for labels of 2 slices"):
        write_segmentation(tmp_path / "bad.dcm", labels[:2], [source], {1: "a", 2: "b"})
    assert not (tmp_path / "bad.dcm").exists()
