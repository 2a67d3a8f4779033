"""Data parallelism of the batch commands (``kscan reconstruct``, ``kscan segment``): files or
slices sharded over ``P`` ranks, outputs identical to one device and written once.

A command describes its work on one input as a :class:`Job`, the same steps in every mode::

    ctx    = job.setup(device)                   the model or solver on this rank's device
    part   = job.compute(ctx, src, shard, quiet)  the shard's batches of one input's slices
    result = job.merge([part_0, ..., part_P-1])  the whole result (one part: itself)
    paths  = job.write(ctx, src, dst, result)    the outputs of one input, each atomically

:func:`run` picks the mode from the devices (:func:`devices_of`: ``--devices cpu,cpu`` or
``cuda:0,cuda:1,...``, one process each, started by :func:`kscan.pipelines.parallel.launch`; or the
ranks of a ``torchrun`` job; or one device):

- one device: :func:`run_pairs`, the per-file loop, in this process;
- several inputs: rank ``r`` takes the pairs ``r, r + P, r + 2P, ...`` (round-robin over files)
  and runs the same loop on them, writing into a hidden staging folder
  ``<output folder>/.kscan-staging-*``; once every rank has finished, the outputs are renamed
  into the output folder (by the launching process, or by rank 0 under ``torchrun``). A rank
  that fails ends the run (:class:`~kscan.pipelines.parallel.ParallelRunError` names the rank and
  the cause) and the staging folder is deleted: no output of that run appears;
- one input: its batches of slices are dealt round-robin, batch ``b`` to rank ``b mod P``
  (whole batches, so each batch is computed exactly as one device computes it: CG-SENSE and the
  other classical solvers iterate a batch together), the parts are gathered to rank 0, which
  merges them (:func:`take_rows` with :func:`batch_owners`) and writes the outputs.

CPU ranks share the machine's cores: each uses ``cores / P`` torch threads unless
``OMP_NUM_THREADS`` is set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import distributed as dist
from tqdm import tqdm

from kscan.errors import ConfigError
from kscan.pipelines.cli_args import device as parse_device
from kscan.pipelines.parallel.launcher import TORCHRUN_VARS, launch

STAGING_PREFIX = ".kscan-staging-"

Pair = tuple[Path, Path]
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world_size``: the files and the batches of slices it computes."""

    rank: int = 0
    world_size: int = 1

    def owns(self, batch: int) -> bool:
        """Whether batch number ``batch`` (0, 1, ...) of a volume is this rank's: ``b mod P == r``."""
        return batch % self.world_size == self.rank

    def files(self, items: Sequence[T]) -> list[T]:
        """This rank's items, round-robin: ``items[r], items[r + P], ...``."""
        return list(items[self.rank :: self.world_size])


WHOLE = Shard()
"""One rank computing everything."""


