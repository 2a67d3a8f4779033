"""The ``kscan`` command.

Every subcommand is a thin layer over a library function. User mistakes (a kscan error) are
printed as one line ``kscan: error: ...`` on stderr with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tabulate import tabulate

import kscan
from kscan.errors import KscanError
from kscan.pipelines.atomic import write_json


def _cmd_demo(args: argparse.Namespace) -> None:
    from kscan.pipelines import demo

    report = demo.run(size=args.size, coils=args.coils, seed=args.seed, device=args.device, quiet=args.quiet)
    print(tabulate(demo.table(report), headers=demo.HEADERS, tablefmt="github"))
    write_json(args.out, report)
    print(f"\nwrote {args.out}")


def _cmd_bench_physics(args: argparse.Namespace) -> None:
    from kscan.pipelines import bench_physics

    report = bench_physics.run(device=args.device, coils=args.coils, size=args.size, repeats=args.repeats)
    headers = ["benchmark", "candidate", "median ms", "ratio", "target", "met"]
    print(tabulate(bench_physics.table(report), headers=headers, tablefmt="github"))
    for res in report["results"]:
        extra = {k: v for k, v in res.items() if k in ("max_abs_difference", "agreement_mean_abs_cosine", "note")}
        if extra:
            print(f"{res['name']}: " + ", ".join(f"{k} = {v}" for k, v in extra.items()))
    m = report["machine"]
    print(f"machine: {m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, {m['device']}, torch {m['torch']}")
    write_json(args.out, report)
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kscan", description="kscan: MRI from raw k-space or DICOM/NIfTI to reconstructions and segmentations"
    )
    parser.add_argument("--version", action="version", version=f"kscan {kscan.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="simulate a multi-coil phantom, undersample it, reconstruct it classically, print metrics"
    )
    demo.add_argument("--size", type=int, default=128, help="phantom side in pixels (default 128)")
    demo.add_argument("--coils", type=int, default=8, help="number of simulated coils (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="seed of noise and masks (default 0)")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument("--out", default="out/demo/metrics.json", help="JSON written with every number")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    physics = bench_sub.add_parser("physics", help="SENSE normal operator and ESPIRiT against their peers")
    physics.add_argument("--device", default="cpu")
    physics.add_argument("--coils", type=int, default=15)
    physics.add_argument("--size", type=int, default=320)
    physics.add_argument("--repeats", type=int, default=20, help="timed rounds of the SENSE operator (ESPIRiT: a fifth)")
    physics.add_argument("--out", default="out/bench/physics.json")
    physics.set_defaults(func=_cmd_bench_physics)
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
