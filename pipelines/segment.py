"""``kscan segment``: label maps from a segmentation model (VM-UNet, MHS-VM) for image volumes.

Inputs are NIfTI files, DICOM series folders, kscan/fastMRI HDF5 reconstructions, PNG/JPEG
images, or a folder of them (:mod:`kscan.pipelines.seg_inputs`); each is segmented slice by slice:

1. every slice is normalised to ``[0, 1]`` by its robust maximum
   (:func:`kscan.pipelines.seg_transforms.normalize_image`, the normalisation of training);
   grey values are repeated over the model's ``in_channels``;
2. slices no larger than ``--roi-size`` (all slices when it is not given) go through the network
   whole, zero-padded to its size multiple and cropped back
   (:func:`~kscan.pipelines.seg_transforms.pad_to_multiple`); larger ones through MONAI's
   ``sliding_window_inference`` with windows of ``--roi-size`` (a multiple of the size multiple),
   ``--overlap`` and Gaussian blending of the class probabilities;
3. class probabilities (``sigmoid`` for a one-class model, ``softmax`` otherwise) become labels:
   ``p > 0.5`` for one class, ``argmax`` otherwise.

An all-zero slice is not segmented: it gets label 0 and a warning names the file and the slices.
NaN or Inf in an input is an error naming the file and the slices.

Outputs, for an input ``<stem>``: the label NIfTI ``<stem>.nii.gz`` (uint8; the input NIfTI's
shape and affine, the DICOM series' affine, or an axial affine of the voxel size) with its
provenance sidecar ``<stem>.json`` (model, config, checkpoint SHA-256, class names, settings);
for DICOM inputs a DICOM SEG ``<stem>_seg.dcm`` referencing the series' images (or, for one
enhanced multi-frame file, its frames; a series of several multi-frame files gets none, with a
warning); with ``--overlay`` a PNG
``<stem>_overlay.png`` of up to 9 slices with the labels coloured over the image. A single input
may be written to an output file ``*.nii[.gz]`` (the others beside it).

Class names come from the checkpoint's meta ``class_names`` (a list by class id, or a mapping id ->
name), else :data:`kscan.pipelines.anatomy.TISSUE_CLASSES` when the class counts match, else
``class_<i>``. Without ``--checkpoint`` the weights shipped for ``--model`` are used.

``--devices cpu,cpu`` or ``cuda:0,cuda:1,...`` (or ranks started by ``torchrun``) shard the inputs,
or a single input's batches of slices, over one process per device; the outputs are those of one
device (:mod:`kscan.pipelines.parallel.data_parallel`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.inferers import sliding_window_inference
from PIL import Image
from torch import nn
from tqdm import tqdm

from kscan.errors import ConfigError, FileFormatError, about_file
from kscan.models import registry
from kscan.pipelines.anatomy import TISSUE_CLASSES
from kscan.pipelines.atomic import atomic_path
from kscan.pipelines.batch_paths import volume_stem
from kscan.pipelines.checkpoint import Checkpoint, load_model, resolve_checkpoint
from kscan.pipelines.cli_args import add_device, add_quiet, int_pair
from kscan.pipelines.io.dicom_seg import write_segmentation
from kscan.pipelines.io.nifti import volume_to_nifti_array, write_nifti
from kscan.pipelines.parallel import data_parallel
from kscan.pipelines.parallel.data_parallel import WHOLE, Shard, batch_owners, take_rows
from kscan.pipelines.provenance import provenance_record
from kscan.pipelines.seg_inputs import NIFTI_SUFFIXES, SegInput, list_inputs, read_input
from kscan.pipelines.seg_transforms import crop, index_list, normalize_image, pad_to_multiple

THRESHOLD = 0.5
"""Probability above which a one-class model's pixel is labelled 1."""
OVERLAY_SLICES = 9
"""Slices shown in an overlay (evenly spaced; all when the volume has fewer)."""
OVERLAY_ALPHA = 0.45
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    dtype=np.float64,
)
"""Overlay colour of label ``l > 0``: ``PALETTE[(l - 1) % 10]`` (RGB)."""


