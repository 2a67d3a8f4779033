"""Image-quality metrics for reconstructions and overlap/distance metrics for segmentations.

Reconstruction (magnitude images ``(slices, H, W)`` or one slice ``(H, W)``; ``target`` is the
ground truth, ``pred`` the reconstruction; per-slice functions return ``target.shape[:-2]``):

- SSIM (Wang et al. 2004) as scikit-image computes it with fastMRI's settings: 7x7 uniform window,
  K1 = 0.01, K2 = 0.03, sample covariance (N / (N - 1) with N = 49), averaged over the pixels whose
  window lies inside the image (skimage crops ``(7 - 1) // 2 = 3`` pixels from each border)::

      SSIM = mean_p [(2 mu_x mu_y + C1)(2 s_xy + C2)] / [(mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)]
      C1 = (K1 L)^2,  C2 = (K2 L)^2,  L = data range

- PSNR = 20 log10(L) - 10 log10(MSE);  NMSE = ||target - pred||^2 / ||target||^2.

Two conventions choose the data range L and how slices make a volume's value:

- ``"fastmri"`` (fastMRI's ``evaluate.py``): L = max of the target *volume*; volume SSIM is the mean
  of the slice SSIMs; volume PSNR and NMSE are computed over the whole volume at once.
- ``"calgary"`` (the Calgary-Campinas challenge, as DIRECT computes it): both slices are divided by
  the target slice's max, then L = max(target.max, pred.max) - min(target.min, pred.min) per slice;
  volume SSIM and PSNR are means over slices. SSIM and PSNR do not change when both images and L are
  scaled by one factor, so that division changes nothing and is skipped here. NMSE is the same in
  both conventions.

Segmentation (integer label maps ``(slices, H, W)`` or ``(H, W)``, one volume): Dice, IoU and
HD95 per class from MONAI, with the empty-label cases defined here (see :func:`dice`, :func:`hd95`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

from kscan.errors import ConfigError, InvalidDataError, ShapeError
from kscan.physics.checks import require_finite

Convention = Literal["fastmri", "calgary"]
ArrayLike = torch.Tensor | np.ndarray

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_CONVENTIONS = ("fastmri", "calgary")


# --- input checks -------------------------------------------------------------------------------


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x
    raise ShapeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")


def _require_same_shape(target: torch.Tensor, pred: torch.Tensor, min_hw: int) -> None:
    if target.ndim not in (2, 3):
        raise ShapeError(
            f"target: expected shape (slices, H, W) or (H, W), got {tuple(target.shape)}"
        )
    if pred.shape != target.shape:
        raise ShapeError(
            f"pred: expected the shape of target {tuple(target.shape)}, got {tuple(pred.shape)}"
        )
    if target.numel() == 0 or min(target.shape[-2:]) < min_hw:
        raise ShapeError(
            f"target: expected at least one slice and H, W >= {min_hw}, got {tuple(target.shape)}"
        )


def _check_images(
    target: ArrayLike, pred: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """Validate two magnitude images; return them as float64 ``(slices, H, W)`` on the target's
    device, and the per-slice output shape ``target.shape[:-2]``."""
    target, pred = _as_tensor(target, "target"), _as_tensor(pred, "pred")
    for x, name in ((target, "target"), (pred, "pred")):
        if x.is_complex():
            raise ShapeError(
                f"{name}: expected a real magnitude image, got {x.dtype}; take .abs() first"
            )
    _require_same_shape(target, pred, SSIM_WINDOW)
    require_finite(target, "target")
    require_finite(pred, "pred")
    size = target.shape[-2:]
    as_slices = {"dtype": torch.float64, "device": target.device}
    return (
        target.to(**as_slices).reshape(-1, *size),
        pred.to(**as_slices).reshape(-1, *size),
        target.shape[:-2],
    )


def _check_convention(convention: str) -> None:
    if convention not in _CONVENTIONS:
        raise ConfigError(f"convention: expected one of {_CONVENTIONS}, got {convention!r}")


def _data_range(
    target: torch.Tensor,
    pred: torch.Tensor,
    data_range: float | ArrayLike | None,
    convention: Convention,
) -> torch.Tensor:
    """Data range L per slice, ``(slices,)`` float64, detached (a constant for gradients)."""
    n = target.shape[0]
    if data_range is not None:
        value = torch.as_tensor(data_range, dtype=torch.float64, device=target.device).reshape(-1)
        if value.numel() not in (1, n):
            raise ShapeError(
                f"data_range: expected a number or {n} values (one per slice), got {value.numel()}"
            )
        value = value.expand(n)
    elif convention == "fastmri":
        value = target.detach().amax().expand(n)
    else:
        t, p = target.detach(), pred.detach()
        value = torch.maximum(t.amax((-2, -1)), p.amax((-2, -1))) - torch.minimum(
            t.amin((-2, -1)), p.amin((-2, -1))
        )
    if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        raise InvalidDataError(
            f"data_range: expected a positive finite range ({convention} convention), got "
            f"{value.min().item():g}; an all-zero or constant target has no data range"
        )
    return value


# --- reconstruction metrics ---------------------------------------------------------------------


def _box_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every 7x7 window that fits in ``(..., H, W)``: ``(..., H - 6, W - 6)``.

    Separable (rows, then columns), like scipy's ``uniform_filter``.
    """
    rows = x.unfold(-2, SSIM_WINDOW, 1).mean(dim=-1)
    return rows.unfold(-1, SSIM_WINDOW, 1).mean(dim=-1)


