"""``kscan convert``: DICOM -> NIfTI, NIfTI -> DICOM, MRD -> fastMRI, with provenance sidecars.

Also ``kscan info`` on an MRD file (it shares this module's MRD writer): layout, skipped noise
scans, and the header's subject information hidden.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import ismrmrd
import ismrmrd.xsd as xsd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import io_orientation, ornt_transform
from nibabel.testing import data_path
from pydicom.data import get_testdata_file

from kscan.pipelines.anatomy import TISSUE_CLASSES
from kscan.pipelines.cli import main
from kscan.pipelines.info import HIDDEN
from kscan.pipelines.io.dicom import read_series
from kscan.pipelines.io.fastmri import FastMRIFile
from kscan.pipelines.io.nifti import read_nifti
from kscan.pipelines.provenance import sidecar_path
from kscan.pipelines.simulate import simulate_dataset
from tests.pipelines.io.test_dicom_read import make_slices

MR_SMALL = get_testdata_file("MR_small.dcm", download=False)
ANATOMICAL = os.path.join(data_path, "anatomical.nii")
H, W, COILS = 16, 12, 3


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_provenance(sidecar, *inputs) -> dict:
    record = json.loads(sidecar.read_text())
    assert [i["sha256"] for i in record["inputs"]] == [sha256(p) for p in inputs]
    assert record["kscan_version"]
    return record


def test_dicom_to_nifti(tmp_path, capsys):
    src = tmp_path / "dicom"
    src.mkdir()
    shutil.copyfile(MR_SMALL, src / "image.dcm")
    out = tmp_path / "out" / "small.nii.gz"
    code, stdout, _ = run(capsys, "convert", src, out, "--method", "pydicom", "--series", "0")
    assert code == 0 and str(out) in stdout
    image = nib.load(out)
    expected = read_series(MR_SMALL)
    np.testing.assert_array_equal(image.get_fdata(), expected.array)
    np.testing.assert_allclose(image.affine, expected.affine, atol=1e-5)
    # independent check of the in-plane voxel size: PixelSpacing of the file
    ds = pydicom.dcmread(MR_SMALL)
    assert image.header.get_zooms()[:2] == tuple(float(s) for s in ds.PixelSpacing[::-1])
    assert_provenance(tmp_path / "out" / "small.json", src / "image.dcm")

    code, _, err = run(capsys, "convert", src, out, "--method", "pydicom")
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert run(capsys, "convert", src, out, "--method", "pydicom", "--overwrite")[0] == 0


def test_nifti_to_dicom_keeps_reference_identity_and_geometry(tmp_path, capsys):
    reference = tmp_path / "reference"
    reference.mkdir()
    shutil.copyfile(MR_SMALL, reference / "ref.dcm")
    out = tmp_path / "series"
    code, stdout, _ = run(
        capsys, "convert", ANATOMICAL, out, "--reference", reference, "--series", "0"
    )
    assert code == 0 and "25 DICOM files" in stdout
    back = read_series(out)
    # The reader stacks slices along +normal (det > 0) while anatomical.nii has det < 0: compare
    # the voxels at the same world positions, nibabel reorienting the original.
    image = nib.load(ANATOMICAL)
    image = image.as_reoriented(
        ornt_transform(io_orientation(image.affine), io_orientation(back.affine))
    )
    slope = float(pydicom.dcmread(sorted(out.iterdir())[0]).RescaleSlope)
    np.testing.assert_allclose(back.array, image.get_fdata(), atol=slope / 2 + 1e-3)
    np.testing.assert_allclose(back.affine, image.affine, atol=1e-4)
    written = pydicom.dcmread(sorted(out.iterdir())[0])
    ref = pydicom.dcmread(MR_SMALL)
    assert (written.PatientID, written.StudyInstanceUID) == (ref.PatientID, ref.StudyInstanceUID)
    assert written.SeriesInstanceUID != ref.SeriesInstanceUID
    assert_provenance(tmp_path / "series.json", ANATOMICAL)


def test_wrong_direction_and_options_exit_2(tmp_path, capsys):
    cases = [
        (["convert", ANATOMICAL, tmp_path / "again.nii.gz"], ANATOMICAL),  # NIfTI -> NIfTI
        (["convert", MR_SMALL, tmp_path / "dicom_out"], MR_SMALL),  # DICOM -> DICOM
        (["convert", MR_SMALL, tmp_path / "raw.h5"], MR_SMALL),  # DICOM -> fastMRI
        (["convert", ANATOMICAL, tmp_path / "s", "--series", "0"], "--reference"),
        (["convert", ANATOMICAL, tmp_path / "s", "--method", "pydicom"], "--method"),
        (["convert", tmp_path / "nothing", tmp_path / "x.nii"], tmp_path / "nothing"),
    ]
    for argv, named in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("kscan: error: ") and err.count("\n") == 1
        assert str(named) in err
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def sim_dicom(tmp_path_factory):
    """A simulated 3-slice DICOM series with its DICOM SEG and the same labels as NIfTI."""
    root = tmp_path_factory.mktemp("sim")
    simulate_dataset(
        root, volumes=1, slices=3, shape_kspace=(64, 64), recon_size=(64, 64), coils=4, quiet=True
    )
    return root


@pytest.mark.parametrize("like", [None, "pydicom", "dcm2niix"])
def test_segmentation_to_nifti_in_the_series_grid(tmp_path, capsys, sim_dicom, like):
    """The SEG's labels in the series' grid equal the simulated label NIfTI; with ``--like`` they
    take that image's voxel layout (dcm2niix stores the rows flipped) and its affine."""
    series, seg = sim_dicom / "dicom" / "sim_000", sim_dicom / "dicom" / "sim_000_seg.dcm"
    truth = read_nifti(sim_dicom / "nifti" / "sim_000_labels.nii.gz")
    out = tmp_path / "labels.nii.gz"
    options = []
    if like is not None:
        image = tmp_path / "image.nii.gz"
        assert run(capsys, "convert", series, image, "--method", like)[0] == 0
        options = ["--like", image]
    code, printed, _ = run(capsys, "convert", seg, out, "--reference", series, *options)
    assert code == 0 and f"wrote {out}" in printed
    labels = read_nifti(out)
    assert (
        set(np.unique(labels.array)) == set(np.unique(truth.array))
        and len(np.unique(truth.array)) > 2
    )
    if like is None:
        np.testing.assert_allclose(labels.affine, truth.affine, atol=1e-6)
        np.testing.assert_array_equal(labels.array, truth.array)
    else:
        np.testing.assert_allclose(labels.affine, read_nifti(image).affine, atol=1e-6)
        assert labels.array.shape == read_nifti(image).array.shape
        canonical = [
            nib.as_closest_canonical(nib.Nifti1Image(v.array, v.affine)) for v in (labels, truth)
        ]
        np.testing.assert_array_equal(*(np.asarray(c.dataobj) for c in canonical))
    record = assert_provenance(sidecar_path(out), seg, *sorted(series.glob("*.dcm")))
    assert record["parameters"]["class_names"]["5"] == TISSUE_CLASSES[5]


