"""The training loop of ``kscan train``: one engine for every kscan task.

**Steps.** Each epoch visits the training slices in the order of a ``DistributedSampler``
(a permutation seeded by ``seed + epoch``; with P processes, process r takes every P-th index
from r), in batches of ``data.batch_size`` per process. One step: forward (bf16 autocast on CUDA
when asked), the task's loss, backward (DistributedDataParallel averages the gradients over
processes), gradient-norm clipping, AdamW, the warm-up + cosine schedule
(:mod:`kscan.pipelines.train_config`). ``S = optim.total_steps`` or ``epochs x`` steps per epoch.

**Outputs** in ``output_dir`` (only process 0 writes; every write is atomic):

- ``step_NNNNNNN.safetensors`` every ``checkpoint_every`` steps and at the end, copied to
  ``last.safetensors``: weights, optimiser and scheduler state, random-generator states, the
  position (step, epoch, batches done in the epoch), the config, the log so far
  (:mod:`kscan.pipelines.train_state`); ``best.safetensors``: the weights with the best
  validation metric so far (the task's ``best_metric``; SSIM for reconstruction, mean foreground
  Dice for segmentation, ``(ssim + dice) / 2`` for multitask).
- ``log.csv``: one row per epoch (and one at the end of a run that stops mid-epoch):
  epoch, step, lr, train_loss (mean over the epoch's steps and processes), validation metrics
  (empty when not validated). Rewritten whole from the log kept in the checkpoints, so a resumed
  run never repeats a row.
- ``metrics.json``: when training completes, the last and the best validation metrics.

**Resume.** When ``output_dir`` holds ``last.safetensors`` the run continues from it, with or
without ``--resume``, provided its config is the same (``device`` and ``data.num_workers`` may
change); another config, or another number of processes, fails and names what differs. It
restores everything listed above and skips the batches of the epoch already done, so on CPU (same
thread count) the weights after the last step equal, bit for bit, those of a run that was never
interrupted. (On CUDA, kernels that are not
deterministic can make two runs differ by rounding even without a resume.)

**Processes.** Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment)
each process trains on its share of every batch: ``nccl`` on CUDA (device ``cuda:LOCAL_RANK``),
``gloo`` on CPU. P processes with batch b take the same steps as one process with batch P b, up to
floating-point rounding. Validation runs on process 0 while the others wait.
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler, default_collate
from tqdm import tqdm

import kscan
from kscan.config import to_mapping
from kscan.errors import ConfigError
from kscan.models import registry
from kscan.pipelines.atomic import atomic_path, write_json, write_text
from kscan.pipelines.checkpoint import load_state, read_checkpoint, save_checkpoint
from kscan.pipelines.cli_args import device as parse_device
from kscan.pipelines.train_config import OptimConfig, TrainConfig, config_differences
from kscan.pipelines.train_multitask import MultitaskTask
from kscan.pipelines.train_reconstruction import ReconstructionTask
from kscan.pipelines.train_segmentation import SegmentationTask
from kscan.pipelines.train_state import (
    load_optimizer_state,
    load_rng_state,
    optimizer_state,
    rng_state,
)

TASKS = {
    "reconstruction": ReconstructionTask,
    "segmentation": SegmentationTask,
    "multitask": MultitaskTask,
}
"""Task name -> task class (see :mod:`kscan.pipelines.train_reconstruction` for the interface)."""

LAST = "last.safetensors"
BEST = "best.safetensors"
LOG = "log.csv"
METRICS = "metrics.json"


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The factor on ``lr`` of update ``step`` (0-based): linear warm-up over ``warmup`` updates,
    then a cosine from 1 down to ``min_ratio = min_lr / lr``, reached after the last of ``total``
    updates (formula in :mod:`kscan.pipelines.train_config`)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Progress:
    """Where a run stands, and its log; saved in every checkpoint's metadata."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    best: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Processes:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started: bool = False

    @classmethod
    def from_env(cls) -> Processes:
        env = os.environ
        return cls(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        )

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size)
            self.started = True

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over processes."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def stop(self) -> None:
        if self.started:
            dist.destroy_process_group()


