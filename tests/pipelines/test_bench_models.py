"""kscan bench models: candidates, in-process measurement, and the command at tiny sizes."""

import importlib.util
import json

import pytest
import torch

from kscan.models import registry
from kscan.pipelines.bench_models import (
    TASKS,
    build_registered,
    measure,
    reconstruction_candidates,
    segmentation_candidates,
    table,
)
from kscan.pipelines.cli import main


def test_candidates_cover_registered_models_and_the_direct_peer() -> None:
    rows = reconstruction_candidates(quick=False)
    models = {c.model for c in rows}
    assert "rvn" in models and ("varnet" in models) == ("varnet" in registry.names())
    rvn = next(c for c in rows if c.model == "rvn")
    network = rvn.config["config"]["network"]
    assert network == {"num_steps": 8, "recurrent_hidden_channels": 64, "recurrent_num_layers": 4}
    assert rvn.shape == {"coils": 8, "height": 256, "width": 256}
    peer = next(c for c in rows if c.label == "DIRECT")
    assert peer.requires == "direct" and peer.peer_of == "kscan"
    assert set(TASKS) >= {"reconstruction", "segmentation", "multitask"}


def test_measure_in_process() -> None:
    candidate = reconstruction_candidates(quick=True)[0]
    result = measure(candidate, repeats=2, warmup=1, threads=1)
    model, (kspace, mask) = build_registered(candidate.config, candidate.shape)
    assert kspace.shape == (1, 4, 32, 32) and mask.shape == (1, 1, 1, 32)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["time"]["repeats"] == 2 and result["time"]["median_s"] > 0
    assert result["peak_rss_bytes"] >= result["rss_before_bytes"] > 0


@pytest.mark.slow
def test_command_quick_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "models.json"
    args = ["bench", "models", "--quick", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["task"] == "reconstruction" and "RSS" in report["memory_method"]
    rows = {(r["model"], r["candidate"]): r for r in report["results"]}
    assert rows[("rvn", "kscan")]["parameters"] > 0
    assert rows[("rvn", "kscan")]["peak_rss_delta_bytes"] >= 0
    direct = rows[("rvn network (maps given)", "DIRECT")]
    if importlib.util.find_spec("direct") is None:
        assert direct["note"] == "direct is not installed" and "not installed" in printed
    else:
        assert direct["kscan_speedup"] > 0
    assert len(table(report)) == len(report["results"])


def _parameters(candidate) -> int:
    model, _ = candidate.build(candidate.config, candidate.shape)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_segmentation_quick_candidates_run_on_one_image() -> None:
    rows = segmentation_candidates(quick=True)
    assert [c.model for c in rows] == ["vmunet", "vmunet", "mhs-vm", "mhs-vm", "unet", "swinunetr"]
    for candidate in rows:
        model, (image,) = candidate.build(candidate.config, candidate.shape)
        assert image.shape == (1, 1, 64, 64)
        with torch.inference_mode():
            assert model(image).shape == (1, 6, 64, 64), candidate.config["model"]
    result = measure(rows[0], repeats=1, warmup=0, threads=1)
    assert result["parameters"] == _parameters(rows[0]) and result["time"]["median_s"] > 0


@pytest.mark.slow
def test_segmentation_peers_are_of_the_reference_size() -> None:
    rows = {(c.model, c.label): c for c in segmentation_candidates(quick=False)}
    assert all(c.shape == {"height": 256, "width": 256} for c in rows.values())
    vmunet = _parameters(rows[("vmunet", "reference dims")])
    assert vmunet == 27_424_614  # the reference's 27.43 M, with one input channel and 6 classes
    assert _parameters(rows[("mhs-vm", "reference dims, 4 heads")]) == 17_254_182
    for peer in (("unet", "MONAI"), ("swinunetr", "MONAI")):
        assert 0.9 < _parameters(rows[peer]) / vmunet < 1.1, peer
    assert rows[("vmunet", "small (shipped recipe)")].config["config"]["dims"] == [32, 64, 128, 256]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["segmentation", "multitask"])
def test_command_quick_other_tasks(task, tmp_path) -> None:
    out = tmp_path / "models.json"
    args = ["bench", "models", "--task", task, "--quick", "--repeats", "1", "--warmup", "0"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == task and len(report["results"]) == len(TASKS[task](True))
    assert all(r["parameters"] > 0 and r["time"]["median_s"] > 0 for r in report["results"])