class SegmentationWarning(UserWarning):
    """An input that was segmented with a caveat (all-zero slices, no DICOM SEG written)."""


@dataclass(frozen=True)
class SegSettings:
    """How ``kscan segment`` runs the model (every field is recorded in the provenance).

    ``roi_size`` None: every slice whole; else ``(H, W)`` windows for slices larger than it.
    """

    batch_size: int = 4
    roi_size: tuple[int, int] | None = None
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size: expected at least 1, got {self.batch_size}")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"--overlap: expected a fraction in [0, 1), got {self.overlap}")
        if self.roi_size is not None:
            object.__setattr__(self, "roi_size", tuple(int(n) for n in self.roi_size))
            if len(self.roi_size) != 2 or min(self.roi_size) < 1:
                raise ConfigError(
                    f"--roi-size: expected two positive sizes H,W, got {self.roi_size}"
                )


def class_names(checkpoint: Checkpoint, num_classes: int) -> dict[int, str]:
    """Label id -> name for every label (0 included; ``max(num_classes, 2)`` labels).

    From the checkpoint's meta ``class_names`` (a list indexed by label, or a mapping label ->
    name), else :data:`TISSUE_CLASSES` when it has as many labels, else ``class_<i>``.
    """
    count = max(num_classes, 2)
    given = checkpoint.meta.get("class_names")
    if given is None:
        if count == len(TISSUE_CLASSES):
            return dict(TISSUE_CLASSES)
        return {i: f"class_{i}" for i in range(count)}
    names = dict(enumerate(given)) if isinstance(given, list) else given
    try:
        names = {int(k): str(v) for k, v in names.items()}
    except (AttributeError, TypeError, ValueError):
        names = {}
    if sorted(names) != list(range(count)):
        raise FileFormatError(
            f"{checkpoint.path}: meta 'class_names' is {given!r}; expected {count} names, a list "
            f"by label 0..{count - 1} or a mapping label -> name"
        )
    return names


