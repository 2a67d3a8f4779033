"""The multitask task of ``kscan train``: samples, validation, exact resume, training, refusals."""

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from kscan.config import from_mapping, to_mapping
from kscan.errors import ConfigError
from kscan.models.multitask import MultitaskOutput
from kscan.physics.coils import rss
from kscan.physics.fft import ifft2c
from kscan.pipelines.anatomy import TISSUE_CLASSES
from kscan.pipelines.checkpoint import read_checkpoint
from kscan.pipelines.io.slice_dataset import SliceDataset
from kscan.pipelines.metrics import reconstruction_metrics
from kscan.pipelines.synthetic import center_crop
from kscan.pipelines.train import TASKS, train
from kscan.pipelines.train_config import TrainConfig, config_differences
from kscan.pipelines.train_data import ReconstructionTransform
from kscan.pipelines.train_multitask import LabelledTransform, MultitaskTask
from tests.pipelines.test_train import assert_same_run, read_log

pytestmark = pytest.mark.usefixtures("one_thread")

JOINT = {
    "rvn": {
        "learned_sensitivity": False,
        "network": {"num_steps": 2, "recurrent_hidden_channels": 6, "recurrent_num_layers": 1},
    },
    "num_classes": 6,
    "head": "unet",
    "head_config": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "cascades": 2,
}
IDSLR = {"coils": 4, "num_classes": 6, "num_filters": 4, "num_pool_layers": 2, "iterations": 2}
SEGNET = {"coils": 4, "num_classes": 6, "num_filters": 4, "num_pool_layers": 2, "cascades": 2}


def mt_config(volumes, out, model="joint-rvn-seg", model_config=None, **changes):
    values = {
        "task": "multitask",
        "model": model,
        "model_config": model_config or JOINT,
        "data": {"train": str(volumes), "val": str(volumes)},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "total_steps": 6, "grad_clip": 1.0},
        "loss": {"l1": 1.0, "ssim": 1.0, "iterate_weighting": "logspace"},
        "multitask": {"seg_weight": 0.5},
        "checkpoint_every": 3,
        "output_dir": str(out),
    }
    for key, value in changes.items():
        values[key] = {**values[key], **value} if isinstance(values.get(key), dict) else value
    return from_mapping(TrainConfig, values)


def test_samples_are_reconstruction_samples_with_the_slice_labels(train_volumes):
    masks = (("random",), (4.0,), (0.08,), 3)
    for train_masks in (True, False):
        plain = SliceDataset(train_volumes, transform=ReconstructionTransform(*masks, train_masks))
        data = SliceDataset(train_volumes, transform=LabelledTransform(*masks, train_masks))
        for index, (path, slice_num) in enumerate(data.examples):
            item, reference = data[index], plain[index]
            assert item.keys() == reference.keys() | {"labels"}
            for key in ("masked_kspace", "mask", "target"):
                assert torch.equal(item[key], reference[key]), key
            with h5py.File(path) as f:
                stored = torch.from_numpy(f["segmentation"][slice_num].astype(np.int64))
            assert item["labels"].dtype == torch.int64
            assert item["labels"].shape == item["target"].shape == (64, 64)
            assert torch.equal(item["labels"], stored)


class ZeroFilledConstant(nn.Module):
    """A stand-in multitask model: the zero-filled RSS image, and class ``label`` everywhere."""

    def __init__(self, label):
        super().__init__()
        self.label = label

    def image(self, kspace):
        return rss(ifft2c(kspace))

    def forward(self, masked_kspace, mask, num_low_frequencies=None):
        logits = torch.zeros(masked_kspace.shape[0], 6, *masked_kspace.shape[-2:])
        logits[:, self.label] = 1.0
        return MultitaskOutput([masked_kspace], [self.image(masked_kspace)], [logits])


