"""Run a function on ``P`` processes joined in one ``torch.distributed`` process group.

:func:`launch` starts ``P`` local processes (``torch.multiprocessing`` with the ``spawn`` start
method; ``gloo`` for CPU, ``nccl`` with one GPU per rank for CUDA), or, under ``torchrun`` (its
``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` environment), joins the group of the running processes.
Each process calls ``fn(*args)`` inside the initialised group; the return values come back to the
caller in rank order.

Faults: when a rank raises (a bug, bad input, a CUDA out-of-memory error) or dies (a signal, the
OOM killer), the other ranks are terminated and :class:`ParallelRunError` names the rank and the
cause. A rank that fails only because a peer vanished (a ``torch.distributed`` error) is not
blamed when another rank reported a cause. Nothing is written by the launcher: callers write
outputs from the returned values, after every rank succeeded, so a failed run leaves no partial
output.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import distributed as dist

from kscan.errors import ConfigError, KscanError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class ParallelRunError(KscanError, RuntimeError):
    """A rank of a parallel run raised or died; the message names the rank and the cause."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    return "nccl" if device == "cuda" else "gloo"


def _cause(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _worker(
    rank: int,
    world_size: int,
    port: int,
    device: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    """One spawned rank: join the group, run ``fn``, report the result or the cause of failure."""
    if device == "cuda":
        torch.cuda.set_device(rank)
    try:
        dist.init_process_group(
            _backend(device),
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
        )
        # by value (plain pickle), not through shared memory that dies with this process
        results.put(("ok", rank, pickle.dumps(fn(*args))))
    except BaseException as err:
        results.put(("error", rank, isinstance(err, dist.DistError), _cause(err)))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _under_torchrun() -> bool:
    return all(var in os.environ for var in TORCHRUN_VARS)


def _run_torchrun(fn: Callable[..., Any], world_size: int, device: str, args: tuple) -> list[Any]:
    """This process's part of a ``torchrun`` job; every rank's result on rank 0 (None elsewhere)."""
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise ConfigError(
            f"world_size: expected WORLD_SIZE={os.environ['WORLD_SIZE']} as set by torchrun, "
            f"got {world_size}"
        )
    rank = int(os.environ["RANK"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(_backend(device))
    try:
        result = fn(*args)
        gathered: list[Any] | None = [None] * world_size if rank == 0 else None
        dist.gather_object(result, gathered, dst=0)
        return gathered if gathered is not None else []
    except BaseException as err:
        raise ParallelRunError(f"parallel run failed: rank {rank} raised {_cause(err)}") from err
    finally:
        if started:
            dist.destroy_process_group()


def _drain(results: Any) -> list[tuple]:
    out = []
    while True:
        try:
            out.append(results.get_nowait())
        except queue_module.Empty:
            return out


def _blame(messages: list[tuple], fallback: str) -> str:
    """The first cause reported by a rank that did not fail through a peer, else the first one."""
    errors = [m for m in messages if m[0] == "error"]
    primary = [m for m in errors if not m[2]] or errors
    if not primary:
        return fallback
    _, rank, _, cause = primary[0]
    return f"rank {rank} raised {cause}"


def launch(
    fn: Callable[..., Any], world_size: int, args: tuple = (), device: str = "cpu"
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks; returns their return values in rank order.

    ``fn`` must be picklable (a module-level function) and so must ``args`` and the results.
    ``device``: ``"cpu"`` (gloo) or ``"cuda"`` (nccl, rank ``r`` on ``cuda:r``). Under
    ``torchrun`` the processes already exist: ``world_size`` must equal ``WORLD_SIZE``, and rank 0
    gets every result (the other ranks an empty list).

    Raises:
        ParallelRunError: a rank raised or died; names the rank and the cause.
    """
    _backend(device)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size: expected a positive integer, got {world_size!r}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ConfigError(
            f"world_size: {world_size} ranks need {world_size} GPUs, found "
            f"{torch.cuda.device_count()}"
        )
    if _under_torchrun():
        return _run_torchrun(fn, world_size, device, args)
    results = mp.get_context("spawn").Queue()
    context = mp.start_processes(
        _worker,
        args=(world_size, _free_port(), device, fn, args, results),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    messages: list[tuple] = []
    try:
        while not context.join(timeout=0.05):
            messages += _drain(results)
    except mp.ProcessRaisedException as err:
        time.sleep(0.1)
        messages += _drain(results)
        fallback = f"rank {err.error_index} raised {err.msg.strip().splitlines()[-1]}"
        raise ParallelRunError(f"parallel run failed: {_blame(messages, fallback)}") from None
    except mp.ProcessExitedException as err:
        messages += _drain(results)
        how = (
            f"was killed by {err.signal_name}"
            if err.signal_name
            else f"exited with code {err.exit_code}"
        )
        cause = f"rank {err.error_index} {how}"
        reported = _blame(messages, "")
        raise ParallelRunError(
            f"parallel run failed: {cause}" + (f" ({reported})" if reported else "")
        ) from None
    messages += _drain(results)
    done = {m[1]: pickle.loads(m[2]) for m in messages if m[0] == "ok"}
    return [done[r] for r in range(world_size)]
