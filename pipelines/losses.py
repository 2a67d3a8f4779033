"""Reconstruction losses on magnitude images ``(batch, H, W)``: L1, SSIM, weighted sums over iterates.

With the reconstruction ``x`` (the model's RSS image, centre-cropped to the target's size), the
target ``y`` and each item's data range ``L_b`` (its volume's max)::

    L1(x, y)   = mean_{b,i,j} |x - y|
    SSIM(x, y) = mean_b SSIM_7x7(y_b, x_b; L_b)     kscan.pipelines.metrics.ssim (fastMRI's SSIM)
    term(x)    = w_l1 L1(x, y) + w_ssim (1 - SSIM(x, y))
    loss       = sum_t a_t term(x_t)                 over the iterates x_0 .. x_{T-1}

with the iterate weights ``a`` of :func:`iterate_weights`. Each weight multiplies its term once
and nowhere else (ATOMMIC applies its segmentation weight twice: kscan does not).
"""

from __future__ import annotations

import torch
from torch import nn

from kscan.errors import ConfigError
from kscan.pipelines.metrics import ssim
from kscan.pipelines.synthetic import center_crop
from kscan.pipelines.train_config import ITERATE_WEIGHTINGS, LossConfig


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all items and pixels."""
    return (pred - target).abs().mean()


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, max_value: torch.Tensor) -> torch.Tensor:
    """``1 - mean_b SSIM(target_b, pred_b)`` with data range ``max_value[b]``; ``(batch, H, W)``.

    The SSIM is computed in float64 by :func:`kscan.pipelines.metrics.ssim`; the loss is returned in
    ``pred``'s dtype.
    """
    value = ssim(target, pred, data_range=max_value.detach())
    return (1 - value.mean()).to(pred.dtype)


def iterate_weights(count: int, weighting: str) -> torch.Tensor:
    """Weights ``a_t`` of ``count`` iterates (float64, summing to 1).

    ``"none"``: ``(0, ..., 0, 1)``, the last iterate only. ``"logspace"``:
    ``a_t = 10^(-1 + t / (count - 1)) / sum_u 10^(-1 + u / (count - 1))``, i.e.
    ``torch.logspace(-1, 0, count)`` normalised, from 0.1 (first) to 1 (last) before normalising.
    """
    if count < 1:
        raise ConfigError(f"iterates: expected at least one, got {count}")
    if weighting == "none":
        weights = torch.zeros(count, dtype=torch.float64)
        weights[-1] = 1
        return weights
    if weighting == "logspace":
        weights = torch.logspace(-1, 0, count, dtype=torch.float64)
        return weights / weights.sum()
    raise ConfigError(
        f"iterate_weighting: expected one of {', '.join(ITERATE_WEIGHTINGS)}, got {weighting!r}"
    )


class ReconstructionLoss:
    """The loss of the module docstring for a config's weights.

    Call it with the model, its output (one k-space, or the list of iterates), the targets
    ``(batch, rH, rW)`` and ``max_value`` ``(batch,)``; it returns the loss (a scalar).
    """

    def __init__(self, config: LossConfig) -> None:
        self.config = config

    def term(
        self, image: torch.Tensor, target: torch.Tensor, max_value: torch.Tensor
    ) -> torch.Tensor:
        """``w_l1 L1 + w_ssim (1 - SSIM)`` of one image batch (terms of weight 0 are skipped)."""
        total = image.new_zeros(())
        if self.config.l1:
            total = total + self.config.l1 * l1_loss(image, target)
        if self.config.ssim:
            total = total + self.config.ssim * ssim_loss(image, target, max_value)
        return total

    def __call__(
        self,
        model: nn.Module,
        output: torch.Tensor | list[torch.Tensor],
        target: torch.Tensor,
        max_value: torch.Tensor,
    ) -> torch.Tensor:
        kspaces = output if isinstance(output, list) else [output]
        weights = iterate_weights(len(kspaces), self.config.iterate_weighting)
        total = target.new_zeros((), dtype=torch.float32)
        for kspace, weight in zip(kspaces, weights.tolist(), strict=True):
            if weight == 0:
                continue
            image = center_crop(model.image(kspace).float(), tuple(target.shape[-2:]))
            total = total + weight * self.term(image, target, max_value)
        return total

    @property
    def needs_iterates(self) -> bool:
        """Whether the model must return every iterate (not only the last)."""
        return self.config.iterate_weighting != "none"
