"""SliceDataset over folders of fastMRI files: listing, filtering, sampling, items, DataLoader."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kscan.errors import ConfigError, FileFormatError
from kscan.pipelines.io.fastmri import FastMRIMetadata, write_fastmri
from kscan.pipelines.io.slice_dataset import SliceDataset

SLICES = {"file_a.h5": 3, "file_b.h5": 5, "file_c.h5": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fastmri")
    rng = np.random.default_rng(7)
    for name, slices in SLICES.items():
        shape = (slices, 3, 16, 12)
        kspace = rng.normal(size=shape) + 1j * rng.normal(size=shape)
        write_fastmri(root / name, kspace, rng.random((slices, 8, 8)), acquisition="AXT2")
    (root / "notes.txt").write_text("ignored: not *.h5")
    return root


def test_lists_every_slice_in_file_order(folder: Path) -> None:
    dataset = SliceDataset(folder)
    assert len(dataset) == sum(SLICES.values())
    assert [(p.name, i) for p, i in dataset.examples] == [
        (n, i) for n, s in SLICES.items() for i in range(s)
    ]
    item = dataset[4]  # file_b, slice 1
    assert item["fname"] == "file_b.h5" and item["slice_num"] == 1
    with h5py.File(folder / "file_b.h5", "r") as f:
        np.testing.assert_array_equal(item["kspace"].numpy(), f["kspace"][1])
        np.testing.assert_array_equal(item["target"].numpy(), f["reconstruction_rss"][1])
        assert item["metadata"]["max"] == f.attrs["max"]
    meta = item["metadata"]
    assert meta["encoding_size"] == (16, 12, 1) and meta["recon_size"] == (8, 8, 1)
    assert (meta["padding_left"], meta["padding_right"]) == (0, 12) and meta[
        "acquisition"
    ] == "AXT2"
    assert None not in meta.values() and "patient_id" not in meta


def test_single_file_and_list_of_files(folder: Path) -> None:
    assert len(SliceDataset(folder / "file_c.h5")) == 2
    dataset = SliceDataset([folder / "file_c.h5", folder / "file_a.h5"])
    assert [p.name for p, _ in dataset.examples] == ["file_c.h5"] * 2 + ["file_a.h5"] * 3


def test_slice_filter_gets_name_index_and_metadata(folder: Path) -> None:
    seen = []

    def keep_middle(name: str, index: int, metadata: FastMRIMetadata) -> bool:
        seen.append((name, index, type(metadata)))
        return 0 < index < metadata.num_slices - 1

    dataset = SliceDataset(folder, slice_filter=keep_middle)
    assert [(p.name, i) for p, i in dataset.examples] == [
        ("file_a.h5", 1),
        ("file_b.h5", 1),
        ("file_b.h5", 2),
        ("file_b.h5", 3),
    ]
    assert len(seen) == sum(SLICES.values()) and {t for *_, t in seen} == {FastMRIMetadata}


def test_sample_rates_are_seeded_subsets(folder: Path) -> None:
    full = SliceDataset(folder).examples
    half = SliceDataset(folder, sample_rate=0.5, seed=3).examples
    assert len(half) == round(len(full) * 0.5) and set(half) <= set(full)
    assert half == sorted(half, key=full.index)  # file order kept
    assert SliceDataset(folder, sample_rate=0.5, seed=3).examples == half
    assert any(SliceDataset(folder, sample_rate=0.5, seed=s).examples != half for s in range(4, 10))
    volumes = SliceDataset(folder, volume_sample_rate=0.67, seed=1)
    names = {p.name for p, _ in volumes.examples}
    assert len(names) == 2 and len(volumes) == sum(SLICES[n] for n in names)


def test_transform_and_dataloader_workers(folder: Path) -> None:
    def transform(item: dict) -> dict:
        return {
            "image_energy": item["kspace"].abs().square().sum(),
            "slice_num": item["slice_num"],
            "fname": item["fname"],
        }

    dataset = SliceDataset(folder, transform=transform)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(b["slice_num"]) for b in batches) == len(dataset)
    energy = torch.cat([b["image_energy"] for b in batches])
    with h5py.File(folder / "file_a.h5", "r") as f:
        expected = (np.abs(f["kspace"][2]) ** 2).sum()
    assert energy[2].item() == pytest.approx(float(expected), rel=1e-5)

    raw = DataLoader(SliceDataset(folder / "file_b.h5"), batch_size=2)
    batch = next(iter(raw))
    assert batch["kspace"].shape == (2, 3, 16, 12) and batch["kspace"].dtype == torch.complex64
    assert batch["metadata"]["padding_right"].tolist() == [12, 12]


def test_configuration_errors(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="challenge"):
        SliceDataset(folder, challenge="knee")
    with pytest.raises(ConfigError, match="not both"):
        SliceDataset(folder, sample_rate=0.5, volume_sample_rate=0.5)
    with pytest.raises(ConfigError, match=r"sample_rate: expected a fraction in \(0, 1\], got 1.5"):
        SliceDataset(folder, sample_rate=1.5)
    with pytest.raises(FileFormatError, match="no \\*.h5 files"):
        SliceDataset(tmp_path)
    with pytest.raises(ConfigError, match="non-empty list"):
        SliceDataset([])
    with pytest.raises(FileFormatError, match=r"file_a\.h5: 'kspace' has shape .*single-coil"):
        SliceDataset(folder, challenge="singlecoil")
