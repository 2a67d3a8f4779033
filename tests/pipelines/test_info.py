"""``kscan info``: format detection, layout and metadata, identifiers hidden, one-line errors.

Inputs: small fastMRI and Calgary-Campinas files written here, pydicom's real ``MR_small.dcm``
(with identifiers planted in it) and nibabel's real ``anatomical.nii``. The MRD case is in
``test_convert_cmd.py``, next to the MRD writer it shares with the conversion test.
"""

from __future__ import annotations

import json
import os

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from kscan.pipelines.cli import main
from kscan.pipelines.info import HIDDEN, is_identifier
from kscan.pipelines.io.fastmri import write_fastmri

MR_SMALL = get_testdata_file("MR_small.dcm", download=False)
ANATOMICAL = os.path.join(data_path, "anatomical.nii")
SECRETS = {"PatientName": "Doe^Janet", "PatientID": "ID-998877", "PatientBirthDate": "19610203"}


def run_info(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["info", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def info_json(capsys, path) -> dict:
    code, out, _ = run_info(capsys, path, "--json")
    assert code == 0
    return json.loads(out)


def fastmri_file(path, patient_id: str = "Doe^Jane-7781"):
    rng = np.random.default_rng(0)
    kspace = rng.standard_normal((2, 3, 16, 12)) + 1j * rng.standard_normal((2, 3, 16, 12))
    mask = np.zeros(12, dtype=bool)
    mask[[0, 3, 5, 6, 9]] = True
    return write_fastmri(
        path, kspace, np.abs(kspace[:, 0, 4:12]), patient_id=patient_id, mask=mask, acceleration=2.0
    )


def test_fastmri_layout_metadata_and_hidden_patient_id(tmp_path, capsys):
    path = fastmri_file(tmp_path / "file1.h5")
    code, out, _ = run_info(capsys, path)
    assert code == 0
    assert "fastMRI HDF5" in out and "complex64" in out and "(2, 3, 16, 12)" in out
    assert "7781" not in out and "Doe" not in out and HIDDEN in out

    info = info_json(capsys, path)
    assert "7781" not in json.dumps(info)
    assert info["attributes"]["patient_id"] == HIDDEN
    datasets = {d["name"]: (d["shape"], d["dtype"]) for d in info["datasets"]}
    assert datasets["kspace"] == ([2, 3, 16, 12], "complex64")
    assert datasets["reconstruction_rss"] == ([2, 8, 12], "float32")
    meta = info["metadata"]
    assert (meta["num_slices"], meta["num_coils"], meta["matrix_size"]) == (2, 3, [16, 12])
    assert meta["recon_size"] == [8, 12, 1] and meta["encoding_size"] == [16, 12, 1]
    assert (meta["padding_left"], meta["padding_right"]) == (0, 12)
    # achieved acceleration of the stored mask, 12 columns / 5 sampled; the nominal one is an attribute
    assert meta["mask_sampled_lines"] == 5 and meta["mask_acceleration"] == pytest.approx(12 / 5)
    assert meta["acceleration"] == 2.0
    with h5py.File(path) as f:
        assert f.attrs["max"] == pytest.approx(meta["max"])


def test_calgary_and_submission_layouts(tmp_path, capsys):
    calgary = tmp_path / "e1.h5"
    with h5py.File(calgary, "w") as f:
        f.create_dataset("kspace", data=np.zeros((3, 8, 6, 4), dtype=np.float32))
    info = info_json(capsys, calgary)
    assert info["format"] == "Calgary-Campinas HDF5"
    assert info["metadata"]["num_coils"] == 2 and info["metadata"]["centered"] is False

    submission = tmp_path / "file1.h5"
    with h5py.File(submission, "w") as f:
        f.create_dataset("reconstruction", data=np.zeros((4, 8, 8), dtype=np.float32))
    info = info_json(capsys, submission)
    assert info["format"].startswith("fastMRI submission") and info["metadata"]["num_slices"] == 4


def planted_dicom(folder, series_uid: str | None = None, number: int = 1):
    """MR_small.dcm with patient identifiers planted, optionally as another series."""
    ds = pydicom.dcmread(MR_SMALL)
    for keyword, value in SECRETS.items():
        setattr(ds, keyword, value)
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid])
        ds.SeriesNumber = number
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"series{number}.dcm"
    ds.save_as(path)
    return path


def test_dicom_file_and_folder_hide_identifiers(tmp_path, capsys):
    file = planted_dicom(tmp_path / "dicom")
    planted_dicom(tmp_path / "dicom", series_uid="1.2.826.0.1.3680043.8.498.1", number=2)
    for path in (file, tmp_path / "dicom"):
        code, out, _ = run_info(capsys, path)
        info = info_json(capsys, path)
        assert code == 0 and "DICOM" in out
        for secret in SECRETS.values():
            assert secret not in out and secret not in json.dumps(info)
        tags = info["tags of series 0"]
        assert all(tags[k] == HIDDEN for k in SECRETS)
        assert (tags["Modality"], tags["Rows"], tags["Columns"]) == ("MR", 64, 64)
    assert len(info["series"]) == 2
    original = pydicom.dcmread(MR_SMALL).SeriesInstanceUID
    assert [s["uid"] for s in info["series"]] == [original, "1.2.826.0.1.3680043.8.498.1"]
    assert [s["index"] for s in info["series"]] == [0, 1]
    assert info["series"][0]["shape (columns, rows, slices)"] == [64, 64, 1]


def test_nifti_header_and_affine(capsys):
    info = info_json(capsys, ANATOMICAL)
    image = nib.load(ANATOMICAL)
    assert info["format"] == "NIfTI"
    assert info["header"]["shape"] == list(image.shape) == [33, 41, 25]
    assert info["header"]["zooms"] == pytest.approx(list(image.header.get_zooms()))
    np.testing.assert_allclose(info["affine"], image.affine, atol=1e-6)
    data = np.asarray(image.dataobj)
    assert info["header"]["value_range"] == [float(data.min()), float(data.max())]
    assert info["header"]["kscan volume (slices, H, W)"] == [25, 41, 33]


def test_unknown_and_unreadable_files_exit_2_naming_the_file(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    truncated = tmp_path / "cut.h5"
    with open(fastmri_file(tmp_path / "whole.h5"), "rb") as f:
        truncated.write_bytes(f.read()[:3000])
    empty_h5 = tmp_path / "other.h5"
    with h5py.File(empty_h5, "w") as f:
        f.create_dataset("images", data=np.zeros(3))
    for path in (text, truncated, empty_h5, tmp_path / "missing.nii.gz"):
        code, out, err = run_info(capsys, path)
        assert code == 2 and out == ""
        assert err.startswith("kscan: error: ") and err.count("\n") == 1 and str(path) in err


def test_identifier_names():
    for name in (
        "patient_id",
        "PatientName",
        "patientBirthdate",
        "patientWeight_kg",
        "AccessionNumber",
    ):
        assert is_identifier(name)
    for name in ("acquisition", "max", "norm", "Modality", "SeriesDescription"):
        assert not is_identifier(name)
