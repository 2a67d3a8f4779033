"""Atomic writes leave either the old file or the complete new one."""

import json

import pytest

from kscan.pipelines.atomic import atomic_path, write_json, write_text


def test_write_then_read(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"ssim": 0.9})
    assert json.loads(target.read_text()) == {"ssim": 0.9}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_failure_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.txt"]


def test_temporary_keeps_suffix(tmp_path):
    with atomic_path(tmp_path / "vol.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        assert tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "vol.nii.gz").read_bytes() == b"x"


def test_written_file_has_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
