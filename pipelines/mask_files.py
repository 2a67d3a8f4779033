"""Reading precomputed sampling masks from files (``.npy`` or the ``mask`` dataset of HDF5)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from kscan.errors import FileFormatError
from kscan.physics.masks import Mask, mask_from_array


def read_mask(path: str | os.PathLike, shape: tuple[int, int]) -> Mask:
    """The mask stored in ``path`` for k-space whose last two dimensions are ``shape = (H, W)``."""
    return mask_from_array(_read_mask_file(Path(path)), shape, name=str(path))


def _read_mask_file(path: Path) -> np.ndarray:
    """The array stored in a ``.npy`` file or in the ``mask`` dataset of an HDF5 file."""
    if not path.is_file():
        raise FileFormatError(f"{path}: mask file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise FileFormatError(f"{path}: not a readable .npy array ({err})") from err
    if suffix in (".h5", ".hdf5"):
        with h5py.File(path, "r") as f:
            if "mask" not in f:
                raise FileFormatError(f"{path}: no 'mask' dataset; found {sorted(f.keys())}")
            return f["mask"][()]
    raise FileFormatError(
        f"{path}: expected a .npy or .h5 mask file, got {suffix or 'no extension'}"
    )
