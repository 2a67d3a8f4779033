"""MHS-VM (Ji 2024): VM-UNet with a multi-head scan in place of SS2D.

The mixer of each VSS block (:class:`MHSMixer`, input and output ``(batch, H, W, C)``)::

    x, z = split(in_proj(input))                   in_proj: C -> 2C, no bias
    x    = silu(depthwise_conv(x))                 3x3 with bias, channels-first (batch, C, H, W)
    y    = MultiHeadScan(x)                        (batch, H, W, C)
    out  = LayerNorm(y) * silu(z)

:class:`MultiHeadScan` with ``h`` heads and threshold ``t``: a linear map ``C -> C`` (no bias)
splits into ``h`` heads of ``d = C / h`` channels. Head ``i`` belongs to the family
``"CXSZ"[i]`` of :data:`kscan.kernels.routes.MHSVM_HEAD_ROUTES` and reads its ``d`` channels
along four routes (two routes and their reverses); each sequence ``k`` is scanned with its own
projections (:class:`RouteSSM`, SS2D's with ``d_inner = d``) and put back in row-major order,
giving ``y_k``, ``k = 0..3``. Scan route attention (:func:`route_attention`) combines them::

    y  = (y_0 + y_1 + y_2 + y_3) * relu(cv - t)
    cv = std_k(y_k) / (mean_k(y_k - min_k y_k) + 1e-5)        (std unbiased, over the four)

The heads' outputs are concatenated, layer-normalised and mapped ``C -> C`` (no bias).
``MHSMixer.forward(x, conv=None, scans=None)`` takes VM-UNet's execution hooks
(:mod:`kscan.models.vmunet`): ``conv`` for the depthwise convolution, ``scans`` for each head's
route scans (called with the head's ``mambaeng``).

:class:`MHSVM` is :class:`kscan.models.vmunet.VMUNet` built with :func:`mhs_mixer` as its mixer
hook; :class:`MHSVMConfig` adds ``heads`` and ``threshold`` to VM-UNet's config. The released
model has 4 heads, ``t = 0.5`` (ISIC18; 0.4 at test time), VM-UNet's dims and depths and
17,257,129 parameters with 3 input channels. The reference runs 3 or 4 heads only; 1 head (C)
and 2 heads (C, X) are kscan's extension of the same rule.

Parameter names follow the reference implementation (``in_proj``, ``conv2d``, ``mhs.x_ssproj``,
``mhs.scanhead_<family>.mambaeng.{x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds}``,
``mhs.cat_norm``, ``mhs.y_proj``, ``out_norm``). Reference checkpoints also hold two aliases of
the same tensors, ``mhs.x_ssproj_W`` (= ``mhs.x_ssproj.weight``) and each head's
``scanning.seq2seq_engine.*`` (= ``mambaeng.*``); :func:`mhs_state_dict_from_reference` and
:func:`mhs_state_dict_to_reference` drop and recreate them.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kscan.errors import ConfigError, InvalidDataError, ShapeError
from kscan.kernels.routes import MHSVM_HEAD_ROUTES, cross_merge, cross_scan
from kscan.models.vmunet import (
    Conv,
    Mixer,
    RouteScans,
    VMUNet,
    VMUNetConfig,
    add_route_ssm,
    init_weights,
    route_ssm,
)

StateDict = dict[str, torch.Tensor]

FAMILIES: tuple[str, ...] = tuple(MHSVM_HEAD_ROUTES)
"""Head families in head order: C (snake), X (zig-zag), S (spiral), Z (raster)."""

ROUTE_ATTENTION_EPS = 1e-5


def route_attention(ys: torch.Tensor, threshold: float) -> torch.Tensor:
    """Scan route attention: combine ``K`` route outputs ``ys (batch, K, ...)`` into ``(batch, ...)``.

    ``sum_k ys_k * relu(cv - threshold)`` with the relative coefficient of variation
    ``cv = std_k(ys_k) / (mean_k(ys_k - min_k ys_k) + 1e-5)``, ``std`` unbiased (divides by ``K-1``).
    """
    spread = ys.std(dim=1)
    offset = (ys - ys.amin(dim=1, keepdim=True)).mean(dim=1)
    cv = spread / (offset + ROUTE_ATTENTION_EPS)
    return ys.sum(dim=1) * F.relu(cv - threshold)


class RouteSSM(nn.Module):
    """Selective scans of ``K`` sequences of ``d`` channels, each with its own projections.

    The parameters, their initialisation and the scan are SS2D's
    (:func:`kscan.models.vmunet.add_route_ssm`, :func:`kscan.models.vmunet.route_ssm`) with
    ``d = d_inner``; ``R = ceil(d / 16)`` for ``dt_rank="auto"``.
    """

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        sequences: int = 4,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (("d_inner", d_inner), ("d_state", d_state), ("sequences", sequences)):
            _require_positive(name, value)
        if dt_rank != "auto":
            _require_positive("dt_rank", dt_rank)
        self.d_inner, self.sequences = d_inner, sequences
        rank = math.ceil(d_inner / 16) if dt_rank == "auto" else int(dt_rank)
        add_route_ssm(
            self, sequences, d_inner, d_state, rank, dt_min, dt_max, dt_init_floor, dt_scale
        )

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """``xs (batch, K, d, L)`` -> ``(batch, K, d, L)``, computed in float32 (float64 stays)."""
        if xs.ndim != 4 or tuple(xs.shape[1:3]) != (self.sequences, self.d_inner):
            raise ShapeError(
                f"xs: expected shape (batch, K={self.sequences}, d={self.d_inner}, L), "
                f"got {tuple(xs.shape)}"
            )
        return route_ssm(self, xs)


class RouteScanHead(nn.Module):
    """One head: its four routes scanned by :class:`RouteSSM` (``mambaeng``), back in row-major order.

    Input ``x (batch, d, H, W)``; output ``(batch, 4, d, H, W)``, entry ``k`` being sequence ``k``
    of ``MHSVM_HEAD_ROUTES[family]`` after the scan, un-permuted to the pixel grid.
    ``ssm_options``: the keyword arguments of :class:`RouteSSM` after ``d_state``.
    """

    def __init__(self, family: str, d_inner: int, d_state: int = 16, **ssm_options: Any) -> None:
        super().__init__()
        if family not in MHSVM_HEAD_ROUTES:
            raise ConfigError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
        self.family = family
        self.routes = MHSVM_HEAD_ROUTES[family]
        self.mambaeng = RouteSSM(d_inner, d_state, len(self.routes), **ssm_options)

    def forward(self, x: torch.Tensor, scans: RouteScans | None = None) -> torch.Tensor:
        """``(batch, d, H, W)`` -> ``(batch, 4, d, H, W)``; ``scans``: VM-UNet's route-scan hook
        (None: gather, ``mambaeng``, scatter back)."""
        if scans is not None:
            return scans(self.mambaeng, x, self.routes)
        height, width = x.shape[-2:]
        ys = self.mambaeng(cross_scan(x, self.routes))
        return torch.stack(
            [
                cross_merge(ys[:, k : k + 1], (name,), height, width)
                for k, name in enumerate(self.routes)
            ],
            dim=1,
        )


class MultiHeadScan(nn.Module):
    """The multi-head scan (see the module docstring): ``(batch, C, H, W)`` -> ``(batch, H, W, C)``.

    Args:
        dim: channels ``C``, a multiple of ``heads``.
        heads: number of heads ``h`` in 1..4; head ``i`` uses route family ``"CXSZ"[i]``.
        threshold: ``t`` of :func:`route_attention` (an attribute; may be changed after training).
        d_state: state size ``N`` of the scans.
        ssm_options: the keyword arguments of :class:`RouteSSM` after ``sequences`` (``dt_rank``,
            ``dt_min``, ``dt_max``, ``dt_init_floor``, ``dt_scale``).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        threshold: float = 0.5,
        d_state: int = 16,
        **ssm_options: Any,
    ) -> None:
        super().__init__()
        _check_heads(dim, heads)
        self.dim, self.heads, self.threshold = dim, heads, _check_threshold(threshold)
        self.x_ssproj = nn.Linear(dim, dim, bias=False)
        for family in FAMILIES[:heads]:
            head = RouteScanHead(family, dim // heads, d_state, **ssm_options)
            self.add_module(f"scanhead_{family}", head)
        self.cat_norm = nn.LayerNorm(dim)
        self.y_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, scans: RouteScans | None = None) -> torch.Tensor:
        """``(batch, C, H, W)`` -> ``(batch, H, W, C)``; ``scans`` as for :class:`RouteScanHead`."""
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ShapeError(f"x: expected shape (batch, C={self.dim}, H, W), got {tuple(x.shape)}")
        parts = torch.einsum("bchw,oc->bohw", x, self.x_ssproj.weight).chunk(self.heads, dim=1)
        ys = [
            route_attention(getattr(self, f"scanhead_{family}")(part, scans), self.threshold)
            for family, part in zip(FAMILIES, parts, strict=False)
        ]
        y = torch.cat(ys, dim=1).permute(0, 2, 3, 1)
        return self.y_proj(self.cat_norm(y))


