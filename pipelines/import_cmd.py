"""``kscan import-checkpoint``: DIRECT and fastMRI checkpoints as kscan safetensors checkpoints.

- ``--format direct``: a DIRECT RecurrentVarNet checkpoint (``model`` and ``sensitivity_model``
  state dicts) becomes a kscan ``rvn`` checkpoint with the same weights
  (:func:`kscan.models.checkpoints.import_direct`; the architecture is inferred from the keys and
  shapes, the FFT convention and, for shared parameters, the number of steps are given).
- ``--format fastmri-varnet``: a fastMRI VarNet state dict (or Lightning checkpoint) becomes a
  kscan ``varnet`` checkpoint (:func:`kscan.models.checkpoints.import_fastmri_varnet`).

The source is read with ``torch.load(weights_only=True)``, which runs no code from the file. The
output records the source's name and SHA-256 and what the import ignored in its metadata
(``meta.imported_from``), and is then used with ``kscan reconstruct --checkpoint``. A DIRECT
model also gets DIRECT's per-sample k-space scaling rule (``meta.kspace_scaling``, percentile
``--scale-percentile``, 0.99 by default), which ``kscan reconstruct`` applies around it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from torch import nn

from kscan.errors import ConfigError
from kscan.models.checkpoints import ImportReport, import_direct, import_fastmri_varnet
from kscan.models.rvn import RVN, RVNConfig
from kscan.pipelines.checkpoint import load_state, save_checkpoint
from kscan.pipelines.kspace_scaling import DIRECT_PERCENTILE, META_KEY, KspaceScaling
from kscan.pipelines.provenance import sha256_file

FORMATS = {"direct": "rvn", "fastmri-varnet": "varnet"}
"""Source formats and the registry model each becomes."""


def import_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    source_format: str,
    centered: bool = True,
    num_steps: int | None = None,
    scale_percentile: float | None = DIRECT_PERCENTILE,
) -> tuple[str, nn.Module, ImportReport]:
    """Convert ``src`` (of ``source_format``, a key of :data:`FORMATS`) into the kscan checkpoint ``dst``.

    Args:
        src: the DIRECT or fastMRI checkpoint.
        dst: the ``.safetensors`` file to write (atomically).
        source_format: ``"direct"`` or ``"fastmri-varnet"``.
        centered: the FFT convention the network was trained with (a state dict cannot tell).
        num_steps: DIRECT only: the RecurrentVarNet's steps when its blocks share parameters.
        scale_percentile: DIRECT only: the percentile of DIRECT's per-sample k-space scaling the
            model was trained with (recorded in the checkpoint and applied by ``kscan
            reconstruct``: :mod:`kscan.pipelines.kspace_scaling`); None: no scaling.

    Returns:
        ``(model name, model, report)``: the registry name written, the kscan model (evaluation
        mode) and what the import found.
    """
    if source_format not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {source_format!r}")
    scaling = None
    if source_format == "direct":
        model, report = _from_direct(src, centered, num_steps)
        scaling = None if scale_percentile is None else KspaceScaling(scale_percentile)
    else:
        if num_steps is not None:
            raise ConfigError(
                "--num-steps: only for --format direct (a VarNet's cascades are counted)"
            )
        model, report = import_fastmri_varnet(src, centered=centered)
    name = FORMATS[source_format]
    meta: dict[str, Any] = {
        "imported_from": {
            "format": source_format,
            "file": Path(src).name,
            "sha256": sha256_file(src),
            "stripped_prefix": report.stripped_prefix,
            "ignored_entries": list(report.ignored_entries),
        }
    }
    if scaling is not None:
        meta[META_KEY] = scaling.to_meta()
    save_checkpoint(dst, name, model, meta=meta)
    return name, model, report


def _from_direct(
    src: str | os.PathLike[str], centered: bool, num_steps: int | None
) -> tuple[RVN, ImportReport]:
    """kscan's :class:`RVN` holding the weights of a DIRECT checkpoint."""
    network, sensitivity, report = import_direct(src, centered=centered, num_steps=num_steps)
    filters, pools = report.sensitivity_filters or (8, 4)
    model = RVN(
        RVNConfig(
            network=report.config,
            learned_sensitivity=sensitivity is not None,
            sensitivity_filters=filters,
            sensitivity_pools=pools,
        )
    )
    state = {f"model.{k}": v for k, v in network.state_dict().items()}
    if sensitivity is not None:
        state |= {f"sensitivity_model.{k}": v for k, v in sensitivity.state_dict().items()}
    load_state(model, state, src)
    return model.eval(), report


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan import-checkpoint``."""
    parser = sub.add_parser(
        "import-checkpoint",
        help="convert a DIRECT RecurrentVarNet or fastMRI VarNet checkpoint to a kscan checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan import-checkpoint model_110000.pt rvn.safetensors --format direct",
    )
    parser.add_argument("src", help="the DIRECT / fastMRI checkpoint (.pt, .ckpt)")
    parser.add_argument("dst", help="the kscan checkpoint to write (.safetensors)")
    parser.add_argument("--format", required=True, choices=tuple(FORMATS), dest="source_format")
    convention = parser.add_mutually_exclusive_group()
    convention.add_argument(
        "--centered",
        dest="centered",
        action="store_true",
        default=True,
        help="the network was trained with centered FFTs (fastMRI data; the default)",
    )
    convention.add_argument(
        "--uncentered",
        dest="centered",
        action="store_false",
        help="the network was trained with uncentered FFTs (Calgary-Campinas data)",
    )
    parser.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help="direct: the RecurrentVarNet's steps when its blocks share parameters",
    )
    parser.add_argument(
        "--scale-percentile",
        default=None,
        help="direct: the k-space scaling percentile the model was trained with (DIRECT's "
        f"default {DIRECT_PERCENTILE}), applied by kscan reconstruct; 'none' for no scaling",
    )
    parser.set_defaults(func=_main)


def _percentile(text: str | None, source_format: str) -> float | None:
    """``--scale-percentile`` for ``source_format``: DIRECT's default when not given."""
    if source_format != "direct":
        if text is not None:
            raise ConfigError(f"--scale-percentile: only for --format direct, not {source_format}")
        return None
    if text is None:
        return DIRECT_PERCENTILE
    if text.lower() == "none":
        return None
    try:
        return KspaceScaling(float(text)).percentile
    except ValueError:
        raise ConfigError(
            f"--scale-percentile: expected a number in (0, 1] or 'none', got {text!r}"
        ) from None


def _main(args: argparse.Namespace) -> None:
    name, model, report = import_checkpoint(
        args.src,
        args.dst,
        args.source_format,
        args.centered,
        args.num_steps,
        _percentile(args.scale_percentile, args.source_format),
    )
    count = sum(p.numel() for p in model.parameters())
    ignored = ", ".join(report.ignored_entries) or "nothing"
    print(f"{args.dst}: {name}, {count:,} parameters ({report.config}); ignored {ignored}")
