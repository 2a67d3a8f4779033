"""Fused cross-scan / cross-merge for the raster family (rows, cols and their reverses) in Triton.

:func:`kscan.kernels.routes.cross_scan` and ``cross_merge`` run these kernels (``backend="triton"``,
the default for CUDA tensors when every route is in ``FUSED_ROUTES``, as VM-UNet's four are) inside
the autograd Functions they share with the torch path.

One program reads a ``(BLOCK_H, BLOCK_W)`` tile of one ``(H, W)`` channel once and writes it to all
``K`` sequences: pixel ``q = i*W + j`` goes to sequence position ``q`` (rows), ``j*H + i`` (cols),
``L-1-q`` (rows reversed) or ``L-1-(j*H+i)`` (cols reversed). The merge program reads the same
``K`` positions and writes their sum ``((0 + y_0) + y_1) + ...`` to pixel ``q`` in one pass: no
permuted copies, no atomics, and the torch path's summation order, so both give identical results.

The kernel is compiled on first use; on CPU tensors it runs under Triton's interpreter when
``TRITON_INTERPRET=1`` is set at call time (the tests do this at small sizes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kscan.kernels.triton_compile import KernelVariant

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: fused_unavailable_reason() then says so.
    triton = None
    tl = None

FUSED_ROUTES: tuple[str, ...] = ("rows", "cols", "rows_reversed", "cols_reversed")
"""Routes the fused kernels handle; a route's code is its index here (bit 0: transposed, bit 1:
reversed)."""

_GPU_BLOCK = 32
_INTERPRET_BLOCK = 4  # small tiles so that small test sizes cover several tiles and the masks


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def fused_unavailable_reason(t: torch.Tensor, routes: Sequence[str]) -> str | None:
    """None when the fused kernels can run on ``t``'s device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``) for ``routes``; otherwise what is missing, in words."""
    if triton is None:
        return "the triton package is not installed"
    if not (t.is_cuda or (t.device.type == "cpu" and _interpreting())):
        return f"tensors on {t.device} need CUDA (or TRITON_INTERPRET=1 for CPU tensors)"
    others = [name for name in routes if name not in FUSED_ROUTES]
    if others:
        return f"routes {others} are not among {', '.join(FUSED_ROUTES)}"
    return None


if triton is not None:

    def _cross_kernel(
        src_ptr, dst_ptr, C, H, W,
        CODES: tl.constexpr, K: tl.constexpr, MERGE: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        """Scan ``src (B, C, H, W)`` -> ``dst (B, K, C, L)``, or with ``MERGE`` the sum of
        ``src (B, K, C, L)`` -> ``dst (B, C, H, W)``. Grid ``(B*C, tiles along H, tiles along W)``.
        Route ``k`` has code ``(CODES >> 2k) & 3``: bit 0 transposed, bit 1 reversed."""
        pid_bc = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        j = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
        mask = (i < H) & (j < W)
        length = H * W
        row_major = i * W + j
        plane = pid_bc * length + row_major
        batch, channel = pid_bc // C, pid_bc % C
        if MERGE:
            tile = tl.full([BLOCK_H, BLOCK_W], 0, dtype=dst_ptr.dtype.element_ty)
        else:
            tile = tl.load(src_ptr + plane, mask=mask)
        for k in tl.static_range(K):
            pos = row_major
            if (CODES >> (2 * k)) & 1:
                pos = j * H + i
            if (CODES >> (2 * k)) & 2:
                pos = length - 1 - pos
            seq = ((batch * K + k) * C + channel) * length + pos
            if MERGE:
                tile += tl.load(src_ptr + seq, mask=mask)
            else:
                tl.store(dst_ptr + seq, tile, mask=mask)
        if MERGE:
            tl.store(dst_ptr + plane, tile, mask=mask)

    @functools.cache
    def _jitted(interpret: bool):
        """The kernel, jitted or (under the interpreter) interpreted; ``interpret`` is the cache
        key only, since ``triton.jit`` reads ``TRITON_INTERPRET`` itself."""
        del interpret
        return triton.jit(_cross_kernel)


def gpu_variants() -> list[KernelVariant]:
    """The kernel's scan and merge as VM-UNet's four routes launch them on GPUs (Triton's default
    4 warps), for :func:`kscan.kernels.triton_compile.compile_variant`; empty without Triton."""
    if triton is None:
        return []
    codes = sum(index << (2 * index) for index in range(len(FUSED_ROUTES)))
    return [
        KernelVariant(
            "cross_merge" if merge else "cross_scan",
            _jitted(_interpreting()),
            {
                "CODES": codes,
                "K": len(FUSED_ROUTES),
                "MERGE": merge,
                "BLOCK_H": _GPU_BLOCK,
                "BLOCK_W": _GPU_BLOCK,
            },
            4,
            frozenset({"src_ptr", "dst_ptr"}),
        )
        for merge in (False, True)
    ]


def _launch(src: torch.Tensor, dst: torch.Tensor, routes: tuple[str, ...], merge: bool) -> None:
    """Run the kernel from contiguous ``src`` into ``dst``."""
    batch, channels, height, width = dst.shape if merge else src.shape
    codes = sum(FUSED_ROUTES.index(name) << (2 * k) for k, name in enumerate(routes))
    block = _INTERPRET_BLOCK if _interpreting() else _GPU_BLOCK
    grid = (batch * channels, triton.cdiv(height, block), triton.cdiv(width, block))
    _jitted(_interpreting())[grid](
        src, dst, channels, height, width,
        CODES=codes, K=len(routes), MERGE=merge, BLOCK_H=block, BLOCK_W=block,
    )  # fmt: skip


def fused_scan(x: torch.Tensor, routes: tuple[str, ...]) -> torch.Tensor:
    """``(batch, C, H, W)`` -> ``(batch, K, C, L)``; no autograd (``cross_scan`` wraps it) and
    no input checks (``cross_scan`` makes them)."""
    batch, channels, height, width = x.shape
    out = x.new_empty(batch, len(routes), channels, height * width)
    _launch(x.contiguous(), out, routes, merge=False)
    return out


def fused_merge(y: torch.Tensor, routes: tuple[str, ...], height: int, width: int) -> torch.Tensor:
    """``(batch, K, C, L)`` -> ``(batch, C, H, W)``; no autograd (``cross_merge`` wraps it) and
    no input checks (``cross_merge`` makes them)."""
    batch, _, channels, _ = y.shape
    out = y.new_empty(batch, channels, height, width)
    _launch(y.contiguous(), out, routes, merge=True)
    return out
