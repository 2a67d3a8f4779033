"""The cells of ``kscan benchmark``: data, models, measurement, the cache, the grid loop.

See :mod:`kscan.pipelines.benchmark` for what a cell computes and how the cache works.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

import kscan
from kscan.config import to_mapping
from kscan.errors import ConfigError, KscanError, about_file
from kscan.physics.masks import apply_mask
from kscan.pipelines import metrics as metric_fns
from kscan.pipelines.atomic import atomic_path, write_json
from kscan.pipelines.benchmark_config import (
    TARGET,
    BenchmarkConfig,
    MaskConfig,
    ModelEntry,
)
from kscan.pipelines.cli_args import device
from kscan.pipelines.io.fastmri import FastMRIFile
from kscan.pipelines.io.slice_dataset import list_volume_files
from kscan.pipelines.machine import machine_info
from kscan.pipelines.memory import peak_tensor_bytes
from kscan.pipelines.model_inference import load_reconstructor
from kscan.pipelines.provenance import sha256_file
from kscan.pipelines.reconstruct import ReconSettings, classical_solve
from kscan.pipelines.segment import SegSettings, class_names, load_segmenter, segment_volume
from kscan.pipelines.synthetic import center_crop
from kscan.pipelines.undersample import volume_mask

Runner = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]
]
"""``(masked k-space (b, coil, H, W), mask (1, W) or (H, W), the file's coil maps or None)`` ->
``(image (b, H, W), labels (b, H, W) or None)``."""

CPU_MEMORY = (
    "torch tensor bytes: the model's parameters and buffers, the batch's inputs and the peak of "
    "the tensor storages allocated during the cell's first (untimed) batch, counted op by op; "
    "numpy/numba scratch not counted"
)
CUDA_MEMORY = "torch.cuda.max_memory_allocated during the cell (peak statistics reset before it)"


# --- data ----------------------------------------------------------------------------------------


def dataset_files(name: str, folder: str) -> list[Path]:
    """The volumes of a dataset, checked before any work: fully sampled files with a target."""
    files = list_volume_files(folder) if Path(folder).exists() else []
    if not files or not Path(folder).is_dir():
        raise ConfigError(f"datasets.{name}: {folder} is not a folder of .h5 files")
    for path in files:
        with about_file(path), FastMRIFile(path) as f:
            meta = f.metadata
        if meta.target_key is None:
            raise ConfigError(f"datasets.{name}: {path} has no target ({meta.target_key!r})")
        if meta.has_mask:
            raise ConfigError(
                f"datasets.{name}: {path} is undersampled (it has a 'mask'); the benchmark "
                "undersamples fully sampled files itself"
            )
    return files


def dataset_fingerprint(files: list[Path]) -> list[tuple[str, int, int]]:
    """``(name, size, mtime_ns)`` of each file: what the cache keys see of a dataset."""
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _crop_size(meta: Any) -> tuple[int, int]:
    """The recon size, or ``(W, W)`` for volumes narrower than it (as ``kscan reconstruct``)."""
    width, (rh, rw) = meta.matrix_size[-1], meta.recon_size[:2]
    return (rh, rw) if width >= rw else (width, width)


def _mask(path: Path, meta: Any, mask: MaskConfig, acceleration: float, seed: int | None) -> Any:
    return volume_mask(
        path,
        tuple(meta.matrix_size[-2:]),
        mask.kind,
        acceleration,
        mask.center_fraction,
        (meta.padding_left, meta.padding_right),
        seed,
    )


def example_slice(files: list[Path]) -> tuple[Path, int]:
    """The slice shown in the example grids: the middle slice of the first volume."""
    with FastMRIFile(files[0]) as f:
        return files[0], f.metadata.num_slices // 2


def reference_example(
    files: list[Path], mask: MaskConfig, acceleration: float, seed: int | None
) -> dict[str, np.ndarray]:
    """The example slice's ``target``, ``labels`` (when the file has them) and ``zero_filled``
    (RSS of the masked k-space, cropped), for the example grids."""
    path, index = example_slice(files)
    solve = classical_solve(ReconSettings(method="zf", maps="none", batch_size=1))
    with FastMRIFile(path) as f:
        meta, item = f.metadata, f.read_slice(index)
        m = _mask(path, meta, mask, acceleration, seed).mask
        image = solve(apply_mask(item["kspace"][None], m), m, None)
    out = {
        "target": item["target"].numpy(),
        "zero_filled": center_crop(image, _crop_size(meta)).abs()[0].numpy(),
    }
    if "segmentation" in item:
        out["labels"] = item["segmentation"].numpy()
    return out


# --- models --------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """An entry ready to run: ``runner`` (k-space entries) or ``segmenter``, and what the cells
    report of it."""

    parameters: int
    runner: Runner | None = None
    segmenter: Any = None
    class_names: dict[int, str] | None = None
    checkpoint: str | None = None
    weights: list[torch.Tensor] = field(default_factory=list)


def _classical(entry: ModelEntry, batch_size: int) -> Loaded:
    solve = classical_solve(entry.settings(batch_size))
    return Loaded(0, runner=lambda k, m, maps: (solve(k, m, maps), None))


def load_entry(entry: ModelEntry, dev: torch.device, batch_size: int) -> Loaded:
    """Load an entry's model (raises the checkpoint's errors: the cells report them)."""
    if entry.kind == "classical":
        return _classical(entry, batch_size)
    path = entry.checkpoint_path()
    if entry.kind == "reconstruction":
        rec = load_reconstructor(entry.model, path, dev)
        return _learned(rec.model, path, runner=lambda k, m, maps: (rec(k, m), None))
    if entry.kind == "segmentation":
        segmenter, ckpt = load_segmenter(entry.model, path, dev, SegSettings(batch_size))
        names = class_names(ckpt, segmenter.num_classes)
        return _learned(segmenter.model, path, segmenter=segmenter, class_names=names)
    rec = load_reconstructor(entry.model, path, dev, segment=True)
    names = class_names(rec.checkpoint, rec.model.num_classes)
    return _learned(rec.model, path, runner=rec, class_names=names)


def _learned(model: torch.nn.Module, path: Path, **parts: Any) -> Loaded:
    """A learned entry: its parameter count, checkpoint and weight tensors, plus ``parts``."""
    return Loaded(
        sum(p.numel() for p in model.parameters()),
        checkpoint=str(path),
        weights=[*model.parameters(), *model.buffers()],
        **parts,
    )


# --- measurement ---------------------------------------------------------------------------------


@dataclass
class Measure:
    """Model time (seconds, summed) and peak memory (bytes) of one cell.

    Each cell runs its first batch once untimed through :meth:`first_call` (the warm-up), which
    on the CPU is also the memory measurement: weights + that batch's inputs + the peak of the
    tensor storages the call allocates (:func:`kscan.pipelines.memory.peak_tensor_bytes`; the
    process's resident set would hide a cell's peak behind memory earlier cells left to the
    allocator). On CUDA the peak is the allocator's over the whole cell (:meth:`memory`)."""

    dev: torch.device
    seconds: float = 0.0
    peak_bytes: int | None = None

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    @contextmanager
    def timed(self) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds += time.perf_counter() - start

    @contextmanager
    def memory(self) -> Iterator[None]:
        if self.dev.type != "cuda":
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.dev)
        yield
        self.peak_bytes = int(torch.cuda.max_memory_allocated(self.dev))

    def first_call(
        self, fn: Callable[..., object], args: tuple[Any, ...], weights: list[torch.Tensor]
    ) -> None:
        """Run the cell's first batch, ``fn(*args)``, untimed (see the class docstring)."""
        if self.dev.type == "cuda":
            fn(*args)
            return
        held = [*weights, *(a for a in args if isinstance(a, torch.Tensor))]
        peak, _ = peak_tensor_bytes(lambda: fn(*args), held)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
        self.peak_bytes = sum(storages.values()) + peak

    @property
    def method(self) -> str:
        return CUDA_MEMORY if self.dev.type == "cuda" else CPU_MEMORY


