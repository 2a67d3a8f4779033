"""VM-UNet (Ruan et al. 2024): a U-shaped network of Visual State Space (VSS) blocks (segmentation).

Channels-last maps ``(B, H, W, C)`` flow through the network. With ``n = len(dims)`` stages and
``dims = (C_0, 2 C_0, ..., 2^(n-1) C_0)``::

    patch_embed   conv 4x4 stride 4 (in_channels -> C_0), LayerNorm         (B, H/4, W/4, C_0)
    layers.i      VSS blocks at C_i, then (i < n-1) patch merging C_i -> 2 C_i at half the size
    layers_up.0   VSS blocks at C_(n-1)
    layers_up.j   (j >= 1) add the skip, patch expanding 2 C -> C at twice the size, VSS blocks
    final_up      linear C_0 -> 4 C_0, rearranged 4x4 to (B, H, W, C_0 / 4), LayerNorm
    final_conv    1x1 conv C_0 / 4 -> num_classes                            (B, classes, H, W)

The skip added before ``layers_up.j`` is the *input* of encoder stage ``n - j`` (the patch
embedding output is never a skip). ``H`` and ``W`` must be multiples of ``4 * 2^(n-1)`` (32 for
four stages); padding is the inference pipeline's job.

- **Patch merging** (``downsample``): the 2x2 neighbours concatenated in the order (0,0), (1,0),
  (0,1), (1,1) -> LayerNorm(4C) -> linear 4C -> 2C without bias.
- **Patch expanding** (``upsample``, ``final_up``): linear ``C -> s C`` without bias, the
  channels read as ``(p1, p2, c)`` and moved to a ``s x s`` block of pixels
  (``b h w (p1 p2 c) -> b (h p1) (w p2) c``), LayerNorm(C/s); ``s = 2`` in the decoder, 4 at the
  end.
- **VSS block**: ``x + DropPath(self_attention(LayerNorm(x)))`` (LayerNorm eps 1e-5). Drop-path
  rates rise linearly from 0 to ``drop_path_rate`` over the encoder blocks, and fall from
  ``drop_path_rate`` to 0 over the decoder blocks.
- **SS2D** (the default ``self_attention``, C channels, ``D = ssm_ratio * C``, state size N,
  rank ``R = ceil(C/16)``): ``x, z = in_proj(x)`` (C -> 2D, no bias); ``x = SiLU(depthwise
  conv3x3(x))``; ``x`` is read along the four :data:`~kscan.kernels.routes.VMAMBA_ROUTES` (rows,
  columns, both reversed) into ``K = 4`` sequences; per sequence ``k``,
  ``(dt, B, C) = x_proj_weight[k] x`` (sizes R, N, N) and ``delta = dt_projs_weight[k] dt``; the
  selective scan runs on all ``4D`` channels at once with ``A = -exp(A_logs)``, ``B, C`` grouped
  (group ``k`` serves sequence ``k``), ``D = Ds``, ``softplus(delta + dt_projs_bias)``; the four
  outputs are put back in row-major order and summed; ``y = out_proj(LayerNorm(y) * SiLU(z))``
  (2D -> C, no bias).

**Execution hooks.** ``SS2D.forward(x, conv=None, scans=None)`` (and MHS-VM's mixer) accept two
optional callables that change where the work runs, never the maths: ``conv(module, x)`` applies
the depthwise ``nn.Conv2d`` ``module`` to ``(B, D, H, W)`` (default ``module(x)``), and
``scans(ssm, x, routes)`` returns the route scans of the module ``ssm`` holding
:func:`add_route_ssm`'s parameters, ``(B, D, H, W)`` -> ``(B, K, D, H, W)``, entry ``k`` being
route ``k``'s outputs put back on the pixel grid (default: :func:`cross_scan`,
:func:`route_ssm`, :func:`cross_merge`). Band-parallel inference
(:mod:`kscan.pipelines.parallel.band`) passes halo-exchanging and band-chained versions.

**Mixer hook.** ``VMUNet(config, mixer=...)`` replaces SS2D in every VSS block: ``mixer(dim)``
is called once per block with the block's channel count ``dim`` (an ``int``) and must return an
``nn.Module`` mapping channels-last ``(B, H, W, dim)`` to ``(B, H, W, dim)``. It becomes the
block's ``self_attention`` child, so its parameters appear under
``vmunet.layers.<i>.blocks.<j>.self_attention.``. Everything else the mixer needs (state size,
heads, ...) comes from the caller, e.g. ``functools.partial`` over its own config. After building,
the skeleton initialises every ``nn.Linear`` (normal, std 0.02, cut at +-2; bias 0) and every
``nn.LayerNorm`` (1, 0) in the network, the mixer's included, as the reference VSSM does; other
parameters keep the mixer's own initialisation. MHS-VM is this skeleton with its multi-head mixer.

**Initialisation** (the reference's): linear layers as above; convolutions torch's default;
``x_proj_weight`` uniform in ``+-D^-0.5`` (torch's default for a linear layer D -> R + 2N);
``dt_projs_weight`` uniform in ``+-dt_scale R^-0.5``; ``dt_projs_bias = softplus^-1(dt)`` with
``dt = exp(U(log dt_min, log dt_max))`` floored at ``dt_init_floor``; ``A_logs = log(1..N)`` in
every row; ``Ds = 1``. Random draws use torch's global generator (seed it with
``torch.manual_seed``); they are not drawn in the reference's order.

**Outputs.** :meth:`VMUNet.forward_logits` gives the logits ``(B, num_classes, H, W)``; training
losses use it (``binary_cross_entropy_with_logits`` for one class, ``cross_entropy`` otherwise).
:meth:`VMUNet.forward` gives ``sigmoid(logits)`` for one class, as the reference, and the logits
for several classes.

**Keys.** The network is the child ``vmunet``, so state-dict keys are the reference's
(``vmunet.patch_embed.proj.weight``, ``vmunet.layers.0.blocks.0.self_attention.x_proj_weight``,
``vmunet.layers_up.1.upsample.expand.weight``, ``vmunet.final_conv.bias``, ...) with its shapes;
VM-UNet checkpoints load with ``strict=True`` (into ``in_channels=3``, as they were trained).
:func:`load_vmamba_pretrained` loads an ImageNet VMamba v0 encoder the way the reference does.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kscan.config import from_mapping, to_mapping
from kscan.errors import ConfigError, InvalidDataError, ShapeError
from kscan.kernels.routes import VMAMBA_ROUTES, cross_merge, cross_scan
from kscan.kernels.scan import selective_scan

PATCH_SIZE = 4
"""Side of the square patches of the patch embedding (and of the final expansion)."""

Mixer = Callable[[int], nn.Module]
"""``mixer(dim) -> nn.Module``: a VSS block's ``self_attention``, ``(B, H, W, dim)`` -> same."""

