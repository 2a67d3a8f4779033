"""``kscan evaluate PREDICTIONS TARGETS``: score reconstructions (and segmentations) against targets.

**Pairing.** ``PREDICTIONS`` and ``TARGETS`` are files or folders (not searched recursively).
Volumes are paired by file stem, the name without ``.nii.gz`` / ``.nii`` / ``.h5`` / ``.hdf5``
(``file1000001.h5`` <-> ``file1000001.nii.gz``); two files are paired whatever their names. Label
files (``*_labels.nii.gz``) and JSON sidecars are not volumes. Unpaired volumes on either side are
listed and are an error unless ``--allow-missing``.

**Volumes**, always compared as ``(slices, H, W)`` (kscan's image layout):

- a target is the ``reconstruction_rss`` (else ``reconstruction_esc``; or ``--key``) dataset of a
  fastMRI HDF5 file, ``(slices, H, W)``, or a NIfTI volume;
- a prediction is an HDF5 file with a ``reconstruction`` dataset ``(slices, H, W)`` (the fastMRI
  submission layout) or a NIfTI volume;
- NIfTI arrays are stored ``(W, H, slices)`` (``i`` = column, ``j`` = row, ``k`` = slice, as kscan's
  DICOM and NIfTI writers store them) and are converted with
  :func:`kscan.pipelines.io.nifti.nifti_array_to_volume`; a 2D NIfTI is one slice.

Shapes must match, or with ``--crop`` the prediction may be larger in ``H`` and ``W``: it is then
centre-cropped to the target's (fastMRI's crop, starting at ``(n - crop) // 2``), labels too, as
for reconstructions kept at the k-space's size. Any other mismatch is an error naming both files.

**Metrics** per volume (:func:`kscan.pipelines.metrics.reconstruction_metrics`): SSIM, PSNR (dB)
and NMSE in the fastMRI convention (data range = the target volume's max; SSIM the mean of slice
SSIMs; PSNR and NMSE over the volume) or, with ``--convention calgary``, the Calgary-Campinas one.
With ``--labels``, pairs whose both sides have label volumes also get Dice, IoU and HD95 per class
1 .. C-1 (:func:`kscan.pipelines.metrics.segmentation_metrics`; C from ``--num-classes``, else the
largest label in the pair + 1). Labels are the ``segmentation`` dataset of an HDF5 file or the
``<stem>_labels.nii.gz`` (or ``.nii``) file beside the volume. HD95 is in mm when the target's
labels come with a voxel size (a NIfTI's; an HDF5 file's ISMRMRD header's recon field of view over
the recon matrix), in voxels otherwise; a class absent from exactly one side
gives ``inf``. ``--labels-only`` scores the labels alone (for image inputs, whose image is its own
target) and makes a pair without labels on both sides an error. The last row is the mean over
volumes of each column (blank cells left out).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from kscan.errors import ConfigError, FileFormatError, KscanError, ShapeError
from kscan.pipelines.atomic import write_text
from kscan.pipelines.cli_args import add_quiet
from kscan.pipelines.io.fastmri import SEGMENTATION, TARGET_KEYS, header_voxel_size_mm
from kscan.pipelines.io.nifti import nifti_array_to_volume, read_nifti
from kscan.pipelines.metrics import reconstruction_metrics, segmentation_metrics
from kscan.pipelines.synthetic import center_crop

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".h5", ".hdf5")
LABELS_SUFFIX = "_labels"
PREDICTION_KEY = "reconstruction"
RECONSTRUCTION_COLUMNS = ("ssim", "psnr", "nmse")


@dataclass(frozen=True)
class Volume:
    """A magnitude ``image`` ``(slices, H, W)``, its integer ``labels`` of the same slices (or
    None), and the labels' voxel size ``(slices, H, W)`` in mm when known."""

    image: np.ndarray
    labels: np.ndarray | None
    label_spacing: tuple[float, float, float] | None


@dataclass(frozen=True)
class Pairing:
    """Volumes paired by stem, and those found on one side only."""

    pairs: list[tuple[Path, Path]]
    predictions_only: list[Path]
    targets_only: list[Path]


# --- files --------------------------------------------------------------------------------------


