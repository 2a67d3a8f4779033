"""Triton kernels compiled for GPU architectures on a machine without a GPU
(:mod:`kscan.kernels.triton_compile`, ``kscan bench triton-build``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

pytest.importorskip("triton")

from kscan.kernels import routes_triton, scan_triton  # noqa: E402
from kscan.kernels.triton_compile import (  # noqa: E402
    KernelVariant,
    compile_unavailable_reason,
    compile_variant,
    resident_warps,
)


@pytest.mark.parametrize(
    "registers, shared, warps, arch, expected",
    [
        (255, 1024, 4, 90, 8),  # 8192 registers per warp: 2 blocks of 4 warps
        (32, 0, 8, 90, 64),  # the 64-warp limit
        (32, 100 * 1024, 4, 90, 8),  # shared memory: 228 KB / 101 KB = 2 blocks
        (32, 100 * 1024, 4, 80, 4),  # 164 KB / 101 KB = 1 block
        (16, 0, 1, 90, 32),  # the 32-block limit
    ],
)
def test_resident_warps_applies_the_occupancy_limits(registers, shared, warps, arch, expected):
    assert resident_warps(registers, shared, warps, arch) == expected


def test_every_kernel_has_variants_with_names_of_its_arguments():
    variants = scan_triton.gpu_variants() + routes_triton.gpu_variants()
    names = {v.name for v in variants}
    assert {"scan_fwd", "grad_maps", "grad_passing", "chunk_grads", "cross_scan"} <= names
    for variant in variants:
        assert set(variant.constexprs) <= set(variant.kernel.arg_names), variant.name


def test_kernels_decorated_for_the_interpreter_are_refused_with_the_reason():
    variant = scan_triton.gpu_variants()[0]
    if not scan_triton._INTERPRETED:
        pytest.skip("the kernels were decorated for compilation in this process")
    reason = compile_unavailable_reason(variant)
    assert reason is not None and "interpreter" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_variant(variant, 90, scan_triton.torch.float32)


def test_an_unknown_constexpr_is_named():
    variant = scan_triton.gpu_variants()[0]
    bad = replace(variant, constexprs={**variant.constexprs, "NOT_AN_ARG": 1})
    with pytest.raises(ValueError, match="NOT_AN_ARG"):
        compile_variant(bad, 90, scan_triton.torch.float32)


def test_variant_config_names_tiles_and_warps():
    variant = KernelVariant("k", None, {"HAS_D": True, "BLOCK_D": 4, "N_PAD": 16}, 8)
    assert variant.config == "BLOCK_D=4 N_PAD=16 warps=8"


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_each_has_a_spill_free_config(tmp_path):
    """Every GPU configuration through Triton and ptxas to an sm_90 cubin (bfloat16 activations:
    the casting code too), in a process without ``TRITON_INTERPRET``; the autotuner always has a
    configuration that spills no registers."""
    out = tmp_path / "build.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "kscan.pipelines.bench_triton_build", "--archs", "90"]
    command += ["--dtypes", "bfloat16", "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["failures"] == []
    builds = report["builds"]
    expected = scan_triton.gpu_variants() + routes_triton.gpu_variants()
    assert len(builds) == len(expected)
    for name in {b["name"] for b in builds}:
        mine = [b for b in builds if b["name"] == name]
        assert all(0 < b["registers"] <= 255 for b in mine), name
        assert any(b["stack_bytes"] == 0 for b in mine), name
    assert "0 failed" in result.stdout
