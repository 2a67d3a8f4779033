"""Input/output pairs of the batch commands: one file to one file, or a folder to a folder.

``kscan undersample in.h5 out.h5`` writes one file; ``kscan undersample in_dir out_dir`` writes
``out_dir/<stem><suffix>`` for every ``*.h5`` in ``in_dir``. An output path that names a folder
(it exists as one, or it has no suffix) receives ``<stem><suffix>`` for a single input too.
"""

from __future__ import annotations

import os
from pathlib import Path

from kscan.errors import FileFormatError
from kscan.pipelines.io.slice_dataset import list_volume_files


def volume_stem(path: Path) -> str:
    """``file1000001.h5`` -> ``file1000001``; ``vol.nii.gz`` -> ``vol``."""
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem


def output_pairs(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], suffix: str
) -> list[tuple[Path, Path]]:
    """``[(input file, output path)]`` for every ``*.h5`` volume of ``src`` (a file or a folder)."""
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.exists():
        raise FileFormatError(f"{src_path}: no such file or folder")
    inputs = list_volume_files(src_path)
    to_folder = src_path.is_dir() or dst_path.is_dir() or not dst_path.suffix
    if not to_folder:
        return [(inputs[0], dst_path)]
    return [(p, dst_path / f"{volume_stem(p)}{suffix}") for p in inputs]
