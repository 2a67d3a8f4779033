"""The selective scan as fused numba kernels: the CPU default when numba imports.

Same maths and signature as :func:`kscan.kernels.scan_reference.selective_scan_reference`,
computed in float32 (float64 for float64 inputs). This module imports numba at the top: the
dispatcher (:mod:`kscan.kernels.scan`) imports it lazily and falls back to the chunked ``torch``
backend when that fails.

Layout. One task (a ``prange`` iteration) owns a block of up to ``BLOCK`` channels of one batch
element and one group, so that the block shares ``B_t`` and ``C_t``; the channels of the block are
the vector lanes. Its state is held as ``(N, w)`` (``w`` channels) in a local array, and every hot
loop runs over the ``w`` lanes of one row of it, through a slice (numba's loop vectoriser needs a
runtime trip count and plain non-negative indices: a constant 16-lane loop is fully unrolled into
scalar code, as numba leaves LLVM's SLP vectoriser off). ``y_t = sum_n C_t h_t`` accumulates over
``n`` lane-wise, in ascending ``n``, with no horizontal sum. The ``(batch, D, L)`` tensors (``u``,
``delta``, ``z``, ``y`` and the gradients) and the ``N`` rows of ``B, C, dB, dC`` run along ``t``,
while the kernels want a step's channels side by side: each chunk is transposed into and out of
``(CHUNK, w)`` tiles (:func:`_tile_in`, :func:`_tile_out`) by square blocks of 64 bytes a side
(:func:`_transposer`, vector loads, shuffles and vector stores written in LLVM's IR), and
every elementwise step (``delta_bias``, softplus, ``Delta u``, ``D u``, the gate, the sums over
``t`` of ``dD`` and ``d delta_bias``, lane by lane in the order of ``t``) then runs on whole tile
rows. Transposing element by element in scalar code took about 40% of the backward's time (timed by
removing those loops in turn; vectorised by LLVM, one side became a gather or a scatter, slower
still); the blocks made the backward 20% faster than that. Reading across channels element by
element would also hit one L1 cache set again and again: channels lie ``4 L`` bytes apart, a
multiple of 4 KB at ``L = 4096``.

Decays. ``exp(Delta A) = 2^(Delta A log2 e)`` is computed in vectorisable arithmetic (numba has no
vector ``exp`` without Intel's SVML), inside the loop that updates the state (:func:`_exp2`): ``e =
k + f`` with ``k = rint(e)``, ``|f| <= 1/2``; ``2^f`` by a polynomial (:func:`_exp2_coefficients`:
degree 6 in float32, relative error 8.8e-8 as evaluated; degree 12 in float64, below 2e-16) and
``2^k`` as the float whose bits are ``(k + bias) 2^shift`` (:func:`_float_with_bits`, a conversion
and a bit cast that LLVM vectorises; numba itself has none, and going through an integer view of a
scratch array took three passes over it per step, the forward was 20% slower). On a grid of 200,001
points across the range, ``2^e`` is within 1.04e-7 (float32) and 3.4e-16 (float64) of numpy's,
relative (the test's check). ``e`` is clamped to the normal range (``[-126, 127]`` in float32,
``[-1022, 1023]`` in float64): a decay below ``2^-126`` comes out as ``2^-126`` instead of a
subnormal or 0, an absolute difference under ``1.2e-38`` (``2.3e-308`` in float64). The kernels
allow LLVM one fast-math liberty, ``contract``: fused multiply-adds, one rounding instead of two
(the results still do not depend on the number of threads).

Forward. The block walks ``L`` in chunks of ``CHUNK`` steps. For each chunk it saves the state
entering it (only when a backward pass will follow): ``(batch, D, ceil(L / CHUNK), N)``, ``1 /
CHUNK`` of the ``(batch, D, L, N)`` state tensor. ``CHUNK`` 16 rather than 32 keeps the backward's
per-chunk buffers half the size (forward+backward about 13% faster on a Zen 4 machine, whose L1
holds 32 KB), and the saved states within the 1/8 memory budget. It loads the chunk's ``Delta``
(with ``delta_bias`` and softplus applied) and ``Delta u`` into ``(CHUNK, w)`` tiles, then per step
computes the decays, updates the state and accumulates ``y_t``, and writes ``(y_t + D u_t)
silu(z_t)``.

Backward (SPECS section 5), with ``g_t`` the gradient of ``y_t`` before the gate: the block walks
the chunks in reverse. For each it recomputes the chunk's states from the saved chunk-start state
into a local ``(CHUNK + 1, N, w)`` buffer (and the decays into ``(CHUNK, N, w)``), then
runs ``dh_t = C_t g_t + a_{t+1} dh_{t+1}`` backwards over the chunk and forms
``du_t = Delta_t sum_n dh_t B_t + D g_t``,
``dDelta_t = sum_n dh_t (A a_t h_{t-1} + B_t u_t)`` (times softplus' derivative),
``dA = sum_t Delta_t dh_t a_t h_{t-1}``, ``dB_t = sum_{d in group} dh_t Delta_t u_t``,
``dC_t = sum_{d in group} g_t h_t``, ``dD = sum_t g_t u_t``, the gate's ``dz`` (from ``y_t``,
recomputed) and ``d initial_state = a_0 dh_0``.

Determinism. Every sum runs in a fixed order that does not depend on the number of threads:
``dB_t, dC_t`` sum a block's lanes in the order of :func:`_lane_dots`' compiled vector reduction
(fixed per machine and build: a CPU with other vector widths may round differently);
the backward's tasks are ``(batch, group, part)`` with the same number of consecutive channel
blocks per part, each part adding its blocks in order into its own ``(N, L)`` buffer (part 0 into
the returned gradient), and the parts are then added in order. The number of parts is the largest
divisor of the blocks per group that keeps the extra buffers within ``PARTS_BUDGET`` of the state
tensor. ``dA, dD, d delta_bias`` are
per-(batch, channel) sums over ``t`` in order, added over the batch in order.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

BLOCK = 64
CHUNK = 16
PARTS_BUDGET = 1 / 16
SOFTPLUS_THRESHOLD = 20.0

# numba's OpenMP workers spin after each parallel region and starve torch's threads on a busy
# machine (torch's forward went from 15 ms to 5 s after one numba call, 2 cores shared with other
# jobs); the workqueue layer's workers sleep. It must be chosen before numba first starts its
# threads, and a layer chosen through $NUMBA_THREADING_LAYER wins. workqueue does not allow two
# parallel regions at once, so every kernel call holds _LOCK.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
_LOCK = threading.Lock()


@intrinsic
def _float_with_bits(typingctx, x):
    """The float whose bit pattern is the integer ``x`` holds (``0 <= x < 2^(bits-1)``): LLVM's
    ``fptosi`` then ``bitcast``, both of which LLVM vectorises."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptosi(args[0], ir.IntType(x.bitwidth)), args[0].type)

    return x(x), codegen


