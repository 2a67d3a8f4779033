"""The image transforms shared by segmentation training and inference: one normalisation, one padding.

**Normalisation** (:func:`normalize_image`), per slice ``x`` of shape ``(H, W)``::

    q = percentile(|x|, 99.5)            (linear interpolation, as numpy.percentile)
    q = max(|x|)  if q == 0              (a slice that is more than 99.5 % zeros)
    y = clip(|x| / q, 0, c)              c = kscan.models.seg_heads.INPUT_CEILING = 4

The networks take magnitude images; ``|x|`` makes a signed input a magnitude, and one hot pixel
does not darken the slice (the scale is a percentile, not the maximum). Pixels brighter than ``q``
keep their contrast up to ``4 q`` (clipping at ``q`` itself erased the contrast between a small,
bright structure and the brightest tissue around it), and only outliers beyond saturate. An all-zero slice
stays all zeros (there is no scale to find): the caller decides what to say about it.

**Padding** (:func:`pad_to_multiple`): zeros (the background of a normalised MR image; reflection
would invent anatomy at the border), split as MONAI's sliding-window inference splits it: ``d // 2``
before and ``d - d // 2`` after, for ``d`` the rows (columns) missing to the next multiple.
:func:`crop` undoes it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kscan.errors import ConfigError, InvalidDataError, ShapeError
from kscan.models.seg_heads import INPUT_CEILING

ROBUST_PERCENTILE = 99.5
"""The percentile of ``|x|`` that :func:`normalize_image` maps to 1."""

Crop = tuple[slice, slice]
"""``(rows, columns)`` of the original image inside a padded one: ``padded[..., rows, columns]``."""


def normalize_image(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Scale each slice of ``x`` ``(..., H, W)`` (real) by its robust maximum.

    ``y = clip(|x| / q, 0, INPUT_CEILING)`` with ``q`` the 99.5th percentile of ``|x|`` over the slice (its
    maximum when that percentile is 0); all-zero slices give zeros. Returns a floating tensor of
    ``x``'s shape (float32 for integer input). ``name`` names ``x`` in error messages.

    Raises:
        ShapeError: ``x`` is complex or has fewer than 2 dimensions.
        InvalidDataError: ``x`` holds NaN or Inf; the message lists the slices (indices into the
            leading dimensions, flattened) that do.
    """
    if not isinstance(x, torch.Tensor) or x.is_complex() or x.ndim < 2:
        found = (
            f"{x.dtype} tensor of shape {tuple(x.shape)}"
            if isinstance(x, torch.Tensor)
            else type(x).__name__
        )
        raise ShapeError(f"{name}: expected a real tensor (..., H, W), got {found}")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    flat = x.abs().reshape(-1, x.shape[-2] * x.shape[-1])
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise InvalidDataError(
            f"{name}: NaN or Inf in {len(bad)} of {flat.shape[0]} slices (slices {index_list(bad)}); "
            "expected finite image values"
        )
    if flat.shape[1] == 0:
        return x.abs()
    scale = _percentile(flat, ROBUST_PERCENTILE)
    scale = torch.where(scale > 0, scale, flat.amax(dim=1, keepdim=True))
    y = torch.where(scale > 0, flat / scale.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return y.clamp_(0.0, INPUT_CEILING).reshape(x.shape)


def _percentile(rows: torch.Tensor, percent: float) -> torch.Tensor:
    """The ``percent`` percentile of each row of ``rows`` ``(n, m)`` -> ``(n, 1)``, interpolated
    linearly between order statistics as ``numpy.percentile``: at rank ``r = percent / 100 (m - 1)``,
    ``v[floor r] + (r - floor r) (v[floor r + 1] - v[floor r])`` of the sorted row ``v``.

    ``kthvalue`` instead of ``torch.quantile``, which refuses inputs over 2^24 elements.
    """
    rank = percent / 100 * (rows.shape[1] - 1)
    low = int(rank)
    below = rows.kthvalue(low + 1, dim=1, keepdim=True).values
    if low + 1 >= rows.shape[1]:
        return below
    above = rows.kthvalue(low + 2, dim=1, keepdim=True).values
    return below + (rank - low) * (above - below)


def index_list(items: list[int], limit: int = 10) -> str:
    """Indices for a message: ``[0, 1, 2]`` -> ``"0, 1, 2"``; over ``limit`` end with ``", ..."``."""
    text = ", ".join(str(i) for i in items[:limit])
    return text + (", ..." if len(items) > limit else "")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, Crop]:
    """Zero-pad the last two axes of ``x`` ``(..., H, W)`` up to multiples of ``multiple``.

    Returns ``(padded, crop)``: ``padded`` is ``(..., H', W')`` with ``H' = ceil(H / m) m`` (and
    likewise ``W'``), the image at rows ``(H' - H) // 2 ...`` and columns ``(W' - W) // 2 ...``;
    ``crop(padded, crop)`` gives ``x`` back. An ``x`` already of such a size is returned as is.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ConfigError(f"multiple: expected a positive integer, got {multiple!r}")
    if x.ndim < 2:
        raise ShapeError(f"x: expected shape (..., H, W), got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    extra_h, extra_w = -height % multiple, -width % multiple
    top, left = extra_h // 2, extra_w // 2
    window = (slice(top, top + height), slice(left, left + width))
    if extra_h == 0 and extra_w == 0:
        return x, window
    padded = F.pad(x, (left, extra_w - left, top, extra_h - top), mode="constant", value=0.0)
    return padded, window


def crop(y: torch.Tensor, window: Crop) -> torch.Tensor:
    """The inverse of :func:`pad_to_multiple`: ``y[..., rows, columns]`` of ``window``."""
    return y[..., window[0], window[1]]
