"""Fixtures of the training tests: a tiny simulated dataset and single-threaded torch."""

import pytest
import torch

from kscan.pipelines.simulate import simulate_dataset


@pytest.fixture(scope="session")
def train_volumes(tmp_path_factory):
    """2 volumes x 2 slices of 4-coil k-space 80x64 with 64x64 targets (folder of .h5 files)."""
    root = tmp_path_factory.mktemp("train_data")
    simulate_dataset(
        root,
        volumes=2,
        slices=2,
        shape_kspace=(80, 64),
        recon_size=(64, 64),
        coils=4,
        formats=["h5"],
        quiet=True,
    )
    return root / "h5"


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and the CPU is shared by other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
