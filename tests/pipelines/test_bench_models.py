"""kscan bench models: candidates, in-process measurement, and the command at tiny sizes."""

import importlib.util
import json

import pytest

from kscan.models import registry
from kscan.pipelines.bench_models import (
    TASKS,
    build_registered,
    measure,
    reconstruction_candidates,
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
    assert set(TASKS) >= {"reconstruction"}


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
