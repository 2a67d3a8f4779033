"""Overlapping-window inference with the windows split across ranks (issue 9, section 4).

MONAI's single-device ``sliding_window_inference`` with ``roi`` windows at scan interval
``s_i = int(roi_i (1 - overlap_i))`` (``roi_i`` where the window spans the axis, at least 1)
computes, for the importance map ``w`` (constant or Gaussian) and the windows ``Omega_j``::

    out = (sum_j  w * predictor(x[Omega_j]) placed at Omega_j) / (sum_j w placed at Omega_j)

Here rank ``r`` of ``P`` takes a contiguous share of the ``batch x windows`` list (as MONAI
orders it: image by image, windows in :func:`monai.data.utils.dense_patch_slices` order), runs
the predictor on it in batches of ``sw_batch_size`` and adds the weighted outputs into a
full-size buffer; **one all-reduce** sums the buffers. The weights' sum (the denominator) is
the same on every rank and is computed locally from all windows, as MONAI computes it, so it
costs no communication. The result equals MONAI's up to the order of the numerator's summation.

Reused from MONAI, not re-derived: the window enumeration (``dense_patch_slices``), the
importance map (``compute_importance_map``), the window size clipped to the image
(``get_valid_patch_size``) and the ``roi_size`` fall-back for non-positive entries
(``fall_back_tuple``). The scan-interval rule above is MONAI's (its helper is private). Not
supported (MONAI options): outputs other than one tensor, outputs of another size than the
window, ``roi_weight_map``, ``process_fn``, buffering, padding modes other than constant zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.utils import fall_back_tuple
from torch import distributed as dist
from torch.nn import functional as F

from kscan.errors import ConfigError, ShapeError
from kscan.pipelines.parallel.comm import Comm

MODES = ("constant", "gaussian")


def _intervals(image: Sequence[int], roi: Sequence[int], overlap: Sequence[float]) -> list[int]:
    """MONAI's scan interval per axis: the window size where it spans the axis, else
    ``max(int(roi (1 - overlap)), 1)``."""
    return [
        r if r == i else max(int(r * (1 - o)), 1)
        for i, r, o in zip(image, roi, overlap, strict=True)
    ]


def _check(inputs: torch.Tensor, sw_batch_size: int, overlap: Sequence[float], mode: str) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 3 or not inputs.is_floating_point():
        found = (
            f"{inputs.dtype} {tuple(inputs.shape)}"
            if isinstance(inputs, torch.Tensor)
            else type(inputs).__name__
        )
        raise ShapeError(f"inputs: expected a real tensor (batch, channels, *spatial), got {found}")
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ConfigError(f"sw_batch_size: expected a positive integer, got {sw_batch_size!r}")
    if any(not 0 <= o < 1 for o in overlap):
        raise ConfigError(f"overlap: expected values in [0, 1), got {list(overlap)}")
    if mode not in MODES:
        raise ConfigError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")


def distributed_sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Sequence[int] | int,
    sw_batch_size: int,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    overlap: Sequence[float] | float = 0.25,
    mode: str = "gaussian",
    group: dist.ProcessGroup | None = None,
    sigma_scale: Sequence[float] | float = 0.125,
    comm: Comm | None = None,
) -> torch.Tensor:
    """MONAI's ``sliding_window_inference`` with the windows split over the ranks of ``group``.

    Every rank passes the same ``inputs (batch, channels, *spatial)`` (2D or 3D, any number of
    spatial axes) and gets the whole output ``(batch, out_channels, *spatial)`` in the inputs'
    dtype. ``predictor`` maps ``(n, channels, *roi)`` to ``(n, out_channels, *roi)``.
    ``roi_size``: window size per spatial axis (an int for all; non-positive entries take the
    image size); windows larger than the image pad it with zeros, centred, and the output is
    cropped back, as in MONAI. ``overlap``, ``mode`` ("constant" or "gaussian") and
    ``sigma_scale`` as in MONAI. Without a process group it runs as one rank. ``comm``: the
    :class:`Comm` to use (and to count bytes in, kind ``"windows"``); one over ``group`` when None.
    """
    spatial = inputs.ndim - 2 if isinstance(inputs, torch.Tensor) else 0
    overlaps = [float(overlap)] * spatial if isinstance(overlap, int | float) else list(overlap)
    _check(inputs, sw_batch_size, overlaps, mode)
    if len(overlaps) != spatial:
        raise ConfigError(f"overlap: expected {spatial} values, got {len(overlaps)}")
    comm = comm if comm is not None else Comm(group)
    batch, image = inputs.shape[0], tuple(inputs.shape[2:])
    roi = fall_back_tuple(roi_size, image)
    if len(roi) != spatial:
        raise ShapeError(f"roi_size: expected {spatial} sizes for inputs {tuple(inputs.shape)}")

    # windows larger than the image: pad centred with zeros (F.pad lists the last axis first)
    padded = tuple(max(i, r) for i, r in zip(image, roi, strict=True))
    pad = []
    for i, p in reversed(list(zip(image, padded, strict=True))):
        pad += [(p - i) // 2, p - i - (p - i) // 2]
    x = F.pad(inputs, pad) if any(pad) else inputs

    windows = dense_patch_slices(padded, roi, _intervals(padded, roi, overlaps))
    patch = get_valid_patch_size(padded, roi)
    weight = compute_importance_map(
        patch, mode=mode, sigma_scale=sigma_scale, device=x.device, dtype=x.dtype
    )[None, None]
    count = x.new_zeros(1, 1, *padded)
    for w in windows:
        count[(slice(None), slice(None), *w)] += weight

    total = batch * len(windows)
    lo, hi = comm.rank * total // comm.world_size, (comm.rank + 1) * total // comm.world_size
    out: torch.Tensor | None = None
    for start in range(lo, hi, sw_batch_size):
        picks = [
            (j // len(windows), windows[j % len(windows)])
            for j in range(start, min(start + sw_batch_size, hi))
        ]
        y = predictor(torch.cat([x[(slice(b, b + 1), slice(None), *w)] for b, w in picks]))
        if not isinstance(y, torch.Tensor) or y.shape[2:] != patch or y.shape[0] != len(picks):
            found = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ShapeError(
                f"predictor: expected an output ({len(picks)}, channels, {', '.join(map(str, patch))}), "
                f"got {found}"
            )
        if out is None:
            out = x.new_zeros(batch, y.shape[1], *padded)
        y = y * weight
        for (b, w), part in zip(picks, y, strict=True):
            out[(slice(b, b + 1), slice(None), *w)] += part
    if total < comm.world_size:  # some rank ran no window and does not know the channels
        channels = torch.tensor([0 if out is None else out.shape[1]], device=x.device)
        if comm.world_size > 1:
            dist.all_reduce(channels, dist.ReduceOp.MAX, group=comm.group)
        if out is None:
            out = x.new_zeros(batch, int(channels.item()), *padded)
    assert out is not None
    out = comm.all_reduce_sum(out, "windows") / count
    crop = [slice(p_lo, p_lo + i) for p_lo, i in zip(pad[-2::-2], image, strict=True)]
    return out[(slice(None), slice(None), *crop)]
