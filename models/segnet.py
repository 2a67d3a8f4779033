"""SegNet (ATOMMIC's; Sun et al., IPMI 2019, "Joint CS-MRI reconstruction and segmentation with a
unified deep network"): ``J`` cascades, each with its own coil-wise U-Net and its own
segmentation decoder on that U-Net's encoder, the ``J`` segmentations fused at the end.

With the measured k-space ``y`` ``(batch, C, H, W)`` (``C = config.coils``, fixed per model), its
mask ``M``, and for cascade ``j`` a U-Net :class:`~kscan.models.unet.UNet2d` ``U_j`` with ``2C``
input and output channels (the coil images' real parts, then their imaginary parts) and a
decoder ``D_j`` (:class:`~kscan.models.unet.UNetDecoder2d`, ``K = num_classes`` outputs), from
``k_0 = y``::

    for j in 0 .. J-1:
        z_j    = F^-1 k_j                                      coil images (batch, C, H, W)
        u      = G(z_j)                                        2 groups (real, imaginary parts):
                                                               (u_g - mean_g) / std_g per sample
        f_j    = U_j.encode(u)                                 the encoder's features
        x_j    = G^-1(U_j.decode(f_j))                         de-normalised, no residual
        s_j    = D_j(|f_j|)                                    (batch, K, H, W)
        k_j+1  = (y + lambda F x_j) / (M + lambda)             proximal data consistency
    s = relu(W * [s_0, ..., s_(J-1)])                          W: 3x3 conv, K J -> K, no bias

One ``lambda`` serves every cascade (:class:`~kscan.physics.consistency.ProximalDC`, learned,
initialised to 1), as in ATOMMIC. The step is :func:`kscan.models.idslr.unrolled_step`, IDSLR's
without the residual; IDSLR shares one U-Net over its iterations and segments once, SegNet has
``J`` of each.

Differences from ATOMMIC's SegNet, each for a stated reason:

- ``normalize`` defaults to true (ATOMMIC's default is false): the U-Nets then see the same range
  whatever the k-space's scale.
- ATOMMIC min-max normalises the fused map over the whole batch and takes its absolute value.
  kscan keeps ``s`` as logits (softmax in the loss, argmax for labels), because a batch-wide
  normalisation would make one slice's labels depend on the other slices in its batch.
- The image is the RSS over coils of ``F^-1 k_J``; ATOMMIC combines the coils with given SENSE
  maps, and this model has none.

The output's ``seg_logits`` are ``[s_0, ..., s_(J-1), s]``: the loss weights them like the image
iterates (``loss.iterate_weighting``; ATOMMIC averages them), and inference uses ``s``.
Parameter names: ``unets.<j>.*``, ``segmentation_decoders.<j>.*``, ``fusion.weight``, ``dc.lam``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kscan.config import from_mapping
from kscan.models.idslr import (
    CoilWiseMultitask,
    check_coil_kspace,
    check_coil_unet_config,
    unrolled_step,
)
from kscan.models.multitask import MultitaskOutput
from kscan.models.unet import UNet2d, UNetDecoder2d
from kscan.physics.consistency import ProximalDC


@dataclass
class SegNetConfig:
    """Hyper-parameters of :class:`SegNet` (defaults: ATOMMIC's SegNet, 4 segmentation classes).

    Attributes:
        coils: coils ``C`` of the k-space the model takes (each U-Net has ``2C`` channels).
        num_classes: segmentation classes, background included (at least 2).
        num_filters: channels of each U-Net's first level.
        num_pool_layers: U-Net depth.
        cascades: ``J``, each with its own U-Net and segmentation decoder.
        dropout: dropout probability of the U-Nets' convolution blocks.
        normalize: group-normalise each U-Net's input (module docstring).
        centered: centered orthonormal FFT (fastMRI) or uncentered.
    """

    coils: int = 8
    num_classes: int = 4
    num_filters: int = 32
    num_pool_layers: int = 4
    cascades: int = 5
    dropout: float = 0.0
    normalize: bool = True
    centered: bool = True

    def __post_init__(self) -> None:
        check_coil_unet_config(self, ("cascades",), ("normalize", "centered"))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SegNetConfig:
        """Build a config from a mapping (parsed YAML); unknown keys raise ``ConfigError``."""
        return from_mapping(cls, values)


class SegNet(CoilWiseMultitask):
    """Cascades of coil-wise U-Nets, each with a segmentation decoder, fused (module docstring)."""

    def __init__(self, config: SegNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else SegNetConfig()
        channels = 2 * config.coils
        unet = (config.num_filters, config.num_pool_layers, config.dropout)
        self.unets = nn.ModuleList(
            UNet2d(channels, channels, *unet) for _ in range(config.cascades)
        )
        self.segmentation_decoders = nn.ModuleList(
            UNetDecoder2d(config.num_classes, *unet) for _ in range(config.cascades)
        )
        classes = config.num_classes
        self.fusion = nn.Conv2d(classes * config.cascades, classes, 3, padding=1, bias=False)
        self.dc = ProximalDC(lam=1.0)

    def forward(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        num_low_frequencies: int | None = None,
    ) -> MultitaskOutput:
        """Each cascade's k-space and image; each cascade's logits, then the fused logits.
        The arguments are :meth:`kscan.models.idslr.IDSLR.forward`'s."""
        check_coil_kspace(masked_kspace, mask, self.config.coils)
        mask = mask.to(masked_kspace.real.dtype)
        kspace, kspaces, logits = masked_kspace, [], []
        for unet, decoder in zip(self.unets, self.segmentation_decoders, strict=True):
            kspace, features = unrolled_step(
                unet,
                self.dc,
                kspace,
                masked_kspace,
                mask,
                self.centered,
                residual=False,
                normalize=self.config.normalize,
            )
            kspaces.append(kspace)
            logits.append(decoder([f.abs() for f in features]))
        fused = torch.relu(self.fusion(torch.cat(logits, dim=1)))
        return MultitaskOutput(kspaces, [self.image(k) for k in kspaces], [*logits, fused])
