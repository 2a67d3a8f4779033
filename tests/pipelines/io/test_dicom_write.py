"""The derived MR series writer: identity, UIDs, geometry, quantisation, atomicity, bad input.

Geometry is checked through world coordinates of voxel centres, against DICOM's own pixel-position
formula (pydicom), dcm2niix + nibabel and kscan's DICOM reader.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset, validate_file_meta
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import DSfloat
from scipy.spatial.transform import Rotation

from kscan.errors import FileFormatError, InvalidDataError, KscanError, ShapeError
from kscan.pipelines.io.dicom_write import read_provenance_block, rescale_uint16, write_mr_series

SHAPE = (5, 12, 16)  # (slices, rows, cols)
PROVENANCE = {
    "kscan_version": "0.1.0",
    "command": "kscan reconstruct in.h5 out --method sense",
    "created": "2026-01-02T03:04:05+00:00",
    "model": "sense",
    "checkpoint_sha256": None,
    "parameters": {"lambda": 0.01, "iterations": 10},
    "inputs": [{"path": "in.h5", "sha256": "ab" * 32}],
}


def oblique_affine() -> np.ndarray:
    """Voxel (col, row, slice) -> RAS: rotated, anisotropic (0.9 x 1.1 x 2.5 mm), shifted."""
    affine = np.eye(4)
    rotation = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


def make_volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-3.0, 50.0, SHAPE)


@pytest.fixture(scope="module")
def reference() -> Dataset:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm"))


@pytest.fixture(scope="module")
def written(tmp_path_factory, reference) -> list[Path]:
    out = tmp_path_factory.mktemp("series") / "recon"
    return write_mr_series(
        out, make_volume(), oblique_affine(), reference=reference, provenance=PROVENANCE
    )


def read_all(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(f) for f in files]


def assert_same_voxels(
    data: np.ndarray,
    affine: np.ndarray,
    volume: np.ndarray,
    vol_affine: np.ndarray,
    value_tol: float,
    mm_tol: float = 1e-3,
) -> None:
    """``data[i, j, k]`` at ``affine @ (i, j, k)`` equals ``volume[k', j', i']`` at the same world point.

    Every voxel of ``data`` must land (within ``mm_tol``) on a distinct voxel centre of ``volume``.
    """
    assert data.size == volume.size
    idx = np.indices(data.shape).reshape(3, -1).T
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    ours = (world - vol_affine[:3, 3]) @ np.linalg.inv(vol_affine[:3, :3]).T
    nearest = np.rint(ours).astype(int)
    assert np.abs((ours - nearest) @ vol_affine[:3, :3].T).max() < mm_tol
    assert len({tuple(v) for v in nearest}) == data.size
    expected = volume[nearest[:, 2], nearest[:, 1], nearest[:, 0]]
    np.testing.assert_allclose(data.reshape(-1), expected, rtol=0, atol=value_tol)


def test_written_files_are_mr_image_storage_with_valid_meta(written):
    assert [f.name for f in written] == [f"slice_{k:04d}.dcm" for k in range(SHAPE[0])]
    for k, ds in enumerate(read_all(written)):
        validate_file_meta(ds.file_meta, enforce_standard=True)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.Modality == "MR"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (12, 16, 16, 0)
        assert ds.pixel_array.dtype == np.uint16
        for kw in (
            "ScanningSequence",
            "SequenceVariant",
            "ScanOptions",
            "MRAcquisitionType",
            "EchoTime",
            "RepetitionTime",
            "EchoTrainLength",
            "SliceThickness",
        ):
            assert kw in ds  # MR Image / Image Plane module attributes of type 1 or 2


def test_reference_study_patient_frame_kept(written, reference):
    ds = pydicom.dcmread(written[0])
    for kw in (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "FrameOfReferenceUID",
        "StudyDate",
        "ScanningSequence",
    ):
        assert ds[kw].value == reference[kw].value, kw
    assert ds.SeriesInstanceUID != reference.SeriesInstanceUID
    assert ds.SOPInstanceUID != reference.SOPInstanceUID
    assert ds.SeriesNumber == reference.SeriesNumber + 1000
    assert ds.SeriesDescription == "kscan reconstruction"


@pytest.mark.parametrize("name", ["chrFren.dcm", "chrRuss.dcm", "chrH31.dcm"])
def test_reference_names_in_other_character_sets_kept(tmp_path, name):
    """Names decoded from Latin-1, Cyrillic or ISO 2022 Japanese references are rewritten as UTF-8."""
    reference = pydicom.dcmread(get_charset_files(name)[0])
    files = write_mr_series(tmp_path / "s", make_volume(), oblique_affine(), reference=reference)
    ds = pydicom.dcmread(files[0])
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == str(reference.PatientName)


def test_provenance_in_tags(written):
    ds = pydicom.dcmread(written[0])
    assert read_provenance_block(ds) == PROVENANCE
    assert ds.DerivationDescription.startswith("kscan 0.1.0 sense; parameters: ")
    assert '"lambda": 0.01' in ds.DerivationDescription
    assert PROVENANCE["command"] in ds.ImageComments
    assert (ds.ContentDate, ds.ContentTime) == ("20260102", "030405")
    assert ds.private_block(0x0011, "kscan").block_start == 0x1000


def test_geometry_matches_dicom_pixel_positions(written):
    """LPS position of pixel (r, c) = IPP + c dc X + r dr Y must be the affine's RAS point, flipped."""
    affine, volume = oblique_affine(), make_volume()
    rows, cols = np.meshgrid(np.arange(SHAPE[1]), np.arange(SHAPE[2]), indexing="ij")
    for k, ds in enumerate(read_all(written)):
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        lps = (
            np.array(ds.ImagePositionPatient, dtype=float)
            + cols[..., None] * dc * iop[:3]
            + rows[..., None] * dr * iop[3:]
        )
        ras = lps * [-1, -1, 1]
        expected = (
            np.stack([cols, rows, np.full_like(cols, k)], -1) @ affine[:3, :3].T + affine[:3, 3]
        )
        np.testing.assert_allclose(ras, expected, atol=1e-6)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(2.5)
        assert float(ds.SliceThickness) == pytest.approx(2.5)
        slope = float(ds.RescaleSlope)
        values = ds.pixel_array * slope + float(ds.RescaleIntercept)
        np.testing.assert_allclose(values, volume[k], rtol=0, atol=slope / 2 * (1 + 1e-9))


def reversed_slices_affine() -> np.ndarray:
    """Slice axis against the image normal (a left-handed voxel grid): readers reverse the slices."""
    affine = oblique_affine()
    affine[:3, 2] *= -1
    return affine


GEOMETRIES = {"oblique": oblique_affine, "reversed_slices": reversed_slices_affine}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_dcm2niix_and_nibabel_read_back_same_geometry(tmp_path, geometry):
    dcm2niix = pytest.importorskip("dcm2niix")
    affine = GEOMETRIES[geometry]()
    files = write_mr_series(tmp_path / "series", make_volume(), affine)
    result = dcm2niix.main(
        ["-z", "n", "-f", "converted", "-o", str(tmp_path), str(tmp_path / "series")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    image = nib.load(tmp_path / "converted.nii")
    ds = pydicom.dcmread(files[0])
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    # dcm2niix stores slope and intercept as float32 in the NIfTI header.
    float32_error = np.finfo(np.float32).eps * (abs(intercept) + 65535 * slope)
    assert_same_voxels(
        image.get_fdata(), image.affine, make_volume(), affine, value_tol=slope / 2 + float32_error
    )


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_kscan_reader_reads_back_same_geometry(tmp_path, geometry):
    dicom = pytest.importorskip("kscan.pipelines.io.dicom")
    affine = GEOMETRIES[geometry]()
    files = write_mr_series(tmp_path / "series", make_volume(), affine)
    volume = dicom.read_series(tmp_path / "series")
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    float32_error = np.finfo(np.float32).eps * 50.0  # the reader returns float32
    assert_same_voxels(
        volume.array,
        volume.affine,
        make_volume(),
        affine,
        value_tol=slope / 2 + float32_error,
        mm_tol=1e-4,
    )


def series_uids(files: list[Path]) -> tuple[str, list[str], str, str]:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return (
        headers[0].SeriesInstanceUID,
        [h.SOPInstanceUID for h in headers],
        headers[0].StudyInstanceUID,
        headers[0].FrameOfReferenceUID,
    )


def test_uids_deterministic_from_inputs(tmp_path, written):
    """Same inputs (only the creation time differs) -> same UIDs; other inputs -> other UIDs."""
    again = write_mr_series(
        tmp_path / "again",
        make_volume(),
        oblique_affine(),
        reference=pydicom.dcmread(get_testdata_file("MR_small.dcm")),
        provenance={**PROVENANCE, "created": "2027-05-06T07:08:09+00:00"},
    )
    series, sops, _, _ = series_uids(written)
    assert series_uids(again)[:2] == (series, sops)
    assert len(set(sops)) == SHAPE[0]
    assert all(pydicom.uid.UID(u).is_valid for u in [series, *sops])

    other_params = {**PROVENANCE, "parameters": {"lambda": 0.02, "iterations": 10}}
    changed = [
        write_mr_series(
            tmp_path / "params", make_volume(), oblique_affine(), provenance=other_params
        ),
        write_mr_series(
            tmp_path / "volume", make_volume(seed=1), oblique_affine(), provenance=PROVENANCE
        ),
    ]
    seen = {series, *sops}
    for files in changed:
        new_series, new_sops, _, _ = series_uids(files)
        assert not {new_series, *new_sops} & seen
        seen |= {new_series, *new_sops}


def test_synthesised_study_shared_by_outputs_of_one_input(tmp_path):
    """Without a reference, Study and Frame of Reference derive from the provenance's input hashes."""
    first = write_mr_series(tmp_path / "a", make_volume(0), oblique_affine(), provenance=PROVENANCE)
    other = {**PROVENANCE, "model": "zf"}
    second = write_mr_series(tmp_path / "b", make_volume(1), oblique_affine(), provenance=other)
    a, b = series_uids(first), series_uids(second)
    assert a[2:] == b[2:]
    assert a[0] != b[0]
    assert a[2] != pydicom.dcmread(get_testdata_file("MR_small.dcm")).StudyInstanceUID
    ds = pydicom.dcmread(first[0])
    assert ds.PatientID == "" and ds.PatientName == ""
    assert ds.SeriesNumber == 1000


@pytest.mark.parametrize(
    "volume",
    [
        np.random.default_rng(1).uniform(-3.0, 50.0, (2, 8, 8)),
        np.random.default_rng(2).uniform(0.0, 3e-5, (2, 8, 8)),  # fastMRI-like magnitudes
        1000.0 + np.random.default_rng(3).uniform(0.0, 1e-3, (2, 8, 8)),  # large offset
        np.full((2, 8, 8), 7.25),
        np.full((2, 8, 8), -1e-7),
    ],
)
def test_rescale_covers_range_within_documented_bound(volume):
    q, slope_text, intercept_text = rescale_uint16(volume)
    assert len(slope_text) <= 16 and len(intercept_text) <= 16
    slope, intercept = float(DSfloat(slope_text)), float(DSfloat(intercept_text))
    assert slope > 0 and q.dtype == np.uint16
    error = np.abs(volume - (q * slope + intercept))
    assert error.max() <= slope / 2 * (1 + 1e-9) + 1e-15 * abs(intercept)
    vmin, vmax = volume.min(), volume.max()
    assert intercept <= vmin
    if vmax > vmin:
        assert q.min() == 0 and q.max() >= 65534  # the whole uint16 range is used
        assert slope <= (vmax - vmin + 1e-7 * abs(vmin)) * (1 + 1e-7) / 65535


def test_accepts_torch_tensor(tmp_path):
    files = write_mr_series(
        tmp_path / "t", torch.from_numpy(make_volume()), torch.from_numpy(oblique_affine())
    )
    assert len(files) == SHAPE[0]


def test_failure_mid_series_leaves_no_partial_series(tmp_path, monkeypatch):
    calls = []
    real_save = Dataset.save_as

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed while writing slice 3")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", failing_save)
    with pytest.raises(RuntimeError, match="slice 3"):
        write_mr_series(tmp_path / "series", make_volume(), oblique_affine())
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_refused_or_replaced_whole(tmp_path):
    out = tmp_path / "series"
    out.mkdir()
    (out / "old.dcm").write_bytes(b"old")
    with pytest.raises(FileFormatError, match="already exists"):
        write_mr_series(out, make_volume(), oblique_affine())
    assert [p.name for p in tmp_path.iterdir()] == ["series"]
    assert [p.name for p in out.iterdir()] == ["old.dcm"]
    files = write_mr_series(out, make_volume(), oblique_affine(), overwrite=True)
    assert sorted(out.iterdir()) == files
    assert [p.name for p in tmp_path.iterdir()] == ["series"]


def sheared_affine() -> np.ndarray:
    affine = oblique_affine()
    affine[:3, 2] += 0.5 * affine[:3, 0]
    return affine


def skewed_affine() -> np.ndarray:
    affine = oblique_affine()
    affine[:3, 1] += 0.1 * affine[:3, 0]
    return affine


@pytest.mark.parametrize(
    ("volume", "affine", "error", "match"),
    [
        (
            np.zeros((12, 16)),
            np.eye(4),
            ShapeError,
            r"volume: expected shape \(slices, rows, cols\)",
        ),
        (np.full(SHAPE, np.nan), np.eye(4), InvalidDataError, "volume: contains 960 NaN"),
        (np.zeros(SHAPE, np.complex64), np.eye(4), ShapeError, "volume: expected a real array"),
        (np.zeros(SHAPE), np.eye(3), ShapeError, "affine: expected a 4x4"),
        (np.zeros(SHAPE), np.diag([1.0, 1.0, 0.0, 1.0]), InvalidDataError, "affine: voxel sizes"),
        (np.zeros(SHAPE), sheared_affine(), InvalidDataError, "affine: the slice axis"),
        (np.zeros(SHAPE), skewed_affine(), InvalidDataError, "affine: column and row axes"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, volume, affine, error, match):
    with pytest.raises(error, match=match) as info:
        write_mr_series(tmp_path / "series", volume, affine)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_reference_errors_never_print_patient_identifiers(tmp_path, reference):
    other = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    other.SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(KscanError) as info:
        write_mr_series(
            tmp_path / "s", make_volume(), oblique_affine(), reference=[reference, other]
        )
    message = str(info.value)
    assert "2 series" in message
    for identifier in (str(reference.PatientName), reference.PatientID, reference.StudyInstanceUID):
        assert identifier not in message
