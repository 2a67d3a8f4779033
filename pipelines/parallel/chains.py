"""Selective scans along a 2D route whose pixels are split into row bands, one band per rank.

A route (:func:`kscan.kernels.routes.route`) visits the ``H x W`` grid in some order; with rows
split into bands ``bounds[r] <= i < bounds[r+1]``, the sequence falls into **segments**: maximal
runs of consecutive positions owned by one rank. Raster rows give one segment per band; columns
give ``W`` segments per band (each column crosses every band, and column ``j``'s bottom joins
column ``j+1``'s top); snakes, zig-zags and spirals give others, and a rank may own many
segments of one route. Every route is handled by the same three steps (SPECS section 5: a chunk's
effect on its incoming state is an affine map):

1. **Local pass** (:func:`local_pass`). Each rank scans each of its segments from a zero state.
   A segment ``s`` of steps ``t`` maps the state entering it, ``h_in``, to
   ``h_out = a_s * h_in + e_s``, ``a_s = exp(A * sum_t Delta_t)`` (elementwise over ``(D, N)``,
   exponent ``<= 0``) and ``e_s`` the segment's end state from ``h_in = 0``.
2. **Composition** (:func:`incoming_states`). With every segment's ``(a_s, e_s)`` in sequence
   order (exchanged between ranks), the true incoming states are the exclusive prefix of the
   affine maps, ``h_in(0) = 0``, ``h_in(s+1) = a_s h_in(s) + e_s``, evaluated as a log-depth
   (Hillis-Steele) scan.
3. **Restart** (:func:`finish`). Each segment whose incoming state is not zero is scanned again
   from its true incoming state through ``selective_scan``'s ``initial_state``. The alternative,
   adding ``sum_n C_t[n] exp(A[d,n] S_t[d]) h_in[d,n]`` (``S_t`` the running sum of ``Delta``)
   to the zero-state outputs, needs no recurrence but one exponential per ``(d, n, t)`` through
   a ``(D, steps, N)`` temporary; measured on CPU (``kscan bench parallel``'s model, one
   thread) it took 3x as long as the chunked scan it would replace, so the restart is the cheaper
   exact option. The first segment of every route (rank 0's for rows) starts from zero and is
   not scanned again; with one rank nothing is.

Segments of similar length are padded into one batched scan call (lengths bucketed by powers of
two, so padding at most doubles the work); padded steps have ``Delta = u = B = C = 0``, an
identity step, so the end state is unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kscan.errors import ShapeError
from kscan.kernels.routes import route
from kscan.kernels.scan import selective_scan

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Bucket:
    """Segments of one rank scanned in one call: ``index[i, t]`` is the band-local row-major pixel
    index of step ``t`` of the ``i``-th segment (the band's pixel count for padding), and
    ``segments[i]`` its number among the rank's segments (sequence order)."""

    segments: torch.Tensor  # (n,) long
    index: torch.Tensor  # (n, Lmax) long
    valid: torch.Tensor  # (n * Lmax,) bool: flattened index entries that are pixels


@dataclass(frozen=True)
class RoutePlan:
    """The segments of route ``name`` on an ``H x W`` grid cut at rows ``bounds``, seen by ``rank``.

    Attributes:
        owner: ``(S,)`` the rank owning each segment, in sequence order.
        local: ``(S,)`` each segment's number among its owner's segments.
        counts: segments per rank.
        buckets: this rank's segments grouped for batched scans.
        pixels: pixels of this rank's band (``(bounds[rank+1] - bounds[rank]) * W``).
    """

    name: str
    height: int
    width: int
    bounds: tuple[int, ...]
    rank: int
    owner: torch.Tensor
    local: torch.Tensor
    counts: tuple[int, ...]
    buckets: tuple[Bucket, ...]
    pixels: int


def check_bounds(bounds: tuple[int, ...], height: int) -> None:
    """Raise :class:`ShapeError` unless ``0 = bounds[0] < bounds[1] < ... < bounds[-1] = height``."""
    if (
        len(bounds) < 2
        or bounds[0] != 0
        or bounds[-1] != height
        or any(b <= a for a, b in zip(bounds, bounds[1:], strict=False))
    ):
        raise ShapeError(
            f"bounds: expected increasing row bounds from 0 to H={height}, got {list(bounds)}"
        )


@functools.lru_cache(maxsize=512)
def route_plan(
    name: str,
    height: int,
    width: int,
    bounds: tuple[int, ...],
    rank: int,
    device: torch.device = CPU,
) -> RoutePlan:
    """The segment plan of route ``name`` for ``rank`` (cached; computed alike on every rank)."""
    check_bounds(bounds, height)
    perm = route(name, height, width)
    edges = torch.tensor(bounds[1:-1], dtype=torch.long)
    owner_of_step = torch.bucketize(perm // width, edges, right=True)
    change = torch.nonzero(owner_of_step[1:] != owner_of_step[:-1]).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), change])
    lengths = torch.diff(starts, append=torch.tensor([perm.numel()]))
    owner = owner_of_step[starts]
    ranks = len(bounds) - 1
    local = torch.zeros_like(owner)
    counts = []
    for r in range(ranks):
        mine = owner == r
        local[mine] = torch.arange(int(mine.sum()))
        counts.append(int(mine.sum()))
    pixels = (bounds[rank + 1] - bounds[rank]) * width
    offset = bounds[rank] * width
    mine = torch.nonzero(owner == rank).flatten()
    classes = torch.ceil(torch.log2(lengths[mine].double())).long()
    buckets = []
    for c in torch.unique(classes).tolist():
        seg = mine[classes == c]
        longest = int(lengths[seg].max())
        steps = torch.arange(longest)
        pos = starts[seg, None] + steps
        inside = steps < lengths[seg, None]
        index = torch.where(inside, perm[pos.clamp(max=perm.numel() - 1)] - offset, pixels)
        buckets.append(Bucket(local[seg].to(device), index.to(device), inside.flatten().to(device)))
    return RoutePlan(
        name, height, width, bounds, rank, owner, local, tuple(counts), tuple(buckets), pixels
    )


