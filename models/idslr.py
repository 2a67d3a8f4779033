"""IDSLR (ATOMMIC): an unrolled coil-wise U-Net with proximal data consistency and a segmentation
decoder that shares the U-Net's encoder.

With the measured k-space ``y`` ``(batch, C, H, W)`` (``C = config.coils``, fixed per model), its
mask ``M`` and one U-Net :class:`~kscan.models.unet.UNet2d` ``U`` with ``2C`` input and output
channels (the real parts of the ``C`` coil images, then their imaginary parts), shared by all
``n`` iterations, from ``k_0 = y``::

    for i in 0 .. n-1:
        z_i     = F^-1 k_i                                     coil images (batch, C, H, W)
        u       = G(z_i)                                       2 groups (real, imaginary parts):
                                                               (u_g - mean_g) / std_g per sample
        f_i     = U.encode(u)                                  the encoder's features
        x_i     = G^-1(U.decode(f_i)) + z_i                    residual, de-normalised
        k_i+1   = (y + lambda F x_i) / (M + lambda)            proximal data consistency

``lambda`` is learned (:class:`~kscan.physics.consistency.ProximalDC`, initialised to 1); for a
0/1 mask and ``y`` zero off it the step is ``argmin_k ||M k - y||^2 + lambda ||k - F x_i||^2``.
The segmentation decoder ``D`` (the U-Net's decoder layers, ``num_classes`` outputs) reads the
magnitudes of the *last* iteration's encoder features, as ATOMMIC's IDSLR does (every skip and
the bottom, ``|f_(n-1)|``), so it segments the image the last iteration started from::

    logits = D(|f_(n-1)|)                                      (batch, num_classes, H, W)

The image is the RSS over coils of ``F^-1 k_n`` (ATOMMIC combines coils with given SENSE maps;
this model has none). Any ``H, W`` that :class:`~kscan.models.unet.UNet2d` accepts works.
Parameter names: ``unet.*``, ``segmentation_decoder.*``, ``dc.lam``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kscan.config import from_mapping
from kscan.errors import ConfigError, ShapeError
from kscan.models.multitask import MultitaskOutput
from kscan.models.recurrentvarnet import check_inputs
from kscan.models.unet import UNet2d, UNetDecoder2d
from kscan.physics import coils
from kscan.physics.consistency import ProximalDC
from kscan.physics.fft import fft2c, ifft2c

_GROUPS = 2


@dataclass
class IDSLRConfig:
    """Hyper-parameters of :class:`IDSLR` (defaults: ATOMMIC's IDSLR, 4 segmentation classes).

    Attributes:
        coils: coils ``C`` of the k-space the model takes (the U-Net has ``2C`` channels).
        num_classes: segmentation classes, background included (at least 2).
        num_filters: channels of the U-Net's first level.
        num_pool_layers: U-Net depth.
        iterations: unrolled iterations ``n`` (shared weights).
        dropout: dropout probability of the U-Net's convolution blocks.
        centered: centered orthonormal FFT (fastMRI) or uncentered.
    """

    coils: int = 8
    num_classes: int = 4
    num_filters: int = 32
    num_pool_layers: int = 4
    iterations: int = 5
    dropout: float = 0.0
    centered: bool = True

    def __post_init__(self) -> None:
        check_coil_unet_config(self, ("iterations",), ("centered",))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> IDSLRConfig:
        """Build a config from a mapping (parsed YAML); unknown keys raise :class:`ConfigError`."""
        return from_mapping(cls, values)


def check_coil_unet_config(config: Any, counts: tuple[str, ...], flags: tuple[str, ...]) -> None:
    """The checks of a coil-wise U-Net model's config (:class:`IDSLRConfig` and the like):
    ``coils``, ``num_filters``, ``num_pool_layers`` and ``counts`` positive integers,
    ``num_classes >= 2``, ``dropout`` in ``[0, 1)``, ``flags`` booleans. Raises
    :class:`ConfigError` naming the field."""
    for name in ("coils", "num_filters", "num_pool_layers", *counts):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    classes = config.num_classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ConfigError(f"num_classes: expected an integer >= 2, got {classes!r}")
    dropout = config.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout: expected a number in [0, 1), got {dropout!r}")
    for name in flags:
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name}: expected true or false, got {getattr(config, name)!r}")


def _to_channels(images: torch.Tensor) -> torch.Tensor:
    """Complex ``(batch, C, H, W)`` -> real ``(batch, 2C, H, W)``: real parts, then imaginary."""
    return torch.cat([images.real, images.imag], dim=1)


def _from_channels(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_to_channels`."""
    real, imag = x.chunk(2, dim=1)
    return torch.complex(real, imag)


class CoilWiseMultitask(nn.Module):
    """What the coil-wise U-Net multitask models (:class:`IDSLR`, SegNet) share: the FFT
    convention and class count of their ``config``, and the RSS image of a k-space."""

    config: Any

    @property
    def centered(self) -> bool:
        """The FFT convention of the k-space this network takes."""
        return self.config.centered

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def image(self, kspace: torch.Tensor) -> torch.Tensor:
        """RSS over coils of ``F^-1 kspace``: ``(batch, coil, H, W)`` -> ``(batch, H, W)``."""
        return coils.rss(ifft2c(kspace, self.centered))


class IDSLR(CoilWiseMultitask):
    """Unrolled U-Net reconstruction with a shared-encoder segmentation decoder (module docstring)."""

    def __init__(self, config: IDSLRConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else IDSLRConfig()
        channels = 2 * config.coils
        self.unet = UNet2d(
            channels, channels, config.num_filters, config.num_pool_layers, config.dropout
        )
        self.segmentation_decoder = UNetDecoder2d(
            config.num_classes, config.num_filters, config.num_pool_layers, config.dropout
        )
        self.dc = ProximalDC(lam=1.0)

    def forward(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        num_low_frequencies: int | None = None,
    ) -> MultitaskOutput:
        """Each iteration's k-space and image, and the logits of the shared-encoder decoder.

        Args:
            masked_kspace: measured k-space, complex ``(batch, coils, H, W)``, zero off the mask.
            mask: 0/1 or boolean mask broadcastable to it.
            num_low_frequencies: unused (this model estimates no coil maps); accepted for the
                multitask interface.
        """
        check_coil_kspace(masked_kspace, mask, self.config.coils)
        mask = mask.to(masked_kspace.real.dtype)
        kspace, kspaces = masked_kspace, []
        for _ in range(self.config.iterations):
            kspace, features = unrolled_step(
                self.unet, self.dc, kspace, masked_kspace, mask, self.centered, residual=True
            )
            kspaces.append(kspace)
        logits = self.segmentation_decoder([f.abs() for f in features])
        return MultitaskOutput(kspaces, [self.image(k) for k in kspaces], [logits])


def check_coil_kspace(kspace: torch.Tensor, mask: torch.Tensor, coils: int) -> None:
    """:func:`~kscan.models.recurrentvarnet.check_inputs`, and exactly ``coils`` coils (the
    coil-wise U-Nets' channel count is fixed)."""
    check_inputs(kspace, mask)
    if kspace.shape[1] != coils:
        raise ShapeError(
            f"masked_kspace: expected {coils} coils (config.coils), got {kspace.shape[1]}"
        )


def unrolled_step(
    unet: UNet2d,
    dc: ProximalDC,
    kspace: torch.Tensor,
    measured: torch.Tensor,
    mask: torch.Tensor,
    centered: bool,
    residual: bool,
    normalize: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One unrolled iteration on coil-wise images (module docstring): ``z = F^-1 kspace``; the
    U-Net on ``z``'s ``2C`` real channels, group-normalised (``normalize``) and de-normalised;
    ``x = out + z`` with ``residual``, else ``out``; then ``dc(F x, measured, mask)``.

    Returns the new k-space ``(batch, C, H, W)`` and the U-Net encoder's features (for a
    segmentation decoder)."""
    images = ifft2c(kspace, centered)
    x = _to_channels(images)
    grouped = x.reshape(x.shape[0], _GROUPS, -1)
    mean = torch.zeros_like(grouped[..., :1])
    std = torch.ones_like(mean)
    if normalize:
        mean = grouped.mean(dim=-1, keepdim=True)
        std = grouped.std(dim=-1, keepdim=True)
        std = torch.where(std > 0, std, torch.ones_like(std))
    features = unet.encode(((grouped - mean) / std).reshape(x.shape))
    out = _from_channels(
        (unet.decode(features).reshape(grouped.shape) * std + mean).reshape(x.shape)
    )
    if residual:
        out = out + images
    return dc(fft2c(out, centered), measured, mask), features
