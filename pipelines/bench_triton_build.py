"""``kscan bench triton-build``: every Triton kernel configuration kscan can launch on a GPU,
compiled for GPU architectures on this machine (no GPU needed), with the compiler's resource use.

Kernels: the selective scan's (:func:`kscan.kernels.scan_triton.gpu_variants`: the sequential
forward for each autotuned ``BLOCK_D`` and warp count, the chunk-parallel forward's three kernels
and the backward for each warp count; N = 16, every option on) and the fused cross-scan/merge's
(:func:`kscan.kernels.routes_triton.gpu_variants`). Each is compiled by Triton and ``ptxas`` down
to the cubin for every architecture (default 90 = H100/H200, 80 = A100) and activation dtype
(default float32 and bfloat16); see :mod:`kscan.kernels.triton_compile`.

Columns: registers per thread (255 at most), stack bytes per thread (where ptxas spills registers:
above 0 means spills, which turn register traffic into memory traffic), shared memory per block,
and resident warps per SM (theoretical occupancy out of 64, from those three). A configuration
that fails to compile is listed with the compiler's error, and the command then exits 1.

These are compile-time facts, not timings: on a GPU the autotuner picks among the configurations
by time (``kscan bench scan-gpu``).

Run in a process where ``TRITON_INTERPRET`` is unset: kernels decorated for the interpreter cannot
be compiled. The module runs as ``python -m kscan.pipelines.bench_triton_build`` too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import torch
from tabulate import tabulate

from kscan.kernels.triton_compile import (
    KernelVariant,
    compile_unavailable_reason,
    compile_variant,
)
from kscan.pipelines.atomic import write_json
from kscan.pipelines.cli_args import dtype_list, int_list
from kscan.pipelines.machine import machine_info

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(
    archs: tuple[int, ...], dtypes: tuple[torch.dtype, ...], kernels: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Compile every variant (those named in ``kernels``, or all) for every arch and dtype.

    Returns ``{"machine", "triton", "builds": [...], "failures": [...]}``: a build holds the
    :class:`~kscan.kernels.triton_compile.KernelBuild` fields, a failure the variant, arch, dtype
    and the compiler's error."""
    import triton

    variants = _variants()
    if kernels is not None:
        unknown = set(kernels) - {v.name for v in variants}
        if unknown:
            names = ", ".join(sorted({v.name for v in variants}))
            raise ValueError(f"unknown kernels {sorted(unknown)}; kernels: {names}")
        variants = [v for v in variants if v.name in kernels]
    builds, failures = [], []
    for arch in archs:
        for dtype in dtypes:
            for variant in variants:
                try:
                    builds.append(dataclasses.asdict(compile_variant(variant, arch, dtype)))
                except Exception as error:  # reported per configuration; the command exits 1
                    failures.append(
                        {
                            "name": variant.name,
                            "config": variant.config,
                            "arch": arch,
                            "dtype": str(dtype).removeprefix("torch."),
                            "error": f"{type(error).__name__}: {error}".strip(),
                        }
                    )
    return {
        "machine": machine_info(torch.device("cpu")),
        "triton": triton.__version__,
        "builds": builds,
        "failures": failures,
    }


def _variants() -> list[KernelVariant]:
    """Every GPU kernel variant. The kernel modules are imported here, not with the CLI:
    ``kscan bench scan-gpu --interpret`` sets ``TRITON_INTERPRET`` before their first import."""
    from kscan.kernels import routes_triton, scan_triton

    return scan_triton.gpu_variants() + routes_triton.gpu_variants()


def table(report: dict[str, Any]) -> list[list[object]]:
    """Rows ``[kernel, config, arch, dtype, registers, stack bytes, shared bytes, warps/SM]``."""
    return [
        [
            b["name"],
            b["config"],
            f"sm_{b['arch']}",
            b["dtype"],
            b["registers"],
            b["stack_bytes"],
            b["shared_bytes"],
            b["resident_warps"],
        ]
        for b in report["builds"]
    ]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan bench triton-build``."""
    parser = sub.add_parser(
        "triton-build",
        help="compile every Triton kernel configuration for GPU architectures (no GPU needed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan bench triton-build --archs 90,80 --out out/bench/triton_build.json",
    )
    _arguments(parser)
    parser.set_defaults(func=_main)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--archs", type=int_list(70), default=(90, 80), help="compute capabilities (default: 90,80)"
    )
    parser.add_argument(
        "--dtypes",
        type=dtype_list(_DTYPES),
        default=(torch.float32, torch.bfloat16),
        help=f"activation dtypes, of {', '.join(_DTYPES)} (default: float32,bfloat16)",
    )
    parser.add_argument(
        "--kernels", type=lambda t: tuple(t.split(",")), help="only these kernels (default: all)"
    )
    parser.add_argument("--out", default="out/bench/triton_build.json")


def _main(args: argparse.Namespace) -> None:
    variants = _variants()
    reason = compile_unavailable_reason(variants[0] if variants else None)
    if reason is not None:
        sys.exit(f"kscan bench triton-build: {reason}")
    try:
        report = run(args.archs, args.dtypes, args.kernels)
    except ValueError as error:
        sys.exit(f"kscan bench triton-build: {error}")
    headers = ["kernel", "config", "arch", "dtype", "registers", "stack B", "shared B", "warps/SM"]
    print(tabulate(table(report), headers=headers, tablefmt="github"))
    spilling = sum(b["stack_bytes"] > 0 for b in report["builds"])
    print(
        f"{len(report['builds'])} configurations compiled with triton {report['triton']}, "
        f"{spilling} with a stack frame (register spills), {len(report['failures'])} failed"
    )
    for failure in report["failures"]:
        print(f"FAILED {failure['name']} {failure['config']} sm_{failure['arch']} "
              f"{failure['dtype']}: {failure['error'].splitlines()[0]}")  # fmt: skip
    write_json(args.out, report)
    print(f"wrote {args.out}")
    if report["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__)
    _arguments(_parser)
    _main(_parser.parse_args())
