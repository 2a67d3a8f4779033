"""``kscan bench parallel`` at a tiny size: both column modes run, equal the single process and
report their bytes."""

import pytest

from kscan.pipelines.bench_parallel import run, table


@pytest.mark.slow
def test_both_column_modes_are_measured_side_by_side(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    report = run(size=64, dims=(8, 16, 32, 64), ranks=(1, 2), repeats=1)
    assert [(r["ranks"], r["columns"]) for r in report["rows"]] == [
        (1, "bands"),
        (2, "bands"),
        (2, "auto"),
    ]
    assert all(r["max_abs_diff_vs_single"] < 1e-4 for r in report["rows"])
    bands, auto = report["rows"][1]["per_rank"], report["rows"][2]["per_rank"]
    for banded, chosen in zip(bands, auto, strict=True):
        assert "transpose" not in banded["sent"] and chosen["sent"]["transpose"] > 0
        assert chosen["sent"]["summaries"] < banded["sent"]["summaries"]
        assert sum(chosen["sent"].values()) < sum(banded["sent"].values())
    assert len(table(report)) == 1 + 2 + 2
