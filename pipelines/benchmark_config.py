"""The configuration of ``kscan benchmark``: datasets, masks, model entries, metrics.

A YAML file (every key is described in ``docs/benchmark.md``)::

    datasets: {sim_test: data/sim_test/h5}          name -> folder of fastMRI-layout .h5 files
    masks:
      - {kind: equispaced_fraction, accelerations: [4], center_fraction: 0.08}
    models:
      - {name: zero-filled, kind: classical, method: zf}
      - {name: CG-SENSE, kind: classical, method: sense, params: {lam: 0.01, max_iter: 20}}
      - {name: RVN, kind: reconstruction, model: rvn, checkpoint: shipped}
      - {name: RVN -> VM-UNet, kind: segmentation, model: vmunet, checkpoint: shipped, on: RVN}
      - {name: joint, kind: multitask, model: joint-rvn-seg, checkpoint: runs/joint/best.safetensors}
    metrics: [ssim, psnr, nmse, dice, hd95]
    device: cpu
    batch_size: 4
    seed: null
    output_dir: runs/benchmark

:func:`load_config` builds a :class:`BenchmarkConfig`; every name is checked here, before any
work: unknown keys, model kinds, registry names (of the entry's task), classical methods and
their parameters, mask kinds, metrics and ``on`` references fail with a :class:`ConfigError`
listing the valid choices. Checkpoint files are not opened here: a missing or broken checkpoint
fails the cells of its entry only.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kscan.config import from_mapping
from kscan.errors import ConfigError
from kscan.models import registry
from kscan.physics.masks import MASK_KINDS
from kscan.pipelines.checkpoint import SHIPPED, resolve_checkpoint
from kscan.pipelines.reconstruct import METHODS, ReconSettings

KINDS = ("classical", "reconstruction", "segmentation", "multitask")
"""Model entry kinds: a classical method, or a registry model of that task."""
CLASSICAL_PARAMS = ("maps", "regularizer", "lam", "max_iter")
"""The :class:`~kscan.pipelines.reconstruct.ReconSettings` fields a classical entry may set."""
RECONSTRUCTION_METRICS = ("ssim", "psnr", "nmse")
SEGMENTATION_METRICS = ("dice", "iou", "hd95")
METRICS = (*RECONSTRUCTION_METRICS, *SEGMENTATION_METRICS)
TARGET = "target"
"""``on: target``: a segmentation entry segments the fully sampled target images."""


def _choices(name: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: unknown {value!r}; expected one of {', '.join(allowed)}")


@dataclass
class MaskConfig:
    """One mask kind at one or more accelerations (the centre fraction is shared)."""

    kind: str = "equispaced_fraction"
    accelerations: tuple[float, ...] = (4.0,)
    center_fraction: float = 0.08

    def __post_init__(self) -> None:
        _choices("kind", self.kind, MASK_KINDS)
        if isinstance(self.accelerations, int | float):
            self.accelerations = (self.accelerations,)
        values = tuple(self.accelerations)
        if not values or not all(
            isinstance(a, int | float) and not isinstance(a, bool) and math.isfinite(a) and a >= 1
            for a in values
        ):
            raise ConfigError(f"accelerations: expected a list of numbers >= 1, got {values!r}")
        if len(set(values)) != len(values):
            raise ConfigError(f"accelerations: {values!r} repeats a value")
        self.accelerations = tuple(float(a) for a in values)
        cf = self.center_fraction
        if isinstance(cf, bool) or not isinstance(cf, int | float) or not 0 < cf < 1:
            raise ConfigError(f"center_fraction: expected a fraction in (0, 1), got {cf!r}")
        self.center_fraction = float(cf)


@dataclass
class ModelEntry:
    """One row of the grid (see the module docstring).

    Attributes:
        name: the display name (unique); ``on`` refers to it.
        kind: one of :data:`KINDS`.
        method: classical entries: ``zf``, ``sense`` or ``cs``.
        params: classical entries: any of :data:`CLASSICAL_PARAMS` (``kscan reconstruct``'s
            ``--maps``, ``--regularizer``, ``--lam``, ``--max-iter``).
        model: learned entries: the registry name, of the entry's kind (task).
        checkpoint: learned entries: a kscan checkpoint path or ``shipped``.
        on: segmentation entries: the name of the entry whose images they segment, or ``target``.
    """

    name: str = ""
    kind: str = ""
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    checkpoint: str | None = None
    on: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"name: expected a non-empty display name, got {self.name!r}")
        _choices("kind", self.kind, KINDS)
        if not isinstance(self.params, Mapping):
            raise ConfigError(f"params: expected a mapping, got {self.params!r}")
        self.params = dict(self.params)
        if self.kind == "classical":
            self._check_classical()
        else:
            self._check_learned()

    def _unused(self, *keys: str) -> None:
        for key in keys:
            if getattr(self, key):
                raise ConfigError(f"{key}: not used by {self.kind} entries ({self.name!r})")

    def _check_classical(self) -> None:
        self._unused("model", "checkpoint", "on")
        _choices("method", self.method, METHODS)
        for key in self.params:
            _choices("params", key, CLASSICAL_PARAMS)
        self.settings(batch_size=1).solver()  # the values themselves (zf takes no lam, ...)

    def _check_learned(self) -> None:
        self._unused("method", "params")
        _choices("model", self.model, registry.names(self.kind))
        if self.checkpoint is None:
            self.checkpoint = SHIPPED
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ConfigError(
                f"checkpoint: expected a file path, {SHIPPED!r} or '{SHIPPED}:<name>', "
                f"got {self.checkpoint!r}"
            )
        if (self.kind == "segmentation") != (self.on is not None):
            raise ConfigError(
                f"on: segmentation entries (only) name the entry whose images they segment, "
                f"or {TARGET!r}; {self.name!r} ({self.kind}) has on={self.on!r}"
            )

    def settings(self, batch_size: int, **mask: Any) -> ReconSettings:
        """The ``kscan reconstruct`` settings of a classical entry."""
        return ReconSettings(method=self.method, batch_size=batch_size, **self.params, **mask)

    def checkpoint_path(self) -> Path:
        """The checkpoint file (``shipped``, ``shipped:<name>``: kscan's weights,
        :func:`kscan.pipelines.checkpoint.resolve_checkpoint`; ConfigError if none)."""
        return resolve_checkpoint(self.checkpoint, self.model)

    @property
    def makes_images(self) -> bool:
        """Whether the entry reconstructs (so that a segmentation entry may run on it)."""
        return self.kind != "segmentation"

    @property
    def segments(self) -> bool:
        return self.kind in ("segmentation", "multitask")


@dataclass
class BenchmarkConfig:
    """The benchmark grid: ``models x masks x accelerations x datasets`` (module docstring).

    ``seed`` is mixed into every volume's file-name seed, as ``kscan undersample --seed``;
    ``device`` and ``output_dir`` are overridden by ``--device`` and ``--out``.
    """

    datasets: dict[str, str] = field(default_factory=dict)
    masks: list[MaskConfig] = field(default_factory=list)
    models: list[ModelEntry] = field(default_factory=list)
    metrics: tuple[str, ...] = ("ssim", "psnr", "nmse", "dice", "hd95")
    device: str = "cpu"
    batch_size: int = 4
    seed: int | None = None
    output_dir: str = "benchmark"

    def __post_init__(self) -> None:
        if not isinstance(self.datasets, Mapping) or not self.datasets:
            raise ConfigError(
                f"datasets: expected a mapping name -> folder of .h5 files, got {self.datasets!r}"
            )
        self.datasets = {str(k): str(v) for k, v in self.datasets.items()}
        self.masks = _entries(MaskConfig, self.masks, "masks")
        self.models = _entries(ModelEntry, self.models, "models")
        self.metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        if not self.metrics:
            raise ConfigError(f"metrics: expected some of {', '.join(METRICS)}, got none")
        for metric in self.metrics:
            _choices("metrics", metric, METRICS)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ConfigError(f"batch_size: expected a positive integer, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {self.batch_size}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"seed: expected an integer or null, got {self.seed!r}")
        self._check_names()

    def _check_names(self) -> None:
        names = [m.name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"models: the names {', '.join(map(repr, repeated))} repeat")
        sources = [TARGET, *(m.name for m in self.models if m.makes_images)]
        for entry in self.models:
            if entry.on is not None and entry.on not in sources:
                raise ConfigError(
                    f"models.{entry.name}.on: unknown entry {entry.on!r}; expected one of "
                    f"{', '.join(map(repr, sources))}"
                )

    def ordered_models(self) -> list[ModelEntry]:
        """The entries with every segmentation entry after the entries it depends on."""
        return [m for m in self.models if m.makes_images] + [
            m for m in self.models if not m.makes_images
        ]

    def metric_names(self, task: str) -> list[str]:
        """The configured metrics of ``task`` ("reconstruction" or "segmentation")."""
        of_task = RECONSTRUCTION_METRICS if task == "reconstruction" else SEGMENTATION_METRICS
        return [m for m in self.metrics if m in of_task]


def _entries(cls: type, values: Any, where: str) -> list[Any]:
    if not isinstance(values, list | tuple) or not values:
        raise ConfigError(f"{where}: expected a non-empty list of mappings, got {values!r}")
    return [
        v if isinstance(v, cls) else from_mapping(cls, v, f"{where}[{i}]")
        for i, v in enumerate(values)
    ]


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (``true``/``false`` only), so that the key ``on`` stays a string (YAML
    1.1 reads ``on``, ``off``, ``yes``, ``no`` as booleans)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_config(path: str | os.PathLike[str]) -> BenchmarkConfig:
    """Read and check a benchmark YAML file (module docstring; YAML 1.2 booleans)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such benchmark config file")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_Yaml12Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    try:
        return from_mapping(BenchmarkConfig, values, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