def _exp2_constants(c):
    """The tuple ``k`` of :func:`_exp2` from the array ``c`` of :func:`_constants`."""


@overload(_exp2_constants)
def _exp2_constants_overload(c):
    if c.dtype.bitwidth == 32:
        return lambda c: (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9])
    return lambda c: (
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13],
        c[14], c[15],
    )  # fmt: skip


@numba.njit(inline="always")
def _exp2_split(e, k):
    """``e`` clamped to ``[k[0], k[1]]`` as ``r + f``: ``r = rint(e)``, ``|f| <= 1/2``."""
    v = min(max(e, k[0]), k[1])
    r = np.rint(v)
    return r, v - r


@numba.njit(inline="always")
def _exp2_scale(q, r, k):
    """``q 2^r``, with ``2^r`` the float whose bits are ``(r + bias) 2^shift`` (``bias`` is the
    clamp's upper end, ``k[1]``; ``2^shift`` is ``k[2]``)."""
    return q * _float_with_bits(r * k[2] + k[2] * k[1])


@numba.njit(inline="always")
def _horner_low(q, f, k):
    """Horner's last six steps, over ``k[8], ..., k[3]`` (the coefficients of ``f^5 .. f^0``)."""
    q = q * f + k[8]
    q = q * f + k[7]
    q = q * f + k[6]
    q = q * f + k[5]
    q = q * f + k[4]
    return q * f + k[3]


def _exp2(e, k):
    """``2^e`` in vectorisable arithmetic (see the module docstring, Decays); ``k`` from
    :func:`_exp2_constants`. Horner's steps are written out: as a loop over the tuple, LLVM left
    them rolled (the forward was about a third slower)."""


@overload(_exp2, inline="always")
def _exp2_overload(e, k):
    if k.count == 10:  # float32, degree 6

        def exp2_float32(e, k):
            r, f = _exp2_split(e, k)
            return _exp2_scale(_horner_low(k[9], f, k), r, k)

        return exp2_float32

    def exp2_float64(e, k):  # degree 12
        r, f = _exp2_split(e, k)
        q = k[15] * f + k[14]
        q = q * f + k[13]
        q = q * f + k[12]
        q = q * f + k[11]
        q = q * f + k[10]
        return _exp2_scale(_horner_low(q * f + k[9], f, k), r, k)

    return exp2_float64


