"""The segmentation task of ``kscan train``: loss, augmentation, validation, resume, refusals."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from kscan.config import from_mapping
from kscan.errors import ConfigError
from kscan.pipelines.anatomy import TISSUE_CLASSES
from kscan.pipelines.checkpoint import read_checkpoint
from kscan.pipelines.io.fastmri import FastMRIFile
from kscan.pipelines.io.slice_dataset import SliceDataset
from kscan.pipelines.metrics import segmentation_metrics
from kscan.pipelines.simulate import VOXEL_SIZE_MM, simulate_dataset
from kscan.pipelines.train import train
from kscan.pipelines.train_config import SegmentationConfig, TrainConfig
from kscan.pipelines.train_segmentation import (
    SegmentationSlices,
    SegmentationTask,
    segmentation_loss,
)
from tests.pipelines.test_train import assert_same_run, read_log

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "dims": [8, 16, 32, 64],
    "depths": [1, 1, 1, 1],
    "depths_decoder": [1, 1, 1, 1],
    "drop_path_rate": 0.0,
}


def seg_config(volumes, out, model_config=None, segmentation=None, **changes):
    values = {
        "task": "segmentation",
        "model": "vmunet",
        "model_config": {**TINY, "num_classes": 6, **(model_config or {})},
        "data": {"train": str(volumes), "val": str(volumes)},
        "segmentation": segmentation or {},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "total_steps": 6, "grad_clip": 1.0},
        "checkpoint_every": 3,
        "output_dir": str(out),
        **changes,
    }
    return from_mapping(TrainConfig, values)


@pytest.fixture(scope="module")
def padded_volumes(tmp_path_factory):
    """2 volumes x 2 slices with 72x72 targets and labels (padded to 96x96 for the network)."""
    root = tmp_path_factory.mktemp("seg_72")
    simulate_dataset(
        root,
        volumes=2,
        slices=2,
        shape_kspace=(80, 72),
        recon_size=(72, 72),
        coils=4,
        formats=["h5"],
        quiet=True,
    )
    return root / "h5"


# --- loss -----------------------------------------------------------------------------------------


def dice_terms(probs, onehot):
    """Batch Dice per channel with MONAI's 1e-5 smoothing: (C,)."""
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    return (2 * inter + 1e-5) / (probs.sum(dims) + onehot.sum(dims) + 1e-5)


@pytest.mark.parametrize(("dice", "ce"), [(1.0, 1.0), (0.3, 2.0), (0.0, 1.5), (2.5, 0.0)])
def test_multiclass_loss_applies_each_weight_once(dice, ce):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (3, 8, 8), generator=gen)
    criterion = segmentation_loss(SegmentationConfig(dice=dice, ce=ce), binary=False)
    onehot = F.one_hot(labels, 6).permute(0, 3, 1, 2).double()
    fg_dice = dice_terms(logits.softmax(1), onehot)[1:].mean()
    expected = dice * (1 - fg_dice) + ce * F.cross_entropy(logits, labels)
    assert criterion(logits, labels[:, None]).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(("dice", "ce"), [(1.0, 1.0), (0.5, 3.0)])
def test_binary_loss_applies_each_weight_once(dice, ce):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    target = (torch.rand(2, 1, 8, 8, generator=gen) > 0.6).double()
    criterion = segmentation_loss(SegmentationConfig(dice=dice, ce=ce), binary=True)
    fg_dice = dice_terms(logits.sigmoid(), target)[0]
    expected = dice * (1 - fg_dice) + ce * F.binary_cross_entropy_with_logits(logits, target)
    assert criterion(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


# --- samples and augmentation ----------------------------------------------------------------------


def samples(volumes, augment, binary=False, foreground=None):
    slices = SliceDataset(volumes)
    return SegmentationSlices(slices, "reconstruction_rss", 32, binary, foreground, augment, 7)


def test_augmentation_is_seeded_by_seed_epoch_and_slice(train_volumes):
    data = samples(train_volumes, augment=True)
    first = [data[i] for i in range(len(data))]
    again = [data[i] for i in range(len(data))]  # same epoch: the same draws
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
    data.epoch = 1
    other = [data[i] for i in range(len(data))]
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True))
    plain = samples(train_volumes, augment=False)
    assert any(
        not torch.equal(a["image"], plain[i]["image"]) for i, a in enumerate(first)
    )  # it augments
    for item in first:
        assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
        assert item["labels"].dtype == torch.int64
        assert set(item["labels"].unique().tolist()) <= set(TISSUE_CLASSES)


def test_samples_are_normalised_padded_and_binarised(padded_volumes):
    raw = FastMRIFile(next(padded_volumes.glob("*.h5"))).read_slice(1)
    item = samples(padded_volumes, augment=False)[1]
    assert item["image"].shape == (1, 96, 96) and item["labels"].shape == (96, 96)
    assert item["window"].tolist() == [12, 84, 12, 84]
    inside = (slice(12, 84), slice(12, 84))
    assert torch.equal(item["labels"][inside], raw["segmentation"].long())
    assert item["labels"].sum() == item["labels"][inside].sum()  # padding is background
    target = raw["target"]
    expected = (target / torch.quantile(target.flatten(), 0.995)).clamp(0, 4)
    torch.testing.assert_close(item["image"][0][inside], expected)
    fluid = samples(padded_volumes, augment=False, binary=True, foreground=(4,))[1]
    assert torch.equal(fluid["labels"][inside], (raw["segmentation"] == 4).long())
    body = samples(padded_volumes, augment=False, binary=True)[1]
    assert torch.equal(body["labels"][inside], (raw["segmentation"] > 0).long())


