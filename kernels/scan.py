"""The public selective scan: input checks and the choice of backend.

Backends (one signature, the maths of :mod:`kscan.kernels.scan_reference`):

- ``reference``: the sequential loop, the definition the others are tested against;
- ``numba``: fused numba kernels (:mod:`kscan.kernels.scan_numba`), the default for CPU tensors
  when numba imports;
- ``torch``: the chunked torch scan (:mod:`kscan.kernels.scan_torch`), the default for CPU tensors
  without numba;
- ``triton``: Triton kernels (:mod:`kscan.kernels.scan_triton`), the default for CUDA tensors when
  Triton is available (otherwise CUDA tensors use ``torch``);
- ``mamba_ssm``: mamba-ssm's compiled CUDA kernel, only when asked for.

``backend=`` or the environment variable ``KSCAN_SCAN_BACKEND`` forces one; forcing a backend that
cannot run raises :class:`kscan.errors.ConfigError` saying what is missing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from kscan.errors import ConfigError, ShapeError
from kscan.kernels.scan_reference import selective_scan_reference
from kscan.kernels.scan_torch import selective_scan_torch

BACKENDS = ("reference", "numba", "torch", "triton", "mamba_ssm")
ENV_VAR = "KSCAN_SCAN_BACKEND"

ScanFn = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def _triton_backend() -> ScanFn | None:
    """``selective_scan_triton`` when its module imports and Triton can run here, else None."""
    try:
        module = importlib.import_module("kscan.kernels.scan_triton")
    except ImportError:
        return None
    available = getattr(module, "triton_available", None)
    fn = getattr(module, "selective_scan_triton", None)
    return fn if available is not None and fn is not None and available() else None


def _numba_backend() -> ScanFn | None:
    """``selective_scan_numba`` when its module (and so numba) imports, else None."""
    try:
        module = importlib.import_module("kscan.kernels.scan_numba")
    except ImportError:
        return None
    return module.selective_scan_numba


def _mamba_ssm_backend(device: torch.device, initial_state: torch.Tensor | None) -> ScanFn:
    from kscan.kernels import scan_mamba_ssm

    if not scan_mamba_ssm.mamba_ssm_available():
        raise ConfigError(
            "mamba_ssm backend needs mamba-ssm's compiled extension (pip install 'kscan[cuda]')"
        )
    if device.type != "cuda":
        raise ConfigError(f"mamba_ssm backend needs CUDA tensors, got tensors on {device}")
    if initial_state is not None:
        raise ConfigError("mamba_ssm backend does not support initial_state; use backend='triton'")
    return scan_mamba_ssm.selective_scan_mamba_ssm


def resolve_backend(
    device: torch.device, backend: str | None = None, initial_state: torch.Tensor | None = None
) -> tuple[str, ScanFn]:
    """The backend's name and function for tensors on ``device``.

    ``backend`` wins over ``$KSCAN_SCAN_BACKEND``; without either, CUDA tensors use ``triton``
    (``torch`` when Triton is unavailable) and other tensors ``numba`` (``torch`` when numba is
    unavailable).
    """
    source = "backend"
    if backend is None and os.environ.get(ENV_VAR):
        backend, source = os.environ[ENV_VAR], ENV_VAR
    if backend is None:
        if device.type == "cuda":
            fn, name = _triton_backend(), "triton"
        else:
            fn, name = _numba_backend(), "numba"
        return (name, fn) if fn is not None else ("torch", selective_scan_torch)
    if backend not in BACKENDS:
        raise ConfigError(f"{source} is {backend!r}, expected one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return backend, selective_scan_reference
    if backend == "torch":
        return backend, selective_scan_torch
    if backend == "numba":
        numba_fn = _numba_backend()
        if numba_fn is None:
            raise ConfigError("numba backend needs numba (pip install numba)")
        if device.type != "cpu":
            raise ConfigError(f"numba backend needs CPU tensors, got tensors on {device}")
        return backend, numba_fn
    if backend == "triton":
        triton_fn = _triton_backend()
        if triton_fn is None:
            raise ConfigError(
                "triton backend needs Triton (pip install triton) and a CUDA device or "
                "TRITON_INTERPRET=1"
            )
        return backend, triton_fn
    return backend, _mamba_ssm_backend(device, initial_state)


def _check_shape(name: str, x: torch.Tensor | None, expected: tuple[int, ...], label: str) -> None:
    if x is not None and tuple(x.shape) != expected:
        raise ShapeError(f"selective_scan: {name} has shape {tuple(x.shape)}, expected {label}")


def check_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> None:
    """Raise :class:`~kscan.errors.ShapeError` naming the first argument with a wrong shape,
    dtype or device."""
    tensors = {
        "u": u,
        "delta": delta,
        "A": A,
        "B": B,
        "C": C,
        "D": D,
        "z": z,
        "delta_bias": delta_bias,
        "initial_state": initial_state,
    }
    for name, x in tensors.items():
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            found = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"selective_scan: {name} is {found}, expected a real floating tensor")
        if x.device != u.device:
            raise ShapeError(f"selective_scan: {name} is on {x.device}, expected {u.device} like u")
    if u.ndim != 3:
        raise ShapeError(f"selective_scan: u has shape {tuple(u.shape)}, expected (batch, D, L)")
    batch, channels, length = u.shape
    if A.ndim != 2 or A.shape[0] != channels:
        raise ShapeError(
            f"selective_scan: A has shape {tuple(A.shape)}, expected (D={channels}, N)"
        )
    n = A.shape[1]
    bdl = f"(batch={batch}, D={channels}, L={length})"
    _check_shape("delta", delta, (batch, channels, length), bdl)
    _check_shape("z", z, (batch, channels, length), bdl)
    _check_shape("D", D, (channels,), f"(D={channels},)")
    _check_shape("delta_bias", delta_bias, (channels,), f"(D={channels},)")
    _check_shape(
        "initial_state",
        initial_state,
        (batch, channels, n),
        f"(batch={batch}, D={channels}, N={n})",
    )
    for name, x in (("B", B), ("C", C)):
        groups = x.shape[1] if x.ndim == 4 else 1
        expected = (batch, n, length) if x.ndim != 4 else (batch, groups, n, length)
        if tuple(x.shape) != expected or groups == 0 or channels % groups:
            raise ShapeError(
                f"selective_scan: {name} has shape {tuple(x.shape)}, expected "
                f"(batch={batch}, N={n}, L={length}) or (batch={batch}, G, N={n}, L={length}) "
                f"with G dividing D={channels}"
            )


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The selective scan with mamba-ssm's ``selective_scan_fn`` semantics.

    ``delta = softplus(delta + delta_bias)`` (if ``delta_softplus``);
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t`` from ``h_{-1} = initial_state`` (or 0);
    ``y_t = sum_n C_t h_t + D u_t``, times ``silu(z_t)`` when ``z`` is given.

    Shapes: ``u, delta, z`` ``(batch, D, L)``; ``A`` ``(D, N)``; ``B, C`` ``(batch, N, L)`` or
    ``(batch, G, N, L)`` (group ``g`` serves channels ``g*D/G .. (g+1)*D/G - 1``); ``D,
    delta_bias`` ``(D,)``; ``initial_state`` ``(batch, D, N)``. Returns ``y`` ``(batch, D, L)`` in
    ``u``'s dtype and, with ``return_last_state``, the last state ``(batch, D, N)`` (float32, or
    float64 for float64 inputs). Differentiable in every tensor argument.

    ``backend``: one of :data:`BACKENDS`, else ``$KSCAN_SCAN_BACKEND``, else chosen by device.
    """
    check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    _, fn = resolve_backend(u.device, backend, initial_state)
    return fn(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=initial_state,
        return_last_state=return_last_state,
    )