Conv = Callable[[nn.Conv2d, torch.Tensor], torch.Tensor]
"""``conv(module, x)``: the convolution ``module`` applied to ``x (B, D, H, W)``, same size."""

RouteScans = Callable[[nn.Module, torch.Tensor, tuple[str, ...]], torch.Tensor]
"""``scans(ssm, x, routes)``: ``x (B, d, H, W)`` read along ``routes`` and scanned with the
parameters of ``ssm`` (:func:`add_route_ssm`'s) -> ``(B, K, d, H, W)``, each route's outputs on the
pixel grid."""


@dataclass
class VMUNetConfig:
    """Hyper-parameters of :class:`VMUNet`; the defaults are VM-UNet's released configuration
    (27.43 M parameters with 3 input channels), with one input channel.

    Attributes:
        in_channels: input image channels (the reference repeats grayscale to 3).
        num_classes: output channels; one class gets a sigmoid in :meth:`VMUNet.forward`.
        dims: channels of the stages, each twice the previous; ``dims[0]`` a multiple of 4.
        depths: VSS blocks per encoder stage (one entry per stage).
        depths_decoder: VSS blocks per decoder stage, deepest first.
        d_state: SS2D state size ``N``.
        drop_path_rate: largest stochastic-depth rate, in ``[0, 1)``.
        ssm_ratio: SS2D inner channels ``D = int(ssm_ratio * C)`` (the reference's ``expand``).
        dt_rank: rank ``R`` of the ``delta`` projection, or "auto" for ``ceil(C / 16)``.
        d_conv: side of SS2D's depthwise convolution (odd).
        dt_min, dt_max: range of the initial step sizes ``softplus(dt_projs_bias)``.
        dt_init_floor: floor of the initial step sizes.
        dt_scale: scale of the initial ``dt_projs_weight`` range ``+-dt_scale R^-0.5``.
    """

    in_channels: int = 1
    num_classes: int = 1
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    depths_decoder: tuple[int, ...] = (2, 2, 2, 1)
    d_state: int = 16
    drop_path_rate: float = 0.2
    ssm_ratio: float = 2.0
    dt_rank: int | str = "auto"
    d_conv: int = 3
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("dims", "depths", "depths_decoder"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
                raise ConfigError(f"{name}: expected a non-empty list of integers, got {value!r}")
            setattr(self, name, tuple(value))
            for item in value:
                _require_positive(name, item)
        for name in ("in_channels", "num_classes", "d_state", "d_conv"):
            _require_positive(name, getattr(self, name))
        stages = len(self.dims)
        for name in ("depths", "depths_decoder"):
            if len(getattr(self, name)) != stages:
                raise ConfigError(
                    f"{name}: expected {stages} values, one per stage of dims {list(self.dims)}, "
                    f"got {list(getattr(self, name))}"
                )
        if any(b != 2 * a for a, b in zip(self.dims, self.dims[1:], strict=False)):
            raise ConfigError(
                f"dims: expected each stage twice the previous, got {list(self.dims)}"
            )
        if self.dims[0] % PATCH_SIZE:
            raise ConfigError(f"dims: expected dims[0] a multiple of 4, got {self.dims[0]}")
        if self.d_conv % 2 == 0:
            raise ConfigError(f"d_conv: expected an odd kernel size, got {self.d_conv}")
        if not _is_real(self.drop_path_rate) or not 0 <= self.drop_path_rate < 1:
            raise ConfigError(
                f"drop_path_rate: expected a number in [0, 1), got {self.drop_path_rate!r}"
            )
        if not _is_real(self.ssm_ratio) or int(self.ssm_ratio * self.dims[0]) < 1:
            raise ConfigError(
                f"ssm_ratio: expected a number with int(ssm_ratio * dims[0]) >= 1, "
                f"got {self.ssm_ratio!r}"
            )
        if self.dt_rank != "auto":
            _require_positive("dt_rank", self.dt_rank)
        for name in ("dt_min", "dt_max", "dt_scale"):
            if not _is_real(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(
                    f"{name}: expected a positive number, got {getattr(self, name)!r}"
                )
        if self.dt_min > self.dt_max:
            raise ConfigError(f"dt_min: expected at most dt_max={self.dt_max}, got {self.dt_min}")
        if not _is_real(self.dt_init_floor) or self.dt_init_floor < 0:
            raise ConfigError(f"dt_init_floor: expected a number >= 0, got {self.dt_init_floor!r}")

    @property
    def size_multiple(self) -> int:
        """``H`` and ``W`` must be multiples of this: ``4 * 2^(stages - 1)``."""
        return PATCH_SIZE * 2 ** (len(self.dims) - 1)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VMUNetConfig:
        """Build a config from a mapping (parsed YAML); unknown keys raise :class:`ConfigError`."""
        return from_mapping(cls, values)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (tuples as lists); ``from_dict`` inverts it."""
        return to_mapping(self)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _require_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


class DropPath(nn.Module):
    """Stochastic depth: in training, zero each sample's branch with probability ``p`` and scale
    the kept ones by ``1 / (1 - p)``; the identity in evaluation or when ``p = 0``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...)`` -> ``(B, ...)``."""
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """``x`` with ``softplus(x) = log(1 + e^x) = y`` for ``y > 0``: ``y + log(1 - e^-y)``."""
    return y + torch.log(-torch.expm1(-y))


def add_route_ssm(
    module: nn.Module,
    sequences: int,
    inner: int,
    d_state: int,
    rank: int,
    dt_min: float,
    dt_max: float,
    dt_init_floor: float,
    dt_scale: float,
) -> None:
    """Register the selective-scan parameters of ``K = sequences`` routes on ``module``.

    Parameters (reference names and initialisation): ``x_proj_weight (K, R+2N, d)`` uniform
    ``+-d^-0.5``; ``dt_projs_weight (K, d, R)`` uniform ``+-dt_scale R^-0.5``; ``dt_projs_bias
    (K, d) = softplus^-1(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]`` floored at
    ``dt_init_floor``; ``A_logs (K*d, N) = log(1..N)``; ``Ds (K*d,) = 1``. Also sets
    ``module.d_state = N`` and ``module.dt_rank = R``, which :func:`route_ssm` reads.
    """
    k, d, n, r = sequences, inner, d_state, rank
    module.d_state, module.dt_rank = n, r
    bound = d**-0.5
    module.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d).uniform_(-bound, bound))
    bound = dt_scale * r**-0.5
    module.dt_projs_weight = nn.Parameter(torch.empty(k, d, r).uniform_(-bound, bound))
    log_dt = torch.empty(k, d).uniform_(math.log(dt_min), math.log(dt_max))
    module.dt_projs_bias = nn.Parameter(inverse_softplus(log_dt.exp().clamp(min=dt_init_floor)))
    module.A_logs = nn.Parameter(torch.arange(1, n + 1, dtype=torch.float32).log().repeat(k * d, 1))
    module.Ds = nn.Parameter(torch.ones(k * d))


def route_ssm_inputs(
    module: nn.Module, xs: torch.Tensor, routes: Sequence[int] | None = None
) -> tuple[torch.Tensor, ...]:
    """The selective-scan arguments of :func:`route_ssm`: ``xs (B, K, d, L)`` ->
    ``(u, delta, A, B, C, D, delta_bias)``; with ``routes``, those of the listed route numbers
    only (``xs`` then holds ``len(routes)`` routes, in that order).

    For route ``k`` with input ``u_k (B, d, L)``: ``[dt_low, B_k, C_k] = x_proj_weight[k] @ u_k``
    and ``delta_k = dt_projs_weight[k] @ dt_low``; the ``K`` routes are stacked on channels:
    ``u, delta (B, K*d, L)`` (``delta`` before bias and softplus), ``A = -exp(A_logs) (K*d, N)``,
    ``B, C (B, K, N, L)`` (group ``k`` serves route ``k``), ``D = Ds (K*d,)``, ``delta_bias =
    dt_projs_bias (K*d,)``; all in float32 (float64 stays). The projections act on each position
    alone, so the positions may be in any order (band-parallel inference passes a band's pixels).
    """
    batch, count, inner, length = xs.shape
    every = module.x_proj_weight.shape[0]

    def per_route(p: torch.Tensor) -> torch.Tensor:
        """A parameter stacked over the ``K`` routes (``(K, ...)`` or ``(K*d, ...)``), limited to
        ``routes`` (as is without them: no copy on the plain forward)."""
        if routes is None:
            return p
        return p.view(every, -1, *p.shape[1:])[list(routes)].reshape(-1, *p.shape[1:])

    x_proj = per_route(module.x_proj_weight)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj)
    dts, bs, cs = x_dbl.split([module.dt_rank, module.d_state, module.d_state], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, per_route(module.dt_projs_weight))
    compute = torch.promote_types(xs.dtype, torch.float32)
    return (
        xs.reshape(batch, count * inner, length).to(compute),
        dts.reshape(batch, count * inner, length).to(compute),
        -torch.exp(per_route(module.A_logs).to(compute)),
        bs.to(compute).contiguous(),
        cs.to(compute).contiguous(),
        per_route(module.Ds).to(compute),
        per_route(module.dt_projs_bias).reshape(-1).to(compute),
    )


def route_ssm(module: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """The ``K`` route scans of :func:`add_route_ssm`'s parameters: ``(B, K, d, L)`` -> ``(B, K, d, L)``.

    :func:`kscan.kernels.selective_scan` on :func:`route_ssm_inputs` with softplus: the ``K``
    scans run as one scan of ``K*d`` channels with ``K`` groups of ``B, C``, in float32 (float64
    stays).
    """
    u, delta, A, B, C, D, bias = route_ssm_inputs(module, xs)
    ys = selective_scan(u, delta, A, B, C, D=D, delta_bias=bias, delta_softplus=True)
    return ys.view(xs.shape)


class SS2D(nn.Module):
    """The 2D selective scan mixer (see the module docstring): ``(B, H, W, C)`` -> ``(B, H, W, C)``.

    Parameters (reference names): ``in_proj`` (2D, C); ``conv2d`` depthwise (D, 1, k, k) with bias;
    ``x_proj_weight`` (4, R + 2N, D); ``dt_projs_weight`` (4, D, R); ``dt_projs_bias`` (4, D);
    ``A_logs`` (4D, N); ``Ds`` (4D,); ``out_norm`` LayerNorm(D); ``out_proj`` (C, D).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
    ) -> None:
        super().__init__()
        inner = int(ssm_ratio * dim)
        rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        routes = len(VMAMBA_ROUTES)
        self.d_state, self.dt_rank = d_state, rank
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv2d = nn.Conv2d(
            inner, inner, d_conv, padding=(d_conv - 1) // 2, groups=inner, bias=True
        )
        add_route_ssm(self, routes, inner, d_state, rank, dt_min, dt_max, dt_init_floor, dt_scale)
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(
        self, x: torch.Tensor, conv: Conv | None = None, scans: RouteScans | None = None
    ) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``; ``conv``, ``scans``: the execution hooks (see
        the module docstring), None for the plain forward."""
        batch, height, width, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = x.permute(0, 3, 1, 2)
        x = F.silu(self.conv2d(x) if conv is None else conv(self.conv2d, x))  # (B, D, H, W)
        if scans is None:
            ys = route_ssm(self, cross_scan(x, VMAMBA_ROUTES))  # (B, K, D, L)
            y = cross_merge(ys, VMAMBA_ROUTES, height, width)
        else:
            y = scans(self, x, VMAMBA_ROUTES).sum(dim=1)
        y = self.out_norm(y.permute(0, 2, 3, 1)) * F.silu(z)
        return self.out_proj(y)


class VSSBlock(nn.Module):
    """``x + DropPath(self_attention(ln_1(x)))`` on ``(B, H, W, C)``."""

    def __init__(self, dim: int, self_attention: nn.Module, drop_path: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = self_attention
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        return x + self.drop_path(self.self_attention(self.ln_1(x)))


class PatchEmbed(nn.Module):
    """``proj`` (conv p x p, stride p), ``norm``: ``(B, c, H, W)`` -> ``(B, H/p, W/p, C)``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2x2 neighbours (0,0), (1,0), (0,1), (1,1) concatenated, ``norm`` (4C), ``reduction``
    4C -> 2C: ``(B, H, W, C)`` -> ``(B, H/2, W/2, 2C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2])
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


