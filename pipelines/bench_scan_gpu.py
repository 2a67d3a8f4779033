"""``kscan bench scan-gpu``: the selective scan on a CUDA GPU, kscan's Triton kernels beside
mamba-ssm's CUDA kernel, and the fused cross-scan beside the gather.

Shapes: the selective scan as VM-UNet's SS2D block calls it (4 directions, ``B, C`` grouped by
direction ``(batch, 4, N, L)``, ``D`` and ``delta_bias``, softplus, no gate):

- ``stage 1``: the stage-1 training shape, batch 32 x 4 directions x 192 channels = 24,576
  rows, L 4096 (a 64 x 64 map), N 16;
- ``stage 4``: batch 64 x 4 x 768 = 196,608 rows, L 64 (8 x 8), N 16.

In float32 and bfloat16 (``u, delta, B, C`` and the upstream gradient in that dtype; ``A, D,
delta_bias`` in float32, as mamba-ssm takes them). Candidates: ``triton`` (kscan's default on
CUDA), ``mamba_ssm`` (when its compiled extension imports; never installed by kscan) and ``torch``
(kscan's chunked backend, for scale). Rows: the forward under ``torch.no_grad`` and
forward+backward (``torch.autograd.grad`` of every input for an upstream gradient made outside the
timing). Times are medians of CUDA-event timings, the candidates interleaved round by round
(:func:`kscan.pipelines.timing.compare_times`).

Bandwidth: the fewest bytes a call must move through device memory, each input read once and each
output written once (:func:`scan_bytes`: the forward reads ``u, delta, B, C`` and writes ``y``;
the backward also reads the upstream gradient and writes ``du, ddelta, dB, dC``; ``A, D`` and the
bias are negligible), over the time, as a fraction of the copy bandwidth measured in the same run
(a device-to-device copy of ``COPY_BYTES``, counting bytes read plus bytes written). Target:
``triton`` within 1.5x of ``mamba_ssm``'s time in every row.

Fused cross-scan / cross-merge (:mod:`kscan.kernels.routes_triton`) against the gather
(``backend="torch"``) on the stage-1 map ``(32, 192, 64, 64)`` with VM-UNet's four raster routes:
``cross_scan`` and ``cross_merge`` forwards, in the input dtype.

Before timing, each candidate's ``y`` (and, in the forward+backward rows, every gradient) is
compared with the ``torch`` backend run in float64 on the same inputs: ``relative_error`` holds
``|out - ref| / |ref|`` per output, and the table the largest.

Without a CUDA device nothing is timed: the report says why (``measured: false``).
``--interpret`` runs every row at tiny sizes on the CPU under ``TRITON_INTERPRET=1`` (set before
Triton is imported), so that the tests go through the whole benchmark; its times mean nothing.
The module runs as ``python -m kscan.pipelines.bench_scan_gpu`` too, without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate

from kscan.kernels import routes
from kscan.kernels.scan import resolve_backend
from kscan.kernels.scan_mamba_ssm import mamba_ssm_available
from kscan.pipelines.atomic import write_json
from kscan.pipelines.cli_args import dtype_list
from kscan.pipelines.machine import machine_info
from kscan.pipelines.timing import compare_times

TARGET_RATIO = 1.5
"""``triton``'s time over ``mamba_ssm``'s that the issue allows."""

COPY_BYTES = 2 << 30
"""Size of the device-to-device copy that measures the copy bandwidth (bytes read)."""

VMUNET_ROUTES = ("rows", "cols", "rows_reversed", "cols_reversed")


@dataclass(frozen=True)
class ScanShape:
    """``batch`` images, ``groups`` scan directions of ``channels`` channels each (``D = groups *
    channels`` rows per image), sequences of ``length``, state size ``state``."""

    name: str
    batch: int
    groups: int
    channels: int
    length: int
    state: int = 16

    @property
    def rows(self) -> int:
        return self.batch * self.groups * self.channels


SHAPES = (ScanShape("stage 1", 32, 4, 192, 4096), ScanShape("stage 4", 64, 4, 768, 64))
TINY_SHAPES = (ScanShape("tiny", 1, 2, 4, 64, 4), ScanShape("tiny short", 2, 2, 8, 16, 4))
MAP = (32, 192, 64, 64)
TINY_MAP = (1, 4, 8, 8)


def scan_bytes(shape: ScanShape, dtype: torch.dtype, backward: bool) -> int:
    """Fewest bytes one call moves through device memory (module docstring)."""
    size = torch.empty((), dtype=dtype).element_size()
    sequence = shape.rows * shape.length * size  # u, delta, y, the upstream gradient, du, ddelta
    bc = shape.batch * shape.groups * shape.state * shape.length * size  # B, C, dB, dC
    forward = 3 * sequence + 2 * bc
    return forward + (5 * sequence + 4 * bc if backward else 0)


def make_scan_inputs(
    shape: ScanShape, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Random inputs of one shape, in mamba-ssm's initialisation ranges, requiring gradients."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d = shape.groups * shape.channels

    def rand(*size: int, low: float = 0.0, high: float = 1.0, normal: bool = False) -> torch.Tensor:
        if normal:
            x = torch.randn(*size, generator=gen, device=device)
        else:
            x = torch.empty(*size, device=device).uniform_(low, high, generator=gen)
        return x

    x = {
        "u": rand(shape.batch, d, shape.length, normal=True).to(dtype),
        "delta": rand(shape.batch, d, shape.length, low=-4.0, high=-1.0).to(dtype),
        "A": -rand(d, shape.state, low=1.0, high=float(shape.state)),
        "B": rand(shape.batch, shape.groups, shape.state, shape.length, normal=True).to(dtype),
        "C": rand(shape.batch, shape.groups, shape.state, shape.length, normal=True).to(dtype),
        "D": rand(d, normal=True),
        "delta_bias": rand(d, low=-4.0, high=-2.0),
    }
    return {k: v.requires_grad_() for k, v in x.items()} | {"delta_softplus": True}


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(generator=None)
    dst = torch.empty_like(src)
    times = compare_times({"copy": lambda: dst.copy_(src)}, repeats, 2, device)
    return 2 * nbytes / times["copy"]["median_s"]


def scan_candidates(device: torch.device) -> tuple[dict[str, Callable[..., Any]], list[str]]:
    """``{name: scan function}`` of the candidates that can run here, and notes for the others."""
    found = {"triton": resolve_backend(device, "triton")[1]}
    notes = []
    if device.type == "cuda" and mamba_ssm_available():
        found["mamba_ssm"] = resolve_backend(device, "mamba_ssm")[1]
    else:
        notes.append(
            "mamba_ssm: not measured, its compiled extension does not import here (mamba-ssm "
            "builds it only with MAMBA_KEEP_CUDA_BUILD=TRUE from current sources)"
        )
    found["torch"] = resolve_backend(device, "torch")[1]
    return found, notes


def relative_errors(
    fn: Callable[..., Any], x: dict[str, Any], grad: torch.Tensor | None
) -> dict[str, float]:
    """``|out - ref| / |ref|`` (Frobenius norms) of ``y`` and, when ``grad`` is given, of every
    input's gradient, against the ``torch`` backend on float64 copies of the same inputs."""
    reference = resolve_backend(x["u"].device, "torch")[1]
    tensors = {k: v for k, v in x.items() if isinstance(v, torch.Tensor)}
    wide = {k: v.detach().double().requires_grad_() for k, v in tensors.items()}
    flags = {k: v for k, v in x.items() if k not in tensors}

    def outputs(f: Callable[..., Any], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(grad is not None):
            y = f(**inputs, **flags)
            if grad is None:
                return {"y": y}
            grads = torch.autograd.grad(y, list(inputs.values()), grad.to(y.dtype))
            return {"y": y} | {f"d{k}": g for k, g in zip(inputs, grads, strict=True)}

    ref = outputs(reference, wide)
    out = outputs(fn, tensors)
    return {k: ((out[k].double() - ref[k]).norm() / ref[k].norm()).item() for k in ref}


def _scan_row(
    shape: ScanShape,
    dtype: torch.dtype,
    backward: bool,
    fns: Mapping[str, Callable[..., Any]],
    device: torch.device,
    repeats: int,
    bandwidth: float,
) -> dict[str, Any]:
    x = make_scan_inputs(shape, dtype, device)
    leaves = [v for v in x.values() if isinstance(v, torch.Tensor)]
    grad = torch.randn(shape.batch, shape.groups * shape.channels, shape.length, device=device).to(
        dtype
    )

    def call(fn: Callable[..., Any]) -> Callable[[], object]:
        if backward:
            return lambda: torch.autograd.grad(fn(**x), leaves, grad)

        def forward() -> object:
            with torch.no_grad():
                return fn(**x)

        return forward

    errors = {k: relative_errors(f, x, grad if backward else None) for k, f in fns.items()}
    times = compare_times({k: call(f) for k, f in fns.items()}, repeats, 2, device)
    nbytes = scan_bytes(shape, dtype, backward)
    ratio = (
        times["triton"]["median_s"] / times["mamba_ssm"]["median_s"]
        if "mamba_ssm" in times
        else None
    )
    return {
        "name": f"{'forward+backward' if backward else 'forward'}, {shape.name}",
        "shape": {"rows": shape.rows, "length": shape.length, "state": shape.state}
        | {"batch": shape.batch, "groups": shape.groups},
        "dtype": str(dtype).removeprefix("torch."),
        "times": times,
        "relative_error": errors,
        "bytes": nbytes,
        "bandwidth_fraction": {k: nbytes / t["median_s"] / bandwidth for k, t in times.items()},
        "triton_over_mamba_ssm": ratio,
        "met": None if ratio is None else ratio <= TARGET_RATIO,
    }


def _routes_row(
    size: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, repeats: int
) -> dict[str, Any]:
    """Fused (``triton``) against gathered (``torch``) cross-scan and cross-merge forwards."""
    batch, channels, height, width = size
    x = torch.randn(*size, device=device).to(dtype)
    y = torch.randn(batch, len(VMUNET_ROUTES), channels, height * width, device=device).to(dtype)
    calls = {
        f"{op} {backend}": (
            (lambda b=backend: routes.cross_scan(x, VMUNET_ROUTES, backend=b))
            if op == "scan"
            else (lambda b=backend: routes.cross_merge(y, VMUNET_ROUTES, height, width, b))
        )
        for op in ("scan", "merge")
        for backend in ("triton", "torch")
    }
    with torch.no_grad():
        times = compare_times(calls, repeats, 2, device)
    nbytes = (1 + len(VMUNET_ROUTES)) * x.numel() * x.element_size()  # read one, write K (scan)
    return {
        "name": f"cross-scan / cross-merge {batch}x{channels}x{height}x{width}",
        "dtype": str(dtype).removeprefix("torch."),
        "times": times,
        "bytes": nbytes,
        "fused_speedup": {
            op: times[f"{op} torch"]["median_s"] / times[f"{op} triton"]["median_s"]
            for op in ("scan", "merge")
        },
    }


def run(
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    repeats: int = 20,
    interpret: bool = False,
) -> dict[str, Any]:
    """Every row on the CUDA device (or, with ``interpret``, tiny rows on the CPU under Triton's
    interpreter); a report with ``measured: false`` and the reason when neither can run."""
    if not interpret and not torch.cuda.is_available():
        return {
            "machine": machine_info(torch.device("cpu")),
            "interpreted": False,
            "measured": False,
            "reason": "no CUDA device (torch.cuda.is_available() is False)",
        }
    device = torch.device("cpu" if interpret else "cuda")
    report: dict[str, Any] = {"machine": machine_info(device), "interpreted": interpret}
    fns, notes = scan_candidates(device)
    shapes, size, nbytes = (
        (TINY_SHAPES, TINY_MAP, 1 << 20) if interpret else (SHAPES, MAP, COPY_BYTES)
    )
    bandwidth = copy_bandwidth(device, nbytes, repeats)
    rows = [
        _scan_row(shape, dtype, backward, fns, device, repeats, bandwidth)
        for dtype in dtypes
        for shape in shapes
        for backward in (False, True)
    ]
    return report | {
        "measured": True,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "notes": notes,
        "scan": rows,
        "routes": [_routes_row(size, dtype, device, repeats) for dtype in dtypes],
    }


def table(report: dict[str, Any]) -> list[list[object]]:
    """Rows ``[benchmark, dtype, candidate, median ms, fraction of copy bandwidth, largest
    relative error, note]`` (the note: triton / mamba_ssm, or the fused routes' speed-up)."""
    rows: list[list[object]] = []
    for row in report["scan"]:
        for i, (name, t) in enumerate(row["times"].items()):
            ratio = row["triton_over_mamba_ssm"]
            rows.append(
                [
                    row["name"] if i == 0 else "",
                    row["dtype"] if i == 0 else "",
                    name,
                    f"{1e3 * t['median_s']:.3f}",
                    f"{row['bandwidth_fraction'][name]:.2f}",
                    f"{max(row['relative_error'][name].values()):.1e}",
                    "" if i or ratio is None else f"{ratio:.2f} (target <= {TARGET_RATIO:g})",
                ]
            )
    for row in report["routes"]:
        for i, (name, t) in enumerate(row["times"].items()):
            op = name.split()[0]
            speedup = row["fused_speedup"][op] if name.endswith("triton") else None
            rows.append(
                [
                    row["name"] if i == 0 else "",
                    row["dtype"] if i == 0 else "",
                    name,
                    f"{1e3 * t['median_s']:.3f}",
                    "",
                    "",
                    f"fused: {speedup:.2f}x the gather's speed" if speedup is not None else "",
                ]
            )
    return rows


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan bench scan-gpu``."""
    parser = sub.add_parser(
        "scan-gpu",
        help="the selective scan's Triton kernels against mamba-ssm on a CUDA GPU",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan bench scan-gpu --out out/bench/scan_gpu.json",
    )
    _arguments(parser)
    parser.set_defaults(func=_main)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtypes",
        type=dtype_list({"float32": torch.float32, "bfloat16": torch.bfloat16}),
        default=(torch.float32, torch.bfloat16),
        help="comma-separated, of float32 and bfloat16 (default: both)",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="tiny sizes on the CPU under TRITON_INTERPRET=1 (for tests; the times mean nothing)",
    )
    parser.add_argument("--out", default="out/bench/scan_gpu.json")


def _main(args: argparse.Namespace) -> None:
    if args.interpret:  # read when kscan's Triton kernels are first imported, after this
        os.environ["TRITON_INTERPRET"] = "1"
    report = run(args.dtypes, args.repeats, args.interpret)
    if not report["measured"]:
        print(f"not measured: {report['reason']}")
    else:
        headers = [
            "benchmark",
            "dtype",
            "candidate",
            "median ms",
            "of copy bandwidth",
            "worst rel. error",
            "note",
        ]
        print(tabulate(table(report), headers=headers, tablefmt="github"))
        for note in report["notes"]:
            print(note)
        bandwidth = report["copy_bandwidth_bytes_per_s"] / 1e12
        print(f"copy bandwidth: {bandwidth:.2f} TB/s (bytes read + written)")
        if report["interpreted"]:
            print("interpreted on the CPU: these times say nothing about a GPU")
    m = report["machine"]
    print(f"machine: {m.get('device_name', m['device'])}, torch {m['torch']}")
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__)
    _arguments(_parser)
    _main(_parser.parse_args())
