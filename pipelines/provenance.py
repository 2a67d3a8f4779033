"""Provenance of every output: what made it, from what, with which parameters.

A record is a plain JSON-serialisable dict::

    {"kscan_version": "0.1.0", "command": "kscan reconstruct ...", "created": "2026-...Z",
     "model": "cg_sense", "checkpoint_sha256": null, "parameters": {...},
     "inputs": [{"path": "file1000001.h5", "sha256": "..."}]}

It is written as a JSON sidecar beside NIfTI/HDF5 outputs (``volume.nii.gz`` ->
``volume.json``) and into DICOM tags by the DICOM writers. Inputs are identified by file name and
content hash, never by patient identifiers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import kscan
from kscan.pipelines.atomic import write_json

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def provenance_record(
    model: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    checkpoint: str | os.PathLike[str] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """A provenance record; ``command`` defaults to this process's command line."""
    return {
        "kscan_version": kscan.__version__,
        "command": command
        if command is not None
        else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint is not None else None,
        "parameters": dict(parameters or {}),
        "inputs": [{"path": Path(p).name, "sha256": sha256_file(p)} for p in inputs],
    }


def sidecar_path(output: str | os.PathLike[str]) -> Path:
    """``out/vol.nii.gz`` -> ``out/vol.json``; ``out/dicom_dir`` -> ``out/dicom_dir.json``."""
    path = Path(output)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".h5", ".hdf5", ".mrd", ".dcm"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".json")


def write_sidecar(output: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Atomically write ``record`` as the JSON sidecar of ``output``; returns the sidecar's path."""
    path = sidecar_path(output)
    write_json(path, dict(record))
    return path
