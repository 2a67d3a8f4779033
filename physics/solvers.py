"""Classical reconstruction of multi-coil Cartesian k-space: zero-filled, CG-SENSE and CS.

Every solver takes masked k-space ``y`` ``(batch, coil, H, W)`` (complex), a mask ``M``
broadcastable to it and, except RSS zero-filling, coil maps ``S`` ``(batch, coil, H, W)``; it
works with ``A = M F S`` (:class:`kscan.physics.sense.SenseOperator`) and returns a
:class:`ReconResult` with the image ``(batch, H, W)``. All items of a batch are solved together
on the device of the k-space; an item stops changing once it has converged, so a batch gives the
same images as its items solved one by one. Reconstructions:

- :func:`zero_filled`: ``A^H y`` with maps; the RSS of ``F^-1 (M y)`` without.
- :func:`cg_sense`: ``(A^H A + lam I) x = A^H y`` by conjugate gradient (Tikhonov-regularised
  SENSE). History: relative residual ``sqrt(||A x - y||^2 + lam ||x||^2) / ||y||``.
- :func:`cs_wavelet`: ``min_c 1/2 ||A W^T c - y||^2 + tau ||c_detail||_1`` by FISTA, ``x = W^T c``,
  with ``W`` an orthogonal 2D wavelet transform (:class:`Wavelet2d`); for an orthogonal ``W`` this
  is the analysis problem ``min_x 1/2 ||A x - y||^2 + tau ||(W x)_detail||_1``.
- :func:`cs_tv`: ``min_x 1/2 ||A x - y||^2 + tau ||D x||_{2,1}`` (isotropic total variation,
  :func:`finite_difference`) by ADMM.

History for the CS solvers: relative change of the image ``||x_k - x_k-1|| / ||x_k||`` per
iteration. Every history is a real tensor ``(iterations, batch)``.

The sparsity weight is relative: ``tau = lam * max|A^H y|`` per item, so that the solvers are
scale-equivariant (``solve(s y) = s solve(y)``) and one ``lam`` fits data of any intensity scale.
Defaults were chosen on the simulated 128x128, 8-coil phantom (noise 0.01) of
:mod:`kscan.pipelines.synthetic`: CG-SENSE at 4x equispaced, CS at 8x random undersampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kscan.errors import ConfigError, ShapeError
from kscan.physics.cg import batch_dot, batch_vector_norm, conjugate_gradient, per_item
from kscan.physics.checks import require_complex, require_finite, require_ndim
from kscan.physics.coils import rss
from kscan.physics.fft import ifft2c
from kscan.physics.finite_difference import finite_difference, finite_difference_adjoint
from kscan.physics.sense import SenseOperator, check_mask
from kscan.physics.wavelets import Wavelet2d

Operator = Callable[[torch.Tensor], torch.Tensor]

_LIPSCHITZ_MARGIN = 1.02
"""Power iteration approaches ``L`` from below, slowly when the top of the spectrum is clustered
(with normalised maps and a 1D mask it reaches 0.994-0.998 of ``L`` in 20-100 iterations); FISTA
needs a step of at most ``1/L``, so the estimate is enlarged by 2%."""


@dataclass(frozen=True)
class ReconResult:
    """A reconstruction and how the solver got there.

    Attributes:
        image: ``(batch, H, W)``, complex (real only for RSS zero-filling).
        history: real ``(iterations, batch)``: the solver's convergence measure per iteration
            (see each solver); converged items repeat their last value.
        iterations: iterations run (the most over the batch).
        converged: whether every item reached the tolerance before the iteration cap.
    """

    image: torch.Tensor
    history: torch.Tensor
    iterations: int
    converged: bool


# ---------------------------------------------------------------------------------------------
# Input checks and shared pieces


def _check_kspace(kspace: torch.Tensor) -> None:
    require_complex(kspace, "kspace")
    require_ndim(kspace, "kspace", 4, "(batch, coil, H, W)")
    require_finite(kspace, "kspace")


def _sense_operator(
    kspace: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor, centered: bool
) -> SenseOperator:
    """Validate the inputs of a SENSE reconstruction and build ``A = M F S`` in k-space's dtype."""
    _check_kspace(kspace)
    require_complex(maps, "maps")
    if maps.shape != kspace.shape:
        raise ShapeError(
            f"maps: expected the k-space shape {tuple(kspace.shape)}, got {tuple(maps.shape)}"
        )
    require_finite(maps, "maps")
    return SenseOperator(maps.to(device=kspace.device, dtype=kspace.dtype), mask, centered=centered)


