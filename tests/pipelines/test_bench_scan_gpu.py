"""``kscan bench scan-gpu``: the report without a GPU, and every row at tiny sizes under Triton's
interpreter (its structure, its byte counts and the candidates' accuracy; never its times)."""

import importlib.util
import json

import pytest
import torch

from kscan.pipelines import bench_scan_gpu, cli
from kscan.pipelines.bench_scan_gpu import ScanShape, scan_bytes


def test_without_cuda_nothing_is_timed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "scan_gpu.json"
    assert cli.main(["bench", "scan-gpu", "--out", str(out)]) == 0
    assert "not measured: no CUDA device" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["measured"] is False and "CUDA" in report["reason"]
    assert "scan" not in report


def test_bad_dtype_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "scan-gpu", "--dtypes", "float16"])
    assert exit_info.value.code == 2
    assert "expected some of float32, bfloat16, got 'float16'" in capsys.readouterr().err


def test_scan_bytes_counts_each_tensor_once():
    shape = ScanShape("s", batch=2, groups=4, channels=3, length=10, state=5)
    sequence = 2 * 12 * 10 * 2  # bfloat16 (batch, D, L)
    bc = 2 * 4 * 5 * 10 * 2  # bfloat16 (batch, G, N, L)
    assert scan_bytes(shape, torch.bfloat16, backward=False) == 3 * sequence + 2 * bc
    # the backward: the upstream gradient, u, delta, B, C read; du, ddelta, dB, dC written
    assert scan_bytes(shape, torch.bfloat16, backward=True) == 8 * sequence + 6 * bc
    assert scan_bytes(shape, torch.float32, backward=True) == 2 * (8 * sequence + 6 * bc)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_interpreted_rows(tmp_path, capsys):
    out = tmp_path / "scan_gpu.json"
    args = ["bench", "scan-gpu", "--interpret", "--dtypes", "float32", "--repeats", "1"]
    assert cli.main([*args, "--out", str(out)]) == 0
    assert "these times say nothing about a GPU" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["measured"] and report["interpreted"]
    assert any("mamba_ssm: not measured" in note for note in report["notes"])
    shapes = bench_scan_gpu.TINY_SHAPES
    assert [row["name"] for row in report["scan"]] == [
        f"{kind}, {shape.name}" for shape in shapes for kind in ("forward", "forward+backward")
    ]
    bandwidth = report["copy_bandwidth_bytes_per_s"]
    for row, (shape, backward) in zip(
        report["scan"], [(s, b) for s in shapes for b in (False, True)], strict=True
    ):
        assert set(row["times"]) == {"triton", "torch"}
        assert row["triton_over_mamba_ssm"] is None and row["met"] is None
        assert row["bytes"] == scan_bytes(shape, torch.float32, backward)
        for name, t in row["times"].items():
            assert row["bandwidth_fraction"][name] == pytest.approx(
                row["bytes"] / t["median_s"] / bandwidth
            )
            errors = row["relative_error"][name]
            expected = {"y"} | (
                {"du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias"} if backward else set()
            )
            assert set(errors) == expected
            assert max(errors.values()) < 1e-4, (row["name"], name, errors)
    (routes,) = report["routes"]
    assert set(routes["times"]) == {"scan triton", "scan torch", "merge triton", "merge torch"}
    for op in ("scan", "merge"):
        ratio = (
            routes["times"][f"{op} torch"]["median_s"] / routes["times"][f"{op} triton"]["median_s"]
        )
        assert routes["fused_speedup"][op] == pytest.approx(ratio)
