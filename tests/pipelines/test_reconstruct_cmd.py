"""kscan undersample and kscan reconstruct on small simulated fastMRI-layout files."""

import h5py
import numpy as np
import pytest

from kscan.pipelines.cli import main
from kscan.pipelines.io.fastmri import FastMRIFile, write_fastmri
from kscan.pipelines.metrics import reconstruction_metrics
from kscan.pipelines.synthetic import simulate_volume


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    vol = simulate_volume((96, 80), (64, 64), slices=2, coils=6, snr_db=40, seed=3)
    for name in ("a", "b"):
        write_fastmri(root / "full" / f"{name}.h5", vol.kspace, vol.target, segmentation=vol.labels)
    return root, vol


def test_undersample_writes_test_style_files(dataset, capsys):
    root, vol = dataset
    args = ["undersample", str(root / "full"), str(root / "4x"), "--mask", "equispaced_fraction"]
    assert main([*args, "--acceleration", "4", "--center-fraction", "0.08", "--quiet"]) == 0
    masks = []
    for name in ("a", "b"):
        with FastMRIFile(root / "4x" / f"{name}.h5") as f:
            meta, s = f.metadata, f.read_slice(1)
            assert meta.has_mask and meta.acceleration == pytest.approx(4, rel=0.05)
            assert meta.num_low_frequency == round(80 * 0.08)
            mask = s["mask"].numpy()
            np.testing.assert_array_equal(s["kspace"].numpy()[..., ~mask], 0)
            np.testing.assert_array_equal(s["kspace"].numpy()[..., mask], vol.kspace[1][..., mask])
            np.testing.assert_array_equal(s["segmentation"].numpy(), vol.labels[1])
            masks.append(mask)
    assert not np.array_equal(masks[0], masks[1])  # seeded by file name
    # Reproducible: the same command gives the same mask.
    assert main([*args, "--quiet", "--acceleration", "4", "--center-fraction", "0.08"]) == 0
    with FastMRIFile(root / "4x" / "a.h5") as f:
        np.testing.assert_array_equal(f.read_slice(0)["mask"].numpy(), masks[0])


@pytest.mark.slow
def test_reconstruct_sense_beats_zero_filled(dataset):
    root, vol = dataset
    src = root / "und" / "a.h5"
    assert (
        main(
            [
                "undersample",
                str(root / "full" / "a.h5"),
                str(src),
                "--mask",
                "equispaced_fraction",
                "--quiet",
            ]
        )
        == 0
    )
    scores = {}
    for method in ("zf", "sense"):
        out = root / "recon" / f"{method}.h5"
        assert main(["reconstruct", str(src), str(out), "--method", method, "--quiet"]) == 0
        with h5py.File(out) as f:
            recon = f["reconstruction"][()]
            assert "kscan_provenance" in f.attrs
        assert recon.shape == vol.target.shape
        scores[method] = reconstruction_metrics(vol.target, recon)["ssim"]
    assert scores["sense"] > scores["zf"]


def test_reconstruct_bad_input(dataset, tmp_path, capsys):
    root, _ = dataset
    assert (
        main(["reconstruct", str(tmp_path / "missing.h5"), str(tmp_path / "o.h5"), "--quiet"]) == 2
    )
    err = capsys.readouterr().err
    assert "missing.h5" in err and err.count("\n") == 1
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    assert main(["reconstruct", str(bad), str(tmp_path / "o.h5"), "--quiet"]) == 2
    assert "bad.h5" in capsys.readouterr().err
    full = str(root / "full" / "a.h5")
    assert main(["reconstruct", full, str(tmp_path / "o.h5"), "--maps", "file", "--quiet"]) == 2
    assert "sensitivity_map" in capsys.readouterr().err
    assert not (tmp_path / "o.h5").exists()


def test_reconstruct_to_nifti_and_dicom(dataset, tmp_path):
    from kscan.pipelines.io.dicom import read_series
    from kscan.pipelines.io.nifti import nifti_array_to_volume, read_nifti

    root, vol = dataset
    src = str(root / "full" / "b.h5")
    assert main(["reconstruct", src, str(tmp_path / "b.nii.gz"), "--method", "zf", "--quiet"]) == 0
    nifti = read_nifti(tmp_path / "b.nii.gz")
    volume = nifti_array_to_volume(nifti.array)
    assert volume.shape == vol.target.shape
    # Fully sampled zero-filled SENSE combination with ESPIRiT maps is close to the RSS target.
    assert reconstruction_metrics(vol.target, volume)["ssim"] > 0.9
    assert (tmp_path / "b.json").is_file()
    assert (
        main(
            [
                "reconstruct",
                src,
                str(tmp_path / "series"),
                "--method",
                "zf",
                "--format",
                "dicom",
                "--quiet",
            ]
        )
        == 0
    )
    series = read_series(tmp_path / "series" / "b")
    np.testing.assert_allclose(series.affine, nifti.affine, atol=1e-4)
    np.testing.assert_allclose(series.array, nifti.array, atol=1e-3 * float(nifti.array.max()))


def test_nan_kspace_error_names_the_file(tmp_path, capsys):
    vol = simulate_volume((96, 80), (64, 64), slices=1, coils=4, seed=0)
    path = tmp_path / "nan.h5"
    write_fastmri(path, vol.kspace, vol.target)
    with h5py.File(path, "r+") as f:
        f["kspace"][0, 0, 3, 3] = np.nan
    assert main(["reconstruct", str(path), str(tmp_path / "o.h5"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "NaN" in err
