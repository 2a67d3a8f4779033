"""kscan reconstruct --method rvn|varnet on small simulated fastMRI-layout files."""

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch

from kscan.config import to_mapping
from kscan.errors import ConfigError, ShapeError
from kscan.models import registry
from kscan.pipelines import checkpoint as checkpoint_module
from kscan.pipelines.checkpoint import save_checkpoint
from kscan.pipelines.cli import main
from kscan.pipelines.io.fastmri import write_fastmri
from kscan.pipelines.model_inference import Reconstructor, load_reconstructor, model_layout_mask
from kscan.pipelines.reconstruct import ReconSettings
from kscan.pipelines.synthetic import simulate_volume

TINY_RVN = {
    "network": {"num_steps": 2, "recurrent_hidden_channels": 4, "recurrent_num_layers": 1},
    "sensitivity_filters": 4,
    "sensitivity_pools": 2,
}


def tiny_rvn(seed: int = 0, **network) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = TINY_RVN | {"network": TINY_RVN["network"] | network}
    return registry.build_model("rvn", config).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    vol = simulate_volume((80, 64), (64, 64), slices=3, coils=4, snr_db=40, seed=1)
    write_fastmri(root / "full" / "a.h5", vol.kspace, vol.target)
    args = ["undersample", str(root / "full"), str(root / "4x"), "--mask", "equispaced_fraction"]
    assert main([*args, "--quiet"]) == 0
    ckpt = save_checkpoint(root / "rvn.safetensors", "rvn", tiny_rvn())
    return root, ckpt


def direct_call(model: torch.nn.Module, path) -> np.ndarray:
    """The model on the file's masked k-space and mask, cropped to 64 x 64, by hand."""
    with h5py.File(path) as f:
        kspace = torch.from_numpy(f["kspace"][()])
        mask = torch.from_numpy(f["mask"][()]).float()
    with torch.no_grad():
        image = model.image(model(kspace * mask, mask.reshape(1, 1, 1, -1)))
    top = (image.shape[-2] - 64) // 2
    return image[:, top : top + 64, :].numpy()


