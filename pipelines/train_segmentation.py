"""The segmentation task of ``kscan train``: labelled slices in, Dice + cross-entropy, Dice/IoU/HD95.

It follows the task interface of :mod:`kscan.pipelines.train_reconstruction`. A training sample is
one slice of a fastMRI-layout HDF5 volume that holds ``segmentation`` labels (``kscan simulate``
writes them)::

    image      (1, H', W') float32   the ``segmentation.image_key`` slice (the target by default),
                                     normalised by seg_transforms.normalize_image (the one shared
                                     with ``kscan segment``), augmented (training), zero-padded
    labels     (H', W') int64        the label map; padded with background 0; for a one-channel
                                     model 1 where the label is in ``foreground``, else 0
    window     (4,) int64            rows and columns of the slice in the padded image:
                                     top, bottom, left, right (``pad_to_multiple``'s crop)
    fname, slice_num

``H' x W'`` is ``h x w`` rounded up to the model's ``size_multiple``. The loss runs over every
pixel of the padded image, padding included (zero image, background label: what inference crops
away), so nothing is masked.

**Augmentation** (training, ``segmentation.augment``), MONAI transforms after normalisation, on
image and labels together (labels with nearest-neighbour interpolation): flips along each axis
(p = 0.5 each), a rotation by a random multiple of 90 degrees (p = 0.5; square slices only, so a
batch keeps one size), an affine (p = 0.5: rotation within +-15 degrees, scale within +-10 %, zero
padding), then on the image an intensity scale ``x (1 + f)``, ``f`` in +-0.1 (p = 0.5) and shift
``x + o``, ``o`` in +-0.1 (p = 0.5). Each sample's draws come from
``Randomizable.set_random_state`` seeded by ``(seed, epoch, *seed_from_name(file, slice))``, so
a resumed epoch draws the same samples and every epoch new ones.

**Loss** on ``model.forward_logits`` (MONAI's ``DiceCELoss``, ``batch=True``: each class's Dice
over the whole batch, smoothing 1e-5)::

    multi-class (C > 1)   loss = dice (1 - mean_{c >= 1} Dice_c(softmax(z), y)) + ce CE(z, y)
    binary (C = 1)        loss = dice (1 - Dice(sigmoid(z), y)) + ce BCE(z, y)

with ``Dice_c(p, y) = (2 sum p_c [y = c] + 1e-5) / (sum p_c + sum [y = c] + 1e-5)``; each weight
multiplies its term once.

**Validation**: the predicted labels (argmax of the logits; ``logit > 0`` for one channel),
cropped back to ``h x w``, are stacked per volume in slice order and scored with
:func:`kscan.pipelines.metrics.segmentation_metrics` (classes 1 .. C-1; a binary model's classes
are background and foreground): Dice, IoU and HD95 per class, HD95 in mm from the ISMRMRD recon
field of view when the labels lie on the recon grid, else in voxels. Each value is averaged over
volumes; ``dice``, ``iou`` and ``hd95`` are the means over classes, and ``dice`` (mean foreground
Dice) picks ``best.safetensors``. Per class: ``dice_<name>``, ``iou_<name>``, ``hd95_<name>``.

**Class names** (checkpoint metadata ``class_names``, indexed by output label): the tissue names of
:data:`kscan.pipelines.anatomy.TISSUE_CLASSES` for kscan synthetic data, else ``class_<i>``; a
binary model's are ``background`` and ``foreground`` (or the names of its ``foreground`` ids
joined by ``+``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kscan.errors import ConfigError, InvalidDataError
from kscan.models import registry
from kscan.physics.masks import seed_from_name
from kscan.pipelines.anatomy import TISSUE_CLASSES
from kscan.pipelines.io.fastmri import SEGMENTATION, H5VolumeFile
from kscan.pipelines.io.slice_dataset import SliceDataset
from kscan.pipelines.metrics import segmentation_metrics
from kscan.pipelines.seg_transforms import normalize_image, pad_to_multiple
from kscan.pipelines.train_config import SegmentationConfig, TrainConfig
from kscan.pipelines.train_data import check_batchable
from kscan.pipelines.train_reconstruction import VolumeSlices, stack_volume

SYNTHETIC_ACQUISITION = "kscan_simulated"
"""The ``acquisition`` attribute of the HDF5 files ``kscan simulate`` writes."""

DICE_SMOOTH = 1e-5
"""MONAI's Dice smoothing (numerator and denominator)."""

