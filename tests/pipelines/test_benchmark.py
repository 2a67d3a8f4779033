"""kscan benchmark on a tiny dataset: outputs, metrics against independent definitions, the cell
cache, resuming after a kill, bad configs, failing models."""

import csv
import json
import re

import h5py
import numpy as np
import pytest
import torch
import yaml
from skimage.metrics import structural_similarity

from kscan.errors import ConfigError
from kscan.models import registry
from kscan.physics.masks import MASK_KINDS, make_mask, seed_from_name
from kscan.pipelines.benchmark import run_benchmark
from kscan.pipelines.benchmark_config import METRICS, load_config
from kscan.pipelines.checkpoint import save_checkpoint
from kscan.pipelines.cli import main
from kscan.pipelines.segment import SegSettings, load_segmenter, segment_volume

TINY_RVN = {
    "learned_sensitivity": False,
    "network": {"num_steps": 1, "recurrent_hidden_channels": 4, "recurrent_num_layers": 1},
}
TINY_VMUNET = {
    "num_classes": 6,
    "dims": [8, 16, 32, 64],
    "depths": [1, 1, 1, 1],
    "depths_decoder": [1, 1, 1, 1],
}
TINY_MULTITASK = {
    "rvn": TINY_RVN,
    "num_classes": 6,
    "head": "unet",
    "head_config": {"channels": [4, 8], "strides": [2]},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_ckpt")
    torch.manual_seed(0)
    return {
        name: save_checkpoint(root / f"{name}.safetensors", name, registry.build_model(name, cfg))
        for name, cfg in (
            ("rvn", TINY_RVN),
            ("vmunet", TINY_VMUNET),
            ("sequential-rvn-seg", TINY_MULTITASK),
        )
    }


def config_dict(data, checkpoints, out, models=None, masks=None):
    return {
        "datasets": {"tiny": str(data)},
        "masks": masks
        or [
            {"kind": "equispaced_fraction", "accelerations": [4], "center_fraction": 0.08},
            {"kind": "random", "accelerations": [8], "center_fraction": 0.04},
        ],
        "models": models
        or [
            {"name": "zf", "kind": "classical", "method": "zf", "params": {"maps": "none"}},
            {"name": "RVN", "kind": "reconstruction", "model": "rvn",
             "checkpoint": str(checkpoints["rvn"])},
            {"name": "VM-UNet on target", "kind": "segmentation", "model": "vmunet",
             "checkpoint": str(checkpoints["vmunet"]), "on": "target"},
            {"name": "VM-UNet on RVN", "kind": "segmentation", "model": "vmunet",
             "checkpoint": str(checkpoints["vmunet"]), "on": "RVN"},
            {"name": "sequential", "kind": "multitask", "model": "sequential-rvn-seg",
             "checkpoint": str(checkpoints["sequential-rvn-seg"])},
            {"name": "broken", "kind": "reconstruction", "model": "rvn",
             "checkpoint": str(out.parent / "missing.safetensors")},
        ],
        "metrics": ["ssim", "psnr", "nmse", "dice", "hd95"],
        "batch_size": 2,
        "output_dir": str(out),
    }  # fmt: skip


def write_config(path, values):
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def bench(train_volumes, checkpoints, tmp_path_factory):
    """One run of the full grid, then an unchanged rerun (with the summaries of both)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    path = write_config(root / "bench.yaml", config_dict(train_volumes, checkpoints, out))
    assert main(["benchmark", str(path), "--quiet"]) == 0
    first = json.loads((out / "benchmark.json").read_text())
    first_csv = (out / "results.csv").read_text()
    cache_times = {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}
    assert main(["benchmark", str(path), "--quiet"]) == 0
    second = json.loads((out / "benchmark.json").read_text())
    torch.set_num_threads(threads)
    return {
        "out": out,
        "config": path,
        "first": first,
        "second": second,
        "first_csv": first_csv,
        "cache_times": cache_times,
    }


def cell_rows(rows, model, mask):
    return [r for r in rows if r["model"] == model and r["mask"] == mask]


@pytest.mark.slow
def test_outputs_exist_and_html_is_self_contained(bench):
    out = bench["out"]
    for name in ("results.csv", "results.md", "index.html", "benchmark.json"):
        assert (out / name).is_file()
    assert (out / "plots" / "tiny_ssim.png").is_file()
    assert (out / "plots" / "tiny_dice_mean.png").is_file()
    assert sorted(p.name for p in (out / "examples").iterdir()) == [
        "tiny_equispaced_fraction_4x.png",
        "tiny_random_8x.png",
    ]
    page = (out / "index.html").read_text()
    assert "data:image/png;base64," in page
    assert not re.search(r"(src|href)=\"(?!data:)", page)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("<img") == len(list((out / "plots").iterdir())) + 2
    md = (out / "results.md").read_text()
    assert "| tiny | random | 8x | RVN |" in md


@pytest.mark.slow
def test_rows_per_volume_and_means(bench, train_volumes):
    rows = read_csv(bench["out"] / "results.csv")
    models = ["zf", "RVN", "sequential", "broken", "VM-UNet on target", "VM-UNet on RVN"]
    assert list(dict.fromkeys(r["model"] for r in rows)) == models  # segmentation entries last
    volumes = sorted(p.name for p in train_volumes.glob("*.h5"))
    for model in models:
        for mask in ("equispaced_fraction", "random"):
            cell = cell_rows(rows, model, mask)
            if model == "broken":
                assert [r["volume"] for r in cell] == ["mean"]
                continue
            assert [r["volume"] for r in cell] == [*volumes, "mean"]
            for metric in ("ssim", "psnr", "nmse", "dice_mean", "hd95_mean"):
                if cell[0][metric]:
                    mean = np.mean([float(r[metric]) for r in cell[:-1]])
                    assert float(cell[-1][metric]) == pytest.approx(mean)
            assert cell[-1]["error"] == ""
            assert float(cell[-1]["time_per_slice_s"]) > 0
            assert int(cell[-1]["peak_memory_bytes"]) > 0
    rvn = cell_rows(rows, "RVN", "random")[-1]
    n_params = sum(p.numel() for p in registry.build_model("rvn", TINY_RVN).parameters())
    assert int(rvn["parameters"]) == n_params
    # CPU memory = weights + inputs + the peak of what the first batch allocates
    assert int(rvn["peak_memory_bytes"]) > 4 * n_params
    assert rvn["dice_mean"] == ""  # a reconstruction model has no labels
    seq = cell_rows(rows, "sequential", "random")[-1]
    assert seq["ssim"] and seq["dice_mean"] and seq["dice_lesion"]


@pytest.mark.slow
def test_zero_filled_metrics_match_an_independent_computation(bench, train_volumes):
    """zf with maps none = RSS of the masked k-space; SSIM from skimage, PSNR/NMSE by hand."""
    rows = read_csv(bench["out"] / "results.csv")
    for row in cell_rows(rows, "zf", "random")[:-1]:
        path = train_volumes / row["volume"]
        with h5py.File(path) as f:
            kspace, target = f["kspace"][()], f["reconstruction_rss"][()]
        mask = make_mask(
            "random", kspace.shape[-2:], acceleration=8, center_fraction=0.04,
            seed=seed_from_name(path.name),
        ).mask.numpy()  # fmt: skip
        coils = np.fft.fftshift(
            np.fft.ifft2(np.fft.ifftshift(kspace * mask, axes=(-2, -1)), norm="ortho"),
            axes=(-2, -1),
        )
        rss = np.sqrt((np.abs(coils) ** 2).sum(axis=1))
        top = (rss.shape[-2] - 64) // 2
        image = rss[:, top : top + 64, :].astype(np.float64)
        target = target.astype(np.float64)
        peak = target.max()
        ssim = np.mean(
            [
                structural_similarity(t, p, data_range=peak)
                for t, p in zip(target, image, strict=True)
            ]
        )
        mse = np.mean((target - image) ** 2)
        assert float(row["ssim"]) == pytest.approx(ssim, abs=1e-5)
        assert float(row["psnr"]) == pytest.approx(10 * np.log10(peak**2 / mse), abs=1e-4)
        assert float(row["nmse"]) == pytest.approx(
            np.sum((target - image) ** 2) / np.sum(target**2), rel=1e-5
        )
        assert float(row["achieved_acceleration"]) == pytest.approx(mask.size / mask.sum())


@pytest.mark.slow
def test_dice_of_segmentation_on_target_matches_numpy(bench, train_volumes, checkpoints):
    rows = read_csv(bench["out"] / "results.csv")
    segmenter, _ = load_segmenter("vmunet", checkpoints["vmunet"], "cpu", SegSettings(2))
    names = ["outer_tissue", "inner_tissue_a", "inner_tissue_b", "fluid", "lesion"]
    for row in cell_rows(rows, "VM-UNet on target", "equispaced_fraction")[:-1]:
        with h5py.File(train_volumes / row["volume"]) as f:
            target, truth = f["reconstruction_rss"][()], f["segmentation"][()]
        labels = segment_volume(segmenter, target).labels
        for cls, name in enumerate(names, start=1):
            t, p = truth == cls, labels == cls
            expected = (
                1.0 if not t.any() and not p.any() else 2 * (t & p).sum() / (t.sum() + p.sum())
            )
            assert float(row[f"dice_{name}"]) == pytest.approx(expected, abs=1e-6)
    # the same labels whatever the mask: the target input does not depend on it
    other = cell_rows(rows, "VM-UNet on target", "random")
    assert [r["dice_mean"] for r in other] == [
        r["dice_mean"] for r in cell_rows(rows, "VM-UNet on target", "equispaced_fraction")
    ]


@pytest.mark.slow
def test_failing_model_is_reported_in_its_cells(bench):
    rows = read_csv(bench["out"] / "results.csv")
    for mask in ("equispaced_fraction", "random"):
        (row,) = cell_rows(rows, "broken", mask)
        assert "missing.safetensors: no such checkpoint file" in row["error"]
        assert row["ssim"] == ""
    assert "no such checkpoint file" in (bench["out"] / "results.md").read_text()
    assert bench["first"]["cells_failed"] == 2


@pytest.mark.slow
def test_unchanged_rerun_computes_nothing(bench):
    first, second = bench["first"], bench["second"]
    # 12 cells; "on: target" does not depend on the mask, so its second cell is a cache hit
    assert (first["cells"], first["cells_computed"], first["cells_cached"]) == (12, 11, 1)
    assert (second["cells_computed"], second["cells_cached"]) == (0, 12)
    assert (bench["out"] / "results.csv").read_text() == bench["first_csv"]
    cache = bench["out"] / "cache"
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == bench["cache_times"]


@pytest.mark.slow
def test_resume_after_a_kill(bench, train_volumes, checkpoints, tmp_path, one_thread):
    """A run killed after its first cell resumes with the others; the results are the same."""
    out = tmp_path / "out"
    models = config_dict(train_volumes, checkpoints, out)["models"][:2]
    config = load_config(
        write_config(tmp_path / "b.yaml", config_dict(train_volumes, checkpoints, out, models))
    )

    class Killed(Exception):
        pass

    def kill(record):
        raise Killed

    with pytest.raises(Killed):
        run_benchmark(config, after_cell=kill)
    assert len(list((out / "cache").glob("*.json"))) == 1
    assert not (out / "results.csv").exists()
    resumed = run_benchmark(config)
    assert (resumed.computed, resumed.cached) == (3, 1)
    rows, full = read_csv(out / "results.csv"), read_csv(bench["out"] / "results.csv")
    for model in ("zf", "RVN"):
        for mask in ("equispaced_fraction", "random"):
            got = [r["ssim"] for r in cell_rows(rows, model, mask)]
            assert got == [r["ssim"] for r in cell_rows(full, model, mask)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": [{"name": "x", "kind": "reconstruction", "model": "unet3000"}]},
         "expected one of rvn, varnet"),
        ({"models": [{"name": "x", "kind": "classical", "method": "magic"}]},
         "expected one of zf, sense, cs"),
        ({"models": [{"name": "x", "kind": "fancy"}]},
         "expected one of classical, reconstruction, segmentation, multitask"),
        ({"models": [{"name": "x", "kind": "segmentation", "model": "vmunet", "on": "nothing"}]},
         "expected one of 'target'"),
        ({"models": [{"name": "x", "kind": "classical", "method": "zf", "params": {"lam": 1}}]},
         "zero-filled reconstruction has no weight"),
        ({"metrics": ["ssim", "fid"]}, "expected one of " + ", ".join(METRICS)),
        ({"masks": [{"kind": "spiral", "accelerations": [4]}]},
         "expected one of " + ", ".join(MASK_KINDS)),
        ({"modles": []}, "modles: unknown key in BenchmarkConfig"),
        ({"datasets": {"tiny": "/nonexistent/folder"}}, "is not a folder of .h5 files"),
    ],
)  # fmt: skip
def test_bad_config_fails_before_any_work(
    change, message, train_volumes, checkpoints, tmp_path, capsys
):
    out = tmp_path / "out"
    values = config_dict(train_volumes, checkpoints, out) | change
    path = write_config(tmp_path / "bad.yaml", values)
    assert main(["benchmark", str(path), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_on_is_a_string_key_in_yaml(tmp_path, train_volumes):
    """YAML 1.1 reads ``on`` as true; the benchmark config reads YAML 1.2 booleans."""
    text = (
        f"datasets: {{tiny: {train_volumes}}}\n"
        "masks: [{kind: random, accelerations: [4, 8]}]\n"
        "models:\n"
        "  - {name: zf, kind: classical, method: zf}\n"
        "  - {name: seg, kind: segmentation, model: vmunet, on: zf}\n"
    )
    config = load_config(write_text(tmp_path / "c.yaml", text))
    assert config.models[1].on == "zf"
    assert config.models[1].checkpoint == "shipped"
    assert config.masks[0].accelerations == (4.0, 8.0)
    bad = text + "  - {name: r, kind: reconstruction, model: rvn, params: {lam: 1}}\n"
    with pytest.raises(ConfigError, match=r"models\[2\]\.params: not used by reconstruction"):
        load_config(write_text(tmp_path / "d.yaml", bad))


def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return path
