"""The ``kscan`` command.

Every subcommand is a thin layer over a library function, registered by its own module. Exit
status: 0 on success; 2 for bad input (a kscan error), printed as one line ``kscan: error: ...``
on stderr with no traceback; 1 for an internal error (a bug: the traceback is printed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import kscan
from kscan.errors import KscanError
from kscan.pipelines import (
    bench_io,
    bench_models,
    bench_parallel,
    bench_physics,
    bench_scan,
    bench_scan_gpu,
    bench_triton_build,
    benchmark,
    convert_cmd,
    demo,
    evaluate,
    import_cmd,
    info,
    reconstruct,
    report,
    segment,
    simulate,
    train_cmd,
    undersample,
)

COMMANDS = (
    demo,
    simulate,
    undersample,
    reconstruct,
    segment,
    import_cmd,
    convert_cmd,
    evaluate,
    report,
    info,
    train_cmd,
    benchmark,
)
"""Modules with a ``register(subparsers)`` function, one per subcommand, in ``--help`` order."""

BENCHMARKS = (
    bench_physics,
    bench_io,
    bench_scan,
    bench_scan_gpu,
    bench_triton_build,
    bench_models,
    bench_parallel,
)
"""Modules registering a ``kscan bench SUITE`` subcommand."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kscan",
        description="kscan: MRI from raw k-space or DICOM/NIfTI to reconstructions and segmentations",
    )
    parser.add_argument("--version", action="version", version=f"kscan {kscan.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    bench_sub = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for module in BENCHMARKS:
        module.register(bench_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KscanError as err:
        print(f"kscan: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