def _ssim_slices(
    target: torch.Tensor, pred: torch.Tensor, data_range: torch.Tensor
) -> torch.Tensor:
    """SSIM of each slice of float64 ``(slices, H, W)`` images with ranges ``(slices,)``.

    The five local moments come from a 7x7 box filter without padding, whose output is exactly
    skimage's ``uniform_filter`` result after its 3-pixel border crop. This torch version exists
    because skimage is slow for training and validation loops (one slice at a time, CPU only) and
    not differentiable: this one runs batched on CPU or CUDA and gives gradients for ``1 - ssim`` as
    a training loss. On a CPU it is no faster than skimage; the gain is on a GPU.
    """
    moments = _box_mean(torch.stack([target, pred, target**2, pred**2, target * pred]))
    mu_x, mu_y, m_xx, m_yy, m_xy = moments.unbind(0)
    n = SSIM_WINDOW**2
    cov_norm = n / (n - 1)
    var_x = cov_norm * (m_xx - mu_x * mu_x)
    var_y = cov_norm * (m_yy - mu_y * mu_y)
    cov_xy = cov_norm * (m_xy - mu_x * mu_y)
    c1 = ((SSIM_K1 * data_range) ** 2)[:, None, None]
    c2 = ((SSIM_K2 * data_range) ** 2)[:, None, None]
    num = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).mean(dim=(-2, -1))


def ssim(
    target: ArrayLike,
    pred: ArrayLike,
    data_range: float | ArrayLike | None = None,
    convention: Convention = "fastmri",
) -> torch.Tensor:
    """SSIM per slice; equals skimage's ``structural_similarity(target[s], pred[s], data_range=L)``.

    Args:
        target: ground truth ``(slices, H, W)`` or ``(H, W)``, real, H and W >= 7.
        pred: reconstruction, same shape; gradients flow through it.
        data_range: L as a number or one value per slice (e.g. each batch item's volume max when
            training on slices of different volumes); ``None`` takes the convention's default.
        convention: ``"fastmri"`` (L = max of ``target``) or ``"calgary"`` (L per slice).

    Returns:
        float64 tensor of shape ``target.shape[:-2]``, on the input's device.
    """
    _check_convention(convention)
    t, p, shape = _check_images(target, pred)
    return _ssim_slices(t, p, _data_range(t, p, data_range, convention)).reshape(shape)


