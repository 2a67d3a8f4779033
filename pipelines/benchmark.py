"""``kscan benchmark CONFIG.yaml``: a grid of models x masks x accelerations x datasets, scored alike.

Every **cell** (one model entry, one dataset, one mask kind, one acceleration) runs on the same
volumes: every fully sampled ``.h5`` file of the dataset (with a target; ``segmentation`` labels
are scored when present), undersampled with the mask of ``kscan undersample`` (seeded by the file
name and the config's ``seed``, :func:`kscan.pipelines.undersample.volume_mask`), so every model
sees identical inputs. Per volume, for the configured metrics:

- SSIM, PSNR, NMSE of the magnitude image cropped to the header's recon size against the target,
  fastMRI's volume conventions (:func:`kscan.pipelines.metrics.reconstruction_metrics`);
- Dice, IoU, HD95 per class (and their mean over classes) of the labels against the file's
  labels, for entries that segment (:mod:`kscan.pipelines.metrics`).

Entries (:mod:`kscan.pipelines.benchmark_config`): a classical method (``kscan reconstruct``'s
``zf``, ``sense``, ``cs``), a learned reconstruction model, a multitask model (its last image and
the argmax of its last logits, cropped to the recon size), or a segmentation model applied to the
images of another entry of the same cell (``on: <name>``) or to the targets (``on: target``; those
cells do not depend on the mask and are computed once). Per cell also: the parameter count,
inference time per slice (the model calls only, after one untimed warm-up call per model, CUDA
synchronised; for a segmentation entry its normalisation and network) and peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` over the cell (peak statistics reset before it): the
  weights, inputs and activations on the device;
- CPU: the process RSS high-water delta: the peak resident set size during the cell (Linux
  ``VmHWM``, reset through ``/proc/self/clear_refs`` before it; elsewhere ``ru_maxrss``, a peak
  over the whole process) minus the resident set size before it; the weights are already loaded,
  the data read and the metrics computed in the cell count.

**Caching**: each cell's result is stored in ``OUT/cache/<key>.json`` (and its images in
``<key>.npz``) as soon as it is done, atomically; ``key`` is the SHA-256 of everything that
determines the cell: the entry (without its display name), its checkpoint's SHA-256, the input
entry's key, the dataset files' names, sizes and modification times, the mask, the seed, the
metrics, the device, the batch size and the kscan version. A killed benchmark resumes at the
first cell not stored; an unchanged config computes nothing. A cell that fails (a missing
checkpoint, a model error) is stored with its error and reported in its row; the others go on
(``--retry-failed`` computes the failed cells again).

Outputs in ``OUT``: ``results.csv``, ``results.md``, ``plots/*.png``, ``examples/*.png``,
``index.html``, ``benchmark.json`` (:mod:`kscan.pipelines.benchmark_report`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kscan.pipelines.benchmark_cells import BenchmarkRun, evaluate_grid
from kscan.pipelines.benchmark_config import BenchmarkConfig, load_config
from kscan.pipelines.benchmark_report import write_outputs
from kscan.pipelines.cli_args import add_quiet


def run_benchmark(
    config: BenchmarkConfig,
    out_dir: str | Path | None = None,
    device_name: str | None = None,
    quiet: bool = True,
    retry_failed: bool = False,
    after_cell: Callable[[dict[str, Any]], None] | None = None,
) -> BenchmarkRun:
    """Evaluate (or load from the cache) every cell, then write the outputs (module docstring).

    ``out_dir`` and ``device_name`` override the config's; ``after_cell(record)`` is called after
    each cell computed by this run (not the cached ones).
    """
    run, grid = evaluate_grid(config, out_dir, device_name, quiet, retry_failed, after_cell)
    write_outputs(run, config, grid)
    return run


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kscan benchmark``."""
    parser = sub.add_parser(
        "benchmark",
        help="score models x masks x accelerations x datasets (tables, plots, HTML; cached cells)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: kscan benchmark configs/benchmark_synthetic.yaml --out runs/bench",
    )
    parser.add_argument("config", help="benchmark YAML file (docs/benchmark.md)")
    parser.add_argument("--out", default=None, help="output folder (default: the config's)")
    parser.add_argument(
        "--device", default=None, help="torch device: cpu, cuda, cuda:1 (default: the config's)"
    )
    parser.add_argument(
        "--retry-failed", action="store_true", help="compute the cells stored as failed again"
    )
    add_quiet(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    run = run_benchmark(config, args.out, args.device, args.quiet, args.retry_failed)
    print(
        f"{len(run.records)} cells: {run.computed} computed, {run.cached} cached, "
        f"{run.failed} failed; results in {run.out_dir}"
    )
