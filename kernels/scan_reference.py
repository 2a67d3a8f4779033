"""The selective scan, as a plain sequential loop: the definition every backend is tested against.

With batch ``b``, channel ``d``, state ``n``, time ``t`` and group ``g(d) = d // (D / G)``::

    delta_t = softplus(delta_t + delta_bias)           (if delta_softplus; linear above 20)
    h_t     = exp(delta_t A[d, n]) h_{t-1} + delta_t B_t[g(d), n] u_t      (h_{-1} = initial_state or 0)
    y_t     = sum_n C_t[g(d), n] h_t + D[d] u_t;   y_t *= silu(z_t)        (if z is given)

Shapes: ``u, delta, z`` ``(batch, D, L)``; ``A`` ``(D, N)``; ``B, C`` ``(batch, N, L)`` or grouped
``(batch, G, N, L)``; ``D, delta_bias`` ``(D,)``; ``initial_state`` and the last state
``(batch, D, N)``. This is mamba-ssm's ``selective_scan_fn``. Computed in float32 (float64 for
float64 inputs) and returned in ``u``'s dtype; the last state stays in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_groups(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``(batch, N, L)`` or ``(batch, G, N, L)`` -> ``(batch, D, N, L)``: group ``g`` serves
    channels ``g*D/G`` to ``(g+1)*D/G - 1``."""
    if x.ndim == 3:
        return x.unsqueeze(1).expand(-1, channels, -1, -1)
    return x.repeat_interleave(channels // x.shape[1], dim=1)


def discretize(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool
) -> torch.Tensor:
    """``softplus(delta + delta_bias)`` (softplus with threshold 20, as mamba-ssm) or ``delta + bias``."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta, threshold=20.0) if delta_softplus else delta


def selective_scan_reference(
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
    """The sequential scan (see the module docstring); differentiable by plain autograd."""
    dtype_in = u.dtype
    compute = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    channels = u.shape[1]
    B = expand_groups(B.to(compute), channels)
    C = expand_groups(C.to(compute), channels)
    delta = discretize(
        delta, None if delta_bias is None else delta_bias.to(compute), delta_softplus
    )
    h = (
        initial_state.to(compute)
        if initial_state is not None
        else u.new_zeros(u.shape[0], channels, A.shape[1])
    )
    ys = []
    # unbind once: indexing [..., t] in the loop would make autograd allocate a full-size gradient
    # of B and C at every step.
    steps = zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True)
    for delta_t, u_t, b_t, c_t in steps:
        h = torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * b_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(compute)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y