def test_validation_scores_both_tasks_per_volume(train_volumes, tmp_path):
    task = MultitaskTask(mt_config(train_volumes, tmp_path), torch.device("cpu"))
    _, val = task.datasets()
    assert task.class_names == [TISSUE_CLASSES[i] for i in range(6)]
    metrics = task.validate(ZeroFilledConstant(2), DataLoader(val, batch_size=2))
    assert set(metrics) == set(task.metrics) and task.best_metric in metrics
    expected = {"ssim": 0.0, "psnr": 0.0, "nmse": 0.0, "dice_inner_tissue_a": 0.0}
    files = sorted({path for path, _ in val.examples})
    for path in files:
        items = [val[i] for i, (p, _) in enumerate(val.examples) if p == path]
        items.sort(key=lambda item: item["slice_num"])
        image = torch.stack([rss(ifft2c(item["masked_kspace"][None]))[0] for item in items])
        target = torch.stack([item["target"] for item in items])
        for key, value in reconstruction_metrics(target, center_crop(image, (64, 64))).items():
            expected[key] += value / len(files)
        labels = torch.stack([item["labels"] for item in items]).numpy()
        inner = (labels == 2).sum()
        expected["dice_inner_tissue_a"] += 2 * inner / (inner + labels.size) / len(files)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["dice_fluid"] == 0 and 0 < metrics["dice_inner_tissue_a"] < 1
    assert metrics["ssim_dice"] == pytest.approx((metrics["ssim"] + metrics["dice"]) / 2)


def test_resume_is_exact(train_volumes, tmp_path):
    assert TASKS["multitask"] is MultitaskTask
    train(mt_config(train_volumes, tmp_path / "a"), quiet=True)
    config = mt_config(train_volumes, tmp_path / "b")
    assert train(config, max_steps=3, quiet=True) == {}  # stops mid-epoch 0 (4 slices)
    result = train(config, quiet=True)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    rows = read_log(tmp_path / "b" / "log.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "4"), ("1", "6")]
    assert all(0 < float(r["val_ssim"]) < 1 and 0 <= float(r["val_dice"]) <= 1 for r in rows)
    assert result["best"]["val_ssim_dice"] == max(float(r["val_ssim_dice"]) for r in rows)
    best = read_checkpoint(tmp_path / "b" / "best.safetensors")
    assert best.task == "multitask" and best.meta["class_names"][4] == "fluid"
    assert best.meta["metrics"]["ssim_dice"] == result["best"]["val_ssim_dice"]


@pytest.mark.parametrize(("model", "model_config"), [("idslr", IDSLR), ("segnet", SEGNET)])
def test_a_few_steps_reduce_the_loss(train_volumes, tmp_path, model, model_config):
    config = mt_config(
        train_volumes,
        tmp_path,
        model=model,
        model_config=model_config,
        optim={"lr": 1e-2, "total_steps": 24},
        validate_every=100,
    )
    train(config, quiet=True)
    losses = [float(r["train_loss"]) for r in read_log(tmp_path / "log.csv")]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"multitask": {"dice_weight": 1}}, "multitask.dice_weight: unknown key"),
        ({"multitask": {"rec_weight": 0, "seg_weight": 0}}, "rec_weight, seg_weight: expected"),
        ({"multitask": {"ce": -1}}, "multitask.ce: expected a number >= 0"),
        ({"segmentation": {"dice": 2.0}}, "segmentation: applies to task segmentation"),
        ({"model": "rvn"}, "'rvn' is a reconstruction model, expected a multitask model"),
    ],
)
def test_bad_multitask_configs_are_refused(train_volumes, tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        mt_config(train_volumes, tmp_path, **changes)


def test_a_multitask_section_elsewhere_and_too_few_classes_are_refused(train_volumes, tmp_path):
    values = {"model": "rvn", "data": {"train": str(train_volumes)}, "multitask": {"ce": 2.0}}
    with pytest.raises(ConfigError, match="multitask: applies to task multitask"):
        from_mapping(TrainConfig, values)
    config = mt_config(train_volumes, tmp_path, model_config={**JOINT, "num_classes": 4})
    with pytest.raises(ConfigError, match="num_classes: 4, but the data hold label 5"):
        MultitaskTask(config, torch.device("cpu")).datasets()


def test_checkpoints_older_than_the_multitask_section_still_resume(train_volumes, tmp_path):
    new = to_mapping(mt_config(train_volumes, tmp_path, multitask={"seg_weight": 1.0}))
    reconstruction = {**new, "task": "reconstruction"}
    old = {k: v for k, v in reconstruction.items() if k != "multitask"}
    assert config_differences(old, reconstruction) == []
    changed = {**reconstruction, "multitask": {**new["multitask"], "ce": 2.0}}
    assert config_differences(old, changed) == ["multitask"]
