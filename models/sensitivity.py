"""Learned refinement of coil sensitivity maps, as DIRECT's engines apply their ``sensitivity_model``.

Starting from estimated maps ``S0`` ``(batch, coil, H, W)`` (DIRECT's estimate is
:func:`kscan.physics.coilmaps.acs_maps`), each coil's map goes through one 2D U-Net on 2 real
channels (real, imaginary), with the coils moved into the batch, and the result is normalised by
the root sum of squares over coils::

    U_c = unet(S0_c)                         (skipped when there is one coil, as in DIRECT)
    S_c = U_c / sqrt(sum_c |U_c|^2)          (0 where the root sum of squares is 0)

so ``sum_c |S_c|^2 = 1`` wherever any coil is non-zero. Instance normalisation acts per sample,
so coils in the batch give exactly DIRECT's coil-by-coil loop.
"""

from __future__ import annotations

import torch
from torch import nn

from kscan.models.unet import UNet2d
from kscan.physics.checks import require_complex, require_ndim
from kscan.physics.coils import rss
from kscan.physics.fft import complex_to_real, real_to_complex


def rss_normalize(maps: torch.Tensor) -> torch.Tensor:
    """``S_c / sqrt(sum_c |S_c|^2)`` for complex maps ``(batch, coil, H, W)``; 0 where the RSS is 0."""
    norm = rss(maps).unsqueeze(-3)
    return torch.where(norm > 0, maps / torch.where(norm > 0, norm, 1), 0)


class SensitivityModel(nn.Module):
    """U-Net refinement and RSS normalisation of coil maps (see the module docstring).

    Args:
        num_filters: channels of the U-Net's first level (DIRECT's RecurrentVarNet configs: 8).
        num_pool_layers: U-Net depth (DIRECT: 4).
        dropout_probability: dropout of the U-Net's convolution blocks (training only).

    The U-Net is :attr:`unet`; its state dict has DIRECT's ``sensitivity_model`` key names.
    """

    def __init__(
        self, num_filters: int = 8, num_pool_layers: int = 4, dropout_probability: float = 0.0
    ) -> None:
        super().__init__()
        self.unet = UNet2d(2, 2, num_filters, num_pool_layers, dropout_probability)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Refined, normalised maps: complex ``(batch, coil, H, W)`` -> complex ``(batch, coil, H, W)``."""
        require_complex(maps, "sensitivity_map")
        require_ndim(maps, "sensitivity_map", 4, "(batch, coil, H, W)")
        if maps.shape[1] > 1:
            maps = self._refine(maps)
        return rss_normalize(maps)

    def _refine(self, maps: torch.Tensor) -> torch.Tensor:
        """The U-Net on every coil map, coils in the batch, channels (real, imaginary)."""
        batch, coil, height, width = maps.shape
        channels = complex_to_real(maps.reshape(batch * coil, height, width)).permute(0, 3, 1, 2)
        refined = self.unet(channels.contiguous())
        return real_to_complex(refined.permute(0, 2, 3, 1)).reshape(batch, coil, height, width)