def _transposer(nbytes: int):
    """An intrinsic ``f(src, s_off, s_stride, dst, d_off, d_stride)``:
    ``dst[d_off + j d_stride + i] = src[s_off + i s_stride + j]`` for ``i, j < K``, ``K`` the
    elements in ``nbytes`` bytes; ``src, dst`` flat arrays of one float dtype. Written by hand in
    LLVM's vector IR because numba has no way to express it: ``K`` vector loads, ``log2 K`` rounds
    of two-source shuffles (each swaps the off-diagonal blocks of a pair of rows), ``K`` vector
    stores; LLVM lowers the shuffles for the CPU it compiles for."""

    @intrinsic
    def transpose(typingctx, src, s_off, s_stride, dst, d_off, d_stride):
        if not (isinstance(src, types.Array) and isinstance(dst, types.Array)):
            return None
        if src.dtype != dst.dtype or not isinstance(src.dtype, types.Float):
            return None
        size = nbytes // (src.dtype.bitwidth // 8)

        def codegen(context, builder, signature, args):
            src_v, s_off_v, s_stride_v, dst_v, d_off_v, d_stride_v = args
            src_data = context.make_array(signature.args[0])(context, builder, src_v).data
            dst_data = context.make_array(signature.args[3])(context, builder, dst_v).data
            vector = ir.VectorType(context.get_value_type(signature.args[0].dtype), size)

            def row(data, offset, stride, i):
                at = builder.add(offset, builder.mul(stride, ir.Constant(stride.type, i)))
                return builder.bitcast(builder.gep(data, [at]), vector.as_pointer())

            rows = [
                builder.load(row(src_data, s_off_v, s_stride_v, i), align=1) for i in range(size)
            ]
            half = size // 2
            while half:
                masks = (
                    [j if j & half == 0 else size + j - half for j in range(size)],
                    [j + half if j & half == 0 else size + j for j in range(size)],
                )
                lo, hi = (ir.Constant(ir.VectorType(ir.IntType(32), size), mk) for mk in masks)
                for i in range(size):
                    if i & half == 0:
                        a, b = rows[i], rows[i + half]
                        rows[i] = builder.shuffle_vector(a, b, lo)
                        rows[i + half] = builder.shuffle_vector(a, b, hi)
                half //= 2
            for i in range(size):
                builder.store(rows[i], row(dst_data, d_off_v, d_stride_v, i), align=1)
            return context.get_dummy_value()

        return types.void(src, s_off, s_stride, dst, d_off, d_stride), codegen

    return transpose


_transpose_block = _transposer(64)  # 16 x 16 in float32, 8 x 8 in float64
_transpose_half = _transposer(32)  # 8 x 8 in float32, 4 x 4 in float64


@numba.njit(cache=True)
def _transpose_rest(src, s_base, s_major, dst, d_base, d_major, rows, cols, ri, cj):
    """:func:`_transpose`'s elements outside the blocks ``i < ri, j < cj``, one by one, in a
    function of its own (the edges are rare; inlined at every transposition, this loop doubled
    the kernels' compile time)."""
    for i in range(rows):
        for j in range(cj if i < ri else 0, cols):
            dst[d_base + j * d_major + i] = src[s_base + i * s_major + j]


@numba.njit(inline="always")
def _transpose(src, s_base, s_major, dst, d_base, d_major, rows, cols):
    """``dst[d_base + j d_major + i] = src[s_base + i s_major + j]`` for ``i < rows``,
    ``j < cols`` (``src, dst`` flat): by 64-byte blocks, then 32-byte blocks along the edges (a
    block of 24 channels, say), then element by element."""
    size = 64 // src.itemsize
    half = size // 2
    ri, cj = rows - rows % size, cols - cols % size
    for i0 in range(0, ri, size):
        for j0 in range(0, cj, size):
            _transpose_block(
                src, s_base + i0 * s_major + j0, s_major, dst, d_base + j0 * d_major + i0, d_major
            )
    rh, ch = rows - rows % half, cols - cols % half
    for i0 in range(0, rh, half):
        for j0 in range(0 if i0 >= ri else cj, ch, half):
            _transpose_half(
                src, s_base + i0 * s_major + j0, s_major, dst, d_base + j0 * d_major + i0, d_major
            )
    if rh < rows or ch < cols:
        _transpose_rest(src, s_base, s_major, dst, d_base, d_major, rows, cols, rh, ch)


@numba.njit(inline="always")
def _tile_in(src, base, stride, m, w, T):
    """``T[t w + r] = src[base + r stride + t]`` for ``t < m``, ``r < w`` (``src, T`` flat): ``w``
    rows of ``m`` steps, ``stride`` apart, transposed into the ``(m, w)`` tile."""
    _transpose(src, base, stride, T, 0, w, w, m)


@numba.njit(inline="always")
def _tile_out(T, dst, base, stride, m, w):
    """The inverse of :func:`_tile_in`: ``dst[base + r stride + t] = T[t w + r]``."""
    _transpose(T, 0, w, dst, base, stride, m, w)


