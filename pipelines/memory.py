"""Peak resident memory of a block of code, for the benchmarks.

On Linux the kernel's peak mark (``VmHWM``) is reset to the current resident set just before the
block (writing 5 to ``/proc/self/clear_refs``), so the growth is exact:
``VmHWM(after) - VmRSS(before)``. Elsewhere it is the ``ru_maxrss`` delta, a lower bound (an
earlier, higher peak hides the block's). The measured process should be fresh: run each
measurement in its own process when the numbers matter.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
