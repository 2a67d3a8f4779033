"""``kscan evaluate``: pairing by stem, axis conventions, metrics against skimage/numpy, CSV, errors.

Volumes are ``(slices, H, W)`` with ``H != W`` so that a wrong NIfTI transposition shows up as a
shape mismatch. Reconstruction metrics are checked against scikit-image's SSIM and PSNR with
fastMRI's settings (what fastMRI's ``evaluate.py`` calls) and NMSE in numpy; Dice in numpy.
"""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kscan.pipelines.cli import main
from kscan.pipelines.io.fastmri import write_fastmri
from kscan.pipelines.io.nifti import volume_to_nifti_array, write_nifti

S, H, W = 3, 32, 24


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["evaluate", *map(str, args), "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


def image(seed: int) -> np.ndarray:
    """A smooth positive volume ``(S, H, W)`` (blurred noise plus a bright rectangle)."""
    rng = np.random.default_rng(seed)
    x = rng.random((S, H, W))
    x = (x + np.roll(x, 1, -1) + np.roll(x, 1, -2) + np.roll(x, (1, 1), (-2, -1))) / 4
    x[:, 8:20, 6:14] += 1.5
    return x.astype(np.float32)


def labels(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((S, H, W), dtype=np.uint8)
    out[:, 8:20, 6:14] = 1
    out[:, 22:28, 4:20] = 2
    out[rng.random((S, H, W)) < 0.02] = 0
    return out


def write_target(path, volume: np.ndarray, segmentation: np.ndarray | None = None):
    """A fastMRI multi-coil file whose ``reconstruction_rss`` is ``volume``."""
    kspace = np.random.default_rng(0).standard_normal((S, 2, H, W)).astype(np.complex64)
    return write_fastmri(path, kspace, volume, segmentation=segmentation)


def write_nifti_prediction(path, volume: np.ndarray, zooms=(1.0, 1.0, 1.0)):
    return write_nifti(path, volume_to_nifti_array(volume), np.diag([*zooms, 1.0]))


def write_h5_prediction(path, volume: np.ndarray):
    with h5py.File(path, "w") as f:
        f.create_dataset("reconstruction", data=volume)
    return path


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fastmri_reference(target: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """fastMRI's volume metrics computed with scikit-image and numpy."""
    t, p = target.astype(np.float64), pred.astype(np.float64)
    top = t.max()
    ssim = np.mean([structural_similarity(a, b, data_range=top) for a, b in zip(t, p, strict=True)])
    return {
        "ssim": float(ssim),
        "psnr": peak_signal_noise_ratio(t, p, data_range=top),
        "nmse": float(np.sum((t - p) ** 2) / np.sum(t**2)),
    }


@pytest.fixture
def dataset(tmp_path):
    """targets/{a,b}.h5; predictions/a.nii.gz (NIfTI) and b.h5 (submission layout), both noisy."""
    rng = np.random.default_rng(7)
    (tmp_path / "targets").mkdir()
    (tmp_path / "predictions").mkdir()
    volumes = {}
    for name, seed, sigma in (("a", 1, 0.05), ("b", 2, 0.2)):
        target = image(seed)
        pred = (target + sigma * rng.standard_normal(target.shape)).astype(np.float32)
        write_target(tmp_path / "targets" / f"{name}.h5", target, labels(seed))
        volumes[name] = (target, pred)
    write_nifti_prediction(tmp_path / "predictions" / "a.nii.gz", volumes["a"][1])
    write_h5_prediction(tmp_path / "predictions" / "b.h5", volumes["b"][1])
    return tmp_path, volumes


def test_metrics_match_skimage_and_csv_has_rows_and_mean(dataset, capsys):
    root, volumes = dataset
    out_csv = root / "metrics.csv"
    code, out, err = run(capsys, root / "predictions", root / "targets", "--csv", out_csv)
    assert code == 0 and err == ""
    rows = read_csv(out_csv)
    assert list(rows[0]) == ["prediction", "target", "slices", "ssim", "psnr", "nmse"]
    assert [(r["prediction"], r["target"]) for r in rows] == [
        ("a.nii.gz", "a.h5"),
        ("b.h5", "b.h5"),
        ("mean", ""),
    ]
    for row, name in zip(rows, "ab", strict=False):
        expected = fastmri_reference(*volumes[name])
        assert int(row["slices"]) == S
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-6)
        assert 0 < float(row["ssim"]) < 1
    assert float(rows[0]["ssim"]) > float(rows[1]["ssim"])  # less noise, higher SSIM
    for key in ("ssim", "psnr", "nmse"):
        assert float(rows[2][key]) == pytest.approx((float(rows[0][key]) + float(rows[1][key])) / 2)
    assert "mean" in out and "SSIM" in out and f"wrote {out_csv}" in out
    assert not [p for p in root.iterdir() if p.name.startswith(".metrics")]  # no temporary left


def test_single_files_and_calgary_convention(dataset, capsys):
    root, volumes = dataset
    out_csv = root / "one.csv"
    args = (root / "predictions" / "a.nii.gz", root / "targets" / "a.h5", "--csv", out_csv)
    assert run(capsys, *args, "--convention", "calgary")[0] == 0
    row = read_csv(out_csv)[0]
    target, pred = (v.astype(np.float64) for v in volumes["a"])
    # Calgary-Campinas: per-slice data range max(t, p) - min(t, p), means over slices
    ranges = [
        max(t.max(), p.max()) - min(t.min(), p.min()) for t, p in zip(target, pred, strict=True)
    ]
    ssim = np.mean(
        [
            structural_similarity(t, p, data_range=r)
            for t, p, r in zip(target, pred, ranges, strict=True)
        ]
    )
    psnr = np.mean(
        [
            peak_signal_noise_ratio(t, p, data_range=r)
            for t, p, r in zip(target, pred, ranges, strict=True)
        ]
    )
    assert float(row["ssim"]) == pytest.approx(ssim, rel=1e-6)
    assert float(row["psnr"]) == pytest.approx(psnr, rel=1e-6)


def test_identical_volumes_calgary(tmp_path, capsys):
    target = image(4)
    write_target(tmp_path / "t.h5", target)
    write_nifti_prediction(tmp_path / "p.nii", target)
    assert (
        run(
            capsys,
            tmp_path / "p.nii",
            tmp_path / "t.h5",
            "--csv",
            tmp_path / "m.csv",
            "--convention",
            "calgary",
        )[0]
        == 0
    )
    row = read_csv(tmp_path / "m.csv")[0]
    assert float(row["ssim"]) == pytest.approx(1.0) and float(row["nmse"]) == 0.0
    assert row["psnr"] == "inf"


def test_identical_volumes_fastmri(tmp_path, capsys):
    target = image(4)
    write_target(tmp_path / "t.h5", target)
    write_nifti_prediction(tmp_path / "p.nii", target)
    assert run(capsys, tmp_path / "p.nii", tmp_path / "t.h5", "--csv", tmp_path / "m.csv")[0] == 0
    row = read_csv(tmp_path / "m.csv")[0]
    assert float(row["ssim"]) == pytest.approx(1.0) and float(row["nmse"]) == 0.0
    assert row["psnr"] == "inf"


def test_labels_dice_against_numpy(dataset, capsys):
    root, _ = dataset
    target_labels = labels(1)
    pred_labels = target_labels.copy()
    pred_labels[:, 8:20, 6:8] = 2  # two columns of class 1 predicted as class 2
    write_nifti_prediction(root / "predictions" / "a_labels.nii.gz", pred_labels)
    out_csv = root / "labels.csv"
    assert run(capsys, root / "predictions", root / "targets", "--labels", "--csv", out_csv)[0] == 0
    rows = read_csv(out_csv)
    assert [r["prediction"] for r in rows] == ["a.nii.gz", "b.h5", "mean"]
    for c in (1, 2):
        t, p = target_labels == c, pred_labels == c
        assert float(rows[0][f"dice_{c}"]) == pytest.approx(
            2 * (t & p).sum() / (t.sum() + p.sum()), rel=1e-6
        )
        assert float(rows[0][f"iou_{c}"]) == pytest.approx((t & p).sum() / (t | p).sum(), rel=1e-6)
        assert rows[1][f"dice_{c}"] == ""  # b's prediction has no labels
        assert rows[2][f"dice_{c}"] == rows[0][f"dice_{c}"]  # the mean of one value
    assert float(rows[0]["dice_1"]) < 1


def test_hd95_uses_the_target_nifti_voxel_size(tmp_path, capsys):
    zooms = (0.7, 1.1, 3.0)  # (i, j, k) = (W, H, slices)
    target = np.zeros((S, H, W), dtype=np.uint8)
    target[:, 10:20, 5:7] = 1
    pred = np.roll(target, 1, axis=-1)  # shifted by one column: 1 voxel along W
    for folder, lab, seed in (("t", target, 0), ("p", pred, 1)):
        (tmp_path / folder).mkdir()
        write_nifti_prediction(tmp_path / folder / "v.nii.gz", image(seed), zooms)
        write_nifti_prediction(tmp_path / folder / "v_labels.nii.gz", lab, zooms)
    assert (
        run(capsys, tmp_path / "p", tmp_path / "t", "--labels", "--csv", tmp_path / "m.csv")[0] == 0
    )
    row = read_csv(tmp_path / "m.csv")[0]
    assert float(row["hd95_1"]) == pytest.approx(0.7)
    assert float(row["dice_1"]) == pytest.approx(0.5)


def test_hd95_uses_the_hdf5_targets_header_voxel_size(tmp_path, capsys):
    """A fastMRI target's labels are in its recon grid: HD95 in mm from the header's recon field
    of view over the recon matrix, ``(dH, dW, dZ) = (0.7, 1.1, 3.0)``."""
    target = np.zeros((S, H, W), dtype=np.uint8)
    target[:, 10:20, 5:7] = 1
    pred = np.roll(target, 1, axis=-1)  # shifted by one column: 1 voxel along W
    kspace = np.random.default_rng(0).standard_normal((S, 2, H, W)).astype(np.complex64)
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    write_fastmri(
        tmp_path / "t" / "v.h5",
        kspace,
        image(0),
        segmentation=target,
        voxel_size_mm=(0.7, 1.1, 3.0),
    )
    write_nifti_prediction(tmp_path / "p" / "v.nii.gz", image(1))
    write_nifti_prediction(tmp_path / "p" / "v_labels.nii.gz", pred)
    assert (
        run(capsys, tmp_path / "p", tmp_path / "t", "--labels", "--csv", tmp_path / "m.csv")[0] == 0
    )
    row = read_csv(tmp_path / "m.csv")[0]
    assert float(row["hd95_1"]) == pytest.approx(1.1)
    assert float(row["dice_1"]) == pytest.approx(0.5)


def test_missing_pairs_are_listed(dataset, capsys):
    root, volumes = dataset
    write_target(root / "targets" / "c.h5", volumes["a"][0])
    write_h5_prediction(root / "predictions" / "d.h5", volumes["a"][1])
    code, out, err = run(capsys, root / "predictions", root / "targets", "--csv", root / "m.csv")
    assert code == 2 and err.count("\n") == 1 and out == ""
    assert str(root / "targets" / "c.h5") in err and str(root / "predictions" / "d.h5") in err
    assert "--allow-missing" in err and not (root / "m.csv").exists()

    code, out, err = run(
        capsys, root / "predictions", root / "targets", "--allow-missing", "--csv", root / "m.csv"
    )
    assert code == 0 and "c.h5" in err and "d.h5" in err
    assert [r["prediction"] for r in read_csv(root / "m.csv")] == ["a.nii.gz", "b.h5", "mean"]


def test_shape_mismatch_names_both_files(dataset, capsys):
    root, volumes = dataset
    target = root / "targets" / "a.h5"
    cropped = write_h5_prediction(root / "cropped.h5", volumes["a"][1][:, :, 2:])
    # A NIfTI written as (slices, H, W) without kscan's transposition has the wrong axes.
    untransposed = write_nifti(root / "raw.nii.gz", volumes["a"][1], np.eye(4))
    for pred in (cropped, untransposed):
        code, _, err = run(capsys, pred, target)
        assert code == 2 and err.count("\n") == 1
        assert str(pred) in err and str(target) in err


def test_bad_inputs_exit_2(dataset, capsys):
    root, volumes = dataset
    no_key = write_h5_prediction(root / "targets_wrong.h5", volumes["a"][0])
    cases = [
        ((root / "predictions" / "b.h5", no_key), "'reconstruction_rss' or 'reconstruction_esc'"),
        (
            (
                root / "predictions" / "b.h5",
                root / "targets" / "b.h5",
                "--key",
                "reconstruction_esc",
            ),
            "reconstruction_esc",
        ),
        ((root / "nowhere", root / "targets"), "nowhere"),
    ]
    for args, text in cases:
        code, _, err = run(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and text in err


def test_labels_only_scores_the_labels_alone(dataset, capsys):
    """Image inputs are their own target: no SSIM/PSNR/NMSE columns, the same label scores as
    --labels, and a pair without labels on both sides is an error naming the file."""
    root, _ = dataset
    pred_labels = labels(1)
    pred_labels[:, 8:20, 6:8] = 2
    write_nifti_prediction(root / "predictions" / "a_labels.nii.gz", pred_labels)
    prediction, target = root / "predictions" / "a.nii.gz", root / "targets" / "a.h5"
    assert run(capsys, prediction, target, "--labels", "--csv", root / "both.csv")[0] == 0
    code, out, _ = run(capsys, prediction, target, "--labels-only", "--csv", root / "labels.csv")
    assert code == 0 and "SSIM" not in out
    both, only = read_csv(root / "both.csv"), read_csv(root / "labels.csv")
    assert list(only[0]) == ["prediction", "target", "slices", *[c for c in both[0] if "_" in c]]
    assert all(only[0][c] == both[0][c] for c in only[0])
    code, _, err = run(
        capsys, root / "predictions" / "b.h5", root / "targets" / "b.h5", "--labels-only"
    )
    assert code == 2 and err.count("\n") == 1
    assert "b.h5: --labels-only but no labels" in err


def test_crop_centre_crops_a_larger_prediction_and_its_labels(dataset, capsys):
    """A prediction padded to 36 x 29 around the 32 x 24 target (fastMRI's crop offsets
    (36 - 32) // 2 and (29 - 24) // 2) scores exactly like the unpadded one."""
    root, volumes = dataset
    target = root / "targets" / "a.h5"
    small = volumes["a"][1]
    big = np.pad(small, ((0, 0), (2, 2), (2, 3)), constant_values=9.0)
    big_labels = np.pad(labels(1), ((0, 0), (2, 2), (2, 3)), constant_values=1)
    write_nifti_prediction(root / "big.nii.gz", big)
    write_nifti_prediction(root / "big_labels.nii.gz", big_labels)
    write_nifti_prediction(root / "small.nii.gz", small)
    write_nifti_prediction(root / "small_labels.nii.gz", labels(1))
    for name in ("big", "small"):
        args = (
            root / f"{name}.nii.gz",
            target,
            "--labels",
            "--crop",
            "--csv",
            root / f"{name}.csv",
        )
        assert run(capsys, *args)[0] == 0
    big_row, small_row = read_csv(root / "big.csv")[0], read_csv(root / "small.csv")[0]
    assert {k: v for k, v in big_row.items() if k != "prediction"} == {
        k: v for k, v in small_row.items() if k != "prediction"
    }
    assert float(big_row["dice_1"]) == 1.0
    code, _, err = run(capsys, root / "big.nii.gz", target)
    assert code == 2 and "--crop centre-crops a larger prediction" in err
    narrow = write_nifti_prediction(root / "narrow.nii.gz", small[:, :, 2:])
    code, _, err = run(capsys, narrow, target, "--crop")
    assert code == 2 and "at least as large" in err and str(narrow) in err
