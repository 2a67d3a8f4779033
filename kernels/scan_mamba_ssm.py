"""Optional backend: mamba-ssm's compiled CUDA selective scan, used only when asked for.

``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` has the same semantics as
:func:`kscan.kernels.scan_reference.selective_scan_reference` except that it has no initial state.
mamba-ssm is never required: this module imports it only when the backend is used.
"""

from __future__ import annotations

import importlib

import torch


def mamba_ssm_available() -> bool:
    """True when mamba-ssm and its compiled extension ``selective_scan_cuda`` import."""
    try:
        importlib.import_module("selective_scan_cuda")
        importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except ImportError:
        return False
    return True


def selective_scan_mamba_ssm(
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
    """mamba-ssm's ``selective_scan_fn`` on CUDA tensors; ``initial_state`` must be None
    (``kscan.kernels.selective_scan`` checks both before calling)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    assert initial_state is None, "mamba-ssm's selective_scan_fn has no initial state"
    return selective_scan_fn(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )
