"""DICOM series reader: grouping, selection, sorting, rescale, affine, enhanced MR, bad input.

Inputs are pydicom's bundled test files, and series built from ``MR_small.dcm`` by copying it with
new positions, orientations and UIDs (pydicom's bundled data has no multi-file MR series).
"""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import io_orientation, ornt_transform
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedMRImageStorage, generate_uid

from kscan.errors import FileFormatError
from kscan.pipelines.io.convert import dcm2niix_binary, dicom_to_nifti
from kscan.pipelines.io.dicom import list_series, read_series, select_series

MR_SMALL = get_testdata_file("MR_small.dcm", download=False)
PATIENT = ("CompressedSamples", "4MR1")  # MR_small's PatientName and PatientID


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix R = Rz Ry Rx (angles in degrees); its columns are orthonormal."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_slices(
    n: int = 5,
    rot: np.ndarray | None = None,
    step: float = 2.5,
    origin: tuple[float, float, float] = (-12.0, 30.0, 45.0),
    description: str = "test series",
    number: int = 7,
    pixel_spacing: tuple[float, float] = (0.3125, 0.3125),
) -> list[Dataset]:
    """``n`` copies of MR_small forming one series: slice ``k`` at ``origin + k step n`` (LPS),
    row / column direction cosines ``rot[:, 0]`` / ``rot[:, 1]``, pixels ``MR_small + 10 k``, and a
    misleading InstanceNumber (reversed and offset)."""
    rot = np.eye(3) if rot is None else rot
    normal = np.cross(rot[:, 0], rot[:, 1])
    series_uid = generate_uid()
    slices = []
    for k in range(n):
        ds = pydicom.dcmread(MR_SMALL)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = number
        ds.SeriesDescription = description
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = 100 - 3 * k
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*rot[:, 0], *rot[:, 1])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin) + k * step * normal]
        ds.SliceThickness = abs(step)
        ds.PixelSpacing = list(pixel_spacing)
        ds.PixelData = (ds.pixel_array + 10 * k).astype(ds.pixel_array.dtype).tobytes()
        slices.append(ds)
    return slices