def stem(path: str | Path) -> str:
    """``file1000001.nii.gz`` -> ``file1000001`` (the volume suffixes removed, others kept)."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_volume_file(path: Path) -> bool:
    return (
        path.is_file()
        and not path.name.startswith(".")
        and path.name.endswith(VOLUME_SUFFIXES)
        and not stem(path).endswith(LABELS_SUFFIX)
    )


def volume_files(path: str | Path) -> dict[str, Path]:
    """The volumes of a folder (or the one file ``path``) by stem; two files of one stem is an error."""
    path = Path(path)
    if path.is_file():
        return {stem(path): path}
    if not path.is_dir():
        raise FileFormatError(f"{path}: no such file or folder")
    found: dict[str, Path] = {}
    for file in sorted(p for p in path.iterdir() if _is_volume_file(p)):
        key = stem(file)
        if key in found:
            raise FileFormatError(
                f"{path}: {found[key].name} and {file.name} have the same stem {key!r}"
            )
        found[key] = file
    if not found:
        raise FileFormatError(
            f"{path}: no volumes ({', '.join(VOLUME_SUFFIXES)} files other than *{LABELS_SUFFIX}.*)"
        )
    return found


def pair_volumes(predictions: str | Path, targets: str | Path) -> Pairing:
    """Pair prediction and target volumes by stem (two files are paired as they are)."""
    if Path(predictions).is_file() and Path(targets).is_file():
        return Pairing([(Path(predictions), Path(targets))], [], [])
    preds, tgts = volume_files(predictions), volume_files(targets)
    return Pairing(
        pairs=[(preds[k], tgts[k]) for k in sorted(preds.keys() & tgts.keys())],
        predictions_only=[preds[k] for k in sorted(preds.keys() - tgts.keys())],
        targets_only=[tgts[k] for k in sorted(tgts.keys() - preds.keys())],
    )


def _h5_read(path: Path, candidates: Sequence[str]) -> tuple[str, np.ndarray | None, list[str]]:
    """``(key, data, keys)``: the first of the ``candidates`` datasets in ``path`` (``data`` None
    when there is none) and the file's top-level keys."""
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            for key in candidates:
                if isinstance(f.get(key), h5py.Dataset):
                    return key, np.asarray(f[key][()]), keys
    except OSError as err:
        raise FileFormatError(f"{path}: not a readable HDF5 file ({err})") from err
    return candidates[0], None, keys