def batch_owners(count: int, batch_size: int, world_size: int) -> np.ndarray:
    """The rank computing each of ``count`` items cut into batches of ``batch_size``:
    ``(i // batch_size) mod P`` (int64, ``(count,)``)."""
    return (np.arange(count) // batch_size) % world_size


def take_rows(parts: Sequence[np.ndarray], owners: np.ndarray) -> np.ndarray:
    """The rows ``i`` of ``parts[owners[i]]``: ``out[i] = parts[owners[i]][i]`` (parts of equal shape)."""
    out = parts[0].copy()
    for rank, part in enumerate(parts[1:], start=1):
        mine = owners == rank
        out[mine] = part[mine]
    return out


class Job(Protocol):
    """The work of a batch command on one input (module docstring); picklable for spawned ranks."""

    def setup(self, dev: torch.device) -> Any: ...

    def compute(self, ctx: Any, src: Path, shard: Shard, quiet: bool) -> Any: ...

    def merge(self, parts: list[Any]) -> Any: ...

    def write(self, ctx: Any, src: Path, dst: Path, result: Any) -> list[Path]: ...


def add_devices(parser: argparse.ArgumentParser) -> None:
    """Add ``--devices`` (data parallelism) beside ``--device``."""
    parser.add_argument(
        "--devices",
        default=None,
        help="run on several devices, one process each: cpu,cpu or cuda:0,cuda:1,... (files, "
        "or a single volume's slices, are sharded; outputs as with one device); under torchrun "
        "each rank takes --device (cuda: cuda:LOCAL_RANK)",
    )


def parse_devices(text: str) -> list[torch.device]:
    """``"cuda:0,cuda:1"`` -> devices; all CPU or all distinct ``cuda:N`` of this machine.

    Raises:
        ConfigError: an unknown or unavailable device, a mix of CPU and CUDA, ``cuda`` without
            an index, or a GPU named twice.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--devices: expected a list like cpu,cpu or cuda:0,cuda:1, got {text!r}")
    devices = []
    for name in names:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ConfigError(
                f"--devices: unknown device {name!r}; expected cpu or cuda:N"
            ) from None
        if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and dev.index is None):
            raise ConfigError(f"--devices: {name!r}; expected cpu or cuda:N with its index N")
        devices.append(dev)
    if len({d.type for d in devices}) > 1:
        raise ConfigError(f"--devices: {text}; expected only CPUs or only GPUs")
    if devices[0].type == "cuda":
        count = torch.cuda.device_count()
        missing = [str(d) for d in devices if d.index >= count]
        if missing:
            raise ConfigError(
                f"--devices: {', '.join(missing)} asked for; this machine has {count} CUDA devices"
            )
        if len(set(devices)) < len(devices):
            raise ConfigError(f"--devices: {text}; a GPU can serve one process only")
    return devices


def under_torchrun() -> bool:
    """Whether this process is a rank of a ``torchrun`` job (its environment says so)."""
    return all(var in os.environ for var in TORCHRUN_VARS)


def devices_of(args: argparse.Namespace) -> list[torch.device]:
    """The device of every rank: ``--devices``; under ``torchrun`` ``WORLD_SIZE`` times
    ``--device`` (CUDA: ``cuda:LOCAL_RANK``) unless ``--devices`` lists one per rank; else
    ``[--device]``.

    Raises:
        ConfigError: ``--devices`` with a ``--device`` other than the default, or a list whose
            length is not torchrun's ``WORLD_SIZE``.
    """
    if args.devices is not None and args.device != "cpu":
        raise ConfigError(f"--device {args.device} and --devices {args.devices}: give one of them")
    devices = parse_devices(args.devices) if args.devices is not None else None
    if not under_torchrun():
        return devices or [parse_device(args.device)]
    world_size = int(os.environ["WORLD_SIZE"])
    if devices is not None:
        if len(devices) != world_size:
            raise ConfigError(
                f"--devices: {len(devices)} devices under torchrun with WORLD_SIZE={world_size}; "
                "expected one per rank"
            )
        return devices
    dev = parse_device(args.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return [dev] * world_size


def run_pairs(job: Job, ctx: Any, pairs: Sequence[Pair], quiet: bool, desc: str) -> None:
    """The per-file loop of every mode: compute each input whole and write its outputs."""
    for src, dst in tqdm(pairs, desc=desc, disable=quiet):
        written = job.write(ctx, src, dst, job.compute(ctx, src, WHOLE, quiet))
        tqdm.write(f"{src}: {', '.join(str(_shown(p)) for p in written)}")


def _shown(path: Path) -> Path:
    """A staged output by the name it will have once the run is committed."""
    if path.parent.name.startswith(STAGING_PREFIX):
        return path.parent.parent / path.name
    return path


def run(
    job: Job, pairs: Sequence[Pair], devices: Sequence[torch.device], quiet: bool, desc: str
) -> None:
    """Run ``job`` on every ``(input, output)`` pair on ``devices``, one rank each (module
    docstring); one device and no ``torchrun``: in this process.

    Raises:
        ParallelRunError: a rank raised or died; names the rank and the cause.
    """
    torchrun = under_torchrun()
    if len(devices) == 1 and not torchrun:
        run_pairs(job, job.setup(devices[0]), pairs, quiet, desc)
        return
    pairs = list(pairs)
    staging = None
    if len(pairs) > 1 and not torchrun:
        staging = make_staging(pairs)
    try:
        results = launch(
            _rank_main,
            len(devices),
            (job, pairs, list(devices), staging, quiet, desc),
            devices[0].type,
        )
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if results and results[0] is not None:
        commit(Path(results[0]))


def make_staging(pairs: Sequence[Pair]) -> Path:
    """A new hidden folder in the output folder (every output of ``pairs`` lies in one folder)."""
    folder = pairs[0][1].parent
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))


def commit(staging: Path) -> None:
    """Move everything in ``staging`` into its parent folder (an existing output folder, such as a
    DICOM series, is replaced), then remove ``staging``."""
    for entry in sorted(staging.iterdir()):
        target = staging.parent / entry.name
        if entry.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def _rank_main(
    job: Job,
    pairs: list[Pair],
    devices: list[torch.device],
    staging: Path | None,
    quiet: bool,
    desc: str,
) -> Path | None:
    """One rank of :func:`run`; returns the staging folder (None for a single input)."""
    shard = Shard(dist.get_rank(), dist.get_world_size())
    dev = devices[shard.rank]
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // shard.world_size))
    quiet = quiet or shard.rank > 0
    ctx = job.setup(dev)
    if len(pairs) == 1:
        ((src, dst),) = pairs
        part = job.compute(ctx, src, shard, quiet)
        parts = [None] * shard.world_size if shard.rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        if shard.rank == 0:
            written = job.write(ctx, src, dst, job.merge(parts))
            tqdm.write(f"{src}: {', '.join(str(p) for p in written)}")
        return None
    if staging is None:  # torchrun: rank 0 makes the folder, the others learn its name
        shared = [make_staging(pairs) if shard.rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        staging = shared[0]
    mine = [(src, staging / dst.name) for src, dst in shard.files(pairs)]
    run_pairs(job, ctx, mine, quiet, desc)
    return staging
