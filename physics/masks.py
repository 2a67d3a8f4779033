"""Sampling masks on the phase-encode axis (1D) or the whole k-space plane (2D).

Every mask is a :class:`Mask`: a float32 tensor of ones (sampled) and zeros, shaped ``(1, W)`` for
1D masks and ``(H, W)`` for 2D masks so that it broadcasts over k-space ``(batch, coil, H, W)``,
with the fully sampled centre box and the acceleration actually achieved (points / sampled points).

The 1D masks follow fastMRI (``fastmri/data/subsample.py``) exactly. With ``W`` columns, centre
fraction ``c`` and acceleration ``R``:

- centre: ``n = round(W c)`` lines ``pad ... pad + n - 1`` with ``pad = (W - n + 1) // 2``;
- ``random``: every line kept with probability ``p = (W / R - n) / (W - n)``;
- ``equispaced``: every ``R``-th line from an offset drawn in ``[0, R)`` (fewer than ``W / R`` lines
  in all: the centre comes on top);
- ``equispaced_fraction``: spacing ``a = R (n - W) / (n R - W)``, lines ``around(arange(o, W - 1, a))``
  with ``o`` drawn in ``[0, round(a))``, so that centre plus spaced lines make ``W / R`` lines to
  within a line or two (fastMRI's brain masks).

Randomness comes from a ``numpy.random.RandomState``: given the same seed, fastMRI and kscan draw
the same numbers in the same order (first the index of the (centre fraction, acceleration) pair,
then the mask), so the masks are bit-identical to fastMRI's. fastMRI seeds it with the volume's
file name, ``tuple(map(ord, fname))`` (:func:`seed_from_name`), so all slices of a volume share one
mask; adding the slice index gives a mask per slice.

The variable-density masks are kscan's own: ``gaussian_1d`` / ``gaussian_2d`` draw the points
outside the centre without replacement with weights ``exp(-d^2 / (2 sigma^2))``, and ``poisson_2d``
is a maximal Poisson-disc set whose exclusion radius grows linearly with the distance from the
centre (:func:`poisson_disc`). Both reach ``W / R`` (or ``H W / R``) points: the Gaussian masks to
the nearest point, the Poisson-disc mask within ``tol`` (5 %).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kscan.errors import MaskError, ShapeError
from kscan.physics.checks import require_complex
from kscan.physics.sense import check_mask

Seed = int | Sequence[int] | np.random.RandomState | np.random.Generator
"""An integer, a sequence of integers (fastMRI's file-name seed), or a RandomState or Generator to
draw from (its state advances)."""

Fractions = float | Sequence[float]
"""One value, or several paired with as many accelerations (one pair is drawn per mask)."""


@dataclass(frozen=True, eq=False)
class Mask:
    """A sampling mask and its fully sampled centre.

    Attributes:
        mask: float32 ``(1, W)`` (1D, the same for every readout row) or ``(H, W)``; 1 = sampled.
        calibration: ``(rows, columns)`` of the fully sampled box at the centre of k-space (rows is
            ``H`` for 1D masks); ``columns`` is fastMRI's ``num_low_frequencies``.
    """

    mask: torch.Tensor
    calibration: tuple[int, int]

    def __post_init__(self) -> None:
        m = self.mask
        if not isinstance(m, torch.Tensor) or m.dtype != torch.float32 or m.ndim != 2:
            found = (
                f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
            )
            raise ShapeError(f"Mask.mask: expected a float32 tensor (1, W) or (H, W), got {found}")
        if not bool(((m == 0) | (m == 1)).all()):
            raise MaskError("Mask.mask: expected only 0 (skipped) and 1 (sampled) values")
        if not bool(m.any()):
            raise MaskError(f"Mask.mask: samples no k-space point of its {tuple(m.shape)} grid")

    @property
    def acceleration(self) -> float:
        """Achieved acceleration: grid points over sampled points (columns over lines for 1D)."""
        return self.mask.numel() / float(self.mask.sum())

    @property
    def center_lines(self) -> int:
        """Number of fully sampled centre columns (fastMRI's ``num_low_frequencies``)."""
        return self.calibration[1]

    def restrict(self, left: int, right: int) -> Mask:
        """The mask with the columns outside ``[left, right)`` zeroed (fastMRI's ``padding``).

        The calibration box is kept when it lies inside ``[left, right)`` and recomputed otherwise.
        """
        width = self.mask.shape[-1]
        if not 0 <= left < right <= width:
            raise MaskError(
                f"padding: expected 0 <= left < right <= W={width}, got ({left}, {right})"
            )
        m = _zero_outside(self.mask, left, right)
        cols = _centre_slice(width, self.calibration[1])
        if left <= cols.start and cols.stop <= right:
            return Mask(m, self.calibration)
        return Mask(m, _calibration(m.cpu().numpy() > 0, rows=self.calibration[0]))


def seed_from_name(fname: str | os.PathLike, slice_index: int | None = None) -> tuple[int, ...]:
    """fastMRI's seed ``tuple(map(ord, name))`` of a file's base name, plus the slice index if given.

    ``slice_index=None`` gives the volume's seed, so every slice of the volume gets the same mask
    (fastMRI's default); passing the slice index gives every slice its own mask. Only the base name
    counts: the same file in another folder gets the same mask.
    """
    name = Path(fname).name
    if not name:
        raise MaskError(f"fname: expected a file name to seed the mask, got {str(fname)!r}")
    seed = tuple(map(ord, name))
    if slice_index is None:
        return seed
    if slice_index < 0:
        raise MaskError(f"slice_index: expected a non-negative slice number, got {slice_index}")
    return (*seed, slice_index)


def random_1d(
    shape: tuple[int, int], *, center_fraction: Fractions, acceleration: Fractions, seed: Seed
) -> Mask:
    """fastMRI's random mask ``(1, W)``: the centre, plus each line with probability ``p``.

    ``p = (W / R - n) / (W - n)`` makes ``W / R`` lines in expectation.
    """

    def outer(rng: np.random.RandomState, width: int, accel: float, n_low: int) -> np.ndarray:
        prob = (width / accel - n_low) / (width - n_low) if width > n_low else 0.0
        return rng.uniform(size=width) < prob

    return _line_mask(shape, center_fraction, acceleration, seed, outer)


def equispaced_1d(
    shape: tuple[int, int], *, center_fraction: Fractions, acceleration: Fractions, seed: Seed
) -> Mask:
    """fastMRI's equispaced mask ``(1, W)``: the centre, plus every ``R``-th line from a random offset.

    ``R`` must be a whole number. The centre comes on top of the ``W / R`` spaced lines, so the
    achieved acceleration is below ``R``.
    """

    def outer(rng: np.random.RandomState, width: int, accel: float, n_low: int) -> np.ndarray:
        if accel != int(accel):
            raise MaskError(f"acceleration: equispaced masks need a whole number, got {accel}")
        lines = np.zeros(width, dtype=bool)
        lines[rng.randint(0, round(accel)) :: int(accel)] = True
        return lines

    return _line_mask(shape, center_fraction, acceleration, seed, outer)


def equispaced_fraction_1d(
    shape: tuple[int, int], *, center_fraction: Fractions, acceleration: Fractions, seed: Seed
) -> Mask:
    """fastMRI's ``equispaced_fraction`` mask ``(1, W)``: spacing adjusted so the total is ``W / R``.

    Spacing ``a = R (n - W) / (n R - W)``; lines ``around(arange(o, W - 1, a))`` for an offset ``o``
    drawn in ``[0, round(a))``. The spaced lines that fall inside the centre are counted in ``a``,
    so the total is ``W / R`` to within a line or two.
    """

    def outer(rng: np.random.RandomState, width: int, accel: float, n_low: int) -> np.ndarray:
        if n_low * accel >= width:
            raise MaskError(
                f"center_fraction: {n_low} centre lines leave no lines to space out at acceleration "
                f"{accel} of {width} columns; expected fewer than {width / accel:g} centre lines"
            )
        spacing = accel * (n_low - width) / (n_low * accel - width)
        offset = rng.randint(0, round(spacing))
        lines = np.zeros(width, dtype=bool)
        lines[np.around(np.arange(offset, width - 1, spacing)).astype(np.int64)] = True
        return lines

    return _line_mask(shape, center_fraction, acceleration, seed, outer)


def gaussian_1d(
    shape: tuple[int, int],
    *,
    center_fraction: Fractions,
    acceleration: Fractions,
    seed: Seed,
    std: float = 0.25,
) -> Mask:
    """Variable-density lines ``(1, W)``: the centre plus ``round(W / R) - n`` lines drawn without
    replacement with weights ``exp(-(k - W // 2)^2 / (2 (std W)^2))``.
    """

    def outer(rng: np.random.RandomState, width: int, accel: float, n_low: int) -> np.ndarray:
        centre = np.zeros(width, dtype=bool)
        centre[_centre_slice(width, n_low)] = True
        return _gaussian_draw(rng, centre, round(width / accel) - n_low, std)

    return _line_mask(shape, center_fraction, acceleration, seed, outer)


def gaussian_2d(
    shape: tuple[int, int],
    *,
    center_fraction: Fractions,
    acceleration: Fractions,
    seed: Seed,
    std: float = 0.25,
) -> Mask:
    """Variable-density points ``(H, W)``: a centre box ``round(H c) x round(W c)`` plus
    ``round(H W / R)`` minus its area, drawn without replacement with weights
    ``exp(-((ky / (std H))^2 + (kx / (std W))^2) / 2)`` (``ky, kx`` measured from ``(H // 2, W // 2)``).
    """

    def outer(rng: np.random.RandomState, box: np.ndarray, accel: float) -> np.ndarray:
        return _gaussian_draw(rng, box, round(box.size / accel) - int(box.sum()), std)

    return _point_mask(shape, center_fraction, acceleration, seed, outer)


def poisson_2d(
    shape: tuple[int, int],
    *,
    center_fraction: Fractions,
    acceleration: Fractions,
    seed: Seed,
    falloff: float = 2.0,
    tol: float = 0.05,
) -> Mask:
    """Variable-density Poisson-disc mask ``(H, W)`` with a fully sampled centre box.

    The exclusion radius is ``r = s (1 + falloff d)`` pixels, with ``d`` the elliptical distance
    from the centre (1 at the middle of each edge), so the density falls off like ``1 / r^2``
    (wherever ``r <= 1`` every point is sampled; on the grid any ``r > 1`` already excludes the four
    neighbours, so the density steps from 1 to about 0.36 where ``r`` crosses 1). The scale ``s`` is fitted so that the achieved
    acceleration is within ``tol`` (relative) of ``R``: the density model ``sum(min(1, kappa / r^2))``
    proposes ``s``, each Poisson-disc pass (same point order every time) recalibrates ``kappa`` and
    narrows a bracket on ``s``; a few passes suffice.
    """
    if not falloff >= 0:
        raise MaskError(f"falloff: expected a non-negative radius growth, got {falloff}")

    def outer(rng: np.random.RandomState, box: np.ndarray, accel: float) -> np.ndarray:
        return _fit_poisson(box, accel, rng.permutation(box.size), tol, falloff)

    return _point_mask(shape, center_fraction, acceleration, seed, outer)


def poisson_disc(radius: np.ndarray, seed: Seed) -> np.ndarray:
    """A maximal Poisson-disc set on the grid for a radius map ``(H, W)`` in pixels.

    Dart throwing: the grid points are visited in random order; a point is sampled unless an
    already sampled point ``p`` lies closer than ``radius[p]``. So any two samples ``p`` (earlier)
    and ``q`` satisfy ``|p - q| >= radius[p]``, and every unsampled point is closer than
    ``radius[p]`` to some sample ``p`` (the set is maximal). Where ``radius <= 1`` every point is
    sampled. Returns a bool array ``(H, W)``.
    """
    radius = np.asarray(radius, dtype=np.float64)
    if radius.ndim != 2 or not np.all(radius > 0):
        raise MaskError(f"radius: expected a 2D map of positive radii, got shape {radius.shape}")
    return _dart_throw(radius, _rng(seed).permutation(radius.size))


def mask_from_array(
    source: np.ndarray | torch.Tensor, shape: tuple[int, int], name: str = "mask"
) -> Mask:
    """A precomputed mask from an array: ``(W,)`` (fastMRI test files), ``(1, W)`` or ``(H, W)``.

    Values 0/1 or bool, for k-space whose last two dimensions are ``shape = (H, W)``. The
    calibration box is the largest fully sampled box centred like fastMRI's centre lines.
    ``name`` (a file name, say) starts every error message. Reading mask files is
    :func:`kscan.pipelines.mask_files.read_mask`.
    """
    height, width = _check_shape(shape)
    array = (
        source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    )
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[-1] != width or array.shape[0] not in (1, height):
        raise ShapeError(
            f"{name}: expected a mask of shape (W,), (1, W) or (H, W) for k-space {shape}, got {array.shape}"
        )
    if not np.all((array == 0) | (array == 1)):
        raise MaskError(
            f"{name}: expected only 0 and 1 (or bool) values, found {np.unique(array)[:5]}"
        )
    sampled = array.astype(bool)
    if not sampled.any():
        raise MaskError(f"{name}: samples no k-space line; at least one line must be sampled")
    return Mask(torch.from_numpy(sampled.astype(np.float32)), _calibration(sampled, rows=height))


_MAKERS: dict[str, Callable[..., Mask]] = {
    "random": random_1d,
    "equispaced": equispaced_1d,
    "equispaced_fraction": equispaced_fraction_1d,
    "gaussian_1d": gaussian_1d,
    "gaussian_2d": gaussian_2d,
    "poisson_2d": poisson_2d,
}

MASK_KINDS = tuple(_MAKERS)
"""The names :func:`make_mask` accepts, for the command line and the configuration files."""


def make_mask(
    kind: str,
    shape: tuple[int, int],
    *,
    center_fraction: Fractions,
    acceleration: Fractions,
    seed: Seed,
) -> Mask:
    """The mask named ``kind`` (one of :data:`MASK_KINDS`) with each function's default options."""
    if kind not in _MAKERS:
        raise MaskError(f"mask kind: expected one of {', '.join(MASK_KINDS)}, got {kind!r}")
    return _MAKERS[kind](
        shape, center_fraction=center_fraction, acceleration=acceleration, seed=seed
    )


def apply_mask(
    kspace: torch.Tensor, mask: Mask | torch.Tensor, padding: tuple[int, int] | None = None
) -> torch.Tensor:
    """Masked k-space ``kspace * mask + 0.0`` (the ``+ 0.0`` turns ``-0`` into ``0``, as fastMRI).

    ``kspace`` is complex ``(..., H, W)``; the mask must broadcast to it without enlarging it.
    ``padding = (left, right)`` also zeroes the columns outside ``[left, right)`` (fastMRI's
    ``padding_left`` / ``padding_right``).
    """
    require_complex(kspace, "kspace")
    m = check_mask(mask.mask if isinstance(mask, Mask) else mask)
    if padding is not None:
        left, right = padding
        if not 0 <= left < right <= m.shape[-1]:
            raise MaskError(
                f"padding: expected 0 <= left < right <= W={m.shape[-1]}, got {padding}"
            )
        m = _zero_outside(m, left, right)
    try:
        fits = torch.broadcast_shapes(m.shape, kspace.shape) == kspace.shape
    except RuntimeError:
        fits = False
    if not fits or m.shape[-1] != kspace.shape[-1]:
        raise ShapeError(
            f"mask: shape {tuple(m.shape)} does not broadcast to k-space {tuple(kspace.shape)}"
        )
    return kspace * m.to(device=kspace.device, dtype=kspace.real.dtype) + 0.0


# --- helpers -------------------------------------------------------------------------------------

_KAPPA = 0.7
"""Initial density constant of a maximal Poisson-disc set: about 0.7 / r^2 samples per pixel."""

_MAX_PASSES = 12


def _rng(seed: Seed) -> np.random.RandomState:
    """The RandomState itself, one drawing from a Generator's bit generator (advancing it), or a
    new one seeded like fastMRI's ``rng.seed(seed)``."""
    if isinstance(seed, np.random.RandomState):
        return seed
    if isinstance(seed, np.random.Generator):
        return np.random.RandomState(seed.bit_generator)
    return np.random.RandomState(seed)


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise ShapeError(f"shape: expected two positive integers (H, W), got {shape}")
    return int(shape[0]), int(shape[1])


def _choose(
    rng: np.random.RandomState, center_fraction: Fractions, acceleration: Fractions
) -> tuple[float, float]:
    """Validate the (centre fraction, acceleration) pairs and draw one, as fastMRI does."""
    fractions = [center_fraction] if np.isscalar(center_fraction) else list(center_fraction)
    accelerations = [acceleration] if np.isscalar(acceleration) else list(acceleration)
    if not fractions or len(fractions) != len(accelerations):
        raise MaskError(
            f"center_fraction, acceleration: expected as many centre fractions as accelerations, "
            f"got {len(fractions)} and {len(accelerations)}"
        )
    for accel in accelerations:
        if not (math.isfinite(accel) and accel >= 1):
            raise MaskError(
                f"acceleration: expected a number >= 1 (1 = fully sampled), got {accel}"
            )
    for fraction in fractions:
        if not 0 <= fraction < 1:
            raise MaskError(f"center_fraction: expected a fraction in [0, 1), got {fraction}")
    choice = rng.randint(len(fractions))
    return float(fractions[choice]), float(accelerations[choice])


def _centre_slice(n: int, k: int) -> slice:
    """The ``k`` central indices of ``n``, placed like fastMRI's centre lines."""
    pad = (n - k + 1) // 2
    return slice(pad, pad + k)


def _line_mask(
    shape: tuple[int, int],
    center_fraction: Fractions,
    acceleration: Fractions,
    seed: Seed,
    outer: Callable[[np.random.RandomState, int, float, int], np.ndarray],
) -> Mask:
    """Centre lines plus ``outer(rng, W, R, n)`` lines, drawn in fastMRI's order, as ``(1, W)``."""
    height, width = _check_shape(shape)
    rng = _rng(seed)
    fraction, accel = _choose(rng, center_fraction, acceleration)
    n_low = round(width * fraction)
    if n_low > width / accel:
        raise MaskError(
            f"center_fraction: {fraction} keeps {n_low} of {width} lines, more than the "
            f"{width / accel:g} that acceleration {accel:g} allows"
        )
    lines = outer(rng, width, accel, n_low)
    lines[_centre_slice(width, n_low)] = True
    if not lines.any():
        raise MaskError(
            f"mask: sampled no line of {width} (center_fraction {fraction}, acceleration {accel:g})"
        )
    return Mask(torch.from_numpy(lines[None].astype(np.float32)), (height, n_low))


def _point_mask(
    shape: tuple[int, int],
    center_fraction: Fractions,
    acceleration: Fractions,
    seed: Seed,
    outer: Callable[[np.random.RandomState, np.ndarray, float], np.ndarray],
) -> Mask:
    """Centre box plus ``outer(rng, box, R)`` points, as ``(H, W)``."""
    height, width = _check_shape(shape)
    rng = _rng(seed)
    fraction, accel = _choose(rng, center_fraction, acceleration)
    rows, cols = round(height * fraction), round(width * fraction)
    if rows * cols > height * width / accel:
        raise MaskError(
            f"center_fraction: a {rows}x{cols} centre box is more than the {height * width / accel:g} "
            f"points that acceleration {accel:g} allows on a {height}x{width} grid"
        )
    box = np.zeros((height, width), dtype=bool)
    box[_centre_slice(height, rows), _centre_slice(width, cols)] = True
    points = outer(rng, box, accel) | box
    if not points.any():
        raise MaskError(f"mask: sampled no point of {height}x{width} (acceleration {accel:g})")
    return Mask(torch.from_numpy(points.astype(np.float32)), (rows, cols))


def _gaussian_draw(
    rng: np.random.RandomState, taken: np.ndarray, count: int, std: float
) -> np.ndarray:
    """``count`` points outside ``taken`` (1D or 2D bool) drawn without replacement with Gaussian
    weights around the centre (sigma = ``std`` times each axis length).

    Weighted sampling without replacement by exponential keys (Efraimidis and Spirakis): the
    ``count`` smallest ``E_i / w_i`` with ``E_i ~ Exp(1)``.
    """
    if not std > 0:
        raise MaskError(f"std: expected a positive fraction of the axis length, got {std}")
    grids = np.meshgrid(*[(np.arange(n) - n // 2) / (std * n) for n in taken.shape], indexing="ij")
    weight = np.exp(-0.5 * sum(g**2 for g in grids))
    keys = rng.standard_exponential(size=taken.shape) / weight
    keys[taken] = np.inf
    chosen = np.zeros(taken.size, dtype=bool)
    chosen[np.argsort(keys, axis=None, kind="stable")[: max(count, 0)]] = True
    return chosen.reshape(taken.shape)


def _fit_poisson(
    box: np.ndarray, accel: float, order: np.ndarray, tol: float, falloff: float
) -> np.ndarray:
    """Poisson-disc points whose union with ``box`` reaches ``H W / R`` within ``tol``.

    Fits the scale ``s`` of the radius ``s (1 + falloff d)``; the sample count falls as ``s`` grows.
    """
    height, width = box.shape
    ky, kx = np.meshgrid(
        (np.arange(height) - height // 2) / (height / 2),
        (np.arange(width) - width // 2) / (width / 2),
        indexing="ij",
    )
    profile = 1 + falloff * np.sqrt(ky**2 + kx**2)
    outside = profile[~box]
    target = box.size / accel - box.sum()
    kappa, low, high = _KAPPA, 0.0, math.inf
    for _ in range(_MAX_PASSES):
        scale = _model_scale(outside, kappa, target)
        if not low < scale < high:
            scale = (low + high) / 2 if math.isfinite(high) else 2 * low + 1
        points = _dart_throw(scale * profile, order)
        found = int(points[~box].sum())
        if abs(box.size / (found + box.sum()) / accel - 1) <= tol:
            return points
        low, high = (scale, high) if found > target else (low, scale)
        kappa *= max(found, 1) / _model_count(outside, kappa, scale)
    raise MaskError(
        f"acceleration: no Poisson-disc mask within {tol:.0%} of {accel:g} on a {height}x{width} grid"
    )


def _model_count(profile: np.ndarray, kappa: float, scale: float) -> float:
    """Modelled size of a maximal Poisson-disc set with radius ``scale * profile``: about
    ``kappa / r^2`` samples per pixel, at most one."""
    return float(np.minimum(1, kappa / (scale * profile) ** 2).sum())


def _model_scale(profile: np.ndarray, kappa: float, target: float) -> float:
    """Radius scale whose modelled sample count is ``target`` (bisection on a decreasing count)."""
    low, high = 1e-3, 1.0
    while _model_count(profile, kappa, high) > target and high < 1e6:
        low, high = high, 2 * high
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if _model_count(profile, kappa, mid) > target else (low, mid)
    return (low + high) / 2


def _dart_throw(radius: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Visit the points in ``order``; sample a point unless it lies in the exclusion disc
    ``|q - p| < radius[p]`` of an earlier sample ``p``."""
    height, width = radius.shape
    radius = np.minimum(radius, math.hypot(height, width))  # a larger disc excludes no more
    reach = np.maximum(np.ceil(radius).astype(np.int64) - 1, 0)
    pad = int(reach.max())
    offsets = np.arange(-pad, pad + 1)
    disc_d2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    free = np.ones((height + 2 * pad, width + 2 * pad), dtype=bool)
    free_flat = free.ravel()
    padded_width = width + 2 * pad
    r2 = (radius**2).ravel()
    reach_flat = reach.ravel()
    sampled = np.zeros(radius.size, dtype=bool)
    for index in order.tolist():
        y, x = divmod(index, width)
        if not free_flat[(y + pad) * padded_width + x + pad]:
            continue
        sampled[index] = True
        k = reach_flat[index]
        if k == 0:  # radius <= 1: excludes no other grid point
            continue
        stencil = disc_d2[pad - k : pad + k + 1, pad - k : pad + k + 1] >= r2[index]
        free[y + pad - k : y + pad + k + 1, x + pad - k : x + pad + k + 1] &= stencil
    return sampled.reshape(height, width)


def _calibration(sampled: np.ndarray, rows: int) -> tuple[int, int]:
    """Largest fully sampled box ``(h, w)`` centred like fastMRI's centre lines (``rows`` for 1D).

    Growing ``h`` or ``w`` by one adds one row or column on one side, so the boxes are nested and
    for each ``h`` the full widths form a prefix ``1 .. w(h)``.
    """
    height, width = sampled.shape
    total = np.zeros((height + 1, width + 1), dtype=np.int64)
    total[1:, 1:] = sampled.cumsum(0).cumsum(1)
    widths = np.arange(1, width + 1)
    c0 = (width - widths + 1) // 2
    best = (0, 0)
    for h in range(1, height + 1):
        r0 = (height - h + 1) // 2
        area = (
            total[r0 + h, c0 + widths] - total[r0, c0 + widths] - total[r0 + h, c0] + total[r0, c0]
        )
        full = area == h * widths
        w = width if full.all() else int(full.argmin())
        if w == 0:
            break
        if h * w > best[0] * best[1]:
            best = (h, w)
    return (rows, best[1]) if height == 1 else best


def _zero_outside(mask: torch.Tensor, left: int, right: int) -> torch.Tensor:
    kept = torch.zeros(mask.shape[-1], dtype=mask.dtype, device=mask.device)
    kept[left:right] = 1
    return mask * kept
