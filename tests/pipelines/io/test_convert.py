"""DICOM <-> NIfTI conversion: dcm2niix and kscan's pydicom reader agree; NIfTI -> DICOM -> NIfTI.

Test series: pydicom's ``MR_small.dcm``, and MR series written from nibabel's real volumes
(``anatomical.nii``; the first volume of the oblique ``example4d.nii.gz``) by kscan's DICOM
writer, which stores uint16 with RescaleSlope/RescaleIntercept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import io_orientation, ornt_transform
from nibabel.testing import data_path
from pydicom.data import get_testdata_file

from kscan.errors import ConfigError, FileFormatError, ShapeError
from kscan.pipelines.io import convert
from kscan.pipelines.io.convert import dcm2niix_binary, dicom_to_nifti, nifti_to_dicom
from kscan.pipelines.io.dicom import list_series, read_series
from kscan.pipelines.io.dicom_write import write_mr_series

MR_SMALL = get_testdata_file("MR_small.dcm", download=False)
ANATOMICAL = os.path.join(data_path, "anatomical.nii")
EXAMPLE_4D = os.path.join(data_path, "example4d.nii.gz")

needs_dcm2niix = pytest.mark.skipif(dcm2niix_binary() is None, reason="dcm2niix binary not found")


def nibabel_volume(path: str, rotate_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """First 3D volume of a nibabel test file as float, and its affine rotated about z."""
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float64)
    a = np.deg2rad(rotate_deg)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return data[..., 0] if data.ndim == 4 else data, rot @ image.affine


def dicom_series(folder: Path, path: str, rotate_deg: float = 0.0) -> Path:
    """Write a nibabel test volume as an MR series with kscan's writer (slices, rows, cols)."""
    data, affine = nibabel_volume(path, rotate_deg)
    write_mr_series(folder, data.transpose(2, 1, 0), affine, reference=pydicom.dcmread(MR_SMALL))
    return folder


def in_layout(image: nib.Nifti1Image, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image`` reoriented (by nibabel) to the voxel axes of ``affine``: (values, affine)."""
    ornt = ornt_transform(io_orientation(image.affine), io_orientation(affine))
    reoriented = image.as_reoriented(ornt)
    return reoriented.get_fdata(), reoriented.affine


def convert_both(src: Path, tmp_path: Path, series=None) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The series converted by pydicom and by dcm2niix, loaded by nibabel."""
    ours = dicom_to_nifti(src, tmp_path / "pydicom.nii.gz", series, method="pydicom")
    theirs = dicom_to_nifti(src, tmp_path / "dcm2niix.nii.gz", series, method="dcm2niix")
    return nib.load(ours), nib.load(theirs)


def assert_same_volume(ours: nib.Nifti1Image, theirs: nib.Nifti1Image) -> None:
    """Same shape, affine within 1e-3 mm and same values once dcm2niix's axes are reordered."""
    values, affine = in_layout(theirs, ours.affine)
    assert values.shape == ours.shape
    np.testing.assert_allclose(affine, ours.affine, atol=1e-3)
    np.testing.assert_allclose(
        values, ours.get_fdata(), rtol=1e-6, atol=1e-6 * np.abs(values).max()
    )


@needs_dcm2niix
def test_dcm2niix_and_pydicom_agree_on_mr_small(tmp_path):
    shutil.copy(MR_SMALL, tmp_path / "in.dcm")
    ours, theirs = convert_both(tmp_path / "in.dcm", tmp_path)
    assert ours.shape == (64, 64, 1)
    assert_same_volume(ours, theirs)


@needs_dcm2niix
@pytest.mark.parametrize(
    ("path", "rotate_deg"), [(ANATOMICAL, 0.0), (ANATOMICAL, 20.0), (EXAMPLE_4D, 0.0)]
)
def test_dcm2niix_and_pydicom_agree_on_written_series(tmp_path, path, rotate_deg):
    src = dicom_series(tmp_path / "series", path, rotate_deg)
    ours, theirs = convert_both(src, tmp_path)
    assert_same_volume(ours, theirs)
    # ... and both hold the volume that was written (up to uint16 quantisation)
    data, affine = in_layout(nib.Nifti1Image(*nibabel_volume(path, rotate_deg)), ours.affine)
    np.testing.assert_allclose(ours.affine, affine, atol=1e-4)
    step = float(pydicom.dcmread(next(src.iterdir())).RescaleSlope)
    np.testing.assert_allclose(ours.get_fdata(), data, atol=step)


@needs_dcm2niix
def test_dcm2niix_converts_only_the_selected_series(tmp_path):
    dicom_series(tmp_path / "in" / "anatomical", ANATOMICAL)
    dicom_series(tmp_path / "in" / "example", EXAMPLE_4D)
    infos = list_series(tmp_path / "in")
    index = next(n for n, info in enumerate(infos) if info.shape == (128, 96, 24))
    ours, theirs = convert_both(tmp_path / "in", tmp_path, series=index)
    assert ours.shape == (128, 96, 24)
    assert_same_volume(ours, theirs)
    with pytest.raises(FileFormatError, match="2 series found"):
        dicom_to_nifti(tmp_path / "in", tmp_path / "x.nii", method="dcm2niix")


@needs_dcm2niix
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_dcm2niix_output_and_sidecar(tmp_path, suffix):
    shutil.copy(MR_SMALL, tmp_path / "in.dcm")
    out = dicom_to_nifti(tmp_path / "in.dcm", tmp_path / "out" / f"vol{suffix}")
    assert nib.load(out).shape == (64, 64, 1)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([f"vol{suffix}", "vol.json"])
    record = json.loads((out.parent / "vol.json").read_text())
    assert record["parameters"]["method"] == "dcm2niix"  # "auto" picks dcm2niix when present
    assert record["inputs"][0]["path"] == "in.dcm"
    assert "CompressedSamples" not in nib.load(out).header["aux_file"].item().decode()


def test_pydicom_fallback_when_dcm2niix_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "dcm2niix_binary", lambda: None)
    out = dicom_to_nifti(MR_SMALL, tmp_path / "vol.nii.gz")
    record = json.loads((tmp_path / "vol.json").read_text())
    assert record["parameters"]["method"] == "pydicom"
    np.testing.assert_array_equal(nib.load(out).get_fdata(), read_series(MR_SMALL).array)
    with pytest.raises(ConfigError, match="no dcm2niix binary found"):
        dicom_to_nifti(MR_SMALL, tmp_path / "x.nii", method="dcm2niix")


