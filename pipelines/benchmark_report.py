"""The outputs of ``kscan benchmark``: CSV, Markdown, PNG plots, example grids, one HTML page.

Written into the run's output folder, each atomically:

- ``results.csv``: one row per cell and volume (``volume`` = the file name) and, after them, the
  cell's mean row (``volume`` = ``mean``: the mean over volumes, fastMRI's data-set convention)
  with the parameter count, time per slice, peak memory and the error of a failed cell;
- ``results.md``: the mean rows as a Markdown table (means over classes for the segmentation
  metrics) and a table per segmentation metric with its per-class means;
- ``plots/<dataset>_<metric>.png``: each metric's cell mean against the acceleration, one line
  per model (per model and mask kind when an acceleration is used by several mask kinds);
- ``examples/<dataset>_<mask>_<acceleration>x.png``: the example slice (the middle slice of the
  dataset's first volume) as the target, the zero-filled image and each model's image; below them
  the error maps ``|image - target|`` on ``[0, max(target) / ERROR_GAIN]``, and the label
  overlays (the file's labels on the target; each segmenting model's on the image it segmented);
- ``index.html``: all of it, images embedded as base64 ``data:`` URIs (nothing external);
- ``benchmark.json``: the counts of this run (``cells_computed``, ``cells_cached``,
  ``cells_failed``), the config, the machine, the memory method and the checkpoints' SHA-256.

Plots use matplotlib's object API with the Agg canvas (no display, no global figure state).
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

import kscan
from kscan.config import to_mapping
from kscan.pipelines.atomic import atomic_path, write_json, write_text
from kscan.pipelines.benchmark_cells import (
    BenchmarkRun,
    Grid,
    Measure,
    mean_row,
    plan,
    reference_example,
)
from kscan.pipelines.benchmark_config import (
    RECONSTRUCTION_METRICS,
    SEGMENTATION_METRICS,
    BenchmarkConfig,
)
from kscan.pipelines.machine import machine_info
from kscan.pipelines.seg_transforms import normalize_image
from kscan.pipelines.segment import overlay_image

ERROR_GAIN = 5.0
"""Error maps show ``|image - target|`` on ``[0, max(target) / ERROR_GAIN]``."""
PLACE = ["dataset", "mask", "center_fraction", "acceleration", "model", "kind", "on"]
CELL = ["parameters", "time_per_slice_s", "peak_memory_bytes", "error"]
TITLES = {
    "ssim": "SSIM",
    "psnr": "PSNR (dB)",
    "nmse": "NMSE",
    "dice_mean": "Dice",
    "iou_mean": "IoU",
    "hd95_mean": "HD95 (mm)",
    "parameters": "parameters",
    "time_per_slice_s": "time / slice",
    "peak_memory_bytes": "peak memory",
}


def _format(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if column.startswith("nmse"):
            return f"{value:.5f}"
        if column.startswith(("psnr", "hd95")):
            return f"{value:.2f}"
        if column == "time_per_slice_s":
            return f"{value * 1000:.1f} ms"
        if column == "acceleration":
            return f"{value:g}x"
        return f"{value:.4f}"
    if column == "peak_memory_bytes":
        return f"{value / 2**20:.1f} MiB"
    if column == "parameters":
        return f"{value:,}"
    return str(value)


# --- tables --------------------------------------------------------------------------------------


def metric_columns(records: list[dict[str, Any]], config: BenchmarkConfig) -> list[str]:
    """The metric columns present: the reconstruction metrics, then per segmentation metric its
    mean over classes and its per-class columns (in order of first appearance)."""
    seen: list[str] = []
    for record in records:
        for row in record["volumes"]:
            seen += [k for k in row if k not in seen]
    columns = [m for m in config.metric_names("reconstruction") if m in seen]
    for metric in config.metric_names("segmentation"):
        columns += [c for c in seen if c == f"{metric}_mean"]
        columns += [c for c in seen if c.startswith(f"{metric}_") and c != f"{metric}_mean"]
    return columns


def csv_rows(records: list[dict[str, Any]], config: BenchmarkConfig) -> tuple[list[str], list]:
    """The header and rows of ``results.csv`` (module docstring)."""
    metrics = metric_columns(records, config)
    header = [*PLACE, "volume", "slices", "achieved_acceleration", *metrics, *CELL]
    rows = []
    for record in records:
        place = {k: record[k] for k in PLACE}
        for row in record["volumes"]:
            rows.append([(place | row).get(k) for k in header])
        cell = place | mean_row(record) | {k: record.get(k) for k in CELL} | {"volume": "mean"}
        rows.append([cell.get(k) for k in header])
    return header, rows


def write_csv(path: Path, records: list[dict[str, Any]], config: BenchmarkConfig) -> None:
    header, rows = csv_rows(records, config)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def summary_tables(
    records: list[dict[str, Any]], config: BenchmarkConfig
) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, formatted rows)`` of the cell means and of each segmentation metric's
    per-class means."""
    metrics = metric_columns(records, config)
    means = [c for c in metrics if c in RECONSTRUCTION_METRICS or c.endswith("_mean")]
    place = ["dataset", "mask", "acceleration", "model"]
    columns = [*place, *means, *CELL]
    header = [TITLES.get(c, c) for c in columns]
    cells = [record | mean_row(record) for record in records]
    tables = [("Cell means", header, [[_format(c, r.get(c)) for c in columns] for r in cells])]
    for metric in SEGMENTATION_METRICS:
        per_class = [c for c in metrics if c.startswith(f"{metric}_") and c != f"{metric}_mean"]
        rows = [r for r in cells if f"{metric}_mean" in r]
        if per_class and rows:
            names = [c[len(metric) + 1 :] for c in per_class]
            tables.append(
                (
                    f"{TITLES[metric + '_mean']} per class",
                    [*place, *names],
                    [[_format(c, r.get(c)) for c in [*place, *per_class]] for r in rows],
                )
            )
    return tables


