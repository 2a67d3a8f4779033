"""The training engine: exact resume after a kill, logs, refusals, the CLI, several processes."""

import csv
import dataclasses
import json
import math
import socket

import pytest
import torch

from kscan.config import from_mapping
from kscan.errors import ConfigError
from kscan.models import registry
from kscan.pipelines import train as train_module
from kscan.pipelines.checkpoint import load_model, read_checkpoint
from kscan.pipelines.cli import main
from kscan.pipelines.model_inference import load_reconstructor
from kscan.pipelines.train import Trainer, lr_factor, train, train_process
from kscan.pipelines.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(volumes, out, **changes):
    values = {
        "model": "rvn",
        "model_config": {
            "learned_sensitivity": False,
            "network": {"num_steps": 2, "recurrent_hidden_channels": 4, "recurrent_num_layers": 1},
        },
        "data": {"train": str(volumes), "val": str(volumes)},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "total_steps": 6, "grad_clip": 1.0},
        "loss": {"l1": 1.0, "ssim": 1.0, "iterate_weighting": "logspace"},
        "checkpoint_every": 3,
        "output_dir": str(out),
    }
    for key, value in changes.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return from_mapping(TrainConfig, values)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_run(a, b):
    """Two output folders hold bit-identical final weights, optimiser/RNG state, logs."""
    ca, cb = read_checkpoint(a / "last.safetensors"), read_checkpoint(b / "last.safetensors")
    assert ca.state.keys() == cb.state.keys() and ca.extra.keys() == cb.extra.keys()
    for key in ca.state:
        assert torch.equal(ca.state[key], cb.state[key]), key
    for key in ca.extra:
        assert torch.equal(ca.extra[key], cb.extra[key]), key
    assert ca.meta["progress"] == cb.meta["progress"]
    assert ca.meta["optimizer"] == cb.meta["optimizer"]
    assert (a / "log.csv").read_text() == (b / "log.csv").read_text()