def save(slices: list[Dataset], folder: Path, seed: int = 0) -> list[Path]:
    """Write the slices under shuffled file names; returns the paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    names = np.random.default_rng(seed).permutation(len(slices))
    paths = [folder / f"IM{name:04d}.dcm" for name in names]
    for ds, path in zip(slices, paths, strict=True):
        ds.save_as(path)
    return paths


def to_enhanced(slices: list[Dataset], path: Path) -> Path:
    """Write the slices as one Enhanced MR multi-frame file (frames in reverse slice order, each
    with its own plane position and rescale from the single-frame tags)."""
    frames = slices[::-1]
    ds = copy.deepcopy(frames[0])
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "RescaleSlope",
        "RescaleIntercept",
        "SliceLocation",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = frames[0].PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = frames[0].SliceThickness
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = frames[0].ImageOrientationPatient
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = []
    for frame in frames:
        group = Dataset()
        group.PlanePositionSequence = [Dataset()]
        group.PlanePositionSequence[0].ImagePositionPatient = frame.ImagePositionPatient
        group.PixelValueTransformationSequence = [Dataset()]
        transform = group.PixelValueTransformationSequence[0]
        transform.RescaleSlope = frame.get("RescaleSlope", 1)
        transform.RescaleIntercept = frame.get("RescaleIntercept", 0)
        transform.RescaleType = "US"
        ds.PerFrameFunctionalGroupsSequence.append(group)
    ds.PixelData = b"".join(frame.PixelData for frame in frames)
    ds.save_as(path)
    return path


def expect_error(match: str, func, *args, **kwargs) -> str:
    """Call ``func``; require a one-line FileFormatError matching ``match`` without patient IDs."""
    with pytest.raises(FileFormatError, match=match) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert not any(identifier in message for identifier in PATIENT)
    return message


def world_lps(ds: Dataset, row: int, col: int) -> np.ndarray:
    """Position of pixel (row, col) of one file from its own tags (DICOM PS3.3 C.7.6.2.1.1)."""
    position = np.array(ds.ImagePositionPatient, dtype=float)
    cosines = np.array(ds.ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return position + col * dc * cosines[:3] + row * dr * cosines[3:]


def test_mr_small_single_file_and_folder(tmp_path):
    ds = pydicom.dcmread(MR_SMALL)
    from_file = read_series(MR_SMALL)
    save([ds], tmp_path)
    from_folder = read_series(tmp_path)
    assert from_file.array.shape == from_file.info.shape == (64, 64, 1)
    assert from_file.array.dtype == np.float32
    np.testing.assert_array_equal(from_file.array[:, :, 0], ds.pixel_array.T)
    np.testing.assert_array_equal(from_folder.array, from_file.array)
    expected = np.diag([-0.3125, -0.3125, 0.8, 1.0])  # LPS -> RAS flips x and y; thickness 0.8
    expected[:3, 3] = [83.9063, 91.2, 6.6406]
    np.testing.assert_allclose(from_file.affine, expected, atol=1e-9)


@pytest.mark.parametrize(
    "name", ["MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_expb.dcm"]
)
def test_other_transfer_syntaxes_decode_to_the_same_volume(name):
    reference = read_series(MR_SMALL)
    other = read_series(get_testdata_file(name, download=False))
    np.testing.assert_array_equal(other.array, reference.array)
    np.testing.assert_allclose(other.affine, reference.affine)


def test_slices_sorted_by_position_not_instance_number_or_file_name(tmp_path):
    slices = make_slices(n=6, rot=rotation(25, -10, 5))
    save(slices, tmp_path, seed=3)
    volume = read_series(tmp_path)
    assert volume.array.shape == (64, 64, 6)
    for k, ds in enumerate(slices):
        np.testing.assert_array_equal(volume.array[:, :, k], ds.pixel_array.T)


def test_slices_sorted_along_the_normal_when_positions_decrease(tmp_path):
    slices = make_slices(n=4, rot=rotation(0, 90, 0), step=-3.0)  # sagittal, stored backwards
    save(slices, tmp_path)
    volume = read_series(tmp_path)
    for k, ds in enumerate(slices[::-1]):
        np.testing.assert_array_equal(volume.array[:, :, k], ds.pixel_array.T)
    normal = np.cross(rotation(0, 90, 0)[:, 0], rotation(0, 90, 0)[:, 1])
    np.testing.assert_allclose(
        volume.affine[:3, 2], [-3 * normal[0], -3 * normal[1], 3 * normal[2]], atol=1e-6
    )


@pytest.mark.parametrize("angles", [(0, 0, 0), (20, 0, 0), (25, -10, 5), (90, 30, 0)])
def test_affine_maps_every_voxel_to_its_dicom_position(tmp_path, angles):
    slices = make_slices(n=5, rot=rotation(*angles), step=2.5, pixel_spacing=(0.5, 0.3125))
    save(slices, tmp_path, seed=1)
    volume = read_series(tmp_path)
    # Independent definition: each file's own ImagePositionPatient and the DICOM pixel formula.
    for k, ds in enumerate(slices):
        for row, col in [(0, 0), (0, 63), (40, 7), (63, 63)]:
            ras = np.diag([-1.0, -1.0, 1.0]) @ world_lps(ds, row, col)
            np.testing.assert_allclose(volume.affine @ [col, row, k, 1], [*ras, 1], atol=1e-4)
    rot = rotation(*angles)
    expected_columns = np.diag([-1.0, -1.0, 1.0]) @ (rot * [0.3125, 0.5, 2.5])  # (dc, dr, step)
    np.testing.assert_allclose(volume.affine[:3, :3], expected_columns, atol=1e-6)


def test_rescale_slope_and_intercept_applied_per_slice(tmp_path):
    slices = make_slices(n=3)
    for k, ds in enumerate(slices):
        ds.RescaleSlope = f"{0.5 + k}"
        ds.RescaleIntercept = f"{-100 * k}"
    save(slices, tmp_path)
    volume = read_series(tmp_path)
    for k, ds in enumerate(slices):
        expected = (0.5 + k) * ds.pixel_array.astype(np.float64) - 100 * k
        np.testing.assert_allclose(volume.array[:, :, k], expected.T, rtol=1e-6)


def test_real_ct_rescale_intercept_when_mr_not_required():
    path = get_testdata_file("CT_small.dcm", download=False)
    ds = pydicom.dcmread(path)
    expect_error(r"CT_small\.dcm: Modality is 'CT', expected 'MR'", read_series, path)
    volume = read_series(path, require_mr=False)
    expected = float(ds.RescaleSlope) * ds.pixel_array + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[:, :, 0], expected.T)
    assert volume.info.modality == "CT"


def test_two_series_in_one_folder_listed_and_selected(tmp_path):
    first = make_slices(n=3, description="second by number", number=9)
    second = make_slices(n=4, rot=rotation(0, 90, 0), description="first by number", number=2)
    save(first, tmp_path / "a")
    save(second, tmp_path / "b" / "deeper")
    (tmp_path / "notes.txt").write_text("not DICOM")
    (tmp_path / "a" / "DICOMDIR-like.bin").write_bytes(b"\0" * 300)

    infos = list_series(tmp_path)
    assert [i.description for i in infos] == ["first by number", "second by number"]
    assert [i.number for i in infos] == [2, 9]
    assert [i.n_instances for i in infos] == [4, 3]
    assert [i.shape for i in infos] == [(64, 64, 4), (64, 64, 3)]
    assert {i.modality for i in infos} == {"MR"}
    assert infos[1].uid == first[0].SeriesInstanceUID
    assert all(p.suffix == ".dcm" for i in infos for p in i.files)

    expect_error(r"2 series found; choose one", read_series, tmp_path)
    by_index = read_series(tmp_path, 1)
    by_uid = read_series(tmp_path, first[0].SeriesInstanceUID)
    np.testing.assert_array_equal(by_index.array, by_uid.array)
    assert by_uid.info.uid == first[0].SeriesInstanceUID
    assert read_series(tmp_path, -1).info == by_uid.info
    np.testing.assert_array_equal(by_index.array[:, :, 2], first[2].pixel_array.T)
    assert select_series(tmp_path, 0).n_instances == 4
    expect_error(r"series index 2 out of range; found 2 series", read_series, tmp_path, 2)
    expect_error(
        r"no series with SeriesInstanceUID 1\.2\.3; found 2", read_series, tmp_path, "1.2.3"
    )


def test_list_series_reads_headers_only(tmp_path):
    # MR_truncated.dcm has a complete header but truncated pixel data.
    truncated = pydicom.dcmread(get_testdata_file("MR_truncated.dcm", download=False))
    truncated.save_as(tmp_path / "truncated.dcm")
    (info,) = list_series(tmp_path)
    assert info.shape == (64, 64, 1)
    expect_error(r"truncated\.dcm: cannot decode pixel data", read_series, tmp_path)


def test_enhanced_multiframe_matches_single_frame_series(tmp_path):
    slices = make_slices(n=5, rot=rotation(15, 5, -20))
    for k, ds in enumerate(slices):
        ds.RescaleSlope, ds.RescaleIntercept = f"{1 + 0.25 * k}", "-7"
    save(slices, tmp_path / "single")
    enhanced = to_enhanced(slices, tmp_path / "enhanced.dcm")
    expected = read_series(tmp_path / "single")
    volume = read_series(enhanced)
    assert volume.info.shape == (64, 64, 5)
    assert volume.info.n_instances == 1
    np.testing.assert_array_equal(volume.array, expected.array)
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-9)


@pytest.mark.skipif(dcm2niix_binary() is None, reason="dcm2niix binary not found")
@pytest.mark.parametrize("enhanced", [False, True])
def test_oblique_shuffled_and_enhanced_series_agree_with_dcm2niix(tmp_path, enhanced):
    """dcm2niix as the independent reader (it ignores per-frame rescale in enhanced files, so
    those get one slope for all frames)."""
    slices = make_slices(n=6, rot=rotation(25, -10, 5))
    for k, ds in enumerate(slices):
        ds.RescaleSlope, ds.RescaleIntercept = ("0.5" if enhanced else f"{1 + 0.25 * k}"), "-7"
    if enhanced:
        (tmp_path / "series").mkdir()
        to_enhanced(slices, tmp_path / "series" / "enhanced.dcm")
    else:
        save(slices, tmp_path / "series", seed=5)
    volume = read_series(tmp_path / "series")
    theirs = nib.load(dicom_to_nifti(tmp_path / "series", tmp_path / "vol.nii", method="dcm2niix"))
    # dcm2niix flips/permutes voxel axes: reorient its image to ours with nibabel
    ornt = ornt_transform(io_orientation(theirs.affine), io_orientation(volume.affine))
    reoriented = theirs.as_reoriented(ornt)
    np.testing.assert_allclose(reoriented.affine, volume.affine, atol=1e-3)
    np.testing.assert_allclose(reoriented.get_fdata(), volume.array, rtol=1e-6)


def test_folder_without_images_is_rejected(tmp_path):
    expect_error(r"no DICOM images found \(0 files", read_series, tmp_path)
    (tmp_path / "readme.txt").write_text("hello")
    for name in ("rtplan.dcm", "test-SR.dcm"):  # DICOM objects without image data
        pydicom.dcmread(get_testdata_file(name, download=False)).save_as(tmp_path / name)
    expect_error(r"no DICOM images found \(3 files, 2 DICOM objects", list_series, tmp_path)
    expect_error(r"no such file or folder", read_series, tmp_path / "missing")


def test_image_header_without_pixel_data(tmp_path):
    (ds,) = make_slices(n=1)
    del ds.PixelData
    save([ds], tmp_path)
    expect_error(r"IM0000\.dcm: no PixelData; expected an image object", read_series, tmp_path)


@pytest.mark.parametrize("tag", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_tag(tmp_path, tag):
    slices = make_slices(n=3)
    delattr(slices[1], tag)
    paths = save(slices, tmp_path)
    message = expect_error(f"missing {tag}", read_series, tmp_path)
    assert str(paths[1]) in message


def test_missing_geometry_in_enhanced_frame(tmp_path):
    slices = make_slices(n=3)
    path = to_enhanced(slices, tmp_path / "enhanced.dcm")
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    ds.save_as(path)
    expect_error(r"enhanced\.dcm \(frame 2\): missing ImagePositionPatient", read_series, path)


def test_mixed_orientations(tmp_path):
    slices = make_slices(n=4)
    slices[2].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    paths = save(slices, tmp_path)
    message = expect_error(
        r"ImageOrientationPatient differs .*\(mixed orientations", read_series, tmp_path
    )
    assert str(paths[2]) in message


def test_inconsistent_matrix_size(tmp_path):
    slices = make_slices(n=3)
    small = slices[1]
    small.PixelData = np.ascontiguousarray(small.pixel_array[:32, :48]).tobytes()
    small.Rows, small.Columns = 32, 48
    paths = save(slices, tmp_path)
    message = expect_error(
        r"(32x48|64x64) pixels, but .* has (64x64|32x48); expected one matrix",
        read_series,
        tmp_path,
    )
    assert str(paths[1]) in message


def test_inconsistent_pixel_spacing(tmp_path):
    slices = make_slices(n=3)
    slices[0].PixelSpacing = [0.5, 0.5]
    save(slices, tmp_path)
    expect_error(r"PixelSpacing \[0\.5, 0\.5\] differs", read_series, tmp_path)


def test_duplicate_positions(tmp_path):
    slices = make_slices(n=4)
    slices[3].ImagePositionPatient = slices[1].ImagePositionPatient
    save(slices, tmp_path)
    expect_error(r"have the same slice position", read_series, tmp_path)


def test_missing_slice_gives_uneven_spacing(tmp_path):
    slices = make_slices(n=5, rot=rotation(10, 20, 30))
    save(slices[:2] + slices[3:], tmp_path)
    expect_error(r"deviate .* from an evenly spaced stack .*missing slices", read_series, tmp_path)


def test_colour_image_rejected(tmp_path):
    path = get_testdata_file("SC_rgb_small_odd.dcm", download=False)
    expect_error(r"3 samples per pixel", read_series, path, require_mr=False)
