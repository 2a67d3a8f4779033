"""Anatomy-like phantoms with tissue labels, in 2D and 3D, reproducible from a seed.

**Coordinates.** A voxel ``(s, i, j)`` of a grid ``(S, H, W)`` sits at ``p = (z, y, x)`` with
``y = (i + 1/2 - H/2) / (m/2)`` and ``x = (j + 1/2 - W/2) / (m/2)``, ``m = min(H, W)``: pixels
are square and the largest centred square of the grid spans ``[-1, 1]^2``. The slices of a volume
sit at ``z`` evenly spaced over ``[-slab, slab]`` (a single slice, or a 2D phantom, at ``z = 0``).

**Deformation.** A smooth random in-plane displacement ``D(p) = deformation * (tanh n_y(p),
tanh n_x(p))`` (each ``n`` a unit-variance sum of random cosines of 0.2 to 0.8 cycles per unit,
varying along ``z`` too) moves the coordinates, ``q = p + D(p)``, and every structure is an
ellipsoid or blob tested at ``q``: boundaries bend smoothly and coherently from slice to slice.

**Structures**, painted in this order (the class ids of :data:`TISSUE_CLASSES`):

====  ===============  ===============================================================
  1   outer tissue     the shell between a body ellipsoid and the same ellipsoid scaled
                       by ``t`` in [0.80, 0.88] (a fat/skin layer)
  2   inner tissue a   everything inside that shell
  3   inner tissue b   two or three ellipsoids inside the shell
  4   fluid            one or two smaller ellipsoids inside the shell
  5   lesion           ``num_lesions`` small blobs (spheres whose radius the texture field
                       modulates by +-20 %), drawn over classes 2 and 3 only (a lesion
                       that would cover no such voxel is redrawn)
====  ===============  ===============================================================

The body stays inside ``|y|, |x| < 0.97``, so the centred square of side ``m`` contains it.

**Intensities.** ``|image| = I[label] * (1 + texture * T(p))`` with ``T = tanh(n)``, ``n`` a
unit-variance sum of random cosines of 1.5 to 6 cycles per unit: every voxel is within
``+-texture`` of its class intensity ``I`` (:data:`DEFAULT_INTENSITIES`), background is 0.

**Phase.** ``image = |image| * exp(i * phase * tanh(n_phase(p)))`` with ``n_phase`` of 0.05 to
0.3 cycles per unit: a smooth background phase bounded by ``+-phase`` radians.

Each part (geometry, lesions, deformation, texture, phase) draws from its own child of the seed's
generator, so ``num_lesions=0`` and ``num_lesions=3`` with one seed give the same anatomy, with and
without lesions. Random fields are one matrix product over the separable grid and structures are
vectorised tests, with no per-voxel Python loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from kscan.errors import ConfigError, ShapeError

Seed = int | np.random.Generator

TISSUE_CLASSES: dict[int, str] = {
    0: "background",
    1: "outer_tissue",
    2: "inner_tissue_a",
    3: "inner_tissue_b",
    4: "fluid",
    5: "lesion",
}
"""Label id -> tissue name of every phantom label map."""

DEFAULT_INTENSITIES: dict[int, float] = {1: 0.85, 2: 0.45, 3: 0.65, 4: 1.0, 5: 0.2}
"""Magnitude of each tissue class before texture (background is always 0)."""

_LESION_ATTEMPTS = 20
"""Draws per lesion until one covers tissue (classes 2 or 3) rather than only fluid."""

MIN_SIZE = 64
"""The smallest in-plane phantom size: a lesion of the smallest radius still covers pixels."""


@dataclass(frozen=True)
class AnatomyPhantom:
    """A phantom and its labels.

    Attributes:
        image: complex ground truth ``(H, W)`` or ``(slices, H, W)``, complex64.
        labels: tissue class of every voxel (ids of :data:`TISSUE_CLASSES`), uint8, same shape.
    """

    image: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class _Grid:
    """Separable voxel coordinates: ``z (S,)``, ``y (H,)``, ``x (W,)`` (see the module docstring)."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.z.size, self.y.size, self.x.size


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid with semi-axes ``(az, ay, ax)`` rotated by ``angle`` about the z axis."""

    center: tuple[float, float, float]
    axes: tuple[float, float, float]
    angle: float

    def radius2(self, qz: np.ndarray, qy: np.ndarray, qx: np.ndarray) -> np.ndarray:
        """Normalised squared radius ``(u/ay)^2 + (v/ax)^2 + ((z - cz)/az)^2``: <= 1 inside."""
        cz, cy, cx = self.center
        az, ay, ax = self.axes
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        dy, dx = qy - cy, qx - cx
        u = (cos * dy + sin * dx) / ay
        v = (cos * dx - sin * dy) / ax
        return u * u + v * v + ((qz - cz) / az) ** 2

    def point(self, rho: float, psi: float, z: float) -> tuple[float, float, float]:
        """The point at normalised in-plane radius ``rho`` and angle ``psi``, at height ``z``."""
        _, ay, ax = self.axes
        u, v = rho * ay * np.cos(psi), rho * ax * np.sin(psi)
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        return z, self.center[1] + cos * u - sin * v, self.center[2] + sin * u + cos * v


def _grid(shape: tuple[int, int, int], slab: float) -> _Grid:
    s, h, w = shape
    half = min(h, w) / 2
    z = np.linspace(-slab, slab, s) if s > 1 else np.zeros(1)
    return _Grid(z=z, y=(np.arange(h) + 0.5 - h / 2) / half, x=(np.arange(w) + 0.5 - w / 2) / half)


def _smooth_field(
    rng: np.random.Generator, grid: _Grid, cycles: tuple[float, float], num_modes: int
) -> np.ndarray:
    """``tanh(n)`` on the grid, ``(S, H, W)`` float32 in (-1, 1).

    ``n(p) = sqrt(2/K) sum_k cos(2 pi f_k . p + phi_k)`` with ``K = num_modes`` random directions,
    ``|f_k|`` uniform in ``cycles`` (per unit length) and uniform phases: unit variance. With a
    separable grid ``exp(i f.p) = exp(i f_z z) exp(i f_y y) exp(i f_x x)``, so the sum over modes
    is one complex matrix product ``(S, K) @ (K, H*W)``.
    """
    direction = rng.standard_normal((num_modes, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    freq = 2 * np.pi * direction * rng.uniform(*cycles, size=(num_modes, 1))
    offset = rng.uniform(0, 2 * np.pi, num_modes)
    along_z = np.exp(1j * (np.outer(grid.z, freq[:, 0]) + offset)).astype(np.complex64)
    along_y = np.exp(1j * np.outer(freq[:, 1], grid.y)).astype(np.complex64)
    along_x = np.exp(1j * np.outer(freq[:, 2], grid.x)).astype(np.complex64)
    plane = (along_y[:, :, None] * along_x[:, None, :]).reshape(num_modes, -1)
    total = (along_z @ plane).real.reshape(grid.shape)
    return np.tanh(total * np.float32(np.sqrt(2 / num_modes)))


def _volume_shape(shape: tuple[int, ...], name: str, min_size: int) -> tuple[int, int, int]:
    """``(H, W)`` or ``(S, H, W)`` as ``(S, H, W)``, with ``H, W >= min_size`` and ``S >= 1``."""
    dims = tuple(int(n) for n in shape)
    if len(dims) not in (2, 3) or min(dims[-2:]) < min_size or dims[0] < 1:
        raise ShapeError(
            f"{name}: expected (H, W) or (slices, H, W) with H, W >= {min_size} and slices >= 1, "
            f"got {dims}"
        )
    s, h, w = (1, *dims) if len(dims) == 2 else dims
    return s, h, w


def smooth_phase(
    shape: tuple[int, ...], seed: Seed = 0, amplitude: float = np.pi, slab: float = 0.5
) -> np.ndarray:
    """A smooth random phase map in radians, ``(H, W)`` or ``(S, H, W)`` float32.

    ``amplitude * tanh(n(p))`` with ``n`` a unit-variance sum of 8 random cosines of 0.05 to 0.3
    cycles per unit (grid coordinates as in the module docstring), so ``|phase| < amplitude``.
    """
    dims = _volume_shape(shape, "phase shape", 1)
    field = _smooth_field(np.random.default_rng(seed), _grid(dims, slab), (0.05, 0.3), 8)
    return (np.float32(amplitude) * field).reshape(shape)


def _intensity_table(intensities: Mapping[int, float] | None) -> np.ndarray:
    """Class id -> magnitude lookup table ``(6,)``; ``intensities`` overrides the defaults."""
    table = dict(DEFAULT_INTENSITIES)
    for key, value in (intensities or {}).items():
        if key not in table or not value >= 0:
            raise ConfigError(
                f"intensities: expected class ids 1..5 with values >= 0, got {key!r}: {value!r}"
            )
        table[key] = float(value)
    return np.array([0.0] + [table[k] for k in range(1, 6)], dtype=np.float32)


def _body(rng: np.random.Generator) -> tuple[_Ellipsoid, float]:
    """The body ellipsoid (long along z, like a limb) and the inner-to-outer shell ratio."""
    center = (0.0, rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
    axes = (rng.uniform(1.5, 3.0), rng.uniform(0.7, 0.85), rng.uniform(0.6, 0.85))
    return _Ellipsoid(center, axes, rng.uniform(0, np.pi)), rng.uniform(0.80, 0.88)


def _organs(
    rng: np.random.Generator,
    inner: _Ellipsoid,
    count: tuple[int, int],
    size: tuple[float, float],
    depth: tuple[float, float],
    z_max: float,
    rho_max: float,
) -> list[_Ellipsoid]:
    """``count`` ellipsoids centred inside ``inner`` (normalised radius <= ``rho_max``)."""
    shapes = []
    for _ in range(rng.integers(count[0], count[1] + 1)):
        z = rng.uniform(-z_max, z_max)
        center = inner.point(rho_max * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi), z)
        axes = (rng.uniform(*depth), rng.uniform(*size), rng.uniform(*size))
        shapes.append(_Ellipsoid(center, axes, rng.uniform(0, np.pi)))
    return shapes


def _lesion(rng: np.random.Generator, inner: _Ellipsoid, z: np.ndarray) -> _Ellipsoid:
    """A small sphere inside ``inner``, centred on one slice of the grid."""
    center = inner.point(0.6 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi), rng.choice(z))
    radius = rng.uniform(0.045, 0.08)
    return _Ellipsoid(center, (radius, radius, radius), 0.0)


def _paint(
    grid: _Grid,
    qy: np.ndarray,
    qx: np.ndarray,
    texture: np.ndarray,
    rng: np.random.Generator,
    lesion_rng: np.random.Generator,
    num_lesions: int | None,
) -> np.ndarray:
    """Labels ``(S, H, W)`` uint8 of the structures tested at deformed coordinates ``q``."""
    qz = grid.z.astype(np.float32)[:, None, None]
    body, shell = _body(rng)
    inner = _Ellipsoid(body.center, tuple(shell * a for a in body.axes), body.angle)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    radius2 = body.radius2(qz, qy, qx)
    labels[radius2 <= 1] = 1
    inside = radius2 <= shell**2
    labels[inside] = 2
    for organ in _organs(rng, inner, (2, 3), (0.12, 0.28), (0.5, 1.5), 0.25, 0.55):
        labels[inside & (organ.radius2(qz, qy, qx) <= 1)] = 3
    for organ in _organs(rng, inner, (1, 2), (0.07, 0.14), (0.4, 1.0), 0.2, 0.6):
        labels[inside & (organ.radius2(qz, qy, qx) <= 1)] = 4
    tissue = (labels == 2) | (labels == 3)
    for _ in range(lesion_rng.integers(0, 4) if num_lesions is None else num_lesions):
        for _attempt in range(_LESION_ATTEMPTS):  # redraw a lesion that would fall in fluid
            lesion = _lesion(lesion_rng, inner, grid.z)
            blob = tissue & (lesion.radius2(qz, qy, qx) <= (1 + 0.2 * texture) ** 2)
            if blob.any():
                break
        labels[blob] = 5
    return labels


def anatomy_phantom(
    shape: tuple[int, ...],
    seed: Seed = 0,
    *,
    num_lesions: int | None = None,
    intensities: Mapping[int, float] | None = None,
    texture: float = 0.1,
    phase: float = np.pi,
    deformation: float = 0.06,
    slab: float = 0.5,
) -> AnatomyPhantom:
    """An anatomy-like complex phantom with labels (see the module docstring for the model).

    Args:
        shape: ``(H, W)`` for a 2D phantom (the ``z = 0`` section) or ``(slices, H, W)`` for a
            3D volume of ellipsoids sampled at ``slices`` heights over ``[-slab, slab]``;
            ``H, W >= 64``.
        seed: an int or a numpy Generator; equal seeds give identical arrays.
        num_lesions: number of lesion blobs; None draws 0 to 3 from the seed (so some phantoms
            have none).
        intensities: overrides of :data:`DEFAULT_INTENSITIES` by class id (1..5).
        texture: relative amplitude of the multiplicative texture, in [0, 1).
        phase: bound of the smooth background phase in radians (0 gives a real image).
        deformation: bound of each in-plane displacement component, in units of the half field
            of view, in [0, 0.1].
        slab: half-thickness of the slab that the slices of a volume cover, same units, > 0.

    Returns:
        :class:`AnatomyPhantom` with ``image`` complex64 and ``labels`` uint8 of ``shape``.
    """
    dims = _volume_shape(shape, "phantom shape", MIN_SIZE)
    table = _intensity_table(intensities)
    if num_lesions is not None and not (
        isinstance(num_lesions, int | np.integer) and num_lesions >= 0
    ):
        raise ConfigError(f"num_lesions: expected None or an integer >= 0, got {num_lesions!r}")
    for name, value, low, high in (
        ("texture", texture, 0, 0.999),
        ("deformation", deformation, 0, 0.1),
    ):
        if not low <= value <= high:
            raise ConfigError(f"{name}: expected a value in [{low}, {high}], got {value!r}")
    if not slab > 0:
        raise ConfigError(f"slab: expected a half-thickness > 0, got {slab!r}")
    geometry, lesions, warp, grain, tint = np.random.default_rng(seed).spawn(5)
    grid = _grid(dims, slab)
    y = grid.y.astype(np.float32)[None, :, None]
    x = grid.x.astype(np.float32)[None, None, :]
    qy = y + np.float32(deformation) * _smooth_field(warp, grid, (0.2, 0.8), 12)
    qx = x + np.float32(deformation) * _smooth_field(warp, grid, (0.2, 0.8), 12)
    field = _smooth_field(grain, grid, (1.5, 6.0), 48)
    labels = _paint(grid, qy, qx, field, geometry, lesions, num_lesions)
    magnitude = table[labels] * (1 + np.float32(texture) * field)
    angle = smooth_phase(dims, tint, phase, slab)
    image = (magnitude * np.exp(1j * angle)).astype(np.complex64)
    return AnatomyPhantom(image=image.reshape(shape), labels=labels.reshape(shape))
