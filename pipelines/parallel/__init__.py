"""Exact multi-process inference on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

- :mod:`~kscan.pipelines.parallel.comm`: halo exchanges and all-gathers with byte counters;
- :mod:`~kscan.pipelines.parallel.chains`: selective scans along routes split into row bands
  (segment summaries, their affine composition, the correction);
- :mod:`~kscan.pipelines.parallel.band`: band-parallel VM-UNet / MHS-VM;
- :mod:`~kscan.pipelines.parallel.launcher`: ``P`` processes (spawned, or under ``torchrun``),
  faults reported with the rank and the cause.
"""

from kscan.pipelines.parallel.band import BandParallelSegmenter, band_bounds, segment_in_bands
from kscan.pipelines.parallel.comm import Comm
from kscan.pipelines.parallel.launcher import ParallelRunError, launch

__all__ = [
    "BandParallelSegmenter",
    "Comm",
    "ParallelRunError",
    "band_bounds",
    "launch",
    "segment_in_bands",
]
