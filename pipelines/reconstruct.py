"""``kscan reconstruct``: classical or learned reconstruction of fastMRI-layout k-space files.

For every volume: the sampling mask is the file's ``mask`` (test-style files), or a mask made on
the fly with ``--mask`` (seeded by the file name, as ``kscan undersample`` does), or none (fully
sampled). Coil maps come from ESPIRiT or the ACS estimate on the sampled centre lines, or from the
file's ``sensitivity_map`` (``--maps auto``, the default, takes ESPIRiT when at least 24 centre
lines are sampled and the ACS estimate otherwise). Slices are reconstructed in batches with one of:

- ``zf``: zero-filled, the SENSE combination ``A^H y`` (``--maps none``: the RSS);
- ``sense``: CG-SENSE with Tikhonov weight ``--lam``;
- ``cs``: compressed sensing, L1-wavelet (``--regularizer wavelet``) or total variation (``tv``);
- a learned reconstruction model of the registry (``rvn``, ``varnet``, ...), from a kscan
  checkpoint (``--checkpoint``; the weights shipped with kscan without it), which estimates its own
  coil maps (:mod:`kscan.pipelines.model_inference`);
- a multitask model of the registry (``joint-rvn-seg``, ``sequential-rvn-seg``, ``idslr``, ``segnet``) the same
  way: its last image is the reconstruction. With ``--segment`` its labels are written too: the
  argmax of its last segmentation logits, cropped like the image to the recon size.

The image magnitude is cropped to the header's recon size (complex crop, then magnitude; a volume
narrower than the recon width is cropped to ``(W, W)``, as fastMRI does) and written by output
extension or ``--format``: ``.h5`` (fastMRI's submission layout: ``reconstruction``
``(slices, rH, rW)`` float32, with the provenance as the JSON attribute ``kscan_provenance``),
``.nii``/``.nii.gz`` (with a JSON provenance sidecar) or ``--format dicom`` (a derived MR series
folder per volume). Voxel sizes come from the header's recon field of view. The provenance holds
the settings and, for a learned method, the model's name and config and the checkpoint's SHA-256.

Labels (``--segment``), uint8 ``(slices, rH, rW)``, as ``kscan segment`` writes them
(:mod:`kscan.pipelines.segment`): in an ``.h5`` output the dataset ``segmentation`` beside
``reconstruction`` (class names in the provenance attribute); beside a NIfTI ``<stem>.nii.gz`` or a
DICOM series folder ``<stem>`` the label NIfTI ``<stem>_labels.nii.gz`` (same affine) with its
provenance sidecar ``<stem>_labels.json``, and for DICOM also the DICOM SEG ``<stem>_seg.dcm``
referencing the written series. Class names come from the checkpoint (``class_names``).

``--devices cpu,cpu`` or ``cuda:0,cuda:1,...`` (or ranks started by ``torchrun``) shard the files,
or a single file's batches of slices, over one process per device; the outputs are those of one
device (:mod:`kscan.pipelines.parallel.data_parallel`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from kscan.errors import ConfigError, about_file
from kscan.models import registry
from kscan.physics import solvers
from kscan.physics.coilmaps import acs_maps, center_lines, espirit_maps
from kscan.physics.masks import MASK_KINDS, apply_mask
from kscan.pipelines.atomic import atomic_path
from kscan.pipelines.batch_paths import output_pairs, volume_stem
from kscan.pipelines.cli_args import add_device, add_quiet
from kscan.pipelines.io.dicom_write import write_mr_series
from kscan.pipelines.io.fastmri import SEGMENTATION, FastMRIFile
from kscan.pipelines.io.nifti import axial_affine, volume_to_nifti_array, write_nifti
from kscan.pipelines.model_inference import load_reconstructor
from kscan.pipelines.parallel import data_parallel
from kscan.pipelines.parallel.data_parallel import WHOLE, Shard, batch_owners, take_rows
from kscan.pipelines.provenance import provenance_record
from kscan.pipelines.segment import class_names, write_dicom_seg, write_label_nifti
from kscan.pipelines.synthetic import center_crop
from kscan.pipelines.undersample import volume_mask

METHODS = ("zf", "sense", "cs")
"""The classical methods; the learned ones are the registry's reconstruction models."""
FORMATS = {"h5": ".h5", "nifti": ".nii.gz", "dicom": ""}
"""Output formats and the suffix of each volume's output (a DICOM series is a folder)."""
MAPS = ("auto", "espirit", "acs", "file", "none")
"""``auto``: ESPIRiT when at least ``ESPIRIT_MIN_LINES`` centre lines are sampled, else the ACS estimate."""

