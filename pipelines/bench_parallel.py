"""``kscan bench parallel``: band-parallel VM-UNet inference on ``P`` CPU processes (gloo).

For each ``P`` in ``--ranks`` (default 1, 2, 4), ``P`` processes run
:class:`kscan.pipelines.parallel.BandParallelSegmenter` on one random ``--size`` x ``--size``
image with a small untrained VM-UNet (float32, ``--threads`` torch threads per rank). Recorded
per rank: bytes sent and received per forward, by kind (``halo`` rows of the depthwise
convolutions, ``summaries`` of the scan segments, ``transpose`` of the all-to-alls that move
column routes to column bands and back, ``gather`` of the output bands) and the number of
exchanges; wall time per forward (median of ``--repeats``, every rank timed between barriers,
so the slowest rank sets it). Also measured in this process: the plain single-process forward
of the whole image and of one band (``H/P`` rows), the compute a rank would do without any band
overhead, and the largest difference between the ``P``-rank output and the single-process one.
Each ``P > 1`` runs twice, side by side: the column routes in row bands (``columns: bands``, their
summaries exchanged) and chosen per layer by
:func:`~kscan.pipelines.parallel.band.transposition_pays` (``columns: auto``).

Wall times on a machine with fewer cores than ranks measure oversubscription, not scaling; the
machine description (CPU count) is recorded beside them. See docs/parallel.md for the model of
time against ``P`` built from these numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from tabulate import tabulate
from torch import distributed as dist

from kscan.models.vmunet import VMUNet, VMUNetConfig
from kscan.pipelines.atomic import write_json
from kscan.pipelines.cli_args import int_list
from kscan.pipelines.machine import machine_info
from kscan.pipelines.parallel import BandParallelSegmenter, launch
from kscan.pipelines.timing import compare_times

COLUMN_MODES = {"bands": False, "auto": None}
"""``transpose_columns`` of each column mode of the benchmark."""


def rank_timing(
    model: VMUNet, x: torch.Tensor, repeats: int, threads: int, transpose_columns: bool | None
) -> dict[str, Any]:
    """One rank's part: warm-up, then ``repeats`` timed forwards; per-forward bytes and calls."""
    torch.set_num_threads(threads)
    runner = BandParallelSegmenter(model.eval(), transpose_columns=transpose_columns)
    out = runner(x)
    runner.comm.reset_counters()
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        runner(x)
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - start)
    per = {
        name: {kind: count // repeats for kind, count in counter.items()}
        for name, counter in (
            ("sent", runner.comm.sent),
            ("received", runner.comm.received),
            ("calls", runner.comm.calls),
        )
    }
    return {
        "rank": runner.comm.rank,
        "wall_s": statistics.median(times),
        **per,
        "output": out if runner.comm.rank == 0 else None,
    }


def run(
    size: int = 256,
    dims: tuple[int, ...] = (32, 64, 128, 256),
    depths: tuple[int, ...] = (1, 1, 1, 1),
    ranks: tuple[int, ...] = (1, 2, 4),
    repeats: int = 3,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """All rows; a JSON-serialisable dict with the machine description."""
    torch.manual_seed(seed)
    config = VMUNetConfig(dims=dims, depths=depths, depths_decoder=depths)
    model = VMUNet(config).eval()
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(seed + 1))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            expected = model(x)
            single = {"whole image": lambda: model(x)}
            for p in ranks:
                if p > 1:
                    band = x[..., : size // p, :]
                    single[f"band of 1/{p}"] = lambda band=band: model(band)
            single_times = compare_times(single, repeats=repeats, warmup=1)
    finally:
        torch.set_num_threads(threads_before)
    rows = []
    for p in ranks:
        for mode, transpose in COLUMN_MODES.items() if p > 1 else [("bands", False)]:
            per_rank = launch(rank_timing, p, (model, x, repeats, threads, transpose))
            output = per_rank[0].pop("output")
            for r in per_rank:
                r.pop("output", None)
            rows.append(
                {
                    "ranks": p,
                    "columns": mode,
                    "wall_s": max(r["wall_s"] for r in per_rank),
                    "max_abs_diff_vs_single": (output - expected).abs().max().item(),
                    "per_rank": per_rank,
                }
            )
    return {
        "machine": machine_info(torch.device("cpu")),
        "config": {
            "size": size,
            "dims": list(dims),
            "depths": list(depths),
            "d_state": config.d_state,
            "dtype": "float32",
            "threads_per_rank": threads,
            "repeats": repeats,
        },
        "single_process": {
            name: {"median_s": t["median_s"], "min_s": t["min_s"]}
            for name, t in single_times.items()
        },
        "rows": rows,
    }


def table(report: dict[str, Any]) -> list[list[object]]:
    """Rows ``[P, columns, rank, wall ms, sent KiB by kind, received KiB, exchanges,
    max |diff|]``."""
    out: list[list[object]] = []
    for row in report["rows"]:
        for r in row["per_rank"]:
            out.append(
                [
                    row["ranks"] if r["rank"] == 0 else "",
                    row["columns"] if r["rank"] == 0 else "",
                    r["rank"],
                    f"{1e3 * r['wall_s']:.0f}",
                    ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(r["sent"].items())) or "-",
                    f"{sum(r['received'].values()) / 1024:.0f}",
                    sum(r["calls"].values()),
                    f"{row['max_abs_diff_vs_single']:.1e}" if r["rank"] == 0 else "",
                ]
            )
    return out


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan bench parallel``."""
    parser = sub.add_parser(
        "parallel",
        help="band-parallel VM-UNet inference on 1, 2, 4 CPU processes: bytes and wall time",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan bench parallel --out out/bench/parallel.json",
    )
    parser.add_argument("--size", type=int, default=256, help="image side")
    ints = int_list(1)
    parser.add_argument(
        "--dims", type=ints, default=(32, 64, 128, 256), help="VM-UNet stage channels"
    )
    parser.add_argument("--depths", type=ints, default=(1, 1, 1, 1), help="VSS blocks per stage")
    parser.add_argument("--ranks", type=ints, default=(1, 2, 4), help="process counts to run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", default="out/bench/parallel.json")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    report = run(
        size=args.size,
        dims=args.dims,
        depths=args.depths,
        ranks=args.ranks,
        repeats=args.repeats,
        threads=args.threads,
    )
    headers = [
        "P",
        "columns",
        "rank",
        "wall ms",
        "sent KiB",
        "recv KiB",
        "exchanges",
        "max |diff|",
    ]
    print(tabulate(table(report), headers=headers, tablefmt="github"))
    for name, t in report["single_process"].items():
        print(f"single process, {name}: {1e3 * t['median_s']:.0f} ms")
    m = report["machine"]
    print(f"machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']}")
    write_json(args.out, report)
    print(f"wrote {args.out}")