def test_output_equals_the_model_called_directly_and_provenance(data, tmp_path):
    root, ckpt = data
    src, out = root / "4x" / "a.h5", tmp_path / "a.h5"
    args = ["reconstruct", str(src), str(out), "--method", "rvn", "--checkpoint", str(ckpt)]
    assert main([*args, "--batch-size", "2", "--quiet"]) == 0
    with h5py.File(out) as f:
        recon = f["reconstruction"][()]
        record = json.loads(f.attrs["kscan_provenance"])
    expected = direct_call(tiny_rvn(), src)
    assert recon.shape == (3, 64, 64)
    np.testing.assert_allclose(recon, expected, rtol=1e-4, atol=1e-5 * float(expected.max()))
    assert record["model"] == "rvn"
    assert record["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["parameters"]["model_config"] == to_mapping(tiny_rvn().config)
    assert record["parameters"]["checkpoint"] == str(ckpt)
    assert "lam" not in record["parameters"] and "maps" not in record["parameters"]


def test_uncentered_model_gets_shifted_kspace_and_mask() -> None:
    model = tiny_rvn(seed=2, centered=False)
    gen = torch.Generator().manual_seed(0)
    kspace = torch.randn(2, 3, 16, 12, dtype=torch.complex64, generator=gen)
    mask = torch.zeros(12)
    mask[::3] = 1
    mask[5:8] = 1
    kspace = kspace * mask
    solve = Reconstructor("rvn", model, checkpoint=None)  # the solve does not read the checkpoint
    with torch.no_grad():
        shifted = model(
            torch.fft.ifftshift(kspace, dim=(-2, -1)),
            torch.fft.ifftshift(mask).reshape(1, 1, 1, -1),
        )
        expected = torch.fft.fftshift(model.image(shifted), dim=(-2, -1))
    torch.testing.assert_close(solve(kspace, mask), expected)


def test_model_layout_mask() -> None:
    kspace = torch.zeros(1, 2, 6, 8, dtype=torch.complex64)
    assert model_layout_mask(torch.ones(8), kspace).shape == (1, 1, 1, 8)
    assert model_layout_mask(torch.ones(1, 8), kspace).shape == (1, 1, 1, 8)
    assert model_layout_mask(torch.ones(6, 8), kspace).shape == (1, 1, 6, 8)
    for bad in (torch.ones(7), torch.ones(5, 8), torch.ones(1, 1, 8)):
        with pytest.raises(ShapeError, match="does not fit k-space"):
            model_layout_mask(bad, kspace)


def test_settings_reject_options_of_the_other_kind() -> None:
    with pytest.raises(ConfigError, match="--lam"):
        ReconSettings(method="rvn", lam=0.1)
    with pytest.raises(ConfigError, match="--maps"):
        ReconSettings(method="rvn", maps="espirit")
    with pytest.raises(ConfigError, match="--checkpoint: only for the learned"):
        ReconSettings(method="sense", checkpoint="x.safetensors")
    with pytest.raises(ConfigError, match="--method"):
        ReconSettings(method="unet9000")
    assert ReconSettings(method="rvn").learned and not ReconSettings().learned
    assert ReconSettings(method="rvn").batch_size == 1 and ReconSettings().batch_size == 4


def test_checkpoint_errors(data, tmp_path, capsys, monkeypatch):
    root, ckpt = data
    src, out = str(root / "4x" / "a.h5"), str(tmp_path / "o.h5")

    def run(checkpoint, method="rvn") -> str:
        args = ["reconstruct", src, out, "--method", method, "--quiet"]
        assert main([*args, *(["--checkpoint", str(checkpoint)] if checkpoint else [])]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    # A checkpoint of another model.
    torch.manual_seed(0)
    varnet = registry.build_model(
        "varnet", {"num_cascades": 1, "chans": 2, "pools": 1, "sens_chans": 2, "sens_pools": 1}
    )
    other = save_checkpoint(tmp_path / "varnet.safetensors", "varnet", varnet)
    err = run(other)
    assert "'varnet' model" in err and "--method rvn" in err
    # Weights of another architecture under this config: the keys are named.
    model = tiny_rvn(recurrent_num_layers=2)
    model.config = tiny_rvn().config
    wrong = save_checkpoint(tmp_path / "wrong.safetensors", "rvn", model)
    err = run(wrong)
    assert "wrong.safetensors" in err and "unexpected keys" in err and "reset_gates.1" in err
    # A DIRECT .pt file.
    direct = tmp_path / "model_1000.pt"
    torch.save({"model": tiny_rvn().model.state_dict()}, direct)
    err = run(direct)
    assert "model_1000.pt" in err and "kscan import-checkpoint" in err
    # No checkpoint and no shipped weights.
    monkeypatch.setattr(checkpoint_module, "WEIGHTS_DIR", tmp_path / "no_weights")
    assert "no weights are shipped for model 'rvn'" in run(None)
    with pytest.raises(ConfigError, match="no weights are shipped"):
        load_reconstructor("rvn", None)
    assert not (tmp_path / "o.h5").exists()


def test_bad_mask_width_and_coil_maps_name_the_file(data, tmp_path, capsys):
    root, ckpt = data
    bad_mask, bad_maps = tmp_path / "bad_mask.h5", tmp_path / "bad_maps.h5"
    for path in (bad_mask, bad_maps):
        path.write_bytes((root / "4x" / "a.h5").read_bytes())
    with h5py.File(bad_mask, "a") as f:
        del f["mask"]
        f["mask"] = np.ones(66, dtype=bool)
    with h5py.File(bad_maps, "a") as f:
        f["sensitivity_map"] = np.ones((3, 3, 80, 64), dtype=np.complex64)
    for path, fragment in ((bad_mask, "'mask'"), (bad_maps, "'sensitivity_map'")):
        for method in (["rvn", "--checkpoint", str(ckpt)], ["sense", "--maps", "file"]):
            args = ["reconstruct", str(path), str(tmp_path / "o.h5"), "--method", *method]
            assert main([*args, "--quiet"]) == 2
            err = capsys.readouterr().err
            assert path.name in err and fragment in err and err.count("\n") == 1