def markdown(tables: list[tuple[str, list[str], list[list[str]]]]) -> str:
    """The tables as Markdown, each under a heading."""
    parts = []
    for title, header, rows in tables:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            lines.append("| " + " | ".join(v.replace("|", "\\|") for v in row) + " |")
        parts.append(f"## {title}\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


# --- figures -------------------------------------------------------------------------------------


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _write_png(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def metric_plots(records: list[dict[str, Any]], config: BenchmarkConfig) -> dict[str, bytes]:
    """``<dataset>_<metric>`` -> PNG of the metric's cell means against the acceleration.

    One colour per model and one marker (and line style) per mask kind; a model's points are
    joined across mask kinds when no acceleration is used by two kinds, else per kind.
    """
    plotted = [
        *config.metric_names("reconstruction"),
        *(f"{m}_mean" for m in config.metric_names("segmentation")),
    ]
    done = [r | mean_row(r) for r in records if r["error"] is None]
    colours = {m.name: f"C{i % 10}" for i, m in enumerate(config.models)}
    styles = {
        m.kind: ("osD^v<>p*h"[i % 10], ["-", "--", ":", "-."][i % 4])
        for i, m in enumerate(config.masks)
    }
    plots = {}
    for dataset in config.datasets:
        rows = [r for r in done if r["dataset"] == dataset]
        kinds_at: dict[float, set[str]] = {}
        for r in rows:
            kinds_at.setdefault(r["acceleration"], set()).add(r["mask"])
        split = any(len(kinds) > 1 for kinds in kinds_at.values())
        for metric in plotted:
            points = sorted((r for r in rows if metric in r), key=lambda r: r["acceleration"])
            if not points:
                continue
            figure = Figure(figsize=(6.5, 4))
            ax = figure.add_subplot()
            series: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
            for r in points:
                series.setdefault((r["model"], r["mask"] if split else None), []).append(r)
            labelled: set[str] = set()
            for (model, kind), group in series.items():
                style = styles[kind][1] if kind else "-"
                x, y = [r["acceleration"] for r in group], [r[metric] for r in group]
                ax.plot(
                    x,
                    y,
                    style,
                    color=colours[model],
                    label=None if model in labelled else model,
                )
                labelled.add(model)
                for r in group:
                    ax.plot(
                        r["acceleration"], r[metric], styles[r["mask"]][0], color=colours[model]
                    )
            for kind, (marker, style) in styles.items():
                ax.plot(
                    [],
                    [],
                    marker=marker,
                    linestyle=style if split else "",
                    color="grey",
                    label=kind,
                )
            ax.set_xlabel("acceleration")
            ax.set_ylabel(TITLES.get(metric, metric))
            ax.set_title(f"{dataset}: {TITLES.get(metric, metric)}")
            ax.set_xticks(sorted(kinds_at))
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
            plots[f"{dataset}_{metric}"] = _png(figure)
    return plots


def _overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    normalized = normalize_image(torch.from_numpy(np.asarray(image, dtype=np.float32)[None]))
    return overlay_image(normalized.numpy(), labels[None])


def example_grid(reference: dict[str, np.ndarray], columns: list[tuple[str, dict]]) -> bytes:
    """The example grid (module docstring): ``columns`` are ``(model name, its example arrays)``
    (``example_image``, ``example_labels``; segmentation entries' images are their inputs)."""
    target = reference["target"]
    vmax = float(target.max()) or 1.0
    panels = [("target", {"image": target, "labels": reference.get("labels")})]
    panels.append(("zero-filled (RSS)", {"image": reference["zero_filled"], "error": True}))
    for name, arrays in columns:
        segmenting_only = arrays.get("segmentation_only", False)
        panels.append(
            (
                name,
                {
                    "image": None if segmenting_only else arrays["example_image"],
                    "error": not segmenting_only,
                    "labels": arrays.get("example_labels"),
                    "base": arrays["example_image"],
                },
            )
        )
    with_labels = any(p.get("labels") is not None for _, p in panels)
    rows = 3 if with_labels else 2
    figure = Figure(figsize=(2.2 * len(panels), 2.3 * rows))
    axes = figure.subplots(rows, len(panels), squeeze=False)
    for col, (name, panel) in enumerate(panels):
        for ax in axes[:, col]:
            ax.set_axis_off()
        axes[0, col].set_title(name, fontsize="small")
        if panel["image"] is not None:
            axes[0, col].imshow(panel["image"], cmap="gray", vmin=0, vmax=vmax)
            if panel.get("error"):
                axes[1, col].imshow(
                    np.abs(panel["image"] - target), cmap="gray", vmin=0, vmax=vmax / ERROR_GAIN
                )
        if with_labels and panel.get("labels") is not None:
            base = panel.get("base", panel["image"])
            axes[2, col].imshow(_overlay(base, panel["labels"]))
    axes[1, 0].text(
        0.5,
        0.5,
        f"|image - target|\n0 .. max / {ERROR_GAIN:g}",
        ha="center",
        va="center",
        fontsize="small",
        transform=axes[1, 0].transAxes,
    )
    figure.tight_layout()
    return _png(figure)


def example_grids(run: BenchmarkRun, config: BenchmarkConfig, grid: Grid) -> dict[str, bytes]:
    """``<dataset>_<mask>_<acceleration>x`` -> PNG of each setting's example grid."""
    by_key = {r["key"]: r for r in run.records}
    grids = {}
    settings = dict.fromkeys(cell.setting for cell in plan(config))
    for dataset, kind, acceleration in settings:
        mask = next(m for m in config.masks if m.kind == kind and acceleration in m.accelerations)
        reference = reference_example(grid.files[dataset], mask, acceleration, config.seed)
        columns = []
        for entry in config.models:
            key = grid.keys[(entry.name, dataset, kind, acceleration)]
            if by_key[key]["error"] is not None:
                continue
            arrays = grid.cache.arrays(key)
            arrays["segmentation_only"] = entry.kind == "segmentation"
            columns.append((entry.name, arrays))
        grids[f"{dataset}_{kind}_{acceleration:g}x"] = example_grid(reference, columns)
    return grids


# --- HTML ----------------------------------------------------------------------------------------

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f0f0f0; }
td.error { color: #b00; text-align: left; max-width: 40em; }
img { max-width: 100%; }
figure { display: inline-block; margin: 0.5em; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; font-size: 0.8em; }
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = [
        "<tr>"
        + "".join(
            f"<td{' class=error' if h == 'error' else ''}>{html.escape(v)}</td>"
            for h, v in zip(header, row, strict=True)
        )
        + "</tr>"
        for row in rows
    ]
    return f"<table><tr>{head}</tr>\n" + "\n".join(body) + "</table>"


def _img(data: bytes, caption: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    text = html.escape(caption)
    return f'<figure><img src="{uri}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def html_page(
    tables: list[tuple[str, list[str], list[list[str]]]],
    plots: dict[str, bytes],
    grids: dict[str, bytes],
    summary: dict[str, Any],
) -> str:
    """One self-contained page: tables, plots, example grids, run summary and provenance."""
    parts = [
        "<h1>kscan benchmark</h1>",
        f"<p>kscan {html.escape(kscan.__version__)}, {html.escape(summary['created'])}, "
        f"device {html.escape(summary['machine']['device'])}: {summary['cells']} cells, "
        f"{summary['cells_computed']} computed in this run, {summary['cells_cached']} from the "
        f"cache, {summary['cells_failed']} failed.</p>",
        f"<p>Peak memory: {html.escape(summary['memory_method'])}. Time per slice: the model "
        "calls only, after one untimed warm-up call.</p>",
    ]
    for title, header, rows in tables:
        parts += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    parts.append("<h2>Metrics against acceleration</h2>")
    parts += [_img(data, name) for name, data in plots.items()]
    parts.append("<h2>Examples</h2>")
    parts += [_img(data, name) for name, data in grids.items()]
    parts += [
        "<h2>Provenance</h2>",
        "<pre>" + html.escape(json.dumps(summary, indent=2)) + "</pre>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>kscan benchmark</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )


def write_outputs(run: BenchmarkRun, config: BenchmarkConfig, grid: Grid) -> list[Path]:
    """Write every output of the run into ``run.out_dir`` (module docstring); returns the paths."""
    out = run.out_dir
    summary = {
        "kscan_version": kscan.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cells": len(run.records),
        "cells_computed": run.computed,
        "cells_cached": run.cached,
        "cells_failed": run.failed,
        "memory_method": Measure(grid.dev).method,
        "machine": machine_info(grid.dev),
        "checkpoints": grid.checkpoints,
        "datasets": {name: [f[0] for f in fp] for name, fp in grid.fingerprints.items()},
        "config": to_mapping(config),
    }
    tables = summary_tables(run.records, config)
    plots = metric_plots(run.records, config)
    grids = example_grids(run, config, grid)
    written = [out / "results.csv", out / "results.md", out / "index.html", out / "benchmark.json"]
    write_csv(written[0], run.records, config)
    write_text(written[1], "# kscan benchmark\n\n" + markdown(tables))
    written += [_write_png(out / "plots" / f"{name}.png", data) for name, data in plots.items()]
    written += [_write_png(out / "examples" / f"{name}.png", data) for name, data in grids.items()]
    write_text(written[2], html_page(tables, plots, grids, summary))
    write_json(written[3], summary)
    return written
