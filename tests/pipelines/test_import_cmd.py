"""kscan import-checkpoint: DIRECT and fastMRI layouts to kscan checkpoints, outputs unchanged."""

import hashlib

import pytest
import torch

from kscan.errors import ConfigError
from kscan.models import registry
from kscan.models.checkpoints import import_direct, import_fastmri_varnet
from kscan.models.recurrentvarnet import RecurrentVarNet, RecurrentVarNetConfig
from kscan.models.sensitivity import SensitivityModel
from kscan.physics.coilmaps import acs_maps
from kscan.pipelines.checkpoint import load_model
from kscan.pipelines.cli import main
from kscan.pipelines.import_cmd import import_checkpoint


def direct_layout(config: RecurrentVarNetConfig, seed: int = 0) -> dict:
    """Random weights laid out as DIRECT's checkpointer saves them (DataParallel prefix included)."""
    torch.manual_seed(seed)
    network, sensitivity = RecurrentVarNet(config), SensitivityModel(4, 2)
    return {
        "model": {f"module.{k}": v for k, v in network.state_dict().items()},
        "sensitivity_model": {f"module.{k}": v for k, v in sensitivity.unet.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
        "iteration": 500,
    }


def inputs(centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(16)
    mask[::3] = 1
    mask[6:10] = 1
    if not centered:
        mask = torch.fft.ifftshift(mask)
    gen = torch.Generator().manual_seed(3)
    kspace = torch.randn(2, 3, 20, 16, dtype=torch.complex64, generator=gen) * mask
    return kspace, mask.reshape(1, 1, 1, -1)


@pytest.mark.parametrize(
    ("config", "options"),
    [
        (
            RecurrentVarNetConfig(
                num_steps=2,
                recurrent_hidden_channels=4,
                recurrent_num_layers=2,
                learned_initializer=True,
                initializer_channels=(3, 3, 4, 4),
            ),
            [],
        ),
        (
            RecurrentVarNetConfig(
                num_steps=3,
                recurrent_hidden_channels=4,
                recurrent_num_layers=1,
                no_parameter_sharing=False,
                normalized=True,
                centered=False,
            ),
            ["--uncentered", "--num-steps", "3"],
        ),
    ],
)
def test_direct_round_trip(config, options, tmp_path, capsys) -> None:
    src, dst = tmp_path / "model_500.pt", tmp_path / "rvn.safetensors"
    torch.save(direct_layout(config), src)
    assert main(["import-checkpoint", str(src), str(dst), "--format", "direct", *options]) == 0
    assert "rvn" in capsys.readouterr().out
    model, checkpoint = load_model(dst, task="reconstruction")
    assert checkpoint.model == "rvn" and model.config.network == config
    imported = checkpoint.meta["imported_from"]
    assert imported["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert imported["ignored_entries"] == ["iteration", "optimizer"] and imported["stripped_prefix"]
    # The same output as import_direct's models, run as DIRECT's engine runs them.
    network, sensitivity, _ = import_direct(
        src, centered=config.centered, num_steps=config.num_steps
    )
    kspace, mask = inputs(config.centered)
    with torch.no_grad():
        maps = sensitivity(acs_maps(kspace, mask=mask, centered=config.centered))
        expected = network(kspace, mask, maps)
        assert torch.equal(model(kspace, mask), expected)


def test_fastmri_varnet_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    config = {"num_cascades": 2, "chans": 2, "pools": 1, "sens_chans": 2, "sens_pools": 1}
    src, dst = tmp_path / "varnet.pt", tmp_path / "varnet.safetensors"
    torch.save(registry.build_model("varnet", config).state_dict(), src)
    name, _, _ = import_checkpoint(src, dst, "fastmri-varnet")
    model, checkpoint = load_model(dst)
    assert name == checkpoint.model == "varnet"
    expected_model, _ = import_fastmri_varnet(src)
    kspace, mask = inputs(True)
    with torch.no_grad():
        assert torch.equal(model(kspace, mask), expected_model(kspace, mask))


def test_bad_sources(tmp_path, capsys) -> None:
    src = tmp_path / "notes.pt"
    src.write_bytes(b"not a torch file")
    dst = tmp_path / "out.safetensors"
    assert main(["import-checkpoint", str(src), str(dst), "--format", "direct"]) == 2
    err = capsys.readouterr().err
    assert "notes.pt" in err and err.count("\n") == 1 and not dst.exists()
    with pytest.raises(ConfigError, match="--num-steps"):
        import_checkpoint(src, dst, "fastmri-varnet", num_steps=3)
    with pytest.raises(ConfigError, match="--format"):
        import_checkpoint(src, dst, "nnunet")