class MHSMixer(nn.Module):
    """The gated MHS block of a VSS block: ``(batch, H, W, C)`` -> ``(batch, H, W, C)``.

    ``x, z = in_proj(input)``; ``y = MultiHeadScan(silu(conv2d(x)))``; ``out_norm(y) * silu(z)``
    with ``conv2d`` depthwise ``d_conv x d_conv`` with bias (padding ``(d_conv-1)//2``).
    Linear layers and LayerNorms are initialised by :func:`kscan.models.vmunet.init_weights`
    (trunc-normal std 0.02, bias 0; 1 and 0), the convolution as torch does.
    ``ssm_options`` as for :class:`MultiHeadScan`.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        threshold: float = 0.5,
        d_state: int = 16,
        d_conv: int = 3,
        **ssm_options: Any,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.in_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.conv2d = nn.Conv2d(dim, dim, d_conv, padding=(d_conv - 1) // 2, groups=dim)
        self.mhs = MultiHeadScan(dim, heads, threshold, d_state, **ssm_options)
        self.out_norm = nn.LayerNorm(dim)
        self.apply(init_weights)

    def forward(
        self, x: torch.Tensor, conv: Conv | None = None, scans: RouteScans | None = None
    ) -> torch.Tensor:
        """``(batch, H, W, C)`` -> same; ``conv``, ``scans``: VM-UNet's execution hooks (None for
        the plain forward)."""
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ShapeError(f"x: expected shape (batch, H, W, C={self.dim}), got {tuple(x.shape)}")
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = x.permute(0, 3, 1, 2)
        x = F.silu(self.conv2d(x) if conv is None else conv(self.conv2d, x))
        return self.out_norm(self.mhs(x, scans)) * F.silu(z)


def _require_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


def _check_heads(dim: int, heads: int) -> None:
    if (
        isinstance(heads, bool)
        or not isinstance(heads, numbers.Integral)
        or not 1 <= heads <= len(FAMILIES)
    ):
        raise ConfigError(f"heads: expected an integer in 1..{len(FAMILIES)}, got {heads!r}")
    _require_positive("dim", dim)
    if dim % heads:
        raise ConfigError(f"dim: expected a multiple of heads={heads}, got {dim}")


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ConfigError(f"threshold: expected a number, got {threshold!r}")
    return float(threshold)


@dataclass
class MHSVMConfig(VMUNetConfig):
    """Hyper-parameters of :class:`MHSVM`: :class:`~kscan.models.vmunet.VMUNetConfig`'s plus

    Attributes:
        heads: heads of the multi-head scan, 1..4 (families C, X, S, Z in order); every entry of
            ``dims`` must be a multiple of it. The released model has 4.
        threshold: ``t`` of scan route attention (0.5 for ISIC18 training, 0.4 at test time in
            the reference; see :meth:`MHSVM.set_threshold`).
        ssm_ratio: must be 1 (MHS-VM has no expansion: the mixer works on ``C`` channels).

    ``d_state``, ``d_conv``, ``dt_rank`` (``"auto"``: ``ceil(C / heads / 16)``), ``dt_min``,
    ``dt_max``, ``dt_init_floor`` and ``dt_scale`` apply to every head's scans.
    """

    ssm_ratio: float = 1.0
    heads: int = 4
    threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ssm_ratio != 1:
            raise ConfigError(
                f"ssm_ratio: expected 1 (MHS-VM's mixer has no expansion), got {self.ssm_ratio!r}"
            )
        for dim in self.dims:
            _check_heads(dim, self.heads)
        self.threshold = _check_threshold(self.threshold)


def mhs_mixer(config: MHSVMConfig) -> Mixer:
    """VM-UNet's mixer hook for MHS-VM: ``dim -> MHSMixer(dim, ...)`` with ``config``'s settings."""
    return functools.partial(
        MHSMixer,
        heads=config.heads,
        threshold=config.threshold,
        d_state=config.d_state,
        d_conv=config.d_conv,
        dt_rank=config.dt_rank,
        dt_min=config.dt_min,
        dt_max=config.dt_max,
        dt_init_floor=config.dt_init_floor,
        dt_scale=config.dt_scale,
    )


class MHSVM(VMUNet):
    """MHS-VM: the :class:`~kscan.models.vmunet.VMUNet` skeleton with :class:`MHSMixer` blocks.

    Same inputs, outputs and key layout as ``VMUNet`` (``vmunet.`` prefix); with
    ``in_channels=3`` and the default dims and depths, 17,257,129 parameters at 4 heads, as the
    reference. Reference checkpoints load through :func:`mhs_state_dict_from_reference`.
    """

    def __init__(self, config: MHSVMConfig | None = None) -> None:
        config = config if config is not None else MHSVMConfig()
        if not isinstance(config, MHSVMConfig):
            raise ConfigError(f"config: expected an MHSVMConfig, got {type(config).__name__}")
        super().__init__(config, mixer=mhs_mixer(config))

    def set_threshold(self, threshold: float) -> None:
        """Set the route-attention threshold ``t`` of every block (and the config)."""
        self.config.threshold = _check_threshold(threshold)
        for module in self.modules():
            if isinstance(module, MultiHeadScan):
                module.threshold = self.config.threshold


# The reference's aliased keys.
_PROJ_ALIAS = re.compile(r"(^|\.)mhs\.x_ssproj_W$")
_PROJ = re.compile(r"(^|\.)mhs\.x_ssproj\.weight$")
_ENGINE_ALIAS = ".scanning.seq2seq_engine."
_ENGINE = ".mambaeng."


def _canonical(key: str) -> str | None:
    """The canonical key of a reference alias key, None for other keys."""
    if _PROJ_ALIAS.search(key):
        return key[: -len("x_ssproj_W")] + "x_ssproj.weight"
    if _ENGINE_ALIAS in key and ".mhs.scanhead_" in f".{key}":
        return key.replace(_ENGINE_ALIAS, _ENGINE, 1)
    return None


def mhs_state_dict_from_reference(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A reference MHS-VM state dict without its aliased duplicate keys.

    Each alias (``...mhs.x_ssproj_W``, ``...scanning.seq2seq_engine.*``) must equal its canonical
    key (``...mhs.x_ssproj.weight``, ``...mambaeng.*``) and is dropped; an alias whose canonical
    key is absent is renamed to it. Other keys pass unchanged, in order.

    Raises:
        InvalidDataError: an alias holds a tensor different from its canonical key's.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        canonical = _canonical(key)
        if canonical is None:
            out[key] = value
            continue
        twin = state_dict.get(canonical)
        if twin is None:
            out[canonical] = value
        elif twin.shape != value.shape or not torch.equal(twin, value):
            raise InvalidDataError(
                f"state_dict: aliased keys {key!r} and {canonical!r} hold different tensors; "
                "expected equal ones"
            )
    return out


def _alias(key: str) -> str | None:
    """The reference alias of a canonical key, None for keys without one."""
    if _PROJ.search(key):
        return key[: -len("x_ssproj.weight")] + "x_ssproj_W"
    if _ENGINE in key and ".mhs.scanhead_" in f".{key}":
        return key.replace(_ENGINE, _ENGINE_ALIAS, 1)
    return None


def mhs_state_dict_to_reference(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The state dict with the reference's aliases added, in the reference's key order.

    ``...mhs.x_ssproj_W`` is inserted before ``...mhs.x_ssproj.weight`` and each head's
    ``scanning.seq2seq_engine.*`` after its ``mambaeng.*`` keys; aliases share the tensor of
    their canonical key (as in the reference, where they are the same parameter).
    """
    out: StateDict = {}
    pending: list[tuple[str, torch.Tensor]] = []
    for key, value in state_dict.items():
        alias = _alias(key)
        if pending and (
            alias is None or alias.rsplit(".", 1)[0] != pending[0][0].rsplit(".", 1)[0]
        ):
            out.update(pending)
            pending = []
        if alias is not None and _ENGINE in key:
            pending.append((alias, value))
        elif alias is not None:
            out[alias] = value
        out[key] = value
    out.update(pending)
    return out
