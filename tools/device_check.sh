#!/usr/bin/env bash
# The GPU checks of the selective scan, as one call on a lent CUDA machine (the device tool's `run`,
# from the repository root; see docs/kernels.md): the kernel tests compiled on the GPU (the `gpu`
# tests add full sizes), then `kscan bench scan-gpu` (Triton against mamba-ssm when its extension
# imports, bandwidth, fused cross-scan). Nothing can be fetched on that machine, so kscan is
# installed without dependencies into the image's python3, which already holds torch, Triton,
# numpy and tabulate. Output goes to $OUT (default out/device); the table is printed last.
# Not yet run on a GPU; the timeouts below keep one call under the device tool's 10 minutes.
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
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels >"$OUT/pytest_kernels.txt" 2>&1
echo "pytest tests/kernels: exit $? ($(tail -n 1 "$OUT/pytest_kernels.txt"))"
timeout 330 python3 -m kscan.pipelines.bench_scan_gpu --repeats 20 --out "$OUT/scan_gpu.json" \
    2>&1 | tee "$OUT/scan_gpu.txt"