def psnr(
    target: ArrayLike,
    pred: ArrayLike,
    data_range: float | ArrayLike | None = None,
    convention: Convention = "fastmri",
) -> torch.Tensor:
    """PSNR per slice in dB: ``20 log10(L) - 10 log10(mean((target[s] - pred[s])^2))``.

    ``data_range`` and ``convention`` as in :func:`ssim`. A slice with zero error gives ``inf``.
    Returns a float64 tensor of shape ``target.shape[:-2]``.
    """
    _check_convention(convention)
    t, p, shape = _check_images(target, pred)
    mse = (t - p).pow(2).mean(dim=(-2, -1))
    value = 20 * torch.log10(_data_range(t, p, data_range, convention)) - 10 * torch.log10(mse)
    return value.reshape(shape)


def nmse(target: ArrayLike, pred: ArrayLike) -> torch.Tensor:
    """NMSE per slice: ``||target[s] - pred[s]||^2 / ||target[s]||^2``.

    A slice whose target is all zero gives ``inf`` (``nan`` if its prediction is zero too).
    Returns a float64 tensor of shape ``target.shape[:-2]``.
    """
    t, p, shape = _check_images(target, pred)
    value = (t - p).pow(2).sum(dim=(-2, -1)) / t.pow(2).sum(dim=(-2, -1))
    return value.reshape(shape)


def reconstruction_metrics(
    target: ArrayLike, pred: ArrayLike, convention: Convention = "fastmri"
) -> dict[str, float]:
    """SSIM, PSNR (dB) and NMSE of one volume ``(slices, H, W)`` (or one slice ``(H, W)``).

    ``"fastmri"``: SSIM is the mean over slices with L = the volume's max; PSNR and NMSE are computed
    over the whole volume. ``"calgary"``: SSIM and PSNR are means over slices of the per-slice values
    with per-slice L; NMSE over the volume. Average these over volumes to report a data set.
    """
    _check_convention(convention)
    t, p, _ = _check_images(target, pred)
    data_range = _data_range(t, p, None, convention)
    sq_err = (t - p).pow(2)
    if convention == "fastmri":
        mse = sq_err.mean().item()
        volume_psnr = (
            20 * math.log10(data_range[0].item()) - 10 * math.log10(mse) if mse > 0 else math.inf
        )
    else:
        slice_mse = sq_err.mean(dim=(-2, -1))
        volume_psnr = (20 * torch.log10(data_range) - 10 * torch.log10(slice_mse)).mean().item()
    return {
        "ssim": _ssim_slices(t, p, data_range).mean().item(),
        "psnr": volume_psnr,
        "nmse": (sq_err.sum() / t.pow(2).sum()).item(),
    }


# --- segmentation metrics -----------------------------------------------------------------------