# --- cells ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One model entry on one dataset with one mask kind at one acceleration."""

    entry: ModelEntry
    dataset: str
    mask: MaskConfig
    acceleration: float

    @property
    def setting(self) -> tuple[str, str, float]:
        """What the cells of one example grid share: ``(dataset, mask kind, acceleration)``."""
        return (self.dataset, self.mask.kind, self.acceleration)

    def label(self) -> str:
        return f"{self.entry.name} | {self.dataset} | {self.mask.kind} {self.acceleration:g}x"


def plan(config: BenchmarkConfig) -> list[Cell]:
    """Every cell, segmentation entries after the entries they segment."""
    return [
        Cell(entry, dataset, mask, acc)
        for entry in config.ordered_models()
        for dataset in config.datasets
        for mask in config.masks
        for acc in mask.accelerations
    ]


@dataclass
class CellOutput:
    """A cell's result record (JSON) and arrays (the example slice; whole volumes when another
    entry segments them)."""

    record: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _seg_scores(
    target: np.ndarray,
    labels: np.ndarray,
    names: dict[int, str],
    wanted: list[str],
    spacing: tuple[float, float, float],
) -> dict[str, float]:
    """``<metric>_<class name>`` per foreground class and ``<metric>_mean`` over them, of one
    label volume ``(slices, H, W)``; HD95 in mm (``spacing``: slice, H, W)."""
    count = len(names)
    target_t = torch.from_numpy(target.astype(np.int64))
    labels_t = torch.from_numpy(labels.astype(np.int64))
    scores: dict[str, float] = {}
    for metric in wanted:
        extra = {"spacing": spacing} if metric == "hd95" else {}
        values = getattr(metric_fns, metric)(target_t, labels_t, count, **extra).tolist()
        for cls, value in zip(range(1, count), values, strict=True):
            scores[f"{metric}_{names[cls]}"] = value
        scores[f"{metric}_mean"] = float(np.mean(values))
    return scores


