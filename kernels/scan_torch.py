"""The chunked selective scan in plain torch: the CPU default (also runs on CUDA).

Same maths and signature as :func:`kscan.kernels.scan_reference.selective_scan_reference`.
The sequence ``0 .. L-1`` is cut into chunks of ``T`` steps (the last one may be shorter).
Channel ``d`` and state ``n`` evolve independently, so with ``a_t = exp(Delta_t A)`` and
``x_t = Delta_t B_t u_t``:

- **Chunk maps.** Over a chunk the recurrence is the affine map ``h_out = P h_in + e`` with
  ``P = exp(A * sum_chunk Delta)`` (the cumulative decay: exponent ``<= 0`` because ``A < 0`` and
  ``Delta > 0``) and ``e`` the chunk's end state from ``h_in = 0``. ``e`` is computed for many
  chunks at once by running the ``T`` local steps with the chunks stacked on one axis (at most
  ``L / STEP_FRACTION`` chunks per step, which bounds the temporaries).
- **State passing.** The chunk-start states follow from ``h_in(c+1) = P(c) h_in(c) + e(c)``, a
  loop over the ``ceil(L / T)`` chunks on ``(batch, D, N)`` tensors. These states,
  ``(batch, D, ceil(L / T), N)``, are all that is saved for the backward pass.
- **Outputs.** A second local pass from the true chunk-start states gives ``h_t`` and
  ``y_t = sum_n C_t h_t``, again for many chunks at once.

The forward is bound by passes over memory and by per-call overhead, so each step is a few
in-place calls on contiguous tensors: the states of the stacked chunks are held as
``(batch, D, N, chunks)`` (``y_t`` then sums ``N`` rows instead of reducing a short innermost
axis), ``a_t`` goes into one reused buffer, ``Delta_t`` and ``Delta_t u_t`` are gathered a few
steps at a time, and the chunk states are kept chunk-major so that each state-passing step is
one ``addcmul`` on a contiguous ``(batch, D, N)`` tensor.

Nothing is ever divided by a decay, so the scan is stable for any ``L``; every step multiplies by
``exp(Delta_t A) <= 1``. The work is ``O(batch D L N)`` exponentials (a ``T x T`` decay matrix
per chunk would cost ``T`` times more) in about ``2 STEP_FRACTION + L / T`` vectorised steps.
Exponentials are taken as ``exp2(x log2 e)``: torch's CPU ``exp2`` is several times faster.

Backward (SPECS section 5), with ``g_t`` the gradient of ``y_t`` before the gate:
``dh_t = C_t g_t + a_{t+1} dh_{t+1}``. The same chunk structure runs in reverse: a local
reverse pass gives each chunk's gradient with respect to its start state for a zero carry,
a reverse loop over chunks passes the carries, and then, a few chunks at a time (so that at
most ``L / HISTORY_FRACTION`` positions of states are held), the forward states are recomputed
from the saved chunk-start states and the reverse recurrence produces
``du_t = Delta_t sum_n dh_t B_t + D g_t``,
``dDelta_t = sum_n dh_t (A a_t h_{t-1} + B_t u_t)``, ``dA = sum_t dh_t Delta_t a_t h_{t-1}``,
``dB_t = sum_{d in group} dh_t Delta_t u_t``, ``dC_t = sum_{d in group} g_t h_t`` and
``d initial_state = a_0 dh_0``. softplus, ``delta_bias`` and the ``silu(z)`` gate are
differentiated by torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kscan.kernels.scan_reference import discretize

CHUNK = 32
STEP_FRACTION = 64
HISTORY_FRACTION = 16
STEP_GROUP = 4


@dataclass(frozen=True)
class _Block:
    """``m`` consecutive chunks of ``T`` steps: chunk indices ``c0 .. c0+m-1``, positions from ``l0``."""

    c0: int
    m: int
    T: int
    l0: int

    def steps(self, x: torch.Tensor) -> torch.Tensor:
        """View ``(..., L) -> (..., m, T)`` of this block's positions."""
        return x[..., self.l0 : self.l0 + self.m * self.T].unflatten(-1, (self.m, self.T))

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """View ``(..., L, N) -> (..., m, T, N)`` of this block's positions."""
        return x[..., self.l0 : self.l0 + self.m * self.T, :].unflatten(-2, (self.m, self.T))

    @property
    def chunks(self) -> slice:
        return slice(self.c0, self.c0 + self.m)