AUGMENT_PROB = 0.5
MAX_ROTATION = math.pi / 12
MAX_SCALE = 0.1
MAX_INTENSITY = 0.1


def augmentation(square: bool) -> Compose:
    """The training augmentation of the module docstring, on ``{"image", "labels"}`` dicts of
    ``(1, h, w)`` tensors (labels as floats); rot90 only for ``square`` slices."""
    both = ("image", "labels")
    spatial = [
        RandFlipd(both, prob=AUGMENT_PROB, spatial_axis=0),
        RandFlipd(both, prob=AUGMENT_PROB, spatial_axis=1),
    ]
    if square:
        spatial.append(RandRotate90d(both, prob=AUGMENT_PROB, max_k=3))
    spatial.append(
        RandAffined(
            both,
            prob=AUGMENT_PROB,
            rotate_range=MAX_ROTATION,
            scale_range=(MAX_SCALE, MAX_SCALE),
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        )
    )
    intensity = [
        RandScaleIntensityd("image", factors=MAX_INTENSITY, prob=AUGMENT_PROB),
        RandShiftIntensityd("image", offsets=MAX_INTENSITY, prob=AUGMENT_PROB),
    ]
    return Compose([*spatial, *intensity])


def sample_seed(seed: int, epoch: int, fname: str, slice_num: int) -> int:
    """The augmentation seed of one training sample: a 32-bit word of the SeedSequence of
    ``(seed, epoch, *seed_from_name(fname, slice_num))``."""
    entropy = [seed, epoch, *seed_from_name(fname, slice_num)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _read_slice(path: Path, key: str, index: int) -> np.ndarray:
    with H5VolumeFile(path) as volume:
        volume._dataset(key)
        return volume._read(key, index)


class SegmentationSlices(Dataset):
    """Labelled slices as training or validation samples (module docstring).

    Args:
        slices: the volumes and slices to use (its items are not read: only its list).
        image_key: the image dataset of every file (already resolved: no "target").
        multiple: pad ``H`` and ``W`` to multiples of this.
        binary: map the labels to 1 (foreground) and 0 for a one-channel model.
        foreground: the foreground label ids of a binary model; None: every id > 0.
        augment: draw training augmentations seeded by ``seed`` and :attr:`epoch`.
        seed: the run's seed.
    """

    def __init__(
        self,
        slices: SliceDataset,
        image_key: str,
        multiple: int,
        binary: bool,
        foreground: tuple[int, ...] | None,
        augment: bool,
        seed: int,
    ) -> None:
        self.examples = slices.examples
        self.image_key = image_key
        self.multiple = multiple
        self.binary = binary
        self.foreground = foreground
        self.augment = {True: augmentation(True), False: augmentation(False)} if augment else {}
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, slice_num = self.examples[index]
        image = torch.from_numpy(_read_slice(path, self.image_key, slice_num))
        labels = torch.from_numpy(_read_slice(path, SEGMENTATION, slice_num).astype(np.int64))
        if self.binary and self.foreground is None:
            labels = (labels > 0).long()
        elif self.binary:
            labels = torch.isin(labels, torch.tensor(self.foreground)).long()
        image = normalize_image(image.float())
        if self.augment:
            compose = self.augment[image.shape[0] == image.shape[1]]
            compose.set_random_state(sample_seed(self.seed, self.epoch, path.name, slice_num))
            out = compose({"image": image[None], "labels": labels[None].float()})
            image = out["image"].as_subclass(torch.Tensor)[0]  # MetaTensor -> Tensor
            labels = out["labels"].as_subclass(torch.Tensor)[0].round().long()
        image, (rows, cols) = pad_to_multiple(image[None], self.multiple)
        labels, _ = pad_to_multiple(labels, self.multiple)
        return {
            "image": image.contiguous(),
            "labels": labels.contiguous(),
            "window": torch.tensor([rows.start, rows.stop, cols.start, cols.stop]),
            "fname": path.name,
            "slice_num": slice_num,
        }


@dataclass(frozen=True)
class LabelFacts:
    """What the files of a data set say about their labels.

    Attributes:
        classes: the largest label + 1.
        synthetic: every file was written by ``kscan simulate``.
        spacing: file name -> voxel size ``(slice, row, column)`` mm for HD95 (from the recon
            field of view, when the labels lie on the recon grid), or None (voxels).
    """

    classes: int
    synthetic: bool
    spacing: dict[str, tuple[float, float, float] | None]


def label_facts(slices: SliceDataset, image_key: str, name: str) -> LabelFacts:
    """Read the labels of every file of ``slices``, checking that each has labels and an image
    ``image_key`` of their shape; ``name`` is the data set's config key, for messages."""
    top, synthetic, spacing = 0, True, {}
    for path, meta in slices.metadata.items():
        if not meta.has_segmentation:
            raise InvalidDataError(
                f"{path}: has no '{SEGMENTATION}' dataset; {name} needs labelled volumes"
            )
        with H5VolumeFile(path) as volume:
            labels = volume._dataset(SEGMENTATION)
            image = volume._dataset(image_key)
            if image.shape != labels.shape or not np.issubdtype(image.dtype, np.floating):
                raise InvalidDataError(
                    f"{path}: '{image_key}' is {image.dtype} {image.shape}; expected real "
                    f"values of the '{SEGMENTATION}' shape {labels.shape}"
                )
            top = max(top, int(volume._read(SEGMENTATION).max()))
        synthetic = synthetic and meta.acquisition == SYNTHETIC_ACQUISITION
        fov, size = meta.recon_fov_mm, meta.recon_size
        on_grid = fov is not None and tuple(labels.shape[1:]) == tuple(size[:2])
        spacing[path.name] = (
            (fov[2] / size[2], fov[0] / size[0], fov[1] / size[1]) if on_grid else None
        )
    return LabelFacts(top + 1, synthetic, spacing)


def class_names(
    num_classes: int, synthetic: bool, binary: bool, foreground: tuple[int, ...] | None
) -> list[str]:
    """Names of the output labels (module docstring)."""
    if synthetic and num_classes == len(TISSUE_CLASSES):
        names = [TISSUE_CLASSES[i] for i in range(num_classes)]
    else:
        names = [f"class_{i}" for i in range(num_classes)]
    if not binary:
        return names
    return ["background", "+".join(names[i] for i in foreground) if foreground else "foreground"]


def segmentation_loss(config: SegmentationConfig, binary: bool) -> DiceCELoss:
    """MONAI's DiceCELoss with the weights of ``config`` (module docstring); call it with logits
    ``(B, C, H, W)`` and labels ``(B, 1, H, W)`` (float 0/1 for one channel, int64 otherwise)."""
    return DiceCELoss(
        include_background=binary,
        sigmoid=binary,
        softmax=not binary,
        to_onehot_y=not binary,
        batch=True,
        smooth_nr=DICE_SMOOTH,
        smooth_dr=DICE_SMOOTH,
        lambda_dice=config.dice,
        lambda_ce=config.ce,
    )


class Logits(nn.Module):
    """``model.forward_logits`` as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.forward_logits(image)


class SegmentationTask:
    """A 1-channel image in, the label map out (module docstring)."""

    best_metric = "dice"

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        if config.data.scale_percentile is not None:
            raise ConfigError(
                "data.scale_percentile: scales k-space, for the reconstruction and multitask "
                "tasks; segmentation normalises its images itself"
            )
        self.config = config
        self.device = device
        self.section = config.segmentation
        self.outputs = config.model_config["num_classes"]
        self.binary = self.outputs == 1
        self.multiple = registry.build_config(config.model, config.model_config).size_multiple
        self.criterion = segmentation_loss(self.section, self.binary)
        self.class_names: list[str] = []
        self.train_set: SegmentationSlices | None = None
        self.spacing: dict[str, tuple[float, float, float] | None] = {}

    @property
    def metrics(self) -> tuple[str, ...]:
        return segmentation_metric_names(self.class_names)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"class_names": self.class_names}

    def trained_module(self, model: nn.Module) -> nn.Module:
        return Logits(model)

    def _slices(self, root: str, **rates: Any) -> SliceDataset:
        data = self.config.data
        return SliceDataset(root, data.challenge, seed=self.config.seed, **rates)

    def _image_key(self, slices: SliceDataset) -> str:
        if self.section.image_key != "target":
            return self.section.image_key
        for path, meta in slices.metadata.items():
            if meta.target_key is None:
                raise InvalidDataError(
                    f"{path}: has no {self.config.data.challenge} target; set "
                    f"segmentation.image_key to the image dataset to segment"
                )
        return next(iter(slices.metadata.values())).target_key

    def _check_classes(self, sets: list[tuple[SliceDataset, str]]) -> None:
        """Compare the model and the section with the data; set the class names and spacings."""
        found = [label_facts(s, self._image_key(s), name) for s, name in sets]
        top = max(facts.classes for facts in found)
        synthetic = all(facts.synthetic for facts in found)
        self.spacing = {k: v for facts in found for k, v in facts.spacing.items()}
        classes = self.section.num_classes
        if classes is None:
            classes = len(TISSUE_CLASSES) if synthetic else top
        if top > classes:
            raise ConfigError(
                f"segmentation.num_classes: {classes}, but the data hold label {top - 1}; "
                f"expected at least {top}"
            )
        if not self.binary and self.outputs != classes:
            raise ConfigError(
                f"model_config.num_classes: {self.outputs} disagrees with the data's {classes} "
                f"label classes (background included); expected {classes}, or 1 for a binary model"
            )
        foreground = self.section.foreground
        if self.binary and foreground is not None and max(foreground) >= classes:
            raise ConfigError(
                f"segmentation.foreground: {list(foreground)}, but the data have labels "
                f"0..{classes - 1}"
            )
        self.class_names = class_names(classes, synthetic, self.binary, foreground)

    def _dataset(self, slices: SliceDataset, augment: bool) -> SegmentationSlices:
        return SegmentationSlices(
            slices,
            self._image_key(slices),
            self.multiple,
            self.binary,
            self.section.foreground,
            augment,
            self.config.seed,
        )

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        data = self.config.data
        train = self._slices(
            data.train, sample_rate=data.sample_rate, volume_sample_rate=data.volume_sample_rate
        )
        check_batchable(train, data.batch_size, "data.train")
        sets = [(train, "data.train")]
        val = None
        if data.val is not None:
            val = self._slices(data.val, volume_sample_rate=data.val_volume_sample_rate)
            check_batchable(val, data.batch_size, "data.val")
            sets.append((val, "data.val"))
        self._check_classes(sets)
        self.train_set = self._dataset(train, self.section.augment)
        return self.train_set, None if val is None else self._dataset(val, False)

    def set_epoch(self, epoch: int) -> None:
        self.train_set.epoch = epoch

    def autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA when ``precision`` is bf16; a no-op otherwise."""
        enabled = self.config.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, torch.bfloat16, enabled=enabled)

    def loss(
        self, model: nn.Module, batch: dict[str, Any], forward: Callable[..., Any]
    ) -> torch.Tensor:
        """The loss of one batch; ``forward`` is :meth:`trained_module` (maybe DDP-wrapped)."""
        with self.autocast():
            logits = forward(batch["image"].to(self.device))
        labels = batch["labels"].to(self.device)[:, None]
        return self.criterion(logits.float(), labels.float() if self.binary else labels)

    def predict(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Label maps ``(B, H', W')`` int64 of images ``(B, 1, H', W')``."""
        with self.autocast():
            logits = model.forward_logits(image.to(self.device)).float()
        return (logits[:, 0] > 0).long() if self.binary else logits.argmax(dim=1)

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Per-class Dice, IoU and HD95 averaged over volumes (module docstring)."""
        slices: VolumeSlices = defaultdict(list)
        for batch in loader:
            predictions = self.predict(model, batch["image"]).cpu()
            for name, index, pred, truth, (top, bottom, left, right) in zip(
                batch["fname"],
                batch["slice_num"].tolist(),
                predictions,
                batch["labels"],
                batch["window"].tolist(),
                strict=True,
            ):
                window = (slice(top, bottom), slice(left, right))
                slices[name].append((index, pred[window], truth[window]))
        return volume_segmentation_metrics(slices, self.class_names, self.spacing)


def segmentation_metric_names(names: list[str]) -> tuple[str, ...]:
    """The validation metrics of classes ``names`` (background first): the means over the
    foreground classes, then each foreground class's."""
    per_class = [f"{m}_{n}" for m in ("dice", "iou", "hd95") for n in names[1:]]
    return ("dice", "iou", "hd95", *per_class)


def volume_segmentation_metrics(
    slices: VolumeSlices,
    names: list[str],
    spacing: dict[str, tuple[float, float, float] | None],
) -> dict[str, float]:
    """Dice, IoU and HD95 of each volume's stacked label maps (module docstring), per foreground
    class of ``names`` and their means, averaged over volumes; ``spacing`` by file name."""
    totals: dict[str, float] = defaultdict(float)
    for fname, items in slices.items():
        pred, truth = stack_volume(items)
        scores = segmentation_metrics(truth, pred, len(names), spacing=spacing[fname])
        for metric, values in scores.items():
            totals[metric] += values.mean().item()
            for name, value in zip(names[1:], values.tolist(), strict=True):
                totals[f"{metric}_{name}"] += value
    return {key: totals[key] / len(slices) for key in segmentation_metric_names(names)}
