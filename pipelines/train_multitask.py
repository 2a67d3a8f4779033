"""The multitask task of ``kscan train``: undersampled k-space in, an image and a label map out.

It follows the task interface of :mod:`kscan.pipelines.train_reconstruction` and is that task with
labels added: a sample is the reconstruction sample of
:class:`~kscan.pipelines.train_data.ReconstructionTransform` (k-space undersampled on the fly,
masks seeded exactly as for reconstruction) plus the slice's ``segmentation`` labels::

    masked_kspace, mask, num_low_frequencies, target, max_value, fname, slice_num   (as there)
    labels     (rH, rW) int64    the slice's labels, on the target's grid

The files must hold ``segmentation`` labels of the target's shape (checked for every file at start,
:func:`kscan.pipelines.train_segmentation.label_facts`), so labels and target share one grid: the
centre ``(rH, rW)`` crop of the k-space grid, where the loss and validation crop the model's
images and logits.

**Loss** (:class:`kscan.pipelines.losses_multitask.MultitaskLoss`)::

    loss = rec_weight L_rec + seg_weight L_seg
    L_rec = sum_t a_t (l1 L1(x_t, y) + ssim (1 - SSIM(x_t, y)))                       ``loss``
    L_seg = sum_j b_j (dice (1 - mean_{c >= 1} Dice_c(softmax z_j, l)) + ce CE(z_j, l))

over the model's images ``x_t`` and logits ``z_j``; ``l1``, ``ssim`` and ``iterate_weighting``
(``a`` and ``b``) come from the ``loss`` section, ``rec_weight``, ``seg_weight``, ``dice``, ``ce``
from the ``multitask`` section; each weight multiplies its term once.

**Validation** (every slice of every validation volume, validation masks fixed per volume): the
last image is scored as the reconstruction task scores it (SSIM, PSNR, NMSE with fastMRI's volume
conventions), and the labels ``argmax`` of the last logits, cropped to the target, as the
segmentation task scores them (Dice, IoU, HD95 per foreground class and their means, over
volumes). ``best.safetensors`` follows ``ssim_dice = (ssim + dice) / 2``, the mean of the volume
SSIM and the mean foreground Dice (both in ``[0, 1]``, so neither task alone picks the
checkpoint).

**Classes**: ``model_config.num_classes`` must cover every label in the data; checkpoint metadata
``class_names`` holds the tissue names for kscan synthetic data with 6 classes, else
``class_<i>``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kscan.errors import ConfigError, InvalidDataError
from kscan.pipelines.io.fastmri import SEGMENTATION
from kscan.pipelines.io.slice_dataset import SliceDataset
from kscan.pipelines.losses_multitask import MultitaskLoss
from kscan.pipelines.synthetic import center_crop
from kscan.pipelines.train_config import TrainConfig
from kscan.pipelines.train_data import ReconstructionTransform
from kscan.pipelines.train_reconstruction import (
    RECONSTRUCTION_METRICS,
    ReconstructionTask,
    VolumeSlices,
    unscaled,
    volume_reconstruction_metrics,
)
from kscan.pipelines.train_segmentation import (
    class_names,
    label_facts,
    segmentation_metric_names,
    volume_segmentation_metrics,
)

BEST_METRIC = "ssim_dice"
"""``(ssim + dice) / 2``: picks ``best.safetensors``."""


class LabelledTransform(ReconstructionTransform):
    """The reconstruction sample of a slice plus its ``labels`` ``(rH, rW)`` int64."""

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        sample = super().__call__(item)
        if SEGMENTATION not in item:
            raise InvalidDataError(
                f"{item['fname']}: has no '{SEGMENTATION}' dataset; multitask training needs "
                f"labelled volumes"
            )
        sample["labels"] = item[SEGMENTATION].long()
        return sample


class MultitaskTask(ReconstructionTask):
    """The reconstruction task with labels, a joint loss and both validations (module docstring)."""

    best_metric = BEST_METRIC
    transform_class = LabelledTransform

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        loss, weights = config.loss, config.multitask
        self.criterion = MultitaskLoss(
            rec_weight=weights.rec_weight,
            seg_weight=weights.seg_weight,
            iterate_weighting=loss.iterate_weighting,
            dice_weight=weights.dice,
            ce_weight=weights.ce,
            l1_weight=loss.l1,
            ssim_weight=loss.ssim,
        )
        self.class_names: list[str] = []
        self.spacing: dict[str, tuple[float, float, float] | None] = {}

    @property
    def metrics(self) -> tuple[str, ...]:
        return (*RECONSTRUCTION_METRICS, BEST_METRIC, *segmentation_metric_names(self.class_names))

    def checkpoint_meta(self) -> dict[str, Any]:
        return super().checkpoint_meta() | {"class_names": self.class_names}

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        train, val = super().datasets()
        sets = [(train, "data.train")] + ([] if val is None else [(val, "data.val")])
        self._check_labels(sets)
        return train, val

    def _check_labels(self, sets: list[tuple[SliceDataset, str]]) -> None:
        """Labels on the target grid and within the model's classes; set names and spacings."""
        found = []
        for slices, name in sets:
            for path, meta in slices.metadata.items():
                if meta.target_key is None:
                    raise InvalidDataError(
                        f"{path}: has no {self.config.data.challenge} target; {name} needs "
                        f"reconstruction targets"
                    )
            target_key = next(iter(slices.metadata.values())).target_key
            found.append(label_facts(slices, target_key, name))
        top = max(facts.classes for facts in found)
        classes = self.config.model_config["num_classes"]
        if top > classes:
            raise ConfigError(
                f"model_config.num_classes: {classes}, but the data hold label {top - 1}; "
                f"expected at least {top}"
            )
        synthetic = all(facts.synthetic for facts in found)
        self.spacing = {k: v for facts in found for k, v in facts.spacing.items()}
        self.class_names = class_names(classes, synthetic, False, None)

    def loss(
        self, model: nn.Module, batch: dict[str, Any], forward: Callable[..., Any]
    ) -> torch.Tensor:
        with self.autocast():
            output = forward(*self._inputs(batch))
        target = batch["target"].to(self.device)
        max_value = batch["max_value"].to(self.device, torch.float64)
        labels = batch["labels"].to(self.device)
        return self.criterion(model, output, target, max_value, labels)

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Reconstruction and segmentation metrics averaged over volumes (module docstring)."""
        images: VolumeSlices = defaultdict(list)
        labels: VolumeSlices = defaultdict(list)
        for batch in loader:
            with self.autocast():
                output = model(*self._inputs(batch))
            target = unscaled(batch["target"], batch)
            size = tuple(target.shape[-2:])
            image = unscaled(center_crop(output.image_iterates[-1].float(), size).cpu(), batch)
            predicted = center_crop(output.seg_logits[-1].float(), size).argmax(dim=1).cpu()
            for name, index, pred, truth, pred_labels, true_labels in zip(
                batch["fname"],
                batch["slice_num"].tolist(),
                image,
                target,
                predicted,
                batch["labels"],
                strict=True,
            ):
                images[name].append((index, pred, truth))
                labels[name].append((index, pred_labels, true_labels))
        metrics = volume_reconstruction_metrics(images)
        metrics |= volume_segmentation_metrics(labels, self.class_names, self.spacing)
        metrics[BEST_METRIC] = (metrics["ssim"] + metrics["dice"]) / 2
        return {key: metrics[key] for key in self.metrics}
