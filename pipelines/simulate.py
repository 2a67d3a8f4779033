"""``kscan simulate``: a labelled synthetic dataset as fastMRI HDF5, NIfTI and DICOM (+ SEG).

**Layout** of ``OUT_DIR`` (``sim_000`` is volume 0)::

    dataset.json                  manifest: parameters, cases and their files (written last)
    h5/sim_000.h5                 fastMRI layout: kspace (slices, coils, H, W), reconstruction_rss
                                  (slices, rH, rW), ismrmrd_header (encoding size = k-space size,
                                  recon size = target size, voxel size), segmentation (labels on
                                  the recon grid), sensitivity_map (only with sensitivity_maps);
                                  the provenance record as the JSON attribute ``kscan_provenance``
    nifti/sim_000.nii.gz          the target (float32) + nifti/sim_000.json, its provenance
    nifti/sim_000_labels.nii.gz   the labels (uint8)   + nifti/sim_000_labels.json
    dicom/sim_000/                the target as a derived MR series (slice_0000.dcm, ...)
    dicom/sim_000_seg.dcm         DICOM SEG of the labels, referencing that series

``h5/`` holds HDF5 files only: fastmri's ``SliceDataset`` opens every file of its folder.
Labels are the ids of :data:`kscan.pipelines.anatomy.TISSUE_CLASSES`; the SEG has one segment per
class id > 0, named after it.

**Axes.** kscan's volumes are ``(slices, H, W)``: ``volume[k, j, i]`` is row ``j``, column ``i``
of slice ``k``. NIfTI arrays are indexed ``(i, j, k)``, so the NIfTI array is
``volume.transpose(2, 1, 0)`` of shape ``(W, H, slices)`` (:func:`kscan.pipelines.io.nifti.volume_to_nifti_array`; the transposition is
its own inverse), and the affine maps ``(i, j, k) = (column, row, slice)`` to RAS mm, exactly as
:func:`kscan.pipelines.io.dicom_write.write_mr_series` expects, so the NIfTI files and the DICOM
series share one affine and :func:`kscan.pipelines.io.dicom.read_series` returns the NIfTI array.
The phantom's affine (:func:`kscan.pipelines.io.nifti.axial_affine`) is an axial stack centred on the origin, displayed
like ``imshow(volume[k])``: columns run to the patient's left, rows to posterior, slices to
superior, ``affine = [[-dW, 0, 0, .], [0, -dH, 0, .], [0, 0, dZ, .]]`` with the voxel size
``(dH, dW, dZ)`` = :data:`VOXEL_SIZE_MM` (also the header's voxel size: x is the readout H).

**Seeds.** Volume ``i`` draws everything from ``numpy.random.default_rng([seed, i])`` (a
SeedSequence of entropy ``(seed, i)``), so a volume does not depend on how many are made, and
two runs with one seed write identical arrays.

**Resuming.** Each file is written atomically (a DICOM series as one folder rename). A case is
complete when all its files exist; a rerun with the same parameters skips complete cases and
writes only the missing files of the others (a DICOM SEG always references the series on disk),
so rerunning recomputes nothing and a killed run, run again, finishes (removing the temporary
files that the kill left; so run one ``kscan simulate`` per ``OUT_DIR`` at a time). ``dataset.json`` is written
last; while a run is under way ``.dataset.pending.json`` holds its parameters, so that neither a
finished nor an interrupted dataset is ever extended with other parameters (an error instead).
``volumes`` and ``formats`` may change between runs: cases and files are added, none removed.

**Retrospective mode** (:func:`simulate_from_image`): a magnitude volume (NIfTI file or DICOM
series folder) becomes multi-coil k-space through
:func:`kscan.pipelines.synthetic.from_magnitude`, written as HDF5 and NIfTI (no labels). The
image's NIfTI array ``(X, Y, Z)`` gives slices ``(Z, Y, X)`` by the same transposition, so the
output NIfTI lies on the input's grid with the input's affine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from tqdm import tqdm

from kscan.errors import ConfigError, FileFormatError, ShapeError, about_file
from kscan.pipelines.anatomy import TISSUE_CLASSES
from kscan.pipelines.atomic import write_json
from kscan.pipelines.cli_args import add_quiet, add_seed, int_pair
from kscan.pipelines.io.dicom import read_series
from kscan.pipelines.io.dicom_seg import write_segmentation
from kscan.pipelines.io.dicom_write import write_mr_series
from kscan.pipelines.io.fastmri import write_fastmri
from kscan.pipelines.io.nifti import (
    axial_affine,
    nifti_array_to_volume,
    read_nifti,
    volume_to_nifti_array,
    write_nifti,
)
from kscan.pipelines.provenance import provenance_record, sha256_file, sidecar_path
from kscan.pipelines.synthetic import SimulatedVolume, from_magnitude, simulate_volume

FORMATS = ("h5", "nifti", "dicom")
"""Output formats of :func:`simulate_dataset`."""
IMAGE_FORMATS = ("h5", "nifti")
"""Output formats of :func:`simulate_from_image`."""
VOXEL_SIZE_MM = (0.5, 0.5, 3.0)
"""Voxel size of the phantoms, ``(dH, dW, dZ)`` mm: along rows, along columns, between slices."""
MANIFEST = "dataset.json"
PENDING = ".dataset.pending.json"
PROVENANCE_ATTR = "kscan_provenance"
"""HDF5 attribute holding the provenance record as JSON (h5/ must hold HDF5 files only)."""
SEG_CLASSES = {cid: name for cid, name in TISSUE_CLASSES.items() if cid > 0}
_SEG_PROPERTIES = {
    cid: (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion)
    for cid, name in SEG_CLASSES.items()
    if name == "lesion"
}


@dataclass(frozen=True)
class _Plan:
    """What one dataset is: its parameters (compared on resume) and how to make a volume."""

    out_dir: Path
    parameters: dict[str, Any]
    volumes: int
    seed: int
    formats: tuple[str, ...]
    affine: np.ndarray
    voxel_size_mm: tuple[float, float, float]
    sensitivity_maps: bool
    simulate: Callable[[np.random.Generator], SimulatedVolume]
    description: str
    inputs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class _Output:
    """Files written together by one writer; complete when every one exists."""

    paths: tuple[Path, ...]
    write: Callable[[SimulatedVolume, dict[str, Any]], object]


def _outputs(plan: _Plan, name: str, labelled: bool) -> list[_Output]:
    """The outputs of case ``name``, in writing order (a SEG after its series)."""
    out = plan.out_dir
    outputs: list[_Output] = []
    if "h5" in plan.formats:
        h5 = out / "h5" / f"{name}.h5"
        outputs.append(_Output((h5,), lambda v, p: _write_h5(h5, v, p, plan)))
    if "nifti" in plan.formats:
        image = out / "nifti" / f"{name}.nii.gz"
        outputs.append(
            _Output(
                (image, sidecar_path(image)),
                lambda v, p: write_nifti(image, volume_to_nifti_array(v.target), plan.affine, p),
            )
        )
        if labelled:
            labels = out / "nifti" / f"{name}_labels.nii.gz"
            outputs.append(
                _Output(
                    (labels, sidecar_path(labels)),
                    lambda v, p: write_nifti(
                        labels, volume_to_nifti_array(v.labels), plan.affine, p
                    ),
                )
            )
    if "dicom" in plan.formats:
        series = out / "dicom" / name
        outputs.append(
            _Output(
                (series,),
                lambda v, p: write_mr_series(
                    series, v.target, plan.affine, series_description=plan.description, provenance=p
                ),
            )
        )
        if labelled:
            seg = out / "dicom" / f"{name}_seg.dcm"
            outputs.append(_Output((seg,), lambda v, p: _write_seg(seg, series, v.labels, p)))
    return outputs


def _write_h5(path: Path, volume: SimulatedVolume, record: dict[str, Any], plan: _Plan) -> None:
    write_fastmri(
        path,
        volume.kspace,
        volume.target,
        voxel_size_mm=plan.voxel_size_mm,
        acquisition="kscan_simulated",
        patient_id=path.stem,
        segmentation=volume.labels,
        sensitivity_map=volume.maps if plan.sensitivity_maps else None,
        attrs={PROVENANCE_ATTR: json.dumps(record)},
    )


def _write_seg(path: Path, series: Path, labels: np.ndarray, record: dict[str, Any]) -> None:
    """DICOM SEG of ``labels`` referencing the series files on disk, in slice order."""
    sources = [pydicom.dcmread(f) for f in sorted(series.glob("slice_*.dcm"))]
    write_segmentation(
        path,
        labels,
        sources,
        SEG_CLASSES,
        provenance=record,
        properties=_SEG_PROPERTIES,
        series_description="kscan phantom labels",
    )


def _remove_leftovers(path: Path) -> None:
    """Delete what a killed writer of ``path`` left beside it: ``atomic_path``'s temporary
    ``.<name>.*.tmp*`` files and ``write_mr_series``' ``.<name>.*.tmp`` folders."""
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileFormatError(
            f"{path}: unreadable JSON ({type(err).__name__}); delete it or choose another OUT_DIR"
        ) from None
    if not isinstance(data, dict) or "parameters" not in data:
        raise FileFormatError(f"{path}: no 'parameters'; expected a kscan simulate manifest")
    return data


