"""``kscan bench io``: slice-read throughput of the readers and the memory of reading one slice.

- fastMRI HDF5 (default 8 slices of 15-coil 640 x 368 complex64 k-space with its 320 x 320 RSS
  target, random data): slices per second through :meth:`FastMRIFile.read_slice` with the file
  kept open, and through ``SliceDataset[i]``, which opens, reads and closes the file per item.
- DICOM (default 32 slices of 320 x 320, written by :func:`write_mr_series`): slices per second of
  :func:`read_series` reading the whole series.
- Peak memory of ``read_slice`` on an already open file, measured in a fresh Python process so that
  no earlier allocation hides it: the tracemalloc peak (Python and numpy allocations) and the
  growth of the resident set, which also sees HDF5's own buffers (Linux: the kernel's peak mark
  VmHWM, reset just before the read, minus the resident set before it; elsewhere the
  ``ru_maxrss`` delta). The larger of the two over the bytes of the returned slice is the ratio;
  target: under 3.

The files are written to a temporary folder just before they are read, so the reads come from the
operating system's page cache, not from the disk; nothing drops the cache (that would need root
and would slow down everyone else on the machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tabulate import tabulate

from kscan.errors import ConfigError
from kscan.pipelines.atomic import write_json
from kscan.pipelines.cli_args import add_seed, int_pair
from kscan.pipelines.io.dicom import read_series
from kscan.pipelines.io.dicom_write import write_mr_series
from kscan.pipelines.io.fastmri import FastMRIFile, write_fastmri
from kscan.pipelines.io.slice_dataset import SliceDataset
from kscan.pipelines.machine import machine_info
from kscan.pipelines.memory import peak_rss
from kscan.pipelines.synthetic import rss_target
from kscan.pipelines.timing import compare_times

MEMORY_TARGET = 3.0
"""Peak memory of reading one slice, in multiples of the slice's own bytes, must stay below this."""

PAGE_CACHE_NOTE = (
    "reads come from the OS page cache (files written just before; caches not dropped)"
)

_MIB = 2**20


