"""``kscan report RESULTS``: one self-contained HTML page of a workflow's results.

The page reads the results folder of the Snakemake workflow (``workflows/``), laid out per case::

    RESULTS/<case>/input.json                                 ``kscan info --json`` of the input
    RESULTS/<case>/recon/<mask>_<acc>x/<method>.h5            reconstructions (``reconstruction``)
    RESULTS/<case>/segment/<mask>_<acc>x/<method>/<model>.nii.gz   labels of a reconstruction
    RESULTS/<case>/segment/image/<model>.nii.gz               labels of an image input
    RESULTS/<case>/metrics/<mask>_<acc>x/<method>/<model>.csv ``kscan evaluate --csv`` (model
                                                              ``none``: reconstruction only)
    RESULTS/<case>/metrics/image/<model>.csv                  label scores of an image input

and the workflow's Snakemake benchmark files (``BENCHMARKS/<rule>/.../*.tsv``). It holds:

- **metrics tables**: reconstruction SSIM / PSNR / NMSE per case, mask, acceleration and method,
  with mean rows over cases; segmentation Dice per class, mean Dice and mean HD95 per case, input
  and model, with mean rows;
- **image grids** per case (the middle slice): the target, each reconstruction and its error map
  ``|recon - target|`` (grey scale ``[0, max(target) / ERROR_GAIN]``, so errors of a fifth of the
  target's maximum are white), and segmentation overlays (the target's labels and each model's,
  :func:`kscan.pipelines.segment.overlay_image`);
- **rule timings**: jobs, total, mean and maximum wall time and the largest resident memory of
  every rule, from the benchmark files;
- **provenance** of every output: its JSON sidecar or HDF5 ``kscan_provenance`` attribute (kscan
  version, command, model, checkpoint SHA-256, parameters, inputs), and the input descriptions.

Images are PNGs embedded as base64 ``data:`` URIs; the page loads nothing from elsewhere. It is
written atomically.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image

import kscan
from kscan.errors import FileFormatError
from kscan.pipelines.atomic import write_text
from kscan.pipelines.evaluate import read_prediction, read_target
from kscan.pipelines.io.nifti import nifti_array_to_volume, read_nifti
from kscan.pipelines.seg_transforms import normalize_image
from kscan.pipelines.segment import overlay_image

ERROR_GAIN = 5.0
"""Error maps show ``|recon - target|`` on ``[0, max(target) / ERROR_GAIN]``."""

IMAGE_INPUT = "image"
"""The ``<setting>`` folder name of an image input's results."""

NO_MODEL = "none"
"""The model name of reconstruction-only metrics."""

_SETTING = re.compile(r"(?P<mask>[a-z0-9_]+)_(?P<acc>[0-9]+(?:\.[0-9]+)?)x")
_PROVENANCE_ATTR = "kscan_provenance"


# --- reading the results ------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricRow:
    """One ``kscan evaluate`` row: the case, where the prediction came from, and its scores.

    ``setting`` is ``<mask>_<acc>x`` or ``image``; ``method`` is ``""`` for image inputs; ``model``
    is the segmentation model or ``none``.
    """

    case: str
    setting: str
    method: str
    model: str
    scores: dict[str, float]

    @property
    def mask(self) -> str:
        match = _SETTING.fullmatch(self.setting)
        return match["mask"] if match else ""

    @property
    def acceleration(self) -> str:
        match = _SETTING.fullmatch(self.setting)
        return match["acc"] if match else ""


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics(results: Path) -> list[MetricRow]:
    """Every metrics CSV under ``results/<case>/metrics/`` (its first volume row)."""
    rows = []
    for path in sorted(results.glob("*/metrics/**/*.csv")):
        parts = path.relative_to(results).parts  # case, metrics, setting, [method,] model.csv
        if len(parts) == 5:
            case, _, setting, method, name = parts
        elif len(parts) == 4 and parts[2] == IMAGE_INPUT:
            case, _, setting, name = parts
            method = ""
        else:
            continue
        with open(path, newline="", encoding="utf-8") as f:
            volumes = [r for r in csv.DictReader(f) if r.get("prediction") != "mean"]
        if not volumes:
            raise FileFormatError(f"{path}: no volume rows; expected a 'kscan evaluate --csv' file")
        scores = {
            k: v
            for k, v in ((k, _float(text)) for k, text in volumes[0].items() if k != "slices")
            if v is not None
        }
        rows.append(MetricRow(case, setting, method, name[: -len(".csv")], scores))
    return rows