def _blocks(length: int, chunk: int, group: int) -> list[_Block]:
    """Blocks of at most ``group`` full chunks, then the shorter last chunk if any."""
    full, rest = divmod(length, chunk)
    blocks = [_Block(c, min(group, full - c), chunk, c * chunk) for c in range(0, full, group)]
    if rest:
        blocks.append(_Block(full, 1, rest, full * chunk))
    return blocks


@dataclass(frozen=True)
class _Inputs:
    """Scan inputs in the compute dtype, channels split as ``(G, D/G)``.

    ``u, dt``: ``(batch, G, D/G, L)``; ``A``: ``(G, D/G, 1, N)``; ``B, C``: ``(batch, G, L, N)``
    (views of the ``(batch, G, N, L)`` inputs); ``chunk``: the chunk length ``T``.
    """

    u: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    chunk: int
    A_log2: torch.Tensor = field(init=False)

    @classmethod
    def build(
        cls,
        u: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        chunk: int,
    ) -> _Inputs:
        """From ``u, dt`` ``(batch, D, L)`` in the compute dtype, ``A`` ``(D, N)`` and grouped
        ``B, C`` ``(batch, G, N, L)``."""
        b, channels, L = u.shape
        G, N = B.shape[1], A.shape[1]
        Dg = channels // G
        return cls(
            u.view(b, G, Dg, L),
            dt.view(b, G, Dg, L),
            A.to(u.dtype).view(G, Dg, 1, N),
            B.to(u.dtype).transpose(-1, -2),
            C.to(u.dtype).transpose(-1, -2),
            chunk,
        )

    def __post_init__(self) -> None:
        # exp(x) = exp2(x log2(e)): torch's CPU exp2 is several times faster than its exp
        object.__setattr__(self, "A_log2", self.A * math.log2(math.e))

    def local(self, blk: _Block) -> list[tuple[torch.Tensor, ...]]:
        """For each step ``t`` of the block's chunks: ``dt_t, u_t`` ``(batch, G, D/G, m)`` (views)
        and ``B_t, C_t`` ``(batch, G, 1, m, N)`` (contiguous)."""
        B, C = (blk.rows(v).movedim(-2, 0).unsqueeze(3).contiguous() for v in (self.B, self.C))
        dt, u = blk.steps(self.dt).unbind(-1), blk.steps(self.u).unbind(-1)
        return list(zip(dt, u, B, C, strict=True))

    def decay(self, dt_t: torch.Tensor) -> torch.Tensor:
        """``a_t = exp(dt_t A)`` ``(batch, G, D/G, m, N)`` from ``dt_t`` ``(batch, G, D/G, m)``."""
        return torch.exp2(dt_t.unsqueeze(-1) * self.A_log2)

    def blocks(self, group: int) -> list[_Block]:
        """The chunks in blocks of at most ``group`` chunks."""
        return _blocks(self.u.shape[-1], self.chunk, group)

    @property
    def step_chunks(self) -> int:
        """Chunks per vectorised step: at most ``L / STEP_FRACTION`` positions at once."""
        return max(1, self.u.shape[-1] // STEP_FRACTION)

    @property
    def history_chunks(self) -> int:
        """Chunks whose states the backward holds at once: ``L / HISTORY_FRACTION`` positions."""
        return max(1, self.u.shape[-1] // (HISTORY_FRACTION * self.chunk))

    def chunk_decay(self, blk: _Block) -> torch.Tensor:
        """``exp(A * sum_chunk dt)`` ``(batch, G, D/G, m, N)``: the decay across each chunk."""
        return torch.exp2(blk.steps(self.dt).sum(-1).unsqueeze(-1) * self.A_log2)


def _chunk_states(inp: _Inputs) -> torch.Tensor:
    """An empty ``(batch, G, D/G, chunks, N)`` tensor: one state per chunk."""
    b, G, Dg, L = inp.u.shape
    return inp.u.new_empty(b, G, Dg, len(range(0, L, inp.chunk)), inp.A.shape[-1])


def _local_steps(inp: _Inputs, blk: _Block) -> Iterator[tuple[torch.Tensor, ...]]:
    """For each step ``t`` of the block's chunks, in the forward's state layout
    ``(batch, G, D/G, N, m)``: ``dt_t`` and ``x_t = dt_t u_t`` ``(batch, G, D/G, 1, m)``,
    ``B_t`` and ``C_t`` ``(batch, G, 1, N, m)``, all contiguous (``dt`` and ``x`` are gathered
    ``STEP_GROUP`` steps at a time, which bounds their memory)."""
    B, C = (blk.rows(v).permute(3, 0, 1, 4, 2).unsqueeze(3).contiguous() for v in (inp.B, inp.C))
    for t0 in range(0, blk.T, STEP_GROUP):
        group = slice(t0, t0 + STEP_GROUP)
        dt, u = (blk.steps(v)[..., group].movedim(-1, 0) for v in (inp.dt, inp.u))
        dt = dt.unsqueeze(-2).contiguous()
        x = dt * u.unsqueeze(-2)
        yield from zip(
            dt.unbind(0), x.unbind(0), B[group].unbind(0), C[group].unbind(0), strict=True
        )


def _step(
    h: torch.Tensor,
    a: torch.Tensor,
    A_log2: torch.Tensor,
    dt_t: torch.Tensor,
    x_t: torch.Tensor,
    B_t: torch.Tensor,
) -> torch.Tensor:
    """``h <- a_t h + x_t B_t`` in place, with ``a_t = exp(dt_t A)`` written into ``a``;
    ``A_log2 = A log2(e)`` ``(G, D/G, N, 1)``."""
    return h.mul_(torch.mul(dt_t, A_log2, out=a).exp2_()).addcmul_(x_t, B_t)


def _pass_block(inp: _Inputs, blk: _Block, states: torch.Tensor) -> None:
    """Chunk-start states of the block's chunks from the one of its first chunk, ``states[c0]``,
    into ``states[c0+1 .. c0+m]``: each chunk's end state from zero ``e(c)`` (a local scan), then
    ``h_in(c+1) = exp(A sum_chunk dt) h_in(c) + e(c)``."""
    A_log2 = inp.A_log2.transpose(-1, -2)
    h = inp.u.new_zeros(*states.shape[1:], blk.m)
    a = torch.empty_like(h)
    for dt_t, x_t, B_t, _ in _local_steps(inp, blk):
        _step(h, a, A_log2, dt_t, x_t, B_t)
    states[blk.c0 + 1 : blk.c0 + blk.m + 1] = h.movedim(-1, 0)
    decays = torch.mul(blk.steps(inp.dt).sum(-1).unsqueeze(-2), A_log2, out=a).exp2_()
    for c, decay in enumerate(decays.unbind(-1), start=blk.c0):
        states[c + 1].addcmul_(decay, states[c])


def _output_block(inp: _Inputs, blk: _Block, states: torch.Tensor, y: torch.Tensor) -> None:
    """``y_t = sum_n C_t h_t`` of the block's chunks into ``y``, scanning from their start states."""
    A_log2 = inp.A_log2.transpose(-1, -2)
    h = states[blk.chunks].movedim(0, -1).clone(memory_format=torch.contiguous_format)
    a = torch.empty_like(h)
    steps = zip(blk.steps(y).unbind(-1), _local_steps(inp, blk), strict=True)
    for y_t, (dt_t, x_t, B_t, C_t) in steps:
        torch.sum(torch.mul(_step(h, a, A_log2, dt_t, x_t, B_t), C_t, out=a), -2, out=y_t)


def _scan_forward(inp: _Inputs, h0: torch.Tensor):
    """``y`` ``(batch, G, D/G, L)`` without the ``D`` term, chunk-start states and last state.

    The states of a block of ``m`` chunks are held as ``(batch, G, D/G, N, m)``, so that every
    operation runs along contiguous rows of ``m`` chunks and ``y_t = sum_n C_t h_t`` sums rows
    (a reduction over a short innermost ``N`` axis is several times slower). The chunk states are
    kept chunk-major, ``h_in(c)`` at ``states[c]``, so that state passing is one in-place
    ``addcmul`` on contiguous tensors per chunk.
    """
    states = inp.u.new_empty(len(range(0, inp.u.shape[-1], inp.chunk)) + 1, *h0.shape)
    states[0] = h0
    for blk in inp.blocks(inp.step_chunks):
        _pass_block(inp, blk, states)
    y = torch.empty_like(inp.u)
    for blk in inp.blocks(inp.step_chunks):
        _output_block(inp, blk, states, y)
    return y, states[:-1].movedim(0, -2), states[-1].clone()


def _carries(inp: _Inputs, g: torch.Tensor, d_last: torch.Tensor):
    """Gradient reaching each chunk's end state from later steps ``(batch, G, D/G, chunks, N)``,
    and the gradient of the initial state."""
    carries = _chunk_states(inp)
    for blk in inp.blocks(inp.step_chunks):
        g_v, C_v, dt_v = blk.steps(g), blk.rows(inp.C), blk.steps(inp.dt)
        w = carries[..., blk.chunks, :].zero_()
        for t in reversed(range(blk.T)):
            a_t = inp.decay(dt_v[..., t])
            w.addcmul_(C_v[..., t, :].contiguous().unsqueeze(2), g_v[..., t].unsqueeze(-1)).mul_(
                a_t
            )
    q = d_last
    for blk in reversed(inp.blocks(inp.step_chunks)):
        decay = inp.chunk_decay(blk)
        for i in reversed(range(blk.m)):
            local = carries[..., blk.c0 + i, :].clone()
            carries[..., blk.c0 + i, :] = q
            q = local.addcmul_(decay[..., i, :], q)
    return carries, q


def _scan_backward(inp: _Inputs, g: torch.Tensor, d_last: torch.Tensor, starts: torch.Tensor):
    """Gradients of the scan core; ``g`` ``(batch, G, D/G, L)`` is the gradient of its ``y``.

    Returns ``du, ddt`` ``(batch, G, D/G, L)``, ``dA`` ``(G, D/G, N)``, ``dB, dC``
    ``(batch, G, L, N)`` and the initial state's gradient ``(batch, G, D/G, N)``.
    """
    carries, d_h0 = _carries(inp, g, d_last)
    du, ddt = torch.empty_like(inp.u), torch.empty_like(inp.u)
    # (batch, G, N, L) tensors seen as (batch, G, L, N), like B and C
    dB, dC = (x.new_empty(x.transpose(-1, -2).shape).transpose(-1, -2) for x in (inp.B, inp.C))
    dA = torch.zeros_like(inp.A.squeeze(2))
    b, G, Dg, _, N = starts.shape
    history = starts.new_empty(inp.chunk + 1, b, G, Dg, inp.history_chunks, N)
    for blk in inp.blocks(inp.history_chunks):
        hist = history[: blk.T + 1, ..., : blk.m, :]
        hist[0] = starts[..., blk.chunks, :]
        steps = inp.local(blk)
        for t, (dt_t, u_t, B_t, _) in enumerate(steps):
            x_t = (dt_t * u_t).unsqueeze(-1) * B_t
            torch.addcmul(x_t, inp.decay(dt_t), hist[t], out=hist[t + 1])
        g_v, du_v, ddt_v = blk.steps(g), blk.steps(du), blk.steps(ddt)
        dB_v, dC_v = blk.rows(dB), blk.rows(dC)
        w = carries[..., blk.chunks, :]
        dA_acc = torch.zeros_like(w)
        for t in reversed(range(blk.T)):
            dt_t, u_t, B_t, C_t = steps[t]
            a_t = inp.decay(dt_t)
            g_t = g_v[..., t].unsqueeze(-1)
            dh = torch.addcmul(w, C_t, g_t)
            r = dh * a_t * hist[t]
            dA_acc.addcmul_(r, dt_t.unsqueeze(-1))
            s = torch.linalg.vecdot(dh, B_t)
            du_v[..., t] = dt_t * s
            ddt_v[..., t] = torch.linalg.vecdot(r, inp.A) + u_t * s
            dB_v[..., t, :] = (dh * (dt_t * u_t).unsqueeze(-1)).sum(2)
            dC_v[..., t, :] = (hist[t + 1] * g_t).sum(2)
            w = dh.mul_(a_t)
        dA += dA_acc.sum((0, 3))
    return du, ddt, dA, dB, dC, d_h0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SelectiveScanFn(torch.autograd.Function):
    """The scan with ``B, C`` in the grouped form; returns ``(y, last_state)``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk):
        ctx.set_materialize_grads(False)
        cd = _compute_dtype(u.dtype)
        b, channels, L = u.shape
        G, N = B.shape[1], A.shape[1]
        Dg = channels // G
        uc = u.to(cd)
        bias = None if delta_bias is None else delta_bias.to(cd)
        with torch.no_grad():
            dt = discretize(delta.to(cd), bias, delta_softplus)
        inp = _Inputs.build(uc, dt, A, B, C, chunk)
        h0 = (
            uc.new_zeros(b, G, Dg, N)
            if initial_state is None
            else initial_state.to(cd).reshape(b, G, Dg, N)
        )
        y, starts, last = _scan_forward(inp, h0)
        y = y.view(b, channels, L)
        if D is not None:
            y.addcmul_(uc, D.to(cd)[:, None])
        out = y if z is None else y * F.silu(z.to(cd))
        ctx.save_for_backward(
            u, delta, A, B, C, D, z, delta_bias, initial_state, starts, y if z is not None else None
        )
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        return out.to(u.dtype), last.reshape(b, channels, N)

    @staticmethod
    def backward(ctx, g_out, g_last):
        u, delta, A, B, C, D, z, delta_bias, initial_state, starts, y_pre = ctx.saved_tensors
        cd = _compute_dtype(u.dtype)
        b, channels, L = u.shape
        G, N = B.shape[1], A.shape[1]
        Dg = channels // G
        uc = u.to(cd)
        g = uc.new_zeros(u.shape) if g_out is None else g_out.to(cd)
        dz = None
        if z is not None:
            zc = z.to(cd)
            sig = torch.sigmoid(zc)
            dz = (g * y_pre * sig * (1 + zc * (1 - sig))).to(z.dtype)
            g = g * zc * sig
        with torch.enable_grad():
            delta_leaf = delta.detach().to(cd).requires_grad_()
            bias_leaf = None if delta_bias is None else delta_bias.detach().to(cd).requires_grad_()
            dt = discretize(delta_leaf, bias_leaf, ctx.delta_softplus)
        inp = _Inputs.build(uc, dt.detach(), A, B, C, ctx.chunk)
        d_last = uc.new_zeros(b, G, Dg, N) if g_last is None else g_last.to(cd).reshape(b, G, Dg, N)
        du, ddt, dA, dB, dC, d_h0 = _scan_backward(inp, g.view(b, G, Dg, L), d_last, starts)
        du = du.view(b, channels, L)
        dD = None
        if D is not None:
            du.addcmul_(g, D.to(cd)[:, None])
            dD = (g * uc).sum((0, 2)).to(D.dtype)
        leaves = [delta_leaf] + ([bias_leaf] if bias_leaf is not None else [])
        grads = torch.autograd.grad(dt, leaves, ddt.view(b, channels, L))
        d_bias = grads[1].to(delta_bias.dtype) if delta_bias is not None else None
        d_init = (
            None if initial_state is None else d_h0.reshape(b, channels, N).to(initial_state.dtype)
        )
        return (
            du.to(u.dtype),
            grads[0].to(delta.dtype),
            dA.reshape(channels, N).to(A.dtype),
            dB.transpose(-1, -2).to(B.dtype),
            dC.transpose(-1, -2).to(C.dtype),
            dD,
            dz,
            d_bias,
            d_init,
            None,
            None,
        )


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    *,
    chunk: int = CHUNK,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The chunked scan (see the module docstring); inputs as the reference, already validated.

    ``chunk`` is the chunk length ``T``. Returns ``y`` ``(batch, D, L)`` in ``u``'s dtype, and the
    last state ``(batch, D, N)`` in the compute dtype when ``return_last_state``.
    """
    B4 = B.unsqueeze(1) if B.ndim == 3 else B
    C4 = C.unsqueeze(1) if C.ndim == 3 else C
    y, last = _SelectiveScanFn.apply(
        u, delta, A, B4, C4, D, z, delta_bias, initial_state, delta_softplus, chunk
    )
    return (y, last) if return_last_state else y
