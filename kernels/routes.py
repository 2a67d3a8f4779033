"""2D scan routes: the orders in which vision Mamba models read an ``H x W`` map as a sequence.

A route is an index map ``perm`` of shape ``(H*W,)``: position ``p`` of the sequence reads the
pixel whose flat row-major index is ``perm[p]`` (pixel ``(i, j)`` has index ``i*W + j``). So
``sequence = image.flatten()[perm]`` and ``image.flatten()[perm] = sequence`` undoes it.

Routes (each also exists as ``"<name>_reversed"``, the same map read backwards, ``perm.flip(0)``):

- ``rows``: raster, row by row, left to right (row-major order; the identity map).
- ``cols``: raster, column by column, top to bottom (column-major order).
- ``snake_rows``: boustrophedon rows: even rows left to right, odd rows right to left.
- ``snake_cols``: boustrophedon columns: even columns top to bottom, odd columns bottom to top.
- ``zigzag``: the anti-diagonals ``i + j = k`` for ``k = 0 .. H+W-2`` in turn, even ``k`` read
  from bottom-left to top-right (decreasing ``i``), odd ``k`` from top-right to bottom-left (the
  JPEG zig-zag order, starting ``(0,0), (0,1), (1,0), (2,0), (1,1), (0,2)``).
- ``zigzag_mirror``: ``zigzag`` on the left-right flipped grid (column ``j -> W-1-j``); it
  starts at the top-right corner.
- ``spiral``: clockwise inward spiral from the top-left corner, ring by ring (top row left to
  right, right column down, bottom row right to left, left column up).
- ``spiral_mirror``: ``spiral`` on the up-down flipped grid (row ``i -> H-1-i``): a
  counter-clockwise spiral from the bottom-left corner.

These are the routes of MHS-VM's head families (Ji 2024, ``scanutils.py``): C = snake rows /
columns, X = zig-zag / its column mirror, S = spiral / its row mirror, Z = raster rows / columns.
VM-UNet's SS2D reads the four ``VMAMBA_ROUTES``.

``cross_scan`` gathers a ``(batch, C, H, W)`` map into ``K`` route sequences ``(batch, K, C, L)``
and ``cross_merge`` puts ``K`` sequences back in row-major order and sums them. They are each
other's adjoint, ``<cross_scan(x), y> = <x, cross_merge(y)>``, and each one's backward pass is the
other, so both are deterministic (gathers only, no atomic scatter-adds) on every device. Raster
routes (``VMAMBA_ROUTES``) are transposes and flips, the others gathers. On CUDA, route sets made of
raster routes only go through the fused Triton kernels of :mod:`kscan.kernels.routes_triton`, which
give identical results.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from types import MappingProxyType

import numpy as np
import torch

from kscan.errors import ConfigError, InvalidDataError, ShapeError


def _rows(h: int, w: int) -> np.ndarray:
    return np.arange(h * w)


def _cols(h: int, w: int) -> np.ndarray:
    return np.arange(h * w).reshape(h, w).T.ravel()


def _snake_rows(h: int, w: int) -> np.ndarray:
    grid = np.arange(h * w).reshape(h, w)
    grid[1::2] = grid[1::2, ::-1]
    return grid.ravel()


def _snake_cols(h: int, w: int) -> np.ndarray:
    grid = np.arange(h * w).reshape(h, w).T.copy()
    grid[1::2] = grid[1::2, ::-1]
    return grid.ravel()


def _zigzag(h: int, w: int) -> np.ndarray:
    """Sort pixels by anti-diagonal ``k = i + j``, then by ``-i`` (even ``k``) or ``i`` (odd ``k``)."""
    i, j = np.divmod(np.arange(h * w), w)
    k = i + j
    return np.lexsort((np.where(k % 2 == 0, -i, i), k))


def _spiral(h: int, w: int) -> np.ndarray:
    """Sort pixels by ring ``r`` (distance to the border), then by arc length along the ring.

    Ring ``r`` spans rows ``r .. h-1-r`` and columns ``r .. w-1-r``; its arc length starts at its
    top-left corner and runs clockwise. A ring that is a single row or column is read left to right
    or top to bottom (the first matching case below).
    """
    i, j = np.divmod(np.arange(h * w), w)
    bottom_i, right_j = h - 1 - i, w - 1 - j
    r = np.minimum(np.minimum(i, j), np.minimum(bottom_i, right_j))
    top, left, bottom, right = r, r, h - 1 - r, w - 1 - r
    width, height = right - left, bottom - top
    arc = np.select(
        [i == top, j == right, i == bottom],
        [j - left, width + (i - top), width + height + (right - j)],
        default=2 * width + height + (bottom - i),
    )
    return np.lexsort((arc, r))


def _mirror_cols(perm: np.ndarray, h: int, w: int) -> np.ndarray:
    i, j = np.divmod(perm, w)
    return i * w + (w - 1 - j)


def _mirror_rows(perm: np.ndarray, h: int, w: int) -> np.ndarray:
    i, j = np.divmod(perm, w)
    return (h - 1 - i) * w + j


_BASE: dict[str, Callable[[int, int], np.ndarray]] = {
    "rows": _rows,
    "cols": _cols,
    "snake_rows": _snake_rows,
    "snake_cols": _snake_cols,
    "zigzag": _zigzag,
    "zigzag_mirror": lambda h, w: _mirror_cols(_zigzag(h, w), h, w),
    "spiral": _spiral,
    "spiral_mirror": lambda h, w: _mirror_rows(_spiral(h, w), h, w),
}

ROUTES: tuple[str, ...] = tuple(_BASE) + tuple(f"{name}_reversed" for name in _BASE)
"""Every route name: the eight base routes, then their reverses."""

VMAMBA_ROUTES: tuple[str, ...] = ("rows", "cols", "rows_reversed", "cols_reversed")
"""VM-UNet / VMamba SS2D's four sequences, in its order (row-major, column-major, both flipped)."""