def _image(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    if array.ndim != 3:
        raise ShapeError(f"{path}: {what} has shape {array.shape}; expected (slices, H, W)")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise FileFormatError(f"{path}: {what} has dtype {array.dtype}; expected real magnitudes")
    return array.astype(np.float64, copy=False)


def _as_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer labels; float arrays (as NIfTI often stores labels) must hold whole numbers."""
    if np.issubdtype(array.dtype, np.floating):
        if not (np.isfinite(array).all() and (array == np.rint(array)).all()):
            raise FileFormatError(
                f"{path}: labels are not whole numbers; expected an integer label map"
            )
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise FileFormatError(f"{path}: labels have dtype {array.dtype}; expected integers")
    return array.astype(np.int64)


def _labels_beside(path: Path) -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """``<stem>_labels.nii.gz`` (or ``.nii``) next to ``path`` as (slices, H, W) labels and spacing."""
    for suffix in (".nii.gz", ".nii"):
        file = path.with_name(stem(path) + LABELS_SUFFIX + suffix)
        if file.is_file():
            nifti = read_nifti(file)
            zooms = [*nifti.header["zooms"][:3], 1.0, 1.0][:3]  # (i, j, k) = (W, H, slices)
            spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
            return _as_labels(nifti_array_to_volume(nifti.array, file), file), spacing
    return None


def _read(path: Path, h5_keys: Sequence[str], with_labels: bool) -> Volume:
    """A volume from NIfTI or from the first of ``h5_keys``; labels when ``with_labels``."""
    labels: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    if path.name.endswith((".nii", ".nii.gz")):
        image = _image(nifti_array_to_volume(read_nifti(path).array, path), path, "NIfTI volume")
    else:
        key, array, keys = _h5_read(path, h5_keys)
        if array is None:
            wanted = " or ".join(f"'{k}'" for k in h5_keys)
            raise FileFormatError(f"{path}: no {wanted} dataset; found {keys}")
        image = _image(array, path, f"'{key}'")
        stored = _h5_read(path, (SEGMENTATION,))[1] if with_labels else None
        if stored is not None:
            labels = _as_labels(stored, path)
            voxel = header_voxel_size_mm(path)  # (dH, dW, dZ), when the header gives it
            spacing = None if voxel is None else (voxel[2], voxel[0], voxel[1])
    if with_labels and labels is None:
        beside = _labels_beside(path)
        if beside is not None:
            labels, spacing = beside
    return Volume(image, labels, spacing)


def read_prediction(path: str | Path, with_labels: bool = False) -> Volume:
    """A prediction: NIfTI volume or HDF5 ``reconstruction`` ``(slices, H, W)`` (module docstring)."""
    return _read(Path(path), (PREDICTION_KEY,), with_labels)


def read_target(path: str | Path, key: str | None = None, with_labels: bool = False) -> Volume:
    """A target: NIfTI volume or the ``key`` dataset of an HDF5 file (default: the RSS, else ESC target)."""
    keys = (key,) if key is not None else tuple(TARGET_KEYS.values())
    return _read(Path(path), keys, with_labels)


# --- metrics ------------------------------------------------------------------------------------


def _with_files(err: KscanError, prediction: Path, target: Path) -> KscanError:
    return type(err)(f"{prediction} vs {target}: {err}")


def evaluate_pair(
    prediction: str | Path,
    target: str | Path,
    *,
    convention: str = "fastmri",
    key: str | None = None,
    labels: bool = False,
    num_classes: int | None = None,
    labels_only: bool = False,
    crop: bool = False,
) -> dict[str, Any]:
    """One CSV row: ``prediction``, ``target`` (file names), ``slices``, ``ssim``, ``psnr``,
    ``nmse`` (not with ``labels_only``) and, with ``labels`` (or ``labels_only``) and label
    volumes on both sides, ``dice_c``, ``iou_c``, ``hd95_c`` for classes c = 1 .. C-1. With
    ``crop`` a larger prediction is centre-cropped to the target's ``(H, W)``."""
    prediction, target = Path(prediction), Path(target)
    labels = labels or labels_only
    pred = read_prediction(prediction, labels)
    tgt = read_target(target, key, labels)
    if crop:
        pred = _cropped_to(pred, tgt.image.shape, prediction, target)
    if pred.image.shape != tgt.image.shape:
        hint = "" if crop else " (--crop centre-crops a larger prediction)"
        raise ShapeError(
            f"{prediction} has shape {pred.image.shape} but {target} has {tgt.image.shape}; "
            f"expected the same (slices, H, W){hint}"
        )
    if labels_only and (pred.labels is None or tgt.labels is None):
        side = prediction if pred.labels is None else target
        raise FileFormatError(
            f"{side}: --labels-only but no labels (a 'segmentation' dataset, or "
            f"{stem(side)}{LABELS_SUFFIX}.nii.gz beside it)"
        )
    try:
        row: dict[str, Any] = {
            "prediction": prediction.name,
            "target": target.name,
            "slices": pred.image.shape[0],
        }
        if not labels_only:
            row.update(reconstruction_metrics(tgt.image, pred.image, convention))  # type: ignore[arg-type]
        if pred.labels is not None and tgt.labels is not None:
            row.update(_label_scores(pred.labels, tgt.labels, tgt.label_spacing, num_classes))
    except KscanError as err:
        raise _with_files(err, prediction, target) from err
    return row


def _cropped_to(volume: Volume, shape: tuple[int, ...], prediction: Path, target: Path) -> Volume:
    """``volume`` (image and labels) centre-cropped to ``shape``'s ``(H, W)`` when it is at least
    that large with as many slices; as is when the shapes already match."""
    size = tuple(shape[-2:])
    if volume.image.shape == shape:
        return volume
    larger = volume.image.shape[0] == shape[0] and all(
        n >= m for n, m in zip(volume.image.shape[-2:], size, strict=True)
    )
    if not larger:
        raise ShapeError(
            f"{prediction} has shape {volume.image.shape} but {target} has {shape}; --crop "
            "needs the same slices and a prediction at least as large in H and W"
        )
    labels = None if volume.labels is None else center_crop(volume.labels, size)
    return Volume(center_crop(volume.image, size), labels, volume.label_spacing)


def _label_scores(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: tuple[float, float, float] | None,
    num_classes: int | None,
) -> dict[str, float]:
    """``dice_c``, ``iou_c``, ``hd95_c`` for c = 1 .. C-1 (C inferred as the largest label + 1)."""
    if pred.shape != target.shape:
        raise ShapeError(
            f"prediction labels have shape {pred.shape}, target labels {target.shape}; expected the same"
        )
    classes = num_classes or max(2, int(max(pred.max(initial=0), target.max(initial=0))) + 1)
    scores = segmentation_metrics(target, pred, classes, spacing=spacing)
    return {
        f"{name}_{c}": float(values[c - 1])
        for c in range(1, classes)
        for name, values in scores.items()
    }


@dataclass(frozen=True)
class Evaluation:
    """Rows (one per pair, CSV keys), the unpaired files, and the column names."""

    rows: list[dict[str, Any]]
    pairing: Pairing

    @property
    def columns(self) -> list[str]:
        """``prediction, target, slices``, ``ssim, psnr, nmse`` (unless labels only), then label
        columns by class."""
        present = {k for row in self.rows for k in row}
        fixed = [k for k in _FIXED if k in present]
        by_class = sorted(
            present - set(_FIXED),
            key=lambda k: (int(k.rsplit("_", 1)[1]), _LABEL_ORDER.index(k.rsplit("_", 1)[0])),
        )
        return [*fixed, *by_class]

    def mean_row(self) -> dict[str, Any]:
        """The mean over volumes of every numeric column (blank cells left out)."""
        row: dict[str, Any] = {"prediction": "mean", "target": "", "slices": ""}
        for column in self.columns:
            if column in row:
                continue
            values = [r[column] for r in self.rows if column in r]
            row[column] = float(np.mean(values)) if values else ""
        return row


_FIXED = ("prediction", "target", "slices", *RECONSTRUCTION_COLUMNS)
_LABEL_ORDER = ("dice", "iou", "hd95")


def evaluate(
    predictions: str | Path,
    targets: str | Path,
    *,
    convention: str = "fastmri",
    key: str | None = None,
    labels: bool = False,
    num_classes: int | None = None,
    labels_only: bool = False,
    crop: bool = False,
    allow_missing: bool = False,
    quiet: bool = False,
) -> Evaluation:
    """Score every paired volume (see the module docstring); unpaired volumes are an error
    (:class:`FileFormatError` listing them) unless ``allow_missing``."""
    if convention not in ("fastmri", "calgary"):
        raise ConfigError(f"--convention: expected 'fastmri' or 'calgary', got {convention!r}")
    if num_classes is not None and num_classes < 2:
        raise ConfigError(f"--num-classes: expected at least 2 (background + 1), got {num_classes}")
    pairing = pair_volumes(predictions, targets)
    unpaired = _unpaired_message(pairing)
    if unpaired and not allow_missing:
        raise FileFormatError(f"{unpaired} (--allow-missing evaluates the pairs found)")
    if not pairing.pairs:
        raise FileFormatError(
            f"{predictions} and {targets}: no volumes pair up by name; {unpaired}"
        )
    options = dict(
        convention=convention,
        key=key,
        labels=labels,
        num_classes=num_classes,
        labels_only=labels_only,
        crop=crop,
    )
    rows = [
        evaluate_pair(p, t, **options)
        for p, t in tqdm(pairing.pairs, desc="evaluating", disable=quiet)
    ]
    return Evaluation(rows, pairing)


_LISTED = 10
"""Unpaired files named in a message; the rest are counted."""


def _listing(files: list[Path]) -> str:
    names = ", ".join(str(p) for p in files[:_LISTED])
    return names + (f" and {len(files) - _LISTED} more" if len(files) > _LISTED else "")


def _unpaired_message(pairing: Pairing) -> str:
    """One line naming the unpaired volumes ("" when every volume is paired)."""
    parts = []
    if pairing.targets_only:
        parts.append(
            f"targets without a prediction ({len(pairing.targets_only)}): {_listing(pairing.targets_only)}"
        )
    if pairing.predictions_only:
        parts.append(
            f"predictions without a target ({len(pairing.predictions_only)}): {_listing(pairing.predictions_only)}"
        )
    return "; ".join(parts)


# --- output -------------------------------------------------------------------------------------


def _csv_value(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value


def write_csv(path: str | Path, evaluation: Evaluation) -> None:
    """Write the rows and the mean row as CSV, atomically; floats at full precision (``repr``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=evaluation.columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in [*evaluation.rows, evaluation.mean_row()]:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    write_text(path, buffer.getvalue())


_HEADERS = {
    "prediction": "volume", "slices": "slices", "ssim": "SSIM", "psnr": "PSNR dB", "nmse": "NMSE",
    "dice": "Dice", "iou": "IoU", "hd95": "HD95",
}  # fmt: skip


def _header(column: str) -> str:
    """``"psnr"`` -> ``"PSNR dB"``, ``"dice_1"`` -> ``"Dice 1"``."""
    name, _, label = column.partition("_")
    return f"{_HEADERS[name]} {label}".rstrip()


def _cell(column: str, value: Any) -> str:
    if value == "" or not isinstance(value, float):
        return str(value)
    if math.isinf(value):
        return "inf"
    return {"psnr": f"{value:.2f}", "nmse": f"{value:.5f}"}.get(column, f"{value:.4f}")


def table(evaluation: Evaluation) -> str:
    """The rows and the mean row as a GitHub-style table."""
    columns = [c for c in evaluation.columns if c != "target"]
    rows = [
        [_cell(c, row.get(c, "")) for c in columns]
        for row in [*evaluation.rows, evaluation.mean_row()]
    ]
    return tabulate(
        rows, headers=[_header(c) for c in columns], tablefmt="github", disable_numparse=True
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan evaluate``."""
    parser = sub.add_parser(
        "evaluate",
        help="SSIM/PSNR/NMSE (and Dice/IoU/HD95) of predictions against targets: table and CSV",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan evaluate out/recon/ data/multicoil_val/ --csv out/metrics.csv",
    )
    parser.add_argument("predictions", metavar="PREDICTIONS", help="prediction file or folder")
    parser.add_argument("targets", metavar="TARGETS", help="target file or folder")
    parser.add_argument("--csv", help="write the per-volume rows and the mean row here")
    parser.add_argument(
        "--convention",
        choices=("fastmri", "calgary"),
        default="fastmri",
        help="data range and slice averaging of the metrics (default fastmri)",
    )
    parser.add_argument(
        "--key",
        help="target dataset in HDF5 targets (default reconstruction_rss, else reconstruction_esc)",
    )
    parser.add_argument(
        "--labels", action="store_true", help="also score label volumes (Dice, IoU, HD95)"
    )
    parser.add_argument(
        "--labels-only",
        action="store_true",
        help="score the label volumes alone (no image metrics); a pair without labels is an error",
    )
    parser.add_argument(
        "--num-classes", type=int, help="label classes incl. background (default: inferred)"
    )
    parser.add_argument(
        "--crop",
        action="store_true",
        help="centre-crop a prediction larger than its target to the target's H x W (fastMRI)",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="evaluate the pairs found when some volumes are unpaired",
    )
    add_quiet(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    evaluation = evaluate(
        args.predictions,
        args.targets,
        convention=args.convention,
        key=args.key,
        labels=args.labels,
        num_classes=args.num_classes,
        labels_only=args.labels_only,
        crop=args.crop,
        allow_missing=args.allow_missing,
        quiet=args.quiet,
    )
    unpaired = _unpaired_message(evaluation.pairing)
    if unpaired:
        print(f"kscan: warning: {unpaired}", file=sys.stderr)
    print(table(evaluation))
    if args.csv:
        write_csv(args.csv, evaluation)
        print(f"\nwrote {args.csv}")
