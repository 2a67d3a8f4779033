"""Import of DIRECT-layout checkpoints: round trips, config inference, corrupted files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from kscan.errors import ConfigError, FileFormatError
from kscan.models.checkpoints import import_direct, infer_config
from kscan.models.recurrentvarnet import RecurrentVarNet, RecurrentVarNetConfig
from kscan.models.sensitivity import SensitivityModel
from kscan.physics.coilmaps import acs_maps

CONFIGS = {
    "initializer_multiscale": RecurrentVarNetConfig(
        num_steps=3,
        recurrent_hidden_channels=6,
        recurrent_num_layers=2,
        learned_initializer=True,
        initializer_channels=(4, 4, 6, 6),
        initializer_multiscale=3,
    ),
    "normalized_uncentered": RecurrentVarNetConfig(
        num_steps=2,
        recurrent_hidden_channels=5,
        recurrent_num_layers=3,
        normalized=True,
        centered=False,
    ),
    "shared_parameters": RecurrentVarNetConfig(
        num_steps=3, recurrent_hidden_channels=4, recurrent_num_layers=1, no_parameter_sharing=False
    ),
    "zero_filled_single_scale": RecurrentVarNetConfig(
        num_steps=1,
        recurrent_hidden_channels=4,
        recurrent_num_layers=2,
        learned_initializer=True,
        initializer_initialization="zero_filled",
        initializer_channels=(3, 5),
        initializer_dilations=(1, 2),
    ),
}


def crandn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(seed))


def direct_checkpoint(
    config: RecurrentVarNetConfig, seed: int = 0, prefix: str = ""
) -> tuple[RecurrentVarNet, SensitivityModel, dict]:
    """kscan models and a dict laid out as DIRECT's checkpointer saves it."""
    torch.manual_seed(seed)
    model, sensitivity = RecurrentVarNet(config).eval(), SensitivityModel(4, 2).eval()
    checkpoint = {
        "model": {prefix + k: v for k, v in model.state_dict().items()},
        "sensitivity_model": {prefix + k: v for k, v in sensitivity.unet.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
        "iteration": 1000,
    }
    return model, sensitivity, checkpoint


def save(checkpoint: object, tmp_path: Path, name: str = "model_1000.pt") -> Path:
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def reconstruct(model: RecurrentVarNet, sensitivity: SensitivityModel, centered: bool):
    mask = torch.zeros(16)
    mask[::3] = 1
    mask[6:10] = 1
    if not centered:
        mask = torch.fft.ifftshift(mask)
    kspace = crandn(1, 3, 16, 16, seed=5) * mask
    with torch.no_grad():
        maps = sensitivity(acs_maps(kspace, num_low_frequencies=4, centered=centered))
        return model(kspace, mask, maps)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("prefix", ["", "module."])
def test_round_trip_infers_config_and_reproduces_outputs(name: str, prefix: str, tmp_path) -> None:
    config = CONFIGS[name]
    model, sensitivity, checkpoint = direct_checkpoint(config, prefix=prefix)
    path = save(checkpoint, tmp_path)
    num_steps = config.num_steps if not config.no_parameter_sharing else None
    loaded, loaded_sensitivity, report = import_direct(
        path,
        centered=config.centered,
        num_steps=num_steps,
        initializer_dilations=config.initializer_dilations,
        initializer_initialization=config.initializer_initialization,
    )
    assert report.config == config
    assert report.sensitivity_filters == (4, 2)
    assert report.stripped_prefix == bool(prefix)
    assert report.ignored_entries == ("iteration", "optimizer")
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert loaded_sensitivity is not None and not loaded.training
    expected = reconstruct(model, sensitivity, config.centered)
    assert torch.equal(reconstruct(loaded, loaded_sensitivity, config.centered), expected)


def test_infers_direct_published_layouts() -> None:
    """DIRECT's model-zoo CC359 config (T=12, 128 hidden, 4 layers, multiscale 3), from shapes alone."""
    config = RecurrentVarNetConfig(
        num_steps=12,
        recurrent_hidden_channels=128,
        recurrent_num_layers=4,
        learned_initializer=True,
        initializer_multiscale=3,
        centered=False,
    )
    with torch.device("meta"):
        state = RecurrentVarNet(config).state_dict()
    assert infer_config(state, centered=False) == config


def test_without_sensitivity_model_and_with_shared_steps_given(tmp_path) -> None:
    config = CONFIGS["shared_parameters"]
    _, _, checkpoint = direct_checkpoint(config)
    del checkpoint["sensitivity_model"]
    path = save(checkpoint, tmp_path)
    model, sensitivity, report = import_direct(path, num_steps=3)
    assert sensitivity is None and report.sensitivity_filters is None
    assert model.config == config
    # Without num_steps a single block reads as one unshared step.
    assert import_direct(path)[2].config.num_steps == 1
    with pytest.raises(ConfigError, match="num_steps"):
        import_direct(
            save(direct_checkpoint(CONFIGS["normalized_uncentered"])[2], tmp_path), num_steps=5
        )


def assert_one_line_error(path: Path, *fragments: str, **kwargs) -> FileFormatError:
    with pytest.raises(FileFormatError) as info:
        import_direct(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message
    return info.value


def test_missing_and_unexpected_keys_are_named(tmp_path) -> None:
    _, _, checkpoint = direct_checkpoint(CONFIGS["initializer_multiscale"], prefix="module.")
    del checkpoint["model"]["module.block_list.1.regularizer.out_gates.0.0.bias"]
    path = save(checkpoint, tmp_path)
    assert_one_line_error(path, "1 missing keys", "block_list.1.regularizer.out_gates.0.0.bias")

    _, _, checkpoint = direct_checkpoint(CONFIGS["initializer_multiscale"])
    checkpoint["sensitivity_model"]["up_conv.9.weight"] = torch.zeros(1)
    path = save(checkpoint, tmp_path)
    assert_one_line_error(path, "'sensitivity_model'", "1 unexpected keys", "up_conv.9.weight")
    _, _, report = import_direct(path, strict=False, initializer_dilations=(1, 1, 2, 4))
    assert report.unexpected_keys == ["sensitivity_model.up_conv.9.weight"]
    assert report.missing_keys == []


def test_wrong_shape_is_named(tmp_path) -> None:
    _, _, checkpoint = direct_checkpoint(CONFIGS["normalized_uncentered"])
    checkpoint["model"]["block_list.1.learning_rate"] = torch.ones(2)
    path = save(checkpoint, tmp_path)
    assert_one_line_error(path, "'model'", "block_list.1.learning_rate", "(2,)", "expected (1,)")


def test_files_that_are_not_direct_checkpoints(tmp_path) -> None:
    assert_one_line_error(save(torch.zeros(3), tmp_path, "tensor.pt"), "found Tensor")
    assert_one_line_error(save({"state_dict": {}}, tmp_path, "other.pt"), "'model' entry")
    assert_one_line_error(save({"model": {"a": 1}}, tmp_path, "bad.pt"), "not a state dict")
    assert_one_line_error(
        save({"model": {"layer.weight": torch.zeros(1)}}, tmp_path, "net.pt"), "block_list"
    )
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\nsecond line\n")
    assert_one_line_error(text, "not a loadable torch checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(
        save(direct_checkpoint(CONFIGS["shared_parameters"])[2], tmp_path).read_bytes()[:500]
    )
    assert_one_line_error(truncated, "not a loadable torch checkpoint")
    assert_one_line_error(tmp_path / "absent.pt", "no such checkpoint file")


CALLS: list[str] = []


def _record_call(value: str) -> str:
    CALLS.append(value)
    return value


class CodeOnLoad:
    """Pickles as a call to :func:`_record_call`: a file that would run code if unpickled fully."""

    def __reduce__(self):
        return _record_call, ("ran",)


def test_code_in_the_file_is_never_executed(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": CodeOnLoad()}, path, pickle_module=pickle)
    assert_one_line_error(path, "not a loadable torch checkpoint")
    assert CALLS == []