MHSVM_HEAD_ROUTES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        family: (first, f"{first}_reversed", second, f"{second}_reversed")
        for family, first, second in (
            ("C", "snake_rows", "snake_cols"),
            ("X", "zigzag", "zigzag_mirror"),
            ("S", "spiral", "spiral_mirror"),
            ("Z", "rows", "cols"),
        )
    }
)
"""MHS-VM's head families in head order C, X, S, Z (three-head models use C, X, S), each with its
four sequences in MHS-VM's order: route 0, route 0 reversed, route 1, route 1 reversed."""


def _check_route(name: str) -> None:
    if name not in ROUTES:
        raise ConfigError(f"route: unknown name {name!r}; expected one of {', '.join(ROUTES)}")


def _check_size(height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` as Python ints, both at least 1."""
    for arg, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ShapeError(f"{arg}: expected a positive integer, got {value!r}")
    return int(height), int(width)


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


@functools.lru_cache(maxsize=256)
def _cached_route(name: str, height: int, width: int, device: torch.device) -> torch.Tensor:
    base = name.removesuffix("_reversed")
    perm = torch.from_numpy(_BASE[base](height, width).astype(np.int64))
    return (perm if base == name else perm.flip(0)).to(device)


def route(
    name: str, height: int, width: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The index map of route ``name`` on an ``height x width`` grid: a LongTensor ``(H*W,)``
    whose entry ``p`` is the flat row-major index ``i*W + j`` of the ``p``-th pixel visited.

    Cached per ``(name, H, W, device)``: repeated calls return the same tensor, so never modify
    it in place. ``device`` defaults to the CPU.
    """
    _check_route(name)
    height, width = _check_size(height, width)
    return _cached_route(name, height, width, _device(device))


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inverse(perm)[perm[p]] = p``, so for a route it maps a row-major
    pixel index to its position in the sequence. ``perm`` is 1-D ``(L,)`` holding ``0 .. L-1``."""
    if perm.ndim != 1:
        raise ShapeError(f"perm: expected a 1-D permutation (L,), got shape {tuple(perm.shape)}")
    perm = perm.long()
    arange = torch.arange(perm.numel(), device=perm.device)
    if not torch.equal(torch.sort(perm).values, arange):
        raise InvalidDataError(f"perm: expected a permutation of 0..{perm.numel() - 1}")
    return torch.empty_like(arange).scatter_(0, perm, arange)


def _check_routes(routes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(routes, str) or len(routes) == 0:
        raise ConfigError(f"routes: expected a non-empty sequence of route names, got {routes!r}")
    for name in routes:
        _check_route(name)
    return tuple(routes)


@functools.lru_cache(maxsize=256)
def _cached_inverse(name: str, height: int, width: int, device: torch.device) -> torch.Tensor:
    return inverse(_cached_route(name, height, width, device))


def _raster_sequence(x: torch.Tensor, name: str) -> torch.Tensor:
    """Route ``name`` of ``VMAMBA_ROUTES`` read from ``x (batch, C, H, W)`` as ``(batch, C, L)`` by
    transposing and flipping (no gather)."""
    seq = (x if name.startswith("rows") else x.transpose(-1, -2)).flatten(2)
    return seq.flip(-1) if name.endswith("_reversed") else seq


def _raster_image(seq: torch.Tensor, name: str, height: int, width: int) -> torch.Tensor:
    """The inverse of ``_raster_sequence``: ``(batch, C, L)`` back to ``(batch, C, H, W)``."""
    seq = seq.flip(-1) if name.endswith("_reversed") else seq
    if name.startswith("rows"):
        return seq.unflatten(-1, (height, width))
    return seq.unflatten(-1, (width, height)).transpose(-1, -2)


def _scan(x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """``(batch, C, H, W)`` -> ``(batch, K, C, L)``, ``out[:, k, :, p] = x.flatten(2)[..., perm_k[p]]``.

    Raster routes are transposes and flips; the others gather whole channel vectors from one
    channels-last copy ``(batch, L, C)`` of ``x`` (much faster on CPU than gathering along ``L``).
    """
    batch, channels, height, width = x.shape
    out = x.new_empty(batch, len(names), channels, height * width)
    gathered = [name for name in names if name not in VMAMBA_ROUTES]
    x_cl = x.flatten(2).transpose(1, 2).contiguous() if gathered else None
    for k, name in enumerate(names):
        if name in VMAMBA_ROUTES:
            out[:, k] = _raster_sequence(x, name)
        else:
            perm = _cached_route(name, height, width, x.device)
            out[:, k] = x_cl.index_select(1, perm).transpose(1, 2)
    return out


def _merge(y: torch.Tensor, names: tuple[str, ...], height: int, width: int) -> torch.Tensor:
    """``(batch, K, C, L)`` -> ``(batch, C, H, W)``, ``out[..., q] = sum_k y[:, k, ..., inv_k[q]]``
    with ``inv_k = inverse(perm_k)``, summed in the order ``((0 + y_0) + y_1) + ...``."""
    batch, _, channels, _ = y.shape
    out = y.new_zeros(batch, channels, height, width)
    for k, name in enumerate(names):
        if name in VMAMBA_ROUTES:
            out += _raster_image(y[:, k], name, height, width)
        else:
            inv = _cached_inverse(name, height, width, y.device)
            y_cl = y[:, k].transpose(1, 2).contiguous()
            out += y_cl.index_select(1, inv).transpose(1, 2).unflatten(-1, (height, width))
    return out


_Implementation = tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]


class _CrossScan(torch.autograd.Function):
    """``scan`` of an implementation ``(scan, merge)``, whose backward is its ``merge`` (the adjoint)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, names: tuple[str, ...], impl: _Implementation):
        ctx.names, ctx.impl, ctx.grid = names, impl, x.shape[-2:]
        return impl[0](x, names)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _CrossMerge.apply(grad, ctx.names, *ctx.grid, ctx.impl), None, None


class _CrossMerge(torch.autograd.Function):
    """``merge`` of an implementation ``(scan, merge)``, whose backward is its ``scan``."""

    @staticmethod
    def forward(ctx, y, names: tuple[str, ...], height: int, width: int, impl: _Implementation):
        ctx.names, ctx.impl = names, impl
        return impl[1](y, names, height, width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _CrossScan.apply(grad, ctx.names, ctx.impl), None, None, None, None


def _implementation(
    t: torch.Tensor, names: tuple[str, ...], backend: str | None
) -> _Implementation:
    """``(scan, merge)`` of ``backend``: ``torch``, or ``triton`` (the fused kernels of
    :mod:`kscan.kernels.routes_triton`, imported only here so that CPU use never imports Triton);
    ``None`` picks ``triton`` for CUDA tensors when it can serve ``names``, else ``torch``."""
    if backend not in (None, "torch", "triton"):
        raise ConfigError(f"backend: expected None, 'torch' or 'triton', got {backend!r}")
    if backend == "torch" or (backend is None and not t.is_cuda):
        return _scan, _merge
    from kscan.kernels import routes_triton

    reason = routes_triton.fused_unavailable_reason(t, names)
    if reason is None:
        return routes_triton.fused_scan, routes_triton.fused_merge
    if backend is None:
        return _scan, _merge
    raise ConfigError(f"backend: 'triton' cannot run here: {reason}")


def cross_scan(x: torch.Tensor, routes: Sequence[str], backend: str | None = None) -> torch.Tensor:
    """Read a ``(batch, C, H, W)`` map along each of ``K = len(routes)`` routes.

    Returns ``(batch, K, C, L)``, ``L = H*W``, with ``out[:, k, :, p] = x.flatten(2)[..., perm_k[p]]``
    where ``perm_k = route(routes[k], H, W)``. Differentiable; the backward pass is ``cross_merge``.
    ``backend``: ``"torch"``, ``"triton"`` (fused kernels; raster routes only) or None (``triton``
    for CUDA tensors when it applies).
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(f"x: expected shape (batch, C, H, W), got {found}")
    names = _check_routes(routes)
    _check_size(*x.shape[-2:])
    return _CrossScan.apply(x, names, _implementation(x, names, backend))


def cross_merge(
    y: torch.Tensor, routes: Sequence[str], height: int, width: int, backend: str | None = None
) -> torch.Tensor:
    """Put ``K`` route sequences ``(batch, K, C, L)`` back in row-major order and sum them.

    Returns ``(batch, C, H, W)`` with ``out[..., q] = sum_k y[:, k, ..., inverse(perm_k)[q]]``: the
    adjoint of ``cross_scan``, so ``cross_merge(cross_scan(x, routes), routes, H, W) = K * x``.
    Differentiable; the backward pass is ``cross_scan``. ``backend`` as for ``cross_scan``.
    """
    names = _check_routes(routes)
    height, width = _check_size(height, width)
    if not isinstance(y, torch.Tensor) or y.ndim != 4:
        found = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ShapeError(f"y: expected shape (batch, K, C, L), got {found}")
    if y.shape[1] != len(names) or y.shape[-1] != height * width:
        raise ShapeError(
            f"y: expected shape (batch, K={len(names)}, C, L={height * width}) for "
            f"{len(names)} routes on a {height}x{width} grid, got {tuple(y.shape)}"
        )
    return _CrossMerge.apply(y, names, height, width, _implementation(y, names, backend))
