"""``kscan report``: tables, images, timings and provenance from a results folder, without Snakemake."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from kscan.errors import FileFormatError
from kscan.pipelines.cli import main
from kscan.pipelines.report import build_report, read_benchmarks, read_metrics, write_report

SETTING = "equispaced_fraction_4x"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results/<case>/... as the workflow lays it out, for two k-space cases and zf."""
    root = tmp_path_factory.mktemp("report")
    data, results = root / "data", root / "results"
    args = ["simulate", str(data), "--volumes", "2", "--slices", "3", "--kspace-size", "80,64"]
    assert main([*args, "--recon-size", "64,64", "--coils", "4", "--formats", "h5", "--quiet"]) == 0
    for case in ("sim_000", "sim_001"):
        source = data / "h5" / f"{case}.h5"
        (results / case).mkdir(parents=True)
        (results / case / "input.json").write_text(json.dumps({"path": str(source)}))
        recon = results / case / "recon" / SETTING / "zf.h5"
        recon_args = ["reconstruct", str(source), str(recon), "--method", "zf"]
        assert main([*recon_args, "--mask", "equispaced_fraction", "--quiet"]) == 0
        metrics = results / case / "metrics" / SETTING / "zf" / "none.csv"
        assert main(["evaluate", str(recon), str(source), "--csv", str(metrics), "--quiet"]) == 0
    bench = root / "benchmarks" / "reconstruct" / "sim_000"
    bench.mkdir(parents=True)
    (bench / "zf.tsv").write_text("s\th:m:s\tmax_rss\n2.5\t0:00:02\t300.0\n")
    (bench / "sense.tsv").write_text("s\th:m:s\tmax_rss\n1.5\t0:00:01\t500.0\n")
    return root


def _csv_ssim(path):
    with open(path, newline="") as f:
        return float(next(csv.DictReader(f))["ssim"])


def test_metrics_and_means(results):
    rows = read_metrics(results / "results")
    assert sorted((r.case, r.mask, r.acceleration, r.method, r.model) for r in rows) == [
        (case, "equispaced_fraction", "4", "zf", "none") for case in ("sim_000", "sim_001")
    ]
    ssims = [
        _csv_ssim(results / "results" / c / "metrics" / SETTING / "zf" / "none.csv")
        for c in ("sim_000", "sim_001")
    ]
    page = build_report(results / "results", results / "benchmarks", title="test report")
    assert f"<td>{ssims[0]:.4f}</td>" in page and f"<td>{ssims[1]:.4f}</td>" in page
    assert f"<td>{np.mean(ssims):.4f}</td>" in page  # the mean row over the two cases
    assert "<title>test report</title>" in page


def test_self_contained_images_timings_provenance(results):
    page = build_report(results / "results", results / "benchmarks")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    # per case: the target, the reconstruction, its error map and the target labels overlay
    assert page.count('src="data:image/png;base64,') == 2 * 4
    timings = read_benchmarks(results / "benchmarks")
    assert (
        timings["reconstruct"].seconds == [1.5, 2.5] and timings["reconstruct"].max_rss_mb == 500.0
    )
    assert (
        "<td>reconstruct</td><td>2</td><td>4.00</td><td>2.00</td><td>2.50</td><td>500.00</td>"
        in page
    )
    assert f"sim_000/recon/{SETTING}/zf.h5" in page  # the reconstruction's provenance record


def test_write_report_is_atomic_and_checks_its_input(results, tmp_path):
    out = write_report(results / "results", tmp_path / "r.html")
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left
    with pytest.raises(FileFormatError, match="no such results folder"):
        build_report(tmp_path / "missing")
