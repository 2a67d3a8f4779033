"""``kscan reconstruct|segment --devices cpu,cpu`` against the single-process run of the same
command; the sharding helpers, device parsing and the torchrun path in this process."""

import argparse
import socket

import h5py
import numpy as np
import pytest
import torch

from kscan.errors import ConfigError
from kscan.models import registry
from kscan.pipelines.checkpoint import save_checkpoint
from kscan.pipelines.cli import main
from kscan.pipelines.io.fastmri import write_fastmri
from kscan.pipelines.io.nifti import axial_affine, read_nifti, volume_to_nifti_array, write_nifti
from kscan.pipelines.parallel.data_parallel import (
    Shard,
    batch_owners,
    devices_of,
    parse_devices,
    take_rows,
)
from kscan.pipelines.reconstruct import (
    ReconSettings,
    classical_solve,
    merge_reconstructions,
    reconstruct_file,
)
from kscan.pipelines.segment import SegSettings, load_segmenter, merge_volume_labels, segment_volume
from kscan.pipelines.synthetic import simulate_volume

TINY_RVN = {
    "network": {"num_steps": 2, "recurrent_hidden_channels": 4, "recurrent_num_layers": 1},
    "sensitivity_filters": 4,
    "sensitivity_pools": 2,
}
TINY_VMUNET = {"dims": [8, 16, 32, 64], "depths": [1] * 4, "depths_decoder": [1] * 4}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread here and in the spawned ranks (which inherit the environment)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 undersampled k-space files of 2 slices, one of 5 slices, a tiny RVN and a tiny VM-UNet
    checkpoint, and 2 NIfTI image volumes of 3 slices."""
    root = tmp_path_factory.mktemp("dp")
    for name, slices, seed in (("a", 2, 1), ("b", 2, 2), ("c", 2, 3), ("long", 5, 4)):
        vol = simulate_volume((72, 64), (64, 64), slices=slices, coils=4, snr_db=40, seed=seed)
        folder = "long" if name == "long" else "full"
        write_fastmri(root / folder / f"{name}.h5", vol.kspace, vol.target)
    for folder in ("full", "long"):
        args = ["undersample", str(root / folder), str(root / f"{folder}_4x"), "--quiet"]
        assert main([*args, "--mask", "equispaced_fraction", "--center-fraction", "0.2"]) == 0
    torch.manual_seed(0)
    save_checkpoint(root / "rvn.safetensors", "rvn", registry.build_model("rvn", TINY_RVN))
    torch.manual_seed(0)
    seg = registry.build_model("vmunet", TINY_VMUNET | {"num_classes": 3})
    save_checkpoint(root / "vmunet.safetensors", "vmunet", seg)
    gen = np.random.default_rng(0)
    for name in ("p", "q"):
        image = gen.random((3, 64, 64)).astype(np.float32)
        image[1] = 0  # an all-zero slice: not segmented, not batched
        write_nifti(
            root / "nifti" / f"{name}.nii.gz",
            volume_to_nifti_array(image),
            axial_affine(image.shape, (1.0, 1.0, 2.0)),
        )
    return root


def _h5(path, key="reconstruction"):
    with h5py.File(path) as f:
        return f[key][()]


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


# ---- in this process ------------------------------------------------------------------------


def test_batch_owners_and_take_rows():
    np.testing.assert_array_equal(batch_owners(7, 2, 3), [0, 0, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(batch_owners(3, 4, 2), [0, 0, 0])
    parts = [np.full((4, 2), r, dtype=np.float32) for r in range(2)]
    np.testing.assert_array_equal(take_rows(parts, np.array([1, 0, 0, 1]))[:, 0], [1, 0, 0, 1])
    assert Shard(1, 3).files(list("abcdefg")) == ["b", "e"]
    assert [b for b in range(7) if Shard(2, 3).owns(b)] == [2, 5]


def test_shards_merge_to_the_whole_volume(data):
    """Parts of each rank of 2 (and 3) merged equal the whole computation, for a classical
    solver batched over slices and for a segmentation model."""
    settings = ReconSettings(method="sense", maps="acs", batch_size=2, max_iter=3)
    solve, src = classical_solve(settings), data / "long_4x" / "long.h5"

    def run(shard):
        return reconstruct_file(src, settings, solve, torch.device("cpu"), shard=shard)

    whole = run(Shard())
    for world in (2, 3):
        parts = [run(Shard(r, world)) for r in range(world)]
        assert all(not np.array_equal(p.volume, whole.volume) for p in parts)
        np.testing.assert_array_equal(merge_reconstructions(parts, 2).volume, whole.volume)
    segmenter, _ = load_segmenter(None, data / "vmunet.safetensors", "cpu", SegSettings(1))
    volume = np.random.default_rng(1).random((4, 64, 64)).astype(np.float32)
    volume[2] = 0
    whole_labels = segment_volume(segmenter, volume).labels
    parts = [segment_volume(segmenter, volume, shard=Shard(r, 2)) for r in range(2)]
    np.testing.assert_array_equal(merge_volume_labels(parts, 1).labels, whole_labels)


def _args(devices=None, device="cpu"):
    return argparse.Namespace(devices=devices, device=device)


def test_devices_parsing_and_errors(monkeypatch):
    assert parse_devices("cpu, cpu,cpu") == [torch.device("cpu")] * 3
    for text, expected in (
        ("", "expected a list"),
        ("tpu:0", "unknown device"),
        ("cuda", "with its index"),
        ("cpu,cuda:0", "only CPUs or only GPUs"),
        ("cuda:0,cuda:7", "CUDA devices" if not torch.cuda.is_available() else "cuda:7"),
    ):
        with pytest.raises(ConfigError, match=expected):
            parse_devices(text)
    with pytest.raises(ConfigError, match="give one of them"):
        devices_of(_args("cpu,cpu", "cuda:0"))
    assert devices_of(_args()) == [torch.device("cpu")]
    for var, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "3"),
        ("MASTER_ADDR", "x"),
        ("MASTER_PORT", "1"),
    ):
        monkeypatch.setenv(var, value)
    assert devices_of(_args()) == [torch.device("cpu")] * 3
    with pytest.raises(ConfigError, match="WORLD_SIZE=3"):
        devices_of(_args("cpu,cpu"))


def test_under_torchrun_rank_zero_commits_the_staged_outputs(data, tmp_path, monkeypatch):
    """The torchrun path in this process (WORLD_SIZE 1, gloo): staged outputs renamed into the
    output folder, equal to the single-process ones; no staging folder left."""
    args = ["reconstruct", str(data / "full_4x"), "--method", "zf", "--quiet"]
    assert main([*args[:2], str(tmp_path / "single"), *args[2:]]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main([*args[:2], str(tmp_path / "torchrun"), *args[2:]]) == 0
    assert _files(tmp_path / "torchrun") == ["a.h5", "b.h5", "c.h5"]
    for name in ("a.h5", "b.h5", "c.h5"):
        expected = _h5(tmp_path / "single" / name)
        np.testing.assert_array_equal(_h5(tmp_path / "torchrun" / name), expected)


# ---- spawned ranks (gloo, 2 CPU processes) --------------------------------------------------


@pytest.mark.slow
def test_reconstruct_files_on_two_cpus_equal_one_process(data, tmp_path, capfd):
    base = ["reconstruct", str(data / "full_4x")]
    opts = ["--method", "rvn", "--checkpoint", str(data / "rvn.safetensors"), "--quiet"]
    assert main([*base, str(tmp_path / "one"), *opts]) == 0
    assert main([*base, str(tmp_path / "two"), *opts, "--devices", "cpu,cpu"]) == 0
    assert _files(tmp_path / "two") == ["a.h5", "b.h5", "c.h5"]
    for name in ("a.h5", "b.h5", "c.h5"):
        np.testing.assert_array_equal(_h5(tmp_path / "two" / name), _h5(tmp_path / "one" / name))
    assert f"b.h5: {tmp_path / 'two' / 'b.h5'}\n" in capfd.readouterr().out  # by its final name


@pytest.mark.slow
def test_reconstruct_one_volume_slices_on_two_cpus_equal_one_process(data, tmp_path):
    """5 slices in batches of 2 (CG-SENSE iterates each batch together): batches 0, 2 on rank 0
    and batch 1 on rank 1, gathered and written by rank 0."""
    src = str(data / "long_4x" / "long.h5")
    opts = ["--method", "sense", "--batch-size", "2", "--max-iter", "4", "--quiet"]
    assert main(["reconstruct", src, str(tmp_path / "one.h5"), *opts]) == 0
    two = tmp_path / "two.h5"
    assert main(["reconstruct", src, str(two), *opts, "--devices", "cpu,cpu"]) == 0
    np.testing.assert_array_equal(_h5(two), _h5(tmp_path / "one.h5"))
    assert _files(tmp_path) == ["one.h5", "two.h5"]


@pytest.mark.slow
def test_segment_files_on_two_cpus_equal_one_process(data, tmp_path):
    base = ["segment", str(data / "nifti")]
    opts = ["--checkpoint", str(data / "vmunet.safetensors"), "--batch-size", "1", "--quiet"]
    assert main([*base, str(tmp_path / "one"), *opts]) == 0
    assert main([*base, str(tmp_path / "two"), *opts, "--devices", "cpu,cpu"]) == 0
    assert _files(tmp_path / "two") == ["p.json", "p.nii.gz", "q.json", "q.nii.gz"]
    for name in ("p.nii.gz", "q.nii.gz"):
        one = read_nifti(tmp_path / "one" / name).array
        np.testing.assert_array_equal(read_nifti(tmp_path / "two" / name).array, one)


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_without_outputs(data, tmp_path, capsys):
    """b.h5 (rank 1's file) is corrupt: exit 2, one line naming rank 1 and the file, and none of
    the outputs (rank 0's a.h5 and c.h5 included) appear."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.h5", "c.h5"):
        (src / name).write_bytes((data / "full_4x" / name).read_bytes())
    (src / "b.h5").write_bytes(b"not hdf5 at all")
    out = tmp_path / "out"
    args = ["reconstruct", str(src), str(out), "--method", "zf", "--devices", "cpu,cpu"]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rank 1" in err and "b.h5" in err, err
    assert not out.exists() or _files(out) == []