@dataclass
class Timing:
    """Wall times (s) and largest resident memory (MB) of one rule's jobs."""

    seconds: list[float] = field(default_factory=list)
    max_rss_mb: float = 0.0


def read_benchmarks(folder: Path | None) -> dict[str, Timing]:
    """Snakemake benchmark files ``folder/<rule>/**/*.tsv`` (columns ``s``, ``max_rss``, ...) by
    rule; a missing folder gives none."""
    timings: dict[str, Timing] = defaultdict(Timing)
    if folder is None or not folder.is_dir():
        return {}
    for path in sorted(folder.glob("*/**/*.tsv")):
        rule = path.relative_to(folder).parts[0]
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                seconds = _float(row.get("s", ""))
                if seconds is None:
                    continue
                timings[rule].seconds.append(seconds)
                rss = _float(row.get("max_rss", ""))
                if rss is not None:
                    timings[rule].max_rss_mb = max(timings[rule].max_rss_mb, rss)
    return dict(sorted(timings.items()))


def read_provenance(path: Path) -> dict[str, Any] | None:
    """The provenance of a result: its HDF5 attribute, or the JSON sidecar itself."""
    try:
        if path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                text = f.attrs.get(_PROVENANCE_ATTR)
            return json.loads(text) if text is not None else None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FileFormatError(f"{path}: unreadable provenance ({err})") from err


def _input_path(results: Path, case: str) -> Path | None:
    """The case's input file, from the ``kscan info`` description in ``input.json``."""
    described = results / case / "input.json"
    if not described.is_file():
        return None
    path = Path(json.loads(described.read_text(encoding="utf-8"))["path"])
    return path if path.is_absolute() else (results.parent / path)


def _labels_volume(path: Path) -> np.ndarray:
    return nifti_array_to_volume(read_nifti(path).array, path).astype(np.int64)


# --- images -------------------------------------------------------------------------------------


def png_data_uri(pixels: np.ndarray) -> str:
    """A uint8 grey ``(H, W)`` or RGB ``(H, W, 3)`` array as a ``data:image/png;base64`` URI."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def grey(image: np.ndarray, vmax: float) -> np.ndarray:
    """``image`` ``(H, W)`` on ``[0, vmax]`` as uint8 grey (``vmax <= 0`` gives black)."""
    scaled = image / vmax if vmax > 0 else np.zeros_like(image)
    return (np.clip(scaled, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def overlay(volume: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB overlay grid of ``labels`` on ``volume`` ``(slices, H, W)``, as ``kscan segment`` draws it."""
    image = normalize_image(torch.from_numpy(np.abs(volume).astype(np.float32))).numpy()
    return overlay_image(image, labels)


# --- HTML ---------------------------------------------------------------------------------------


