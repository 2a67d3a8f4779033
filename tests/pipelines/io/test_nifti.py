"""NIfTI reading and writing: nibabel's real test files, round trips, sidecar, atomicity, bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from kscan.errors import FileFormatError, ShapeError
from kscan.pipelines.io import nifti
from kscan.pipelines.io.nifti import read_nifti, write_nifti
from kscan.pipelines.provenance import provenance_record

ANATOMICAL = os.path.join(data_path, "anatomical.nii")
EXAMPLE_4D = os.path.join(data_path, "example4d.nii.gz")


def oblique_affine() -> np.ndarray:
    """A rotated, anisotropic voxel-to-RAS affine."""
    angle = np.deg2rad(17.0)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [-40.25, 12.5, 3.0]
    return affine


@pytest.mark.parametrize("path", [ANATOMICAL, EXAMPLE_4D])
def test_read_real_files_like_nibabel(path):
    volume = read_nifti(path)
    image = nib.load(path)
    np.testing.assert_array_equal(volume.array, image.get_fdata())
    assert volume.array.dtype == image.get_data_dtype().newbyteorder("=")  # unscaled: stored dtype
    np.testing.assert_array_equal(volume.affine, image.affine)
    assert volume.header["shape"] == image.shape
    assert volume.header["zooms"] == pytest.approx(image.header.get_zooms())
    assert volume.header["sform_code"] == int(image.header["sform_code"])


def test_scaled_file_is_read_as_float(tmp_path):
    stored = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(0.5, -3.0)
    nib.save(image, tmp_path / "scaled.nii")
    volume = read_nifti(tmp_path / "scaled.nii")
    np.testing.assert_allclose(volume.array, 0.5 * stored - 3.0)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_array_and_affine(tmp_path, suffix):
    rng = np.random.default_rng(0)
    array = rng.standard_normal((7, 5, 3, 2)).astype(np.float32)
    path = write_nifti(tmp_path / f"vol{suffix}", array, oblique_affine())
    volume = read_nifti(path)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, oblique_affine(), rtol=1e-6, atol=1e-6)
    assert (volume.header["qform_code"], volume.header["sform_code"]) == (1, 1)
    assert volume.header["units"] == ("mm", "sec")
    assert volume.header["description"].startswith("kscan ")
    # nibabel reads the same affine from the qform alone (an independent decoding)
    qform = nib.load(path).header.get_qform()
    np.testing.assert_allclose(qform, oblique_affine(), atol=1e-5)
    assert not (tmp_path / "vol.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"vol{suffix}"]


def test_round_trip_of_real_anatomical_volume(tmp_path):
    original = read_nifti(ANATOMICAL)
    volume = read_nifti(write_nifti(tmp_path / "anat.nii.gz", original.array, original.affine))
    np.testing.assert_array_equal(volume.array, original.array)
    np.testing.assert_allclose(volume.affine, original.affine)


def test_bool_and_int64_stored_as_readable_integers(tmp_path):
    mask = np.zeros((4, 4, 2), dtype=bool)
    mask[1:3, 1:3] = True
    labels = np.arange(32, dtype=np.int64).reshape(4, 4, 2)
    assert read_nifti(write_nifti(tmp_path / "m.nii", mask, np.eye(4))).array.dtype == np.uint8
    read = read_nifti(write_nifti(tmp_path / "l.nii", labels, np.eye(4))).array
    assert read.dtype == np.int32
    np.testing.assert_array_equal(read, labels)
    too_big = np.full((2, 2, 2), 2**40, dtype=np.int64)
    with pytest.raises(ValueError, match="outside the int32 range"):
        write_nifti(tmp_path / "big.nii", too_big, np.eye(4))


def test_sidecar_records_provenance(tmp_path):
    record = provenance_record(
        model="zf", parameters={"acceleration": 4}, inputs=[ANATOMICAL], command="kscan test"
    )
    path = write_nifti(
        tmp_path / "recon.nii.gz", np.zeros((2, 3, 4), np.float32), np.eye(4), record
    )
    sidecar = json.loads((tmp_path / "recon.json").read_text())
    assert sidecar["model"] == "zf"
    assert sidecar["parameters"] == {"acceleration": 4}
    assert sidecar["command"] == "kscan test"
    assert sidecar["inputs"][0]["path"] == "anatomical.nii"
    assert len(sidecar["inputs"][0]["sha256"]) == 64
    assert path.exists()


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "vol.nii.gz", np.ones((2, 2, 2), np.float32), np.eye(4))
    before = path.read_bytes()

    def killed_mid_write(image, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(nifti.nib, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        write_nifti(path, np.zeros((2, 2, 2), np.float32), np.eye(4), provenance={"model": None})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.nii.gz"]  # no temp file, no sidecar


def _expect_unreadable(path, match=r"unreadable NIfTI"):
    with pytest.raises(FileFormatError, match=match) as info:
        read_nifti(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_and_corrupt_files(tmp_path):
    data = Path(ANATOMICAL).read_bytes()
    (tmp_path / "short.nii").write_bytes(data[: len(data) // 2])
    _expect_unreadable(tmp_path / "short.nii")
    (tmp_path / "header_only.nii").write_bytes(data[:200])
    _expect_unreadable(tmp_path / "header_only.nii")
    packed = Path(EXAMPLE_4D).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(packed[: len(packed) // 3])
    _expect_unreadable(tmp_path / "cut.nii.gz")
    (tmp_path / "noise.nii").write_bytes(np.random.default_rng(0).bytes(1000))
    _expect_unreadable(tmp_path / "noise.nii")
    (tmp_path / "text.nii.gz").write_text("not gzip")
    _expect_unreadable(tmp_path / "text.nii.gz")


def test_missing_and_non_nifti_files(tmp_path):
    _expect_unreadable(tmp_path / "missing.nii", match="no such file")
    _expect_unreadable(
        os.path.join(data_path, "analyze.hdr"), match="Spm2AnalyzeImage file; expected NIfTI"
    )


def test_bad_write_arguments(tmp_path):
    with pytest.raises(FileFormatError, match=r"vol\.img: expected a \.nii or \.nii\.gz"):
        write_nifti(tmp_path / "vol.img", np.zeros((2, 2, 2)), np.eye(4))
    with pytest.raises(ShapeError, match=r"expected a finite \(4, 4\) matrix, got shape \(3, 4\)"):
        write_nifti(tmp_path / "vol.nii", np.zeros((2, 2, 2)), np.eye(4)[:3])
    with pytest.raises(ShapeError, match="expected 2 to 7 dimensions"):
        write_nifti(tmp_path / "vol.nii", np.zeros(5), np.eye(4))
    assert list(tmp_path.iterdir()) == []
