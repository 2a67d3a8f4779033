#!/usr/bin/env bash
# The GPU checks of the selective scan, as one call on a lent CUDA machine (the device tool's `run`,
# from the repository root; see docs/kernels.md): `kscan bench scan-gpu` (Triton against mamba-ssm,
# accuracy, bandwidth, fused cross-scan), then the kernel tests compiled on the GPU (the `gpu`
# tests add full sizes). Nothing can be fetched on that machine, so kscan is installed without
# dependencies into the image's python3, which already holds torch, Triton, numpy and tabulate.
# With mamba-ssm's sources in third_party/mamba (tools/mamba_ssm_sources.sh; carry that path),
# its selective_scan_cuda is built there first (tools/mamba_ssm_shim.py) and joins the benchmark.
# Output goes to $OUT (default out/device). Not yet run on a GPU; the timeouts keep one call under
# the device tool's 10 minutes, the benchmark first as it also checks the kernels' results.
set -uo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    | tee "$OUT/gpu.txt"
if ! python3 -m pip install --no-deps --no-build-isolation --no-index -q -e . >"$OUT/pip.txt" 2>&1; then
    # fall back to a link farm that maps the source folders onto the kscan package layout
    site=$(mktemp -d)
    mkdir "$site/kscan"
    ln -s "$PWD"/kscan/* "$site/kscan/"
    for pkg in physics kernels models pipelines; do ln -s "$PWD/$pkg" "$site/kscan/$pkg"; done
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install failed (see $OUT/pip.txt); using PYTHONPATH=$site"
fi
python3 -c "import kscan, torch, triton; print('kscan', kscan.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
bench=(-m kscan.pipelines.bench_scan_gpu)
if [ -d third_party/mamba/csrc/selective_scan ]; then
    bench=(tools/mamba_ssm_shim.py third_party/mamba kscan.pipelines.bench_scan_gpu)
fi
timeout 420 python3 "${bench[@]}" --repeats 20 --out "$OUT/scan_gpu.json" 2>&1 \
    | tee "$OUT/scan_gpu.txt"
# test_triton_compile.py compiles for sm_90 without a GPU: CI runs it, the GPU time is not spent on it
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels \
    --ignore=tests/kernels/test_triton_compile.py >"$OUT/pytest_kernels.txt" 2>&1
echo "pytest tests/kernels: exit $? ($(tail -n 1 "$OUT/pytest_kernels.txt"))"
