"""The reconstruction task of ``kscan train``: data sets, the loss of one batch, validation.

A task object is what :func:`kscan.pipelines.train.train` needs to know about a task; the loop
itself (optimiser, checkpoints, resume, processes, logs) is the same for every task:

- ``datasets()`` -> ``(train, val or None)`` torch Datasets, and ``set_epoch(epoch)``: anything
  random per sample must be seeded from ``(seed, epoch, sample)``, never from a global generator,
  so that a resumed epoch draws the same samples;
- ``loss(model, batch, forward)`` -> the scalar loss, with ``forward`` the (maybe
  DistributedDataParallel-wrapped) module to call and ``model`` the plain one;
- ``trained_module(model)`` -> the module the loop calls (and wraps in DistributedDataParallel)
  as ``forward``: the model itself, or a view of it (segmentation: its logits);
- ``validate(model, loader)`` -> ``{metric: value}``; ``best_metric`` (higher is better) picks
  ``best.safetensors``; ``metrics``: the names ``validate`` returns (the log's columns);
- ``checkpoint_meta()`` -> what the task adds to every checkpoint's metadata (JSON values).

With ``data.scale_percentile`` the model trains on scaled slices (the loss in scaled units, as
DIRECT's) and validation multiplies images and targets back by each slice's factor first.

Validation follows fastMRI's volume conventions: the slices of each volume are stacked, the
volume's SSIM is the mean of its slice SSIMs with the data range L = the target volume's max,
PSNR and NMSE are computed over the whole volume
(:func:`kscan.pipelines.metrics.reconstruction_metrics`), and the values are averaged over
volumes. Every slice of a validation volume is used (``val_volume_sample_rate`` picks volumes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kscan.pipelines.io.slice_dataset import SliceDataset
from kscan.pipelines.kspace_scaling import META_KEY, KspaceScaling
from kscan.pipelines.losses import ReconstructionLoss
from kscan.pipelines.metrics import reconstruction_metrics
from kscan.pipelines.synthetic import center_crop
from kscan.pipelines.train_config import TrainConfig
from kscan.pipelines.train_data import (
    ReconstructionTransform,
    batch_low_frequencies,
    check_batchable,
)

RECONSTRUCTION_METRICS = ("ssim", "psnr", "nmse")

VolumeSlices = dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]
"""File name -> ``(slice_num, prediction, truth)`` of each of its validated slices."""


class ReconstructionTask:
    """Undersampled k-space in, the model's RSS image against the stored target out."""

    best_metric = "ssim"
    metrics = RECONSTRUCTION_METRICS
    transform_class = ReconstructionTransform
    """Makes the samples; a subclass of :class:`ReconstructionTransform` may add to them."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.criterion = ReconstructionLoss(config.loss)
        data = config.data
        masks = (data.mask_kinds, data.accelerations, data.center_fractions, config.seed)
        self.scaling = (
            None if data.scale_percentile is None else KspaceScaling(data.scale_percentile)
        )
        self.train_transform = self.transform_class(*masks, train=True, scaling=self.scaling)
        self.val_transform = self.transform_class(*masks, train=False, scaling=self.scaling)

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        data = self.config.data
        train = SliceDataset(
            data.train,
            data.challenge,
            self.train_transform,
            sample_rate=data.sample_rate,
            volume_sample_rate=data.volume_sample_rate,
            seed=self.config.seed,
        )
        check_batchable(train, data.batch_size, "data.train")
        if data.val is None:
            return train, None
        val = SliceDataset(
            data.val,
            data.challenge,
            self.val_transform,
            volume_sample_rate=data.val_volume_sample_rate,
            seed=self.config.seed,
        )
        check_batchable(val, data.batch_size, "data.val")
        return train, val

    def set_epoch(self, epoch: int) -> None:
        self.train_transform.epoch = epoch

    def trained_module(self, model: nn.Module) -> nn.Module:
        return model

    def checkpoint_meta(self) -> dict[str, Any]:
        return {} if self.scaling is None else {META_KEY: self.scaling.to_meta()}

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        return (
            batch["masked_kspace"].to(self.device),
            batch["mask"].to(self.device),
            batch_low_frequencies(batch),
        )

    def loss(
        self, model: nn.Module, batch: dict[str, Any], forward: Callable[..., Any]
    ) -> torch.Tensor:
        with self.autocast():
            output = forward(*self._inputs(batch), return_iterates=self.criterion.needs_iterates)
        target = batch["target"].to(self.device)
        max_value = batch["max_value"].to(self.device, torch.float64)
        return self.criterion(model, output, target, max_value)

    def autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA when ``precision`` is bf16; a no-op otherwise."""
        enabled = self.config.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Mean over volumes of each volume's SSIM, PSNR and NMSE (module docstring)."""
        slices: VolumeSlices = defaultdict(list)
        for batch in loader:
            with self.autocast():
                kspace = model(*self._inputs(batch))
            target = unscaled(batch["target"], batch)
            images = center_crop(model.image(kspace).float(), tuple(target.shape[-2:])).cpu()
            images = unscaled(images, batch)
            for name, index, pred, truth in zip(
                batch["fname"], batch["slice_num"].tolist(), images, target, strict=True
            ):
                slices[name].append((index, pred, truth))
        return volume_reconstruction_metrics(slices)


def unscaled(images: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """``images`` ``(batch, H, W)`` times each slice's ``kspace_scale``: back at the data's
    intensity scale, so that a volume's slices share one scale for its metrics."""
    return images * batch["kspace_scale"].to(images.dtype).reshape(-1, 1, 1)


def stack_volume(items: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """The predictions and truths of one volume's slices, stacked in slice order."""
    items = sorted(items, key=lambda item: item[0])
    return torch.stack([item[1] for item in items]), torch.stack([item[2] for item in items])


def volume_reconstruction_metrics(slices: VolumeSlices) -> dict[str, float]:
    """SSIM, PSNR and NMSE of each volume's stacked slices (fastMRI's volume conventions, module
    docstring), averaged over volumes."""
    totals = dict.fromkeys(RECONSTRUCTION_METRICS, 0.0)
    for items in slices.values():
        pred, truth = stack_volume(items)
        for key, value in reconstruction_metrics(truth, pred, "fastmri").items():
            totals[key] += value
    return {key: value / len(slices) for key, value in totals.items()}