def test_resume_after_a_kill_is_bit_identical(train_volumes, tmp_path, monkeypatch):
    # uninterrupted: 6 steps over 1.5 epochs of 4 slices, checkpoints at steps 3 and 6
    train(tiny_config(train_volumes, tmp_path / "a"), quiet=True)
    # killed during step 5 (after the epoch-0 validation, 2 steps after the checkpoint)
    killed = tiny_config(train_volumes, tmp_path / "b")
    step = Trainer._step

    def dying_step(self, batch):
        if self.progress.step == 4:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(Trainer, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(killed, quiet=True)
    monkeypatch.setattr(Trainer, "_step", step)
    assert read_checkpoint(tmp_path / "b" / "last.safetensors").meta["progress"]["step"] == 3
    assert [row["step"] for row in read_log(tmp_path / "b" / "log.csv")] == ["4"]
    result = train(killed, resume=True, quiet=True)  # continues at step 4, mid-epoch 0
    assert_same_run(tmp_path / "a", tmp_path / "b")

    rows = read_log(tmp_path / "b" / "log.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "4"), ("1", "6")]
    assert all(0 < float(r["val_ssim"]) < 1 and float(r["val_nmse"]) > 0 for r in rows)
    assert result["steps"] == 6 and result["last"]["step"] == 6
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["best"]["val_ssim"] == max(float(r["val_ssim"]) for r in rows)
    best, checkpoint = load_model(tmp_path / "b" / "best.safetensors", task="reconstruction")
    assert checkpoint.meta["metrics"]["ssim"] == metrics["best"]["val_ssim"]
    names = sorted(p.name for p in (tmp_path / "b").glob("step_*.safetensors"))
    assert names == ["step_0000003.safetensors", "step_0000006.safetensors"]


def test_stop_at_max_steps_then_resume_at_an_epoch_end(train_volumes, tmp_path):
    train(tiny_config(train_volumes, tmp_path / "a", validate_every=2), quiet=True)
    config = tiny_config(train_volumes, tmp_path / "b", validate_every=2)
    assert train(config, max_steps=4, quiet=True) == {}  # stops at the end of epoch 0
    assert not (tmp_path / "b" / "metrics.json").exists()
    train(config, quiet=True)  # resumes without --resume: same config
    assert_same_run(tmp_path / "a", tmp_path / "b")
    rows = read_log(tmp_path / "b" / "log.csv")
    assert [r["val_ssim"] == "" for r in rows] == [True, False]  # epoch 0 not due


def test_a_different_config_is_refused(train_volumes, tmp_path):
    train(tiny_config(train_volumes, tmp_path), max_steps=1, quiet=True)
    changed = tiny_config(train_volumes, tmp_path, optim={"lr": 2e-3}, seed=3)
    with pytest.raises(ConfigError, match=r"different: optim\.lr, seed\)"):
        train(changed, quiet=True)
    # device and workers may change
    same = tiny_config(train_volumes, tmp_path, data={"num_workers": 1})
    assert train(same, max_steps=2, quiet=True) == {}


def test_resume_needs_a_checkpoint(train_volumes, tmp_path):
    with pytest.raises(ConfigError, match="--resume: .*last.safetensors does not exist"):
        train(tiny_config(train_volumes, tmp_path), resume=True, quiet=True)


def test_a_checkpoint_of_another_task_is_refused(train_volumes, tmp_path, monkeypatch):
    train(tiny_config(train_volumes, tmp_path), max_steps=1, quiet=True)
    config = tiny_config(train_volumes, tmp_path)
    rvn = registry.MODELS["rvn"]
    monkeypatch.setitem(registry.MODELS, "rvn", dataclasses.replace(rvn, task="segmentation"))
    with pytest.raises(ConfigError, match="holds a segmentation model .*expected a reconstruction"):
        train_module.Trainer(config, train_module.Processes()).restore(False)


def test_lr_schedule():
    total, warmup, low = 10, 3, 0.1
    factors = [lr_factor(s, warmup, total, low) for s in range(total)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1])
    for s in range(3, total):
        cosine = low + (1 - low) * (1 + math.cos(math.pi * (s - 3) / 7)) / 2
        assert factors[s] == pytest.approx(cosine)
    assert lr_factor(total, warmup, total, low) == pytest.approx(low)


def test_cli_trains_and_reports_bad_configs_in_one_line(train_volumes, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: rvn\nmodel_config: {{learned_sensitivity: false, network: {{num_steps: 1, "
        f"recurrent_hidden_channels: 4, recurrent_num_layers: 1}}}}\n"
        f"data: {{train: {train_volumes}}}\noptim: {{total_steps: 2}}\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    assert main(["train", str(config), "--quiet", "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "last.safetensors").is_file()
    assert read_log(tmp_path / "out" / "log.csv")[0]["val_ssim"] == ""  # no validation set
    capsys.readouterr()
    config.write_text(config.read_text().replace("total_steps", "total_step"))
    assert main(["train", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kscan: error: ") and err.count("\n") == 1
    assert "optim.total_step: unknown key" in err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_with_twice_the_batch(train_volumes, tmp_path, monkeypatch):
    optim = {"total_steps": 2, "warmup_steps": 0}
    single = tiny_config(train_volumes, tmp_path / "one", optim=optim, data={"batch_size": 2})
    train(single, quiet=True)
    double = tiny_config(train_volumes, tmp_path / "two", optim=optim, data={"batch_size": 1})
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(train_process, args=(2, double, None), nprocs=2)
    one = read_checkpoint(tmp_path / "one" / "last.safetensors")
    two = read_checkpoint(tmp_path / "two" / "last.safetensors")
    assert two.meta["progress"]["step"] == 2
    start = registry.build_model("rvn", single.model_config).state_dict()
    for key, value in one.state.items():
        torch.testing.assert_close(two.state[key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(one.state[k], start[k]) for k in start)  # it did train
    loss_one = float(read_log(tmp_path / "one" / "log.csv")[0]["train_loss"])
    loss_two = float(read_log(tmp_path / "two" / "log.csv")[0]["train_loss"])
    assert loss_two == pytest.approx(loss_one, rel=1e-5)


def test_scaled_training_records_the_rule_and_validates_at_the_data_scale(train_volumes, tmp_path):
    """Trained on k-space scaled per slice: the checkpoint carries the rule and kscan's inference
    picks it up."""
    config = tiny_config(
        train_volumes, tmp_path / "run", data={"scale_percentile": 0.99}, optim={"total_steps": 2}
    )
    metrics = train(config, quiet=True)
    ckpt = read_checkpoint(tmp_path / "run" / "last.safetensors")
    assert ckpt.meta["kspace_scaling"] == {"percentile": 0.99}
    assert load_reconstructor("rvn", tmp_path / "run" / "last.safetensors").scaling is not None
    assert 0 < metrics["last"]["val_ssim"] <= 1
    with pytest.raises(ConfigError, match="scale_percentile"):
        tiny_config(train_volumes, tmp_path / "x", data={"scale_percentile": 1.5})