@dataclass
class LocalPass:
    """One rank's zero-state scans of one route: per bucket the padded outputs ``y0`` and the
    gathered scan inputs ``(u, Delta, B, C)``; the summaries ``(segments, 2, batch, D, N)``
    (decay ``a_s`` and end state ``e_s``) in the rank's segment order; ``A`` and ``D``."""

    plan: RoutePlan
    batch: int
    y0: list[torch.Tensor]
    inputs: list[tuple[torch.Tensor, ...]]
    A: torch.Tensor
    D: torch.Tensor | None
    summaries: torch.Tensor


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (batch, c, pixels)`` read at ``index (n, Lmax)`` (``pixels`` reads 0) ->
    ``(batch * n, c, Lmax)``."""
    padded = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], dim=-1)
    out = padded[..., index]  # (batch, c, n, Lmax)
    return out.transpose(1, 2).reshape(-1, x.shape[1], index.shape[1])


def local_pass(
    plan: RoutePlan,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> LocalPass:
    """Scan each of this rank's segments of ``plan`` from a zero state.

    Inputs are the band's pixels in row-major order: ``u, delta (batch, D, pixels)`` with
    ``delta`` already discretised (``Delta > 0``, no bias or softplus left to apply);
    ``A (D, N)``; ``B, C (batch, N, pixels)``; ``D (D,)``.
    """
    batch, channels, pixels = u.shape
    if pixels != plan.pixels:
        raise ShapeError(f"u: expected {plan.pixels} band pixels, got shape {tuple(u.shape)}")
    n = A.shape[1]
    summaries = u.new_zeros(
        plan.counts[plan.rank], 2, batch, channels, n, dtype=torch.promote_types(u.dtype, A.dtype)
    )
    out = LocalPass(plan, batch, [], [], A, D, summaries)
    for bucket in plan.buckets:
        inputs = tuple(_gather(x, bucket.index) for x in (u, delta, B, C))
        y0, end = selective_scan(*inputs[:2], A, *inputs[2:], D=D, return_last_state=True)
        total = inputs[1].to(end.dtype).sum(-1)
        decay = torch.exp(total[..., None] * A.to(end.dtype))
        segments = bucket.segments.numel()
        pair = torch.stack([decay, end]).unflatten(1, (batch, segments))  # (2, batch, n, D, N)
        summaries[bucket.segments] = pair.permute(2, 0, 1, 3, 4).to(summaries.dtype)
        out.y0.append(y0)
        out.inputs.append(inputs)
    return out


def incoming_states(summaries: torch.Tensor) -> torch.Tensor:
    """The state entering each segment from the segments' affine maps in sequence order.

    ``summaries (S, 2, ...)`` holds ``a_s = summaries[s, 0]`` and ``e_s = summaries[s, 1]``;
    returns ``h_in (S, ...)`` with ``h_in(0) = 0`` and ``h_in(s+1) = a_s h_in(s) + e_s``, by a
    Hillis-Steele scan of the maps (``ceil(log2 S)`` vectorised steps): the composition of
    ``(a1, e1)`` then ``(a2, e2)`` is ``(a2 a1, a2 e1 + e2)``.
    """
    a, e = summaries[:, 0], summaries[:, 1]
    shift = 1
    while shift < a.shape[0]:
        e = torch.cat([e[:shift], torch.addcmul(e[shift:], a[shift:], e[:-shift])])
        a = torch.cat([a[:shift], a[shift:] * a[:-shift]])
        shift *= 2
    return torch.cat([torch.zeros_like(e[:1]), e[:-1]])


def gathered_summaries(plan: RoutePlan, per_rank: list[torch.Tensor]) -> torch.Tensor:
    """Every segment's summary in sequence order, from each rank's ``(segments_r, 2, ...)``."""
    return torch.stack(
        [per_rank[o][i] for o, i in zip(plan.owner.tolist(), plan.local.tolist(), strict=True)]
    )


def finish(local: LocalPass, h_in: torch.Tensor) -> torch.Tensor:
    """The true outputs of this rank's pixels, ``(batch, D, pixels)`` in row-major band order.

    ``h_in (segments_r, batch, D, N)``: the states entering the rank's segments (its rows of
    :func:`incoming_states`). Buckets whose incoming states are all zero keep their zero-state
    outputs; the others are scanned again from ``h_in``.
    """
    plan, batch = local.plan, local.batch
    channels = local.summaries.shape[3]
    dtype = local.y0[0].dtype if local.y0 else local.summaries.dtype
    out = local.summaries.new_zeros(batch, channels, plan.pixels + 1, dtype=dtype)
    for bucket, y0, inputs in zip(plan.buckets, local.y0, local.inputs, strict=True):
        h = h_in[bucket.segments].transpose(0, 1).flatten(0, 1)  # (batch*n, D, N)
        y = y0
        if bool(h.any()):
            u, delta, B, C = inputs
            y = selective_scan(
                u, delta, local.A, B, C, D=local.D, initial_state=h.to(u.dtype).contiguous()
            )
        segments = bucket.segments.numel()
        flat = y.unflatten(0, (batch, segments)).transpose(1, 2).flatten(2)  # (batch, D, n*Lmax)
        out[..., bucket.index.flatten()[bucket.valid]] = flat[..., bucket.valid].to(out.dtype)
    return out[..., :-1]


def padded_length(counts: tuple[int, ...]) -> int:
    """Segments per rank in the exchange buffer: the largest count (all-gathers need one size)."""
    return max(counts) if counts else 0


def summary_elements(plan: RoutePlan, batch: int, channels: int, n: int) -> int:
    """Elements one rank contributes to the exchange for this route: ``2 * batch * D * N`` per
    segment, padded to :func:`padded_length`."""
    return padded_length(plan.counts) * 2 * batch * channels * n
