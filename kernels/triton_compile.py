"""kscan's Triton kernels compiled ahead of time for a GPU architecture, on any machine.

Triton lowers a kernel to PTX, and the ``ptxas`` shipped in Triton's wheel assembles the PTX into
a cubin, without a GPU or a CUDA driver:
``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))``.
``cuobjdump`` (also in the wheel) then reads the cubin's resources: registers per thread, the
stack frame (where ptxas spills the registers it lacks) and shared memory. So a machine without a
GPU checks every kernel configuration against the real GPU compiler. The interpreter
(``TRITON_INTERPRET=1``) cannot do this: it runs the kernels' Python, accepts code that the
compiler rejects and says nothing about registers.

From the resources, :func:`resident_warps` gives the theoretical occupancy, the warps an SM can
hold at once (the CUDA occupancy calculator's register, shared-memory and warp limits).

The kernels must have been decorated for compilation, that is, imported in a process where
``TRITON_INTERPRET`` was not set; :func:`compile_variant` says so otherwise.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # Triton is optional: compile_variant() then says it is missing.
    triton = None

_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}

# Per-SM limits of the architectures kscan targets (CUDA C Programming Guide, "Technical
# Specifications per Compute Capability"): 64K 32-bit registers, allocated per warp in units of
# 256; at most 64 resident warps and 32 blocks; shared memory usable by blocks, and 1 KB that the
# system reserves per block.
_REGISTERS_PER_SM = 65536
_REGISTER_UNIT = 256
_MAX_WARPS_PER_SM = 64
_MAX_BLOCKS_PER_SM = 32
_SHARED_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
_SHARED_RESERVED_PER_BLOCK = 1024


@dataclass(frozen=True)
class KernelVariant:
    """One configuration in which a GPU code path launches a kernel.

    ``kernel`` is the ``triton.jit`` function; ``constexprs`` its compile-time arguments;
    ``activation_ptrs`` the pointer arguments that take the caller's activation dtype (the rest
    point to float32); integer arguments are 32-bit."""

    name: str
    kernel: Any
    constexprs: Mapping[str, int | bool]
    num_warps: int
    activation_ptrs: frozenset[str] = field(default_factory=frozenset)

    @property
    def config(self) -> str:
        """The configuration in words: tile constexprs and warps."""
        tiles = [f"{k}={v}" for k, v in self.constexprs.items() if not isinstance(v, bool)]
        return " ".join([*tiles, f"warps={self.num_warps}"])


@dataclass(frozen=True)
class KernelBuild:
    """What the compiler made of a :class:`KernelVariant` for one architecture and dtype."""

    name: str
    config: str
    arch: int
    dtype: str
    registers: int
    stack_bytes: int
    shared_bytes: int
    resident_warps: int


def resident_warps(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int:
    """Warps of one kernel an SM holds at once (theoretical occupancy, out of 64).

    Blocks per SM = min(32, 64 // warps, 65536 // (warps * ceil(32 * registers / 256) * 256),
    shared per SM // (shared + 1 KB)); warps = blocks * warps per block."""
    per_warp = -(-32 * registers // _REGISTER_UNIT) * _REGISTER_UNIT
    blocks = min(
        _MAX_BLOCKS_PER_SM,
        _MAX_WARPS_PER_SM // num_warps,
        _REGISTERS_PER_SM // (num_warps * per_warp),
        _SHARED_PER_SM.get(arch, _SHARED_PER_SM[80]) // (shared_bytes + _SHARED_RESERVED_PER_BLOCK),
    )
    return blocks * num_warps


def _signature(variant: KernelVariant, dtype: torch.dtype) -> dict[str, str]:
    signature = {}
    for name in variant.kernel.arg_names:
        if name in variant.constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = _POINTER_TYPES[
                dtype if name in variant.activation_ptrs else torch.float32
            ]
        else:
            signature[name] = "i32"
    return signature


def _resources(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK`` and ``SHARED`` of the one kernel in ``cubin``, from ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED):(\d+)", out.split("Function", 1)[-1]))
    if set(found) != {"REG", "STACK", "SHARED"}:
        raise RuntimeError(f"cuobjdump printed no resource usage for the kernel:\n{out}")
    return {key: int(value) for key, value in found.items()}


def compile_unavailable_reason(variant: KernelVariant | None = None) -> str | None:
    """None when ``variant`` (or, without one, any kernel) can be compiled here; otherwise why
    not, in words."""
    if triton is None:
        return "compiling Triton kernels needs the triton package"
    if variant is not None and not isinstance(variant.kernel, triton.runtime.jit.JITFunction):
        return (
            f"{variant.name} was decorated for Triton's interpreter (TRITON_INTERPRET was set "
            "when kscan's kernels were imported); compile in a process without it"
        )
    return None


def compile_variant(variant: KernelVariant, arch: int, dtype: torch.dtype) -> KernelBuild:
    """Compile ``variant`` for compute capability ``arch`` (90: H100/H200, 80: A100) with
    ``dtype`` activations, down to the cubin, and read its resources.

    Raises ``ValueError`` for a constexpr that is not an argument of the kernel,
    ``RuntimeError`` when Triton is missing or the kernel was decorated for the interpreter, and
    the compiler's own error when the kernel does not compile."""
    unknown = set(variant.constexprs) - set(getattr(variant.kernel, "arg_names", ()))
    if unknown:
        raise ValueError(f"{variant.name}: {sorted(unknown)} are not arguments of the kernel")
    reason = compile_unavailable_reason(variant)
    if reason is not None:
        raise RuntimeError(reason)
    names = variant.kernel.arg_names
    # pointers 16-byte aligned, which Triton assumes at launch for torch's allocations; integer
    # arguments without its divisible-by-16 specialisation (the general case)
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr")}
    source = ASTSource(
        fn=variant.kernel,
        signature=_signature(variant, dtype),
        constexprs=dict(variant.constexprs),
        attrs=aligned,
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": variant.num_warps}
    )
    used = _resources(compiled.asm["cubin"])
    return KernelBuild(
        name=variant.name,
        config=variant.config,
        arch=arch,
        dtype=str(dtype).removeprefix("torch."),
        registers=used["REG"],
        stack_bytes=used["STACK"],
        shared_bytes=used["SHARED"],
        resident_warps=resident_warps(used["REG"], used["SHARED"], variant.num_warps, arch),
    )