def _check_resumable(plan: _Plan) -> dict[str, Any] | None:
    """The existing manifest, after checking that it and any pending run used ``plan``'s parameters."""
    manifest = _read_json(plan.out_dir / MANIFEST)
    wanted = _jsonable(plan.parameters)
    for path, found in (
        (plan.out_dir / MANIFEST, manifest),
        (plan.out_dir / PENDING, _read_json(plan.out_dir / PENDING)),
    ):
        if found is not None and found["parameters"] != wanted:
            differ = sorted(
                key
                for key in set(wanted) | set(found["parameters"])
                if wanted.get(key) != found["parameters"].get(key)
            )
            raise ConfigError(
                f"{path}: the dataset there was made with other values of {differ}; "
                "choose another OUT_DIR or delete it"
            )
    return manifest


def _run(plan: _Plan, labelled: bool, quiet: bool) -> list[Path]:
    """Write every missing output of every case, then the manifest; returns the paths written."""
    existing = _check_resumable(plan)
    base = provenance_record(
        model=plan.parameters["mode"], parameters=plan.parameters, inputs=plan.inputs
    )
    written: list[Path] = []
    cases = []
    for i in tqdm(range(plan.volumes), desc="simulating", unit="volume", disable=quiet):
        name = f"sim_{i:03d}"
        outputs = _outputs(plan, name, labelled)
        for path in (p for o in outputs for p in o.paths):
            _remove_leftovers(path)
        missing = [o for o in outputs if not all(p.exists() for p in o.paths)]
        if missing:
            volume = plan.simulate(np.random.default_rng([plan.seed, i]))
            if not (plan.out_dir / PENDING).exists():
                write_json(plan.out_dir / PENDING, {"parameters": plan.parameters})
            record = {
                **base,
                "parameters": {**plan.parameters, "case": name, "seed_entropy": [plan.seed, i]},
            }
            for output in missing:
                output.write(volume, record)
                written.extend(output.paths)
        files = [p.relative_to(plan.out_dir).as_posix() for o in outputs for p in o.paths]
        cases.append({"name": name, "seed_entropy": [plan.seed, i], "files": files})
    manifest = {
        "parameters": plan.parameters,
        "formats": list(plan.formats),
        "volumes": plan.volumes,
        "axes": "arrays (slices, H, W); NIfTI array = transpose(2, 1, 0), i.e. (W, H, slices)",
        "voxel_size_mm": list(plan.voxel_size_mm),
        "affine": plan.affine.tolist(),
        "tissue_classes": {str(k): v for k, v in TISSUE_CLASSES.items()} if labelled else None,
        "cases": cases,
    }
    previous = {k: v for k, v in (existing or {}).items() if k != "provenance"}
    if previous != _jsonable(manifest):
        write_json(plan.out_dir / MANIFEST, {**manifest, "provenance": base})
        written.append(plan.out_dir / MANIFEST)
    (plan.out_dir / PENDING).unlink(missing_ok=True)
    return written