def _device(name: str, processes: Processes) -> torch.device:
    device = parse_device(name)
    if device.type == "cuda" and processes.world_size > 1:
        device = torch.device("cuda", processes.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


class Trainer:
    """One training run; :func:`train` is the way to use it."""

    def __init__(self, config: TrainConfig, processes: Processes, quiet: bool = False) -> None:
        self.config = config
        self.processes = processes
        self.quiet = quiet or not processes.main
        self.out = Path(config.output_dir)
        self.device = _device(config.device, processes)
        if config.precision == "bf16" and self.device.type != "cuda" and not self.quiet:
            print(
                f"kscan: warning: precision: bf16 autocast runs on CUDA only; training in fp32 "
                f"on {self.device}",
                file=sys.stderr,
            )
        _seed_everything(config.seed)
        self.task = TASKS[config.task](config, self.device)
        self.train_set, self.val_set = self.task.datasets()
        self.model = registry.build_model(config.model, config.model_config).to(self.device)
        self.optimizer = _optimizer(self.model, config.optim)
        self.sampler = DistributedSampler(
            self.train_set,
            num_replicas=processes.world_size,
            rank=processes.rank,
            shuffle=True,
            seed=config.seed,
        )
        batch_size = config.data.batch_size
        self.steps_per_epoch = math.ceil(len(self.sampler) / batch_size)
        optim = config.optim
        self.total_steps = optim.total_steps or optim.epochs * self.steps_per_epoch
        factor = partial(
            lr_factor,
            warmup=optim.warmup_steps,
            total=self.total_steps,
            min_ratio=optim.min_lr / optim.lr,
        )
        self.scheduler = LambdaLR(self.optimizer, factor)
        self.progress = Progress()
        trained = self.task.trained_module(self.model)
        self.forward = DistributedDataParallel(trained) if processes.world_size > 1 else trained

    # --- checkpoints ------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "kscan_version": kscan.__version__,
            "task": self.config.task,
            "train_config": to_mapping(self.config),
            "world_size": self.processes.world_size,
            "progress": to_mapping(self.progress),
            **self.task.checkpoint_meta(),
        }

    def save(self) -> None:
        """Write ``step_NNNNNNN.safetensors`` and ``last.safetensors`` (process 0)."""
        if not self.processes.main:
            return
        opt_tensors, opt_meta = optimizer_state(self.optimizer)
        rng_tensors, rng_meta = rng_state()
        meta = {
            **self._meta(),
            "optimizer": opt_meta,
            "scheduler": {
                k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"
            },
            "rng": rng_meta,
        }
        path = self.out / f"step_{self.progress.step:07d}.safetensors"
        save_checkpoint(path, self.config.model, self.model, {**opt_tensors, **rng_tensors}, meta)
        with atomic_path(self.out / LAST) as tmp:
            shutil.copyfile(path, tmp)

    def restore(self, resume: bool) -> None:
        """Continue from ``last.safetensors`` when there is one (module docstring)."""
        path = self.out / LAST
        if not path.is_file():
            if resume:
                raise ConfigError(f"--resume: {path} does not exist; nothing to resume")
            return
        checkpoint = read_checkpoint(path)
        if checkpoint.task != self.config.task:
            raise ConfigError(
                f"{path}: holds a {checkpoint.task} model ({checkpoint.model!r}), expected a "
                f"{self.config.task} model; use another output_dir"
            )
        saved = checkpoint.meta.get("train_config", {})
        changed = config_differences(saved, to_mapping(self.config))
        if changed:
            raise ConfigError(
                f"{path}: was trained with another config (different: {', '.join(changed)}); "
                f"restore that config or use another output_dir"
            )
        saved_world = checkpoint.meta.get("world_size", 1)
        if saved_world != self.processes.world_size:
            raise ConfigError(
                f"{path}: was trained by {saved_world} process(es), this run has "
                f"{self.processes.world_size}; the batches would differ"
            )
        load_state(self.model, checkpoint.state, path)
        load_optimizer_state(self.optimizer, checkpoint.extra, checkpoint.meta["optimizer"])
        self.scheduler.load_state_dict({**checkpoint.meta["scheduler"], "lr_lambdas": [None]})
        load_rng_state(checkpoint.extra, checkpoint.meta["rng"])
        self.progress = Progress(**checkpoint.meta["progress"])

    # --- logs -----------------------------------------------------------------------------------

    def _write_log(self) -> None:
        if not self.processes.main:
            return
        columns = ["epoch", "step", "lr", "train_loss", *(f"val_{m}" for m in self.task.metrics)]
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        for row in self.progress.rows:
            writer.writerow(row)
        write_text(self.out / LOG, text.getvalue())

    def _validate(self) -> dict[str, float]:
        """Validation metrics (process 0; ``{}`` elsewhere or without a validation set)."""
        metrics: dict[str, float] = {}
        if self.val_set is not None and self.processes.main:
            loader = DataLoader(
                self.val_set,
                batch_size=self.config.data.batch_size,
                num_workers=self.config.data.num_workers,
                collate_fn=default_collate,
            )
            self.model.eval()
            metrics = self.task.validate(self.model, loader)
            self.model.train()
            self._keep_best(metrics)
        self.processes.barrier()
        return metrics

    def _keep_best(self, metrics: dict[str, float]) -> None:
        value = metrics[self.task.best_metric]
        if self.progress.best is not None and value <= self.progress.best:
            return
        self.progress.best = value
        meta = {**self._meta(), "metrics": metrics}
        save_checkpoint(self.out / BEST, self.config.model, self.model, meta=meta)

    def _log_row(self, validate: bool) -> None:
        """Close the current log row (at most one per step), validating when asked."""
        p = self.progress
        if any(row["step"] == p.step for row in p.rows):
            return
        metrics = self._validate() if validate else {}
        p.rows.append(
            {
                "epoch": p.epoch,
                "step": p.step,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": p.loss_sum / p.loss_count if p.loss_count else "",
                **{f"val_{k}": v for k, v in metrics.items()},
            }
        )
        self._write_log()

    def _end_epoch(self) -> None:
        p = self.progress
        due = (p.epoch + 1) % self.config.validate_every == 0 or p.step == self.total_steps
        self._log_row(validate=due)
        p.epoch, p.batch, p.loss_sum, p.loss_count = p.epoch + 1, 0, 0.0, 0

    # --- the loop -------------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        """This epoch's batches that are not done yet."""
        p, data = self.progress, self.config.data
        self.sampler.set_epoch(p.epoch)
        self.task.set_epoch(p.epoch)
        indices = list(self.sampler)[p.batch * data.batch_size :]
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.config.seed, p.epoch]).generate_state(1)[0])
        )
        return DataLoader(
            self.train_set,
            batch_size=data.batch_size,
            sampler=indices,
            num_workers=data.num_workers,
            collate_fn=default_collate,
            generator=generator,  # worker seeds; leaves the global generator alone
        )

    def _step(self, batch: dict[str, Any]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.task.loss(self.model, batch, self.forward)
        loss.backward()
        if self.config.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return self.processes.mean(loss.item())

    def run(self, max_steps: int | None = None) -> dict[str, Any]:
        """Train to the last step (or to ``max_steps``); the final metrics (process 0)."""
        p = self.progress
        stop = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        self.model.train()
        bar = tqdm(total=stop, initial=p.step, desc="training", disable=self.quiet)
        while p.step < stop:
            if p.batch == self.steps_per_epoch:
                self._end_epoch()
                continue
            for batch in self._loader():
                loss = self._step(batch)
                p.step, p.batch = p.step + 1, p.batch + 1
                p.loss_sum, p.loss_count = p.loss_sum + loss, p.loss_count + 1
                bar.update()
                bar.set_postfix(epoch=p.epoch, loss=f"{loss:.4g}")
                if p.step % self.config.checkpoint_every == 0:
                    self.save()
                if p.step == stop:
                    break
        bar.close()
        if p.batch == self.steps_per_epoch:
            self._end_epoch()
        finished = p.step == self.total_steps
        if finished and p.batch > 0:  # the last epoch stopped part-way: validate it too
            self._log_row(validate=True)
        self.save()
        return self._finish() if finished else {}

    def _finish(self) -> dict[str, Any]:
        rows = [row for row in self.progress.rows if f"val_{self.task.best_metric}" in row]
        best = max(rows, key=lambda r: r[f"val_{self.task.best_metric}"], default=None)
        result = {
            "model": self.config.model,
            "task": self.config.task,
            "steps": self.progress.step,
            "last": rows[-1] if rows else None,
            "best": best,
            "output_dir": str(self.out),
        }
        if self.processes.main:
            write_json(self.out / METRICS, result)
        return result


def train(
    config: TrainConfig,
    resume: bool = False,
    max_steps: int | None = None,
    quiet: bool = False,
    processes: Processes | None = None,
) -> dict[str, Any]:
    """Train ``config`` (module docstring); returns the final metrics (``{}`` when stopped early).

    Args:
        config: the run.
        resume: require ``last.safetensors`` in ``output_dir`` (it is used when present anyway).
        max_steps: stop after this global step, with a checkpoint, as if interrupted; a later
            run continues from there.
        quiet: no progress bar or warnings.
        processes: this process's rank and the number of processes (default: from the
            ``torchrun`` environment; one process when unset).
    """
    processes = processes or Processes.from_env()
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps: expected a positive number of steps, got {max_steps}")
    processes.start(_device(config.device, processes))
    try:
        trainer = Trainer(config, processes, quiet)
        trainer.restore(resume)
        return trainer.run(max_steps)
    finally:
        processes.stop()


def train_process(rank: int, world_size: int, config: TrainConfig, max_steps: int | None) -> None:
    """One of ``world_size`` local processes (for ``torch.multiprocessing.spawn``; needs
    ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment)."""
    train(config, max_steps=max_steps, quiet=True, processes=Processes(rank, world_size, rank))