def test_segmentation_to_nifti_bad_input_exit_2(tmp_path, capsys, sim_dicom):
    series, seg = sim_dicom / "dicom" / "sim_000", sim_dicom / "dicom" / "sim_000_seg.dcm"
    other = tmp_path / "other"
    other.mkdir()
    for k, ds in enumerate(make_slices(3)):  # another series: no image of it is in the SEG
        ds.save_as(other / f"IM{k}.dcm")
    cases = [
        (["convert", seg, tmp_path / "a.nii.gz"], "--reference"),
        (["convert", seg, tmp_path / "b.nii.gz", "--reference", other], "outside the series"),
        (
            ["convert", seg, tmp_path / "c.nii.gz", "--reference", series, "--like", ANATOMICAL],
            ANATOMICAL,
        ),
        (["convert", series, tmp_path / "d.nii.gz", "--like", ANATOMICAL], "--like"),
    ]
    for argv, named in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("kscan: error: ") and err.count("\n") == 1, err
        assert str(named) in err
    assert not list(tmp_path.glob("*.nii.gz"))


def write_mrd(path, kspace: np.ndarray) -> None:
    """An MRD file of one slice ``kspace`` (coils, H, W) with a noise scan and a named subject."""
    space = xsd.encodingSpaceType(
        matrixSize=xsd.matrixSizeType(x=H, y=W, z=1),
        fieldOfView_mm=xsd.fieldOfViewMm(x=2 * H, y=2 * W, z=5.0),
    )
    limits = xsd.encodingLimitsType(
        kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=W - 1, center=W // 2)
    )
    header = xsd.ismrmrdHeader(
        subjectInformation=xsd.subjectInformationType(patientName="Doe^Jane", patientID="P-1234"),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="kscan-test", receiverChannels=COILS, deviceSerialNumber="SN-55501"
        ),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=127_000_000),
        encoding=[
            xsd.encodingType(
                encodedSpace=space,
                reconSpace=space,
                encodingLimits=limits,
                trajectory=xsd.trajectoryType.CARTESIAN,
            )
        ],
    )
    noise = ismrmrd.Acquisition.from_array(np.ones((COILS, H), dtype=np.complex64))
    noise.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    acquisitions = [noise]
    for w in range(W):
        acq = ismrmrd.Acquisition.from_array(
            np.ascontiguousarray(kspace[:, :, w], dtype=np.complex64), center_sample=H // 2
        )
        acq.idx.kspace_encode_step_1 = w
        acquisitions.append(acq)
    with ismrmrd.File(path, mode="w") as f:
        f["dataset"].header = header
        f["dataset"].acquisitions = acquisitions


def test_mrd_to_fastmri_and_info(tmp_path, capsys):
    rng = np.random.default_rng(3)
    kspace = (rng.standard_normal((COILS, H, W)) + 1j * rng.standard_normal((COILS, H, W))).astype(
        np.complex64
    )
    src = tmp_path / "scan.mrd"
    write_mrd(src, kspace)

    code, out, _ = run(capsys, "info", src, "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "ISMRMRD / MRD HDF5"
    meta = info["metadata"]
    assert meta["skipped"] == {"noise": 1} and meta["num_coils"] == COILS
    assert meta["kspace_shape"] == [1, 1, COILS, H, W] and meta["sampled_fraction"] == 1.0
    assert info["system"]["patientName"] == info["system"]["patientID"] == HIDDEN
    assert (
        info["system"]["deviceSerialNumber"] == HIDDEN
        and info["system"]["systemVendor"] == "kscan-test"
    )
    code, table, _ = run(capsys, "info", src)
    for secret in ("Doe", "P-1234", "SN-55501"):
        assert secret not in out and secret not in table

    out_h5 = tmp_path / "file1.h5"
    assert run(capsys, "convert", src, out_h5)[0] == 0
    with FastMRIFile(out_h5) as f:
        volume = f.read_volume()
        attrs = f.attrs
    np.testing.assert_array_equal(volume["kspace"][0].numpy(), kspace)
    assert "mask" not in volume and volume["target"].shape == (1, H, W)
    assert "P-1234" not in str(attrs)
    record = assert_provenance(tmp_path / "file1.json", src)
    assert record["parameters"]["conversion"] == "mrd_to_fastmri"
    assert run(capsys, "convert", src, out_h5, "--series", "1")[0] == 2
