"""Run a module with mamba-ssm's selective scan available from carried sources (GPU machine only).

Usage: ``python3 tools/mamba_ssm_shim.py SRC MODULE [ARGS...]``, ``SRC`` being the folder that
``tools/mamba_ssm_sources.sh`` fills (``third_party/mamba``), for example
``python3 tools/mamba_ssm_shim.py third_party/mamba kscan.pipelines.bench_scan_gpu --out x.json``.

1. Builds (on a CUDA device; a failed build is reported and the run goes on without it)
   mamba-ssm's ``selective_scan_cuda`` extension from ``SRC/csrc/selective_scan`` with
   ``torch.utils.cpp_extension.load`` (ninja, in ``$TORCH_EXTENSIONS_DIR``), with mamba-ssm's own
   nvcc flags but for this GPU's architecture only: mamba-ssm's ``setup.py`` builds it only with
   ``MAMBA_KEEP_CUDA_BUILD=TRUE``, for seven architectures.
2. Makes ``import mamba_ssm.ops.selective_scan_interface`` work without running
   ``mamba_ssm/__init__.py``, which imports the Mamba-2 and Mamba-3 modules and their further
   dependencies: ``mamba_ssm`` is registered as a bare package whose path is ``SRC/mamba_ssm``.
3. Runs ``MODULE`` as ``__main__`` with ``ARGS``.

Nothing of mamba-ssm is part of kscan; this helper only runs it beside kscan for comparison.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
import types
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
]
"""mamba-ssm's nvcc flags for the extension (its ``setup.py``), less the verbose ones."""


def register_package(src: Path) -> None:
    """``mamba_ssm`` as a package at ``src/mamba_ssm`` whose ``__init__`` does not run."""
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(src / "mamba_ssm")]
    sys.modules["mamba_ssm"] = package


def build_extension(src: Path) -> types.ModuleType:
    """Compile (or load the cached build of) ``selective_scan_cuda`` for this GPU and register it
    under that name."""
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    csrc = src / "csrc" / "selective_scan"
    sources = [str(csrc / "selective_scan.cpp")] + sorted(str(p) for p in csrc.glob("*.cu"))
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    start = time.perf_counter()
    module = load(
        name="selective_scan_cuda",
        sources=sources,
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=[*NVCC_FLAGS, "-gencode", f"arch=compute_{arch},code=sm_{arch}"],
        extra_include_paths=[str(csrc)],
        verbose=False,
    )
    sys.modules["selective_scan_cuda"] = module
    print(
        f"selective_scan_cuda: {len(sources)} sources for sm_{arch} in {time.perf_counter() - start:.0f} s"
    )
    return module


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    src, module = Path(argv[0]).resolve(), argv[1]
    if not torch.cuda.is_available():
        print("selective_scan_cuda: not built (no CUDA device)")
    else:
        try:
            build_extension(src)
            register_package(src)
        except Exception as error:  # a failed build must not cost the rest of the run
            print(f"selective_scan_cuda: build failed, going on without it: {error}"[-2000:])
    sys.argv = [module, *argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
