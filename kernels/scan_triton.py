"""The selective scan as Triton kernels: the CUDA backend (also runs on CPU under ``TRITON_INTERPRET=1``).

Same semantics and signature as :func:`kscan.kernels.scan_reference.selective_scan_reference`.
Every kernel computes in float32 (float64 inputs too); ``y`` and the gradients come back in their
inputs' dtypes, the last state in float32.

Forward: one program per (batch, block of ``BLOCK_D`` channels). It walks ``L`` in chunks of
``BLOCK_L`` steps. In a chunk, step ``t`` is the affine map ``h -> a_t h + b_t`` with
``a_t = exp(Δ_t A)`` and ``b_t = Δ_t u_t B_t``; ``tl.associative_scan`` composes these maps for all
channels and states at once with ``(a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2)``, so
``h_t = P_t h_start + Q_t``. The state carries into the next chunk; the state entering each chunk
is saved, ``(batch, D, n_chunks, N)`` in float32, for the backward pass.

Backward, in three steps over the saved chunk-start states. The reverse recurrence
``dh_t = C_t g_t + exp(Δ_{t+1} A) dh_{t+1}`` (``g`` is the gradient of ``y`` before the gate) is
affine in ``dh`` too, so it takes the forward's chunk-parallel shape:

1. every chunk's adjoint map at once, ``dh_start = decay dh_next + offset`` (``dh_next``: ``dh`` at
   the next chunk's first step), from a forward scan over the chunk read backwards
   (``tl.associative_scan(reverse=True)`` is wrong for non-commutative maps on GPUs, triton issue
   #4362); grid (D / BLOCK_D, batch, n_chunks);
2. the maps composed from the last chunk to the first (the forward's state passing, reversed),
   giving ``dh_next`` of every chunk;
3. one program per (batch, group, chunk), or per split of a group's channels when that leaves the
   GPU idle: it walks the group's channel blocks, recomputes each block's states and ``dh`` in
   the chunk from the saved states and ``dh_next``, and forms every gradient with the formulas of
   SPECS §5 (``exp(Δ_t A) h_{t-1} = h_t - Δ_t B_t u_t`` avoids storing ``h_{t-1}``).

``dB`` and ``dC`` sum over a group's channels: step 3 adds the blocks' contributions in a fixed
order in registers and writes ``dB, dC`` once per (batch, group, split, chunk); torch adds the
few splits (deterministic, no atomics). Writing one partial sum per channel block instead would
move ``2 N / BLOCK_D`` floats per input element, several times the scan's own traffic. ``dA`` and
``dD`` are written per chunk and summed by torch. A channel block never straddles two groups:
``BLOCK_D`` divides ``D / G``.

Chunk-parallel forward, for inputs too small to fill a GPU with one program per channel block
(batch-1 inference): every chunk's map ``h_end = decay h_start + offset`` at once, then one pass
composing the maps across chunks (state passing, which also yields the saved chunk-start states),
then every chunk's outputs at once from the state entering it (the fix-up).

The kernels are decorated when this module is imported, which is when Triton reads
``TRITON_INTERPRET``. On GPUs ``BLOCK_D`` (sequential forward) and the warp counts are autotuned,
``BLOCK_L`` is fixed (the saved states depend on it); under the interpreter one small fixed config.
"""

from __future__ import annotations

import os

import torch

from kscan.kernels.triton_compile import KernelVariant

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the backend then reports itself unavailable.
    triton = None
    tl = None