@numba.njit(inline="always")
def _discretise(DT, U, X, SP, bias, softplus, d0, m, w):
    """On ``(m, w)`` tiles of channels ``d0 ..``: ``DT <- Delta`` (``delta_bias`` added, then
    softplus, whose derivative goes to ``SP``) and ``X = Delta u``; ``DT`` holds ``delta`` and
    ``U`` holds ``u`` on entry."""
    for t in range(m):
        dt, ut, xt = DT[t * w : (t + 1) * w], U[t * w : (t + 1) * w], X[t * w : (t + 1) * w]
        if bias.shape[0] > 0:
            b = bias[d0 : d0 + w]
            for r in range(w):
                dt[r] += b[r]
        if softplus:
            sp = SP[t * w : (t + 1) * w]
            for r in range(w):
                x = dt[r]
                s = 1.0
                if x <= SOFTPLUS_THRESHOLD:
                    e = math.exp(x)
                    s = e / (e + 1.0)
                    x = math.log1p(e)
                dt[r] = x
                sp[r] = s
        for r in range(w):
            xt[r] = dt[r] * ut[r]


@numba.njit(inline="always")
def _load_chunk(delta, u, B, C, bias, softplus, bi, g, d0, w, t0, m, base, DT, U, X, SP, BT, CT):
    """The chunk's ``(m, w)`` tiles ``DT, U, X, SP`` (:func:`_discretise`) and ``(m, N)`` tiles
    ``B_t, C_t``; ``delta, u`` ``(batch, D, L)``, ``B, C`` ``(batch, G, N, L)``, ``base`` the flat
    index of ``delta[bi, d0, t0]``."""
    L, N = delta.shape[2], B.shape[2]
    _tile_in(delta.reshape(delta.size), base, L, m, w, DT)
    _tile_in(u.reshape(u.size), base, L, m, w, U)
    _discretise(DT, U, X, SP, bias, softplus, d0, m, w)
    base_bc = (bi * B.shape[1] + g) * N * L + t0
    _tile_in(B.reshape(B.size), base_bc, L, m, N, BT)
    _tile_in(C.reshape(C.size), base_bc, L, m, N, CT)


@numba.njit(inline="always")
def _block(j, Dg, block):
    """First channel (within the group) and width of the group's ``j``-th channel block."""
    return j * block, min(block, Dg - j * block)


@numba.njit(inline="always")
def _step(Hin, Hout, AT, dt, P, X, Y, Bt, Ct, N, w, k, read_out, keep):
    """One step for the ``(N, w)`` flat state: ``p = 2^(dt AT[n])`` (kept in ``P`` if ``keep``),
    ``Hout[n] = p Hin[n] + X B_t[n]`` and, if ``read_out``, ``Y = sum_n C_t[n] Hout[n]``
    (ascending ``n``); ``dt, X, Y`` rows of ``w`` lanes, ``Bt, Ct`` rows of ``N``."""
    if read_out:
        for r in range(w):
            Y[r] = 0
    for n in range(N):
        bt, ct = Bt[n], Ct[n]
        a, hi, ho = AT[n * w : (n + 1) * w], Hin[n * w : (n + 1) * w], Hout[n * w : (n + 1) * w]
        if keep:
            pk = P[n * w : (n + 1) * w]
            if read_out:
                for r in range(w):
                    p = _exp2(dt[r] * a[r], k)
                    pk[r] = p
                    h = p * hi[r] + X[r] * bt
                    ho[r] = h
                    Y[r] += ct * h
            else:
                for r in range(w):
                    p = _exp2(dt[r] * a[r], k)
                    pk[r] = p
                    ho[r] = p * hi[r] + X[r] * bt
        else:
            for r in range(w):
                h = _exp2(dt[r] * a[r], k) * hi[r] + X[r] * bt
                ho[r] = h
                Y[r] += ct * h


