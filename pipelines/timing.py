"""Wall-clock timing for benchmarks (never for unit tests).

Each candidate is warmed up, then the candidates are timed in interleaved rounds so that a slow
phase of the machine affects all of them alike; the median of the rounds is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device | None) -> float:
    """Seconds one call takes: between CUDA events on a CUDA device (the device's own clock,
    without the host's launch and synchronisation overhead), else on the host clock."""
    if device is not None and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def compare_times(
    candidates: Mapping[str, Callable[[], object]],
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | None = None,
    isolate_s: float | None = None,
) -> dict[str, dict[str, float]]:
    """Median, min and max seconds per call of each candidate, timed side by side.

    ``isolate_s``: when given, each timed call is isolated from the candidate timed before it:
    sleep ``isolate_s`` seconds (torch's OpenMP workers keep spinning on the CPUs for a while
    after each parallel operation, and would take a CPU from the next call), then make one
    untimed call of the same candidate (caches, clocks and thread pools warm again after the
    sleep), then the timed call. Without it, candidates follow one another directly. Returns
    ``{name: {"median_s": ..., "min_s": ..., "max_s": ..., "repeats": n}}``.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if isolate_s is not None:
                _sync(device)
                time.sleep(isolate_s)
                fn()
            _sync(device)
            samples[name].append(_timed(fn, device))
    return {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "max_s": max(s),
            "repeats": len(s),
        }
        for name, s in samples.items()
    }
