"""Exact multi-process inference on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

- :mod:`~kscan.pipelines.parallel.comm`: halo exchanges and all-gathers with byte counters;
- :mod:`~kscan.pipelines.parallel.chains`: selective scans along routes split into row bands
  (segment summaries, their affine composition, the correction);
- :mod:`~kscan.pipelines.parallel.band`: band-parallel VM-UNet / MHS-VM;
- :mod:`~kscan.pipelines.parallel.sliding_window`: MONAI-style overlapping-window inference with
  the windows split across ranks;
- :mod:`~kscan.pipelines.parallel.rvn_bands`: RecurrentVarNet on one large slice, coils split
  across ranks and the Conv-GRU on row bands;
- :mod:`~kscan.pipelines.parallel.launcher`: ``P`` processes (spawned, or under ``torchrun``),
  faults reported with the rank and the cause.
- :mod:`~kscan.pipelines.parallel.data_parallel`: ``kscan reconstruct|segment --devices``, files
  or a volume's batches of slices sharded over ranks.
"""

from kscan.pipelines.parallel.band import BandParallelSegmenter, band_bounds, segment_in_bands
from kscan.pipelines.parallel.comm import Comm
from kscan.pipelines.parallel.launcher import ParallelRunError, launch
from kscan.pipelines.parallel.rvn_bands import BandParallelRecurrentVarNet, rvn_in_bands
from kscan.pipelines.parallel.sliding_window import distributed_sliding_window_inference

__all__ = [
    "BandParallelRecurrentVarNet",
    "BandParallelSegmenter",
    "Comm",
    "ParallelRunError",
    "band_bounds",
    "distributed_sliding_window_inference",
    "launch",
    "rvn_in_bands",
    "segment_in_bands",
]
