"""``kscan bench scan`` at tiny sizes: the report's structure and consistency (never its times)."""

import json

import pytest
import torch

from kscan.kernels import scan_torch
from kscan.kernels.scan_torch import selective_scan_torch
from kscan.pipelines import bench_scan, cli
from kscan.pipelines.memory import peak_tensor_bytes

TINY = [
    "bench",
    "scan",
    "--batch",
    "1",
    "--channels",
    "4",
    "--state",
    "2",
    "--length",
    "64",
    "--vmunet-channels",
    "8",
    "--repeats",
    "1",
]


def test_bench_scan_tiny_report(tmp_path, capsys):
    out = tmp_path / "bench" / "scan.json"
    assert cli.main([*TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "forward+backward" in printed and f"wrote {out}" in printed

    report = json.loads(out.read_text())
    assert set(report) == {"machine", "speed", "memory"}
    assert len(report["speed"]) == 4
    # targets on every row but the one timed with the calls back to back
    assert [set(row["target_speedup"]) for row in report["speed"]] == [
        {"reference", "mambapy"},
        {"reference", "mambapy"},
        set(),
        {"reference", "mambapy"},
    ]
    assert "back to back" in report["speed"][2]["name"]
    backend = bench_scan.default_backend()[0]
    for row in report["speed"]:
        assert row["backend"] == backend
        assert {backend, "torch", "reference"} <= set(row["times"])
        assert set(row["speedup_over"]) == set(row["times"]) - {backend}
        assert set(row["met"]) == set(row["speedup_over"]) & set(row["target_speedup"])
        for peer, speedup in row["speedup_over"].items():
            ratio = row["times"][peer]["median_s"] / row["times"][backend]["median_s"]
            assert speedup == pytest.approx(ratio)
        for peer, met in row["met"].items():
            assert met == (row["speedup_over"][peer] >= row["target_speedup"][peer])
    memory = {m["backend"]: m for m in report["memory"]}
    assert set(memory) == {backend, "torch"}
    for m in memory.values():
        assert m["state_tensor_bytes"] == 1 * 4 * 64 * 2 * 4
        assert set(m["results"]) == {"forward", "saved for backward", "backward"}
        for name, r in m["results"].items():
            assert r["extra_bytes"] >= 0, name
            assert r["met"] == (r["extra_fraction_of_state"] <= 1 / 8)
    # what a torch forward keeps: one (batch, D, N) float32 state per chunk start, held in a buffer
    # that also holds the final state (one more)
    chunks = -(-64 // scan_torch.CHUNK)
    saved = memory["torch"]["results"]["saved for backward"]["extra_bytes"]
    assert saved == 1 * 4 * (chunks + 1) * 2 * 4
    if backend == "numba":  # the chunk-start states only
        from kscan.kernels import scan_numba

        chunks = -(-64 // scan_numba.CHUNK)
        saved = memory["numba"]["results"]["saved for backward"]["extra_bytes"]
        assert saved == 1 * 4 * chunks * 2 * 4


def test_peak_memory_meter_counts_what_stays_alive():
    x = list(bench_scan.make_inputs(1, 4, 2, 32).values())
    assert peak_tensor_bytes(lambda: torch.zeros(1000), x) == (4000, 4000)
    assert peak_tensor_bytes(lambda: torch.zeros(1000).sum(), x) == (4004, 4)
    with torch.no_grad():
        _, kept = peak_tensor_bytes(lambda: selective_scan_torch(*x), x)
    assert kept == 1 * 4 * 32 * 4  # y
    _, kept = peak_tensor_bytes(lambda: selective_scan_torch(*x), x)
    # y, and the buffer of the one saved chunk-start state and the final state
    assert kept == 1 * 4 * 32 * 4 + 1 * 4 * 2 * 2 * 4