def _format(value: Any, column: str) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if column.startswith("nmse"):
            return f"{value:.5f}"
        if column.startswith(("psnr", "hd95")):
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], mean_rows: int = 0) -> str:
    """A ``<table>``; the last ``mean_rows`` rows are set in bold as summary rows."""
    body = list(rows)
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for n, row in enumerate(body):
        cls = ' class="mean"' if n >= len(body) - mean_rows else ""
        cells = "".join(
            f"<td>{html.escape(_format(v, h.lower()))}</td>"
            for h, v in zip(headers, row, strict=True)
        )
        lines.append(f"<tr{cls}>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _mean(values: Iterable[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def reconstruction_tables(rows: list[MetricRow]) -> str:
    """Per case, mask, acceleration and method: SSIM, PSNR, NMSE; then means over cases."""
    unique: dict[tuple[str, str, str], MetricRow] = {}
    for row in rows:
        if row.setting != IMAGE_INPUT and "ssim" in row.scores:
            unique.setdefault((row.case, row.setting, row.method), row)
    if not unique:
        return "<p>No reconstruction metrics (no k-space inputs with a target).</p>"
    columns = ("ssim", "psnr", "nmse")
    headers = ["case", "mask", "acceleration", "method", "SSIM", "PSNR dB", "NMSE"]
    per_case = [
        [r.case, r.mask, r.acceleration, r.method, *(r.scores.get(c) for c in columns)]
        for r in sorted(
            unique.values(), key=lambda r: (r.mask, int(r.acceleration), r.method, r.case)
        )
    ]
    groups: dict[tuple[str, str, str], list[MetricRow]] = defaultdict(list)
    for r in unique.values():
        groups[(r.mask, r.acceleration, r.method)].append(r)
    means = [
        ["mean", mask, acc, method, *(_mean(r.scores.get(c) for r in group) for c in columns)]
        for (mask, acc, method), group in sorted(
            groups.items(), key=lambda g: (g[0][0], int(g[0][1]), g[0][2])
        )
    ]
    return html_table(headers, per_case + means, mean_rows=len(means))


def _class_ids(rows: list[MetricRow]) -> list[int]:
    return sorted({int(k.split("_")[1]) for r in rows for k in r.scores if k.startswith("dice_")})


def segmentation_table(rows: list[MetricRow]) -> str:
    """Per case, input and model: Dice per class, mean Dice, mean HD95; then means over cases."""
    seg = [r for r in rows if r.model != NO_MODEL and any(k.startswith("dice_") for k in r.scores)]
    if not seg:
        return "<p>No segmentation metrics (no labels to score against).</p>"
    classes = _class_ids(seg)
    headers = ["case", "input", "model", *(f"Dice {c}" for c in classes), "mean Dice", "mean HD95"]

    def source(r: MetricRow) -> str:
        return IMAGE_INPUT if r.setting == IMAGE_INPUT else f"{r.setting} {r.method}"

    def values(r: MetricRow) -> list[float | None]:
        dice = [r.scores.get(f"dice_{c}") for c in classes]
        hd95 = [r.scores.get(f"hd95_{c}") for c in classes]
        return [*dice, _mean(dice), _mean(h for h in hd95 if h is None or math.isfinite(h))]

    ordered = sorted(seg, key=lambda r: (source(r), r.model, r.case))
    per_case = [[r.case, source(r), r.model, *values(r)] for r in ordered]
    groups: dict[tuple[str, str], list[list[float | None]]] = defaultdict(list)
    for r in ordered:
        groups[(source(r), r.model)].append(values(r))
    means = [
        ["mean", src, model, *(_mean(column) for column in zip(*vals, strict=True))]
        for (src, model), vals in groups.items()
    ]
    return html_table(headers, per_case + means, mean_rows=len(means))


def _figure(uri: str, caption: str) -> str:
    return (
        f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def case_section(results: Path, case: str) -> str:
    """Image grids of one case: target, reconstructions, error maps and overlays."""
    parts = [f'<h3 id="case-{html.escape(case)}">{html.escape(case)}</h3>']
    input_path = _input_path(results, case)
    target = None
    if input_path is not None and input_path.is_file():
        try:
            target = read_target(input_path, with_labels=True)
        except FileFormatError:
            target = None  # k-space without a target: reconstructions are shown alone
    folder = results / case
    settings = sorted(p.name for p in (folder / "recon").glob("*") if p.is_dir())
    for setting in settings:
        mid = None
        figures, errors = [], []
        if target is not None:
            mid = target.image.shape[0] // 2
            vmax = float(target.image[mid].max())
            figures.append(_figure(png_data_uri(grey(target.image[mid], vmax)), "target"))
            errors.append('<figure class="blank"></figure>')
        for recon in sorted((folder / "recon" / setting).glob("*.h5")):
            image = read_prediction(recon).image
            k = mid if mid is not None else image.shape[0] // 2
            vmax = float(target.image[k].max()) if target is not None else float(image[k].max())
            figures.append(_figure(png_data_uri(grey(image[k], vmax)), recon.stem))
            if target is not None and target.image.shape == image.shape:
                error = np.abs(image[k] - target.image[k])
                errors.append(
                    _figure(
                        png_data_uri(grey(error, vmax / ERROR_GAIN)), f"|{recon.stem} - target|"
                    )
                )
        parts.append(f"<h4>{html.escape(setting)} (middle slice)</h4>")
        parts.append(f'<div class="grid">{"".join(figures)}</div>')
        if errors:
            parts.append(f'<div class="grid">{"".join(errors)}</div>')
    overlays = []
    if target is not None and target.labels is not None:
        overlays.append(
            _figure(png_data_uri(overlay(target.image, target.labels)), "target labels")
        )
    for labels in sorted((folder / "segment").glob("**/*.nii.gz")):
        rel = labels.relative_to(folder / "segment")
        if rel.parts[0] == IMAGE_INPUT:
            source = target.image if target is not None else None
        else:
            source = read_prediction(folder / "recon" / rel.parts[0] / f"{rel.parts[1]}.h5").image
        if source is None:
            continue
        caption = " ".join([*rel.parts[:-1], rel.name[: -len(".nii.gz")]])
        overlays.append(_figure(png_data_uri(overlay(source, _labels_volume(labels))), caption))
    if overlays:
        parts.append("<h4>Segmentations (up to 9 slices)</h4>")
        parts.append(f'<div class="grid">{"".join(overlays)}</div>')
    return "\n".join(parts)


def timings_table(timings: dict[str, Timing]) -> str:
    """Jobs, total / mean / max wall time and max RSS of every rule."""
    if not timings:
        return "<p>No benchmark files.</p>"
    rows = [
        [
            rule,
            len(t.seconds),
            sum(t.seconds),
            float(np.mean(t.seconds)),
            max(t.seconds),
            t.max_rss_mb,
        ]
        for rule, t in timings.items()
    ]
    total = sum(sum(t.seconds) for t in timings.values())
    rows.append(
        ["all rules", sum(len(t.seconds) for t in timings.values()), total, None, None, None]
    )
    headers = ["rule", "jobs", "total s", "mean s", "max s", "max RSS MB"]
    return html_table(
        headers, [[r[0], r[1], *(_round(v) for v in r[2:])] for r in rows], mean_rows=1
    )


def _round(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def provenance_section(results: Path) -> str:
    """A row per output with a provenance record, and each record in full."""
    outputs = sorted(
        p
        for p in results.glob("*/**/*")
        if p.is_file()
        and (p.suffix == ".h5" or (p.suffix == ".json" and p.name != "input.json"))
        and not p.name.startswith(".")
    )
    rows, details = [], []
    for path in outputs:
        record = read_provenance(path)
        if not record or "kscan_version" not in record:
            continue
        name = str(path.relative_to(results))
        sha = record.get("checkpoint_sha256") or ""
        rows.append(
            [
                name,
                record.get("model") or "",
                sha[:12],
                record.get("kscan_version", ""),
                record.get("created", ""),
            ]
        )
        details.append(_details(name, record))
    for described in sorted(results.glob("*/input.json")):
        details.append(
            _details(str(described.relative_to(results)), json.loads(described.read_text("utf-8")))
        )
    if not rows and not details:
        return "<p>No provenance records.</p>"
    table = html_table(["output", "model", "checkpoint sha256", "kscan", "created"], rows)
    return table + "\n" + "\n".join(details)


def _details(name: str, record: Any) -> str:
    text = html.escape(json.dumps(record, indent=2))
    return f"<details><summary>{html.escape(name)}</summary><pre>{text}</pre></details>"


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr.mean td { font-weight: bold; background: #fafafa; }
.grid { display: flex; flex-wrap: wrap; gap: 0.5em; }
figure { margin: 0; text-align: center; }
figure.blank { width: 160px; }
img { image-rendering: pixelated; width: 160px; border: 1px solid #ddd; }
figcaption { font-size: 0.8em; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; font-size: 0.8em; }
"""


def build_report(
    results: str | Path, benchmarks: str | Path | None = None, title: str = "kscan report"
) -> str:
    """The HTML page of a results folder (module docstring) and its benchmark folder."""
    results = Path(results)
    if not results.is_dir():
        raise FileFormatError(f"{results}: no such results folder")
    metrics = read_metrics(results)
    cases = sorted(p.name for p in results.iterdir() if p.is_dir() and (p / "input.json").is_file())
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>kscan {html.escape(kscan.__version__)}, {created}; {len(cases)} cases: "
        + ", ".join(f'<a href="#case-{html.escape(c)}">{html.escape(c)}</a>' for c in cases)
        + "</p>",
        "<h2>Reconstruction metrics</h2>",
        reconstruction_tables(metrics),
        "<h2>Segmentation metrics</h2>",
        segmentation_table(metrics),
        "<h2>Cases</h2>",
        *(case_section(results, case) for case in cases),
        "<h2>Rule timings</h2>",
        timings_table(read_benchmarks(Path(benchmarks) if benchmarks is not None else None)),
        "<h2>Provenance</h2>",
        provenance_section(results),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(
    results: str | Path,
    output: str | Path,
    benchmarks: str | Path | None = None,
    title: str = "kscan report",
) -> Path:
    """Build the report of ``results`` and write it atomically to ``output``."""
    write_text(output, build_report(results, benchmarks, title))
    return Path(output)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan report``."""
    parser = sub.add_parser(
        "report",
        help="one self-contained HTML page of a workflow's results: metrics, images, timings, provenance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan report results --benchmarks benchmarks --output results/report.html",
    )
    parser.add_argument("results", metavar="RESULTS", help="the workflow's results folder")
    parser.add_argument("--benchmarks", help="Snakemake benchmark folder (default: none)")
    parser.add_argument("--output", help="HTML file (default RESULTS/report.html)")
    parser.add_argument("--title", default="kscan report", help="page title")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    output = args.output or str(Path(args.results) / "report.html")
    print(write_report(args.results, output, args.benchmarks, args.title))
