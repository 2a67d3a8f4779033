"""Exact band-parallel inference for VM-UNet and MHS-VM: each rank holds a band of image rows.

The image rows are split into ``P`` bands, one per rank, each a multiple of the network's size
multiple ``m = 4 * 2^(stages-1)`` rows (as even as possible; ``H >= P m`` is required: the
replication of thin low-resolution levels is not implemented). The model's own modules run on
the band unchanged; each VSS block's mixer (:class:`~kscan.models.vmunet.SS2D` or
:class:`~kscan.models.mhs.MHSMixer`) runs its own forward with the two execution hooks of
:mod:`kscan.models.vmunet` set to this module's :meth:`BandParallelSegmenter.conv` and
:meth:`BandParallelSegmenter.route_scans` (a wrapper is swapped in for the duration of the call):

- **Per-token operations** (LayerNorms, linear layers, gates, route attention) are local.
- **Patch embedding** (4x4, stride 4), **patch merging** and **expanding** stay within bands,
  because every band starts on a multiple of ``m`` rows (even heights at every level).
- **Depthwise convolutions** (``k x k``, dilation ``q``) get ``q (k // 2)`` halo rows from each
  neighbouring rank; zero padding only at the true image border (and at the left/right sides).
- **Scans** follow :mod:`kscan.pipelines.parallel.chains`: each rank scans its segments of every
  route from a zero state, one all-gather exchanges every segment's summary (decay and end state,
  ``(batch, D, N)`` each), and each rank scans again, from its true incoming state, the segments
  that do not start from zero. The same code serves every route (rows, columns, snakes,
  zig-zags, spirals, reverses).
- **Column routes by transposition.** Read column by column, a row band is ``W`` segments per
  rank, and their summaries dominate the exchange. An all-to-all can instead give each rank a
  band of whole columns: the ``H x W`` map read column by column is the transposed ``W x H`` map
  read row by row, one segment per rank. Each rank then scans its column band as the rows route
  of the transposed map (``cols`` -> ``rows``, ``snake_cols`` -> ``snake_rows`` and their
  reverses, the tiny summaries joining the others in the one all-gather), and a second all-to-all returns the
  outputs to the row bands. A layer transposes when that moves fewer bytes over all ranks than
  the column routes' summaries, :func:`transposition_pays`; with ``N = 16`` it is the case at
  every level of the benchmark model.

The result equals the single-process forward up to rounding (float32 about 1e-6, float64 about
1e-15). Only inference: the model must be in eval mode (drop-path is random in training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

from kscan.errors import ConfigError, ShapeError
from kscan.kernels.scan_reference import discretize
from kscan.models.mhs import MHSMixer
from kscan.models.vmunet import SS2D, VMUNet, VSSBlock, route_ssm_inputs
from kscan.pipelines.parallel.chains import (
    LocalPass,
    finish,
    gathered_summaries,
    incoming_states,
    local_pass,
    padded_length,
    route_plan,
)
from kscan.pipelines.parallel.comm import Comm

TRANSPOSED_ROUTES = {
    "cols": "rows",
    "cols_reversed": "rows_reversed",
    "snake_cols": "snake_rows",
    "snake_cols_reversed": "snake_rows_reversed",
}
"""Column routes and the route that reads the transposed map the same way (MHS-VM's snake
family too: down the first column, up the next, is along the transposed map's first row, back
along the next)."""


def even_bounds(size: int, ranks: int) -> tuple[int, ...]:
    """Bounds ``(0, ..., size)`` of ``ranks`` parts of ``size`` differing by at most one (the
    first parts take the extra); ``size >= ranks``."""
    units, extra = divmod(size, ranks)
    bounds = [0]
    for r in range(ranks):
        bounds.append(bounds[-1] + units + (r < extra))
    return tuple(bounds)


def transposition_pays(
    routes: Sequence[str], bounds: tuple[int, ...], width: int, n_state: int
) -> bool:
    """Whether the column routes of ``routes`` should run transposed on a map of ``width``
    columns cut at rows ``bounds``: when the two all-to-alls (the map's ``d`` channels out, one
    output per column route back) and the column routes' one-segment summaries move fewer
    elements over all ranks than their summaries in row bands. The same on every rank (it
    depends on shapes only); False with one rank or fewer columns than ranks. Per channel and
    sample, over all ranks: summaries ``P (P - 1) S 2 N`` per route (``S`` the most segments
    one rank holds); transposition ``(H W - sum_r h_r w_r) (1 + routes)`` plus
    ``P (P - 1) 2 N`` per route."""
    ranks, height = len(bounds) - 1, bounds[-1]
    columns = [name for name in routes if name in TRANSPOSED_ROUTES]
    if ranks == 1 or width < ranks or not columns:
        return False
    pairs, summary = ranks * (ranks - 1), 2 * n_state
    in_bands = sum(
        pairs * padded_length(route_plan(name, height, width, bounds, 0).counts) * summary
        for name in columns
    )
    heights, widths = (torch.diff(torch.tensor(b)) for b in (bounds, even_bounds(width, ranks)))
    own = int((heights * widths).sum())  # the block each rank keeps
    transposed = (height * width - own) * (1 + len(columns)) + len(columns) * pairs * summary
    return transposed < in_bands


def band_bounds(height: int, ranks: int, multiple: int) -> tuple[int, ...]:
    """Row bounds ``(0, b_1, ..., H)`` of ``ranks`` bands, each a multiple of ``multiple`` rows,
    heights differing by at most ``multiple`` (the first bands take the extra units)."""
    if height % multiple or height < ranks * multiple:
        raise ShapeError(
            f"x: expected H a multiple of {multiple} and at least {ranks} x {multiple} = "
            f"{ranks * multiple} rows for {ranks} bands, got H={height}"
        )
    return tuple(b * multiple for b in even_bounds(height // multiple, ranks))


class BandParallelSegmenter:
    """Run a :class:`~kscan.models.vmunet.VMUNet` (or MHS-VM) with its image rows split over
    the ranks of ``group``.

    Call it with the whole image ``x (batch, c, H, W)`` on every rank to get the whole output
    on every rank, or use :meth:`forward_band` with this rank's band only. ``comm`` holds the byte
    counters. Without a process group it runs as one rank (the plain forward, through the band
    code). ``transpose_columns``: run the column routes transposed when
    :func:`transposition_pays` (None), whenever there are at least as many columns as ranks
    (True), or never (False).
    """

    def __init__(
        self,
        model: VMUNet,
        group: dist.ProcessGroup | None = None,
        transpose_columns: bool | None = None,
    ) -> None:
        if not isinstance(model, VMUNet):
            raise ConfigError(f"model: expected a VMUNet or MHSVM, got {type(model).__name__}")
        self.model = model
        self.comm = Comm(group)
        self.multiple = model.config.size_multiple
        self.transpose_columns = transpose_columns
        self._bounds: tuple[int, ...] | None = None
        self._swaps: list[tuple[VSSBlock, nn.Module, nn.Module]] = []
        for block in model.modules():
            if not isinstance(block, VSSBlock):
                continue
            mixer = block.self_attention
            if not isinstance(mixer, SS2D | MHSMixer):
                raise ConfigError(
                    f"model: mixer {type(mixer).__name__} has no band-parallel version "
                    "(SS2D and MHSMixer have)"
                )
            self._swaps.append((block, mixer, _BandMixer(mixer, self)))

    def bounds(self, height: int) -> tuple[int, ...]:
        """Input row bounds of the bands for an image of ``height`` rows."""
        return band_bounds(height, self.comm.world_size, self.multiple)

    @contextlib.contextmanager
    def _banded(self, bounds: tuple[int, ...]) -> Iterator[None]:
        self._bounds = bounds
        for block, _, banded in self._swaps:
            block.self_attention = banded
        try:
            yield
        finally:
            for block, mixer, _ in self._swaps:
                block.self_attention = mixer
            self._bounds = None

    def forward_band(self, band: torch.Tensor, height: int) -> torch.Tensor:
        """This rank's output rows ``(batch, classes, h, W)`` from its input rows ``band
        (batch, c, h, W)`` of an image of ``height`` rows (``h`` from :meth:`bounds`)."""
        if self.model.training:
            raise ConfigError("model: expected eval mode for band-parallel inference")
        bounds = self.bounds(height)
        rank = self.comm.rank
        expected = bounds[rank + 1] - bounds[rank]
        if band.ndim != 4 or band.shape[-2] != expected:
            raise ShapeError(
                f"band: expected shape (batch, c, {expected}, W) for rank {rank} of an image of "
                f"{height} rows, got {tuple(band.shape)}"
            )
        with torch.no_grad(), self._banded(bounds):
            return self.model(band)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x (batch, c, H, W)`` (the same on every rank) -> the model's output
        ``(batch, classes, H, W)`` on every rank."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"x: expected shape (batch, c, H, W), got {found}")
        height = x.shape[-2]
        bounds = self.bounds(height)
        rank = self.comm.rank
        out = self.forward_band(x[..., bounds[rank] : bounds[rank + 1], :], height)
        heights = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        return self.comm.all_gather_rows(out, heights, "gather")

    # -- the pieces the band mixers call ------------------------------------------------------

    def level_bounds(self, rows: int) -> tuple[int, ...]:
        """Row bounds at the level where this rank's band has ``rows`` rows."""
        assert self._bounds is not None
        rank = self.comm.rank
        factor, rest = divmod(self._bounds[rank + 1] - self._bounds[rank], rows)
        if rest or any(b % factor for b in self._bounds):
            raise ShapeError(f"band of {rows} rows does not divide the input bands {self._bounds}")
        return tuple(b // factor for b in self._bounds)

    def conv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``conv`` (stride 1, zero 'same' padding) on the band ``x (batch, C, h, W)``, with halo
        rows from the neighbouring ranks and zero padding only at the image border."""
        (kh, _), (dh, _), (ph, pw) = conv.kernel_size, conv.dilation, conv.padding
        if conv.stride != (1, 1) or conv.padding_mode != "zeros" or ph != dh * (kh // 2):
            raise ConfigError(
                f"conv: expected stride 1 and zero 'same' padding, got stride {conv.stride}, "
                f"padding {conv.padding} ({conv.padding_mode}) for kernel {conv.kernel_size}"
            )
        if ph > x.shape[-2]:
            raise ShapeError(f"x: a band of {x.shape[-2]} rows is thinner than the halo of {ph}")
        above, below = self.comm.exchange_halos(x, ph)
        border = x.new_zeros(*x.shape[:-2], ph, x.shape[-1])
        x = torch.cat(
            [border if above is None else above, x, border if below is None else below], -2
        )
        return F.conv2d(x, conv.weight, conv.bias, 1, (0, pw), conv.dilation, conv.groups)

    def route_scans(self, ssm: nn.Module, x: torch.Tensor, routes: Sequence[str]) -> torch.Tensor:
        """The route-scan hook of :mod:`kscan.models.vmunet` for the band ``x (batch, d, h, W)``
        read along each of ``routes`` over the whole image: ``(batch, K, d, h, W)``, entry ``k``
        being route ``k``'s outputs at this band's pixels. The scan inputs are the model's own
        (:func:`~kscan.models.vmunet.route_ssm_inputs`, per pixel, in band row-major order);
        column routes run on the transposed map when :func:`transposition_pays`."""
        batch, inner, rows, width = x.shape
        bounds = self.level_bounds(rows)
        rank, height = self.comm.rank, bounds[-1]
        ranks = len(bounds) - 1
        transposed = (
            transposition_pays(routes, bounds, width, ssm.d_state)
            if self.transpose_columns is None
            else self.transpose_columns and 1 < ranks <= width
        )
        column = [k for k, name in enumerate(routes) if transposed and name in TRANSPOSED_ROUTES]
        banded = [k for k in range(len(routes)) if k not in column]
        columns = even_bounds(width, ranks) if column else ()
        sources = [(x, banded, bounds, height, width, lambda name: name)]
        if column:
            xt = self._to_column_band(x, bounds, columns).transpose(-2, -1)  # (b, d, w, H)
            sources.append((xt, column, columns, width, height, TRANSPOSED_ROUTES.__getitem__))
        passes: dict[int, LocalPass] = {}
        for band, chosen, cuts, grid_h, grid_w, rename in sources:
            xs = band.flatten(2).unsqueeze(1).expand(-1, len(chosen), -1, -1)
            u, dts, A, bs, cs, Ds, bias = route_ssm_inputs(ssm, xs, chosen)
            for i, k in enumerate(chosen):
                plan = route_plan(rename(routes[k]), grid_h, grid_w, cuts, rank, x.device)
                ch = slice(i * inner, (i + 1) * inner)
                delta = discretize(dts[:, ch], bias[ch], True)
                passes[k] = local_pass(plan, u[:, ch], delta, A[ch], bs[:, i], cs[:, i], Ds[ch])
        ordered = [passes[k] for k in range(len(routes))]
        per_rank = self._exchange([p.summaries for p in ordered], [p.plan.counts for p in ordered])
        ys = []
        for k, p in enumerate(ordered):
            everything = gathered_summaries(p.plan, [r[k] for r in per_rank])
            h_in = incoming_states(everything)[p.plan.owner == rank]
            ys.append(finish(p, h_in))
        if column:
            w = columns[rank + 1] - columns[rank]
            out = torch.stack([ys[k] for k in column], 1).unflatten(-1, (w, height))
            back = self._to_row_band(out.transpose(-2, -1), bounds, columns)
            for i, k in enumerate(column):
                ys[k] = back[:, i].flatten(-2)
        return torch.stack(ys, dim=1).unflatten(-1, (rows, width))

    def _to_column_band(
        self, x: torch.Tensor, rows: tuple[int, ...], columns: tuple[int, ...]
    ) -> torch.Tensor:
        """This rank's columns ``[columns[rank], columns[rank+1])`` of every row, ``(..., H, w)``,
        from every rank's row band ``x (..., h_r, W)`` (one all-to-all)."""
        rank = self.comm.rank
        pieces = [x[..., a:b].contiguous() for a, b in zip(columns, columns[1:], strict=False)]
        width = columns[rank + 1] - columns[rank]
        shapes = [(*x.shape[:-2], b - a, width) for a, b in zip(rows, rows[1:], strict=False)]
        return torch.cat(self.comm.all_to_all(pieces, shapes, "transpose"), dim=-2)

    def _to_row_band(
        self, x: torch.Tensor, rows: tuple[int, ...], columns: tuple[int, ...]
    ) -> torch.Tensor:
        """The inverse of :meth:`_to_column_band`: this rank's rows of every column, ``(..., h,
        W)``, from every rank's column band ``x (..., H, w_r)``."""
        rank = self.comm.rank
        pieces = [x[..., a:b, :].contiguous() for a, b in zip(rows, rows[1:], strict=False)]
        height = rows[rank + 1] - rows[rank]
        shapes = [
            (*x.shape[:-2], height, d - c) for c, d in zip(columns, columns[1:], strict=False)
        ]
        return torch.cat(self.comm.all_to_all(pieces, shapes, "transpose"), dim=-1)

    def _exchange(
        self, summaries: list[torch.Tensor], counts: list[tuple[int, ...]]
    ) -> list[list[torch.Tensor]]:
        """One all-gather of every route's summaries: ``out[r][k]`` is rank ``r``'s
        ``(segments, 2, batch, d, N)`` of route ``k``."""
        sizes = [padded_length(c) for c in counts]
        pieces = []
        for s, size in zip(summaries, sizes, strict=True):
            padded = s.new_zeros(size, *s.shape[1:])
            padded[: s.shape[0]] = s
            pieces.append(padded.flatten())
        shapes = [s.shape[1:] for s in summaries]
        gathered = self.comm.all_gather(torch.cat(pieces), "summaries")
        out = []
        for r, flat in enumerate(gathered):
            parts = flat.split([p.numel() for p in pieces])
            out.append(
                [
                    part.view(size, *shape)[: c[r]]
                    for part, size, shape, c in zip(parts, sizes, shapes, counts, strict=True)
                ]
            )
        return out


class _BandMixer(nn.Module):
    """A VSS block's mixer run on a band: its own forward with the band hooks."""

    def __init__(self, inner: SS2D | MHSMixer, runner: BandParallelSegmenter) -> None:
        super().__init__()
        self.inner = inner
        self.runner = runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, conv=self.runner.conv, scans=self.runner.route_scans)


def segment_in_bands(
    model: VMUNet, x: torch.Tensor, transpose_columns: bool | None = None
) -> dict[str, object]:
    """One rank's part of a band-parallel forward (for :func:`~kscan.pipelines.parallel.launch`):
    ``{"output": (batch, classes, H, W) on rank 0 (None elsewhere), "sent": {...},
    "received": {...}}`` with this rank's byte counts per kind of exchange;
    ``transpose_columns`` as for :class:`BandParallelSegmenter`."""
    runner = BandParallelSegmenter(model.eval(), transpose_columns=transpose_columns)
    out = runner(x)
    return {
        "output": out if runner.comm.rank == 0 else None,
        "sent": dict(runner.comm.sent),
        "received": dict(runner.comm.received),
    }
