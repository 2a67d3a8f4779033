"""A thin layer over ``torch.distributed`` for band parallelism, counting the bytes each rank moves.

Works with ``gloo`` (CPU tensors) and ``nccl`` (CUDA tensors) process groups, and without any
process group (one rank: every exchange is local and moves nothing).

Byte counts are per rank and per kind of exchange (``"halo"``, ``"summaries"``, ``"gather"``,
...): a halo exchange counts the rows sent to and received from the neighbours; an all-gather of
``b`` bytes per rank counts ``(P - 1) b`` sent and received, the least any algorithm moves in and
out of each rank (ring all-gathers move exactly that); an all-reduce of ``b`` bytes counts
``2 (P - 1) b / P`` each way (a ring reduce-scatter then all-gather), a reduce-scatter into
pieces of ``b`` bytes ``(P - 1) b``, an all-to-all the pieces for the other ranks.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import distributed as dist


class Comm:
    """Exchanges between the ranks of ``group`` (the default group when None).

    Attributes:
        rank, world_size: this rank and the number of ranks (0 and 1 without a process group).
        sent, received: bytes moved by this rank so far, per kind of exchange.
        calls: exchanges made so far, per kind (each a latency on the critical path).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if initialized else 0
        self.world_size = dist.get_world_size(group) if initialized else 1
        self.sent: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def reset_counters(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.calls.clear()

    def exchange_halos(
        self, x: torch.Tensor, rows: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The ``rows`` rows just above and just below this rank's band ``x (..., h, W)``.

        Sends ``x[..., :rows, :]`` to rank - 1 and ``x[..., -rows:, :]`` to rank + 1 and returns
        ``(above, below)``, each ``(..., rows, W)``, None at the true image border (rank 0 has no
        rows above, the last rank none below) or when ``rows == 0``.
        """
        if rows == 0 or self.world_size == 1:
            return None, None
        shape = (*x.shape[:-2], rows, x.shape[-1])
        ops, above, below = [], None, None
        if self.rank > 0:
            above = x.new_empty(shape)
            top = x[..., :rows, :].contiguous()
            ops += [
                dist.P2POp(dist.isend, top, self._global(self.rank - 1), self.group),
                dist.P2POp(dist.irecv, above, self._global(self.rank - 1), self.group),
            ]
        if self.rank < self.world_size - 1:
            below = x.new_empty(shape)
            bottom = x[..., -rows:, :].contiguous()
            ops += [
                dist.P2POp(dist.isend, bottom, self._global(self.rank + 1), self.group),
                dist.P2POp(dist.irecv, below, self._global(self.rank + 1), self.group),
            ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        self.calls["halo"] += 1
        for t in (above, below):
            if t is not None:
                nbytes = t.numel() * t.element_size()
                self.sent["halo"] += nbytes
                self.received["halo"] += nbytes
        return above, below

    def all_gather(self, x: torch.Tensor, kind: str) -> list[torch.Tensor]:
        """Every rank's ``x`` (same shape on every rank), in rank order."""
        if self.world_size == 1:
            return [x]
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(out, x, group=self.group)
        self.calls[kind] += 1
        nbytes = (self.world_size - 1) * x.numel() * x.element_size()
        self.sent[kind] += nbytes
        self.received[kind] += nbytes
        return out

    def all_to_all(
        self, pieces: list[torch.Tensor], shapes: list[tuple[int, ...]], kind: str
    ) -> list[torch.Tensor]:
        """Send ``pieces[q]`` to rank ``q``; returns what each rank ``r`` sent here, shaped
        ``shapes[r]`` (one dtype throughout; sizes may differ between ranks). One collective
        (``all_to_all_single`` with split sizes); a rank's piece for itself is not counted."""
        if self.world_size == 1:
            return [pieces[0].reshape(shapes[0])]
        flat = torch.cat([p.reshape(-1) for p in pieces])
        sizes_in = [p.numel() for p in pieces]
        sizes_out = [math.prod(shape) for shape in shapes]
        out = flat.new_empty(sum(sizes_out))
        dist.all_to_all_single(out, flat, sizes_out, sizes_in, group=self.group)
        self.calls[kind] += 1
        size = flat.element_size()
        self.sent[kind] += size * (sum(sizes_in) - sizes_in[self.rank])
        self.received[kind] += size * (sum(sizes_out) - sizes_out[self.rank])
        return [part.view(shape) for part, shape in zip(out.split(sizes_out), shapes, strict=True)]

    def all_gather_rows(self, x: torch.Tensor, heights: list[int], kind: str) -> torch.Tensor:
        """Bands ``x (..., heights[rank], W)`` of every rank, concatenated along rows.

        Bands are zero-padded to the tallest for the all-gather and cut back afterwards.
        """
        tallest = max(heights)
        pad = x.new_zeros(*x.shape[:-2], tallest, x.shape[-1])
        pad[..., : x.shape[-2], :] = x
        parts = self.all_gather(pad, kind)
        return torch.cat([p[..., :h, :] for p, h in zip(parts, heights, strict=True)], dim=-2)

    def reduce_scatter_rows(self, x: torch.Tensor, heights: list[int], kind: str) -> torch.Tensor:
        """This rank's rows ``(..., heights[rank], W)`` of the sum over ranks of ``x (..., H, W)``
        (``H = sum(heights)``). Real tensors; bands zero-padded to the tallest for the collective."""
        if self.world_size == 1:
            return x
        tallest, starts = max(heights), [sum(heights[:r]) for r in range(len(heights))]
        pieces = []
        for start, h in zip(starts, heights, strict=True):
            piece = x.new_zeros(*x.shape[:-2], tallest, x.shape[-1])
            piece[..., :h, :] = x[..., start : start + h, :]
            pieces.append(piece)
        out = torch.empty_like(pieces[0])
        dist.reduce_scatter(out, pieces, group=self.group)
        self.calls[kind] += 1
        nbytes = (self.world_size - 1) * out.numel() * out.element_size()
        self.sent[kind] += nbytes
        self.received[kind] += nbytes
        return out[..., : heights[self.rank], :]

    def all_reduce_sum(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """The sum of every rank's ``x`` (same shape on every rank), in place; returns ``x``."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        self.calls[kind] += 1
        nbytes = 2 * (self.world_size - 1) * x.numel() * x.element_size() // self.world_size
        self.sent[kind] += nbytes
        self.received[kind] += nbytes
        return x

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective: every rank must call it)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([0 if flag else 1], dtype=torch.int64)
        if dist.get_backend(self.group) == "nccl":
            value = value.cuda()
        dist.all_reduce(value, group=self.group)
        return int(value.item()) == 0
