"""Peak memory of a block of code, for the benchmarks, measured two ways.

- :func:`peak_rss`: the process's resident set. On Linux the kernel's peak mark (``VmHWM``) is
  reset to the current resident set just before the block (writing 5 to
  ``/proc/self/clear_refs``), so the growth is exact: ``VmHWM(after) - VmRSS(before)``. Elsewhere
  it is the ``ru_maxrss`` delta, a lower bound (an earlier, higher peak hides the block's). Memory
  the process already holds (freed by earlier work, kept by the allocator) is reused without
  raising the resident set, so the measured process should be fresh when the numbers matter.
- :func:`peak_tensor_bytes`: the bytes of the torch tensor storages a call creates, at their peak
  and at its end, counted op by op (a ``TorchDispatchMode``): what a CPU run allocates for
  tensors, independent of what the process held before, like CUDA's allocator statistics.
  Allocations outside torch (numpy, numba scratch) are not seen.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

EXACT_METHOD = "VmHWM after - VmRSS before, the peak mark reset before the block"
BOUND_METHOD = "ru_maxrss delta (a lower bound)"


@dataclass
class PeakRSS:
    """Resident-set sizes around a block, in bytes (filled in when the block ends)."""

    before_bytes: int = 0
    peak_bytes: int = 0
    exact: bool = False

    @property
    def growth_bytes(self) -> int:
        """Peak during the block minus the resident set before it (never negative)."""
        return max(self.peak_bytes - self.before_bytes, 0)

    @property
    def method(self) -> str:
        return EXACT_METHOD if self.exact else BOUND_METHOD


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def max_rss_bytes() -> int:
    """The process's peak resident set so far (``ru_maxrss``) in bytes."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@contextlib.contextmanager
def peak_rss() -> Iterator[PeakRSS]:
    """Measure the peak resident set of the block: ``with peak_rss() as m: ...; m.growth_bytes``."""
    record = PeakRSS()
    record.exact = _reset_peak()
    current = _status_bytes("VmRSS") if record.exact else None
    record.before_bytes = current if current is not None else max_rss_bytes()
    yield record
    peak = _status_bytes("VmHWM") if record.exact else None
    record.peak_bytes = peak if peak is not None else max_rss_bytes()


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive: current and peak."""

    def __init__(self, existing: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._keys = {t.untyped_storage().data_ptr() for t in existing}

    def _free(self, key: int, nbytes: int) -> None:
        self._keys.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {  # a view or in-place result lives in an input's storage: not a new one
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self._keys and key not in inputs:
                self._keys.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_tensor_bytes(fn: Callable[[], Any], existing: Iterable[torch.Tensor]) -> tuple[int, int]:
    """``(peak, kept)``: the most bytes of tensor storages created by ``fn`` alive at once, and the
    bytes still alive when it returns (what it returns, or keeps for a backward pass). Storages of
    ``existing`` tensors (inputs, weights) are not counted."""
    meter = _LiveBytes(existing)
    with meter:
        result = fn()
    kept = meter.live
    del result
    return meter.peak, kept
