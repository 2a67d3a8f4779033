"""Joint and sequential reconstruction + segmentation on a RecurrentVarNet (ATOMMIC's MTLRS idea).

Both models hold an :class:`~kscan.models.rvn.RVN` (``rvn``: ACS coil maps ``S``, estimated once,
refined by its U-Net, and a RecurrentVarNet of ``N`` steps) and segmentation heads
(:class:`~kscan.models.seg_heads.SegmentationHead`, chosen by name). With the measured k-space
``y``, its mask ``M`` and ``K = num_classes``:

**Head input.** The magnitude image is the RSS ``|x| = sqrt(sum_c |F^-1 k_c|^2)`` (the image the
reconstruction loss sees, :meth:`image`), scaled per sample by a differentiable scale::

    q   = quantile_0.995(|x|) over the slice's pixels (torch.quantile, linear; its max if 0; 1 if 0)
    x_n = min(|x| / q, c)                     (batch, H, W) in [0, c], c = seg_heads.INPUT_CEILING

the same mapping as ``kscan segment``'s input normalisation, so heads trained on normalised RSS
images fit.

**Joint** (:class:`JointRecSeg`): ``J`` cascades of ``T = N / J`` RecurrentVarNet steps.
Cascade ``j`` runs steps ``jT .. (j+1)T - 1`` from the previous cascade's k-space and hidden
state (the first from ``y`` and the network's initial state), then its head segments ``x_n`` of
its last k-space. Before the next cascade, the segmentation-weighted images are added to the
hidden state of every Conv-GRU layer ``l``::

    s     = softmax(logits_j)                                 (batch, K, H, W)
    h_l  <- h_l + P_l (x_n s)                                 P_l: 1x1 conv K -> hidden, no bias

``P_l`` is learned (absent when ``J = 1``), initialised to ATOMMIC's tiling: hidden channel
``o`` receives class ``o mod K`` for ``o < K floor(hidden / K)`` and nothing else (ATOMMIC adds
``|x s|`` tiled to the hidden width and zero-filled, with no learned weights). ATOMMIC weights
the un-normalised image; here ``x_n`` keeps the added term of the order of the GRU state
(``[-1, 1]``) whatever the k-space scale. With ``share_head`` every cascade uses one head, else
each has its own (ATOMMIC's layout). Each cascade's first step starts from the previous
cascade's last k-space, so the joint model with ``P = 0`` is the sequential one.

**Sequential** (:class:`SequentialRecSeg`): the ``N`` steps with no feedback, then one head on
``x_n`` of the last k-space. Training is end to end (ATOMMIC's ``task_adaption_type`` other than
``multi_task_learning``: the segmentation loss reaches the reconstruction) unless
``detach_reconstruction``, which segments a detached image (two-stage training).

Both follow the ``multitask`` interface of :mod:`kscan.models.registry` and return a
:class:`MultitaskOutput`: every step's k-space and RSS image (``N`` of each) and the logits of
each segmentation (``J`` for the joint model, 1 for the sequential one). Parameter names:
``rvn.model.*`` and ``rvn.sensitivity_model.*`` (an RVN's state dict with the prefix ``rvn.``),
``heads.<i>.net.*``, ``feedback.<l>.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kscan.config import from_mapping
from kscan.errors import ConfigError
from kscan.models.recurrentvarnet import check_inputs
from kscan.models.rvn import RVN, RVNConfig
from kscan.models.seg_heads import INPUT_CEILING, SegmentationHead, head_config


@dataclass
class MultitaskOutput:
    """What a multitask model returns.

    Attributes:
        kspace_iterates: k-space after each reconstruction step, complex ``(batch, coil, H, W)``.
        image_iterates: their images (:meth:`image`), real ``(batch, H, W)``.
        seg_logits: the logits ``(batch, num_classes, H, W)`` of each segmentation, in order
            (one per joint cascade; one for the sequential and shared-encoder models).
    """

    kspace_iterates: list[torch.Tensor]
    image_iterates: list[torch.Tensor]
    seg_logits: list[torch.Tensor]


def normalized_magnitude(image: torch.Tensor, quantile: float) -> torch.Tensor:
    """``min(|x| / q, INPUT_CEILING)`` per sample, ``q`` the ``quantile`` of ``|x|`` (module docstring).

    ``(batch, H, W)`` real or complex -> ``(batch, H, W)`` real in ``[0, INPUT_CEILING]``; differentiable
    through ``q`` as well as ``|x|``.
    """
    magnitude = image.abs()
    flat = magnitude.flatten(1)
    scale = torch.quantile(flat, quantile, dim=1)
    scale = torch.where(scale > 0, scale, flat.amax(dim=1))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (magnitude / scale[:, None, None]).clamp(max=INPUT_CEILING)


@dataclass
class RecSegConfig:
    """The fields :class:`JointConfig` and :class:`SequentialConfig` share.

    Attributes:
        rvn: the reconstruction network (coil-map refinement and ``N = network.num_steps`` steps).
        num_classes: segmentation classes ``K >= 2``, background included (softmax over them).
        head: the segmentation head: "vmunet", "mhs-vm", "unet" or "attention-unet".
        head_config: that head's settings (:mod:`kscan.models.seg_heads`), without
            ``in_channels`` and ``num_classes``.
        input_quantile: the quantile of ``|x|`` mapped to 1 in the head input.
    """

    rvn: RVNConfig = field(default_factory=RVNConfig)
    num_classes: int = 4
    head: str = "vmunet"
    head_config: dict[str, Any] = field(default_factory=dict)
    input_quantile: float = 0.995

    def __post_init__(self) -> None:
        if isinstance(self.rvn, Mapping):
            self.rvn = from_mapping(RVNConfig, self.rvn, "rvn")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ConfigError(f"num_classes: expected an integer >= 2, got {self.num_classes!r}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes: expected an integer >= 2, got {self.num_classes}")
        if not isinstance(self.head_config, Mapping):
            raise ConfigError(f"head_config: expected a mapping, got {self.head_config!r}")
        self.head_config = dict(self.head_config)
        head_config(self.head, self.head_config, self.num_classes)  # validates
        quantile = self.input_quantile
        if isinstance(quantile, bool) or not isinstance(quantile, int | float):
            raise ConfigError(f"input_quantile: expected a number in (0, 1], got {quantile!r}")
        if not 0 < quantile <= 1:
            raise ConfigError(f"input_quantile: expected a number in (0, 1], got {quantile}")


@dataclass
class JointConfig(RecSegConfig):
    """Configuration of :class:`JointRecSeg`: :class:`RecSegConfig`'s fields plus

    Attributes:
        cascades: joint cascades ``J``; ``rvn.network.num_steps`` must be a multiple of it.
        share_head: one head for every cascade (True) or one per cascade (ATOMMIC).
    """

    cascades: int = 5
    share_head: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.cascades, bool) or not isinstance(self.cascades, int):
            raise ConfigError(f"cascades: expected a positive integer, got {self.cascades!r}")
        steps = self.rvn.network.num_steps
        if self.cascades < 1 or steps % self.cascades:
            raise ConfigError(
                f"cascades: expected a positive divisor of rvn.network.num_steps = {steps}, "
                f"got {self.cascades}"
            )
        if not isinstance(self.share_head, bool):
            raise ConfigError(f"share_head: expected true or false, got {self.share_head!r}")
        hidden = self.rvn.network.recurrent_hidden_channels
        if hidden < self.num_classes:
            raise ConfigError(
                f"rvn.network.recurrent_hidden_channels: expected at least num_classes = "
                f"{self.num_classes} (the feedback tiles the classes over it), got {hidden}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> JointConfig:
        """Build a config from a mapping (parsed YAML); unknown keys raise :class:`ConfigError`."""
        return from_mapping(cls, values)


@dataclass
class SequentialConfig(RecSegConfig):
    """Configuration of :class:`SequentialRecSeg`: :class:`RecSegConfig`'s fields plus

    Attributes:
        detach_reconstruction: segment a detached image, so the segmentation loss does not
            reach the reconstruction (False: end to end).
    """

    detach_reconstruction: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.detach_reconstruction, bool):
            raise ConfigError(
                f"detach_reconstruction: expected true or false, got {self.detach_reconstruction!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SequentialConfig:
        """Build a config from a mapping (parsed YAML); unknown keys raise :class:`ConfigError`."""
        return from_mapping(cls, values)


class _RecSeg(nn.Module):
    """The parts both models share: ``rvn``, ``heads`` and the head input."""

    def __init__(self, config: RecSegConfig, heads: int) -> None:
        super().__init__()
        self.config = config
        self.rvn = RVN(config.rvn)
        self.heads = nn.ModuleList(
            SegmentationHead(config.head, config.head_config, config.num_classes)
            for _ in range(heads)
        )

    @property
    def centered(self) -> bool:
        """The FFT convention of the k-space this network takes."""
        return self.rvn.centered

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def image(self, kspace: torch.Tensor) -> torch.Tensor:
        """RSS over coils of ``F^-1 kspace``: ``(batch, coil, H, W)`` -> ``(batch, H, W)``."""
        return self.rvn.image(kspace)

    def head_input(self, kspace: torch.Tensor) -> torch.Tensor:
        """``x_n`` of ``kspace`` (module docstring), ``(batch, H, W)``."""
        return normalized_magnitude(self.image(kspace), self.config.input_quantile)


class JointRecSeg(_RecSeg):
    """Joint cascades with segmentation feedback into the hidden state (module docstring)."""

    def __init__(self, config: JointConfig | None = None) -> None:
        config = config if config is not None else JointConfig()
        super().__init__(config, 1 if config.share_head else config.cascades)
        network = config.rvn.network
        hidden, classes = network.recurrent_hidden_channels, config.num_classes
        tiling = torch.zeros(hidden, classes, 1, 1)
        for channel in range(classes * (hidden // classes)):
            tiling[channel, channel % classes] = 1
        self.feedback = nn.ModuleList()
        for _ in range(network.recurrent_num_layers if config.cascades > 1 else 0):
            projection = nn.Conv2d(classes, hidden, 1, bias=False)
            with torch.no_grad():
                projection.weight.copy_(tiling)
            self.feedback.append(projection)

    def forward(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        num_low_frequencies: int | None = None,
    ) -> MultitaskOutput:
        """Every step's k-space and image, and each cascade's logits.

        Args:
            masked_kspace: measured k-space, complex ``(batch, coil, H, W)``, zero off the mask.
            mask: 0/1 or boolean mask broadcastable to it.
            num_low_frequencies: centre lines used for the coil maps (found from ``mask`` when None).
        """
        config, network = self.config, self.rvn.model
        maps = self.rvn.sensitivity_maps(masked_kspace, mask, num_low_frequencies)
        check_inputs(masked_kspace, mask, maps)
        state = network.initial_state(masked_kspace, maps)
        steps = network.config.num_steps // config.cascades
        kspace, kspaces, logits = masked_kspace, [], []
        for cascade in range(config.cascades):
            iterates, state = network.iterate(
                kspace,
                masked_kspace,
                mask,
                maps,
                state,
                range(cascade * steps, (cascade + 1) * steps),
            )
            kspace = iterates[-1]
            kspaces.extend(iterates)
            image = self.head_input(kspace)
            logits.append(self.heads[0 if config.share_head else cascade](image))
            if cascade < config.cascades - 1:
                weighted = image[:, None] * torch.softmax(logits[-1], dim=1)
                state = [
                    h + project(weighted) for h, project in zip(state, self.feedback, strict=True)
                ]
        return MultitaskOutput(kspaces, [self.image(k) for k in kspaces], logits)


class SequentialRecSeg(_RecSeg):
    """Reconstruct with all steps, then segment the result (module docstring)."""

    def __init__(self, config: SequentialConfig | None = None) -> None:
        super().__init__(config if config is not None else SequentialConfig(), 1)

    def forward(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        num_low_frequencies: int | None = None,
    ) -> MultitaskOutput:
        """Every step's k-space and image, and the logits of the last image (arguments as
        :meth:`JointRecSeg.forward`)."""
        kspaces = self.rvn(masked_kspace, mask, num_low_frequencies, return_iterates=True)
        image = self.head_input(kspaces[-1])
        if self.config.detach_reconstruction:
            image = image.detach()
        return MultitaskOutput(kspaces, [self.image(k) for k in kspaces], [self.heads[0](image)])