ESPIRIT_MIN_LINES = 24
"""ESPIRiT's default calibration width; with fewer lines its 6x6 kernels are poorly determined."""
REGULARIZERS = ("wavelet", "tv")

BatchSolve = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None],
    torch.Tensor | tuple[torch.Tensor, torch.Tensor],
]
"""``(masked k-space (batch, coil, H, W), mask (W,), (1, W) or (H, W), the file's maps or None)`` ->
image ``(batch, H, W)``, or (image, labels ``(batch, H, W)``) for a segmenting solve: what differs
between methods in :func:`reconstruct_file`."""


def learned_methods() -> list[str]:
    """The registry's reconstruction and multitask models, usable as ``--method``."""
    return registry.names("reconstruction") + registry.names("multitask")


@dataclass(frozen=True)
class ReconSettings:
    """What ``kscan reconstruct`` does to each volume (every field is recorded in the provenance).

    ``batch_size`` None: 4 slices for the classical methods, 1 for the learned ones.
    """

    method: str = "sense"
    maps: str = "auto"
    regularizer: str = "wavelet"
    lam: float | None = None
    max_iter: int | None = None
    batch_size: int | None = None
    mask: str | None = None
    acceleration: float = 4.0
    center_fraction: float = 0.08
    seed: int | None = None
    checkpoint: str | None = None
    segment: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("--method", self.method, (*METHODS, *learned_methods())),
            ("--maps", self.maps, MAPS),
            ("--regularizer", self.regularizer, REGULARIZERS),
        ):
            if value not in allowed:
                raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
        if self.segment and self.method not in registry.names("multitask"):
            raise ConfigError(
                f"--segment: needs a multitask model ({', '.join(registry.names('multitask'))}); "
                f"--method {self.method} only reconstructs"
            )
        if self.maps == "none" and self.method != "zf":
            raise ConfigError(
                f"--maps none: only --method zf works without coil maps, got {self.method!r}"
            )
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", 1 if self.learned else 4)
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size: expected at least 1, got {self.batch_size}")
        if self.learned:
            classical = {"--maps": self.maps != "auto", "--lam": self.lam is not None}
            classical["--max-iter"] = self.max_iter is not None
            classical["--regularizer"] = self.regularizer != "wavelet"
            given = [name for name, set_ in classical.items() if set_]
            if given:
                raise ConfigError(
                    f"{given[0]}: an option of the classical methods; the learned method "
                    f"{self.method!r} estimates its own coil maps and has no weight or iterations"
                )
        elif self.checkpoint is not None:
            raise ConfigError(
                f"--checkpoint: only for the learned methods ({', '.join(learned_methods())}), "
                f"got --method {self.method}"
            )

    @property
    def learned(self) -> bool:
        """Whether the method is a learned model of the registry."""
        return self.method not in METHODS

    def parameters(self) -> dict[str, Any]:
        """The settings that apply to the method, for the provenance."""
        values = asdict(self)
        drop = (
            ("maps", "regularizer", "lam", "max_iter")
            if self.learned
            else ("checkpoint", "segment")
        )
        return {k: v for k, v in values.items() if k not in drop}

    def solver(self) -> Callable[..., solvers.ReconResult]:
        """The solver function with the configured weight and iteration cap bound."""
        fn = {
            "zf": solvers.zero_filled,
            "sense": solvers.cg_sense,
            "cs": solvers.cs_wavelet if self.regularizer == "wavelet" else solvers.cs_tv,
        }[self.method]
        options = {
            k: v for k, v in (("lam", self.lam), ("max_iter", self.max_iter)) if v is not None
        }
        if self.method == "zf" and options:
            raise ConfigError(
                "--lam/--max-iter: zero-filled reconstruction has no weight or iterations"
            )
        return lambda kspace, mask, maps: fn(kspace, mask, maps, **options)


