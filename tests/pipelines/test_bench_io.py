"""``kscan bench io`` at tiny sizes: the report's structure and consistency (never its times)."""

import json

import pytest

from kscan.pipelines import bench_io, cli

TINY = [
    "bench",
    "io",
    "--slices",
    "2",
    "--coils",
    "3",
    "--size",
    "32,24",
    "--dicom-slices",
    "3",
    "--dicom-size",
    "16,12",
    "--repeats",
    "1",
]


def test_bench_io_tiny_report(tmp_path, capsys):
    out = tmp_path / "bench" / "io.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert cli.main([*TINY, "--out", str(out), "--tmp-dir", str(scratch)]) == 0
    printed = capsys.readouterr().out
    assert "page cache" in printed and "slices/s" in printed and f"wrote {out}" in printed
    assert list(scratch.iterdir()) == []  # the temporary files are removed

    report = json.loads(out.read_text())
    assert set(report) == {"machine", "parameters", "page_cache", "throughput", "memory"}
    assert report["parameters"]["recon_size"] == [16, 16]
    # Bytes of one returned slice, from the shapes: k-space (coils, H, W) complex64 and the
    # (16, 16) float32 RSS target; the DICOM reader returns float32 (rows, cols) per slice.
    fastmri_slice = 3 * 32 * 24 * 8 + 16 * 16 * 4
    expected = {
        "FastMRIFile.read_slice": (2, fastmri_slice),
        "SliceDataset[i]": (2, fastmri_slice),
        "dicom.read_series": (3, 16 * 12 * 4),
    }
    rows = {row["reader"]: row for row in report["throughput"]}
    assert set(rows) == set(expected)
    for reader, (slices, slice_bytes) in expected.items():
        row = rows[reader]
        assert (row["slices_per_pass"], row["slice_bytes"]) == (slices, slice_bytes)
        assert row["times"]["repeats"] == 1
        assert row["slices_per_s"] > 0
        assert row["slices_per_s"] == pytest.approx(slices / row["times"]["median_s"])
        assert row["mib_per_s"] == pytest.approx(row["slices_per_s"] * slice_bytes / 2**20)

    memory = report["memory"]
    assert memory["slice_bytes"] == fastmri_slice
    # The read allocates at least the returned arrays, and tracemalloc sees numpy's allocations.
    assert memory["tracemalloc_peak_bytes"] >= fastmri_slice
    assert memory["rss_growth_bytes"] >= 0
    peak = max(memory["tracemalloc_peak_bytes"], memory["rss_growth_bytes"])
    assert memory["peak_bytes"] == peak
    assert memory["ratio"] == pytest.approx(peak / fastmri_slice)
    assert memory["met"] == (memory["ratio"] < bench_io.MEMORY_TARGET)


def test_recon_size_is_fastmris():
    assert bench_io.recon_size((640, 368)) == (320, 320)
    assert bench_io.recon_size((640, 320)) == (320, 320)
    assert bench_io.recon_size((32, 12)) == (12, 12)


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--slices", "0", "--slices"),
        ("--size", "32,0", "--size"),
        ("--repeats", "-1", "--repeats"),
        ("--tmp-dir", "/nonexistent/kscan-scratch", "/nonexistent/kscan-scratch"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, option, value, named):
    out = tmp_path / "io.json"
    assert cli.main([*TINY, option, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kscan: error: ") and err.count("\n") == 1 and named in err
    assert not out.exists()