def _check_labels(
    target: ArrayLike, pred: ArrayLike, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two integer label maps ``(slices, H, W)`` or ``(H, W)`` with values in [0, C)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(
            f"num_classes: expected an integer >= 2 (background + 1), got {num_classes!r}"
        )
    target, pred = _as_tensor(target, "target"), _as_tensor(pred, "pred")
    for x, name in ((target, "target"), (pred, "pred")):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ShapeError(f"{name}: expected an integer label map, got {x.dtype}; use .long()")
    _require_same_shape(target, pred, 1)
    for x, name in ((target, "target"), (pred, "pred")):
        low, high = int(x.min()), int(x.max())
        if low < 0 or high >= num_classes:
            raise InvalidDataError(
                f"{name}: expected labels in [0, {num_classes - 1}], found [{low}, {high}]"
            )
    return target, pred.to(target.device)


def _class_masks(
    target: torch.Tensor, pred: torch.Tensor, num_classes: int, include_background: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Binary masks ``(1, 1, *spatial)`` (MONAI's batch and channel axes) of each reported class."""
    for c in range(0 if include_background else 1, num_classes):
        yield (target == c)[None, None], (pred == c)[None, None]


def dice(
    target: ArrayLike, pred: ArrayLike, num_classes: int, include_background: bool = False
) -> torch.Tensor:
    """Dice per class, ``2 |T ∩ P| / (|T| + |P|)``, from ``monai.metrics.compute_dice``.

    Args:
        target, pred: integer label maps ``(slices, H, W)`` (one 3D volume) or ``(H, W)``.
        num_classes: number of labels including background 0.
        include_background: also report class 0.

    Returns:
        float64 ``(num_classes - 1,)`` for classes 1 .. C-1 (``(num_classes,)`` with background),
        computed by MONAI in float32. A class absent from both maps scores 1; absent from exactly
        one, 0.
    """
    t, p = _check_labels(target, pred, num_classes)
    scores = [
        compute_dice(pm, tm, include_background=True, ignore_empty=False)[0, 0]
        for tm, pm in _class_masks(t, p, num_classes, include_background)
    ]
    return torch.stack(scores).to(torch.float64)


def iou(
    target: ArrayLike, pred: ArrayLike, num_classes: int, include_background: bool = False
) -> torch.Tensor:
    """IoU (Jaccard) per class, ``|T ∩ P| / |T ∪ P|``, from ``monai.metrics.compute_iou``.

    Arguments and shapes as in :func:`dice`. A class absent from both maps scores 1; absent from
    exactly one, 0.
    """
    t, p = _check_labels(target, pred, num_classes)
    scores = [
        compute_iou(pm, tm, include_background=True, ignore_empty=False)[0, 0]
        for tm, pm in _class_masks(t, p, num_classes, include_background)
    ]
    return torch.stack(scores).to(torch.float64)


def _check_spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        values: tuple[float, ...] = (1.0,) * ndim
    elif np.ndim(spacing) == 0:
        values = (float(spacing),) * ndim
    else:
        values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ShapeError(f"spacing: expected 1 or {ndim} values (one per axis), got {len(values)}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise InvalidDataError(f"spacing: expected positive finite values, got {values}")
    return values


def hd95(
    target: ArrayLike,
    pred: ArrayLike,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    include_background: bool = False,
) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance per class, from MONAI.

    ``monai.metrics.compute_hausdorff_distance(percentile=95)``: the boundary voxels of each mask
    (the mask minus its erosion) are compared; the value is the larger of the two directed 95th
    percentiles of boundary-to-nearest-boundary Euclidean distances, in units of ``spacing``.

    Args:
        target, pred, num_classes, include_background: as in :func:`dice`.
        spacing: voxel size per axis of the label map (``(slices, H, W)`` order), or one number for
            isotropic voxels; ``None`` means 1.

    Returns:
        float64 ``(num_classes - 1,)`` (``(num_classes,)`` with background). A class absent from
        both maps gives 0; a class absent from exactly one gives ``inf`` (the distance to an empty
        set is unbounded), never NaN.
    """
    t, p = _check_labels(target, pred, num_classes)
    voxel = _check_spacing(spacing, t.ndim)
    values = []
    for tm, pm in _class_masks(t, p, num_classes, include_background):
        t_any, p_any = bool(tm.any()), bool(pm.any())
        if not (t_any and p_any):
            values.append(torch.tensor(0.0 if t_any == p_any else math.inf))
            continue
        with warnings.catch_warnings():
            # MONAI 1.5+ passes its own deprecated argument to get_mask_edges internally.
            warnings.filterwarnings(
                "ignore", message=".*always_return_as_numpy", category=FutureWarning
            )
            hd = compute_hausdorff_distance(
                pm, tm, include_background=True, percentile=95, spacing=voxel
            )
        values.append(hd[0, 0].cpu())
    return torch.stack(values).to(device=t.device, dtype=torch.float64)


def segmentation_metrics(
    target: ArrayLike,
    pred: ArrayLike,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    include_background: bool = False,
) -> dict[str, torch.Tensor]:
    """Dice, IoU and HD95 per class of one label volume: ``{"dice", "iou", "hd95"}``.

    Each entry is float64 ``(num_classes - 1,)`` (classes 1 .. C-1), with the empty-class rules of
    :func:`dice`, :func:`iou` and :func:`hd95`.
    """
    return {
        "dice": dice(target, pred, num_classes, include_background),
        "iou": iou(target, pred, num_classes, include_background),
        "hd95": hd95(target, pred, num_classes, spacing, include_background),
    }
