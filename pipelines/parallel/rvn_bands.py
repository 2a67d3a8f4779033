"""RecurrentVarNet on one large slice over ``P`` ranks (issue 9, section 3): exact.

With coils split into ``P`` contiguous groups ``c in C_r`` and image rows into ``P`` bands, one
step of :class:`~kscan.models.recurrentvarnet.RecurrentVarNet` runs as::

    x_t      = reduce-scatter over ranks of  sum_{c in C_r} conj(S_c) F^-1 k_c     rank r: its band
    w_t, h'  = ConvGRU_t(x_t, h)                    on the band, halos from the neighbours
    w        = all-gather of the bands of w_t                                     whole image
    k_c'     = k_c - alpha_t M (k_c - y_c) + F(S_c w)        for c in C_r

so the FFTs, expand and reduce of a coil run on its rank only, and the Conv-GRU (the compute)
and its hidden state (``hidden x layers`` maps, the memory) on a band. The model's own modules
run unchanged; each replication-padding layer in front of a convolution (Conv-GRU and
state initializer) is swapped, for the call, for :class:`_BandReplicationPad`, which takes the
``dilation (k // 2)`` rows above and below from the neighbouring ranks and replicates only at
the true image border (layer 0's 5x5: 2 rows; layer 1's dilated 3x3: 2; others: 1; the
initializer's dilations 1, 1, 2, 4). The 1x1 gates are per pixel. The normalised variant's group
statistics (mean and unbiased std over a group's channels and pixels) come from all-reduced sums.

The learned initializer's input is linear in the coils (``sense``, ``zero_filled``): it is the
model's own ``_initializer_input`` on each rank's coils, all-reduced (whole image, as the FFT
needs), then cut to the band. The output k-space is gathered over coils at the end.

Exact: equal to the single-process forward up to the order of the sums over coils and ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

from kscan.errors import ConfigError, ShapeError
from kscan.models.recurrentvarnet import (
    NormConvGRU,
    RecurrentVarNet,
    State,
    _from_channels,
    _to_channels,
    check_inputs,
)
from kscan.physics import coils
from kscan.physics.consistency import soft_dc
from kscan.physics.fft import fft2c, ifft2c
from kscan.pipelines.parallel.band import band_bounds
from kscan.pipelines.parallel.comm import Comm


class _BandReplicationPad(nn.Module):
    """``ReplicationPad2d(p)`` of the whole image, computed on a row band ``(batch, c, h, W)``:
    ``p`` halo rows from each neighbour (replicated rows at the true top and bottom), then
    ``p`` replicated columns on each side (corners as ``ReplicationPad2d``: the corner pixel)."""

    def __init__(self, pad: int, comm: Comm) -> None:
        super().__init__()
        self.pad, self.comm = pad, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad
        if p > x.shape[-2]:
            raise ShapeError(f"x: a band of {x.shape[-2]} rows is thinner than the halo of {p}")
        above, below = self.comm.exchange_halos(x, p)
        top = x[..., :1, :].expand(*x.shape[:-2], p, x.shape[-1]) if above is None else above
        bottom = x[..., -1:, :].expand(*x.shape[:-2], p, x.shape[-1]) if below is None else below
        return F.pad(torch.cat([top, x, bottom], dim=-2), (p, p, 0, 0), mode="replicate")


class _BandNormConvGRU(nn.Module):
    """:class:`~kscan.models.recurrentvarnet.NormConvGRU` on a band: the group mean and unbiased
    std over the whole image from all-reduced sums (two passes), then its ``convgru``."""

    def __init__(self, inner: NormConvGRU, comm: Comm, pixels: int) -> None:
        super().__init__()
        self.inner, self.comm, self.pixels = inner, comm, pixels

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce_sum(x.sum(dim=-1, keepdim=True), "moments")

    def forward(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        groups = self.inner.groups
        grouped = x.reshape(x.shape[0], groups, -1)
        count = self.pixels * x.shape[1] // groups  # elements of a group over the whole image
        mean = self._sum(grouped) / count
        std = (self._sum((grouped - mean).square()) / (count - 1)).sqrt()
        out, state = self.inner.convgru(((grouped - mean) / std).reshape(x.shape), state)
        out = out.reshape(out.shape[0], groups, -1) * std + mean
        return out.reshape(x.shape), state


class BandParallelRecurrentVarNet:
    """Run a :class:`~kscan.models.recurrentvarnet.RecurrentVarNet` on one slice over the ranks
    of ``group`` (coils split for the FFTs, rows split for the Conv-GRU; see the module
    docstring). Without a process group it runs as one rank. ``comm`` holds the byte counters
    (kinds ``"halo"``, ``"image"`` (reduce-scatter), ``"update"`` (all-gather), ``"init"``,
    ``"moments"``, ``"coils"``)."""

    def __init__(self, model: RecurrentVarNet, group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(model, RecurrentVarNet):
            raise ConfigError(f"model: expected a RecurrentVarNet, got {type(model).__name__}")
        self.model = model
        self.comm = Comm(group)

    @contextlib.contextmanager
    def _banded(self, pixels: int) -> Iterator[None]:
        swaps: list[tuple[nn.Module, str, nn.Module]] = []
        for module in self.model.modules():
            for name, child in module.named_children():
                if isinstance(child, nn.ReplicationPad2d):
                    pads = set(child.padding)
                    if len(pads) != 1:
                        raise ConfigError(f"model: expected square padding, got {child.padding}")
                    swaps.append((module, name, _BandReplicationPad(pads.pop(), self.comm)))
                elif isinstance(child, NormConvGRU):
                    swaps.append((module, name, _BandNormConvGRU(child, self.comm, pixels)))
        originals = [(m, n, getattr(m, n)) for m, n, _ in swaps]
        for module, name, banded in swaps:
            setattr(module, name, banded)
        try:
            yield
        finally:
            for module, name, original in originals:
                setattr(module, name, original)

    def __call__(
        self,
        masked_kspace: torch.Tensor,
        mask: torch.Tensor,
        sensitivity_map: torch.Tensor,
        initial_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's forward (the last k-space ``(batch, coil, H, W)``) on every rank; the
        same arguments, the same on every rank."""
        model, comm = self.model, self.comm
        check_inputs(masked_kspace, mask, sensitivity_map)
        ncoils, height, width = masked_kspace.shape[-3:]
        rank, ranks = comm.rank, comm.world_size
        if ncoils < ranks:
            raise ShapeError(f"masked_kspace: expected at least {ranks} coils, got {ncoils}")
        rows = band_bounds(height, ranks, 1)
        heights = [b - a for a, b in zip(rows, rows[1:], strict=False)]
        band = slice(rows[rank], rows[rank + 1])
        split = [ncoils * r // ranks for r in range(ranks + 1)]
        mine = slice(split[rank], split[rank + 1])
        y, maps = masked_kspace[:, mine], sensitivity_map[:, mine]
        per_coil = mask.ndim >= 3 and mask.shape[-3] > 1
        m = mask.expand(masked_kspace.shape)[:, mine] if per_coil else mask
        centered = model.config.centered
        with torch.no_grad(), self._banded(height * width):
            state = None
            if model.initializer is not None:
                init = model._initializer_input(y, maps, initial_image)
                if model.config.initializer_initialization != "input_image":
                    init = _complex(comm.all_reduce_sum(torch.view_as_real(init), "init"))
                state = model.initializer(_to_channels(init[..., band, :]))
            k = y
            for step in range(model.config.num_steps):
                block = model.block_list[step if model.config.no_parameter_sharing else 0]
                partial = torch.view_as_real(coils.reduce(ifft2c(k, centered), maps))
                image = comm.reduce_scatter_rows(partial.movedim(-1, 0), heights, "image")
                update, state = block.regularizer(
                    _to_channels(_complex(image.movedim(0, -1))), state
                )
                w = comm.all_gather_rows(update, heights, "update")
                k = soft_dc(k, y, m, block.learning_rate) + fft2c(
                    coils.expand(_from_channels(w), maps), centered
                )
        return self._gather_coils(k, split)

    def _gather_coils(self, k: torch.Tensor, split: list[int]) -> torch.Tensor:
        counts = [b - a for a, b in zip(split, split[1:], strict=False)]
        padded = k.new_zeros(k.shape[0], max(counts), *k.shape[2:])
        padded[:, : k.shape[1]] = k
        parts = self.comm.all_gather(torch.view_as_real(padded), "coils")
        return torch.cat([_complex(p)[:, :c] for p, c in zip(parts, counts, strict=True)], dim=1)


def _complex(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(x.contiguous())


def rvn_in_bands(
    model: RecurrentVarNet,
    masked_kspace: torch.Tensor,
    mask: torch.Tensor,
    sensitivity_map: torch.Tensor,
) -> dict[str, object]:
    """One rank's part (for :func:`~kscan.pipelines.parallel.launch`): ``{"output": k-space
    (batch, coil, H, W) on rank 0 (None elsewhere), "sent": {...}, "received": {...}}``."""
    runner = BandParallelRecurrentVarNet(model.eval())
    out = runner(masked_kspace, mask, sensitivity_map)
    return {
        "output": out if runner.comm.rank == 0 else None,
        "sent": dict(runner.comm.sent),
        "received": dict(runner.comm.received),
    }