def _interpreter_on() -> bool:
    """Whether Triton decorates kernels for its CPU interpreter (``TRITON_INTERPRET``)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_INTERPRETED = triton is not None and _interpreter_on()
_INTERPRET_BLOCK_L = 16  # small chunks so that small test sizes cover several chunks
_GPU_BLOCK_L = 64
_MAX_BLOCK_D = 16  # under the interpreter: few, large programs
_GPU_FIXED_BLOCK_D = 4  # on GPUs, where BLOCK_D is not autotuned (backward, chunk-parallel forward)
_PROGRAMS_PER_SM = 2  # below this many (batch, channel block) programs per SM: chunk-parallel
_GRAD_PROGRAMS_PER_SM = 4  # backward step 3 splits channels until it has this many programs per SM
# the sequential forward's autotuning candidates (BLOCK_D, warps)
_FWD_TUNING = ((1, 2), (2, 2), (2, 4), (4, 4), (8, 4), (8, 8))
_WARPS_TUNING = (2, 4, 8)  # the other kernels' warps
# backward step 3's warps: with 2, ptxas spills about 880 bytes per thread (kscan bench triton-build)
_GRAD_WARPS_TUNING = (4, 8)
_ACTIVATION_PTRS = frozenset({"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr"})


def triton_available() -> bool:
    """True when Triton imports and its kernels can run: on CUDA, or on CPU under the interpreter
    (``TRITON_INTERPRET=1`` set before this module was imported)."""
    return triton is not None and (_INTERPRETED or torch.cuda.is_available())


if triton is not None:
    # Only Triton builtins and the helpers below run inside the kernels, no triton.language
    # functions written with @triton.jit (tl.sum, tl.zeros, tl.sigmoid, tl.flip): those are
    # decorated when triton is imported, so under the interpreter they break whenever triton was
    # imported before TRITON_INTERPRET was set ("Cannot call @triton.jit'd outside of the scope
    # of a kernel"), which a test suite cannot always prevent.

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _xor(a, b):
        return a ^ b

    @triton.jit
    def _sum(x, axis: tl.constexpr):
        return tl.reduce(x, axis, _add)

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _flip_last(x, LOG2_L: tl.constexpr):
        """``x`` (float32, 2 or 3 axes) reversed along its last axis, of length ``2**LOG2_L``,
        exactly: viewing the index as ``LOG2_L`` bits, one size-2 axis each, every bit is flipped
        by swapping the two entries of its axis, ``a, b -> a ^ (a ^ b), b ^ (a ^ b)`` on the
        float's bits."""
        lead: tl.constexpr = len(x.shape) - 1
        bits = tl.reshape(x.to(tl.int32, bitcast=True), x.shape[:lead] + [2] * LOG2_L)
        for i in tl.static_range(LOG2_L):
            bits = bits ^ tl.reduce(bits, lead + i, _xor, keep_dims=True)
        return tl.reshape(bits, x.shape).to(tl.float32, bitcast=True)

    @triton.jit
    def _affine_combine(a1, b1, a2, b2):
        """Composition of ``h -> a1 h + b1`` followed by ``h -> a2 h + b2``."""
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _load_delta(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """``(x, Δ)``: ``x = delta + bias`` and ``Δ = softplus(x)`` (linear above 20) or ``x``;
        ``Δ = 0`` where masked, so that masked steps are the identity map."""
        x = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = x + bias[:, None]
        dt = x
        if SOFTPLUS:
            dt = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))
        return x, tl.where(mask, dt, 0.0)

    @triton.jit
    def _program_block(
        A_ptr, D_ptr, bias_ptr, pid_d, pid_b, Dch, N, CPG, G,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
    ):  # fmt: skip
        """Rows and parameters of channel block ``pid_d`` of batch ``pid_b``: ``row`` (BLOCK_D,)
        indexes ``(batch, D)``, ``bc_row`` (N_PAD,) the block's group in ``(batch, G, N)``,
        ``state`` (BLOCK_D, N_PAD) ``(batch, D, N)``; ``A``, ``D`` (0 if absent) and
        ``delta_bias`` in float32."""
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, N_PAD)
        mask_n = offs_n < N
        row = (pid_b * Dch + offs_d).to(tl.int64)
        bc_row = ((pid_b * G + (pid_d * BLOCK_D) // CPG) * N + offs_n).to(tl.int64)
        state = row[:, None] * N + offs_n[None, :]
        A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        Dv = tl.full([BLOCK_D], 0.0, tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d).to(tl.float32)
        bias = tl.full([BLOCK_D], 0.0, tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d).to(tl.float32)
        return row, bc_row, state, mask_n, A.to(tl.float32), Dv, bias

    @triton.jit
    def _load_chunk(
        u_ptr, delta_ptr, B_ptr, C_ptr, c, L, row, bc_row, mask_n, bias,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """Chunk ``c``: times ``t``, their mask, offsets ``seq`` into ``(batch, D, L)``, and ``u``,
        ``x = delta + bias``, ``Δ`` (BLOCK_D, BLOCK_L), ``B``, ``C`` (N_PAD, BLOCK_L) in float32,
        zero where masked."""
        t, mask, seq = _chunk_steps(c, L, row, BLOCK_L)
        u = tl.load(u_ptr + seq, mask=mask, other=0.0).to(tl.float32)
        x, dt = _load_delta(delta_ptr, seq, mask, bias, HAS_BIAS, SOFTPLUS)
        Bt = _load_bc(B_ptr, t, L, mask, bc_row, mask_n)
        Ct = _load_bc(C_ptr, t, L, mask, bc_row, mask_n)
        return t, mask, seq, u, x, dt, Bt, Ct

    @triton.jit
    def _chunk_steps(c, L, row, BLOCK_L: tl.constexpr):
        """Chunk ``c``'s times ``t`` (BLOCK_L,), their mask (1, BLOCK_L) and offsets ``seq``
        (BLOCK_D, BLOCK_L) into ``(batch, D, L)``."""
        t = c * BLOCK_L + tl.arange(0, BLOCK_L)
        return t, (t < L)[None, :], row[:, None] * L + t[None, :]

    @triton.jit
    def _load_bc(ptr, t, L, mask, bc_row, mask_n):
        """``B`` or ``C`` at times ``t``: (N_PAD, BLOCK_L) in float32, zero where masked."""
        offs = bc_row[:, None] * L + t[None, :]
        return tl.load(ptr + offs, mask=mask_n[:, None] & mask, other=0.0).to(tl.float32)

    @triton.jit
    def _chunk_scan(u, dt, A, Bt):
        """The chunk's steps composed from its start, ``h_t = p_t h_start + q_t``
        (BLOCK_D, N_PAD, BLOCK_L), and the step inputs ``Δ_t u_t B_t``."""
        decay = tl.exp(dt[:, None, :] * A[:, :, None])
        inp = (dt * u)[:, None, :] * Bt[None, :, :]
        p, q = tl.associative_scan((decay, inp), axis=2, combine_fn=_affine_combine)
        return p, q, inp

    @triton.jit
    def _store_y(y_ptr, z_ptr, seq, mask, hs, Ct, u, Dv, HAS_Z: tl.constexpr):
        """``y_t = (sum_n C_t h_t + D u_t) silu(z_t)`` in ``y``'s dtype."""
        y = _sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + seq, mask=mask, other=0.0).to(tl.float32)
            y = y * z * _sigmoid(z)
        tl.store(y_ptr + seq, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _chunk_state(row, c, n_chunks, N, N_PAD: tl.constexpr):
        """Offsets (BLOCK_D, N_PAD) of chunk ``c`` in a ``(batch, D, n_chunks, N)`` tensor."""
        return (row[:, None] * n_chunks + c) * N + tl.arange(0, N_PAD)[None, :]

    @triton.jit
    def _last_step(x, BLOCK_L: tl.constexpr):
        """``x[..., BLOCK_L - 1]`` of a (BLOCK_D, N_PAD, BLOCK_L) tile."""
        is_last = tl.arange(0, BLOCK_L) == BLOCK_L - 1
        return _sum(tl.where(is_last[None, None, :], x, 0.0), axis=2)

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
        y_ptr, h_last_ptr, states_ptr,
        Dch, L, N, CPG, G, n_chunks,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
        BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """Sequential over chunks: grid (D / BLOCK_D, batch)."""
        row, bc_row, state, mask_n, A, Dv, bias = _program_block(
            A_ptr, D_ptr, bias_ptr, tl.program_id(0), tl.program_id(1), Dch, N, CPG, G,
            HAS_D, HAS_BIAS, BLOCK_D, N_PAD,
        )  # fmt: skip
        h = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
        if HAS_H0:
            h = tl.load(h0_ptr + state, mask=mask_n[None, :], other=0.0).to(tl.float32)
        for c in range(n_chunks):
            tl.store(states_ptr + _chunk_state(row, c, n_chunks, N, N_PAD), h, mask=mask_n[None, :])
            _, mask, seq, u, _, dt, Bt, Ct = _load_chunk(
                u_ptr, delta_ptr, B_ptr, C_ptr, c, L, row, bc_row, mask_n, bias,
                HAS_BIAS, SOFTPLUS, BLOCK_L,
            )  # fmt: skip
            p, q, _ = _chunk_scan(u, dt, A, Bt)
            hs = p * h[:, :, None] + q
            _store_y(y_ptr, z_ptr, seq, mask, hs, Ct, u, Dv, HAS_Z)
            h = _last_step(hs, BLOCK_L)
        tl.store(h_last_ptr + state, h, mask=mask_n[None, :])

    @triton.jit
    def _chunk_maps_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, decay_ptr, offset_ptr,
        Dch, L, N, CPG, G, n_chunks,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """Chunk-parallel step 1, grid (D / BLOCK_D, batch, n_chunks): each chunk's effect on the
        state entering it, ``h_end = decay h_start + offset``."""
        c = tl.program_id(2)
        row, bc_row, _, mask_n, A, _, bias = _program_block(
            A_ptr, A_ptr, bias_ptr, tl.program_id(0), tl.program_id(1), Dch, N, CPG, G,
            False, HAS_BIAS, BLOCK_D, N_PAD,
        )  # fmt: skip
        _, _, _, u, _, dt, Bt, _ = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, c, L, row, bc_row, mask_n, bias,
            HAS_BIAS, SOFTPLUS, BLOCK_L,
        )  # fmt: skip
        p, q, _ = _chunk_scan(u, dt, A, Bt)
        offs = _chunk_state(row, c, n_chunks, N, N_PAD)
        tl.store(decay_ptr + offs, _last_step(p, BLOCK_L), mask=mask_n[None, :])
        tl.store(offset_ptr + offs, _last_step(q, BLOCK_L), mask=mask_n[None, :])

    @triton.jit
    def _state_passing_kernel(
        decay_ptr, offset_ptr, h0_ptr, h_last_ptr, states_ptr,
        Dch, N, n_chunks,
        HAS_H0: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
    ):  # fmt: skip
        """Chunk-parallel step 2, grid (D / BLOCK_D, batch): compose the chunk maps in order to
        get the state entering each chunk, and the last state. With ``REVERSE`` (backward step 2)
        the chunks go last to first: ``h0`` is then the last state's gradient, ``states`` gets
        ``dh`` at the first step after each chunk, and ``h_last`` ``dh`` at step 0."""
        row = (tl.program_id(1) * Dch + tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)).to(
            tl.int64
        )
        mask_n = tl.arange(0, N_PAD)[None, :] < N
        state = row[:, None] * N + tl.arange(0, N_PAD)[None, :]
        h = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
        if HAS_H0:
            h = tl.load(h0_ptr + state, mask=mask_n, other=0.0).to(tl.float32)
        for i in range(n_chunks):
            c = i
            if REVERSE:
                c = n_chunks - 1 - i
            offs = _chunk_state(row, c, n_chunks, N, N_PAD)
            tl.store(states_ptr + offs, h, mask=mask_n)
            h = tl.load(decay_ptr + offs, mask=mask_n, other=1.0) * h + tl.load(
                offset_ptr + offs, mask=mask_n, other=0.0
            )
        tl.store(h_last_ptr + state, h, mask=mask_n)

    @triton.jit
    def _chunk_output_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, y_ptr,
        Dch, L, N, CPG, G, n_chunks,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
    ):  # fmt: skip
        """Chunk-parallel step 3, grid (D / BLOCK_D, batch, n_chunks): rescan each chunk from the
        state entering it and write ``y``."""
        c = tl.program_id(2)
        row, bc_row, _, mask_n, A, Dv, bias = _program_block(
            A_ptr, D_ptr, bias_ptr, tl.program_id(0), tl.program_id(1), Dch, N, CPG, G,
            HAS_D, HAS_BIAS, BLOCK_D, N_PAD,
        )  # fmt: skip
        _, mask, seq, u, _, dt, Bt, Ct = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, c, L, row, bc_row, mask_n, bias,
            HAS_BIAS, SOFTPLUS, BLOCK_L,
        )  # fmt: skip
        h_start = tl.load(
            states_ptr + _chunk_state(row, c, n_chunks, N, N_PAD), mask=mask_n[None, :], other=0.0
        )
        p, q, _ = _chunk_scan(u, dt, A, Bt)
        _store_y(y_ptr, z_ptr, seq, mask, p * h_start[:, :, None] + q, Ct, u, Dv, HAS_Z)

    @triton.jit
    def _load_output_grad(dy_ptr, z_ptr, seq, mask, HAS_Z: tl.constexpr):
        """``(dy, z, sigmoid(z), g)`` at ``seq`` in float32, where ``g = dy z sigmoid(z)`` is the
        gradient of ``y`` before the gate (without a gate ``g`` is ``dy``, and so are the unused
        ``z`` and ``sigmoid(z)``)."""
        dy = tl.load(dy_ptr + seq, mask=mask, other=0.0).to(tl.float32)
        z = dy
        sig = dy
        g = dy
        if HAS_Z:
            z = tl.load(z_ptr + seq, mask=mask, other=0.0).to(tl.float32)
            sig = _sigmoid(z)
            g = dy * z * sig
        return dy, z, sig, g

    @triton.jit
    def _reverse_chunk_scan(
        delta_ptr, row, c, L, A, bias, Ct, g,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_L: tl.constexpr,
        LOG2_L: tl.constexpr,
    ):  # fmt: skip
        """The chunk's adjoint steps composed from its end: ``dh`` at the chunk's times read
        backwards is ``p dh_next + q`` (BLOCK_D, N_PAD, BLOCK_L), ``dh_next`` being ``dh`` at the
        next chunk's first step. Step ``s`` is time ``t = end - s``, whose map is
        ``dh_{t+1} -> C_t g_t + exp(Δ_{t+1} A) dh_{t+1}``; ``Δ_L = 0`` passes the last state's
        gradient on unchanged."""
        t_r = c * BLOCK_L + (BLOCK_L - 1) - tl.arange(0, BLOCK_L)
        _, dt_next = _load_delta(
            delta_ptr, row[:, None] * L + t_r[None, :] + 1, (t_r + 1 < L)[None, :], bias,
            HAS_BIAS, SOFTPLUS,
        )  # fmt: skip
        decay_next = tl.exp(dt_next[:, None, :] * A[:, :, None])
        cg_rev = _flip_last(Ct, LOG2_L)[None, :, :] * _flip_last(g, LOG2_L)[:, None, :]
        return tl.associative_scan((decay_next, cg_rev), axis=2, combine_fn=_affine_combine)

    @triton.jit
    def _chunk_grad_maps_kernel(
        delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, decay_ptr, offset_ptr,
        Dch, L, N, CPG, G, n_chunks,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_L: tl.constexpr, LOG2_L: tl.constexpr,
    ):  # fmt: skip
        """Backward step 1, grid (D / BLOCK_D, batch, n_chunks): each chunk's adjoint map
        ``dh_start = decay dh_next + offset`` (``dh`` at its first step from ``dh`` at the next
        chunk's first step)."""
        c = tl.program_id(2)
        row, bc_row, _, mask_n, A, _, bias = _program_block(
            A_ptr, A_ptr, bias_ptr, tl.program_id(0), tl.program_id(1), Dch, N, CPG, G,
            False, HAS_BIAS, BLOCK_D, N_PAD,
        )  # fmt: skip
        t, mask, seq = _chunk_steps(c, L, row, BLOCK_L)
        _, _, _, g = _load_output_grad(dy_ptr, z_ptr, seq, mask, HAS_Z)
        Ct = _load_bc(C_ptr, t, L, mask, bc_row, mask_n)
        p, q = _reverse_chunk_scan(
            delta_ptr, row, c, L, A, bias, Ct, g, HAS_BIAS, SOFTPLUS, BLOCK_L, LOG2_L
        )
        offs = _chunk_state(row, c, n_chunks, N, N_PAD)
        tl.store(decay_ptr + offs, _last_step(p, BLOCK_L), mask=mask_n[None, :])
        tl.store(offset_ptr + offs, _last_step(q, BLOCK_L), mask=mask_n[None, :])

    @triton.jit
    def _chunk_grads_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dh_next_ptr,
        dy_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dB_ptr, dC_ptr, dh0_ptr,
        Dch, L, N, CPG, G, n_chunks, BLOCKS_PER_SPLIT,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_L: tl.constexpr, LOG2_L: tl.constexpr,
    ):  # fmt: skip
        """Backward step 3, grid (G * splits, batch, n_chunks): one chunk of one split of a
        group's channels, walked block by block. Each block recomputes its states from the saved
        chunk-start state and ``dh`` from ``dh_next`` (steps 1-2), and writes du, ddelta (before
        the bias), dz, and per-chunk dA and dD; ``dB``, ``dC`` are summed over the split's
        blocks in a fixed order and written once per (batch, group * split, chunk). The chunk-0
        programs also write d(initial state) ``= exp(Δ_0 A) dh_0``."""
        split = tl.program_id(0)
        pid_b = tl.program_id(1)
        c = tl.program_id(2)
        offs_l = tl.arange(0, BLOCK_L)
        dB_acc = tl.full([N_PAD, BLOCK_L], 0.0, tl.float32)
        dC_acc = tl.full([N_PAD, BLOCK_L], 0.0, tl.float32)
        for j in range(BLOCKS_PER_SPLIT):
            row, bc_row, state, mask_n, A, Dv, bias = _program_block(
                A_ptr, D_ptr, bias_ptr, split * BLOCKS_PER_SPLIT + j, pid_b, Dch, N, CPG, G,
                HAS_D, HAS_BIAS, BLOCK_D, N_PAD,
            )  # fmt: skip
            t, mask, seq, u, x, dt, Bt, Ct = _load_chunk(
                u_ptr, delta_ptr, B_ptr, C_ptr, c, L, row, bc_row, mask_n, bias,
                HAS_BIAS, SOFTPLUS, BLOCK_L,
            )  # fmt: skip
            offs = _chunk_state(row, c, n_chunks, N, N_PAD)
            h_start = tl.load(states_ptr + offs, mask=mask_n[None, :], other=0.0)
            p, q, inp = _chunk_scan(u, dt, A, Bt)
            hs = p * h_start[:, :, None] + q
            dy, z, sig, g = _load_output_grad(dy_ptr, z_ptr, seq, mask, HAS_Z)
            if HAS_Z:
                y = _sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
                tl.store(dz_ptr + seq, dy * y * sig * (1.0 + z * (1.0 - sig)), mask=mask)
            p, q = _reverse_chunk_scan(
                delta_ptr, row, c, L, A, bias, Ct, g, HAS_BIAS, SOFTPLUS, BLOCK_L, LOG2_L
            )
            dh_next = tl.load(dh_next_ptr + offs, mask=mask_n[None, :], other=0.0)
            dh = _flip_last(p * dh_next[:, :, None] + q, LOG2_L)
            h_prev_decayed = hs - inp  # exp(Δ_t A) h_{t-1}
            dB_acc += _sum(dh * (dt * u)[:, None, :], axis=0)
            dC_acc += _sum(hs * g[:, None, :], axis=0)
            du = dt * _sum(dh * Bt[None, :, :], axis=1) + Dv[:, None] * g
            tl.store(du_ptr + seq, du, mask=mask)
            ddt = _sum(
                dh * (A[:, :, None] * h_prev_decayed + u[:, None, :] * Bt[None, :, :]), axis=1
            )
            if SOFTPLUS:
                ddt = tl.where(x > 20.0, ddt, ddt * _sigmoid(x))
            tl.store(ddelta_ptr + seq, ddt, mask=mask)
            dA = _sum(dh * dt[:, None, :] * h_prev_decayed, axis=2)
            tl.store(dA_ptr + offs, dA, mask=mask_n[None, :])
            tl.store(dD_ptr + row * n_chunks + c, _sum(g * u, axis=1))
            if c == 0:  # d(initial state) = exp(Δ_0 A) dh_0, from the first step's Δ and dh
                first = (offs_l == 0)[None, :]
                dt0 = _sum(tl.where(first, dt, 0.0), axis=1)
                dh_0 = _sum(tl.where(first[:, None, :], dh, 0.0), axis=2)
                tl.store(dh0_ptr + state, tl.exp(dt0[:, None] * A) * dh_0, mask=mask_n[None, :])
        part = (pid_b * tl.num_programs(0) + split) * N + tl.arange(0, N_PAD)
        part_offs = part.to(tl.int64)[:, None] * L + (c * BLOCK_L + offs_l)[None, :]
        mask_part = (tl.arange(0, N_PAD) < N)[:, None] & (c * BLOCK_L + offs_l < L)[None, :]
        tl.store(dB_ptr + part_offs, dB_acc, mask=mask_part)
        tl.store(dC_ptr + part_offs, dC_acc, mask=mask_part)

    def _divides_group(configs, named_args, **kwargs):
        """Keep the configs whose channel block fits within one group."""
        return [cfg for cfg in configs if named_args["CPG"] % cfg.kwargs["BLOCK_D"] == 0]

    def _tuned(kernel, key: list[str], block_d: bool = False, warps_tuning=_WARPS_TUNING):
        """``kernel`` autotuned on GPUs over ``warps_tuning`` (or, if asked, over
        ``_FWD_TUNING``'s ``BLOCK_D`` and warps); as is under the interpreter, where the caller
        passes one fixed config."""
        if _INTERPRETED:
            return kernel
        if not block_d:
            configs = [triton.Config({}, num_warps=warps) for warps in warps_tuning]
            return triton.autotune(configs=configs, key=key)(kernel)
        configs = [triton.Config({"BLOCK_D": bd}, num_warps=warps) for bd, warps in _FWD_TUNING]
        prune = {"early_config_prune": _divides_group}
        return triton.autotune(configs=configs, key=key, prune_configs_by=prune)(kernel)

    _SHAPE_KEY = ["Dch", "L", "N", "CPG"]
    _fwd_launch = _tuned(_scan_fwd_kernel, _SHAPE_KEY, block_d=True)
    _chunk_maps_launch = _tuned(_chunk_maps_kernel, _SHAPE_KEY)
    _state_passing_launch = _tuned(_state_passing_kernel, ["Dch", "N", "n_chunks", "REVERSE"])
    _chunk_output_launch = _tuned(_chunk_output_kernel, _SHAPE_KEY)
    _grad_maps_launch = _tuned(_chunk_grad_maps_kernel, _SHAPE_KEY)
    _grads_launch = _tuned(
        _chunk_grads_kernel, [*_SHAPE_KEY, "BLOCKS_PER_SPLIT"], warps_tuning=_GRAD_WARPS_TUNING
    )