def _label_spacing(meta: Any, crop: tuple[int, int]) -> tuple[float, float, float]:
    """Voxel size ``(slice, H, W)`` in mm of a cropped volume, from the header."""
    d_h, d_w, d_z = meta.voxel_size_mm
    return (d_z, d_h, d_w)


def _read_arrays(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """Whole datasets of a (checked) fastMRI file, without its k-space."""
    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in keys if key in f}


def _image_cell(
    cell: Cell,
    loaded: Loaded,
    files: list[Path],
    config: BenchmarkConfig,
    dev: torch.device,
    measure: Measure,
    keep_volumes: bool,
) -> CellOutput:
    """Run a k-space entry (classical, reconstruction, multitask) on every volume of the cell."""
    out = CellOutput({"volumes": []})
    example = example_slice(files)
    recon_metrics = config.metric_names("reconstruction")
    seg_metrics = config.metric_names("segmentation")
    slices_done = 0
    for path in files:
        with about_file(path), FastMRIFile(path) as f:
            meta = f.metadata
            mask = _mask(path, meta, cell.mask, cell.acceleration, config.seed)
            m = mask.mask.to(dev)
            crop = _crop_size(meta)
            n = meta.num_slices
            image = np.empty((n, *crop), dtype=np.float32)
            labels = np.empty((n, *crop), dtype=np.uint8) if loaded.class_names else None
            target, truth = [], []
            for start in range(0, n, config.batch_size):
                batch = [f.read_slice(i) for i in range(start, min(start + config.batch_size, n))]
                kspace = apply_mask(torch.stack([b["kspace"] for b in batch]).to(dev), m)
                maps = (
                    torch.stack([b["sensitivity_map"] for b in batch]).to(dev)
                    if meta.has_sensitivity_map
                    else None
                )
                if start == 0 and path == files[0]:
                    measure.first_call(loaded.runner, (kspace, m, maps), loaded.weights)
                with measure.timed():
                    result, seg = loaded.runner(kspace, m, maps)
                stop = start + len(batch)
                image[start:stop] = center_crop(result, crop).abs().cpu().numpy()
                if labels is not None:
                    labels[start:stop] = center_crop(seg, crop).cpu().numpy()
                target += [b["target"].numpy() for b in batch]
                truth += [b["segmentation"].numpy() for b in batch if "segmentation" in b]
            slices_done += n
            row = {"volume": path.name, "slices": n, "achieved_acceleration": mask.acceleration}
            scores = metric_fns.reconstruction_metrics(np.stack(target), image)
            row |= {k: v for k, v in scores.items() if k in recon_metrics}
            if labels is not None and truth:
                spacing = _label_spacing(meta, crop)
                row |= _seg_scores(
                    np.stack(truth), labels, loaded.class_names, seg_metrics, spacing
                )
        out.record["volumes"].append(row)
        _keep(out, path, example, image, labels, keep_volumes)
    out.record["time_per_slice_s"] = measure.seconds / slices_done
    return out


def _keep(
    out: CellOutput,
    path: Path,
    example: tuple[Path, int],
    image: np.ndarray,
    labels: np.ndarray | None,
    keep_volumes: bool,
) -> None:
    if keep_volumes:
        out.arrays[f"volume/{path.name}"] = image
    if path == example[0]:
        out.arrays["example_image"] = image[example[1]]
        if labels is not None:
            out.arrays["example_labels"] = labels[example[1]]


