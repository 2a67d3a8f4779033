"""Input validation shared by the physics operators.

Each check raises a :class:`kscan.errors.KscanError` subclass with a one-line message that names
the argument, what was found and what was expected.
"""

from __future__ import annotations

import torch

from kscan.errors import InvalidDataError, ShapeError


def require_complex(x: torch.Tensor, name: str, min_ndim: int = 2) -> None:
    """Require ``x`` to be a complex tensor with at least ``min_ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_complex():
        raise ShapeError(
            f"{name}: expected a complex tensor (complex64 or complex128), got {x.dtype}; "
            "convert a (..., 2) real layout with kscan.physics.fft.real_to_complex"
        )
    if x.ndim < min_ndim:
        raise ShapeError(
            f"{name}: expected at least {min_ndim} dimensions (..., H, W), got shape {tuple(x.shape)}"
        )


def require_ndim(x: torch.Tensor, name: str, ndim: int, layout: str) -> None:
    """Require ``x`` to have exactly ``ndim`` dimensions, described by ``layout`` in the message."""
    if x.ndim != ndim:
        raise ShapeError(f"{name}: expected shape {layout}, got {tuple(x.shape)}")


def require_finite(x: torch.Tensor, name: str) -> None:
    """Reject NaN or Inf values, counting them in the message."""
    finite = torch.isfinite(torch.view_as_real(x) if x.is_complex() else x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InvalidDataError(f"{name}: contains {bad} NaN or Inf values; expected finite data")
