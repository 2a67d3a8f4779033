"""RecurrentVarNet as DIRECT's engine runs it: ACS coil maps, a learned refinement, the network.

From measured k-space ``y`` ``(batch, coil, H, W)`` and its mask::

    S0 = acs_maps(y)                        Gaussian-weighted centre lines (DIRECT's estimate)
    S  = sensitivity_model(S0)              U-Net refinement, RSS-normalised (optional)
    k_T = RecurrentVarNet(y, mask, S)       k-space after T steps
    image = sqrt(sum_c |F^-1 k_T,c|^2)      (batch, H, W)

The children are named ``model`` and ``sensitivity_model``, so the state dict of :class:`RVN` is
a DIRECT checkpoint's ``model`` and ``sensitivity_model`` entries with those prefixes. This is the
``rvn`` network of the model registry and follows its reconstruction interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kscan.config import from_mapping
from kscan.errors import ConfigError
from kscan.models.recurrentvarnet import RecurrentVarNet, RecurrentVarNetConfig
from kscan.models.sensitivity import SensitivityModel
from kscan.physics.coilmaps import acs_maps


@dataclass
class RVNConfig:
    """Configuration of :class:`RVN`.

    Attributes:
        network: the RecurrentVarNet's hyper-parameters.
        learned_sensitivity: refine the ACS maps with a U-Net (DIRECT's ``sensitivity_model``).
        sensitivity_filters: channels of that U-Net's first level.
        sensitivity_pools: its depth.
        gaussian_sigma: width of the Gaussian window on the ACS lines (0 = unweighted).
    """

    network: RecurrentVarNetConfig = field(default_factory=RecurrentVarNetConfig)
    learned_sensitivity: bool = True
    sensitivity_filters: int = 8
    sensitivity_pools: int = 4
    gaussian_sigma: float = 0.7

    def __post_init__(self) -> None:
        if isinstance(self.network, Mapping):
            self.network = from_mapping(RecurrentVarNetConfig, self.network, "network")
        if not isinstance(self.learned_sensitivity, bool):
            raise ConfigError(
                f"learned_sensitivity: expected true or false, got {self.learned_sensitivity!r}"
            )
        for name in ("sensitivity_filters", "sensitivity_pools"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.gaussian_sigma, int | float) or self.gaussian_sigma < 0:
            raise ConfigError(
                f"gaussian_sigma: expected a number >= 0, got {self.gaussian_sigma!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RVNConfig:
        """Build a config from a mapping (parsed YAML); unknown keys raise :class:`ConfigError`."""
        return from_mapping(cls, values)


class RVN(nn.Module):
    """ACS maps, optional U-Net refinement and a RecurrentVarNet (see the module docstring)."""

    def __init__(self, config: RVNConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else RVNConfig()
        self.model = RecurrentVarNet(config.network)
        self.sensitivity_model = (
            SensitivityModel(config.sensitivity_filters, config.sensitivity_pools)
            if config.learned_sensitivity
            else None
        )

    @property
    def centered(self) -> bool:
        """The FFT convention of the k-space this network takes."""
        return self.config.network.centered

    def sensitivity_maps(
        self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | None
    ) -> torch.Tensor:
        """Coil maps ``(batch, coil, H, W)`` from the centre lines, refined when configured."""
        maps = acs_maps(
            masked_kspace,
            num_low_frequencies,
            mask,
            gaussian_sigma=self.config.gaussian_sigma or None,
            centered=self.centered,
        )
        return maps if self.sensitivity_model is None else self.sensitivity_model(maps)

    def forward(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        num_low_frequencies: int | None = None,
        return_iterates: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """k-space ``(batch, coil, H, W)`` after the last step (or the list of every step's).

        Args:
            masked_kspace: measured k-space, complex ``(batch, coil, H, W)``, zero off the mask.
            mask: 0/1 or boolean mask broadcastable to it (``(batch, 1, 1, W)``, ...).
            num_low_frequencies: centre lines used for the coil maps (found from ``mask`` when None).
            return_iterates: return every step's k-space.
        """
        maps = self.sensitivity_maps(masked_kspace, mask, num_low_frequencies)
        return self.model(masked_kspace, mask, maps, return_iterates=return_iterates)

    def image(self, kspace: torch.Tensor) -> torch.Tensor:
        """Root sum of squares over coils of ``F^-1 kspace``: ``(batch, coil, H, W)`` -> ``(batch, H, W)``."""
        return self.model.rss_image(kspace)