def _segmentation_cell(
    cell: Cell,
    loaded: Loaded,
    files: list[Path],
    config: BenchmarkConfig,
    measure: Measure,
    inputs: dict[str, np.ndarray] | None,
) -> CellOutput:
    """Segment every volume's input (``inputs[name]``: the images of the ``on`` entry, or the
    targets when None) and score the labels."""
    out = CellOutput({"volumes": []})
    example = example_slice(files)
    wanted = config.metric_names("segmentation")
    slices_done = 0
    for path in files:
        with about_file(path):
            with FastMRIFile(path) as f:
                meta = f.metadata
            stored = _read_arrays(path, [meta.target_key, "segmentation"])
            image = stored[meta.target_key] if inputs is None else inputs[f"volume/{path.name}"]
            if path == files[0]:
                first = image[: config.batch_size]
                measure.first_call(segment_volume, (loaded.segmenter, first), loaded.weights)
            with measure.timed():
                labels = segment_volume(loaded.segmenter, image).labels
            row: dict[str, Any] = {"volume": path.name, "slices": len(image)}
            if "segmentation" in stored:
                spacing = _label_spacing(meta, image.shape[-2:])
                row |= _seg_scores(
                    stored["segmentation"], labels, loaded.class_names, wanted, spacing
                )
        slices_done += len(image)
        out.record["volumes"].append(row)
        _keep(out, path, example, image, labels, keep_volumes=False)
    out.record["time_per_slice_s"] = measure.seconds / slices_done
    return out


# --- cache ---------------------------------------------------------------------------------------


class CellCache:
    """Cell results in ``folder``: ``<key>.json`` (written last: the cell is done) and
    ``<key>.npz`` (its arrays)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def record(self, key: str) -> dict[str, Any] | None:
        path = self.folder / f"{key}.json"
        if not path.is_file() or not (self.folder / f"{key}.npz").is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None

    def arrays(self, key: str) -> dict[str, np.ndarray]:
        with np.load(self.folder / f"{key}.npz") as data:
            return {name: data[name] for name in data.files}

    def has_volumes(self, key: str, files: list[Path]) -> bool:
        with np.load(self.folder / f"{key}.npz") as data:
            return all(f"volume/{p.name}" in data.files for p in files)

    def save(self, key: str, output: CellOutput) -> None:
        with atomic_path(self.folder / f"{key}.npz") as tmp:
            np.savez(tmp, **output.arrays)
        write_json(self.folder / f"{key}.json", output.record)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def checkpoint_identity(entry: ModelEntry) -> dict[str, Any]:
    """What the cache keys see of an entry's checkpoint: its path and SHA-256, or the error."""
    if entry.kind == "classical":
        return {}
    try:
        path = entry.checkpoint_path()
        return {"path": str(path), "sha256": sha256_file(path)}
    except (KscanError, OSError) as err:
        return {"path": entry.checkpoint, "error": str(err)}


# --- the run -------------------------------------------------------------------------------------


@dataclass
class BenchmarkRun:
    """The records of every cell (in plan order) and what this run computed."""

    out_dir: Path
    records: list[dict[str, Any]]
    computed: int
    cached: int

    @property
    def failed(self) -> int:
        return sum(r["error"] is not None for r in self.records)


def _error_text(err: Exception) -> str:
    if isinstance(err, KscanError):
        return str(err)
    where = traceback.extract_tb(err.__traceback__)[-1]
    first = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first} ({Path(where.filename).name}:{where.lineno})"


