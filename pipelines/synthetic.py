"""Synthetic multi-coil MRI data: a Shepp-Logan phantom seen through simulated birdcage coils.

Everything here is seeded, so a phantom is reproducible from its arguments.

- ``shepp_logan(shape)``: scikit-image's modified Shepp-Logan phantom resampled to ``(H, W)``,
  with an optional smooth background phase (real scans are never real-valued).
- ``birdcage_maps(num_coils, shape)``: coil sensitivities of ``num_coils`` loops evenly spaced on
  a circle of radius ``radius`` (in units of the half field of view) around the object; each map
  falls off as ``1 / distance`` and carries the coil's angular phase, normalised so that
  ``sum_c |S_c|^2 = 1`` everywhere.
- ``simulate_multicoil``: ``kspace_c = F(S_c x) + noise`` with complex Gaussian noise.
- ``random_birdcage_maps``: birdcage maps with a seeded random rotation and elliptical scaling of
  the coil ring.
- ``simulate_volume``: a fastMRI-like multi-coil volume of an anatomy-like phantom
  (:mod:`kscan.pipelines.anatomy`) with its labels, RSS target and coil maps, as numpy arrays.
- ``from_magnitude``: the same for any magnitude volume (retrospective simulation).

**SNR.** ``snr_db = 10 log10(P / sigma^2)`` where ``P`` is the mean of ``|k|^2`` over the whole
noiseless multi-coil k-space of the volume (slices, coils, H, W) and ``sigma^2 = E|n|^2`` the
variance of the complex noise (``sigma^2 / 2`` on each of the real and imaginary parts). The FFT is
unitary, so ``P`` is also the mean of ``|S_c x|^2`` over the image grid, background included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import resize

from kscan.errors import ConfigError, InvalidDataError, ShapeError
from kscan.physics.coils import expand, rss
from kscan.physics.fft import fft2c, ifft2c
from kscan.pipelines.anatomy import MIN_SIZE, Seed, anatomy_phantom, smooth_phase

_AXES = (-2, -1)
_TINY = 1e-9
"""Smallest coil-to-pixel distance, so that a coil exactly on a grid point stays finite."""


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 8:
        raise ShapeError(f"phantom shape: expected (H, W) with both sides >= 8, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def shepp_logan(
    shape: tuple[int, int], phase: float = 0.5, dtype: torch.dtype = torch.complex64
) -> torch.Tensor:
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
    num_coils: int,
    shape: tuple[int, int],
    radius: float = 1.5,
    dtype: torch.dtype = torch.complex64,
    *,
    rotation: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    extent: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Birdcage coil sensitivities ``(num_coils, H, W)`` normalised to ``sum_c |S_c|^2 = 1``.

    The grid spans ``[-extent_y, extent_y] x [-extent_x, extent_x]`` (``extent = (2, 1)`` puts
    the unit field of view in the central half of H, like a 2x-oversampled readout). Coil ``c``
    sits at angle ``a_c = 2 pi c / num_coils + rotation`` on the ellipse
    ``p_c = radius * (scale_y sin a_c, scale_x cos a_c)`` and sees
    ``S_c(p) = exp(i (arg(p - p_c) + a_c)) / |p - p_c|`` before normalisation.
    """
    h, w = _check_shape(shape)
    if num_coils < 1:
        raise ShapeError(f"num_coils: expected at least 1, got {num_coils}")
    y, x = np.meshgrid(
        np.linspace(-extent[0], extent[0], h), np.linspace(-extent[1], extent[1], w), indexing="ij"
    )
    maps = []
    for c in range(num_coils):
        angle = 2 * np.pi * c / num_coils + rotation
        dx, dy = x - radius * scale[1] * np.cos(angle), y - radius * scale[0] * np.sin(angle)
        distance = np.maximum(np.hypot(dx, dy), _TINY)
        maps.append(np.exp(1j * (np.arctan2(dy, dx) + angle)) / distance)
    stack = np.stack(maps)
    stack /= np.sqrt((np.abs(stack) ** 2).sum(axis=0, keepdims=True))
    return torch.from_numpy(stack).to(dtype)


def random_birdcage_maps(
    num_coils: int,
    shape: tuple[int, int],
    seed: Seed = 0,
    radius: float = 1.5,
    extent: tuple[float, float] = (1.0, 1.0),
    dtype: torch.dtype = torch.complex64,
) -> torch.Tensor:
    """:func:`birdcage_maps` with the ring rotated by ``U[0, 2 pi)`` and its two semi-axes scaled
    by independent ``U[0.9, 1.15]`` factors drawn from ``seed`` (an int or numpy Generator)."""
    rng = np.random.default_rng(seed)
    rotation = rng.uniform(0, 2 * np.pi)
    scale = (rng.uniform(0.9, 1.15), rng.uniform(0.9, 1.15))
    return birdcage_maps(
        num_coils, shape, radius, dtype, rotation=rotation, scale=scale, extent=extent
    )


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