def _check_settings(lam: float, max_iter: int, tol: float) -> None:
    if lam < 0:
        raise ConfigError(f"lam: expected a non-negative regularisation weight, got {lam}")
    if max_iter < 1:
        raise ConfigError(f"max_iter: expected at least 1 iteration, got {max_iter}")
    if tol < 0:
        raise ConfigError(f"tol: expected a non-negative tolerance, got {tol}")


def _freeze(active: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` for the active batch items, ``old`` for the others."""
    return torch.where(per_item(active, new), new, old)


def _denominator(norm: torch.Tensor) -> torch.Tensor:
    """A norm to divide by: 1 where it is 0, so that relative measures of zero data stay finite."""
    return torch.where(norm > 0, norm, torch.ones_like(norm))


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``||new - old|| / ||new||`` per item."""
    return batch_vector_norm(new - old) / _denominator(batch_vector_norm(new))


def _stack(history: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """Per-iteration values ``(batch,)`` as a tensor ``(iterations, batch)``."""
    return torch.stack(history) if history else image.real.new_zeros((0, image.shape[0]))


def _result(image: torch.Tensor, history: list[torch.Tensor], active: torch.Tensor) -> ReconResult:
    return ReconResult(image, _stack(history, image), len(history), not bool(active.any()))


def _threshold_scale(magnitude: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``max(|c| - t, 0) / |c|`` (0 where ``|c| = 0``): the factor of complex soft-thresholding."""
    return torch.clamp(magnitude - threshold, min=0) / _denominator(magnitude)


def largest_eigenvalue(
    op: Operator, like: torch.Tensor, max_iter: int = 100, tol: float = 1e-4, seed: int = 0
) -> torch.Tensor:
    """Largest eigenvalue of a Hermitian positive semi-definite ``op`` per item, by power iteration.

    Starts every item from the same seeded random vector shaped like ``like[0]`` and stops an item
    when its Rayleigh quotient ``<v, op(v)>`` (``||v|| = 1``) changes by less than ``tol``
    relative. The quotient approaches the eigenvalue from below. Returns a real ``(batch,)``.
    """
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(like.shape[1:], dtype=like.dtype, generator=generator).to(like.device)
    v = start.expand_as(like)
    estimate = like.real.new_zeros(like.shape[0])
    active = torch.ones_like(estimate, dtype=torch.bool)
    for _ in range(max_iter):
        v = v / per_item(batch_vector_norm(v), v)
        w = op(v)
        quotient = batch_dot(v, w).real
        change = (quotient - estimate).abs() / quotient.abs().clamp_min(
            torch.finfo(quotient.dtype).tiny
        )
        estimate = torch.where(active, quotient, estimate)
        v = _freeze(active, w, v)
        active = active & (change >= tol)
        if not bool(active.any()):
            break
    return estimate


# ---------------------------------------------------------------------------------------------
# Zero-filled and CG-SENSE


def zero_filled(
    kspace: torch.Tensor,
    mask: torch.Tensor,
    maps: torch.Tensor | None = None,
    centered: bool = True,
) -> ReconResult:
    """Zero-filled reconstruction: ``A^H y`` (complex) with maps, else the RSS of ``F^-1(M y)`` (real).

    Args:
        kspace: ``(batch, coil, H, W)`` complex.
        mask: broadcastable to the k-space (e.g. ``(W,)``, ``(1, W)``, ``(batch, 1, 1, W)``).
        maps: coil sensitivities like the k-space, or ``None`` for the RSS magnitude.
        centered: centered or uncentered FFT convention.

    Returns:
        ``ReconResult`` with an empty history and 0 iterations.
    """
    if maps is not None:
        op = _sense_operator(kspace, mask, maps, centered)
        image = op.adjoint(kspace)
    else:
        _check_kspace(kspace)
        mask = check_mask(mask).to(device=kspace.device, dtype=kspace.real.dtype)
        if torch.broadcast_shapes(mask.shape, kspace.shape) != kspace.shape:
            raise ShapeError(
                f"mask: shape {tuple(mask.shape)} does not broadcast to the k-space {tuple(kspace.shape)}"
            )
        image = rss(ifft2c(kspace * mask, centered=centered))
    return _result(image, [], torch.zeros(kspace.shape[0], dtype=torch.bool))


def cg_sense(
    kspace: torch.Tensor,
    mask: torch.Tensor,
    maps: torch.Tensor,
    lam: float = 1e-4,
    max_iter: int = 100,
    tol: float = 1e-5,
    centered: bool = True,
) -> ReconResult:
    """CG-SENSE: solve ``(A^H A + lam I) x = A^H y`` by conjugate gradient from ``x = 0``.

    ``lam`` is the Tikhonov weight; the system is scale-invariant, so ``lam`` is comparable
    across data scales when the maps are normalised (``sum_c |S_c|^2 = 1``). Stops when the
    residual of the normal equations ``||A^H y - (A^H A + lam I) x|| / ||A^H y||`` drops below ``tol``.

    History: the relative residual of the regularised least-squares problem,
    ``sqrt(||A x - M y||^2 + lam ||x||^2) / ||M y||``. CG on the normal equations minimises it
    over a growing Krylov subspace (CGLS), so it never increases (up to rounding); the residual
    of the normal equations, by contrast, oscillates.
    """
    _check_settings(lam, max_iter, tol)
    op = _sense_operator(kspace, mask, maps, centered)
    measured = op.mask * kspace
    measured_norm = _denominator(batch_vector_norm(measured))
    residuals: list[torch.Tensor] = []

    def record(x: torch.Tensor, _: torch.Tensor) -> None:
        misfit = (
            batch_vector_norm(op.forward(x) - measured).square()
            + lam * batch_vector_norm(x).square()
        )
        residuals.append(misfit.sqrt() / measured_norm)

    rhs = op.adjoint(kspace)
    image, normal_residual = conjugate_gradient(
        lambda x: op.normal(x) + lam * x, rhs, max_iter=max_iter, tol=tol, callback=record
    )
    converged = normal_residual.shape[0] == 0 or bool((normal_residual[-1] < tol).all())
    return ReconResult(image, _stack(residuals, rhs), len(residuals), converged)


# ---------------------------------------------------------------------------------------------
# Compressed sensing: L1-wavelet


def cs_wavelet(
    kspace: torch.Tensor,
    mask: torch.Tensor,
    maps: torch.Tensor,
    lam: float = 1e-4,
    wavelet: str = "db4",
    levels: int = 4,
    max_iter: int = 300,
    tol: float = 1e-4,
    centered: bool = True,
) -> ReconResult:
    """L1-wavelet compressed sensing by FISTA on the wavelet coefficients.

    Minimises ``1/2 ||A W^T c - y||^2 + tau ||c_detail||_1`` with ``tau = lam * max|A^H y|`` per
    item; the approximation band is not penalised. Step ``1/L`` with ``L`` the largest eigenvalue
    of ``A^H A`` by power iteration, enlarged by :data:`_LIPSCHITZ_MARGIN` (``W`` has norm 1). The
    proximal step is exact: complex soft-thresholding of each coefficient by its magnitude.
    Starts from ``c = W A^H y``. History: relative change of the image ``x = W^T c`` per iteration.
    """
    _check_settings(lam, max_iter, tol)
    op = _sense_operator(kspace, mask, maps, centered)
    transform = Wavelet2d(tuple(kspace.shape[-2:]), wavelet, levels)
    zf = op.adjoint(kspace)
    coeffs = transform.forward(zf)
    step = 1 / (_LIPSCHITZ_MARGIN * largest_eigenvalue(op.normal, zf).unsqueeze(1))
    threshold = lam * zf.abs().flatten(1).amax(dim=1, keepdim=True) * step
    penalised = torch.arange(coeffs.shape[1], device=coeffs.device) >= transform.num_approx
    x, momentum_point, t = zf, coeffs, torch.ones_like(step)
    active = torch.ones(zf.shape[0], dtype=torch.bool, device=zf.device)
    history = []
    for _ in range(max_iter):
        v = momentum_point - step * transform.forward(
            op.normal(transform.adjoint(momentum_point)) - zf
        )
        new_coeffs = torch.where(penalised, v * _threshold_scale(v.abs(), threshold), v)
        new_x = transform.adjoint(new_coeffs)
        t_next = (1 + torch.sqrt(1 + 4 * t.square())) / 2
        next_point = new_coeffs + (t - 1) / t_next * (new_coeffs - coeffs)
        change = _relative_change(new_x, x)
        history.append(torch.where(active, change, history[-1] if history else change))
        coeffs = _freeze(active, new_coeffs, coeffs)
        x = _freeze(active, new_x, x)
        momentum_point = _freeze(active, next_point, momentum_point)
        t = _freeze(active, t_next, t)
        active = active & (change >= tol)
        if not bool(active.any()):
            break
    return _result(x, history, active)


# ---------------------------------------------------------------------------------------------
# Compressed sensing: total variation


def _gradient_magnitude(g: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``sqrt(|g_H|^2 + |g_W|^2)``: ``(batch, 2, H, W)`` -> ``(batch, 1, H, W)``."""
    return torch.linalg.vector_norm(g, dim=-3, keepdim=True)


def cs_tv(
    kspace: torch.Tensor,
    mask: torch.Tensor,
    maps: torch.Tensor,
    lam: float = 1e-4,
    max_iter: int = 200,
    tol: float = 1e-4,
    rho: float = 1e-3,
    cg_iter: int = 10,
    centered: bool = True,
) -> ReconResult:
    """Total-variation compressed sensing by ADMM.

    Minimises ``1/2 ||A x - y||^2 + tau ||D x||_{2,1}`` with ``tau = lam * max|A^H y|`` per item,
    ``||g||_{2,1} = sum_pixels sqrt(|g_H|^2 + |g_W|^2)`` (isotropic TV of the complex image),
    splitting ``z = D x`` with penalty ``rho`` (scaled dual ``u``)::

        x <- (A^H A + rho D^H D)^-1 (A^H y + rho D^H (z - u))      cg_iter CG steps, warm-started
        z <- shrink(D x + u, tau / rho)                             per-pixel group soft-threshold
        u <- u + D x - z

    Starts from ``x = A^H y``, ``z = D x``, ``u = 0``. History: relative change of ``x`` per iteration.
    """
    _check_settings(lam, max_iter, tol)
    if rho <= 0 or cg_iter < 1:
        raise ConfigError(
            f"cs_tv: expected rho > 0 and cg_iter >= 1, got rho={rho}, cg_iter={cg_iter}"
        )
    op = _sense_operator(kspace, mask, maps, centered)
    zf = op.adjoint(kspace)
    threshold = per_item(lam * zf.abs().flatten(1).amax(dim=1), zf).unsqueeze(1) / rho

    def system(x: torch.Tensor) -> torch.Tensor:
        return op.normal(x) + rho * finite_difference_adjoint(finite_difference(x))

    x, z = zf, finite_difference(zf)
    u = torch.zeros_like(z)
    active = torch.ones(zf.shape[0], dtype=torch.bool, device=zf.device)
    history = []
    for _ in range(max_iter):
        rhs = zf + rho * finite_difference_adjoint(z - u)
        new_x, _ = conjugate_gradient(system, rhs, x0=x, max_iter=cg_iter, tol=0.0)
        dx = finite_difference(new_x)
        w = dx + u
        new_z = w * _threshold_scale(_gradient_magnitude(w), threshold)
        change = _relative_change(new_x, x)
        history.append(torch.where(active, change, history[-1] if history else change))
        u = _freeze(active, w - new_z, u)
        z = _freeze(active, new_z, z)
        x = _freeze(active, new_x, x)
        active = active & (change >= tol)
        if not bool(active.any()):
            break
    return _result(x, history, active)