def test_dcm2niix_failure_is_a_file_format_error(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "dcm2niix_binary", lambda: shutil.which("false"))
    with pytest.raises(FileFormatError, match=r"dcm2niix failed \(exit status 1: wrote 0 volumes"):
        dicom_to_nifti(MR_SMALL, tmp_path / "vol.nii", method="dcm2niix")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["pydicom", pytest.param("dcm2niix", marks=needs_dcm2niix)])
def test_non_mr_rejected_by_both_methods(tmp_path, method):
    ct = get_testdata_file("CT_small.dcm", download=False)
    with pytest.raises(FileFormatError, match="Modality is 'CT', expected 'MR'"):
        dicom_to_nifti(ct, tmp_path / "ct.nii", method=method)
    assert nib.load(
        dicom_to_nifti(ct, tmp_path / "ct.nii", method=method, require_mr=False)
    ).shape == (128, 128, 1)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="method: got 'itk'"):
        dicom_to_nifti(MR_SMALL, tmp_path / "vol.nii", method="itk")
    with pytest.raises(FileFormatError, match=r"vol\.mgz: expected a \.nii or \.nii\.gz"):
        dicom_to_nifti(MR_SMALL, tmp_path / "vol.mgz")
    with pytest.raises(FileFormatError, match="no DICOM images found"):
        dicom_to_nifti(tmp_path, tmp_path / "vol.nii")


@pytest.mark.parametrize("path", [ANATOMICAL, EXAMPLE_4D])
def test_nifti_to_dicom_round_trip(tmp_path, path):
    data, affine = nibabel_volume(path)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), tmp_path / "in.nii.gz")
    files = nifti_to_dicom(tmp_path / "in.nii.gz", tmp_path / "series", reference=MR_SMALL)
    assert len(files) == data.shape[2]
    back = read_series(tmp_path / "series")
    # the reader orders slices along +normal: compare in its voxel layout (reoriented by nibabel)
    expected, expected_affine = in_layout(nib.Nifti1Image(data, affine), back.affine)
    step = float(pydicom.dcmread(files[0]).RescaleSlope)
    np.testing.assert_allclose(back.array, expected, atol=step)
    np.testing.assert_allclose(back.affine, expected_affine, atol=1e-4)
    first = pydicom.dcmread(files[0])
    assert first.StudyInstanceUID == pydicom.dcmread(MR_SMALL).StudyInstanceUID
    assert json.loads((tmp_path / "series.json").read_text())["inputs"][0]["path"] == "in.nii.gz"


def test_nifti_to_dicom_rejects_4d(tmp_path):
    with pytest.raises(ShapeError, match=r"expected a 3D volume"):
        nifti_to_dicom(EXAMPLE_4D, tmp_path / "series")
    assert list(tmp_path.iterdir()) == []
