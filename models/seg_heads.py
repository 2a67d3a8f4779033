"""Segmentation heads of the multitask models, chosen by name, on padded magnitude images.

A head maps a normalised magnitude image ``(batch, 1, H, W)`` to logits
``(batch, num_classes, H, W)``; :class:`SegmentationHead` pads the image with zeros to the head's
size multiple (half before, the rest after, as :class:`kscan.models.varnet.NormUnet` pads) and
crops the logits back, so any ``H, W`` works.

=================  =============================================  ===========================
name               network                                        ``head_config`` dataclass
=================  =============================================  ===========================
``vmunet``         :class:`kscan.models.vmunet.VMUNet`            ``VMUNetConfig``
``mhs-vm``         :class:`kscan.models.mhs.MHSVM`                ``MHSVMConfig``
``unet``           MONAI ``UNet`` (2D, residual units)            :class:`UNetHeadConfig`
``attention-unet`` MONAI ``AttentionUnet`` (2D)                   :class:`AttentionUNetHeadConfig`
=================  =============================================  ===========================

``in_channels`` (1) and ``num_classes`` come from the multitask model's config, never from
``head_config``. The size multiple is ``4 * 2^(stages - 1)`` for the VM-UNets and the product of
the strides for the MONAI networks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import AttentionUnet, UNet
from torch import nn
from torch.nn import functional as F

from kscan.config import from_mapping
from kscan.errors import ConfigError, ShapeError
from kscan.models.mhs import MHSVM, MHSVMConfig
from kscan.models.vmunet import VMUNet, VMUNetConfig

HEADS = ("vmunet", "mhs-vm", "unet", "attention-unet")

INPUT_CEILING = 4.0
"""Normalised magnitude images are ``min(|x| / q, INPUT_CEILING)`` with ``q`` a robust maximum
(the 99.5th percentile): tissue brighter than ``q`` keeps its contrast (a small bright structure
such as fluid can lie above the percentile), and only outliers beyond 4 q saturate. Shared by
``kscan segment``, segmentation training and the multitask models' head input."""
_SET_BY_MODEL = ("in_channels", "num_classes")


def _positive_ints(name: str, values: Any, minimum: int = 1) -> tuple[int, ...]:
    if isinstance(values, str) or not isinstance(values, list | tuple) or not values:
        raise ConfigError(f"{name}: expected a non-empty list of integers, got {values!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name}: expected integers >= {minimum}, got {list(values)}")
    return tuple(values)


@dataclass
class AttentionUNetHeadConfig:
    """MONAI ``AttentionUnet`` settings: ``channels`` per level, ``strides`` between levels
    (one fewer), dropout. The defaults are a 4-level network (16 .. 128 channels)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.channels = _positive_ints("channels", self.channels)
        self.strides = _positive_ints("strides", self.strides)
        if len(self.strides) != len(self.channels) - 1:
            raise ConfigError(
                f"strides: expected {len(self.channels) - 1} values (one fewer than channels), "
                f"got {list(self.strides)}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ConfigError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")

    @property
    def size_multiple(self) -> int:
        return math.prod(self.strides)


@dataclass
class UNetHeadConfig(AttentionUNetHeadConfig):
    """MONAI ``UNet`` settings: :class:`AttentionUNetHeadConfig`'s plus ``num_res_units``."""

    num_res_units: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_res_units, bool) or not isinstance(self.num_res_units, int):
            raise ConfigError(
                f"num_res_units: expected an integer >= 0, got {self.num_res_units!r}"
            )
        if self.num_res_units < 0:
            raise ConfigError(f"num_res_units: expected an integer >= 0, got {self.num_res_units}")


_CONFIGS: dict[str, type] = {
    "vmunet": VMUNetConfig,
    "mhs-vm": MHSVMConfig,
    "unet": UNetHeadConfig,
    "attention-unet": AttentionUNetHeadConfig,
}


def head_config(name: str, values: Mapping[str, Any] | None, num_classes: int) -> Any:
    """The config dataclass of head ``name`` from ``values`` (``head_config`` of a model config).

    Raises :class:`ConfigError` for an unknown head, an unknown key, or ``in_channels`` /
    ``num_classes`` in ``values`` (the model sets them).
    """
    if name not in _CONFIGS:
        raise ConfigError(f"head: expected one of {', '.join(HEADS)}, got {name!r}")
    values = dict(values or {})
    for key in _SET_BY_MODEL:
        if key in values:
            raise ConfigError(
                f"head_config.{key}: set by the multitask model (in_channels 1, num_classes from "
                f"its config), remove it"
            )
    if name in ("vmunet", "mhs-vm"):
        values.update(in_channels=1, num_classes=num_classes)
    return from_mapping(_CONFIGS[name], values, "head_config")


class SegmentationHead(nn.Module):
    """Head ``name`` (module docstring) as ``(batch, H, W)`` image -> logits ``(batch, K, H, W)``.

    The network is the child ``net``; ``size_multiple`` is its size constraint.
    """

    def __init__(self, name: str, values: Mapping[str, Any] | None, num_classes: int) -> None:
        super().__init__()
        config = head_config(name, values, num_classes)
        self.size_multiple: int = config.size_multiple
        self.net: nn.Module
        if name == "vmunet":
            self.net = VMUNet(config)
        elif name == "mhs-vm":
            self.net = MHSVM(config)
        elif name == "unet":
            self.net = UNet(
                2,
                1,
                num_classes,
                config.channels,
                config.strides,
                num_res_units=config.num_res_units,
                dropout=config.dropout,
            )
        else:
            self.net = AttentionUnet(
                2, 1, num_classes, config.channels, config.strides, dropout=config.dropout
            )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Real ``(batch, H, W)`` -> logits ``(batch, num_classes, H, W)`` (padded, run, cropped)."""
        if image.ndim != 3 or image.is_complex():
            raise ShapeError(
                f"image: expected a real (batch, H, W) tensor, got {tuple(image.shape)}"
            )
        height, width = image.shape[-2:]
        pad_h, pad_w = -height % self.size_multiple, -width % self.size_multiple
        top, left = pad_h // 2, pad_w // 2
        x = F.pad(image[:, None], (left, pad_w - left, top, pad_h - top))
        logits = self.net.forward_logits(x) if isinstance(self.net, VMUNet) else self.net(x)
        return logits[..., top : top + height, left : left + width]