def _check_common(
    volumes: int, seed: int, formats: Sequence[str], allowed: tuple[str, ...]
) -> tuple[str, ...]:
    if not (isinstance(volumes, int | np.integer) and volumes >= 1):
        raise ConfigError(f"volumes: expected an integer >= 1, got {volumes!r}")
    if not (isinstance(seed, int | np.integer) and seed >= 0):
        raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
    chosen = tuple(dict.fromkeys(formats))
    unknown = [f for f in chosen if f not in allowed]
    if unknown or not chosen:
        raise ConfigError(f"formats: expected some of {list(allowed)}, got {list(formats)}")
    return chosen


def simulate_dataset(
    out_dir: str | Path,
    volumes: int = 3,
    slices: int = 8,
    shape_kspace: tuple[int, int] = (640, 368),
    recon_size: tuple[int, int] = (320, 320),
    coils: int = 15,
    snr_db: float | None = 30.0,
    seed: int = 0,
    dims: int = 3,
    formats: Sequence[str] = FORMATS,
    sensitivity_maps: bool = False,
    quiet: bool = False,
    intensity_scale: float = 1.0,
) -> list[Path]:
    """Simulate ``volumes`` labelled multi-coil phantom volumes into ``out_dir`` (module docstring).

    Each volume is :func:`kscan.pipelines.synthetic.simulate_volume` with these arguments and the
    seed ``default_rng([seed, i])``; k-space is ``(slices, coils, *shape_kspace)``, target and
    labels ``(slices, *recon_size)``. ``formats`` picks among :data:`FORMATS`;
    ``sensitivity_maps`` also stores the coil maps in the HDF5 files (as large as the k-space).
    ``intensity_scale`` multiplies k-space, noise and targets (the same volumes at another
    scale: real fastMRI k-space is about 1e-4 of these phantoms').
    Complete cases of an earlier run with the same parameters are skipped.

    Returns the paths written by this call (files and DICOM series folders; the manifest last),
    empty when everything existed.
    """
    chosen = _check_common(volumes, seed, formats, FORMATS)
    if isinstance(intensity_scale, bool) or not (
        isinstance(intensity_scale, int | float) and 0 < intensity_scale < math.inf
    ):
        raise ConfigError(
            f"intensity_scale: expected a positive finite number, got {intensity_scale!r}"
        )
    shape_kspace, recon_size = tuple(shape_kspace), tuple(recon_size)
    parameters = {
        "mode": "phantom",
        "slices": slices,
        "kspace_size": shape_kspace,
        "recon_size": recon_size,
        "coils": coils,
        "snr_db": snr_db,
        "seed": seed,
        "dims": dims,
        "sensitivity_maps": sensitivity_maps,
        "voxel_size_mm": VOXEL_SIZE_MM,
        "intensity_scale": intensity_scale,
    }

    def simulate(rng: np.random.Generator) -> SimulatedVolume:
        volume = simulate_volume(shape_kspace, recon_size, slices, coils, snr_db, rng, dims)
        if intensity_scale == 1:
            return volume
        c = np.float32(intensity_scale)
        return dataclasses.replace(
            volume,
            kspace=volume.kspace * c,
            target=volume.target * c,
            image=volume.image * c,
            noise_std=volume.noise_std * intensity_scale,
        )

    plan = _Plan(
        out_dir=Path(out_dir),
        parameters=parameters,
        volumes=volumes,
        seed=seed,
        formats=chosen,
        # a recon_size of the wrong length is reported by simulate_volume, before any write
        affine=axial_affine((slices, *recon_size), VOXEL_SIZE_MM)
        if len(recon_size) == 2
        else np.eye(4),
        voxel_size_mm=VOXEL_SIZE_MM,
        sensitivity_maps=sensitivity_maps,
        simulate=simulate,
        description="kscan simulated phantom",
    )
    return _run(plan, labelled=True, quiet=quiet)