def classical_solve(settings: ReconSettings) -> BatchSolve:
    """The :data:`BatchSolve` of a classical method: coil maps (:data:`MAPS`), then the solver."""
    solve = settings.solver()

    def run(kspace: torch.Tensor, mask: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
        return solve(kspace, mask, _coil_maps(settings, kspace, mask, stored)).image

    return run


def _coil_maps(
    settings: ReconSettings,
    kspace: torch.Tensor,
    mask: torch.Tensor,
    stored: torch.Tensor | None,
) -> torch.Tensor | None:
    if settings.maps == "none":
        return None
    if settings.maps == "file":
        if stored is None:
            raise ConfigError("--maps file: the file has no 'sensitivity_map' dataset")
        return stored
    use_acs = settings.maps == "acs" or (
        settings.maps == "auto" and center_lines(mask)[1] < ESPIRIT_MIN_LINES
    )
    return acs_maps(kspace, mask=mask) if use_acs else espirit_maps(kspace, mask=mask)


@dataclass(frozen=True)
class Reconstruction:
    """A reconstructed magnitude volume ``(slices, rH, rW)`` float32 and its voxel size (dH, dW, dZ)
    mm; with ``--segment`` its labels ``(slices, rH, rW)`` uint8."""

    volume: np.ndarray
    voxel_size_mm: tuple[float, float, float]
    labels: np.ndarray | None = None


def reconstruct_file(
    path: str | os.PathLike[str],
    settings: ReconSettings,
    solve: BatchSolve,
    dev: torch.device,
    quiet: bool = True,
    shard: Shard = WHOLE,
) -> Reconstruction:
    """Reconstruct one fastMRI-layout file (see the module docstring) with ``solve``.

    The mask (the file's, one made with ``settings.mask``, or all ones) goes to ``dev`` once; each
    batch of ``settings.batch_size`` slices is read, masked and solved, and its magnitude (and
    labels, for a segmenting solve) cropped to the recon size. With a ``shard`` of several ranks,
    only its batches are computed and the other slices are zero (:func:`merge_reconstructions`
    joins the parts). Errors name ``path``.
    """
    path = Path(path)
    with about_file(path), FastMRIFile(path) as f:
        meta = f.metadata
        width = meta.matrix_size[-1]
        if meta.has_mask:
            mask = f.mask.to(torch.float32)
        elif settings.mask is not None:
            mask = volume_mask(
                path,
                tuple(meta.matrix_size[-2:]),
                settings.mask,
                settings.acceleration,
                settings.center_fraction,
                (meta.padding_left, meta.padding_right),
                settings.seed,
            ).mask
        else:
            mask = torch.ones(1, width)
        mask = mask.to(dev)
        rh, rw = meta.recon_size[:2]
        crop = (rh, rw) if width >= rw else (width, width)
        out = np.zeros((meta.num_slices, *crop), dtype=np.float32)
        labels = np.zeros((meta.num_slices, *crop), dtype=np.uint8) if settings.segment else None
        starts = range(0, meta.num_slices, settings.batch_size)
        mine = [start for b, start in enumerate(starts) if shard.owns(b)]
        for start in tqdm(mine, desc=path.name, disable=quiet, leave=False):
            stop = min(start + settings.batch_size, meta.num_slices)
            batch = [f.read_slice(i) for i in range(start, stop)]
            kspace = apply_mask(torch.stack([b["kspace"] for b in batch]).to(dev), mask)
            stored = (
                torch.stack([b["sensitivity_map"] for b in batch]).to(dev)
                if meta.has_sensitivity_map
                else None
            )
            image = solve(kspace, mask, stored)
            if labels is not None:
                image, found = image
                labels[start:stop] = center_crop(found, crop).cpu().numpy()
            out[start:stop] = center_crop(image, crop).abs().cpu().numpy()
    return Reconstruction(out, meta.voxel_size_mm, labels)


def merge_reconstructions(parts: list[Reconstruction], batch_size: int) -> Reconstruction:
    """One volume from the parts of :func:`reconstruct_file` on the shards of ``len(parts)``
    ranks: each slice from the rank that computed its batch."""
    owners = batch_owners(parts[0].volume.shape[0], batch_size, len(parts))
    labels = None
    if parts[0].labels is not None:
        labels = take_rows([p.labels for p in parts], owners)
    volume = take_rows([p.volume for p in parts], owners)
    return Reconstruction(volume, parts[0].voxel_size_mm, labels)


def write_reconstruction(
    path: Path,
    recon: Reconstruction,
    output_format: str,
    provenance: dict[str, Any],
    class_names: dict[int, str] | None = None,
) -> list[Path]:
    """Write ``recon`` as ``output_format`` (one of :data:`FORMATS`) to ``path``, atomically;
    returns the paths written (the volume's, then the labels').

    ``h5``: fastMRI's submission layout, ``reconstruction`` ``(slices, rH, rW)`` float32 with the
    provenance as the JSON attribute ``kscan_provenance``. ``nifti``: the volume on an axial affine
    of the voxel size, with a provenance sidecar. ``dicom``: a derived MR series in the folder ``path``.
    Labels, when ``recon`` has them, as the module docstring says (``class_names``: label -> name,
    for the DICOM SEG).
    """
    affine = axial_affine(recon.volume.shape, recon.voxel_size_mm)
    if output_format == "h5":
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("reconstruction", data=recon.volume.astype(np.float32))
                if recon.labels is not None:
                    f.create_dataset(SEGMENTATION, data=recon.labels)
                f.attrs["kscan_provenance"] = json.dumps(provenance)
        return [path]
    if output_format == "nifti":
        write_nifti(path, volume_to_nifti_array(recon.volume), affine, provenance=provenance)
    else:
        series = write_mr_series(path, recon.volume, affine, provenance=provenance, overwrite=True)
    if recon.labels is None:
        return [path]

    stem = volume_stem(path)
    written = [path, path.with_name(f"{stem}_labels.nii.gz")]
    write_label_nifti(written[1], recon.labels, affine, provenance)
    if output_format == "dicom":
        written.append(path.with_name(f"{stem}_seg.dcm"))
        write_dicom_seg(written[2], recon.labels, series, class_names or {}, provenance)
    return written


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan reconstruct``."""
    parser = sub.add_parser(
        "reconstruct",
        help="reconstruct fastMRI-layout k-space files (zero-filled, CG-SENSE, CS, learned models)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan reconstruct data/h5_4x recon/ --method sense --maps espirit",
    )
    parser.add_argument("input", help="a fastMRI-layout .h5 file or a folder of them")
    parser.add_argument("output", help="an .h5 / .nii / .nii.gz file (single input), or a folder")
    parser.add_argument(
        "--format",
        default=None,
        choices=tuple(FORMATS),
        help="output format (default: by the output's extension; h5 for folders)",
    )
    parser.add_argument(
        "--method",
        default="sense",
        choices=(*METHODS, *learned_methods()),
        help="reconstruction (default sense); learned: " + ", ".join(learned_methods()),
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="kscan .safetensors checkpoint of the learned --method, or shipped:<name> for a "
        "file shipped with kscan (default: the weights shipped for --method); convert "
        "DIRECT/fastMRI files with 'kscan import-checkpoint'",
    )
    parser.add_argument(
        "--maps",
        default="auto",
        choices=MAPS,
        help=f"coil maps (default auto: ESPIRiT with >= {ESPIRIT_MIN_LINES} centre lines, else ACS)",
    )
    parser.add_argument(
        "--regularizer", default="wavelet", choices=REGULARIZERS, help="for --method cs"
    )
    parser.add_argument(
        "--lam", type=float, default=None, help="regularisation weight (default: the solver's)"
    )
    parser.add_argument(
        "--max-iter", type=int, default=None, help="iteration cap (default: the solver's)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="slices solved together (default 4; 1 for learned methods: a 640x368 slice with "
        "15 coils takes about 2.5 GB in RVN)",
    )
    parser.add_argument(
        "--mask",
        default=None,
        choices=MASK_KINDS,
        help="undersample fully sampled inputs on the fly",
    )
    parser.add_argument("--acceleration", type=float, default=4.0, help="with --mask (default 4)")
    parser.add_argument(
        "--center-fraction", type=float, default=0.08, help="with --mask (default 0.08)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="with --mask: mixed into the per-file seed"
    )
    parser.add_argument(
        "--segment",
        action="store_true",
        help="multitask models (" + ", ".join(registry.names("multitask")) + "): write their "
        "labels too (h5: a 'segmentation' dataset; NIfTI/DICOM: <stem>_labels.nii.gz)",
    )
    add_device(parser)
    data_parallel.add_devices(parser)
    add_quiet(parser)
    parser.set_defaults(func=_main)


@dataclass(frozen=True)
class LoadedMethod:
    """A rank's method, ready to run: the batch solve on ``device`` and what the provenance needs."""

    device: torch.device
    solve: BatchSolve
    parameters: dict[str, Any]
    checkpoint: Path | None = None
    class_names: dict[int, str] | None = None


@dataclass(frozen=True)
class ReconJob:
    """``kscan reconstruct`` as a :class:`~kscan.pipelines.parallel.data_parallel.Job`: every
    input reconstructed with ``settings`` and written as ``output_format``; ``devices``, the
    devices of a parallel run, are recorded in the provenance."""

    settings: ReconSettings
    output_format: str
    devices: tuple[str, ...] = ()

    def setup(self, dev: torch.device) -> LoadedMethod:
        """The solve on ``dev``: a learned model loaded from its checkpoint, or a classical solver."""
        settings = self.settings
        parameters = settings.parameters() | {"device": str(dev)}
        if len(self.devices) > 1:
            parameters["devices"] = list(self.devices)
        if not settings.learned:
            return LoadedMethod(dev, classical_solve(settings), parameters)
        learned = load_reconstructor(settings.method, settings.checkpoint, dev, settings.segment)
        checkpoint = learned.checkpoint.path
        parameters |= {"checkpoint": str(checkpoint), "model_config": learned.checkpoint.config}
        if learned.scaling is not None:
            parameters["kspace_scaling"] = learned.scaling.to_meta()
        names = None
        if settings.segment:
            names = class_names(learned.checkpoint, learned.model.num_classes)
            parameters |= {"class_names": {str(k): v for k, v in names.items()}}
        return LoadedMethod(dev, learned, parameters, checkpoint, names)

    def compute(self, ctx: LoadedMethod, src: Path, shard: Shard, quiet: bool) -> Reconstruction:
        return reconstruct_file(src, self.settings, ctx.solve, ctx.device, quiet, shard)

    def merge(self, parts: list[Reconstruction]) -> Reconstruction:
        return merge_reconstructions(parts, self.settings.batch_size)

    def write(self, ctx: LoadedMethod, src: Path, dst: Path, recon: Reconstruction) -> list[Path]:
        record = provenance_record(
            model=self.settings.method,
            parameters=ctx.parameters,
            inputs=[src],
            checkpoint=ctx.checkpoint,
        )
        return write_reconstruction(dst, recon, self.output_format, record, ctx.class_names)


def _main(args: argparse.Namespace) -> None:
    settings = ReconSettings(
        method=args.method,
        maps=args.maps,
        regularizer=args.regularizer,
        lam=args.lam,
        max_iter=args.max_iter,
        batch_size=args.batch_size,
        mask=args.mask,
        acceleration=args.acceleration,
        center_fraction=args.center_fraction,
        seed=args.seed,
        checkpoint=args.checkpoint,
        segment=args.segment,
    )
    devices = data_parallel.devices_of(args)
    output_format = args.format or output_format_of(Path(args.output))
    pairs = output_pairs(args.input, args.output, FORMATS[output_format])
    job = ReconJob(settings, output_format, tuple(str(d) for d in devices))
    data_parallel.run(job, pairs, devices, args.quiet, desc="reconstructing")


def output_format_of(path: Path) -> str:
    """The format an output path asks for by its extension: ``.nii``/``.nii.gz`` NIfTI, else h5."""
    return "nifti" if path.name.endswith((".nii", ".nii.gz")) else "h5"
