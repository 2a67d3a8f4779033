"""The Snakemake workflow (workflows/): lint, dry runs, schema checks, a tiny real run, the report."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kscan.pipelines.cli import main
from kscan.pipelines.io.nifti import read_nifti

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows"
SNAKEFILE = WORKFLOW / "Snakefile"
BIN = Path(sys.executable).parent


def snakemake(workdir, config, *args, timeout=600):
    """Run snakemake on the workflow with ``config`` (a dict written as YAML) in ``workdir``."""
    (workdir / "test.yaml").write_text(yaml.safe_dump(config))
    path = os.environ["PATH"]
    # the kscan on PATH, else this interpreter's
    env = {**os.environ, "PATH": path if shutil.which("kscan") else f"{BIN}{os.pathsep}{path}"}
    cmd = [str(BIN / "snakemake"), "-s", str(SNAKEFILE), "--configfile", "test.yaml", *args]
    return subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


def job_counts(output):
    """{rule: count} from Snakemake's "Job stats" table."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two simulated volumes as k-space, NIfTI and DICOM, and tiny random checkpoints."""
    root = tmp_path_factory.mktemp("workflow")
    args = ["simulate", str(root / "data"), "--volumes", "2", "--slices", "3"]
    args += ["--kspace-size", "80,64", "--recon-size", "64,64", "--coils", "4", "--quiet"]
    assert main(args) == 0
    spec = importlib.util.spec_from_file_location(
        "tiny_weights", WORKFLOW / "scripts" / "tiny_weights.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_tiny_weights(root / "weights")
    (root / "samples.tsv").write_text("case\tpath\nkspace\th5/sim_000.h5\nscan\tdicom/sim_001\n")
    return root


def base_config(data, **changes):
    config = {
        "input_dir": str(data / "data"),
        "sample_sheet": str(data / "samples.tsv"),
        "undersample": {"masks": ["equispaced_fraction"], "accelerations": [4]},
        "reconstruct": {
            "methods": ["zf", "rvn"],
            "checkpoints": {"rvn": str(data / "weights" / "rvn.safetensors")},
        },
        "segment": {
            "models": ["vmunet"],
            "checkpoints": {"vmunet": str(data / "weights" / "vmunet.safetensors")},
        },
        "evaluate": {"num_classes": 6},
    }
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return config


def test_lint_is_clean(data, tmp_path):
    run = snakemake(tmp_path, base_config(data), "--lint")
    assert run.returncode == 0, run.stderr
    assert "Congratulations, your workflow is in a good condition!" in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {},
            {
                "undersample": 1,
                "reconstruct": 1,
                "reconstruct_learned": 1,
                "segment_recon": 2,
                "evaluate_recon": 2,
            },
        ),
        (
            {
                "sample_sheet": None,
                "input_dir": "h5",
                "reconstruct": {"methods": ["zf", "sense", "cs"]},
                "undersample": {"accelerations": [4, 8], "masks": ["random", "equispaced"]},
            },
            {
                "undersample": 8,
                "reconstruct": 24,
                "segment_recon": 24,
                "evaluate_recon": 24,
                "describe_input": 2,
            },
        ),
        (
            {
                "sample_sheet": None,
                "input_dir": "nifti",
                "segment": {"models": ["vmunet", "mhs-vm"]},
            },
            {"segment_image": 4, "evaluate_image": 4, "describe_input": 2},
        ),
        (
            {"segment": {"models": []}},
            {"reconstruct": 1, "evaluate_recon": 2},
        ),  # metrics without labels
    ],
)
def test_dry_runs(data, tmp_path, changes, expected):
    config = base_config(data, **changes)
    if changes.get("input_dir"):
        config["input_dir"] = str(data / "data" / changes["input_dir"])
    run = snakemake(tmp_path, config, "-n")
    assert run.returncode == 0, run.stderr
    counts = job_counts(run.stdout)
    assert {k: counts.get(k) for k in expected} == expected
    assert not (tmp_path / "results").exists()


def test_slurm_profile_dry_run(data, tmp_path):
    run = snakemake(
        tmp_path,
        base_config(data),
        "-n",
        "--workflow-profile",
        str(WORKFLOW / "profiles" / "slurm"),
    )
    assert run.returncode == 0, run.stderr
    assert "reconstruct_learned" in run.stdout
    assert re.search(r"rule reconstruct_learned:[\s\S]*?resources:[^\n]*gpu=1", run.stdout)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"reconstruct": {"methods": ["zf", "magic"]}}, "methods"),
        ({"undersample": {"accelerations": ["four"]}}, "accelerations"),
        ({"segment": {"batch_size": "big"}}, "batch_size"),
        ({"evaluate": {"typo_key": 1}}, "typo_key"),
        ({"input_dir": "/no/such/folder"}, "input_dir"),
    ],
)
def test_bad_config_rejected_before_any_job(data, tmp_path, changes, key):
    run = snakemake(tmp_path, base_config(data, **changes), "--cores", "1")
    assert run.returncode != 0
    assert key in run.stderr
    assert "Job stats" not in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_tiny_real_run_whole_chain(data, tmp_path):
    run = snakemake(tmp_path, base_config(data), "--cores", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    results = tmp_path / "results"
    for method in ("zf", "rvn"):
        with open(
            results / "kspace" / "metrics" / "equispaced_fraction_4x" / method / "vmunet.csv"
        ) as f:
            header = f.readline().split(",")
        assert {"ssim", "psnr", "nmse", "dice_1"} <= set(header)
    assert (results / "scan" / "segment" / "image" / "vmunet.nii.gz").is_file()  # the DICOM case
    # its DICOM SEG (beside the series in the input folder) became reference labels
    labels = read_nifti(tmp_path / "ingest" / "dicom" / "scan_labels.nii.gz")
    image = read_nifti(tmp_path / "ingest" / "dicom" / "scan.nii.gz")
    assert labels.array.shape == image.array.shape and labels.array.max() > 0
    np.testing.assert_allclose(labels.affine, image.affine, atol=1e-6)
    with open(results / "scan" / "metrics" / "image" / "vmunet.csv") as f:
        assert "dice_1" in f.readline().split(",")
    assert not (results / "kspace" / "undersampled").exists() or not any(
        (results / "kspace" / "undersampled").iterdir()
    )
    assert list((tmp_path / "benchmarks").glob("reconstruct*/**/*.tsv"))
    assert (tmp_path / "logs" / "report.log").is_file()
    page = (results / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "Reconstruction metrics" in page and "<td>kspace</td>" in page
    assert "Segmentation metrics" in page and "<td>scan</td>" in page  # the DICOM case's scores
    assert "Rule timings" in page and "<td>segment_image</td>" in page
    again = snakemake(tmp_path, base_config(data), "--cores", "2")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed: the report was not opened in a browser")
    shot = tmp_path / "report.png"
    view = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            (results / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = [line for line in view.stderr.splitlines() if "CONSOLE" in line]
    assert console == []
    assert shot.stat().st_size > 10_000