@numba.njit(parallel=True, fastmath={"contract"}, cache=True)
def _forward_kernel(
    u, delta, A2, B, C, Dskip, z, bias, h0, softplus, save, c, block, y, last, starts
):
    """``y = (sum_n C h + D u) silu(z)``, the last state and (if ``save``) chunk-start states."""
    batch, channels, L = u.shape
    G, N = B.shape[1], A2.shape[1]
    Dg = channels // G
    nblk = (Dg + block - 1) // block
    k = _exp2_constants(c)
    y_flat, z_flat = y.reshape(y.size), z.reshape(z.size)
    for task in numba.prange(batch * G * nblk):
        bi, g, j = task // (G * nblk), (task // nblk) % G, task % nblk
        off, w = _block(j, Dg, block)
        d0 = g * Dg + off
        nl = N * w
        # the state before step t is Hs[t % 2]: a step reads one row and writes the other (with
        # one array updated in place, LLVM's run-time overlap check sent the loop to its scalar
        # version: the forward took 4x as long)
        Hs = np.zeros((2, nl), u.dtype)
        AT = np.empty(nl, u.dtype)
        DT = np.empty(CHUNK * w, u.dtype)
        U = np.empty(CHUNK * w, u.dtype)
        X = np.empty(CHUNK * w, u.dtype)
        SP = np.empty(CHUNK * w, u.dtype)
        Y = np.empty(CHUNK * w, u.dtype)
        Z = np.empty(CHUNK * w, u.dtype)
        BT = np.empty(CHUNK * N, u.dtype)
        CT = np.empty(CHUNK * N, u.dtype)
        for r in range(w):
            for n in range(N):
                AT[n * w + r] = A2[d0 + r, n]
                if h0.shape[0] > 0:
                    Hs[0, n * w + r] = h0[bi, d0 + r, n]
        for ch in range((L + CHUNK - 1) // CHUNK):
            t0 = ch * CHUNK
            m = min(CHUNK, L - t0)
            if save:
                H = Hs[t0 % 2]
                for r in range(w):
                    for n in range(N):
                        starts[bi, d0 + r, ch, n] = H[n * w + r]
            base = (bi * channels + d0) * L + t0
            _load_chunk(
                delta, u, B, C, bias, softplus, bi, g, d0, w, t0, m, base, DT, U, X, SP, BT, CT
            )
            for t in range(m):
                _step(
                    Hs[(t0 + t) % 2], Hs[(t0 + t + 1) % 2], AT, DT[t * w : (t + 1) * w], AT,
                    X[t * w : (t + 1) * w], Y[t * w : (t + 1) * w],
                    BT[t * N : (t + 1) * N], CT[t * N : (t + 1) * N], N, w, k, True, False,
                )  # fmt: skip
            if z.shape[0] > 0:
                _tile_in(z_flat, base, L, m, w, Z)
            for t in range(m):
                yt, ut, zt = Y[t * w : (t + 1) * w], U[t * w : (t + 1) * w], Z[t * w : (t + 1) * w]
                if Dskip.shape[0] > 0:
                    dk = Dskip[d0 : d0 + w]
                    for r in range(w):
                        yt[r] += dk[r] * ut[r]
                if z.shape[0] > 0:
                    for r in range(w):
                        yt[r] *= zt[r] / (1.0 + math.exp(-zt[r]))
            _tile_out(Y, y_flat, base, L, m, w)
        H = Hs[L % 2]
        for r in range(w):
            for n in range(N):
                last[bi, d0 + r, n] = H[n * w + r]


@numba.njit(fastmath={"reassoc"}, cache=True)
def _lane_dots(P, p, Q, q, DP, DQ, N, w):
    """``DP[n] = sum_r P[n, r] p[r]`` and ``DQ[n] = sum_r Q[n, r] q[r]`` for ``(N, w)`` flat
    ``P, Q``: the one function compiled with reassociation allowed, so that LLVM vectorises the
    sums (vector partial sums, then a horizontal reduction); the order is fixed by the compiled
    code, the same on every call and for any number of threads. Scalar sums (without
    reassociation LLVM keeps the sequential order) took about a fifth of the backward's time."""
    for n in range(N):
        pn, qn = P[n * w : (n + 1) * w], Q[n * w : (n + 1) * w]
        sp, sq = P.dtype.type(0), Q.dtype.type(0)
        for r in range(w):
            sp += pn[r] * p[r]
        for r in range(w):
            sq += qn[r] * q[r]
        DP[n], DQ[n] = sp, sq


@numba.njit(parallel=True, fastmath={"contract"}, cache=True)
def _backward_kernel(
    u, delta, A, A2, B, C, Dskip, z, bias, softplus, starts, gy, glast, c, block, parts,
    du, ddelta, dA, dB, dB_extra, dC, dC_extra, dD, dbias, dz, dh0,
):  # fmt: skip
    """Every gradient of the scan (see the module docstring); ``dA, dD, dbias`` per batch."""
    batch, channels, L = u.shape
    G, N = B.shape[1], A.shape[1]
    Dg = channels // G
    nblk = (Dg + block - 1) // block
    per_part = nblk // parts
    k = _exp2_constants(c)
    has_z = z.shape[0] > 0
    gy_flat, z_flat, dz_flat = gy.reshape(gy.size), z.reshape(z.size), dz.reshape(dz.size)
    du_flat, ddelta_flat = du.reshape(du.size), ddelta.reshape(ddelta.size)
    for task in numba.prange(batch * G * parts):
        bi, g, p = task // (G * parts), (task // parts) % G, task % parts
        dBp = dB[bi, g] if p == 0 else dB_extra[bi, g, p - 1]
        dCp = dC[bi, g] if p == 0 else dC_extra[bi, g, p - 1]
        dBp[:] = 0
        dCp[:] = 0
        for j in range(p * per_part, (p + 1) * per_part):
            off, w = _block(j, Dg, block)
            d0 = g * Dg + off
            nl = N * w
            Hb = np.empty((CHUNK + 1) * nl, u.dtype)
            Pb = np.empty(CHUNK * nl, u.dtype)
            AT = np.empty(nl, u.dtype)
            AT2 = np.empty(nl, u.dtype)
            carry = np.zeros(nl, u.dtype)
            dAacc = np.zeros(nl, u.dtype)
            DT = np.empty(CHUNK * w, u.dtype)
            X = np.empty(CHUNK * w, u.dtype)
            U = np.empty(CHUNK * w, u.dtype)
            SP = np.empty(CHUNK * w, u.dtype)
            Gt = np.empty(CHUNK * w, u.dtype)
            Yp = np.empty(CHUNK * w, u.dtype)
            Z = np.empty(CHUNK * w, u.dtype)
            DU = np.empty(CHUNK * w, u.dtype)
            DDT = np.empty(CHUNK * w, u.dtype)
            S = np.empty(w, u.dtype)
            Sa = np.empty(w, u.dtype)
            dD_acc = np.zeros(w, u.dtype)
            db_acc = np.zeros(w, u.dtype)
            BT = np.empty(CHUNK * N, u.dtype)
            CT = np.empty(CHUNK * N, u.dtype)
            DBT = np.empty(CHUNK * N, u.dtype)
            DCT = np.empty(CHUNK * N, u.dtype)
            DBC = np.empty(CHUNK * N, u.dtype)  # DBT or DCT transposed, (N, CHUNK)
            for r in range(w):
                for n in range(N):
                    AT[n * w + r] = A[d0 + r, n]
                    AT2[n * w + r] = A2[d0 + r, n]
                    if glast.shape[0] > 0:
                        carry[n * w + r] = glast[bi, d0 + r, n]
            for ch in range((L + CHUNK - 1) // CHUNK - 1, -1, -1):
                t0 = ch * CHUNK
                m = min(CHUNK, L - t0)
                base = (bi * channels + d0) * L + t0
                _load_chunk(
                    delta, u, B, C, bias, softplus, bi, g, d0, w, t0, m, base, DT, U, X, SP, BT, CT
                )
                for r in range(w):
                    for n in range(N):
                        Hb[n * w + r] = starts[bi, d0 + r, ch, n]
                # recompute the chunk's decays and states (and y, for the gate)
                for t in range(m):
                    _step(
                        Hb[t * nl : (t + 1) * nl],
                        Hb[(t + 1) * nl : (t + 2) * nl],
                        AT2,
                        DT[t * w : (t + 1) * w],
                        Pb[t * nl : (t + 1) * nl],
                        X[t * w : (t + 1) * w],
                        Yp[t * w : (t + 1) * w],
                        BT[t * N : (t + 1) * N], CT[t * N : (t + 1) * N], N, w, k, has_z, True,
                    )  # fmt: skip
                # the gate and D: g before the gate, dz, dD (per lane, in the order of t)
                _tile_in(gy_flat, base, L, m, w, Gt)
                if has_z:
                    _tile_in(z_flat, base, L, m, w, Z)
                for t in range(m):
                    gt, ut = Gt[t * w : (t + 1) * w], U[t * w : (t + 1) * w]
                    if has_z:
                        yt, zt = Yp[t * w : (t + 1) * w], Z[t * w : (t + 1) * w]
                        if Dskip.shape[0] > 0:
                            dk = Dskip[d0 : d0 + w]
                            for r in range(w):
                                yt[r] += dk[r] * ut[r]
                        for r in range(w):
                            zv = zt[r]
                            sg = 1.0 / (1.0 + math.exp(-zv))
                            zt[r] = gt[r] * yt[r] * sg * (1.0 + zv * (1.0 - sg))  # dz
                            gt[r] = gt[r] * zv * sg
                    for r in range(w):
                        dD_acc[r] += gt[r] * ut[r]
                if has_z:
                    _tile_out(Z, dz_flat, base, L, m, w)
                # the reverse scan
                for t in range(m - 1, -1, -1):
                    gt, dtt, xt = (
                        Gt[t * w : (t + 1) * w],
                        DT[t * w : (t + 1) * w],
                        X[t * w : (t + 1) * w],
                    )
                    for r in range(w):
                        S[r] = 0
                        Sa[r] = 0
                    for n in range(N):
                        bt, ct = BT[t * N + n], CT[t * N + n]
                        k0, k1 = t * nl + n * w, t * nl + (n + 1) * w
                        a, hp = Pb[k0:k1], Hb[k0:k1]
                        at, cr, da = (
                            AT[n * w : (n + 1) * w],
                            carry[n * w : (n + 1) * w],
                            dAacc[n * w : (n + 1) * w],
                        )
                        # two short loops: LLVM vectorises a loop only when it can check
                        # the overlap of every pair of arrays it touches at run time
                        for r in range(w):  # cr <- dh_t
                            dh = cr[r] + ct * gt[r]
                            cr[r] = dh
                            S[r] += dh * bt
                        for r in range(w):
                            q = cr[r] * a[r] * hp[r]
                            Sa[r] += at[r] * q
                            da[r] += dtt[r] * q
                    _lane_dots(
                        carry, xt, Hb[(t + 1) * nl : (t + 2) * nl], gt,
                        DBT[t * N : (t + 1) * N], DCT[t * N : (t + 1) * N], N, w,
                    )  # fmt: skip
                    pt = Pb[t * nl : (t + 1) * nl]
                    for i in range(nl):  # the carry into step t - 1, a_t dh_t
                        carry[i] *= pt[i]
                    du_t, ddt_t = DU[t * w : (t + 1) * w], DDT[t * w : (t + 1) * w]
                    ut, spt = U[t * w : (t + 1) * w], SP[t * w : (t + 1) * w]
                    for r in range(w):
                        du_t[r] = dtt[r] * S[r]
                        ddt_t[r] = Sa[r] + ut[r] * S[r]
                    if softplus:
                        for r in range(w):
                            ddt_t[r] *= spt[r]
                    if Dskip.shape[0] > 0:
                        dk = Dskip[d0 : d0 + w]
                        for r in range(w):
                            du_t[r] += dk[r] * gt[r]
                _tile_out(DU, du_flat, base, L, m, w)
                _tile_out(DDT, ddelta_flat, base, L, m, w)
                for t in range(m):
                    ddt_t = DDT[t * w : (t + 1) * w]
                    for r in range(w):
                        db_acc[r] += ddt_t[r]
                # this block's dB_t, dC_t into the part's sums, along t
                for DXT, dXp in ((DBT, dBp), (DCT, dCp)):
                    _tile_out(DXT, DBC, 0, CHUNK, m, N)
                    for n in range(N):
                        dst, src = dXp[n, t0 : t0 + m], DBC[n * CHUNK : n * CHUNK + m]
                        for t in range(m):
                            dst[t] += src[t]
            for r in range(w):
                dD[bi, d0 + r] = dD_acc[r]
                dbias[bi, d0 + r] = db_acc[r]
                for n in range(N):
                    dA[bi, d0 + r, n] = dAacc[n * w + r]
                    dh0[bi, d0 + r, n] = carry[n * w + r]


def _exp2_coefficients(dtype: torch.dtype) -> list[float]:
    """Power-basis coefficients (ascending ``f``) of the polynomial for ``2^f``, ``|f| <= 1/2``.

    float32: degree 6, interpolating at the Chebyshev points of ``[-1/2, 1/2]`` (near the minimax
    polynomial): relative error 2.6e-9 in exact arithmetic, 8.8e-8 evaluated in float32 with
    fused multiply-adds (the degree-7 Taylor polynomial used before: 9.9e-8 without them).
    float64: the degree-12 Taylor polynomial of ``e^(f ln 2)`` (remainder below 2e-16; an
    interpolant converted to the power basis loses more than that to rounding)."""
    if dtype == torch.float64:
        return [math.log(2) ** j / math.factorial(j) for j in range(13)]
    chebyshev = np.polynomial.chebyshev
    in_x = chebyshev.cheb2poly(chebyshev.chebinterpolate(lambda x: 2.0 ** (x / 2), 6))  # x = 2 f
    return (in_x * 2.0 ** np.arange(7)).tolist()


@functools.cache
def _constants(dtype: torch.dtype) -> np.ndarray:
    """The array of :func:`_exp2_constants`: the clamp range, ``2^shift`` (the place of the
    exponent bits), then the polynomial's coefficients (:func:`_exp2_coefficients`)."""
    if dtype == torch.float64:
        lo, hi, shift, np_dtype = -1022, 1023, 52, np.float64
    else:
        lo, hi, shift, np_dtype = -126, 127, 23, np.float32
    return np.array([lo, hi, 2.0**shift, *_exp2_coefficients(dtype)], np_dtype)


def _parts(blocks: int, channels: int, groups: int) -> int:
    """Channel parts per group in the backward: the largest divisor of ``blocks`` whose extra
    ``dB, dC`` buffers, ``2 (parts - 1) G / D`` of the state tensor, stay within PARTS_BUDGET."""
    cap = 1 + int(PARTS_BUDGET * channels / (2 * groups))
    return max(p for p in range(1, blocks + 1) if blocks % p == 0 and p <= cap)


def scratch_bytes(n_state: int, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes of the local buffers one thread's task allocates inside the forward and the backward
    kernel (numpy allocations, not seen by torch's allocator)."""
    size = 8 if dtype == torch.float64 else 4
    nl, tile, bc = n_state * BLOCK, CHUNK * BLOCK, CHUNK * n_state
    forward = 3 * nl + 6 * tile + 2 * bc
    backward = (2 * CHUNK + 5) * nl + 9 * tile + 4 * BLOCK + 5 * bc
    return forward * size, backward * size


def _np(x: torch.Tensor | None, dtype: torch.dtype, ndim: int) -> np.ndarray:
    """``x`` in ``dtype`` as a contiguous array (no copy when it already is), or an empty one."""
    if x is None:
        return np.empty((0,) * ndim, np.float64 if dtype == torch.float64 else np.float32)
    return x.detach().to(dtype).contiguous().numpy()


def _ordered_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over ``dim`` adding the slices in index order (bitwise reproducible)."""
    out = x.select(dim, 0).clone()
    for i in range(1, x.shape[dim]):
        out += x.select(dim, i)
    return out


def _threads() -> None:
    """Run numba's parallel loops on as many threads as torch uses."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class _NumbaScanFn(torch.autograd.Function):
    """The scan with ``B, C`` in the grouped form; returns ``(y, last_state)``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save):
        ctx.set_materialize_grads(False)
        cd = torch.float64 if u.dtype == torch.float64 else torch.float32
        b, channels, L = u.shape
        N = A.shape[1]
        log2e = A.detach().to(torch.float64) * math.log2(math.e)
        c = _constants(cd)
        y = torch.empty(b, channels, L, dtype=cd)
        last = torch.empty(b, channels, N, dtype=cd)
        shape = (b, channels, -(-L // CHUNK), N) if save else (0, 0, 0, 0)
        starts = torch.empty(shape, dtype=cd)
        with _LOCK:
            _threads()
            _forward_kernel(
                _np(u, cd, 3),
                _np(delta, cd, 3),
                _np(log2e, cd, 2),
                _np(B, cd, 4),
                _np(C, cd, 4),
                _np(D, cd, 1),
                _np(z, cd, 3),
                _np(delta_bias, cd, 1),
                _np(initial_state, cd, 3),
                delta_softplus,
                save,
                c,
                BLOCK,
                y.numpy(),
                last.numpy(),
                starts.numpy(),
            )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, starts)
        ctx.delta_softplus = delta_softplus
        return y.to(u.dtype), last

    @staticmethod
    def backward(ctx, g_out, g_last):
        u, delta, A, B, C, D, z, delta_bias, initial_state, starts = ctx.saved_tensors
        cd = torch.float64 if u.dtype == torch.float64 else torch.float32
        b, channels, L = u.shape
        G, N = B.shape[1], A.shape[1]
        parts = _parts(-(-(channels // G) // BLOCK), channels, G)
        c = _constants(cd)
        g_out = torch.zeros(b, channels, L, dtype=cd) if g_out is None else g_out
        du, ddelta = torch.empty(b, channels, L, dtype=cd), torch.empty(b, channels, L, dtype=cd)
        dA, dh0 = torch.empty(b, channels, N, dtype=cd), torch.empty(b, channels, N, dtype=cd)
        dD, dbias = torch.empty(b, channels, dtype=cd), torch.empty(b, channels, dtype=cd)
        dB, dC = (torch.empty(b, G, N, L, dtype=cd) for _ in range(2))
        dB_extra, dC_extra = (torch.empty(b, G, parts - 1, N, L, dtype=cd) for _ in range(2))
        dz = torch.empty((b, channels, L) if z is not None else (0, 0, 0), dtype=cd)
        A_cd = A.detach().to(cd)
        with _LOCK:
            _threads()
            _backward_kernel(
                _np(u, cd, 3),
                _np(delta, cd, 3),
                A_cd.contiguous().numpy(),
                _np(A.detach().to(torch.float64) * math.log2(math.e), cd, 2),
                _np(B, cd, 4),
                _np(C, cd, 4),
                _np(D, cd, 1),
                _np(z, cd, 3),
                _np(delta_bias, cd, 1),
                ctx.delta_softplus,
                starts.numpy(),
                _np(g_out, cd, 3),
                _np(g_last, cd, 3),
                c,
                BLOCK,
                parts,
                du.numpy(),
                ddelta.numpy(),
                dA.numpy(),
                dB.numpy(),
                dB_extra.numpy(),
                dC.numpy(),
                dC_extra.numpy(),
                dD.numpy(),
                dbias.numpy(),
                dz.numpy(),
                dh0.numpy(),
            )
        for i in range(parts - 1):
            dB += dB_extra[:, :, i]
            dC += dC_extra[:, :, i]

        def cast(x: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor | None:
            return None if like is None else x.to(like.dtype)

        return (
            du.to(u.dtype),
            ddelta.to(delta.dtype),
            _ordered_sum(dA, 0).to(A.dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            cast(_ordered_sum(dD, 0), D),
            cast(dz, z),
            cast(_ordered_sum(dbias, 0), delta_bias),
            cast(dh0, initial_state),
            None,
            None,
        )


def selective_scan_numba(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The fused CPU scan (see the module docstring); inputs as the reference, already validated,
    on the CPU. Returns ``y`` ``(batch, D, L)`` in ``u``'s dtype, and the last state
    ``(batch, D, N)`` in the compute dtype when ``return_last_state``."""
    B4 = B.unsqueeze(1) if B.ndim == 3 else B
    C4 = C.unsqueeze(1) if C.ndim == 3 else C
    tensors = (u, delta, A, B4, C4, D, z, delta_bias, initial_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, last = _NumbaScanFn.apply(*tensors, delta_softplus, save)
    return (y, last) if return_last_state else y
