"""``kscan simulate``: layout, agreement of the HDF5, NIfTI and DICOM outputs, seeds, resuming,
the retrospective mode and bad input."""

import json
import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path

from kscan.errors import KscanError
from kscan.pipelines import cli, simulate
from kscan.pipelines.anatomy import TISSUE_CLASSES
from kscan.pipelines.io.dicom import read_series
from kscan.pipelines.io.dicom_seg import read_segmentation
from kscan.pipelines.io.fastmri import FastMRIFile
from kscan.pipelines.io.nifti import read_nifti

SMALL = ["--slices", "4", "--kspace-size", "128,96", "--recon-size", "64,64", "--coils", "4"]
SMALL_KW = dict(slices=4, shape_kspace=(128, 96), recon_size=(64, 64), coils=4, quiet=True)
ANATOMICAL = Path(data_path) / "anatomical.nii"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two small volumes in every format, written through the command line."""
    out = tmp_path_factory.mktemp("sim") / "data"
    assert cli.main(["simulate", str(out), "--volumes", "2", *SMALL, "--quiet"]) == 0
    return out


def _mtimes(root: Path) -> dict[Path, int]:
    """Modification times of the files under ``root`` (folders change as files come and go)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _kspace(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["kspace"][()]


def test_layout(dataset):
    names = [f"sim_{i:03d}" for i in range(2)]
    assert sorted(p.name for p in (dataset / "h5").iterdir()) == [f"{n}.h5" for n in names]
    for n in names:
        for rel in (
            f"nifti/{n}.nii.gz",
            f"nifti/{n}.json",
            f"nifti/{n}_labels.nii.gz",
            f"nifti/{n}_labels.json",
            f"dicom/{n}_seg.dcm",
        ):
            assert (dataset / rel).is_file(), rel
        assert len(list((dataset / "dicom" / n).glob("slice_*.dcm"))) == 4
    assert not (dataset / simulate.PENDING).exists()
    assert not [p for p in dataset.rglob(".*")]  # no temporary files left behind
    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["parameters"]["coils"] == 4 and manifest["parameters"]["kspace_size"] == [
        128,
        96,
    ]
    assert [c["name"] for c in manifest["cases"]] == names
    assert manifest["cases"][1]["seed_entropy"] == [0, 1]
    for case in manifest["cases"]:
        assert all((dataset / f).exists() for f in case["files"])


def test_hdf5_reads_back_with_segmentation(dataset):
    with FastMRIFile(dataset / "h5" / "sim_000.h5") as f:
        meta = f.metadata
        volume = f.read_volume()
        provenance = json.loads(f.attrs[simulate.PROVENANCE_ATTR])
    assert (meta.num_slices, meta.num_coils, meta.matrix_size) == (4, 4, (128, 96))
    assert meta.encoding_size == (128, 96, 1) and meta.recon_size == (64, 64, 1)
    assert meta.encoding_fov_mm == pytest.approx((64.0, 48.0, 3.0))
    assert meta.has_segmentation and not meta.has_sensitivity_map
    seg = volume["segmentation"].numpy()
    assert seg.shape == (4, 64, 64) and seg.dtype == np.uint8
    assert set(np.unique(seg)) <= set(TISSUE_CLASSES) and {0, 1, 2} <= set(np.unique(seg))
    # the target is fastMRI's RSS crop, from an independent numpy definition
    k = volume["kspace"].numpy()
    image = np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    rss = np.sqrt((np.abs(image) ** 2).sum(axis=1))[:, 32:96, 16:80]
    np.testing.assert_allclose(volume["target"].numpy(), rss, rtol=1e-4, atol=1e-6 * rss.max())
    assert provenance["parameters"]["case"] == "sim_000"


def test_nifti_equals_hdf5_after_axis_conversion(dataset):
    with FastMRIFile(dataset / "h5" / "sim_001.h5") as f:
        volume = f.read_volume()
    target = read_nifti(dataset / "nifti" / "sim_001.nii.gz")
    labels = read_nifti(dataset / "nifti" / "sim_001_labels.nii.gz")
    assert target.array.shape == (64, 64, 4)  # (W, H, slices)
    np.testing.assert_array_equal(target.array, volume["target"].numpy().transpose(2, 1, 0))
    np.testing.assert_array_equal(labels.array, volume["segmentation"].numpy().transpose(2, 1, 0))
    np.testing.assert_array_equal(target.affine, labels.affine)
    assert target.header["zooms"] == pytest.approx((0.5, 0.5, 3.0))
    # axial, centred: the central voxel is at the origin, columns to the left (-x in RAS)
    centre = target.affine @ np.array([31.5, 31.5, 1.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0, atol=1e-12)
    assert target.affine[0, 0] < 0 and target.affine[1, 1] < 0 and target.affine[2, 2] > 0
    sidecar = json.loads((dataset / "nifti" / "sim_001.json").read_text())
    assert sidecar["parameters"]["seed_entropy"] == [0, 1]


def test_dicom_series_has_the_nifti_geometry(dataset):
    nifti = read_nifti(dataset / "nifti" / "sim_000.nii.gz")
    series = read_series(dataset / "dicom" / "sim_000")
    assert series.array.shape == nifti.array.shape
    np.testing.assert_allclose(series.affine, nifti.affine, atol=1e-5)
    slope = float(pydicom.dcmread(series.info.files[0]).RescaleSlope)
    np.testing.assert_allclose(series.array, nifti.array, atol=slope)


def test_segmentation_object_reads_back(dataset):
    seg = read_segmentation(dataset / "dicom" / "sim_001_seg.dcm")
    with FastMRIFile(dataset / "h5" / "sim_001.h5") as f:
        labels = f.read_volume()["segmentation"].numpy()
    np.testing.assert_array_equal(seg.labels, labels)
    assert seg.class_names == {k: v for k, v in TISSUE_CLASSES.items() if k > 0}
    files = sorted((dataset / "dicom" / "sim_001").glob("slice_*.dcm"))
    assert seg.source_sop_instance_uids == [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]


def test_rerun_recomputes_nothing(dataset, capsys):
    before = _mtimes(dataset)
    assert cli.main(["simulate", str(dataset), "--volumes", "2", *SMALL, "--quiet"]) == 0
    assert "0 outputs written" in capsys.readouterr().out
    assert _mtimes(dataset) == before


def test_same_seed_same_kspace_independent_of_volume_count(dataset, tmp_path):
    # one volume instead of two, h5 only, with coil maps: volume 0 is the same k-space
    written = simulate.simulate_dataset(
        tmp_path / "a", volumes=1, formats=["h5"], sensitivity_maps=True, **SMALL_KW
    )
    assert written == [tmp_path / "a" / "h5" / "sim_000.h5", tmp_path / "a" / "dataset.json"]
    np.testing.assert_array_equal(_kspace(written[0]), _kspace(dataset / "h5" / "sim_000.h5"))
    with h5py.File(written[0], "r") as f:
        maps = f["sensitivity_map"][()]
    assert maps.shape == (4, 4, 128, 96)
    np.testing.assert_allclose((np.abs(maps) ** 2).sum(axis=1), 1, rtol=1e-5)
    other = simulate.simulate_dataset(tmp_path / "b", volumes=1, seed=1, formats=["h5"], **SMALL_KW)
    assert not np.array_equal(_kspace(other[0]), _kspace(written[0]))
    assert not np.array_equal(
        _kspace(dataset / "h5" / "sim_001.h5"), _kspace(dataset / "h5" / "sim_000.h5")
    )


def test_killed_run_resumes_and_finishes(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "data"
    calls = []

    def killed_on_second_seg(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write_segmentation(*args, **kwargs)

    write_segmentation = simulate.write_segmentation
    monkeypatch.setattr(simulate, "write_segmentation", killed_on_second_seg)
    with pytest.raises(KeyboardInterrupt):
        simulate.simulate_dataset(out, volumes=2, **SMALL_KW)
    monkeypatch.undo()
    assert (out / simulate.PENDING).exists() and not (out / "dataset.json").exists()
    assert not (out / "dicom" / "sim_001_seg.dcm").exists()
    assert not [p for p in out.rglob(".*") if p.name != simulate.PENDING]

    # other parameters may not complete this dataset
    assert cli.main(["simulate", str(out), "--volumes", "2", *SMALL[:-1], "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert simulate.PENDING in err and "coils" in err and err.count("\n") == 1

    # what a SIGKILL would leave: atomic_path's temporary file, write_mr_series' temporary folder
    (out / "h5" / ".sim_000.h5.x1.tmp.h5").write_bytes(b"truncated")
    (out / "dicom" / ".sim_001.x2.tmp").mkdir()
    before = _mtimes(out)
    written = simulate.simulate_dataset(out, volumes=2, **SMALL_KW)
    assert written == [out / "dicom" / "sim_001_seg.dcm", out / "dataset.json"]
    for gone in (simulate.PENDING, "h5/.sim_000.h5.x1.tmp.h5"):
        del before[out / gone]
    assert not [p.name for p in out.rglob(".*")]
    assert before.items() <= _mtimes(out).items()  # nothing that existed was rewritten
    assert not (out / simulate.PENDING).exists()
    np.testing.assert_array_equal(
        read_segmentation(written[0]).labels,
        read_segmentation(dataset / "dicom" / "sim_001_seg.dcm").labels,
    )
    np.testing.assert_array_equal(
        _kspace(out / "h5" / "sim_001.h5"), _kspace(dataset / "h5" / "sim_001.h5")
    )


def test_finished_dataset_rejects_other_parameters(dataset, capsys):
    before = _mtimes(dataset)
    assert cli.main(["simulate", str(dataset), *SMALL, "--seed", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "dataset.json" in err and "seed" in err and err.count("\n") == 1
    assert _mtimes(dataset) == before


def test_from_image_on_nibabel_anatomical(tmp_path):
    out = tmp_path / "retro"
    args = ["simulate", str(out), "--from-image", str(ANATOMICAL), "--coils", "4"]
    assert cli.main([*args, "--snr-db", "none", "--slices", "5", "--quiet"]) == 0
    assert sorted(p.name for p in (out / "h5").iterdir()) == ["sim_000.h5"]
    assert sorted(p.name for p in (out / "nifti").iterdir()) == ["sim_000.json", "sim_000.nii.gz"]
    assert not (out / "dicom").exists()
    source = read_nifti(ANATOMICAL)  # (33, 41, 25), 2 mm voxels
    with FastMRIFile(out / "h5" / "sim_000.h5") as f:
        meta, volume = f.metadata, f.read_volume()
    assert volume["kspace"].shape == (5, 4, 41, 33) and not meta.has_segmentation
    assert meta.encoding_fov_mm == pytest.approx((82.0, 66.0, 2.0))
    target = read_nifti(out / "nifti" / "sim_000.nii.gz")
    expected = np.clip(source.array[..., 10:15].astype(np.float32), 0, None)
    # noiseless: the RSS of the simulated coils is the input magnitude, on the input's grid
    np.testing.assert_allclose(target.array, expected, atol=1e-4 * expected.max())
    np.testing.assert_array_equal(target.array, volume["target"].numpy().transpose(2, 1, 0))
    np.testing.assert_allclose(target.affine[:, :3], source.affine[:, :3])
    np.testing.assert_allclose(target.affine[:, 3], source.affine @ [0, 0, 10, 1])


def test_from_image_reads_a_dicom_series(dataset, tmp_path):
    series = read_series(dataset / "dicom" / "sim_000")
    simulate.simulate_from_image(
        tmp_path / "retro", dataset / "dicom" / "sim_000", coils=4, snr_db=None, quiet=True
    )
    target = read_nifti(tmp_path / "retro" / "nifti" / "sim_000.nii.gz")
    np.testing.assert_allclose(target.affine, series.affine)
    np.testing.assert_allclose(target.array, series.array, atol=1e-4 * series.array.max())


def _garbage(tmp_path: Path) -> str:
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a nifti file at all")
    return str(path)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--recon-size", "160,160"], "shape_kspace"),
        (["--coils", "2"], "coils"),
        (["--coils", "40"], "coils"),
        (["--dims", "4"], "dims"),
        (["--formats", "h5,png"], "formats"),
        (["--volumes", "0"], "volumes"),
        (["--from-image", "{tmp}/missing.nii.gz"], "missing.nii.gz"),
        (["--from-image", "{garbage}"], "broken.nii.gz"),
        (["--from-image", str(ANATOMICAL), "--recon-size", "32,32"], "--recon-size"),
        (["--from-image", str(ANATOMICAL), "--formats", "dicom"], "formats"),
        (["--from-image", str(ANATOMICAL), "--slices", "99"], "anatomical.nii"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, named):
    out = tmp_path / "never"
    garbage = _garbage(tmp_path)
    args = [a.format(tmp=tmp_path, garbage=garbage) for a in extra]
    small = SMALL if "--from-image" not in args else ["--coils", "4"]
    assert cli.main(["simulate", str(out), *small, *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kscan: error: ") and err.count("\n") == 1, err
    assert named in err and "Traceback" not in err
    assert not out.exists()  # rejected before anything is written


def test_image_errors_name_the_file(tmp_path):
    flat = tmp_path / "zeros.nii"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 3), np.float32), np.eye(4)), flat)
    with pytest.raises(KscanError, match="zeros.nii: volume: every value is <= 0"):
        simulate.simulate_from_image(tmp_path / "out", flat, coils=4, quiet=True)
    assert os.listdir(tmp_path) == ["zeros.nii"]


def test_intensity_scale_gives_the_same_volume_scaled(dataset, tmp_path):
    out = simulate.simulate_dataset(
        tmp_path / "dim", volumes=1, formats=["h5"], intensity_scale=1e-4, **SMALL_KW
    )[0]
    stored = dataset / "h5" / "sim_000.h5"
    np.testing.assert_allclose(_kspace(out), 1e-4 * _kspace(stored), rtol=1e-5, atol=1e-12)
    with h5py.File(out, "r") as f, h5py.File(stored, "r") as g:
        target, expected = f["reconstruction_rss"][()], g["reconstruction_rss"][()]
        np.testing.assert_allclose(target, 1e-4 * expected, rtol=1e-5, atol=1e-12)
        assert f.attrs["max"] == pytest.approx(1e-4 * g.attrs["max"])
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(KscanError, match="intensity_scale"):
            simulate.simulate_dataset(tmp_path / "x", volumes=1, intensity_scale=bad, **SMALL_KW)
