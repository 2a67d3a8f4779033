"""The loss of the multitask models: reconstruction plus segmentation, each weight applied once.

For a :class:`~kscan.models.multitask.MultitaskOutput` with image iterates ``x_0 .. x_{T-1}``
and segmentation logits ``z_0 .. z_{J-1}``, the target image ``y`` ``(batch, rH, rW)``, the data
ranges ``L`` ``(batch,)`` and the labels ``l`` ``(batch, h, w)`` (int64, ``0 .. K-1``)::

    L_rec = sum_t a_t (w_l1 L1(x_t, y) + w_ssim (1 - SSIM(x_t, y)))      a = iterate_weights(T)
    L_seg = sum_j b_j (w_dice (1 - mean_{c >= 1} Dice_c(softmax z_j, l)) + w_ce CE(z_j, l))
                                                                        b = iterate_weights(J)
    loss  = rec_weight L_rec + seg_weight L_seg

``L_rec`` is :class:`kscan.pipelines.losses.ReconstructionLoss` (images centre-cropped to ``y``);
the Dice + CE term is :func:`kscan.pipelines.train_segmentation.segmentation_loss` (MONAI's
``DiceCELoss`` over the batch, foreground Dice, smoothing 1e-5) on the logits centre-cropped to
the labels. The same ``iterate_weighting`` weights both lists: "none" uses the last image and the
last segmentation only (ATOMMIC's MTLRS puts its segmentation loss on the last cascade),
"logspace" weights them ``torch.logspace(-1, 0, n)`` normalised to sum 1.

Each of ``rec_weight``, ``seg_weight``, ``l1``, ``ssim``, ``dice``, ``ce`` multiplies its term
exactly once (ATOMMIC's reference code applies the segmentation weight twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kscan.errors import ConfigError
from kscan.models.multitask import MultitaskOutput
from kscan.pipelines.losses import ReconstructionLoss, iterate_weights
from kscan.pipelines.synthetic import center_crop
from kscan.pipelines.train_config import LossConfig, SegmentationConfig
from kscan.pipelines.train_segmentation import segmentation_loss


@dataclass(frozen=True)
class MultitaskTerms:
    """The two weighted parts of the loss and the total (scalars)."""

    reconstruction: torch.Tensor
    segmentation: torch.Tensor
    total: torch.Tensor


class MultitaskLoss:
    """``rec_weight L_rec + seg_weight L_seg`` (module docstring).

    Args:
        rec_weight, seg_weight: weights of the reconstruction and segmentation losses (>= 0).
        iterate_weighting: "none" or "logspace", for image iterates and segmentations alike.
        dice_weight, ce_weight: weights of the Dice loss and the cross-entropy in ``L_seg``.
        l1_weight, ssim_weight: weights of L1 and ``1 - SSIM`` in ``L_rec``.
    """

    def __init__(
        self,
        rec_weight: float = 1.0,
        seg_weight: float = 1.0,
        iterate_weighting: str = "none",
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        l1_weight: float = 1.0,
        ssim_weight: float = 0.0,
    ) -> None:
        for name, value in (("rec_weight", rec_weight), ("seg_weight", seg_weight)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name}: expected a number >= 0, got {value!r}")
        self.rec_weight = float(rec_weight)
        self.seg_weight = float(seg_weight)
        self.iterate_weighting = iterate_weighting
        self.reconstruction = ReconstructionLoss(
            LossConfig(l1=l1_weight, ssim=ssim_weight, iterate_weighting=iterate_weighting)
        )
        self.dice_ce = segmentation_loss(
            SegmentationConfig(dice=dice_weight, ce=ce_weight), binary=False
        )

    def segmentation(self, logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """``L_seg`` of the logits ``(batch, K, H, W)`` against labels ``(batch, h, w)`` int64."""
        weights = iterate_weights(len(logits), self.iterate_weighting)
        total = labels.new_zeros((), dtype=torch.float32)
        for z, weight in zip(logits, weights.tolist(), strict=True):
            if weight:
                cropped = center_crop(z.float(), tuple(labels.shape[-2:]))
                total = total + weight * self.dice_ce(cropped, labels[:, None])
        return total

    def terms(
        self,
        model: nn.Module,
        output: MultitaskOutput,
        target: torch.Tensor,
        max_value: torch.Tensor,
        labels: torch.Tensor,
    ) -> MultitaskTerms:
        """``L_rec``, ``L_seg`` (unweighted by ``rec_weight``/``seg_weight``) and the total."""
        rec = self.reconstruction(model, output.kspace_iterates, target, max_value)
        seg = self.segmentation(output.seg_logits, labels)
        return MultitaskTerms(rec, seg, self.rec_weight * rec + self.seg_weight * seg)

    def __call__(
        self,
        model: nn.Module,
        output: MultitaskOutput,
        target: torch.Tensor,
        max_value: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """The total loss (a scalar); arguments as in the module docstring."""
        return self.terms(model, output, target, max_value, labels).total
