"""kscan reconstruct --segment: multitask models write the image and the labels."""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from kscan.models import registry
from kscan.pipelines.checkpoint import save_checkpoint
from kscan.pipelines.cli import main
from kscan.pipelines.io.dicom_seg import read_segmentation
from kscan.pipelines.io.fastmri import write_fastmri
from kscan.pipelines.io.nifti import nifti_array_to_volume
from kscan.pipelines.model_inference import Reconstructor
from kscan.pipelines.synthetic import simulate_volume

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["background", "a", "b", "c"]
JOINT = {
    "rvn": {
        "learned_sensitivity": False,
        "network": {"num_steps": 2, "recurrent_hidden_channels": 4, "recurrent_num_layers": 1},
    },
    "num_classes": 4,
    "head": "unet",
    "head_config": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "cascades": 2,
}


def joint_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = registry.build_model("joint-rvn-seg", JOINT).eval()
    with torch.no_grad():  # a head that is far from uniform, so every class appears
        for p in model.heads.parameters():
            p.mul_(8)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    vol = simulate_volume((80, 64), (64, 64), slices=3, coils=4, snr_db=40, seed=1)
    write_fastmri(root / "full" / "a.h5", vol.kspace, vol.target)
    args = ["undersample", str(root / "full"), str(root / "4x"), "--mask", "equispaced_fraction"]
    assert main([*args, "--quiet"]) == 0
    meta = {"class_names": NAMES}
    ckpt = save_checkpoint(root / "joint.safetensors", "joint-rvn-seg", joint_model(), meta=meta)
    return root, ckpt


def direct_call(model, path):
    """The model on the file's masked k-space and mask; image and argmax labels, centre 64x64."""
    with h5py.File(path) as f:
        kspace = torch.from_numpy(f["kspace"][()])
        mask = torch.from_numpy(f["mask"][()]).float()
    with torch.no_grad():
        output = model(kspace * mask, mask.reshape(1, 1, 1, -1))
    top = (kspace.shape[-2] - 64) // 2
    image = output.image_iterates[-1][:, top : top + 64].numpy()
    labels = output.seg_logits[-1].argmax(dim=1)[:, top : top + 64].numpy()
    return image, labels


def run(data, out, *extra):
    root, ckpt = data
    args = ["reconstruct", str(root / "4x" / "a.h5"), str(out), "--method", "joint-rvn-seg"]
    return main([*args, "--checkpoint", str(ckpt), "--batch-size", "2", "--quiet", *extra])


def test_h5_holds_the_image_and_the_model_labels(data, tmp_path):
    root, _ = data
    assert run(data, tmp_path / "a.h5", "--segment") == 0
    with h5py.File(tmp_path / "a.h5") as f:
        recon, labels = f["reconstruction"][()], f["segmentation"][()]
        record = json.loads(f.attrs["kscan_provenance"])
    image, expected = direct_call(joint_model(), root / "4x" / "a.h5")
    assert labels.dtype == np.uint8 and labels.shape == (3, 64, 64)
    np.testing.assert_array_equal(labels, expected)
    assert len(np.unique(labels)) > 1
    np.testing.assert_allclose(recon, image, rtol=1e-4, atol=1e-5 * float(image.max()))
    assert record["parameters"]["class_names"] == {str(i): n for i, n in enumerate(NAMES)}
    assert record["parameters"]["segment"] is True
    # without --segment: the image only
    assert run(data, tmp_path / "b.h5") == 0
    with h5py.File(tmp_path / "b.h5") as f:
        assert list(f) == ["reconstruction"]
        np.testing.assert_array_equal(f["reconstruction"][()], recon)


def test_nifti_output_gets_a_label_nifti_with_sidecar(data, tmp_path):
    root, _ = data
    assert run(data, tmp_path / "a.nii.gz", "--segment") == 0
    labels = nifti_array_to_volume(np.asarray(nib.load(tmp_path / "a_labels.nii.gz").dataobj))
    image = nib.load(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(labels, direct_call(joint_model(), root / "4x" / "a.h5")[1])
    np.testing.assert_array_equal(nib.load(tmp_path / "a_labels.nii.gz").affine, image.affine)
    sidecar = json.loads((tmp_path / "a_labels.json").read_text())
    assert sidecar["model"] == "joint-rvn-seg" and sidecar["parameters"]["class_names"]["3"] == "c"
    assert run(data, tmp_path / "plain.nii.gz") == 0
    assert not (tmp_path / "plain_labels.nii.gz").exists()


@pytest.mark.slow
def test_dicom_output_gets_a_seg_referencing_the_series(data, tmp_path):
    root, _ = data
    assert run(data, tmp_path / "out", "--segment", "--format", "dicom") == 0
    seg = read_segmentation(tmp_path / "out" / "a_seg.dcm")
    expected = direct_call(joint_model(), root / "4x" / "a.h5")[1]
    np.testing.assert_array_equal(seg.labels, expected)
    assert {k: v for k, v in seg.class_names.items() if k in np.unique(expected)} == {
        k: NAMES[k] for k in np.unique(expected) if k > 0
    }
    assert (tmp_path / "out" / "a_labels.nii.gz").is_file()


def test_segment_needs_a_multitask_model(data, tmp_path, capsys):
    root, _ = data
    args = ["reconstruct", str(root / "4x" / "a.h5"), str(tmp_path / "x.h5"), "--segment"]
    for method in ("rvn", "sense"):
        assert main([*args, "--method", method, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--segment: needs a multitask model" in err
        assert "joint-rvn-seg" in err and f"--method {method} only reconstructs" in err


def test_uncentered_model_labels_are_shifted_like_the_image():
    torch.manual_seed(0)
    config = {"coils": 2, "num_classes": 3, "num_filters": 4, "num_pool_layers": 2}
    model = registry.build_model("idslr", config | {"iterations": 1, "centered": False}).eval()
    gen = torch.Generator().manual_seed(0)
    kspace = torch.randn(2, 2, 16, 12, dtype=torch.complex64, generator=gen)
    mask = torch.zeros(12)
    mask[::3] = 1
    mask[5:8] = 1
    kspace = kspace * mask
    solve = Reconstructor("idslr", model, checkpoint=None, segment=True)
    with torch.no_grad():
        output = model(
            torch.fft.ifftshift(kspace, dim=(-2, -1)),
            torch.fft.ifftshift(mask).reshape(1, 1, 1, -1),
        )
    image, labels = solve(kspace, mask)
    shift = (-2, -1)
    torch.testing.assert_close(image, torch.fft.fftshift(output.image_iterates[-1], dim=shift))
    expected = torch.fft.fftshift(output.seg_logits[-1].argmax(dim=1), dim=shift)
    assert torch.equal(labels, expected)
    plain = Reconstructor("idslr", model, checkpoint=None)(kspace, mask)
    torch.testing.assert_close(plain, image)