def _load_image(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[Path, ...]]:
    """A magnitude volume ``(X, Y, Z)``, its RAS affine and its files, from NIfTI or a DICOM folder."""
    if path.is_dir():
        series = read_series(path)
        return series.array, series.affine, series.info.files
    nifti = read_nifti(path)
    array = nifti.array
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.dtype.kind not in "biuf":
        raise ShapeError(
            f"{path}: {array.dtype} volume of shape {nifti.array.shape}; expected a real 2D or 3D magnitude volume"
        )
    return array, nifti.affine, (path,)


def _central_slices(
    array: np.ndarray, affine: np.ndarray, slices: int | None, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The ``slices`` central slices of ``(X, Y, Z)`` (all when None) and their affine."""
    depth = array.shape[2]
    if slices is None:
        return array, affine
    if not (isinstance(slices, int | np.integer) and 1 <= slices <= depth):
        raise ConfigError(f"slices: expected 1 to {depth} (the slices of {path}), got {slices!r}")
    start = (depth - slices) // 2
    shifted = affine.copy()
    shifted[:3, 3] += start * affine[:3, 2]
    return array[..., start : start + slices], shifted


def simulate_from_image(
    out_dir: str | Path,
    image: str | Path,
    volumes: int = 1,
    slices: int | None = None,
    shape_kspace: tuple[int, int] | None = None,
    coils: int = 15,
    snr_db: float | None = 30.0,
    seed: int = 0,
    formats: Sequence[str] = IMAGE_FORMATS,
    sensitivity_maps: bool = False,
    quiet: bool = False,
) -> list[Path]:
    """Retrospective simulation: ``volumes`` multi-coil k-space files of one magnitude volume.

    ``image`` is a NIfTI file (2D, 3D, or 4D with one volume) or a DICOM series folder; its slices
    along the third NIfTI axis (the ``slices`` central ones, or all) become ``(Z, Y, X)`` slices
    (module docstring) and volume ``i`` is :func:`kscan.pipelines.synthetic.from_magnitude` with
    seed ``default_rng([seed, i])``: its own coils, phase and noise. The recon size is the image's
    ``(Y, X)``; ``shape_kspace`` (default the same) may pad it. Formats: :data:`IMAGE_FORMATS`;
    the NIfTI target has the input's grid and affine. Returns the paths written, as
    :func:`simulate_dataset` does.
    """
    chosen = _check_common(volumes, seed, formats, IMAGE_FORMATS)
    path = Path(image)
    array, affine, files = _load_image(path)
    array, affine = _central_slices(array, affine, slices, path)
    stack = nifti_array_to_volume(array, path)
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_size = (float(sizes[1]), float(sizes[0]), float(sizes[2]))  # (dH, dW, dZ) = (dY, dX, dZ)
    digest = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
    parameters = {
        "mode": "from_image",
        "image": path.name,
        "image_sha256": digest,
        "slices": slices,
        "kspace_size": None if shape_kspace is None else tuple(shape_kspace),
        "recon_size": tuple(stack.shape[-2:]),
        "coils": coils,
        "snr_db": snr_db,
        "seed": seed,
        "sensitivity_maps": sensitivity_maps,
        "voxel_size_mm": voxel_size,
    }

    def simulate(rng: np.random.Generator) -> SimulatedVolume:
        with about_file(path):
            return from_magnitude(stack, coils, rng, snr_db, 0, shape_kspace)

    plan = _Plan(
        out_dir=Path(out_dir),
        parameters=parameters,
        volumes=volumes,
        seed=seed,
        formats=chosen,
        affine=affine,
        voxel_size_mm=voxel_size,
        sensitivity_maps=sensitivity_maps,
        simulate=simulate,
        description="kscan simulated from image",
        inputs=tuple(files),
    )
    return _run(plan, labelled=False, quiet=quiet)


def _snr(text: str) -> float | None:
    """``--snr-db``: a number of dB, or ``none`` for noiseless k-space."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of dB or 'none', got {text!r}"
        ) from None


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan simulate``."""
    parser = sub.add_parser(
        "simulate",
        help="write a labelled synthetic multi-coil dataset (fastMRI HDF5, NIfTI, DICOM + SEG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan simulate out/sim --volumes 3 --slices 8 --kspace-size 320,320 "
        "--recon-size 160,160 --coils 8",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="dataset folder (created if needed)")
    parser.add_argument(
        "--volumes", type=int, help="number of volumes (default 3; 1 with --from-image)"
    )
    parser.add_argument(
        "--slices",
        type=int,
        help="slices per volume (default 8; with --from-image: all, else the central N)",
    )
    parser.add_argument(
        "--kspace-size",
        type=int_pair,
        help="k-space H,W (default 640,368; with --from-image: the image's size)",
    )
    parser.add_argument(
        "--recon-size", type=int_pair, help="target H,W (default 320,320; not with --from-image)"
    )
    parser.add_argument(
        "--coils", type=int, default=15, help="number of coils, 4 to 32 (default 15)"
    )
    parser.add_argument(
        "--snr-db",
        type=_snr,
        default=30.0,
        help="k-space SNR in dB, or 'none' for no noise (default 30)",
    )
    parser.add_argument(
        "--dims", type=int, help="3: one 3D phantom per volume (default); 2: independent slices"
    )
    parser.add_argument(
        "--formats",
        help=f"comma-separated outputs (default {','.join(FORMATS)}; {','.join(IMAGE_FORMATS)} with --from-image)",
    )
    parser.add_argument(
        "--from-image",
        metavar="PATH",
        help="simulate from this magnitude volume (NIfTI file or DICOM folder)",
    )
    parser.add_argument(
        "--sensitivity-maps",
        action="store_true",
        help="also store the coil maps in the HDF5 files (large)",
    )
    parser.add_argument(
        "--intensity-scale",
        type=float,
        default=1.0,
        help="multiply k-space and targets by this (phantoms only; default 1)",
    )
    add_seed(parser, help="seed; volume i uses the seed sequence (seed, i)")
    add_quiet(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    common: dict[str, Any] = {
        "coils": args.coils,
        "snr_db": args.snr_db,
        "seed": args.seed,
        "sensitivity_maps": args.sensitivity_maps,
        "quiet": args.quiet,
    }
    if args.formats is not None:
        common["formats"] = [f.strip() for f in args.formats.split(",")]
    if args.from_image is None:
        written = simulate_dataset(
            args.out_dir,
            volumes=3 if args.volumes is None else args.volumes,
            slices=8 if args.slices is None else args.slices,
            shape_kspace=args.kspace_size or (640, 368),
            recon_size=args.recon_size or (320, 320),
            dims=3 if args.dims is None else args.dims,
            intensity_scale=args.intensity_scale,
            **common,
        )
    else:
        if args.intensity_scale != 1:
            raise ConfigError("--intensity-scale: for phantoms, not with --from-image")
        for flag, value in (("--recon-size", args.recon_size), ("--dims", args.dims)):
            if value is not None:
                raise ConfigError(f"{flag}: not used with --from-image (the image sets it)")
        written = simulate_from_image(
            args.out_dir,
            args.from_image,
            volumes=1 if args.volumes is None else args.volumes,
            slices=args.slices,
            shape_kspace=args.kspace_size,
            **common,
        )
    print(
        f"{args.out_dir}: {len(written)} outputs written; manifest {Path(args.out_dir) / MANIFEST}"
    )
