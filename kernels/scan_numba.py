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
``n`` lane-wise, in ascending ``n``, with no horizontal sum. The ``Delta, u`` tiles are loaded
walking the ``(batch, D, L)`` tensors along ``t``, one channel after another: channels lie ``4 L``
bytes apart, a multiple of 4 KB at ``L = 4096``, so a load loop across channels hits one L1 cache
set again and again (it took a quarter of the forward's time at batch 2, D 64, N 16, L 4096).
Writing ``y`` and the gradients from the tiles also walks along ``t`` (contiguous stores). These
transposing loops run best as scalar code: vectorised, one side of them becomes a gather or a
scatter, slower on AMD Zen than scalar loads and stores. LLVM does not vectorise a loop that
carries a floating-point sum (without reassociation it cannot reorder the additions), so each of
them carries one: the gradients' sums over ``t`` where there is one, and elsewhere the sum of the
discretised ``Delta`` (returned by the kernels and otherwise unused; it made the backward kernel
about 10% faster, the forward 4%).

Decays. ``exp(Delta A) = 2^(Delta A log2 e)`` is computed in vectorisable arithmetic (numba
has no vector ``exp`` without Intel's SVML): ``e = k + f`` with ``k = rint(e)``, ``|f| <= 1/2``;
``2^f`` by a polynomial (:func:`_exp2_coefficients`: degree 6 in float32, relative error 8.8e-8
as evaluated; degree 12 in float64, below 2e-16) and ``2^k`` by writing ``k`` into the exponent
bits. ``e`` is clamped to the normal range (``[-126, 127]`` in float32, ``[-1022, 1023]`` in
float64): a decay below ``2^-126`` comes out as ``2^-126`` instead of a subnormal or 0, an absolute
difference under ``1.2e-38`` (``2.3e-308`` in float64). The kernels allow LLVM one fast-math
liberty, ``contract``: fused multiply-adds, one rounding instead of two (the results still do not
depend on the number of threads).

Forward. The block walks ``L`` in chunks of ``CHUNK`` steps. For each chunk it saves the state
entering it (only when a backward pass will follow): ``(batch, D, ceil(L / CHUNK), N)``, ``1 /
CHUNK`` of the ``(batch, D, L, N)`` state tensor. It loads the chunk's ``Delta`` (with
``delta_bias`` and softplus applied) and ``Delta u`` into ``(CHUNK, w)`` tiles, then per step
computes the decays, updates the state and accumulates ``y_t``, and writes
``(y_t + D u_t) silu(z_t)``.

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
``dB_t, dC_t`` sum a block's lanes in the order of :func:`_lane_sum`'s compiled vector reduction
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

BLOCK = 64
CHUNK = 32
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


@numba.njit(inline="always")
def _decays(dt, AT, P, IB, SC, c, wide, N, w):
    """``P[n, r] = exp(dt[r] A[r, n]) = 2^(dt[r] AT[n, r])`` for ``n < N``, ``r < w``, all
    ``(N, w)`` flat (``AT = A log2 e`` transposed); ``IB`` is an integer scratch whose float view
    ``SC`` holds ``2^k``. ``c``: the clamp range, the exponent bias and shift, then the
    polynomial's coefficients (:func:`_exp2_coefficients`)."""
    nl = N * w
    for n in range(N):
        a, e = AT[n * w : (n + 1) * w], P[n * w : (n + 1) * w]
        for r in range(w):
            e[r] = dt[r] * a[r]
    lo, hi = c[0], c[1]
    bias, shift = IB.dtype.type(c[2]), IB.dtype.type(c[3])
    for i in range(nl):
        v = P[i]
        v = lo if v < lo else v
        v = hi if v > hi else v
        k = np.rint(v)
        P[i] = v - k
        IB[i] = (IB.dtype.type(k) + bias) << shift
    c0, c1, c2, c3, c4, c5, c6 = c[4], c[5], c[6], c[7], c[8], c[9], c[10]
    if wide:
        c7, c8, c9, c10, c11, c12 = c[11], c[12], c[13], c[14], c[15], c[16]
        for i in range(nl):
            f = P[i]
            q = c12 * f + c11
            q = q * f + c10
            q = q * f + c9
            q = q * f + c8
            q = q * f + c7
            q = q * f + c6
            q = q * f + c5
            q = q * f + c4
            q = q * f + c3
            q = q * f + c2
            q = q * f + c1
            P[i] = (q * f + c0) * SC[i]
    else:
        for i in range(nl):
            f = P[i]
            q = c6 * f + c5
            q = q * f + c4
            q = q * f + c3
            q = q * f + c2
            q = q * f + c1
            P[i] = (q * f + c0) * SC[i]


@numba.njit(inline="always")
def _load_steps(delta, u, bias, softplus, bi, d0, w, t0, m, DT, X, U, SP):
    """Tiles ``(m, w)`` (flat, row ``t``) of the steps ``t0 .. t0+m-1`` of channels
    ``d0 .. d0+w-1``: ``DT`` the discretised ``Delta``, ``X = Delta u``, ``U = u`` and ``SP`` the
    derivative of ``Delta`` in ``delta``. Returns the sum of ``DT``, a by-product that keeps the
    loop scalar (see the module docstring, Layout)."""
    total = 0.0
    for r in range(w):  # each channel's steps in order (see the module docstring, Layout)
        for t in range(m):
            x = delta[bi, d0 + r, t0 + t]
            if bias.shape[0] > 0:
                x += bias[d0 + r]
            s = 1.0
            if softplus and x <= SOFTPLUS_THRESHOLD:
                e = math.exp(x)
                s = e / (e + 1.0)
                x = math.log1p(e)
            i = t * w + r
            DT[i] = x
            X[i] = DT[i] * u[bi, d0 + r, t0 + t]
            U[i] = u[bi, d0 + r, t0 + t]
            SP[i] = s
            total += x
    return total


@numba.njit(inline="always")
def _load_bc(B, C, bi, g, t0, m, N, BT, CT):
    """Tiles ``(m, N)`` (flat, row ``t``) of ``B_t`` and ``C_t`` for the steps ``t0 .. t0+m-1``,
    read along ``t`` (the ``N`` rows of ``B, C`` lie ``4 L`` bytes apart: read across ``n`` at
    every step, as before, they shared one L1 cache set with each other and with ``dB, dC``)."""
    for n in range(N):
        for t in range(m):
            BT[t * N + n] = B[bi, g, n, t0 + t]
            CT[t * N + n] = C[bi, g, n, t0 + t]


@numba.njit(inline="always")
def _block(j, Dg, block):
    """First channel (within the group) and width of the group's ``j``-th channel block."""
    return j * block, min(block, Dg - j * block)


@numba.njit(inline="always")
def _step(Hin, Hout, P, X, Y, Bt, Ct, N, w, read_out):
    """``Hout[n] = P[n] Hin[n] + X B_t[n]`` for the ``(N, w)`` flat state and, if ``read_out``,
    ``Y = sum_n C_t[n] Hout[n]`` (ascending ``n``); ``X, Y`` rows of ``w`` lanes, ``Bt, Ct``
    rows of ``N``."""
    if read_out:
        for r in range(w):
            Y[r] = 0
    for n in range(N):
        bt, ct = Bt[n], Ct[n]
        hi, ho, p = Hin[n * w : (n + 1) * w], Hout[n * w : (n + 1) * w], P[n * w : (n + 1) * w]
        if read_out:
            for r in range(w):
                h = p[r] * hi[r] + X[r] * bt
                ho[r] = h
                Y[r] += ct * h
        else:
            for r in range(w):
                ho[r] = p[r] * hi[r] + X[r] * bt


@numba.njit(parallel=True, fastmath={"contract"}, cache=True)
def _forward_kernel(
    u, delta, A2, B, C, Dskip, z, bias, h0, softplus, save, c, ibits, block, y, last, starts
):
    """``y = (sum_n C h + D u) silu(z)``, the last state and (if ``save``) chunk-start states."""
    batch, channels, L = u.shape
    G, N = B.shape[1], A2.shape[1]
    Dg = channels // G
    nblk = (Dg + block - 1) // block
    wide = u.itemsize == 8
    total = 0.0  # the sum of _load_steps's by-products, returned so that it is kept
    for task in numba.prange(batch * G * nblk):
        bi, g, j = task // (G * nblk), (task // nblk) % G, task % nblk
        task_total = 0.0
        off, w = _block(j, Dg, block)
        d0 = g * Dg + off
        nl = N * w
        H = np.zeros(nl, u.dtype)
        AT = np.empty(nl, u.dtype)
        P = np.empty(nl, u.dtype)
        IB = np.empty(nl, ibits.dtype)
        SC = IB.view(u.dtype)
        DT = np.empty(CHUNK * w, u.dtype)
        X = np.empty(CHUNK * w, u.dtype)
        U = np.empty(CHUNK * w, u.dtype)
        SP = np.empty(CHUNK * w, u.dtype)
        Y = np.empty(CHUNK * w, u.dtype)
        BT = np.empty(CHUNK * N, u.dtype)
        CT = np.empty(CHUNK * N, u.dtype)
        for r in range(w):
            for n in range(N):
                AT[n * w + r] = A2[d0 + r, n]
                if h0.shape[0] > 0:
                    H[n * w + r] = h0[bi, d0 + r, n]
        for ch in range((L + CHUNK - 1) // CHUNK):
            t0 = ch * CHUNK
            m = min(CHUNK, L - t0)
            if save:
                for r in range(w):
                    for n in range(N):
                        starts[bi, d0 + r, ch, n] = H[n * w + r]
            task_total += _load_steps(delta, u, bias, softplus, bi, d0, w, t0, m, DT, X, U, SP)
            _load_bc(B, C, bi, g, t0, m, N, BT, CT)
            for t in range(m):
                _decays(DT[t * w : (t + 1) * w], AT, P, IB, SC, c, wide, N, w)
                _step(
                    H,
                    H,
                    P,
                    X[t * w : (t + 1) * w],
                    Y[t * w : (t + 1) * w],
                    BT[t * N : (t + 1) * N],
                    CT[t * N : (t + 1) * N],
                    N,
                    w,
                    True,
                )
            for r in range(w):
                for t in range(m):
                    v = Y[t * w + r]
                    if Dskip.shape[0] > 0:
                        v += Dskip[d0 + r] * U[t * w + r]
                    if z.shape[0] > 0:
                        zv = z[bi, d0 + r, t0 + t]
                        v *= zv / (1.0 + math.exp(-zv))
                    y[bi, d0 + r, t0 + t] = v
        for r in range(w):
            for n in range(N):
                last[bi, d0 + r, n] = H[n * w + r]
        total += task_total
    return total


@numba.njit(fastmath={"reassoc"}, cache=True)
def _lane_sum(q):
    """``sum_r q[r]``, the one sum compiled with reassociation allowed, so that LLVM vectorises
    it (vector partial sums, then a horizontal reduction); the order is fixed by the compiled
    code, the same on every call and for any number of threads. Scalar sums (without
    reassociation LLVM keeps the sequential order) took about a fifth of the backward's time."""
    s = q.dtype.type(0)
    for r in range(q.shape[0]):
        s += q[r]
    return s


@numba.njit(parallel=True, fastmath={"contract"}, cache=True)
def _backward_kernel(
    u, delta, A, A2, B, C, Dskip, z, bias, softplus, starts, gy, glast, c, ibits, block, parts,
    du, ddelta, dA, dB, dB_extra, dC, dC_extra, dD, dbias, dz, dh0,
):  # fmt: skip
    """Every gradient of the scan (see the module docstring); ``dA, dD, dbias`` per batch."""
    batch, channels, L = u.shape
    G, N = B.shape[1], A.shape[1]
    Dg = channels // G
    nblk = (Dg + block - 1) // block
    per_part = nblk // parts
    wide = u.itemsize == 8
    has_z = z.shape[0] > 0
    total = 0.0  # as in the forward kernel
    for task in numba.prange(batch * G * parts):
        bi, g, p = task // (G * parts), (task // parts) % G, task % parts
        task_total = 0.0
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
            IB = np.empty(nl, ibits.dtype)
            SC = IB.view(u.dtype)
            AT = np.empty(nl, u.dtype)
            AT2 = np.empty(nl, u.dtype)
            carry = np.zeros(nl, u.dtype)
            dAacc = np.zeros(nl, u.dtype)
            QB = np.empty(nl, u.dtype)
            QC = np.empty(nl, u.dtype)
            DT = np.empty(CHUNK * w, u.dtype)
            X = np.empty(CHUNK * w, u.dtype)
            U = np.empty(CHUNK * w, u.dtype)
            SP = np.empty(CHUNK * w, u.dtype)
            Gt = np.empty(CHUNK * w, u.dtype)
            Yp = np.empty(CHUNK * w, u.dtype)
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
            for r in range(w):
                for n in range(N):
                    AT[n * w + r] = A[d0 + r, n]
                    AT2[n * w + r] = A2[d0 + r, n]
                    if glast.shape[0] > 0:
                        carry[n * w + r] = glast[bi, d0 + r, n]
            for ch in range((L + CHUNK - 1) // CHUNK - 1, -1, -1):
                t0 = ch * CHUNK
                m = min(CHUNK, L - t0)
                task_total += _load_steps(delta, u, bias, softplus, bi, d0, w, t0, m, DT, X, U, SP)
                _load_bc(B, C, bi, g, t0, m, N, BT, CT)
                for r in range(w):
                    for n in range(N):
                        Hb[n * w + r] = starts[bi, d0 + r, ch, n]
                # recompute the chunk's decays and states (and y, for the gate)
                for t in range(m):
                    Pt = Pb[t * nl : (t + 1) * nl]
                    _decays(DT[t * w : (t + 1) * w], AT2, Pt, IB, SC, c, wide, N, w)
                    _step(
                        Hb[t * nl : (t + 1) * nl],
                        Hb[(t + 1) * nl : (t + 2) * nl],
                        Pt,
                        X[t * w : (t + 1) * w],
                        Yp[t * w : (t + 1) * w],
                        BT[t * N : (t + 1) * N], CT[t * N : (t + 1) * N], N, w, has_z,
                    )  # fmt: skip
                # the gate and D: g before the gate, dz, dD (summed in a register: a sum kept in
                # the array would be stored and reloaded at every step)
                for r in range(w):
                    acc = dD_acc[r]
                    for t in range(m):
                        i = t * w + r
                        gv = gy[bi, d0 + r, t0 + t]
                        if has_z:
                            yv = Yp[i]
                            if Dskip.shape[0] > 0:
                                yv += Dskip[d0 + r] * U[i]
                            zv = z[bi, d0 + r, t0 + t]
                            sg = 1.0 / (1.0 + math.exp(-zv))
                            dz[bi, d0 + r, t0 + t] = gv * yv * sg * (1.0 + zv * (1.0 - sg))
                            gv = gv * zv * sg
                        Gt[i] = gv
                        acc += gv * U[i]
                    dD_acc[r] = acc
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
                        a, hp, hn = Pb[k0:k1], Hb[k0:k1], Hb[k0 + nl : k1 + nl]
                        at, cr, da = (
                            AT[n * w : (n + 1) * w],
                            carry[n * w : (n + 1) * w],
                            dAacc[n * w : (n + 1) * w],
                        )
                        qb, qc = QB[n * w : (n + 1) * w], QC[n * w : (n + 1) * w]
                        # three short loops: LLVM vectorises a loop only when it can check
                        # the overlap of every pair of arrays it touches at run time
                        for r in range(w):  # cr <- dh_t
                            dh = cr[r] + ct * gt[r]
                            cr[r] = dh
                            qb[r] = dh * xt[r]
                            S[r] += dh * bt
                        for r in range(w):
                            q = cr[r] * a[r] * hp[r]
                            Sa[r] += at[r] * q
                            da[r] += dtt[r] * q
                        for r in range(w):  # cr <- a_t dh_t, the carry into step t - 1
                            qc[r] = gt[r] * hn[r]
                            cr[r] *= a[r]
                    for n in range(N):
                        DBT[t * N + n] = _lane_sum(QB[n * w : (n + 1) * w])
                        DCT[t * N + n] = _lane_sum(QC[n * w : (n + 1) * w])
                    for r in range(w):
                        i = t * w + r
                        v = DT[i] * S[r]
                        if Dskip.shape[0] > 0:
                            v += Dskip[d0 + r] * Gt[i]
                        DU[i] = v
                        DDT[i] = (Sa[r] + U[i] * S[r]) * SP[i]
                for r in range(w):
                    acc = db_acc[r]
                    for t in range(m):
                        du[bi, d0 + r, t0 + t] = DU[t * w + r]
                        ddelta[bi, d0 + r, t0 + t] = DDT[t * w + r]
                        acc += DDT[t * w + r]
                    db_acc[r] = acc
                for n in range(N):  # this block's dB_t, dC_t into the part's sums, along t
                    for t in range(m):
                        dBp[n, t0 + t] += DBT[t * N + n]
                        dCp[n, t0 + t] += DCT[t * N + n]
            for r in range(w):
                dD[bi, d0 + r] = dD_acc[r]
                dbias[bi, d0 + r] = db_acc[r]
                for n in range(N):
                    dA[bi, d0 + r, n] = dAacc[n * w + r]
                    dh0[bi, d0 + r, n] = carry[n * w + r]
        total += task_total
    return total


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
def _constants(dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The ``c`` array of :func:`_decays` and an integer array of the matching width."""
    if dtype == torch.float64:
        lo, hi, bias, shift, np_dtype, int_dtype = (-1022, 1023, 1023, 52, np.float64, np.int64)
    else:
        lo, hi, bias, shift, np_dtype, int_dtype = (-126, 127, 127, 23, np.float32, np.int32)
    coefficients = _exp2_coefficients(dtype)
    return np.array([lo, hi, bias, shift, *coefficients], np_dtype), np.zeros(1, int_dtype)


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
    forward = 4 * nl + 5 * tile + 2 * bc
    backward = (2 * CHUNK + 8) * nl + 8 * tile + 4 * BLOCK + 4 * bc
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
        c, ibits = _constants(cd)
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
                ibits,
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
        c, ibits = _constants(cd)
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
                ibits,
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