class PatchExpand(nn.Module):
    """``expand`` C -> sC, channels ``(p1, p2, c)`` moved to ``s x s`` pixels, ``norm`` (C/s):
    ``(B, H, W, C)`` -> ``(B, sH, sW, C/s)``."""

    def __init__(self, dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * dim, bias=False)
        self.norm = nn.LayerNorm(dim // scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        s = self.scale
        x = self.expand(x).view(batch, height, width, s, s, channels // s)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, s * height, s * width, channels // s)
        return self.norm(x)


class VSSStage(nn.Module):
    """``upsample`` (decoder stages), ``blocks``, ``downsample`` (encoder stages), each optional."""

    def __init__(
        self,
        blocks: list[VSSBlock],
        downsample: nn.Module | None = None,
        upsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            x = self.upsample(x)
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


def ss2d_mixer(config: VMUNetConfig) -> Mixer:
    """The default mixer: ``dim -> SS2D(dim, ...)`` with the SS2D settings of ``config``."""
    return functools.partial(
        SS2D,
        d_state=config.d_state,
        ssm_ratio=config.ssm_ratio,
        dt_rank=config.dt_rank,
        d_conv=config.d_conv,
        dt_min=config.dt_min,
        dt_max=config.dt_max,
        dt_init_floor=config.dt_init_floor,
        dt_scale=config.dt_scale,
    )


def init_weights(module: nn.Module) -> None:
    """The reference's re-initialisation: linear weights trunc-normal (std 0.02, cut at +-2),
    linear biases 0, LayerNorm weight 1 and bias 0. Apply with ``network.apply(init_weights)``."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _linspace(end: float, steps: int) -> list[float]:
    """``steps`` rates from 0 to ``end`` as the reference computes them (float32 ``linspace``)."""
    return torch.linspace(0, end, steps, device="cpu").tolist()


class VSSUNet(nn.Module):
    """The encoder-decoder (the reference's ``VSSM``): ``(B, c, H, W)`` -> logits
    ``(B, classes, H, W)``; children ``patch_embed``, ``layers``, ``layers_up``, ``final_up``,
    ``final_conv``."""

    def __init__(self, config: VMUNetConfig, mixer: Mixer) -> None:
        super().__init__()
        dims, stages = config.dims, len(config.dims)
        rates = _linspace(config.drop_path_rate, sum(config.depths))
        rates_up = _linspace(config.drop_path_rate, sum(config.depths_decoder))[::-1]

        def blocks(dim: int, depth: int, rates: list[float]) -> list[VSSBlock]:
            return [VSSBlock(dim, mixer(dim), rates.pop(0)) for _ in range(depth)]

        self.patch_embed = PatchEmbed(config.in_channels, dims[0])
        self.layers = nn.ModuleList(
            VSSStage(
                blocks(dims[i], config.depths[i], rates),
                downsample=PatchMerging(dims[i]) if i < stages - 1 else None,
            )
            for i in range(stages)
        )
        self.layers_up = nn.ModuleList(
            VSSStage(
                blocks(dims[stages - 1 - j], config.depths_decoder[j], rates_up),
                upsample=PatchExpand(2 * dims[stages - 1 - j], 2) if j > 0 else None,
            )
            for j in range(stages)
        )
        self.final_up = PatchExpand(dims[0], PATCH_SIZE)
        self.final_conv = nn.Conv2d(dims[0] // PATCH_SIZE, config.num_classes, 1)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c, H, W)`` -> ``(B, classes, H, W)``."""
        x = self.patch_embed(x)
        skips = []
        for layer in self.layers:
            skips.append(x)
            x = layer(x)
        for j, layer in enumerate(self.layers_up):
            x = layer(x if j == 0 else x + skips[-j])
        return self.final_conv(self.final_up(x).permute(0, 3, 1, 2))


class VMUNet(nn.Module):
    """VM-UNet (see the module docstring); the network is the child ``vmunet``.

    Args:
        config: the hyper-parameters (defaults: :class:`VMUNetConfig`).
        mixer: ``mixer(dim) -> nn.Module`` building each VSS block's ``self_attention``
            (``(B, H, W, dim)`` -> same); None for :class:`SS2D` with the config's settings.
    """

    def __init__(self, config: VMUNetConfig | None = None, mixer: Mixer | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VMUNetConfig()
        self.vmunet = VSSUNet(self.config, mixer if mixer is not None else ss2d_mixer(self.config))

    def _check_input(self, x: torch.Tensor) -> None:
        channels, multiple = self.config.in_channels, self.config.size_multiple
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            found = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"x: expected a real floating tensor, got {found}")
        if x.ndim != 4 or x.shape[1] != channels:
            raise ShapeError(f"x: expected shape (batch, {channels}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height == 0 or width == 0 or height % multiple or width % multiple:
            raise ShapeError(
                f"x: expected H and W positive multiples of {multiple} (patch size {PATCH_SIZE} "
                f"times 2^{len(self.config.dims) - 1} for {len(self.config.dims)} stages), "
                f"got {height}x{width}; pad the image first"
            )

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> logits ``(B, num_classes, H, W)``, for training losses."""
        self._check_input(x)
        return self.vmunet(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, num_classes, H, W)``: probabilities
        ``sigmoid(logits)`` for one class, logits for several."""
        logits = self.forward_logits(x)
        return torch.sigmoid(logits) if self.config.num_classes == 1 else logits


@dataclass(frozen=True)
class PretrainedReport:
    """What :func:`load_vmamba_pretrained` did; keys are those of ``model.vmunet`` (no prefix).

    Attributes:
        loaded: model key -> the pretrained key it was copied from.
        adapted: model keys whose tensor was converted on the way (the patch embedding summed
            over input channels), each with the reason.
        skipped: pretrained key -> why it (or its mirrored copy) was not used.
        missing: model keys left at their initial values.
    """

    loaded: dict[str, str]
    adapted: dict[str, str]
    skipped: dict[str, str]
    missing: tuple[str, ...]


_ENCODER_KEY = re.compile(r"layers\.(\d+)\.(.*)")
_PATCH_WEIGHT = "patch_embed.proj.weight"


def _adapt(key: str, value: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor | None, str]:
    """``value`` made to fit ``shape`` and a note, or ``(None, reason)`` when it cannot."""
    if value.shape == shape:
        return value, ""
    if key == _PATCH_WEIGHT and value.ndim == 4 and shape[1] == 1 and value.shape[0] == shape[0]:
        if value.shape[2:] == shape[2:]:
            note = (
                f"summed over {value.shape[1]} input channels (the same as repeating a "
                "1-channel image, as the reference does)"
            )
            return value.sum(1, keepdim=True), note
    return None, f"shape {tuple(value.shape)}, expected {tuple(shape)}"


def load_vmamba_pretrained(
    model: VMUNet, state_dict: Mapping[str, torch.Tensor]
) -> PretrainedReport:
    """Load an ImageNet VMamba v0 encoder (VM-UNet's pretrained VMamba-S) into ``model``.

    As the reference's ``load_from``: every pretrained key that names a parameter of
    ``model.vmunet`` with the same shape is copied (``patch_embed.*``, ``layers.i.blocks.j.*``,
    ``layers.i.downsample.*``); then encoder stage ``i`` is mirrored onto decoder stage
    ``n - 1 - i`` (``layers.i.blocks.j.* -> layers_up.(n-1-i).blocks.j.*``, blocks the decoder
    has), overriding any ``layers_up`` key of the input (so load VM-UNet's own checkpoints with
    ``load_state_dict``, not with this). The classifier (``norm.*``, ``head.*``) and blocks
    beyond the model's depths are skipped. With one input channel, the 3-channel patch-embedding
    weight is summed over its channels, which equals the reference's repetition of a grayscale
    image to 3 channels. Reads no file:
    pass ``torch.load(path, weights_only=True)`` (``{'model': state_dict}`` is unwrapped here).
    """
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise InvalidDataError(
            "state_dict: expected a mapping of parameter names to tensors (or {'model': ...})"
        )
    targets = model.vmunet.state_dict()
    stages = len(model.config.dims)
    plan = {key: key for key in state_dict if key in targets}  # target -> source
    for key in state_dict:  # the mirrored copies, which win as in the reference's second pass
        match = _ENCODER_KEY.fullmatch(key)
        if match is None:
            continue
        mirrored = f"layers_up.{stages - 1 - int(match[1])}.{match[2]}"
        if mirrored in targets:
            plan[mirrored] = key
    new: dict[str, torch.Tensor] = {}
    loaded: dict[str, str] = {}
    adapted: dict[str, str] = {}
    used = set(plan.values())
    skipped = {key: "no such key in VM-UNet" for key in state_dict if key not in used}
    for name, key in plan.items():
        tensor, note = _adapt(name, state_dict[key], targets[name].shape)
        if tensor is None:
            skipped[key] = f"{note} for {name}"
            continue
        new[name], loaded[name] = tensor, key
        if note:
            adapted[name] = note
    model.vmunet.load_state_dict(new, strict=False)
    missing = tuple(name for name in targets if name not in loaded)
    return PretrainedReport(loaded, adapted, skipped, missing)
