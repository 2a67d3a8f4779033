"""The built wheel installs everything under the kscan namespace and nothing generic at top level."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("kscan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"kscan", next(t for t in top if t.endswith(".dist-info"))}
    for sub in ("physics", "kernels", "models", "pipelines"):
        assert f"kscan/{sub}/__init__.py" in names
    assert "kscan/physics/sense.py" in names
    assert "kscan/pipelines/cli.py" in names
    assert not any(n.startswith("tests/") or n.startswith("workflows/") for n in names)