def recon_size(size: tuple[int, int]) -> tuple[int, int]:
    """fastMRI's square recon grid for a k-space ``(H, W)`` with 2x readout oversampling:
    side ``min(H // 2, W)``, so 640 x 368 -> 320 x 320."""
    side = min(size[0] // 2, size[1])
    return side, side


def write_fastmri_volume(
    path: Path, slices: int, coils: int, size: tuple[int, int], seed: int
) -> Path:
    """A fastMRI multi-coil file of random complex64 k-space ``(slices, coils, H, W)`` with its
    RSS target on :func:`recon_size` (uncompressed, so random data reads like real data)."""
    rng = np.random.default_rng(seed)
    height, width = size
    kspace = rng.standard_normal((slices, coils, height, 2 * width), dtype=np.float32)
    kspace = kspace.view(np.complex64)
    return write_fastmri(path, kspace, rss_target(kspace, recon_size(size)))


def write_dicom_series(folder: Path, slices: int, size: tuple[int, int], seed: int) -> Path:
    """A derived MR series of ``slices`` random ``size`` images, 0.5 x 0.5 x 3 mm voxels."""
    volume = np.random.default_rng(seed).random((slices, *size), dtype=np.float32) * 1000
    write_mr_series(folder, volume, np.diag([0.5, 0.5, 3.0, 1.0]))
    return folder


def _sample_bytes(sample: dict[str, Any]) -> int:
    """Bytes of the tensors in a slice sample (k-space, target, ...)."""
    return sum(v.nbytes for v in sample.values() if isinstance(v, torch.Tensor))


def _read_all(read: Callable[[int], Any], count: int) -> None:
    for index in range(count):
        read(index)


def _throughput_row(
    name: str, access: str, slices: int, slice_bytes: int, times: dict[str, float]
) -> dict[str, Any]:
    seconds = times["median_s"]
    return {
        "reader": name,
        "access": access,
        "slices_per_pass": slices,
        "slice_bytes": slice_bytes,
        "slices_per_s": slices / seconds,
        "mib_per_s": slices * slice_bytes / seconds / _MIB,
        "times": times,
    }


def bench_fastmri_reads(path: Path, repeats: int) -> list[dict[str, Any]]:
    """Slices per second reading every slice of ``path``: open file vs ``SliceDataset`` items."""
    dataset = SliceDataset(path)
    with FastMRIFile(path) as volume:
        count = volume.num_slices
        slice_bytes = _sample_bytes(volume.read_slice(0))
        times = compare_times(
            {
                "read_slice": lambda: _read_all(volume.read_slice, count),
                "dataset": lambda: _read_all(dataset.__getitem__, count),
            },
            repeats=repeats,
            warmup=1,
        )
    return [
        _throughput_row(
            "FastMRIFile.read_slice", "file kept open", count, slice_bytes, times["read_slice"]
        ),
        _throughput_row(
            "SliceDataset[i]", "open/read/close per item", count, slice_bytes, times["dataset"]
        ),
    ]


def bench_dicom_reads(folder: Path, repeats: int) -> dict[str, Any]:
    """Slices per second of :func:`read_series` reading the whole series in ``folder``."""
    volume = read_series(folder)
    slices = volume.array.shape[-1]
    times = compare_times({"read_series": lambda: read_series(folder)}, repeats=repeats, warmup=1)
    return _throughput_row(
        "dicom.read_series",
        "whole series (headers, sort, pixels)",
        slices,
        volume.array.nbytes // slices,
        times["read_series"],
    )


def measure_slice_read_memory(path: str | Path, index: int = 0) -> dict[str, Any]:
    """Peak memory of ``FastMRIFile(path).read_slice(index)``; run it in a fresh process.

    The file is opened (header parsed) before measuring. Returns the sample's bytes, the
    tracemalloc peak during the read (Python and numpy allocations) and the resident-set growth
    (all allocations, HDF5's included): on Linux the peak mark is reset just before the read and
    the growth is ``VmHWM(after) - VmRSS(before)``; elsewhere it is the ``ru_maxrss`` delta, a
    lower bound (an earlier, higher peak such as the imports' hides the read's).
    """
    with FastMRIFile(path) as volume:
        gc.collect()
        with peak_rss() as rss:
            tracemalloc.start()
            sample = volume.read_slice(index)
            traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    return {
        "slice_bytes": _sample_bytes(sample),
        "tracemalloc_peak_bytes": traced_peak,
        "rss_growth_bytes": rss.peak_bytes - rss.before_bytes,
        "rss_method": rss.method,
    }


_CHILD = (
    "import json, sys\n"
    "from kscan.pipelines.bench_io import measure_slice_read_memory\n"
    "print(json.dumps(measure_slice_read_memory(sys.argv[1], int(sys.argv[2]))))\n"
)


def slice_read_memory(path: Path, index: int = 0) -> dict[str, Any]:
    """:func:`measure_slice_read_memory` in a fresh Python process, with the ratio and the target."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(index)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed in its subprocess:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = max(result["tracemalloc_peak_bytes"], result["rss_growth_bytes"])
    ratio = peak / result["slice_bytes"]
    result.update(
        peak_bytes=peak,
        ratio=ratio,
        target=f"ratio < {MEMORY_TARGET:g}",
        met=ratio < MEMORY_TARGET,
    )
    return result


def _check_positive(values: dict[str, int | tuple[int, ...]]) -> None:
    """Every option in ``values`` (an int or a pair of ints) must be positive."""
    for name, value in values.items():
        if min(value if isinstance(value, tuple) else (value,)) < 1:
            raise ConfigError(f"{name}: expected positive integers, got {value}")


def run(
    slices: int = 8,
    coils: int = 15,
    size: tuple[int, int] = (640, 368),
    dicom_slices: int = 32,
    dicom_size: tuple[int, int] = (320, 320),
    repeats: int = 10,
    tmp_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the test files into a temporary folder (inside ``tmp_dir`` if given, removed after),
    time the readers and measure the memory; a JSON-serialisable report."""
    size, dicom_size = tuple(size), tuple(dicom_size)
    _check_positive(
        {
            "--slices": slices,
            "--coils": coils,
            "--size": size,
            "--dicom-slices": dicom_slices,
            "--dicom-size": dicom_size,
            "--repeats": repeats,
        }
    )
    if size[0] < 2:
        raise ConfigError(f"--size: expected H >= 2 (the recon grid is H // 2), got {size[0]}")
    if tmp_dir is not None and not Path(tmp_dir).is_dir():
        raise ConfigError(f"--tmp-dir: {tmp_dir} is not an existing folder")
    with tempfile.TemporaryDirectory(prefix="kscan-bench-io-", dir=tmp_dir) as folder:
        h5 = write_fastmri_volume(Path(folder) / "volume.h5", slices, coils, size, seed)
        series = write_dicom_series(Path(folder) / "series", dicom_slices, dicom_size, seed)
        throughput = [*bench_fastmri_reads(h5, repeats), bench_dicom_reads(series, repeats)]
        memory = slice_read_memory(h5, slices // 2)
    return {
        "machine": machine_info(torch.device("cpu")),
        "parameters": {
            "slices": slices,
            "coils": coils,
            "size": list(size),
            "recon_size": list(recon_size(size)),
            "dicom_slices": dicom_slices,
            "dicom_size": list(dicom_size),
            "repeats": repeats,
            "seed": seed,
        },
        "page_cache": PAGE_CACHE_NOTE,
        "throughput": throughput,
        "memory": memory,
    }


def throughput_table(report: dict[str, Any]) -> list[list[object]]:
    """Rows ``[reader, access, slices/pass, MiB/slice, median ms/pass, slices/s, MiB/s]``."""
    return [
        [
            row["reader"],
            row["access"],
            row["slices_per_pass"],
            f"{row['slice_bytes'] / _MIB:.2f}",
            f"{1e3 * row['times']['median_s']:.1f}",
            f"{row['slices_per_s']:.1f}",
            f"{row['mib_per_s']:.0f}",
        ]
        for row in report["throughput"]
    ]


def memory_table(report: dict[str, Any]) -> list[list[object]]:
    """Rows ``[measure, MiB, x slice, target, met]``; the last row is the judged peak."""
    mem = report["memory"]
    rows: list[list[object]] = [
        [name, f"{mem[key] / _MIB:.2f}", f"{mem[key] / mem['slice_bytes']:.2f}", "", ""]
        for name, key in (
            ("slice returned by read_slice", "slice_bytes"),
            ("tracemalloc peak during the read", "tracemalloc_peak_bytes"),
            ("resident-set growth during the read", "rss_growth_bytes"),
        )
    ]
    rows.append(
        [
            "peak (larger of the two)",
            f"{mem['peak_bytes'] / _MIB:.2f}",
            f"{mem['ratio']:.2f}",
            mem["target"],
            "yes" if mem["met"] else "NO",
        ]
    )
    return rows


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan bench io``."""
    parser = sub.add_parser(
        "io",
        help="slices/s of the fastMRI and DICOM readers, peak memory of one slice read",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan bench io --slices 8 --coils 15 --size 640,368 --out out/bench/io.json",
    )
    parser.add_argument(
        "--slices", type=int, default=8, help="slices of the fastMRI file (default 8)"
    )
    parser.add_argument("--coils", type=int, default=15, help="coils (default 15)")
    parser.add_argument(
        "--size", type=int_pair, default=(640, 368), help="k-space H,W (default 640,368)"
    )
    parser.add_argument(
        "--dicom-slices", type=int, default=32, help="slices of the DICOM series (default 32)"
    )
    parser.add_argument(
        "--dicom-size", type=int_pair, default=(320, 320), help="DICOM rows,cols (default 320,320)"
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed passes over all slices (default 10)"
    )
    parser.add_argument(
        "--out", default="out/bench/io.json", help="JSON report (default %(default)s)"
    )
    parser.add_argument(
        "--tmp-dir",
        default=None,
        help="folder for the temporary test files (default: the system's temporary folder)",
    )
    add_seed(parser, help="seed of the random test data")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    report = run(
        slices=args.slices,
        coils=args.coils,
        size=args.size,
        dicom_slices=args.dicom_slices,
        dicom_size=args.dicom_size,
        repeats=args.repeats,
        tmp_dir=args.tmp_dir,
        seed=args.seed,
    )
    p = report["parameters"]
    print(
        f"fastMRI file: {p['slices']} slices x {p['coils']} coils x {p['size'][0]}x{p['size'][1]} "
        f"complex64 + {p['recon_size'][0]}x{p['recon_size'][1]} RSS target; "
        f"DICOM series: {p['dicom_slices']} slices of {p['dicom_size'][0]}x{p['dicom_size'][1]}; "
        f"median of {p['repeats']} passes"
    )
    print(f"note: {report['page_cache']}")
    headers = [
        "reader",
        "access",
        "slices/pass",
        "MiB/slice",
        "median ms/pass",
        "slices/s",
        "MiB/s",
    ]
    print(tabulate(throughput_table(report), headers=headers, tablefmt="github"))
    print()
    headers = ["memory of one read_slice", "MiB", "x slice", "target", "met"]
    print(tabulate(memory_table(report), headers=headers, tablefmt="github"))
    print(
        "memory: fresh subprocess, file opened before measuring; resident set: "
        + report["memory"]["rss_method"]
    )
    m = report["machine"]
    print(
        f"machine: {m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}, {m['date']}"
    )
    write_json(args.out, report)
    print(f"wrote {args.out}")
