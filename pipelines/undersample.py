"""``kscan undersample``: retrospective undersampling of fully sampled fastMRI-layout files.

Each volume gets one mask (fastMRI's convention: the mask is seeded by the file name, so every
slice of a volume shares it and the result is reproducible from the inputs alone; ``--seed N``
mixes ``N`` into that seed). Lines outside the header's ``[padding_left, padding_right)`` are
zeroed as fastMRI does. The output is a test-style file: masked ``kspace``, ``mask``, the
attributes ``acceleration`` (achieved) and ``num_low_frequency``, and the header, target,
segmentation and coil maps of the input unchanged (``--drop-target`` leaves the target out, like
fastMRI's challenge files).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tqdm import tqdm

from kscan.errors import about_file
from kscan.physics.masks import MASK_KINDS, Mask, apply_mask, make_mask, seed_from_name
from kscan.pipelines.batch_paths import output_pairs
from kscan.pipelines.cli_args import add_quiet
from kscan.pipelines.io.fastmri import FastMRIFile, write_fastmri
from kscan.pipelines.provenance import provenance_record


def volume_mask(
    path: Path,
    shape: tuple[int, int],
    kind: str,
    acceleration: float,
    center_fraction: float,
    padding: tuple[int, int],
    seed: int | None = None,
) -> Mask:
    """The mask of the volume ``path``: seeded by its file name (and ``seed``), restricted to ``padding``."""
    name_seed = seed_from_name(path.name)
    mask = make_mask(
        kind,
        shape,
        acceleration=acceleration,
        center_fraction=center_fraction,
        seed=name_seed if seed is None else (seed, *name_seed),
    )
    left, right = padding
    return mask if (left, right) == (0, shape[-1]) else mask.restrict(left, right)


def undersample_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    kind: str,
    acceleration: float,
    center_fraction: float,
    seed: int | None = None,
    drop_target: bool = False,
) -> Mask:
    """Write the undersampled, test-style version of ``src`` to ``dst``; returns the mask used.

    The provenance record (mask kind, acceleration, centre fraction, seed, the input's SHA-256) is
    stored as the JSON attribute ``kscan_provenance``.
    """
    src = Path(src)
    provenance = provenance_record(
        model=f"{kind} mask",
        parameters={"acceleration": acceleration, "center_fraction": center_fraction, "seed": seed},
        inputs=[src],
    )
    with FastMRIFile(src) as f:
        meta = f.metadata
        volume = f.read_volume()
        kspace = volume["kspace"]
        mask = volume_mask(
            src,
            tuple(kspace.shape[-2:]),
            kind,
            acceleration,
            center_fraction,
            (meta.padding_left, meta.padding_right),
            seed,
        )
        masked = apply_mask(kspace, mask)
        write_fastmri(
            dst,
            masked if meta.multicoil else masked[:, 0],
            None if drop_target else volume.get("target"),
            header=f.header,
            acquisition=meta.acquisition,
            patient_id=f.attrs.get("patient_id"),
            mask=mask.mask[0] if mask.mask.shape[0] == 1 else mask.mask,
            acceleration=mask.acceleration,
            num_low_frequency=mask.center_lines,
            segmentation=volume.get("segmentation"),
            sensitivity_map=volume.get("sensitivity_map") if meta.multicoil else None,
            attrs={"kscan_provenance": json.dumps(provenance)},
        )
    return mask


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan undersample``."""
    parser = sub.add_parser(
        "undersample",
        help="undersample fully sampled fastMRI-layout files retrospectively (writes test-style files)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan undersample data/h5 data/h5_4x --mask equispaced_fraction "
        "--acceleration 4 --center-fraction 0.08",
    )
    parser.add_argument("input", help="a fastMRI-layout .h5 file or a folder of them")
    parser.add_argument("output", help="an .h5 file (single input) or a folder")
    parser.add_argument(
        "--mask", default="random", choices=MASK_KINDS, help="mask kind (default random)"
    )
    parser.add_argument("--acceleration", type=float, default=4.0, help="acceleration (default 4)")
    parser.add_argument(
        "--center-fraction",
        type=float,
        default=0.08,
        help="fully sampled centre fraction (default 0.08)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="mixed into the per-file seed (default: the file name alone, as fastMRI)",
    )
    parser.add_argument(
        "--drop-target", action="store_true", help="leave the target out (challenge-style)"
    )
    add_quiet(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    pairs = output_pairs(args.input, args.output, ".h5")
    for src, dst in tqdm(pairs, desc="undersampling", disable=args.quiet):
        with about_file(src):
            mask = undersample_file(
                src,
                dst,
                args.mask,
                args.acceleration,
                args.center_fraction,
                args.seed,
                args.drop_target,
            )
        tqdm.write(
            f"{dst}: {args.mask} mask, acceleration {mask.acceleration:.2f}, {mask.center_lines} centre lines"
        )