COIL_RANGE = (4, 32)
"""Coil counts that :func:`simulate_volume` and :func:`from_magnitude` accept."""


@dataclass(frozen=True)
class SimulatedVolume:
    """A simulated fully sampled multi-coil volume, as numpy arrays.

    Attributes:
        kspace: centered k-space ``(slices, coils, H, W)`` complex64, noise included.
        target: ``(slices, rH, rW)`` float32, the RSS over coils of ``ifft2c(kspace)``
            center-cropped to the recon size (fastMRI's ``reconstruction_rss``).
        labels: ``(slices, rH, rW)`` uint8 tissue classes aligned with ``target`` (ids of
            :data:`kscan.pipelines.anatomy.TISSUE_CLASSES`), or None when there are none.
        maps: coil sensitivities ``(slices, coils, H, W)`` complex64 with ``sum_c |S_c|^2 = 1``
            (one coil geometry per volume: a read-only broadcast view over slices).
        image: noiseless complex ground truth ``(slices, H, W)`` complex64; ``kspace`` is
            ``fft2c(maps * image) + noise``.
        noise_std: ``sigma`` of the complex noise, ``E|n|^2 = sigma^2`` (0 when noiseless).
    """

    kspace: np.ndarray
    target: np.ndarray
    labels: np.ndarray | None
    maps: np.ndarray
    image: np.ndarray
    noise_std: float


def center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centred ``size`` window of the last two axes, starting at ``(n - crop) // 2`` (fastMRI)."""
    (h, w), (ch, cw) = x.shape[-2:], size
    if not (0 < ch <= h and 0 < cw <= w):
        raise ShapeError(f"crop size: expected at most the image size {(h, w)}, got {tuple(size)}")
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


def rss_target(kspace: np.ndarray, recon_size: tuple[int, int]) -> np.ndarray:
    """fastMRI's RSS target ``(slices, rH, rW)`` float32 of k-space ``(slices, coils, H, W)``.

    ``crop(sqrt(sum_c |ifft2c(k_c)|^2))``, one slice at a time. Cropping and the shifts of the
    centered FFT only permute or select pixels, and the RSS acts pixel by pixel, so this equals
    fastMRI's complex crop before the magnitude and is computed as
    ``crop(fftshift(rss(ifft2(ifftshift(k)))))``: only one shift touches all coils.
    """
    if kspace.ndim != 4:
        raise ShapeError(f"kspace: expected (slices, coils, H, W), got {kspace.shape}")
    out = np.empty((kspace.shape[0], *recon_size), dtype=np.float32)
    for s, slice_kspace in enumerate(kspace):
        unshifted = torch.from_numpy(np.fft.ifftshift(slice_kspace, axes=_AXES))
        magnitude = rss(ifft2c(unshifted, centered=False)).numpy()
        out[s] = center_crop(np.fft.fftshift(magnitude, axes=_AXES), recon_size)
    return out


def _check_coils(coils: int) -> int:
    low, high = COIL_RANGE
    if not (isinstance(coils, int | np.integer) and low <= coils <= high):
        raise ConfigError(f"coils: expected an integer from {low} to {high}, got {coils!r}")
    return int(coils)


def _check_snr(snr_db: float | None) -> None:
    if snr_db is not None and not np.isfinite(snr_db):
        raise ConfigError(
            f"snr_db: expected a finite number of dB or None (no noise), got {snr_db!r}"
        )


def _check_grid(shape_kspace: tuple[int, int], recon_size: tuple[int, int], min_size: int) -> None:
    if len(recon_size) != 2 or min(recon_size) < min_size:
        raise ShapeError(
            f"recon_size: expected (rH, rW) with both >= {min_size}, got {tuple(recon_size)}"
        )
    if len(shape_kspace) != 2 or any(n < r for n, r in zip(shape_kspace, recon_size, strict=True)):
        raise ShapeError(
            f"shape_kspace: expected (H, W) at least the recon size {tuple(recon_size)}, "
            f"got {tuple(shape_kspace)}"
        )