def gpu_variants(n_state: int = 16) -> list[KernelVariant]:
    """Every configuration in which the GPU path can launch a kernel for ``n_state`` states:
    each autotuning candidate, with every option on (``D``, gate, bias, softplus, initial state),
    the kernels' largest code. For :func:`kscan.kernels.triton_compile.compile_variant`; empty
    without Triton."""
    if triton is None:
        return []
    tiles = {"N_PAD": _next_power_of_2(n_state), "BLOCK_L": _GPU_BLOCK_L}
    options = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True}
    block_d = {"BLOCK_D": _GPU_FIXED_BLOCK_D}
    variants = [
        KernelVariant(
            "scan_fwd",
            _scan_fwd_kernel,
            {**options, "HAS_H0": True, "BLOCK_D": bd, **tiles},
            warps,
            _ACTIVATION_PTRS,
        )
        for bd, warps in _FWD_TUNING
    ]
    log2_l = {"LOG2_L": _GPU_BLOCK_L.bit_length() - 1}
    passing = {"HAS_H0": True, "N_PAD": tiles["N_PAD"]}
    gate = {"HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True}
    fixed = (
        ("chunk_maps", _chunk_maps_kernel, {"HAS_BIAS": True, "SOFTPLUS": True, **tiles}),
        ("state_passing", _state_passing_kernel, {**passing, "REVERSE": False}),
        ("chunk_output", _chunk_output_kernel, {**options, **tiles}),
        ("grad_maps", _chunk_grad_maps_kernel, {**gate, **tiles, **log2_l}),
        ("grad_passing", _state_passing_kernel, {**passing, "REVERSE": True}),
    )
    variants += [
        KernelVariant(name, kernel, {**constexprs, **block_d}, warps, _ACTIVATION_PTRS)
        for name, kernel, constexprs in fixed
        for warps in _WARPS_TUNING
    ]
    variants += [
        KernelVariant(
            "chunk_grads",
            _chunk_grads_kernel,
            {**options, **tiles, **log2_l, **block_d},
            warps,
            _ACTIVATION_PTRS,
        )
        for warps in _GRAD_WARPS_TUNING
    ]
    return variants


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_d(channels_per_group: int, cap: int) -> int:
    """The largest power of 2 that divides ``channels_per_group`` and is at most ``cap``."""
    block = 1
    while block * 2 <= cap and channels_per_group % (block * 2) == 0:
        block *= 2
    return block


def _fixed_block_d(channels_per_group: int) -> int:
    """``BLOCK_D`` of the kernels whose buffers or grids depend on it (not autotuned)."""
    return _block_d(channels_per_group, _MAX_BLOCK_D if _INTERPRETED else _GPU_FIXED_BLOCK_D)


def _use_chunk_parallel(programs: int, n_chunks: int, device: torch.device) -> bool:
    """The chunk-parallel forward when one program per (batch, channel block) leaves the GPU
    mostly idle (batch-1 inference) and there are several chunks to spread over it."""
    if _INTERPRETED or n_chunks == 1:
        return False
    return (
        programs < _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    )


def _grad_splits(blocks_per_group: int, programs: int, device: torch.device) -> int:
    """Into how many splits backward step 3 cuts each group's channel blocks: one under the
    interpreter; on GPUs the fewest (a power of 2 dividing ``blocks_per_group``) giving
    ``programs * splits >= _GRAD_PROGRAMS_PER_SM`` per SM. Each split adds one partial
    ``(batch, G, N, L)`` sum of dB and of dC for torch to add up."""
    if _INTERPRETED:
        return 1
    target = _GRAD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    splits = 1
    while programs * splits < target and blocks_per_group % (splits * 2) == 0:
        splits *= 2
    return splits


def _flags(D, z, delta_bias, delta_softplus) -> dict:
    return {
        "HAS_D": D is not None,
        "HAS_Z": z is not None,
        "HAS_BIAS": delta_bias is not None,
        "SOFTPLUS": bool(delta_softplus),
    }


def _grouped(x: torch.Tensor) -> torch.Tensor:
    """``(batch, N, L)`` -> ``(batch, 1, N, L)``; grouped ``(batch, G, N, L)`` as is; contiguous."""
    return (x.unsqueeze(1) if x.ndim == 3 else x).contiguous()


def _contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


def _forward_chunk_parallel(
    u, delta, A, Bg, Cg, D, z, delta_bias, h0, y, h_last, states, shape, flags, tiles
):
    """Chunk maps for every chunk at once, state passing across chunks, then every chunk's output
    from the state entering it; fills ``y``, ``h_last`` and ``states`` like the sequential kernel."""
    batch, channels = u.shape[:2]
    block_d = _fixed_block_d(shape["CPG"])
    tiles = dict(tiles, BLOCK_D=block_d)
    decay, offset = torch.empty_like(states), torch.empty_like(states)
    chunk_grid = (channels // block_d, batch, shape["n_chunks"])
    _chunk_maps_launch[chunk_grid](
        u, delta, A, Bg, Cg, delta_bias, decay, offset,
        **shape, HAS_BIAS=flags["HAS_BIAS"], SOFTPLUS=flags["SOFTPLUS"], **tiles,
    )  # fmt: skip
    _state_passing_launch[(channels // block_d, batch)](
        decay, offset, h0, h_last, states, Dch=channels, N=shape["N"], n_chunks=shape["n_chunks"],
        HAS_H0=h0 is not None, REVERSE=False, BLOCK_D=block_d, N_PAD=tiles["N_PAD"],
    )  # fmt: skip
    _chunk_output_launch[chunk_grid](
        u, delta, A, Bg, Cg, D, z, delta_bias, states, y, **shape, **flags, **tiles
    )


class _SelectiveScanTriton(torch.autograd.Function):
    """Forward and backward kernels behind one autograd node."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        batch, channels, length = u.shape
        n_state = A.shape[1]
        u, delta, A, D, z, delta_bias = map(_contiguous, (u, delta, A, D, z, delta_bias))
        h0 = _contiguous(initial_state)
        Bg, Cg = _grouped(B), _grouped(C)
        groups = Bg.shape[1]
        cpg = channels // groups
        block_l = _INTERPRET_BLOCK_L if _INTERPRETED else _GPU_BLOCK_L
        n_chunks = triton.cdiv(length, block_l)
        y = torch.empty_like(u)
        h_last = u.new_empty(batch, channels, n_state, dtype=torch.float32)
        states = u.new_empty(batch, channels, n_chunks, n_state, dtype=torch.float32)
        flags = _flags(D, z, delta_bias, delta_softplus)
        shape = dict(Dch=channels, L=length, N=n_state, CPG=cpg, G=groups, n_chunks=n_chunks)
        tiles = dict(N_PAD=_next_power_of_2(n_state), BLOCK_L=block_l)
        programs = batch * channels // _fixed_block_d(cpg)
        if _use_chunk_parallel(programs, n_chunks, u.device):
            _forward_chunk_parallel(
                u, delta, A, Bg, Cg, D, z, delta_bias, h0, y, h_last, states, shape, flags, tiles
            )
        else:
            if _INTERPRETED:
                tiles["BLOCK_D"] = _fixed_block_d(cpg)
            _fwd_launch[lambda meta: (channels // meta["BLOCK_D"], batch)](
                u, delta, A, Bg, Cg, D, z, delta_bias, h0, y, h_last, states,
                **shape, **flags, HAS_H0=h0 is not None, **tiles,
            )  # fmt: skip
        ctx.save_for_backward(u, delta, A, Bg, Cg, D, z, delta_bias, states)
        ctx.meta = (shape, flags, tiles, B.ndim)
        ctx.h0_dtype = None if initial_state is None else initial_state.dtype
        return y, h_last

    @staticmethod
    def backward(ctx, dy, dh_last):
        u, delta, A, Bg, Cg, D, z, delta_bias, states = ctx.saved_tensors
        shape, flags, tiles, b_ndim = ctx.meta
        batch, channels, length = u.shape
        n_state, groups, n_chunks = shape["N"], shape["G"], shape["n_chunks"]
        block_d = _fixed_block_d(shape["CPG"])
        blocks_per_group = shape["CPG"] // block_d
        tiles = dict(tiles, BLOCK_D=block_d, LOG2_L=tiles["BLOCK_L"].bit_length() - 1)
        dy, dh_last = dy.contiguous(), dh_last.contiguous()
        f32 = dict(device=u.device, dtype=torch.float32)
        # steps 1-2: every chunk's adjoint map, then dh at the first step after each chunk
        decay, offset, dh_next = (torch.empty_like(states) for _ in range(3))
        grid = (channels // block_d, batch)
        _grad_maps_launch[(*grid, n_chunks)](
            delta, A, Cg, z, delta_bias, dy, decay, offset, **shape,
            HAS_Z=flags["HAS_Z"], HAS_BIAS=flags["HAS_BIAS"], SOFTPLUS=flags["SOFTPLUS"], **tiles,
        )  # fmt: skip
        _state_passing_launch[grid](
            decay, offset, dh_last, torch.empty_like(dh_last), dh_next, Dch=channels, N=n_state,
            n_chunks=n_chunks, HAS_H0=True, REVERSE=True, BLOCK_D=block_d, N_PAD=tiles["N_PAD"],
        )  # fmt: skip
        # step 3: every gradient, dB and dC summed over each split of a group's channels
        splits = _grad_splits(blocks_per_group, batch * groups * n_chunks, u.device)
        du = torch.empty(batch, channels, length, **f32)
        ddelta = torch.empty_like(du)
        dz = torch.empty_like(du) if z is not None else None
        dA = torch.empty(batch, channels, n_chunks, n_state, **f32)
        dD = torch.empty(batch, channels, n_chunks, **f32)
        dB_part = torch.empty(batch, groups * splits, n_state, length, **f32)
        dC_part = torch.empty_like(dB_part)
        dh0 = torch.empty(batch, channels, n_state, **f32)
        _grads_launch[(groups * splits, batch, n_chunks)](
            u, delta, A, Bg, Cg, D, z, delta_bias, states, dh_next, dy,
            du, ddelta, dz, dA, dD, dB_part, dC_part, dh0,
            **shape, BLOCKS_PER_SPLIT=blocks_per_group // splits, **flags, **tiles,
        )  # fmt: skip

        def reduce_groups(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            out = part.view(batch, groups, splits, n_state, length).sum(2)
            return (out.squeeze(1) if b_ndim == 3 else out).to(like.dtype)

        return (
            du.to(u.dtype),
            ddelta.to(delta.dtype),
            dA.sum((0, 2)).to(A.dtype),
            reduce_groups(dB_part, Bg),
            reduce_groups(dC_part, Cg),
            None if D is None else dD.sum((0, 2)).to(D.dtype),
            None if z is None else dz.to(z.dtype),
            None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype),
            dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None else None,
            None,
        )


def selective_scan_triton(
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
    """The selective scan on Triton kernels; same arguments, shapes and results as
    :func:`~kscan.kernels.scan_reference.selective_scan_reference` (computed in float32; the last
    state ``(batch, D, N)`` in float32). Inputs are assumed valid (``kscan.kernels.selective_scan``
    checks them). Raises ``RuntimeError`` when :func:`triton_available` is False."""
    if not triton_available():
        raise RuntimeError(
            "the triton scan backend needs the triton package and a CUDA device "
            "(or TRITON_INTERPRET=1 set before kscan.kernels.scan_triton is imported)"
        )
    y, h_last = _SelectiveScanTriton.apply(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus
    )
    return (y, h_last) if return_last_state else y
