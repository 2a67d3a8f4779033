"""End-to-end Variational Network (Sriram et al., MICCAI 2020), laid out as fastMRI lays it out.

With the measured, masked k-space ``y`` ``(batch, coil, H, W)`` and the sampling mask ``M``, the
network first estimates coil maps from the centre of k-space, then runs ``T`` cascades on k-space
from ``k_0 = y``. With ``R(x) = sum_c conj(S_c) x_c`` and ``E(x)_c = S_c x`` (:mod:`kscan.physics.coils`)::

    S      = N(U_s(F^-1 (W y)))                  W: the centre lines, U_s per coil, N: divide by RSS
    for t in 0 .. T-1:
        k_t+1 = k_t - eta_t M (k_t - y) - F(E(U_t(R(F^-1 k_t))))

``eta_t`` (``dc_weight``) is one learned scalar per cascade, initialised to 1; the regulariser
term is *subtracted* (RecurrentVarNet adds it). ``U_t`` and ``U_s`` are :class:`NormUnet` s: a
U-Net on the 2 real channels (real, imaginary) of a complex image, standardised per channel and
zero-padded to a multiple of 16. The output is the k-space ``k_T``; fastMRI's ``VarNet`` returns
its image, the root sum of squares over coils of ``F^-1 k_T`` (:meth:`VarNet.image`).

Module and parameter names (``sens_net.norm_unet.unet.*``, ``cascades.<i>.dc_weight``,
``cascades.<i>.model.unet.*``) are fastMRI's, so a fastMRI state dict loads with ``strict=True``;
the U-Net is :class:`kscan.models.unet.UNet2d`, whose layers and names are fastMRI's ``Unet``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kscan.config import from_mapping, to_mapping
from kscan.errors import ConfigError, ShapeError
from kscan.models.sensitivity import rss_normalize
from kscan.models.unet import UNet2d
from kscan.physics import coils
from kscan.physics.checks import require_complex, require_ndim
from kscan.physics.coilmaps import center_lines
from kscan.physics.consistency import soft_dc
from kscan.physics.fft import complex_to_real, fft2c, ifft2c, real_to_complex

_PAD_MULTIPLE = 16


@dataclass
class VarNetConfig:
    """Hyper-parameters of :class:`VarNet`; the defaults are fastMRI's leaderboard model.

    Attributes:
        num_cascades: number of cascades ``T``.
        chans: channels of the first level of each cascade's U-Net.
        pools: depth (pooling layers) of each cascade's U-Net.
        sens_chans: channels of the first level of the sensitivity U-Net.
        sens_pools: depth of the sensitivity U-Net.
        mask_center: estimate the coil maps from the centre lines only (fastMRI's default) or
            from all of the masked k-space.
        centered: centered orthonormal FFT (fastMRI) or uncentered.
    """

    num_cascades: int = 12
    chans: int = 18
    pools: int = 4
    sens_chans: int = 8
    sens_pools: int = 4
    mask_center: bool = True
    centered: bool = True

    def __post_init__(self) -> None:
        for name in ("num_cascades", "chans", "pools", "sens_chans", "sens_pools"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("mask_center", "centered"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VarNetConfig:
        """Build a config from a mapping (parsed YAML); unknown keys raise :class:`ConfigError`."""
        return from_mapping(cls, values)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict; ``from_dict(config.to_dict()) == config``."""
        return to_mapping(self)


class NormUnet(nn.Module):
    """A U-Net on a complex image, standardised and padded as fastMRI's ``NormUnet``.

    For a complex image ``x`` ``(batch, H, W)`` with channels ``x_r, x_i`` (real, imaginary)::

        z_j = pad((x_j - mean_j) / std_j)        mean, unbiased std over the H W pixels of channel j
        out = crop(UNet2d(z))_j std_j + mean_j   back to complex (batch, H, W)

    ``pad`` adds zeros to reach the next multiple of 16 in H and W (half before, the rest after);
    ``crop`` removes them. A constant channel (``std = 0``) is divided by 1 (fastMRI: by 0).
    The U-Net is :attr:`unet` (fastMRI's key names ``unet.*``).
    """

    def __init__(self, chans: int, pools: int) -> None:
        super().__init__()
        self.unet = UNet2d(2, 2, chans, pools)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Complex ``(batch, H, W)`` -> complex ``(batch, H, W)``."""
        x = complex_to_real(image).permute(0, 3, 1, 2)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.flatten(-2).std(dim=-1)[..., None, None]
        std = torch.where(std > 0, std, 1)
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % _PAD_MULTIPLE, -width % _PAD_MULTIPLE
        top, left = pad_h // 2, pad_w // 2
        x = F.pad((x - mean) / std, (left, pad_w - left, top, pad_h - top))
        x = self.unet(x)[..., top : top + height, left : left + width] * std + mean
        return real_to_complex(x.permute(0, 2, 3, 1))


def low_frequency_window(
    mask: torch.Tensor,
    batch: int,
    width: int,
    num_low_frequencies: int | None = None,
    centered: bool = True,
) -> torch.Tensor:
    """fastMRI's centre lines for the sensitivity estimate, as a bool ``(batch, 1, 1, W)``.

    With ``n`` centre lines, the window keeps lines ``pad .. pad + n - 1``, ``pad = (W - n + 1) // 2``
    (in the centered layout; for ``centered=False`` the window is ``ifftshift`` ed). ``n`` is
    ``num_low_frequencies`` when given (and not 0), else, per sample, the largest symmetric block
    around ``W // 2`` inside the mask's run of sampled lines through ``W // 2``:
    ``n = max(2 min(left, right), 1)`` with ``left`` sampled lines just below ``W // 2`` and
    ``right`` from ``W // 2`` up (:func:`kscan.physics.coilmaps.center_lines`). A line counts as
    sampled when the mask is non-zero all along H (fastMRI reads row 0). Where the run reaches an
    edge of k-space (a fully sampled half), fastMRI's search finds no end and uses ``n = 1``; here
    the run is counted.

    Args:
        mask: real or bool mask broadcastable to ``(batch, coil, H, W)``.
        batch, width: ``batch`` and ``W`` of the k-space.
        num_low_frequencies: the number of centre lines, the same for every sample.
        centered: the layout of the mask (centre at ``W // 2``, or at 0 for uncentered data).

    Raises:
        ShapeError: ``num_low_frequencies`` outside ``[0, W]``.
        MaskError: ``num_low_frequencies`` is not given and line ``W // 2`` is not sampled.
    """
    if num_low_frequencies:
        if not 0 < num_low_frequencies <= width:
            raise ShapeError(
                f"num_low_frequencies: expected 0 <= n <= W={width}, got {num_low_frequencies}"
            )
        counts = [num_low_frequencies] * batch
    else:
        lines = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        lines = lines.expand(*lines.shape[:-1], width)
        if not centered:
            lines = torch.fft.fftshift(lines, dim=-1)
        counts = []
        for sample in range(batch):
            start, count = center_lines(lines[sample if lines.shape[0] > 1 else 0])
            left, right = width // 2 - start, start + count - width // 2
            counts.append(max(2 * min(left, right), 1))
    index = torch.arange(width, device=mask.device)
    starts = torch.tensor([(width - n + 1) // 2 for n in counts], device=mask.device)
    stops = starts + torch.tensor(counts, device=mask.device)
    window = (index >= starts[:, None]) & (index < stops[:, None])
    if not centered:
        window = torch.fft.ifftshift(window, dim=-1)
    return window[:, None, None, :]


class VarNetSensitivityModel(nn.Module):
    """Coil maps from the centre of k-space, as fastMRI's ``SensitivityModel``.

    ``S = rss_normalize(U(F^-1 (W y)))`` where ``W`` is :func:`low_frequency_window` (all ones
    without ``mask_center``) and ``U`` is a :class:`NormUnet` applied to each coil image (coils
    moved into the batch). ``sum_c |S_c|^2 = 1`` wherever any coil is non-zero.
    The U-Net is :attr:`norm_unet` (fastMRI's keys ``norm_unet.unet.*``).
    """

    def __init__(
        self, chans: int, pools: int, mask_center: bool = True, centered: bool = True
    ) -> None:
        super().__init__()
        self.norm_unet = NormUnet(chans, pools)
        self.mask_center = mask_center
        self.centered = centered

    def forward(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        num_low_frequencies: int | None = None,
    ) -> torch.Tensor:
        """Complex ``(batch, coil, H, W)`` k-space and its mask -> complex maps ``(batch, coil, H, W)``."""
        batch, coil, height, width = masked_kspace.shape
        if self.mask_center:
            window = low_frequency_window(
                mask, batch, width, num_low_frequencies, centered=self.centered
            )
            masked_kspace = masked_kspace * window
        images = ifft2c(masked_kspace, self.centered).reshape(batch * coil, height, width)
        return rss_normalize(self.norm_unet(images).reshape(batch, coil, height, width))


class VarNetBlock(nn.Module):
    """One cascade ``k' = k - eta M (k - y) - F(E(model(R(F^-1 k))))``, ``eta`` = :attr:`dc_weight`.

    Args:
        model: the regulariser, complex ``(batch, H, W)`` -> complex ``(batch, H, W)``
            (a :class:`NormUnet` in :class:`VarNet`; fastMRI's key ``model``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(
        self,
        kspace: torch.Tensor,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        sensitivity_map: torch.Tensor,
        centered: bool = True,
    ) -> torch.Tensor:
        """k-space ``k``, measured ``y``, mask ``M``, maps ``S`` ``(batch, coil, H, W)`` -> next ``k``."""
        image = coils.reduce(ifft2c(kspace, centered), sensitivity_map)
        model_term = fft2c(coils.expand(self.model(image), sensitivity_map), centered)
        return soft_dc(kspace, masked_kspace, mask, self.dc_weight) - model_term


class VarNet(nn.Module):
    """End-to-end VarNet on native complex k-space (see the module docstring)."""

    def __init__(self, config: VarNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else VarNetConfig()
        self.sens_net = VarNetSensitivityModel(
            config.sens_chans, config.sens_pools, config.mask_center, config.centered
        )
        self.cascades = nn.ModuleList(
            VarNetBlock(NormUnet(config.chans, config.pools)) for _ in range(config.num_cascades)
        )

    @property
    def centered(self) -> bool:
        """The FFT convention of the k-space this network takes."""
        return self.config.centered

    def forward(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        num_low_frequencies: int | None = None,
        return_iterates: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Reconstructed k-space ``k_T``.

        Args:
            masked_kspace: measured k-space ``y`` ``(batch, coil, H, W)``, complex, zero off the mask.
            mask: 0/1 (or boolean) sampling mask broadcastable to ``(batch, coil, H, W)``, e.g.
                ``(batch, 1, 1, W)``; it multiplies ``k - y`` and locates the centre lines.
            num_low_frequencies: centre lines for the coil maps (see :func:`low_frequency_window`);
                None (or 0): found in the mask.
            return_iterates: return ``[k_1, ..., k_T]`` instead of ``k_T``.

        Returns:
            k-space ``(batch, coil, H, W)``, complex, or the list of it after every cascade.
        """
        _check_inputs(masked_kspace, mask)
        maps = self.sens_net(masked_kspace, mask, num_low_frequencies)
        kspace, iterates = masked_kspace, []
        for cascade in self.cascades:
            kspace = cascade(kspace, masked_kspace, mask, maps, self.centered)
            iterates.append(kspace)
        return iterates if return_iterates else kspace

    def image(self, kspace: torch.Tensor) -> torch.Tensor:
        """Root sum of squares over coils of ``F^-1 kspace``: ``(batch, coil, H, W)`` -> ``(batch, H, W)``."""
        return coils.rss(ifft2c(kspace, self.centered))


def _check_inputs(kspace: torch.Tensor, mask: torch.Tensor) -> None:
    """Shapes and dtypes of the forward arguments, with messages naming the argument."""
    require_complex(kspace, "masked_kspace")
    require_ndim(kspace, "masked_kspace", 4, "(batch, coil, H, W)")
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        found = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ShapeError(f"mask: expected a real or boolean tensor, got {found}")
    try:
        fits = torch.broadcast_shapes(mask.shape, kspace.shape) == kspace.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ShapeError(
            f"mask: expected a shape broadcastable to masked_kspace {tuple(kspace.shape)}, "
            f"got {tuple(mask.shape)}"
        )
