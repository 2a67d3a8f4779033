"""A torch Dataset over the slices of a folder (or list) of fastMRI HDF5 volumes.

Like fastMRI's ``SliceDataset``: the constructor opens every file once, validates it and computes
its metadata (encoding size, recon size, padding from the ISMRMRD header; attributes), and lists
``(file, slice)`` pairs, optionally filtered and subsampled. ``__getitem__`` opens its file, reads
only the requested slice and closes it again, so no HDF5 handle is shared between DataLoader
worker processes.

An item is a dict::

    kspace           (coils, H, W) complex     coils = 1 for single-coil files
    mask             (W,) or (H, W) bool       test-style files
    target           (rH, rW) float32          when the file has the challenge's target
    segmentation     (h, w) uint8              when present
    sensitivity_map  (coils, H, W) complex     when present
    fname            str                       the file name (fastMRI's ``fname``)
    slice_num        int
    metadata         dict                      FastMRIMetadata.as_dict() (no None values)

or whatever ``transform(item)`` returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kscan.errors import ConfigError, FileFormatError
from kscan.pipelines.io.fastmri import CHALLENGES, FastMRIFile, FastMRIMetadata

SliceFilter = Callable[[str, int, FastMRIMetadata], bool]
PathLike = str | os.PathLike[str]


def list_volume_files(root_or_files: PathLike | Sequence[PathLike]) -> list[Path]:
    """The sorted ``*.h5`` files of a folder, a single file, or a given list of files (kept in order)."""
    if isinstance(root_or_files, str | os.PathLike):
        root = Path(root_or_files)
        if root.is_dir():
            files = sorted(root.glob("*.h5"))
            if not files:
                raise FileFormatError(f"{root}: no *.h5 files in this folder")
            return files
        return [root]
    files = [Path(p) for p in root_or_files]
    if not files:
        raise ConfigError(
            "root_or_files: expected a folder, a file or a non-empty list of files, got []"
        )
    return files


def _check_rate(name: str, rate: float | None) -> None:
    if rate is not None and not 0.0 < rate <= 1.0:
        raise ConfigError(f"{name}: expected a fraction in (0, 1], got {rate}")


def _choose(count: int, rate: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(count * rate)`` items drawn without replacement (fastMRI's rounding)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=round(count * rate), replace=False))


class SliceDataset(Dataset):
    """The slices of fastMRI volumes as a torch Dataset (see the module docstring for the items).

    Args:
        root_or_files: a folder (its ``*.h5`` files, sorted), one file, or a list of files.
        challenge: "multicoil" or "singlecoil"; every file must have the matching layout, and the
            target is ``reconstruction_rss`` or ``reconstruction_esc`` accordingly.
        transform: applied to each item dict.
        slice_filter: ``slice_filter(file_name, slice_index, metadata) -> bool`` keeps a slice.
        sample_rate: keep this fraction of the (filtered) slices, drawn with ``seed``.
        volume_sample_rate: keep this fraction of the volumes instead (not both rates).
        seed: seed of the subsampling draw (the order of the kept slices is unchanged).
    """

    def __init__(
        self,
        root_or_files: PathLike | Sequence[PathLike],
        challenge: str = "multicoil",
        transform: Callable[[dict[str, Any]], Any] | None = None,
        slice_filter: SliceFilter | None = None,
        sample_rate: float | None = None,
        volume_sample_rate: float | None = None,
        seed: int = 0,
    ) -> None:
        if challenge not in CHALLENGES:
            raise ConfigError(f"challenge: expected one of {CHALLENGES}, got {challenge!r}")
        if sample_rate is not None and volume_sample_rate is not None:
            raise ConfigError("sample_rate, volume_sample_rate: set one of them, not both")
        _check_rate("sample_rate", sample_rate)
        _check_rate("volume_sample_rate", volume_sample_rate)
        self.challenge = challenge
        self.transform = transform
        files = list_volume_files(root_or_files)
        if volume_sample_rate is not None:
            files = [files[i] for i in _choose(len(files), volume_sample_rate, seed)]
        self.metadata: dict[Path, FastMRIMetadata] = {}
        for path in files:
            with FastMRIFile(path, challenge) as volume:
                self.metadata[path] = volume.metadata
        self.examples: list[tuple[Path, int]] = [
            (path, index)
            for path, meta in self.metadata.items()
            for index in range(meta.num_slices)
            if slice_filter is None or slice_filter(path.name, index, meta)
        ]
        if sample_rate is not None:
            self.examples = [
                self.examples[i] for i in _choose(len(self.examples), sample_rate, seed)
            ]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Any:
        path, slice_num = self.examples[index]
        with FastMRIFile(path, self.challenge) as volume:
            item: dict[str, Any] = volume.read_slice(slice_num)
        item.update(fname=path.name, slice_num=slice_num, metadata=self.metadata[path].as_dict())
        return item if self.transform is None else self.transform(item)
