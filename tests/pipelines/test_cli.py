"""The kscan command: help, version, and one-line errors with exit status 2."""

import subprocess
import sys

import pytest

import kscan
from kscan.pipelines import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert kscan.__version__ in capsys.readouterr().out


def test_user_error_is_one_line_exit_2(capsys):
    code = cli.main(["demo", "--size", "4", "--out", "/nonexistent/never.json", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("kscan: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "kscan.pipelines.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "bench" in out.stdout and "demo" in out.stdout