class Segmenter:
    """A segmentation model with its settings: ``(batch, H, W)`` normalised slices -> labels.

    Args:
        model: a registry segmentation model (``forward_logits``, ``config.size_multiple``,
            ``config.in_channels``, ``config.num_classes``), in eval mode on its device.
        settings: batch size, sliding-window size and overlap.
    """

    def __init__(self, model: nn.Module, settings: SegSettings) -> None:
        self.model = model
        self.settings = settings
        self.multiple: int = model.config.size_multiple
        self.num_classes: int = model.config.num_classes
        if self.num_classes > 255:
            raise ConfigError(
                f"model: {self.num_classes} classes; label maps are uint8 (at most 255 classes)"
            )
        roi = settings.roi_size
        if roi is not None and (roi[0] % self.multiple or roi[1] % self.multiple):
            raise ConfigError(
                f"--roi-size: {roi[0]},{roi[1]}; the model needs multiples of {self.multiple}"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(b, classes, h, w)`` of ``(b, in_channels, h, w)``, h and w
        multiples of the size multiple: sigmoid for one class, softmax over classes otherwise."""
        logits = self.model.forward_logits(x)
        return torch.sigmoid(logits) if self.num_classes == 1 else torch.softmax(logits, dim=1)

    def _channels(self, images: torch.Tensor) -> torch.Tensor:
        """``(b, H, W)`` -> ``(b, in_channels, H, W)`` (grey repeated) on the model's device."""
        x = images.to(self.device, torch.float32).unsqueeze(1)
        return x.expand(-1, self.model.config.in_channels, -1, -1)

    def direct_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """``(b, H, W)`` -> probabilities ``(b, classes, H, W)``: whole slices, zero-padded to the
        size multiple and cropped back."""
        padded, window = pad_to_multiple(self._channels(images), self.multiple)
        with torch.no_grad():
            return crop(self._predict(padded), window)

    def sliding_probabilities(self, images: torch.Tensor, roi: tuple[int, int]) -> torch.Tensor:
        """``(b, H, W)`` -> probabilities ``(b, classes, H, W)`` by MONAI's sliding-window
        inference: ``roi`` windows, the settings' overlap, Gaussian blending (MONAI zero-pads
        an image smaller than ``roi``)."""
        with torch.no_grad():
            return sliding_window_inference(
                self._channels(images),
                roi_size=roi,
                sw_batch_size=self.settings.batch_size,
                predictor=self._predict,
                overlap=self.settings.overlap,
                mode="gaussian",
            )

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Sliding windows when the slices exceed ``roi_size``, whole slices otherwise."""
        roi = self.settings.roi_size
        if roi is not None and (images.shape[-2] > roi[0] or images.shape[-1] > roi[1]):
            return self.sliding_probabilities(images, roi)
        return self.direct_probabilities(images)

    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """``(b, H, W)`` normalised slices -> labels ``(b, H, W)`` int64 on the CPU."""
        probs = self.probabilities(images)
        if self.num_classes == 1:
            return (probs[:, 0] > THRESHOLD).long().cpu()
        return probs.argmax(dim=1).cpu()


@dataclass(frozen=True)
class VolumeLabels:
    """Labels ``(slices, H, W)`` uint8, the normalised image, and the all-zero slices."""

    labels: np.ndarray
    image: np.ndarray
    empty_slices: list[int]


def segment_volume(
    segmenter: Segmenter, volume: np.ndarray, quiet: bool = True, shard: Shard = WHOLE
) -> VolumeLabels:
    """Segment ``volume`` ``(slices, H, W)`` slice by slice (module docstring, steps 1-3).

    All-zero slices get label 0 without running the model. The other slices go through the
    model in batches of ``batch_size``; with a ``shard`` of several ranks only its batches (the
    other slices keep label 0; :func:`merge_volume_labels` joins the parts). Raises
    InvalidDataError (naming the slices) for NaN or Inf.
    """
    volume = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    image = normalize_image(volume, name="image")
    nonzero = image.flatten(1).any(dim=1)
    empty = torch.nonzero(~nonzero).flatten().tolist()
    labels = torch.zeros(image.shape, dtype=torch.uint8)
    todo = torch.nonzero(nonzero).flatten()
    batches = todo.split(segmenter.settings.batch_size)
    mine = [batch for b, batch in enumerate(batches) if shard.owns(b)]
    for batch in tqdm(mine, desc="slices", disable=quiet, leave=False):
        labels[batch] = segmenter.labels(image[batch]).to(torch.uint8)
    return VolumeLabels(labels.numpy(), image.numpy(), empty)


def merge_volume_labels(parts: list[VolumeLabels], batch_size: int) -> VolumeLabels:
    """One volume's labels from the parts of :func:`segment_volume` on the shards of
    ``len(parts)`` ranks: each segmented slice from the rank that computed its batch."""
    first = parts[0]
    empty = set(first.empty_slices)
    todo = [i for i in range(first.labels.shape[0]) if i not in empty]
    owners = np.zeros(first.labels.shape[0], dtype=np.int64)
    owners[todo] = batch_owners(len(todo), batch_size, len(parts))
    labels = take_rows([p.labels for p in parts], owners)
    return VolumeLabels(labels, first.image, first.empty_slices)


def load_segmenter(
    model_name: str | None,
    checkpoint: str | os.PathLike[str] | None,
    dev: torch.device | str,
    settings: SegSettings,
) -> tuple[Segmenter, Checkpoint]:
    """The model of ``checkpoint`` (default: the weights shipped for ``model_name``).

    Raises:
        ConfigError: no model and no checkpoint, no shipped weights, a checkpoint of another
            model than ``model_name`` or not of a segmentation model.
        FileFormatError: not a kscan checkpoint, or its weights do not fit its config (the keys
            that differ are named).
    """
    if checkpoint is None and model_name is None:
        raise ConfigError(
            f"--model: needed without --checkpoint; expected one of "
            f"{', '.join(registry.names('segmentation'))}"
        )
    checkpoint = resolve_checkpoint(checkpoint, model_name)
    model, ckpt = load_model(checkpoint, dev, task="segmentation")
    if model_name is not None and ckpt.model != model_name:
        raise ConfigError(
            f"--checkpoint: {ckpt.path} holds a {ckpt.model!r} model; --model asks for {model_name!r}"
        )
    return Segmenter(model, settings), ckpt


def overlay_image(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """An RGB uint8 grid of up to :data:`OVERLAY_SLICES` evenly spaced slices of ``image``
    ``(slices, H, W)`` in ``[0, 1]``, each label ``l > 0`` blended in ``PALETTE[(l - 1) % 10]``
    with weight :data:`OVERLAY_ALPHA`; tiles row by row, ``ceil(sqrt(n))`` per row."""
    slices, height, width = image.shape
    chosen = np.unique(np.linspace(0, slices - 1, min(slices, OVERLAY_SLICES)).round().astype(int))
    columns = math.ceil(math.sqrt(len(chosen)))
    rows = math.ceil(len(chosen) / columns)
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.float64)
    for n, k in enumerate(chosen):
        tile = np.repeat(image[k, :, :, None] * 255.0, 3, axis=2)
        found = labels[k] > 0
        colour = PALETTE[(labels[k][found].astype(np.int64) - 1) % len(PALETTE)]
        tile[found] = (1 - OVERLAY_ALPHA) * tile[found] + OVERLAY_ALPHA * colour
        r, c = divmod(n, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = tile
    return grid.round().clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class SegOutputs:
    """What :func:`segment_file` wrote (None: not written) and the all-zero slices."""

    labels: Path
    seg: Path | None
    overlay: Path | None
    empty_slices: list[int]


def output_paths(labels: Path) -> dict[str, Path]:
    """The files written beside the label NIfTI ``<stem>.nii[.gz]``: ``seg``, ``overlay``."""
    stem = volume_stem(labels)
    return {
        "seg": labels.with_name(f"{stem}_seg.dcm"),
        "overlay": labels.with_name(f"{stem}_overlay.png"),
    }


@dataclass(frozen=True)
class LabelledInput:
    """An input as read and its labels (or a shard's part of them)."""

    item: SegInput
    result: VolumeLabels


def label_input(
    segmenter: Segmenter, src: str | os.PathLike[str], quiet: bool = True, shard: Shard = WHOLE
) -> LabelledInput:
    """Read the input ``src`` and segment it (:func:`segment_volume`); errors name ``src``."""
    with about_file(src):
        item = read_input(src)
        return LabelledInput(item, segment_volume(segmenter, item.volume, quiet, shard))


def segment_file(
    segmenter: Segmenter,
    checkpoint: Checkpoint,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    overlay: bool = False,
    parameters: dict[str, Any] | None = None,
    quiet: bool = True,
) -> SegOutputs:
    """Segment the input ``src`` into the label NIfTI ``dst`` and the outputs beside it (module
    docstring). ``parameters`` are added to the provenance. Warns (:class:`SegmentationWarning`)
    about all-zero slices and DICOM inputs that get no SEG; errors name ``src``."""
    labelled = label_input(segmenter, src, quiet)
    return write_outputs(segmenter, checkpoint, labelled, dst, overlay, parameters)


def write_outputs(
    segmenter: Segmenter,
    checkpoint: Checkpoint,
    labelled: LabelledInput,
    dst: str | os.PathLike[str],
    overlay: bool = False,
    parameters: dict[str, Any] | None = None,
) -> SegOutputs:
    """Write the label NIfTI ``dst`` and the outputs beside it for a segmented input (module
    docstring), each atomically; warns as :func:`segment_file` does."""
    item, result, dst = labelled.item, labelled.result, Path(dst)
    src = item.path
    names = class_names(checkpoint, segmenter.num_classes)
    if result.empty_slices:
        warnings.warn(
            f"{src}: {len(result.empty_slices)} of {item.volume.shape[0]} slices are all zero "
            f"(slices {index_list(result.empty_slices)}); they are labelled 0 ({names[0]}) "
            "without segmentation",
            SegmentationWarning,
            stacklevel=2,
        )
    record = provenance_record(
        model=checkpoint.model,
        parameters={
            **(parameters or {}),
            **asdict(segmenter.settings),
            "model_config": checkpoint.config,
            "checkpoint": str(checkpoint.path),
            "class_names": {str(k): v for k, v in names.items()},
            "normalization": "per slice: clip(|x| / percentile(|x|, 99.5), 0, 1)",
            "empty_slices": result.empty_slices,
        },
        inputs=item.files,
        checkpoint=checkpoint.path,
    )
    write_label_nifti(dst, result.labels, item.affine, record, item.nifti_shape)
    beside = output_paths(dst)
    seg = _write_seg(item, result.labels, names, record, beside["seg"])
    if overlay:
        with atomic_path(beside["overlay"]) as tmp:
            Image.fromarray(overlay_image(result.image, result.labels)).save(tmp, format="PNG")
    return SegOutputs(dst, seg, beside["overlay"] if overlay else None, result.empty_slices)


def write_label_nifti(
    dst: Path,
    labels: np.ndarray,
    affine: np.ndarray,
    record: dict[str, Any],
    nifti_shape: tuple[int, ...] | None = None,
) -> Path:
    """Write labels ``(slices, H, W)`` uint8 as the NIfTI ``dst`` on ``affine``, with the
    provenance ``record`` as its sidecar; in ``nifti_shape`` (an input NIfTI's) when given."""
    array = volume_to_nifti_array(labels)
    if nifti_shape is not None:
        array = array.reshape(nifti_shape)
    return write_nifti(dst, array, affine, provenance=record)


def write_dicom_seg(
    path: Path,
    labels: np.ndarray,
    source_files: list[Path],
    names: dict[int, str],
    record: dict[str, Any],
) -> Path:
    """Write labels ``(slices, H, W)`` as a DICOM SEG referencing the single-frame images
    ``source_files`` (one per slice, in slice order), or one multi-frame image (``labels[k]``
    segments its frame ``k + 1``), with the foreground classes of ``names``."""
    sources = [pydicom.dcmread(f) for f in source_files]
    foreground = {k: v for k, v in names.items() if k > 0}
    return write_segmentation(path, labels, sources, foreground, provenance=record)


def _write_seg(
    item: SegInput,
    labels: np.ndarray,
    names: dict[int, str],
    record: dict[str, Any],
    path: Path,
) -> Path | None:
    """The DICOM SEG of a DICOM input: of its single-frame images, or of the frames of its one
    multi-frame image (a warning for a series of several multi-frame files)."""
    if item.kind != "dicom":
        return None
    if item.dicom_slices is not None:
        return write_dicom_seg(path, labels, list(item.dicom_slices), names, record)
    if item.dicom_frames is not None:  # labels in the file's frame order
        frame_labels = labels[list(item.dicom_frames)]
        return write_dicom_seg(path, frame_labels, [item.files[0]], names, record)
    warnings.warn(
        f"{item.path}: no DICOM SEG written (a series of several multi-frame files; kscan writes "
        "SEGs of single-frame series and of one multi-frame file); the label NIfTI holds the result",
        SegmentationWarning,
        stacklevel=3,
    )
    return None


def input_pairs(
    src: str | os.PathLike[str], dst: str | os.PathLike[str]
) -> list[tuple[Path, Path]]:
    """``[(input, label NIfTI)]``: a single input to ``dst`` when it is a ``.nii[.gz]`` path, else
    every input of ``src`` to ``dst/<stem>.nii.gz``."""
    inputs = list_inputs(src)
    dst = Path(dst)
    if dst.name.endswith(NIFTI_SUFFIXES) and not dst.is_dir():
        if len(inputs) > 1:
            raise ConfigError(
                f"OUTPUT: {dst} is one file, but {src} holds {len(inputs)} inputs; give a folder"
            )
        return [(inputs[0], dst)]
    if dst.suffix and not dst.is_dir():
        raise ConfigError(f"OUTPUT: {dst}; expected a .nii/.nii.gz file or a folder")
    pairs = [(p, dst / f"{volume_stem(p)}.nii.gz") for p in inputs]
    seen: dict[Path, Path] = {}
    for p, out in pairs:
        if out in seen:
            raise ConfigError(f"{src}: {seen[out].name} and {p.name} would both write {out.name}")
        seen[out] = p
    return pairs


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan segment``."""
    models = registry.names("segmentation")
    parser = sub.add_parser(
        "segment",
        help="segment NIfTI, DICOM, HDF5 or image files with VM-UNet or MHS-VM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan segment sim/nifti/sim_000.nii.gz labels/ --model vmunet --overlay",
    )
    parser.add_argument(
        "input",
        help="a NIfTI/HDF5/PNG/JPEG/DICOM file, a DICOM series folder, or a folder of them",
    )
    parser.add_argument("output", help="a .nii / .nii.gz file (single input), or a folder")
    parser.add_argument(
        "--model",
        choices=models,
        default=None,
        help="segmentation model (default: the checkpoint's); picks the shipped weights without --checkpoint",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="kscan .safetensors checkpoint, or shipped:<name> for a file shipped with kscan "
        "(default: the weights shipped for --model)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="slices (or windows) per forward pass (default 4)"
    )
    parser.add_argument(
        "--roi-size",
        type=int_pair,
        default=None,
        help="sliding-window size H,W for larger slices, a multiple of the model's size multiple "
        "(default: whole slices)",
    )
    parser.add_argument(
        "--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)"
    )
    parser.add_argument(
        "--overlay", action="store_true", help="also write <stem>_overlay.png of the labels"
    )
    add_device(parser)
    data_parallel.add_devices(parser)
    add_quiet(parser)
    parser.set_defaults(func=_main)


def _print_warning(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
    print(f"kscan: warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class SegJob:
    """``kscan segment`` as a :class:`~kscan.pipelines.parallel.data_parallel.Job`: the model
    ``model_name`` / ``checkpoint`` run with ``settings`` on every input; ``devices``, the devices
    of a parallel run, are recorded in the provenance."""

    settings: SegSettings
    model_name: str | None
    checkpoint: str | None
    overlay: bool = False
    devices: tuple[str, ...] = ()

    def setup(self, dev: torch.device) -> tuple[Segmenter, Checkpoint, dict[str, Any]]:
        """The model on ``dev``; warnings print as one ``kscan: warning:`` line each."""
        warnings.simplefilter("always", SegmentationWarning)
        warnings.showwarning = _print_warning
        segmenter, checkpoint = load_segmenter(self.model_name, self.checkpoint, dev, self.settings)
        parameters: dict[str, Any] = {"device": str(dev)}
        if len(self.devices) > 1:
            parameters["devices"] = list(self.devices)
        return segmenter, checkpoint, parameters

    def compute(
        self,
        ctx: tuple[Segmenter, Checkpoint, dict[str, Any]],
        src: Path,
        shard: Shard,
        quiet: bool,
    ) -> LabelledInput:
        return label_input(ctx[0], src, quiet, shard)

    def merge(self, parts: list[LabelledInput]) -> LabelledInput:
        results = [p.result for p in parts]
        return LabelledInput(parts[0].item, merge_volume_labels(results, self.settings.batch_size))

    def write(
        self,
        ctx: tuple[Segmenter, Checkpoint, dict[str, Any]],
        src: Path,
        dst: Path,
        labelled: LabelledInput,
    ) -> list[Path]:
        segmenter, checkpoint, parameters = ctx
        out = write_outputs(segmenter, checkpoint, labelled, dst, self.overlay, parameters)
        return [p for p in (out.labels, out.seg, out.overlay) if p is not None]


def _main(args: argparse.Namespace) -> None:
    settings = SegSettings(args.batch_size, args.roi_size, args.overlap)
    devices = data_parallel.devices_of(args)
    pairs = input_pairs(args.input, args.output)
    job = SegJob(
        settings, args.model, args.checkpoint, args.overlay, tuple(str(d) for d in devices)
    )
    with warnings.catch_warnings():
        data_parallel.run(job, pairs, devices, args.quiet, desc="segmenting")
