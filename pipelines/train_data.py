"""Reconstruction training samples: fully sampled slices, undersampled on the fly.

:class:`ReconstructionTransform` turns a :class:`~kscan.pipelines.io.slice_dataset.SliceDataset`
item into a training sample::

    masked_kspace        (coils, H, W) complex64   kspace * mask (+ 0.0), columns outside the
                                                     header's padding zeroed
    mask                 (1, 1, W) or (1, H, W) float32
    num_low_frequencies  int                        fully sampled centre columns of the mask
    target               (rH, rW) float32           the file's target, as stored
    max_value            float                      the target volume's max (SSIM data range)
    kspace_scale         float                      1, or with a scaling rule the slice's factor
                                                     s, by which masked_kspace, target and
                                                     max_value are then divided
    fname, slice_num

The mask is drawn with a ``numpy.random.RandomState`` seeded by

- training: ``(seed, epoch, *seed_from_name(fname, slice_num))``: a new mask per slice and epoch,
  and the same one again when a resumed run redoes that epoch;
- validation: ``seed_from_name(fname)``: one mask per volume, the same in every epoch and run.
  With one mask kind and one (acceleration, centre fraction) pair this is exactly the mask
  ``kscan undersample`` writes for the file (:func:`kscan.pipelines.undersample.volume_mask`).

With several kinds, the kind is drawn first (``randint(len(kinds))``) from the same generator;
with one kind nothing is drawn for it, so the masks are fastMRI's for the same seed.

Batches: ``default_collate`` stacks samples, so a batch needs slices of one k-space and target
size; :func:`check_batchable` refuses a data set of mixed sizes when ``batch_size > 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kscan.errors import ConfigError, InvalidDataError
from kscan.physics.masks import Mask, apply_mask, make_mask, seed_from_name
from kscan.pipelines.io.slice_dataset import SliceDataset
from kscan.pipelines.kspace_scaling import KspaceScaling


def draw_mask(
    kinds: Sequence[str],
    shape: tuple[int, int],
    accelerations: Sequence[float],
    center_fractions: Sequence[float],
    seed: Sequence[int],
    padding: tuple[int, int] | None = None,
) -> Mask:
    """A mask of one of ``kinds`` for k-space of ``shape`` ``(H, W)``, drawn from ``seed``.

    ``padding = (left, right)`` zeroes the columns outside ``[left, right)`` (fastMRI's header
    padding), as :func:`kscan.pipelines.undersample.volume_mask` does.
    """
    rng = np.random.RandomState(list(seed))
    kind = kinds[0] if len(kinds) == 1 else kinds[rng.randint(len(kinds))]
    mask = make_mask(
        kind,
        shape,
        acceleration=list(accelerations),
        center_fraction=list(center_fractions),
        seed=rng,
    )
    if padding is None or tuple(padding) == (0, shape[-1]):
        return mask
    return mask.restrict(*padding)


class ReconstructionTransform:
    """SliceDataset item -> training sample (module docstring).

    Args:
        kinds, accelerations, center_fractions: the mask choices (``DataConfig``).
        seed: the run's seed (training masks only).
        train: training masks (new per epoch) or validation masks (fixed per volume).
        scaling: the k-space scaling rule, or None.

    Set :attr:`epoch` before each epoch; DataLoader workers copy it when they start.
    """

    def __init__(
        self,
        kinds: Sequence[str],
        accelerations: Sequence[float],
        center_fractions: Sequence[float],
        seed: int,
        train: bool,
        scaling: KspaceScaling | None = None,
    ) -> None:
        self.scaling = scaling
        self.kinds = tuple(kinds)
        self.accelerations = tuple(accelerations)
        self.center_fractions = tuple(center_fractions)
        self.seed = seed
        self.train = train
        self.epoch = 0

    def mask_seed(self, fname: str, slice_num: int) -> tuple[int, ...]:
        if self.train:
            return (self.seed, self.epoch, *seed_from_name(fname, slice_num))
        return seed_from_name(fname)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        fname, slice_num, meta = item["fname"], item["slice_num"], item["metadata"]
        if "mask" in item:
            raise InvalidDataError(
                f"{fname}: holds undersampled (test-style) k-space; training needs fully sampled "
                f"files with targets"
            )
        if "target" not in item:
            raise InvalidDataError(
                f"{fname}: has no {meta.get('target_key') or 'target'} dataset; training needs "
                f"the reconstruction target"
            )
        kspace = item["kspace"]
        mask = draw_mask(
            self.kinds,
            tuple(kspace.shape[-2:]),
            self.accelerations,
            self.center_fractions,
            self.mask_seed(fname, slice_num),
            (meta["padding_left"], meta["padding_right"]),
        )
        target = item["target"]
        max_value = float(meta.get("max", float(target.max())))
        masked = apply_mask(kspace, mask)
        scale = 1.0 if self.scaling is None else float(self.scaling.factors(masked[None])[0])
        return {
            "masked_kspace": masked / scale,
            "mask": mask.mask[None],
            "num_low_frequencies": mask.center_lines,
            "target": target / scale,
            "max_value": max_value / scale,
            "kspace_scale": scale,
            "fname": fname,
            "slice_num": slice_num,
        }


def check_batchable(dataset: SliceDataset, batch_size: int, name: str) -> None:
    """Refuse ``batch_size > 1`` over volumes of different k-space or target sizes."""
    if batch_size == 1:
        return
    sizes = {(meta.matrix_size, meta.recon_size) for meta in dataset.metadata.values()}
    if len(sizes) > 1:
        shapes = sorted(f"{m[0]}x{m[1]} -> {r[0]}x{r[1]}" for m, r in sizes)
        raise ConfigError(
            f"data.batch_size: {batch_size} needs volumes of one size, but {name} holds "
            f"k-space -> target sizes {', '.join(shapes)}; use batch_size 1"
        )


def batch_low_frequencies(batch: dict[str, Any]) -> int:
    """The centre columns sampled in every item of a batch (the smallest count: the blocks are
    nested around the centre)."""
    return int(torch.as_tensor(batch["num_low_frequencies"]).min())
