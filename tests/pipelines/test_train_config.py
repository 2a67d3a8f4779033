"""kscan train's YAML config: defaults, validation, unknown keys named with their dotted place."""

from pathlib import Path

import pytest

from kscan.config import from_mapping, to_mapping
from kscan.errors import ConfigError, FileFormatError
from kscan.pipelines.train_config import (
    TrainConfig,
    config_differences,
    load_train_config,
)

TINY = {
    "model": "rvn",
    "model_config": {"network": {"num_steps": 2, "recurrent_hidden_channels": 4}},
    "data": {"train": "data/h5"},
}


def build(**changes):
    values = {**TINY, **changes}
    return from_mapping(TrainConfig, values)


def test_defaults_and_normalised_model_config():
    config = build()
    assert config.task == "reconstruction" and config.optim.epochs == 1
    assert config.optim.total_steps is None and config.precision == "fp32"
    # the model config is stored in full, so equal models compare equal however they are spelled
    assert config.model_config["network"]["num_steps"] == 2
    assert config.model_config["network"]["recurrent_num_layers"] == 4
    assert config.data.mask_kinds == ("random",) and config.data.accelerations == (4.0,)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"optimizer": {}}, "optimizer: unknown key in TrainConfig"),
        ({"optim": {"lr_max": 1}}, "optim.lr_max: unknown key in OptimConfig"),
        ({"data": {"train": "x", "batchsize": 2}}, "data.batchsize: unknown key"),
        ({"model_config": {"network": {"steps": 2}}}, "model_config.network.steps: unknown key"),
        ({"loss": {"dice": 1.0}}, "loss.dice: unknown key in LossConfig"),
    ],
)
def test_unknown_keys_are_named(changes, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
        build(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "nope"}, "model: unknown model 'nope'"),
        ({"task": "denoising"}, "task: expected one of reconstruction, segmentation"),
        (
            {"task": "segmentation"},
            "model: 'rvn' is a reconstruction model, expected a segmentation",
        ),
        ({"data": {"train": "x", "mask_kinds": ["random", "poisson_2d"]}}, "data.mask_kinds"),
        ({"data": {"train": "x", "accelerations": [4, 8]}}, "data.center_fractions"),
        ({"data": {}}, "data.train"),
        ({"optim": {"epochs": 2, "total_steps": 10}}, "optim.epochs, total_steps"),
        ({"optim": {"lr": 1e-3, "min_lr": 1e-2}}, "optim.min_lr"),
        ({"loss": {"l1": 0, "ssim": 0}}, "loss.l1, ssim"),
        ({"loss": {"iterate_weighting": "linear"}}, "loss.iterate_weighting"),
        ({"precision": "fp16"}, "precision"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
    ],
)
def test_bad_values_fail_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as err:
        build(**changes)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: rvn\ndata: {train: x}\noptim: {warmup: 3}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: optim\.warmup: unknown key"):
        load_train_config(path)
    path.write_text("model: [rvn\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: not valid YAML \(line"):
        load_train_config(path)
    with pytest.raises(FileFormatError, match="no such config file"):
        load_train_config(tmp_path / "missing.yaml")


def test_config_differences_name_dotted_keys_and_skip_runtime_keys():
    old = to_mapping(build())
    new = to_mapping(
        build(
            device="cuda",
            data={"train": "data/h5", "num_workers": 4, "batch_size": 2},
            model_config={"network": {"num_steps": 3, "recurrent_hidden_channels": 4}},
        )
    )
    assert config_differences(old, new) == ["data.batch_size", "model_config.network.num_steps"]
    assert config_differences(old, old) == []


def test_example_config_loads():
    config = load_train_config(Path(__file__).parents[2] / "configs" / "train_rvn_synthetic.yaml")
    assert config.model == "rvn" and config.data.val is not None