class Grid:
    """The state of one run: datasets, loaded models, cache keys."""

    def __init__(self, config: BenchmarkConfig, dev: torch.device, out_dir: Path) -> None:
        self.config, self.dev = config, dev
        self.files = {name: dataset_files(name, folder) for name, folder in config.datasets.items()}
        self.fingerprints = {name: dataset_fingerprint(f) for name, f in self.files.items()}
        self.checkpoints = {m.name: checkpoint_identity(m) for m in config.models}
        self.needed = {m.on for m in config.models if m.on not in (None, TARGET)}
        self.cache = CellCache(out_dir / "cache")
        self.keys: dict[tuple[str, str, str, float], str] = {}
        self.loaded: dict[str, Loaded | Exception] = {}

    def key(self, cell: Cell) -> str:
        entry = to_mapping(cell.entry)
        entry.pop("name")
        entry.pop("on")
        upstream = cell.entry.on
        on_target = upstream == TARGET
        if upstream is not None and not on_target:
            upstream = self.keys[(upstream, *cell.setting)]
        value = {
            "kscan": kscan.__version__,
            "entry": entry,
            "checkpoint": self.checkpoints[cell.entry.name],
            "input": upstream,
            "dataset": self.fingerprints[cell.dataset],
            "mask": None
            if on_target
            else [cell.mask.kind, cell.mask.center_fraction, cell.acceleration],
            "seed": self.config.seed,
            "metrics": list(self.config.metrics),
            "device": str(self.dev),
            "batch_size": self.config.batch_size,
            "memory_method": Measure(self.dev).method,
        }
        key = _digest(value)
        self.keys[(cell.entry.name, *cell.setting)] = key
        return key

    def model(self, entry: ModelEntry) -> Loaded:
        if entry.name not in self.loaded:
            try:
                self.loaded[entry.name] = load_entry(entry, self.dev, self.config.batch_size)
            except Exception as err:  # reported in every cell of the entry
                self.loaded[entry.name] = err
        loaded = self.loaded[entry.name]
        if isinstance(loaded, Exception):
            raise loaded
        return loaded

    def compute(self, cell: Cell) -> CellOutput:
        """A cell's output; a failure becomes its ``error``."""
        files = self.files[cell.dataset]
        measure = Measure(self.dev)
        record: dict[str, Any] = {
            "error": None,
            "device": str(self.dev),
            "machine": machine_info(self.dev),
        }
        try:
            loaded = self.model(cell.entry)
            torch.manual_seed(0 if self.config.seed is None else self.config.seed)
            with measure.memory():
                if loaded.segmenter is not None:
                    output = _segmentation_cell(
                        cell, loaded, files, self.config, measure, self._inputs(cell)
                    )
                else:
                    keep = cell.entry.name in self.needed
                    output = _image_cell(cell, loaded, files, self.config, self.dev, measure, keep)
            record |= {
                "parameters": loaded.parameters,
                "checkpoint": loaded.checkpoint,
                "class_names": loaded.class_names,
                "peak_memory_bytes": measure.peak_bytes,
                "memory_method": measure.method,
            }
        except Exception as err:  # one cell's failure must not stop the grid
            record["error"] = _error_text(err)
            output = CellOutput({"volumes": []})
        output.record = record | output.record
        return output

    def _inputs(self, cell: Cell) -> dict[str, np.ndarray] | None:
        if cell.entry.on == TARGET:
            return None
        key = self.keys[(cell.entry.on, *cell.setting)]
        upstream = self.cache.record(key)
        if upstream is None or upstream["error"] is not None:
            reason = "was not computed" if upstream is None else f"failed: {upstream['error']}"
            raise ConfigError(f"on: the entry {cell.entry.on!r} {reason}")
        return self.cache.arrays(key)

    def cached(self, cell: Cell, key: str, retry_failed: bool) -> dict[str, Any] | None:
        record = self.cache.record(key)
        if record is None or (retry_failed and record["error"] is not None):
            return None
        if (
            record["error"] is None
            and cell.entry.name in self.needed
            and not self.cache.has_volumes(key, self.files[cell.dataset])
        ):
            return None  # stored before another entry needed its images
        return record


def evaluate_grid(
    config: BenchmarkConfig,
    out_dir: str | Path | None = None,
    device_name: str | None = None,
    quiet: bool = True,
    retry_failed: bool = False,
    after_cell: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[BenchmarkRun, Grid]:
    """Evaluate (or load from the cache) every cell, in plan order.

    ``after_cell(record)`` is called after each cell computed by this run (not the cached ones).
    """
    out = Path(out_dir if out_dir is not None else config.output_dir)
    dev = device(device_name or config.device)
    grid = Grid(config, dev, out)
    records, computed, cached = [], 0, 0
    cells = plan(config)
    for cell in tqdm(cells, desc="benchmark", disable=quiet):
        key = grid.key(cell)
        record = grid.cached(cell, key, retry_failed)
        if record is None:
            output = grid.compute(cell)
            output.record |= _cell_fields(cell, key)
            grid.cache.save(key, output)
            record = output.record
            computed += 1
            if after_cell is not None:
                after_cell(record)
        else:
            cached += 1
        records.append(record | _cell_fields(cell, key))
    return BenchmarkRun(out, records, computed, cached), grid


def _cell_fields(cell: Cell, key: str) -> dict[str, Any]:
    """The cell's place in the grid (the display name may change without recomputing)."""
    return {
        "key": key,
        "model": cell.entry.name,
        "kind": cell.entry.kind,
        "on": cell.entry.on,
        "dataset": cell.dataset,
        "mask": cell.mask.kind,
        "center_fraction": cell.mask.center_fraction,
        "acceleration": cell.acceleration,
    }


def mean_row(record: dict[str, Any]) -> dict[str, float]:
    """The mean over the cell's volumes of every per-volume value (fastMRI: mean of volumes)."""
    columns: dict[str, list[float]] = {}
    for row in record["volumes"]:
        for name, value in row.items():
            if name != "volume":
                columns.setdefault(name, []).append(float(value))
    return {
        name: (math.fsum(values) / len(values) if name != "slices" else sum(values))
        for name, values in columns.items()
    }
