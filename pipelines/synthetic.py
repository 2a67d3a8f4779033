"""Synthetic multi-coil MRI data: a Shepp-Logan phantom seen through simulated birdcage coils.

Everything here is seeded, so a phantom is reproducible from its arguments.

- ``shepp_logan(shape)``: scikit-image's modified Shepp-Logan phantom resampled to ``(H, W)``,
  with an optional smooth background phase (real scans are never real-valued).
- ``birdcage_maps(num_coils, shape)``: coil sensitivities of ``num_coils`` loops evenly spaced on
  a circle of radius ``radius`` (in units of the half field of view) around the object; each map
  falls off as ``1 / distance`` and carries the coil's angular phase, normalised so that
  ``sum_c |S_c|^2 = 1`` everywhere.
- ``simulate_multicoil``: ``kspace_c = F(S_c x) + noise`` with complex Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import resize

from kscan.errors import ShapeError
from kscan.physics.coils import expand
from kscan.physics.fft import fft2c


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 8:
        raise ShapeError(f"phantom shape: expected (H, W) with both sides >= 8, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def shepp_logan(shape: tuple[int, int], phase: float = 0.5, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    """Complex Shepp-Logan phantom ``(H, W)`` with magnitude in [0, 1].

    The phase is the smooth field ``phase * (0.6 u + 0.4 v^2)`` over normalised coordinates
    ``u, v`` in [-1, 1] (0 gives a real image).
    """
    h, w = _check_shape(shape)
    magnitude = resize(shepp_logan_phantom(), (h, w), anti_aliasing=True, preserve_range=True)
    v, u = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    field = phase * (0.6 * u + 0.4 * v**2)
    image = np.clip(magnitude, 0, None) * np.exp(1j * field)
    return torch.from_numpy(image).to(dtype)


def birdcage_maps(
    num_coils: int, shape: tuple[int, int], radius: float = 1.5, dtype: torch.dtype = torch.complex64
) -> torch.Tensor:
    """Birdcage coil sensitivities ``(num_coils, H, W)`` normalised to ``sum_c |S_c|^2 = 1``."""
    h, w = _check_shape(shape)
    if num_coils < 1:
        raise ShapeError(f"num_coils: expected at least 1, got {num_coils}")
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    maps = []
    for c in range(num_coils):
        angle = 2 * np.pi * c / num_coils
        dx, dy = x - radius * np.cos(angle), y - radius * np.sin(angle)
        distance = np.hypot(dx, dy)
        maps.append(np.exp(1j * (np.arctan2(dy, dx) + angle)) / distance)
    stack = np.stack(maps)
    stack /= np.sqrt((np.abs(stack) ** 2).sum(axis=0, keepdims=True))
    return torch.from_numpy(stack).to(dtype)


@dataclass(frozen=True)
class MultiCoilPhantom:
    """A simulated fully sampled acquisition.

    Attributes:
        image: ground-truth complex image ``(H, W)``.
        maps: coil sensitivities ``(coil, H, W)``, ``sum_c |S_c|^2 = 1``.
        kspace: fully sampled centered k-space ``(coil, H, W)`` with noise.
    """

    image: torch.Tensor
    maps: torch.Tensor
    kspace: torch.Tensor


def simulate_multicoil(
    shape: tuple[int, int] = (128, 128),
    num_coils: int = 8,
    noise: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.complex64,
) -> MultiCoilPhantom:
    """Simulate ``kspace_c = F(S_c x) + n`` with ``n`` complex Gaussian.

    ``noise`` is the noise standard deviation relative to the root-mean-square of the noiseless
    k-space (so 0.01 is an SNR of about 40 dB over k-space as a whole).
    """
    image = shepp_logan(shape, dtype=dtype)
    maps = birdcage_maps(num_coils, shape, dtype=dtype)
    kspace = fft2c(expand(image, maps))
    generator = torch.Generator().manual_seed(seed)
    scale = noise * kspace.abs().square().mean().sqrt() / np.sqrt(2)
    real_dtype = kspace.real.dtype
    n = torch.complex(
        torch.randn(kspace.shape, generator=generator, dtype=real_dtype),
        torch.randn(kspace.shape, generator=generator, dtype=real_dtype),
    )
    return MultiCoilPhantom(image=image, maps=maps, kspace=kspace + scale * n)
