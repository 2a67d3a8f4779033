"""Calgary-Campinas files: interleaved real/imaginary coils, uncentered k-space, errors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kscan.errors import FileFormatError
from kscan.physics.fft import ifft2c
from kscan.pipelines.io.calgary import CalgaryFile, interleaved_to_complex

RNG = np.random.default_rng(11)


def _write_calgary(path: Path, kspace: np.ndarray) -> Path:
    """Store complex ``(slices, coils, H, W)`` in the CC layout, element by element per coil."""
    slices, coils, height, width = kspace.shape
    data = np.empty((slices, height, width, 2 * coils), np.float32)
    for c in range(coils):
        data[..., 2 * c] = kspace[:, c].real
        data[..., 2 * c + 1] = kspace[:, c].imag
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=data)
    return path


def test_reads_interleaved_coils(tmp_path: Path) -> None:
    kspace = (RNG.normal(size=(4, 3, 10, 8)) + 1j * RNG.normal(size=(4, 3, 10, 8))).astype(
        np.complex64
    )
    path = _write_calgary(tmp_path / "e1.h5", kspace)
    with CalgaryFile(path) as f:
        assert f.num_slices == 4
        assert f.metadata.as_dict() == {
            "num_slices": 4,
            "num_coils": 3,
            "matrix_size": (10, 8),
            "centered": False,
            "multicoil": True,
        }
        sample = f.read_slice(2)
        assert sample["kspace"].dtype == torch.complex64 and sample["kspace"].shape == (3, 10, 8)
        np.testing.assert_array_equal(sample["kspace"].numpy(), kspace[2])
        np.testing.assert_array_equal(f.read_volume()["kspace"].numpy(), kspace)


def test_interleaving_matches_direct_indexing() -> None:
    data = RNG.normal(size=(5, 6, 8))  # float64 input is accepted too
    complex_data = interleaved_to_complex(data)
    direct = data[..., ::2] + 1j * data[..., 1::2]  # DIRECT's conversion, then coils first
    np.testing.assert_allclose(complex_data, direct.transpose(2, 0, 1).astype(np.complex64))


def test_kspace_is_uncentered(tmp_path: Path) -> None:
    image = np.zeros((2, 16, 12), np.complex128)
    image[:, 3:9, 2:7] = RNG.normal(size=(2, 6, 5)) + 1j
    kspace = np.fft.fft2(image, norm="ortho")[None]  # plain FFT: DC at index 0
    path = _write_calgary(tmp_path / "e2.h5", kspace)
    with CalgaryFile(path) as f:
        assert not f.metadata.centered
        k = f.read_slice(0)["kspace"]
    np.testing.assert_allclose(ifft2c(k, centered=f.metadata.centered).numpy(), image, atol=1e-5)
    assert not np.allclose(ifft2c(k, centered=True).numpy(), image, atol=1e-2)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((2, 4, 4, 6), np.complex64), "expected float32 .* fastMRI layout"),
        (np.zeros((2, 4, 4, 5), np.float32), "even last axis"),
        (np.zeros((4, 4, 6), np.float32), r"shape \(4, 4, 6\)"),
    ],
)
def test_layout_errors(tmp_path: Path, data: np.ndarray, message: str) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=data)
    with pytest.raises(FileFormatError, match=rf"bad\.h5: .*{message}"):
        CalgaryFile(path)


def test_file_errors(tmp_path: Path) -> None:
    path = _write_calgary(tmp_path / "e3.h5", np.ones((2, 2, 4, 4), np.complex64))
    with (
        CalgaryFile(path) as f,
        pytest.raises(FileFormatError, match=r"e3\.h5: slice 2 out of range"),
    ):
        f.read_slice(2)
    truncated = tmp_path / "half.h5"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FileFormatError, match=r"half\.h5: not a readable HDF5 file"):
        CalgaryFile(truncated)
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(FileFormatError, match=r"empty\.h5: no 'kspace' dataset; found \[\]"):
        CalgaryFile(empty)
    with pytest.raises(FileFormatError, match="not found"):
        CalgaryFile(tmp_path / "absent.h5")