def _pad(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero-pad ``(slices, rH, rW)`` to ``(slices, H, W)`` so that :func:`center_crop` undoes it."""
    out = np.zeros((image.shape[0], *shape), dtype=image.dtype)
    center_crop(out, image.shape[-2:])[...] = image
    return out


def _acquire(
    image: np.ndarray, maps: np.ndarray, snr_db: float | None, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """``kspace[s] = fft2c(S image[s]) + n`` ``(slices, coils, H, W)``, and the noise ``sigma``.

    With ``sum_c |S_c|^2 = 1`` and a unitary FFT the noiseless power is
    ``P = sum |image|^2 / (slices * coils * H * W)``, so ``sigma^2 = P / 10^(snr_db / 10)`` is known
    before any FFT. ``ifftshift(S_c x) = ifftshift(S_c) ifftshift(x)``, so the maps are shifted
    once and each slice's image once; the complex64 noise (``sigma^2 / 2`` per part) is added to
    the uncentered spectrum before the one shift that centers it.
    """
    s, (c, h, w) = image.shape[0], maps.shape
    power = float(np.vdot(image, image).real) / (s * h * w) / c
    sigma = 0.0 if snr_db is None else float(np.sqrt(power / 10 ** (snr_db / 10)))
    kspace = np.empty((s, c, h, w), dtype=np.complex64)
    coil_maps = torch.from_numpy(np.fft.ifftshift(maps, axes=_AXES))
    for i in range(s):
        slice_image = torch.from_numpy(np.fft.ifftshift(image[i], axes=_AXES))
        spectrum = fft2c(expand(slice_image, coil_maps), centered=False).numpy()
        if snr_db is not None:
            parts = rng.standard_normal((c, h, 2 * w), dtype=np.float32)
            spectrum += np.float32(sigma / np.sqrt(2)) * parts.view(np.complex64)
        kspace[i] = np.fft.fftshift(spectrum, axes=_AXES)
    return kspace, sigma


def _volume(
    image: np.ndarray,
    labels: np.ndarray | None,
    shape_kspace: tuple[int, int],
    coils: int,
    snr_db: float | None,
    coil_rng: np.random.Generator,
    noise_rng: np.random.Generator,
    radius: float,
) -> SimulatedVolume:
    """Pad the ``(slices, rH, rW)`` image to the k-space grid, add coils and noise, form the target."""
    recon_size = image.shape[-2:]
    side = min(recon_size)  # the ring's unit: half of it, as in the phantom's coordinates
    extent = (shape_kspace[0] / side, shape_kspace[1] / side)
    maps = random_birdcage_maps(coils, shape_kspace, coil_rng, radius, extent).numpy()
    padded = _pad(image, shape_kspace)
    kspace, sigma = _acquire(padded, maps, snr_db, noise_rng)
    return SimulatedVolume(
        kspace=kspace,
        target=rss_target(kspace, recon_size),
        labels=labels,
        maps=np.broadcast_to(maps, (image.shape[0], *maps.shape)),
        image=padded,
        noise_std=sigma,
    )


def simulate_volume(
    shape_kspace: tuple[int, int] = (640, 368),
    recon_size: tuple[int, int] = (320, 320),
    slices: int = 16,
    coils: int = 15,
    snr_db: float | None = 30.0,
    seed: Seed = 0,
    dims: int = 3,
    num_lesions: int | None = None,
) -> SimulatedVolume:
    """A fully sampled multi-coil volume of an anatomy-like phantom, fastMRI-style.

    The phantom (:func:`kscan.pipelines.anatomy.anatomy_phantom`) is drawn on the recon grid and
    zero-padded to the k-space grid, so with a 2x-oversampled readout (H = 640 for a 320 recon)
    the object occupies the central half of H and the center crop contains all of it. The coils
    are :func:`random_birdcage_maps` on a ring of radius 1.5 around the field of view, over the
    whole k-space grid. ``kspace = fft2c(S_c x) + n`` (SNR as defined in the module docstring),
    ``target = rss_target(kspace, recon_size)``, ``labels`` the phantom's labels.

    Args:
        shape_kspace: k-space ``(H, W)``, at least ``recon_size``.
        recon_size: ``(rH, rW)``, both >= 64.
        slices: number of slices, >= 1.
        coils: number of coils, 4 to 32.
        snr_db: k-space SNR in dB; None for noiseless k-space.
        seed: an int or numpy Generator; phantom, coils and noise draw from separate children of
            it, so the noiseless and a noisy volume of one seed differ only by the noise.
        dims: 3 for one 3D phantom sampled on ``slices`` slices (coherent across slices), 2 for
            independent 2D phantoms, one per slice.
        num_lesions: passed to the phantom (None: 0 to 3 at random, per phantom).

    Returns:
        :class:`SimulatedVolume`.
    """
    _check_grid(shape_kspace, recon_size, MIN_SIZE)
    coils = _check_coils(coils)
    _check_snr(snr_db)
    if dims not in (2, 3):
        raise ConfigError(
            f"dims: expected 2 (independent slices) or 3 (one 3D phantom), got {dims!r}"
        )
    if not (isinstance(slices, int | np.integer) and slices >= 1):
        raise ConfigError(f"slices: expected an integer >= 1, got {slices!r}")
    phantom_rng, coil_rng, noise_rng = np.random.default_rng(seed).spawn(3)
    if dims == 3:
        phantoms = [anatomy_phantom((slices, *recon_size), phantom_rng, num_lesions=num_lesions)]
    else:
        phantoms = [
            anatomy_phantom(recon_size, r, num_lesions=num_lesions)
            for r in phantom_rng.spawn(slices)
        ]
    image = np.stack([p.image for p in phantoms]).reshape(slices, *recon_size)
    labels = np.stack([p.labels for p in phantoms]).reshape(slices, *recon_size)
    return _volume(image, labels, tuple(shape_kspace), coils, snr_db, coil_rng, noise_rng, 1.5)


def from_magnitude(
    volume: np.ndarray,
    coils: int = 8,
    seed: Seed = 0,
    snr_db: float | None = None,
    slice_axis: int = 0,
    shape_kspace: tuple[int, int] | None = None,
    phase: float = np.pi,
) -> SimulatedVolume:
    """Retrospective simulation: multi-coil k-space of a real magnitude volume.

    The slices along ``slice_axis`` (use ``-1`` for a NIfTI volume ``(X, Y, Z)``) become
    ``(slices, H, W)`` with the two other axes in their order. Negative values (the undershoot
    of resampled volumes) are clipped to 0. Each slice gets the smooth phase
    :func:`kscan.pipelines.anatomy.smooth_phase` (coherent across slices), is zero-padded to
    ``shape_kspace`` (default: its own size, i.e. no padding) and seen by
    :func:`random_birdcage_maps` on a ring around the image's corners. ``target`` is then the
    RSS crop back to the input's in-plane size, and ``labels`` is None: a real volume has no
    known tissue classes.

    Args:
        volume: real magnitude ``(H, W)`` or 3D with slices along ``slice_axis``; in-plane >= 16.
        coils: number of coils, 4 to 32.
        seed: an int or numpy Generator (phase, coils and noise draw from separate children).
        snr_db: k-space SNR in dB as in :func:`simulate_volume`; None for noiseless k-space.
        slice_axis: the axis of ``volume`` that indexes slices (ignored for 2D input).
        shape_kspace: k-space ``(H, W)`` at least the in-plane size; None keeps that size.
        phase: bound of the synthetic phase in radians.

    Returns:
        :class:`SimulatedVolume` with ``labels = None``; ``|sum_c conj(S_c) ifft2c(k_c)|`` of the
        noiseless k-space is the clipped input.
    """
    data = np.asarray(volume)
    if data.ndim not in (2, 3) or not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ShapeError(
            f"volume: expected a real 2D (H, W) or 3D magnitude volume, got {data.dtype} {data.shape}"
        )
    if not -3 <= slice_axis <= 2:
        raise ConfigError(f"slice_axis: expected an axis from -3 to 2, got {slice_axis!r}")
    stack = data[None] if data.ndim == 2 else np.moveaxis(data, slice_axis, 0)
    if min(stack.shape[-2:]) < 16 or stack.size == 0:
        raise ShapeError(
            f"volume: expected slices of at least 16x16, got {stack.shape[-2:]} (slices along axis {slice_axis})"
        )
    magnitude = np.clip(stack.astype(np.float32), 0, None)
    if not np.isfinite(magnitude).all():
        raise InvalidDataError(
            f"volume: contains {int((~np.isfinite(magnitude)).sum())} NaN or Inf values; expected finite data"
        )
    if not magnitude.any():
        raise InvalidDataError(
            "volume: every value is <= 0; expected a magnitude image with signal"
        )
    recon_size = magnitude.shape[-2:]
    shape_kspace = tuple(shape_kspace or recon_size)
    _check_grid(shape_kspace, recon_size, 16)
    coils = _check_coils(coils)
    _check_snr(snr_db)
    phase_rng, coil_rng, noise_rng = np.random.default_rng(seed).spawn(3)
    image = (magnitude * np.exp(1j * smooth_phase(magnitude.shape, phase_rng, phase))).astype(
        np.complex64
    )
    radius = 1.15 * np.hypot(*recon_size) / min(recon_size)
    return _volume(image, None, shape_kspace, coils, snr_db, coil_rng, noise_rng, radius)
