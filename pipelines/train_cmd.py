"""``kscan train CONFIG.yaml``: train a model from a YAML config (``docs/training.md``).

Writes checkpoints, ``log.csv`` and ``metrics.json`` to the config's ``output_dir``. A run whose
``output_dir`` already holds ``last.safetensors`` continues from it when the config is the same
(``--resume`` makes that a requirement). ``--max-steps N`` stops after step N with a checkpoint, as
an interruption would. Several processes: ``torchrun --nproc-per-node N -m kscan.pipelines.cli
train CONFIG.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses

from kscan.pipelines.cli_args import add_quiet
from kscan.pipelines.train import train
from kscan.pipelines.train_config import load_train_config


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan train``."""
    parser = sub.add_parser(
        "train",
        help="train a model from a YAML config (checkpoints, exact resume, torchrun)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan train configs/train_rvn_synthetic.yaml --max-steps 20",
    )
    parser.add_argument("config", metavar="CONFIG.yaml", help="the training config")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT_DIR/last.safetensors (an error when it is missing)",
    )
    parser.add_argument("--device", help="override the config's device (cpu, cuda, cuda:N)")
    parser.add_argument(
        "--max-steps", type=int, help="stop after this step with a checkpoint (resumable)"
    )
    add_quiet(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    config = load_train_config(args.config)
    if args.device is not None:
        config = dataclasses.replace(config, device=args.device)
    result = train(config, resume=args.resume, max_steps=args.max_steps, quiet=args.quiet)
    if result and not args.quiet:
        last = result["last"] or {}
        summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith("val_"))
        print(f"{result['output_dir']}: {result['steps']} steps; {summary or 'no validation'}")
