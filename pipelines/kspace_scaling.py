"""Per-sample k-space scaling around a learned reconstruction model, as DIRECT applies it.

A network without internal normalisation (RecurrentVarNet) only works at the intensity scale it
was trained at. DIRECT trains and infers on masked k-space divided by a per-sample factor::

    s = the k-th largest |y| over the sample's coils,   k = floor((1 - p) n) + 1

with ``n`` the number of entries of the coils that hold data (coils that are all zero, DIRECT's
padding, are left out; zeros of unsampled lines count) and ``p`` the percentile (0.99 in DIRECT's
configs), then multiplies the output back. kscan stores the rule in a checkpoint's metadata
(``meta.kspace_scaling = {"percentile": p}``: ``kscan import-checkpoint --format direct`` writes
it, and so does ``kscan train`` with ``data.scale_percentile``) and
:class:`kscan.pipelines.model_inference.Reconstructor` applies it, so that the model sees the
inputs it was trained on: ``image(y) = s * model(y / s)``, which makes the reconstruction
scale-equivariant. A checkpoint without the entry gets its k-space as stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kscan.errors import ConfigError

META_KEY = "kspace_scaling"
DIRECT_PERCENTILE = 0.99
"""The percentile of DIRECT's ``ComputeScalingFactor`` default and published configs."""


@dataclass(frozen=True)
class KspaceScaling:
    """Divide each sample's masked k-space by its ``percentile`` modulus (module docstring)."""

    percentile: float

    def __post_init__(self) -> None:
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ConfigError(f"{META_KEY}.percentile: expected a number in (0, 1], got {p!r}")

    def factors(self, kspace: torch.Tensor) -> torch.Tensor:
        """``s`` per sample, ``(batch,)`` real, for masked k-space ``(batch, coil, H, W)``
        complex; 1 for a sample with no data (all zero) instead of dividing by 0."""
        out = torch.ones(kspace.shape[0], dtype=kspace.real.dtype, device=kspace.device)
        for b, sample in enumerate(kspace):
            modulus = sample.abs()
            modulus = modulus[modulus.flatten(1).any(dim=1)].flatten()
            if modulus.numel() == 0:
                continue
            k = math.floor((1 - self.percentile) * modulus.numel()) + 1
            value = torch.topk(modulus, k).values[-1]
            if value > 0:
                out[b] = value
        return out

    def to_meta(self) -> dict[str, float]:
        """The checkpoint metadata entry."""
        return {"percentile": float(self.percentile)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> KspaceScaling | None:
        """The rule a checkpoint's metadata holds, or None (k-space used as stored)."""
        entry = meta.get(META_KEY)
        if entry is None:
            return None
        if not isinstance(entry, Mapping) or set(entry) != {"percentile"}:
            raise ConfigError(f"{META_KEY}: expected {{'percentile': p}}, got {entry!r}")
        return cls(entry["percentile"])