# --- validation -----------------------------------------------------------------------------------


class ConstantClass(nn.Module):
    """A stand-in model whose logits pick one class everywhere."""

    def __init__(self, label, classes):
        super().__init__()
        self.label, self.classes = label, classes

    def forward_logits(self, image):
        logits = torch.zeros(image.shape[0], self.classes, *image.shape[-2:])
        logits[:, self.label] = 1.0
        return logits


def test_validation_crops_stacks_and_averages_volumes(padded_volumes, tmp_path):
    task = SegmentationTask(seg_config(padded_volumes, tmp_path), torch.device("cpu"))
    _, val = task.datasets()
    metrics = task.validate(ConstantClass(2, 6), DataLoader(val, batch_size=2))
    names = [TISSUE_CLASSES[i] for i in range(1, 6)]
    spacing = (VOXEL_SIZE_MM[2], VOXEL_SIZE_MM[0], VOXEL_SIZE_MM[1])
    expected = {}
    files = sorted(padded_volumes.glob("*.h5"))
    for path in files:
        labels = FastMRIFile(path).read_volume()["segmentation"]
        scores = segmentation_metrics(labels, torch.full_like(labels, 2), 6, spacing=spacing)
        for metric, values in scores.items():
            expected[metric] = expected.get(metric, 0) + values.mean().item() / len(files)
            for name, value in zip(names, values.tolist(), strict=True):
                key = f"{metric}_{name}"
                expected[key] = expected.get(key, 0) + value / len(files)
    assert metrics.keys() == expected.keys() == set(task.metrics)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert 0 < metrics["dice_inner_tissue_a"] < 1 and metrics["dice_fluid"] == 0


# --- training -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_is_exact_with_augmentation(train_volumes, tmp_path):
    train(seg_config(train_volumes, tmp_path / "a"), quiet=True)
    config = seg_config(train_volumes, tmp_path / "b")
    assert train(config, max_steps=3, quiet=True) == {}  # stops mid-epoch 0 (4 slices)
    result = train(config, quiet=True)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    rows = read_log(tmp_path / "b" / "log.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "4"), ("1", "6")]
    assert all(0 <= float(r["val_dice"]) <= 1 for r in rows)
    assert result["best"]["val_dice"] == max(float(r["val_dice"]) for r in rows)
    best = read_checkpoint(tmp_path / "b" / "best.safetensors")
    assert best.meta["class_names"] == [TISSUE_CLASSES[i] for i in range(6)]
    assert read_checkpoint(tmp_path / "b" / "last.safetensors").meta["class_names"][5] == "lesion"


@pytest.mark.slow
def test_a_few_steps_reduce_the_loss(train_volumes, tmp_path):
    config = seg_config(
        train_volumes,
        tmp_path,
        segmentation={"augment": False},
        optim={"lr": 3e-3, "total_steps": 16},
        validate_every=100,
    )
    train(config, quiet=True)
    losses = [float(r["train_loss"]) for r in read_log(tmp_path / "log.csv")]
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0]


def test_binary_head_trains_one_foreground_class(train_volumes, tmp_path):
    config = seg_config(
        train_volumes,
        tmp_path,
        model_config={"num_classes": 1},
        segmentation={"foreground": [4]},
        optim={"total_steps": 1},
        data={"train": str(train_volumes), "val": str(train_volumes), "batch_size": 2},
    )
    result = train(config, quiet=True)
    assert set(result["last"]) >= {"val_dice", "val_dice_fluid", "val_hd95_fluid"}
    meta = read_checkpoint(tmp_path / "best.safetensors").meta
    assert meta["class_names"] == ["background", "fluid"]


# --- refusals -------------------------------------------------------------------------------------


def test_a_model_of_another_class_count_is_refused(train_volumes, tmp_path):
    config = seg_config(train_volumes, tmp_path, model_config={"num_classes": 4})
    with pytest.raises(
        ConfigError, match=r"model_config.num_classes: 4 disagrees with the data's 6"
    ):
        SegmentationTask(config, torch.device("cpu")).datasets()
    with pytest.raises(ConfigError, match="disagrees with segmentation.num_classes 6"):
        seg_config(
            train_volumes,
            tmp_path,
            model_config={"num_classes": 4},
            segmentation={"num_classes": 6},
        )
    too_few = seg_config(
        train_volumes, tmp_path, model_config={"num_classes": 3}, segmentation={"num_classes": 3}
    )
    with pytest.raises(ConfigError, match="num_classes: 3, but the data hold label 5"):
        SegmentationTask(too_few, torch.device("cpu")).datasets()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_config": {"in_channels": 3}}, "model_config.in_channels: expected 1"),
        ({"segmentation": {"foreground": [2]}}, "segmentation.foreground: applies to one-channel"),
        ({"segmentation": {"dice": 0, "ce": 0}}, "segmentation.dice, ce: expected at least one"),
        ({"segmentation": {"weights": 1}}, "segmentation.weights: unknown key"),
        ({"loss": {"l1": 2.0}}, "loss: the reconstruction loss"),
    ],
)
def test_bad_segmentation_configs_are_refused(train_volumes, tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        seg_config(train_volumes, tmp_path, **changes)


def test_a_segmentation_section_in_a_reconstruction_run_is_refused(train_volumes, tmp_path):
    values = {
        "model": "rvn",
        "data": {"train": str(train_volumes)},
        "segmentation": {"augment": False},
    }
    with pytest.raises(ConfigError, match="segmentation: applies to task segmentation"):
        from_mapping(TrainConfig, values)
